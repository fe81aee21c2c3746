"""Shared helpers for the training-application tests: tiny image trees and CLI runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spngd.train.cli import main

CliRun = Callable[..., tuple[int, str, str]]


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
