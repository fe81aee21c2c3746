"""The files of one run: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``plot.png``.

All writes of a run go through :class:`RunFolder`, so a distributed run can give the ranks
other than 0 a folder that writes nothing. Checkpoints are replaced atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from spngd.train.errors import UserError
from spngd.train.plots import plot_runs

CONFIG, METRICS, CHECKPOINT, PLOT = "config.json", "metrics.jsonl", "checkpoint.pt", "plot.png"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync'd, then renamed.

    A crash or error at any point leaves either the old file or the new one, never a torn
    one; the temporary file is removed on error.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class RunFolder:
    """Creates the run folder (refusing one that holds a run) and writes its files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as error:
            raise UserError(
                f"output folder {self.path} is not writable ({error.strerror or error})"
            ) from None
        if (self.path / METRICS).exists():
            raise UserError(f"output folder {self.path} already holds a run; choose another --out")
        self._metrics = open(self.path / METRICS, "w", buffering=1)

    def close(self) -> None:
        self._metrics.close()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def write_config(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(dict(config), indent=2) + "\n"
        atomic_write(self.path / CONFIG, lambda file: file.write(text.encode()))

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (flushed, so it can be followed live)."""
        self._metrics.write(json.dumps(dict(record)) + "\n")

    def save_checkpoint(self, payload: Mapping[str, Any]) -> None:
        """Replace ``checkpoint.pt`` atomically; on failure the previous one stays."""
        path = self.path / CHECKPOINT
        try:
            atomic_write(path, lambda file: torch.save(dict(payload), file))
        except OSError as error:
            raise UserError(
                f"cannot write checkpoint {path} ({error.strerror or error}); "
                "the previous checkpoint is kept"
            ) from None

    def plot(self, records: Sequence[Mapping[str, Any]], title: str) -> None:
        plot_runs({"": records}, self.path / PLOT, title)


class SilentRunFolder:
    """What ranks other than 0 of a distributed run write: nothing (rank 0 writes the run)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __enter__(self) -> SilentRunFolder:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def write_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log(self, record: Mapping[str, Any]) -> None:
        pass

    def save_checkpoint(self, payload: Mapping[str, Any]) -> None:
        pass

    def plot(self, records: Sequence[Mapping[str, Any]], title: str) -> None:
        pass
