"""Gradient accumulation through the training step (issue 4 item 6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spngd.train.augment import soft_targets
from spngd.train.config import resolve_config
from spngd.train.trainer import make_optimizer, train_step


def _model() -> nn.Module:
    """Conv + Linear without BatchNorm, whose statistics would depend on the micro-batch."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


@pytest.mark.parametrize("optimizer", ["spngd", "sgd"])
def test_two_micro_batches_of_32_equal_one_batch_of_64(optimizer: str) -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(64, 1, 8, 8, generator=generator)
    targets = soft_targets(torch.randint(0, 10, (64,), generator=generator), 10, smoothing=0.1)
    final = {}
    for accumulate in (1, 2):
        config = resolve_config(
            {
                "optimizer": optimizer,
                "batch_size": 64,
                "accumulate": accumulate,
                "stat_interval": 1,
                "device": "cpu",
                "weight_decay": 1e-3,
            }
        )
        model = _model()
        opt = make_optimizer(model, config)
        micro = [
            (x, t) for x, t in zip(images.chunk(accumulate), targets.chunk(accumulate), strict=True)
        ]
        results = [train_step(model, opt, micro, rescale=True) for _ in range(2)]
        assert results[0].examples == 64
        final[accumulate] = (results, [p.detach().clone() for p in model.parameters()])
    (one, one_params), (two, two_params) = final[1], final[2]
    changed = any(
        not torch.equal(p, q) for p, q in zip(one_params, _model().parameters(), strict=True)
    )
    assert changed
    for p, q in zip(one_params, two_params, strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-5), (p - q).abs().max()
    for a, b in zip(one, two, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-5) and a.correct == b.correct
