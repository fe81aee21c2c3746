"""Shared helpers for the training-application tests: tiny image trees, CLI runs, small
digits runs and the one-line error check."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from spngd.train import trainer
from spngd.train.cli import main
from spngd.train.config import TrainConfig
from spngd.train.data import DataBundle

CliRun = Callable[..., tuple[int, str, str]]

QUIET = ("--no-progress", "--device", "cpu")
"""CLI options of every test run: no progress bar, on the CPU."""
TINY = ("--epochs", "0.05", "--batch-size", "32", *QUIET)
"""CLI options for two steps of 32 on the digits."""


def write_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 12) -> Path:
    """``root/train/cK/*.png`` and ``root/val/cK/*.png`` with random RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> CliRun:
    """Call ``spngd`` in-process; returns (exit status, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


SMALL = ("--batch-size", "32", *QUIET, "--threads", "1")
"""Options of the small digits runs: one thread (2 cores are shared), no progress bar."""


@contextlib.contextmanager
def small_digits_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Trainers read the first 64 training and 64 validation digits: at batch 32 a pass is 2
    steps, so runs of a few passes take seconds. Restores torch's thread count afterwards."""
    load_data = trainer.load_data

    def small(config: TrainConfig) -> DataBundle:
        data = load_data(config)
        return dataclasses.replace(
            data,
            train=Subset(data.train, range(64)),
            val=Subset(data.val, range(64)),
            train_as_val=Subset(data.train_as_val, range(64)),
        )

    monkeypatch.setattr(trainer, "load_data", small)
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def small_digits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """:func:`small_digits_runs` for one test."""
    with small_digits_runs(monkeypatch):
        yield


def assert_one_line_error(result: tuple[int, str, str], *needles: str, code: int = 2) -> str:
    """``spngd`` exited with ``code`` after one ``spngd: error:`` line (after any one-line
    warnings) holding every needle, without a traceback; returns that line."""
    status, _, stderr = result
    assert status == code, stderr
    lines = stderr.strip().splitlines()
    assert all(line.startswith("spngd: warning: ") for line in lines[:-1]), stderr
    assert lines[-1].startswith("spngd: error: ") and "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]
