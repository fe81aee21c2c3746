"""A dead rank stops the others with a clear error; checkpoints move across world sizes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spngd import SPNGD
from tests.distributed.harness import run_workers, start_workers
from tests.distributed.parity_case import (
    LOCAL_BATCH,
    ghost_batch_step,
    global_batch,
    parity_model,
    parity_optimizer,
)


def _dying_worker(rank: int, world_size: int, out: str) -> None:
    model = parity_model()
    opt = parity_optimizer(model, stat_interval=1)
    for step in range(20):
        if rank == 1 and step == 2:
            os._exit(3)  # the rank dies without a word
        x, y = global_batch(step, world_size)
        part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        start = time.monotonic()
        try:
            opt.step()
        except RuntimeError as error:
            Path(out, "error.txt").write_text(f"{time.monotonic() - start:.1f}\n{error}")
            os._exit(0)  # the process group cannot be torn down cleanly without its peer
    os._exit(1)


def test_a_dead_rank_stops_the_others_with_a_clear_error(tmp_path: Path) -> None:
    context = start_workers(_dying_worker, 2, str(tmp_path), timeout_s=15.0)
    deadline = time.monotonic() + 60
    for process in context.processes:
        process.join(timeout=max(1.0, deadline - time.monotonic()))
    assert all(not p.is_alive() for p in context.processes), "a rank hung"
    assert context.processes[0].exitcode == 0
    seconds, message = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert "a rank has probably died or stalled" in message
    assert float(seconds) < 30.0


def _train(model: torch.nn.Module, opt: SPNGD, steps: range, rank: int, world_size: int) -> None:
    for step in steps:
        x, y = global_batch(step, world_size)
        part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()


RESUMED_STEPS = range(3, 9)
"""The steps after the resume: past the parity case's refresh warm-up, so that some
statistics are skipped by the resumed refresh state."""


def _first_run(rank: int, world_size: int, out: str) -> None:
    model = parity_model()
    opt = parity_optimizer(model)
    _train(model, opt, range(3), rank, world_size)
    state = opt.state_dict()
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": state}, Path(out) / "ckpt.pt")


def _resumed_run(rank: int, world_size: int, out: str) -> None:
    checkpoint = torch.load(Path(out) / "ckpt.pt")
    model = parity_model()
    model.load_state_dict(checkpoint["model"])
    opt = parity_optimizer(model)
    opt.load_state_dict(checkpoint["opt"])
    _train(model, opt, RESUMED_STEPS, rank, world_size)
    counts = opt.refresh_counts()["total"]
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], Path(out) / "final.pt")
        torch.save(counts, Path(out) / "counts.pt")


def _reference(first: int, resumed: int) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Single process: 3 steps as ``first`` ghost batches, then resume as ``resumed``."""
    model = parity_model()
    state: dict | None = None
    for world_size, steps in ((first, range(3)), (resumed, RESUMED_STEPS)):
        opt = parity_optimizer(model, accumulation_steps=world_size)
        if state is not None:
            opt.load_state_dict(state)
        for step in steps:
            ghost_batch_step(model, opt, step, world_size)
        state = opt.state_dict()
        opt.remove_hooks()
    return [p.detach() for p in model.parameters()], opt.refresh_counts()["total"]


def _run(function: Callable[[int, int, str], None], world_size: int, out: str) -> None:
    """``function`` on ``world_size`` processes; one rank is this process, without a
    process group."""
    if world_size == 1:
        function(0, 1, out)
    else:
        run_workers(function, world_size, out)


@pytest.mark.parametrize(("first", "resumed"), [(2, 3), (2, 1), (1, 2)])
def test_resume_on_a_different_number_of_ranks(tmp_path: Path, first: int, resumed: int) -> None:
    _run(_first_run, first, str(tmp_path))
    _run(_resumed_run, resumed, str(tmp_path))
    final = torch.load(tmp_path / "final.pt")
    expected, counts = _reference(first, resumed)
    assert torch.load(tmp_path / "counts.pt") == counts
    for got, want in zip(final, expected, strict=True):
        # float32 rounding of ranks against micro-batches, amplified over 9 steps (as in
        # the parity tests)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counts["stats_skipped"] > 0


def _refresh_state_worker(
    rank: int, world_size: int, out: str, steps: range, checkpoint: str | None, saved: str
) -> None:
    """Train ``steps`` (from ``checkpoint`` when given), then save what the checkpoint and
    the counts report of the refresh policy."""
    model = parity_model()
    opt = parity_optimizer(model)
    if checkpoint is not None:
        state = torch.load(Path(out) / checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    _train(model, opt, steps, rank, world_size)
    refresh, counts = opt.state_dict()["refresh"], opt.refresh_counts()
    if rank == 0:
        torch.save({"refresh": refresh, "counts": counts}, Path(out) / saved)


def test_a_checkpoint_after_a_resume_takes_each_layers_refresh_state_from_its_owner(
    tmp_path: Path,
) -> None:
    """After a resume every rank holds every layer's refresh state, but only the layer's
    owner keeps it up to date: a later checkpoint and the counts must read the owner's."""
    out = str(tmp_path)
    run_workers(_first_run, 2, out)
    run_workers(_refresh_state_worker, 2, out, range(3, 12), "ckpt.pt", "resumed.pt")
    run_workers(_refresh_state_worker, 2, out, range(12), None, "straight.pt")
    resumed, straight = (torch.load(tmp_path / name) for name in ("resumed.pt", "straight.pt"))
    assert straight["counts"]["total"]["stats_skipped"] > 0  # decisions after the resume
    assert resumed["counts"] == straight["counts"]
    for name in ("interval", "next_step", "pooled"):
        assert resumed["refresh"][name] == straight["refresh"][name], name
    noise = straight["refresh"]["noise"]
    assert resumed["refresh"]["noise"] == pytest.approx(noise, rel=1e-5)


def _nan_on_one_rank(rank: int, world_size: int, out: str) -> None:
    model = parity_model()
    opt = parity_optimizer(model)
    for step in range(3):
        x, y = global_batch(step, world_size)
        part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        if rank == 1 and step == 1:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()
    torch.save(
        {
            "params": [p.detach() for p in model.parameters()],
            "skipped": opt.skipped_steps,
            "step": opt.steps_taken,
        },
        Path(out) / f"rank{rank}.pt",
    )


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path: Path) -> None:
    run_workers(_nan_on_one_rank, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["skipped"] for r in results] == [1, 1]
    assert [r["step"] for r in results] == [2, 2]
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _uninterrupted(rank: int, world_size: int, out: str) -> None:
    model = parity_model()
    opt = parity_optimizer(model)
    _train(model, opt, range(RESUMED_STEPS.stop), rank, world_size)
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], Path(out) / "straight.pt")


def test_an_optimizer_state_dict_resumes_two_restarted_ranks(tmp_path: Path) -> None:
    """Checkpoint after 3 steps, restart the processes, 6 more steps: equals 9 in one go."""
    run_workers(_uninterrupted, 2, str(tmp_path))
    run_workers(_first_run, 2, str(tmp_path))
    run_workers(_resumed_run, 2, str(tmp_path))
    straight = torch.load(tmp_path / "straight.pt")
    resumed = torch.load(tmp_path / "final.pt")
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
