"""One training step: micro-batches prepared one at a time, groups of micro-batches."""

from __future__ import annotations

import torch
from torch import nn

from spngd.train.augment import soft_targets
from spngd.train.config import resolve_config
from spngd.train.optimizers import make_optimizer
from spngd.train.step import groups_of, train_step


def test_micro_batches_are_prepared_one_at_a_time_just_before_their_forward() -> None:
    """With accumulation only one micro-batch is on the device at a time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = make_optimizer(model, resolve_config({"device": "cpu"}))
    events: list[str] = []
    model.register_forward_hook(lambda *_: events.append("forward"))

    def prepare(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        events.append("prepare")
        return images, soft_targets(labels, 10)

    micro = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    result = train_step(model, opt, micro, rescale=False, prepare=prepare)
    assert events == ["prepare", "forward"] * 3
    assert result.examples == 12


def test_groups_of_micro_batches_drop_a_short_last_group() -> None:
    assert list(groups_of(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(groups_of(range(6), 1)) == [[i] for i in range(6)]
