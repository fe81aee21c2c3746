"""16-bit communication: every rank applies the same rounded directions.

Preconditioned gradients travel in ``comm_dtype``; an owner that applied its own
full-precision values while the others applied the rounded copy would let DDP replicas
drift apart (DDP never re-syncs parameters), so the parameters are compared bit for bit.
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
from tests.small_models import conv_bn_net

STEPS = 6
LOCAL_BATCH = 8


def _worker(rank: int, world_size: int, out: str, comm_dtype: torch.dtype) -> None:
    model = conv_bn_net()
    ddp = DistributedDataParallel(model)
    opt = SPNGD(ddp, lr=0.1, damping=1e-3, distributed=DistributedConfig(comm_dtype=comm_dtype))
    gen = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x = torch.randn(LOCAL_BATCH, 3, 9, 9, generator=gen)
        y = torch.randint(0, 3, (LOCAL_BATCH,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize(
    ("world_size", "comm_dtype"),
    [(2, torch.bfloat16), (2, torch.float16), (3, torch.bfloat16), (3, torch.float16)],
    ids=["2-ranks-bf16", "2-ranks-fp16", "3-ranks-bf16", "3-ranks-fp16"],
)
def test_replicas_stay_bit_identical(
    tmp_path: Path, world_size: int, comm_dtype: torch.dtype
) -> None:
    run_workers(_worker, world_size, str(tmp_path), comm_dtype)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    initial = [p.detach() for p in conv_bn_net().parameters()]
    for result in results[1:]:
        for got, want in zip(result, results[0], strict=True):
            assert torch.equal(got, want)
    moved = [not torch.equal(p, q) for p, q in zip(results[0], initial, strict=True)]
    assert all(moved)
