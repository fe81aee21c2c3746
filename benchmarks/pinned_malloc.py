"""glibc's malloc thresholds pinned at 1 GiB for the timing scripts: with the defaults, the
trim and mmap thresholds move as the process runs and step times drift with them."""

from __future__ import annotations

import os
import sys

PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def pin_malloc() -> None:
    """Re-execute the running script with the thresholds pinned, unless they are."""
    if any(os.environ.get(key) != value for key, value in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_MALLOC})
