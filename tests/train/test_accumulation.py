"""Gradient accumulation through the training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from spngd.train.augment import soft_targets
from spngd.train.config import resolve_config
from spngd.train.optimizers import make_optimizer
from spngd.train.step import train_step
from tests.distributed.harness import run_workers


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


def _ddp_accumulation_worker(rank: int, world_size: int, out: str) -> None:
    """Each rank: DDP-wrapped model, two micro-batches of 16 per step, three steps; counts
    DDP's gradient all-reduces with a communication hook."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    ddp = DistributedDataParallel(model)
    reductions = []

    def counting_hook(state, bucket):  # unannotated: DDP checks the annotations it finds
        reductions.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    config = resolve_config(
        {"batch_size": 64, "accumulate": 2, "device": "cpu", "refresh": {"warmup_steps": 1}}
    )
    opt = make_optimizer(ddp, config)
    images, targets = _batches()
    mine = slice(rank * 32, (rank + 1) * 32)
    for step in range(3):
        x, t = images[step][mine], targets[step][mine]
        reductions.clear()
        train_step(ddp, opt, [(x[:16], t[:16]), (x[16:], t[16:])], rescale=True)
        assert len(reductions) == len(set(reductions)), reductions  # each bucket once
    torch.save([p.detach() for p in model.parameters()], Path(out) / f"rank{rank}.pt")


def _batches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(64, 1, 8, 8, generator=generator) for _ in range(3)]
    labels = [torch.randint(0, 10, (64,), generator=generator) for _ in range(3)]
    return images, [soft_targets(y, 10) for y in labels]


def test_ddp_accumulation_reduces_once_per_step_and_equals_one_process(tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches with DDP (``no_sync`` but for the last micro-batch) give
    the parameters of one process taking the same 4 micro-batches, past the refresh's
    warm-up, so steps that skip statistics are compared too."""
    run_workers(_ddp_accumulation_worker, 2, str(tmp_path))
    config = resolve_config(
        {"batch_size": 64, "accumulate": 4, "device": "cpu", "refresh": {"warmup_steps": 1}}
    )
    model = _model()
    opt = make_optimizer(model, config)
    images, targets = _batches()
    for step in range(3):
        x, t = images[step], targets[step]
        train_step(model, opt, [(x[i : i + 16], t[i : i + 16]) for i in range(0, 64, 16)], True)
    assert opt.refresh_counts()["total"]["stats_skipped"] > 0
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for p, q in zip(got, model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
