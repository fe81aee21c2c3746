"""SIGKILL at random moments while checkpoints are saved: every time, the
resume logic finds the newest completed checkpoint, intact, and temporary files do not pile up."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import random
import signal
import time
import warnings
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import torch

from spngd.train.config import resolve_config
from spngd.train.runfolder import (
    TEMPORARY,
    Checkpoint,
    RunFolder,
    SilentRunFolder,
    find_checkpoint,
)
from spngd.train.trainer import Trainer

TRIALS = 40


@pytest.fixture
def payload(tmp_path: Path, small_digits: None) -> dict[str, Any]:
    """A real checkpoint: CIFAR ResNet-20 with SP-NGD's curvature after one step (~21 MB)."""
    config = resolve_config(
        {"batch_size": 32, "device": "cpu", "threads": 1, "out": str(tmp_path / "unused")}
    )
    trainer = Trainer(config, SilentRunFolder(config.out))
    start = time.perf_counter()
    trainer.fit_step([next(iter(trainer.train_loader))], start, start, ends_pass=False)
    return trainer.checkpoint()


def _save_until_killed(
    run: RunFolder, payload: dict[str, Any], first: int, done: Connection
) -> None:
    """The child: save checkpoints of increasing steps, reporting each that completed."""
    for step in itertools.count(first):
        run.save_checkpoint({**payload, "step": step})
        done.send(step)


def _leftovers(folder: Path) -> list[Path]:
    return list(folder.glob(f".*{TEMPORARY}"))


def test_sigkill_while_saving_always_leaves_a_checkpoint_to_resume_from(
    tmp_path: Path, payload: dict[str, Any]
) -> None:
    folder = tmp_path / "run"
    with RunFolder(folder) as run:
        run.save_checkpoint({**payload, "step": 0})
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    completed, torn_windows = 0, 0
    for _ in range(TRIALS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpoint = find_checkpoint(folder)
            assert len(_leftovers(folder)) <= 1  # at most the one the kill interrupted
            run = RunFolder(folder, checkpoint)  # as --resume opens it: removes the leftover
        assert not _leftovers(folder)
        _check(checkpoint, payload, completed)
        # killed between the two renames: checkpoint.pt briefly absent, the previous one used
        window = (
            "checkpoint.pt is missing (the run was killed while saving?); resuming from "
            f"checkpoint.prev.pt at step {checkpoint.step}"
        )
        assert all(window in str(warning.message) for warning in caught)
        torn_windows += bool(caught)
        receive, send = fork.Pipe(duplex=False)
        child = fork.Process(
            target=_save_until_killed, args=(run, payload, checkpoint.step + 1, send)
        )
        child.start()
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        run.close()
        assert child.exitcode == -signal.SIGKILL
        send.close()
        completed = checkpoint.step
        with contextlib.suppress(EOFError):  # the pipe ends where the child died
            while True:
                completed = receive.recv()
    _check(find_checkpoint(folder), payload, completed)
    assert not list(folder.glob("*.bad"))
    print(f"{TRIALS} SIGKILLs; last step {completed}; {torn_windows} between the two renames")


def _check(checkpoint: Checkpoint, payload: dict[str, Any], completed: int) -> None:
    """The newest completed save (or the one after it, if the kill came after its renames
    but before the child reported it) with the model as saved."""
    assert checkpoint.step in (completed, completed + 1)
    assert all(reason == "missing" for _, reason in checkpoint.rejected), checkpoint.rejected
    for name, tensor in payload["model"].items():
        assert torch.equal(checkpoint.payload["model"][name], tensor), name
