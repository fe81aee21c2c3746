"""Counting reads of tensor values by the host (each one waits for the device)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
"""Tensor methods that hand a value to Python or copy it to the host."""


@contextlib.contextmanager
def counting_host_reads() -> Iterator[list[str]]:
    """Within the block, the names of the read methods called, one entry per call."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name: str) -> Callable[..., object]:
        original = originals[name]

        def method(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            calls.append(name)
            return original(self, *args, **kwargs)

        return method

    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
