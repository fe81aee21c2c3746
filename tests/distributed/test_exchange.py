"""The exchange's gather on real gloo processes: what every rank applies."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from spngd.curvature import LinearBlock
from spngd.distributed import DistributedConfig
from spngd.distributed.exchange import DistributedExchange
from tests.distributed.harness import run_workers

HUGE = 1e6
"""A preconditioned value float16 cannot hold (its largest is 65504)."""


def _gather_worker(rank: int, world_size: int, out: str) -> None:
    torch.manual_seed(0)
    modules = {"small": nn.Linear(3, 2), "huge": nn.Linear(2, 2)}
    blocks = {name: LinearBlock(name, module) for name, module in modules.items()}
    exchange = DistributedExchange(
        blocks,
        plain_params=[],
        config=DistributedConfig(comm_dtype=torch.float16),
        average_gradients=False,
        micro_batches=1,
    )
    params = {name: block.params for name, block in blocks.items()}
    plain = {p: torch.full_like(p, 0.25) for ps in params.values() for p in ps}
    preconditioned, plans = {}, {}
    for name, ps in params.items():
        if exchange.owns(name):
            value = HUGE if name == "huge" else 1 / 3
            preconditioned.update((p, torch.full_like(p, value)) for p in ps)
            plans[name] = [True, False]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gathered, all_plans = exchange.gather(plain, preconditioned, plans)
    torch.save(
        {
            "owns huge": exchange.owns("huge"),
            "gathered": {name: [gathered[p] for p in ps] for name, ps in params.items()},
            "plans": all_plans,
            "warnings": [str(w.message) for w in caught],
        },
        Path(out) / f"rank{rank}.pt",
    )


def test_gather_gives_every_rank_the_rounded_values_and_the_plain_ones_where_16_bits_overflow(
    tmp_path: Path,
) -> None:
    run_workers(_gather_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one_third = torch.tensor(1 / 3).to(torch.float16).float()  # what the owner sent
    for result in results:
        assert result["plans"] == {"small": [True, False], "huge": [True, False]}
        for direction in result["gathered"]["small"]:
            assert torch.equal(direction, torch.full_like(direction, one_third))
        for direction in result["gathered"]["huge"]:
            assert torch.equal(direction, torch.full_like(direction, 0.25))
        warned = [w for w in result["warnings"] if "exceeds the range" in w]
        assert len(warned) == int(result["owns huge"])
    assert sorted(r["owns huge"] for r in results) == [False, True]
