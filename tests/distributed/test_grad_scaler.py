"""A GradScaler with several ranks: the same update with or without DDP, and an overflow
on one rank skips the step on every rank (real gloo processes)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from spngd import SPNGD
from spngd.distributed import DistributedConfig
from tests.distributed.harness import run_workers
from tests.small_models import conv_bn_net

STEPS = 4
LOCAL_BATCH = 8
SCALE = 2.0**8


def _worker(rank: int, world_size: int, out: str, wrap: bool, overflow_step: int) -> None:
    model = conv_bn_net()
    net = DistributedDataParallel(model) if wrap else model
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opt = SPNGD(
        net,
        lr=0.1,
        damping=1e-2,
        grad_scaler=scaler,
        distributed=DistributedConfig(overlap=True, bucket_elements=200),
    )
    gen = torch.Generator().manual_seed(rank)
    history = []
    for step in range(STEPS):
        x = torch.randn(LOCAL_BATCH, 3, 9, 9, generator=gen)
        y = torch.randint(0, 3, (LOCAL_BATCH,), generator=gen)
        if step == overflow_step and rank == 0:
            x[0] = float("inf")  # this rank's gradients overflow, the other's do not
        opt.zero_grad()
        scaler.scale(F.cross_entropy(net(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        history.append([p.detach().clone() for p in model.parameters()])
    torch.save({"history": history, "scale": scaler.get_scale()}, Path(out) / f"rank{rank}.pt")


def _load(path: Path) -> list[dict]:
    return [torch.load(path / f"rank{r}.pt") for r in range(2)]


def test_unwrapped_overlap_update_equals_the_ddp_update_under_a_grad_scaler(
    tmp_path: Path,
) -> None:
    """Gradients reduced during backward still carry the loss scale; they are unscaled as
    they are packed, so the update is the DDP one (which unscales after averaging)."""
    (tmp_path / "ddp").mkdir()
    (tmp_path / "unwrapped").mkdir()
    run_workers(_worker, 2, str(tmp_path / "ddp"), True, -1)
    run_workers(_worker, 2, str(tmp_path / "unwrapped"), False, -1)
    ddp, unwrapped = _load(tmp_path / "ddp"), _load(tmp_path / "unwrapped")
    start = [p.detach() for p in conv_bn_net().parameters()]
    for got, want, p0 in zip(
        unwrapped[0]["history"][-1], ddp[0]["history"][-1], start, strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got - p0).abs().max() > 1e-3  # the parameters moved


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    """Rank 0's gradients hold inf at step 1; GradScaler calls SPNGD's step on both ranks,
    which agree to skip it (no rank waits for the other), and the replicas stay identical."""
    run_workers(_worker, 2, str(tmp_path), False, 1, timeout_s=30.0)
    results = _load(tmp_path)
    for result in results:
        before, skipped, after = result["history"][:3]
        for p_before, p_skipped, p_after in zip(before, skipped, after, strict=True):
            assert torch.equal(p_skipped, p_before)
            assert not torch.equal(p_after, p_skipped)
    for got, want in zip(results[1]["history"][-1], results[0]["history"][-1], strict=True):
        assert torch.equal(got, want)
    assert results[0]["scale"] == SCALE / 2  # the overflowing rank's scaler backed off
