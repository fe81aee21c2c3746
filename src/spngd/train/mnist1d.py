"""MNIST-1D (Greydanus 2020): ten 1-D digit templates, padded, scaled, sheared, shifted and
noised into length-40 sequences, generated offline by the ``mnist1d`` package.

``--data mnist1d`` is :data:`DEFAULT_SIZE` examples, ``--data mnist1d:N`` is ``N``; one in
:data:`VAL_SHARE` is held out for validation (10,000 of the default 80,000, so that
batches up to 16,384 fit the training set several times). The examples come from the
package's ``make_dataset`` (never its download path) with a fixed generation seed, and are
cached as ``mnist1d-N.npz`` under :func:`cache_folder` after the first generation (80,000
take about 12 s).
"""

from __future__ import annotations

import os
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from spngd.messages import first_sentence
from spngd.train.errors import UserError
from spngd.train.runfolder import atomic_write

NAME = "mnist1d"
DEFAULT_SIZE = 80_000
VAL_SHARE = 8
"""One example in this many is held out for validation."""
MIN_SIZE = 10 * VAL_SHARE
"""The smallest size with a validation example of every class."""
GENERATION_SEED = 42
"""The package's own default: the data set is the same for every run."""
LENGTH = 40
CLASSES = 10

Split = tuple[torch.Tensor, torch.Tensor]


def is_named(spec: str) -> bool:
    """Whether ``--data spec`` names this data set (whatever its size)."""
    return spec.partition(":")[0] == NAME


def size_of(spec: str) -> int | None:
    """The number of examples ``spec`` asks for (``mnist1d`` or ``mnist1d:N``), or None
    when it names another data set; a UserError for a bad ``N``."""
    if not is_named(spec):
        return None
    _, colon, count = spec.partition(":")
    if not colon:
        return DEFAULT_SIZE
    if not count.isdigit() or int(count) < MIN_SIZE:
        raise UserError(f"--data {spec}: the size must be a whole number of at least {MIN_SIZE}")
    return int(count)


def cache_folder() -> Path:
    """``$SPNGD_CACHE``, else ``$XDG_CACHE_HOME/spngd``, else ``~/.cache/spngd``."""
    if folder := os.environ.get("SPNGD_CACHE"):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spngd"


def load(size: int) -> tuple[Split, Split]:
    """Training and validation ``(sequences (n, 1, 40) float32, labels (n,) int64)`` of the
    ``size``-example set, from the cache or generated (and then cached)."""
    path = cache_folder() / f"{NAME}-{size}.npz"
    arrays = _read(path) if path.is_file() else None
    if arrays is None:
        arrays = generate(size)
        _write(path, arrays)
    x, y = (torch.from_numpy(a) for a in arrays)
    held_out = size // VAL_SHARE
    x = x.unsqueeze(1)
    return (x[held_out:], y[held_out:]), (x[:held_out], y[:held_out])


def generate(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` shuffled examples (float32 ``(size, 40)``, int64 ``(size,)``) from
    ``mnist1d.data.make_dataset``, leaving the caller's ``random`` and NumPy states as
    they were (the package seeds both globally)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise UserError(
            f"--data mnist1d needs the mnist1d package ({first_sentence(error)}); "
            "pip install mnist1d"
        ) from None
    args = get_dataset_args()
    args.num_samples = size
    args.train_split = 1.0  # split here, so that every size splits alike
    args.seed = GENERATION_SEED
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None (with a warning) when the file is damaged."""
    try:
        with np.load(path) as archive:
            x, y = archive["x"], archive["y"]
        if x.ndim == 2 and x.shape[1] == LENGTH and y.shape == (x.shape[0],):
            return x, y
        reason = f"arrays of shapes {x.shape} and {y.shape}"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        reason = first_sentence(error)
    warnings.warn(
        f"generating {path.name} again: the cached copy is unusable ({reason})", stacklevel=3
    )
    return None


def _write(path: Path, arrays: tuple[np.ndarray, np.ndarray]) -> None:
    """Cache the arrays (atomically); a folder that cannot be written costs only a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: np.savez(file, x=arrays[0], y=arrays[1]))
    except OSError as error:
        warnings.warn(
            f"mnist1d is not cached ({first_sentence(error)}); set SPNGD_CACHE to a writable "
            "folder to skip generating it each run",
            stacklevel=3,
        )
