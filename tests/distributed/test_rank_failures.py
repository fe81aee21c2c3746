"""``spngd train`` when another rank dies or stalls: each survivor ends with one line and a
non-zero status, within the process group's timeout (real processes)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from spngd.train.cli import main
from spngd.train.trainer import Trainer
from tests.distributed.harness import start_workers
from tests.train.conftest import SMALL, small_digits_runs


def _failing_rank(rank: int, world_size: int, out: str, how: str) -> None:
    """Rank 1 dies (``os._exit``) or stalls (SIGSTOP) right after step 2; rank 0 runs on
    into the next step's collectives and records its status, time and stderr."""
    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun sets; the group exists
    with pytest.MonkeyPatch.context() as patch, small_digits_runs(patch):
        if rank == 1:
            fit_step = Trainer.fit_step

            def failing(self: Trainer, *args: Any) -> Any:
                result = fit_step(self, *args)
                if self.step == 2:
                    if how == "dies":
                        os._exit(9)
                    os.kill(os.getpid(), signal.SIGSTOP)
                return result

            patch.setattr(Trainer, "fit_step", failing)
        stderr = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stderr(stderr):
            code = main(["train", "--out", f"{out}/run{rank}", "--epochs", "4", *SMALL])
        seconds = time.monotonic() - start
        Path(out, f"rank{rank}.txt").write_text(f"{code}\n{seconds:.1f}\n{stderr.getvalue()}")
    os._exit(0)  # the group cannot be torn down with a peer gone


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_failed_rank_ends_the_survivor_with_one_line(tmp_path: Path, how: str) -> None:
    context = start_workers(_failing_rank, 2, str(tmp_path), how, timeout_s=8.0)
    try:
        context.processes[0].join(timeout=90)
        assert not context.processes[0].is_alive(), "the surviving rank hung"
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
    code, seconds, stderr = (tmp_path / "rank0.txt").read_text().split("\n", 2)
    lines = stderr.strip().splitlines()
    assert code == "3" and len(lines) == 1, stderr
    assert lines[0].startswith("spngd: error: ") and "Traceback" not in stderr
    assert "with the other ranks failed; a rank has probably died or stalled" in lines[0]
    assert float(seconds) < 60
