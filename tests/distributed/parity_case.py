"""The distributed parity case: a small model with every kind of block (a grouped
convolution too), seeded global batches, and SPNGD with a short warm-up, shared by the
tests that compare distributed runs with single-process ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spngd import SPNGD, AdaptiveRefresh
from spngd.refresh import NOISE_LEAD_STEPS

LOCAL_BATCH = 8
REFRESH = AdaptiveRefresh(warmup_steps=NOISE_LEAD_STEPS + 1, max_interval=4)
"""A short warm-up, so that the adaptive rule's decisions (from the reduced statistics and
their measured noise) shape half the steps compared; noise is measured from the second
step on, so the statistics' buffers change layout mid-run."""


def parity_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 4, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 16, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    )


def global_batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    n = LOCAL_BATCH * world_size
    return torch.randn(n, 3, 9, 9, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def parity_optimizer(model: nn.Module, **kwargs: object) -> SPNGD:
    return SPNGD(
        model,
        lr=0.1,
        momentum=0.9,
        damping=1e-2,
        weight_decay=1e-4,
        refresh=REFRESH,
        **kwargs,  # type: ignore[arg-type]
    )


def ghost_batch_step(
    model: nn.Module, opt: SPNGD, step: int, world_size: int, micro_batches: int = 1
) -> None:
    """One single-process step that sees each rank's share (or each of its
    ``micro_batches``) as its own micro-batch (``opt`` built with
    ``accumulation_steps=world_size * micro_batches``)."""
    x, y = global_batch(step, world_size)
    parts = world_size * micro_batches
    size = LOCAL_BATCH // micro_batches
    opt.zero_grad()
    for k in range(parts):
        part = slice(k * size, (k + 1) * size)
        (F.cross_entropy(model(x[part]), y[part]) / parts).backward()
    opt.step()
