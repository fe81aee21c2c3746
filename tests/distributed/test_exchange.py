"""The exchange's gather on real gloo processes: what every rank applies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from spngd import SPNGD
from spngd.curvature import LinearBlock
from spngd.distributed import DistributedConfig
from spngd.distributed.exchange import DistributedExchange
from spngd.settings import InvalidSettingError
from tests.distributed.harness import free_port, run_workers

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
    preconditioned, to_compute = {}, {}
    for name, ps in params.items():
        if exchange.owns(name):
            value = HUGE if name == "huge" else 1 / 3
            preconditioned.update((p, torch.full_like(p, value)) for p in ps)
            to_compute[name] = [True, False]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gathered, all_to_compute = exchange.gather(plain, preconditioned, to_compute)
    torch.save(
        {
            "owns huge": exchange.owns("huge"),
            "gathered": {name: [gathered[p] for p in ps] for name, ps in params.items()},
            "to_compute": all_to_compute,
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
        assert result["to_compute"] == {"small": [True, False], "huge": [True, False]}
        for direction in result["gathered"]["small"]:
            assert torch.equal(direction, torch.full_like(direction, one_third))
        for direction in result["gathered"]["huge"]:
            assert torch.equal(direction, torch.full_like(direction, 0.25))
        warned = [w for w in result["warnings"] if "exceeds the range" in w]
        assert len(warned) == int(result["owns huge"])
    assert sorted(r["owns huge"] for r in results) == [False, True]


def _reads_worker(rank: int, world_size: int, out: str, wrap: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from tests.host_reads import counting_host_reads
    from tests.small_models import deep_conv_bn_net

    model = deep_conv_bn_net(10)
    net = DistributedDataParallel(model) if wrap else model
    opt = SPNGD(net, lr=0.05, distributed=DistributedConfig(bucket_elements=500))
    gen = torch.Generator().manual_seed(rank)
    reads = []
    for _ in range(12):
        x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        with counting_host_reads() as backward_reads:
            torch.nn.functional.cross_entropy(net(x), y).backward()
        with counting_host_reads() as step_reads:
            opt.step()
        reads.append((len(backward_reads), len(step_reads)))
    counts = opt.refresh_counts()["total"]
    torch.save({"reads": reads, "stats": counts}, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("wrap", [True, False], ids=["ddp", "unwrapped"])
def test_a_distributed_step_reads_the_device_twice(tmp_path: Path, wrap: bool) -> None:
    """22 blocks on 2 ranks: nothing read during backward; per ``step()`` one read of this
    rank's checks and one of the headers every owner sent (refresh to_compute, validity)."""
    run_workers(_reads_worker, 2, str(tmp_path), wrap)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["reads"] == [(0, 2)] * 12
        assert result["stats"]["stats_skipped"] > 0


TEARDOWN_SCRIPT = """
import atexit, gc

def report() -> None:  # registered first, so it runs after every other exit handler
    names = ("SPNGD", "DistributedDataParallel")
    alive = sorted(type(o).__name__ for o in gc.get_objects() if type(o).__name__ in names)
    print("alive at finalization:", alive, flush=True)

atexit.register(report)
gc.disable()  # what a cycle outlives is then certain, not left to the collector's timing

import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from spngd import SPNGD

def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    ddp = DistributedDataParallel(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)))
    opt = SPNGD(ddp, lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(torch.randn(8, 10)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    dist.destroy_process_group()

main()
"""


def test_a_script_that_tears_down_after_its_last_step_leaves_nothing_to_finalization(
    tmp_path: Path,
) -> None:
    """A user script: DDP, SPNGD, four steps, ``destroy_process_group()`` at the end of its
    function. The optimizer, the model's hooks and DDP's reducer sit in reference cycles
    that outlive the function; freed during interpreter finalization, gloo's objects they
    hold can abort a rank. They must be gone before it (real processes, a fresh
    interpreter each)."""
    script = tmp_path / "user_script.py"
    script.write_text(TEARDOWN_SCRIPT)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for rank in ranks:
        stdout, stderr = rank.communicate(timeout=120)
        assert rank.returncode == 0, stderr
        assert stdout == "alive at finalization: []\n", stderr


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"comm_dtype": torch.float64}, "comm_dtype must be one of float32, bfloat16, float16"),
        ({"assignment": "random"}, "assignment must be lpt or equal_count, got 'random'"),
        ({"overlap": 1}, "overlap must be True or False, got 1"),
        ({"bucket_elements": 0}, "bucket_elements must be an int >= 1, got 0"),
        ({"bucket_elements": 2.5}, "bucket_elements must be an int >= 1, got 2.5"),
    ],
)
def test_a_bad_distributed_setting_names_itself(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSettingError, match=f"^DistributedConfig.{re.escape(message)}"):
        DistributedConfig(**knobs)  # type: ignore[arg-type]
