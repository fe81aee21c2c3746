"""Distributed SPNGD equals single-process SPNGD on the concatenated batch.

Each rank normalises its own share in BatchNorm (no SyncBN), so the single-process
reference runs the same shares as micro-batches with ``accumulation_steps = world size``:
the same BatchNorm statistics, the same averaged gradients and curvature statistics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from spngd import SPNGD
from spngd.distributed import DistributedConfig
from tests.distributed.harness import run_workers
from tests.distributed.parity_case import (
    LOCAL_BATCH,
    ghost_batch_step,
    global_batch,
    parity_model,
    parity_optimizer,
)

STEPS = 8


def _worker(rank: int, world_size: int, out: str, wrap: bool, settings: dict) -> None:
    model = parity_model()
    net = DistributedDataParallel(model) if wrap else model
    opt = parity_optimizer(
        net,
        distributed=DistributedConfig(
            assignment=settings["assignment"], overlap=settings["overlap"], bucket_elements=200
        ),
        stat_interval=settings["stat_interval"],
        statistics_examples=settings.get("statistics_examples"),
        accumulation_steps=settings.get("micro_batches", 1),
    )
    micro_batches = settings.get("micro_batches", 1)
    size = LOCAL_BATCH // micro_batches
    for step in range(STEPS):
        x, y = global_batch(step, world_size)
        opt.zero_grad()
        for micro in range(micro_batches):
            start = rank * LOCAL_BATCH + micro * size
            part = slice(start, start + size)
            (F.cross_entropy(net(x[part]), y[part]) / micro_batches).backward()
        # with overlap every bucket was started during backward
        exchange = opt.preconditioner.exchange
        launched = exchange.buckets_launched == len(exchange.buckets)
        assert launched == settings["overlap"], (launched, settings)
        opt.step()
    state = opt.state_dict()  # collective: every rank takes part
    torch.save(
        {
            "params": [p.detach() for p in model.parameters()],
            "stats": opt.refresh_counts(),
            "curvature": state["curvature"],
        },
        Path(out) / f"rank{rank}.pt",
    )


def _reference(world_size: int, settings: dict) -> tuple[list[torch.Tensor], SPNGD]:
    model = parity_model()
    micro_batches = settings.get("micro_batches", 1)
    opt = parity_optimizer(
        model,
        accumulation_steps=world_size * micro_batches,
        stat_interval=settings["stat_interval"],
        statistics_examples=settings.get("statistics_examples"),
    )
    for step in range(STEPS):
        ghost_batch_step(model, opt, step, world_size, micro_batches)
    return [p.detach() for p in model.parameters()], opt


@pytest.mark.parametrize(
    ("world_size", "wrap", "settings"),
    [
        (2, False, {"assignment": "lpt", "stat_interval": 1, "overlap": True}),
        (
            3,
            True,
            # each rank's statistics from 5 of its 8 examples, as each micro-batch's
            {"assignment": "lpt", "stat_interval": None, "overlap": True, "statistics_examples": 5},
        ),
        (3, False, {"assignment": "equal_count", "stat_interval": None, "overlap": False}),
        (
            2,
            False,
            # two micro-batches of 4 per rank, the buckets launched in the second's backward
            {"assignment": "lpt", "stat_interval": None, "overlap": True, "micro_batches": 2},
        ),
    ],
    ids=[
        "2-ranks-unwrapped",
        "3-ranks-ddp-adaptive",
        "3-ranks-equal-count-no-overlap",
        "2-ranks-accumulating-adaptive",
    ],
)
def test_distributed_steps_equal_single_process(
    tmp_path: Path, world_size: int, wrap: bool, settings: dict
) -> None:
    run_workers(_worker, world_size, str(tmp_path), wrap, settings)
    expected, reference = _reference(world_size, settings)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for result in results:
        # float32: a micro-batch's gradients are rescaled by K where a rank's are not; over
        # the steps the preconditioner amplifies that rounding to a few 1e-6
        for got, want in zip(result["params"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert result["stats"] == reference.refresh_counts()
    if settings["stat_interval"] is None:  # the rule skipped work, identically everywhere
        assert reference.refresh_counts()["total"]["stats_skipped"] > 0
    curvature = results[0]["curvature"]
    assert set(curvature) == set(reference.curvature)  # collected on the first rank
    for result in results[1:]:  # the others hold their own layers
        assert set(result["curvature"]) < set(curvature)
    for name, block in reference.curvature.items():
        # statistics of the last step: second moments of per-example gradients taken at those
        # parameters (BatchNorm's after centring), so their few 1e-6 grow to a few 1e-5
        for got, want in zip(curvature[name]["factors"], block.factors, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _subgroup_worker(rank: int, world_size: int, out: str) -> None:
    """Ranks 1 and 2 train in a group of their own; rank 0 only takes part in creating it."""
    import torch.distributed as dist

    group = dist.new_group([1, 2])
    if rank == 0:
        return
    group_rank = dist.get_rank(group)
    model = parity_model()
    opt = parity_optimizer(
        model, distributed=DistributedConfig(process_group=group, bucket_elements=200)
    )
    for step in range(STEPS):
        x, y = global_batch(step, 2)
        part = slice(group_rank * LOCAL_BATCH, (group_rank + 1) * LOCAL_BATCH)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()
    opt.state_dict()
    torch.save([p.detach() for p in model.parameters()], Path(out) / f"rank{rank}.pt")


def test_a_process_group_of_some_ranks_equals_single_process(tmp_path: Path) -> None:
    """Owners, sources and destinations are ranks of the given group, not of the world."""
    run_workers(_subgroup_worker, 3, str(tmp_path))
    expected, _ = _reference(2, {"stat_interval": None})
    for rank in (1, 2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # as above
