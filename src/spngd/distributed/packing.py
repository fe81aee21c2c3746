"""Flat communication buffers for the curvature collectives.

Symmetric factors (``A``, ``G``, a BatchNorm Fisher) travel as their upper triangle
including the diagonal, ``d(d+1)/2`` of ``d^2`` entries, and all tensors of one collective
share one flat buffer in the communication dtype (float32, bfloat16 or float16), which is
independent of the dtype the factors are kept in. Packing is linear, so a sum-reduction of
packed buffers unpacks to the sum of the tensors.

Build one :class:`FlatPacker` per bucket (for instance the blocks one rank owns); its
:meth:`FlatPacker.segment` gives each tensor's place so that a caller can reduce parts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["COMM_DTYPES", "FlatPacker", "TensorSpec", "packed_numel", "triu_pack", "triu_unpack"]

COMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triu_indices(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the upper triangle of a ``d x d`` matrix (cached)."""
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows, cols


def triu_pack(matrices: torch.Tensor) -> torch.Tensor:
    """``(..., d, d)`` -> ``(..., d(d+1)/2)``: the upper triangle, diagonal included, row by
    row. Only the upper triangle is read; the matrices are assumed symmetric."""
    if matrices.ndim < 2 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"expected (..., d, d) matrices, got shape {tuple(matrices.shape)}")
    rows, cols = triu_indices(matrices.shape[-1], matrices.device)
    return matrices[..., rows, cols]


def triu_unpack(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of :func:`triu_pack`: ``(..., d(d+1)/2)`` -> symmetric ``(..., d, d)``."""
    if packed.ndim < 1 or packed.shape[-1] != d * (d + 1) // 2:
        raise ValueError(
            f"expected (..., {d * (d + 1) // 2}) packed triangles for d={d}, "
            f"got shape {tuple(packed.shape)}"
        )
    rows, cols = triu_indices(d, packed.device)
    out = packed.new_empty(*packed.shape[:-1], d, d)
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


def packed_numel(shape: Sequence[int], symmetric: bool) -> int:
    """Number of buffer entries a tensor of ``shape`` takes (triangle if ``symmetric``)."""
    shape = tuple(shape)
    if not symmetric:
        return math.prod(shape)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"a symmetric tensor needs shape (..., d, d), got {shape}")
    d = shape[-1]
    return math.prod(shape[:-2]) * d * (d + 1) // 2


@dataclass(frozen=True)
class TensorSpec:
    """Shape of one tensor in a buffer, and whether it is symmetric in its last two dims."""

    shape: tuple[int, ...]
    symmetric: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        packed_numel(self.shape, self.symmetric)  # validates symmetric shapes

    @property
    def numel(self) -> int:
        return packed_numel(self.shape, self.symmetric)


class FlatPacker:
    """Layout of a list of tensors in one flat communication buffer.

    Tensors are laid out in order, each as its flattened values or, if symmetric, as its
    flattened upper triangles. The layout depends only on the specs, so packers built from
    the same specs agree on every rank.
    """

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = tuple(specs)
        self._offsets: list[int] = []
        offset = 0
        for spec in self.specs:
            self._offsets.append(offset)
            offset += spec.numel
        self.numel = offset

    def __len__(self) -> int:
        return len(self.specs)

    def segment(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of tensor ``i`` in the flat buffer."""
        return self._offsets[i], self.specs[i].numel

    def pack(
        self,
        tensors: Sequence[torch.Tensor],
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cast ``tensors`` to the communication ``dtype`` into one flat buffer.

        ``out``: a 1-D tensor of ``numel`` entries and that dtype to write into, e.g. this
        rank's part of a padded all-gather buffer; a new buffer otherwise. Values
        outside the range of a 16-bit ``dtype`` become infinite.
        """
        if dtype not in COMM_DTYPES:
            raise ValueError(f"communication dtype must be one of {COMM_DTYPES}, got {dtype}")
        if len(tensors) != len(self.specs):
            raise ValueError(f"{len(tensors)} tensors for a packer of {len(self.specs)}")
        if out is None:
            device = tensors[0].device if tensors else None
            out = torch.empty(self.numel, dtype=dtype, device=device)
        elif out.shape != (self.numel,) or out.dtype != dtype:
            raise ValueError(
                f"out must be a 1-D {dtype} tensor of {self.numel} entries, "
                f"got {out.dtype} of shape {tuple(out.shape)}"
            )
        for i, (spec, tensor) in enumerate(zip(self.specs, tensors, strict=True)):
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(f"tensor {i}: shape {tuple(tensor.shape)} != spec {spec.shape}")
            values = triu_pack(tensor) if spec.symmetric else tensor
            offset, length = self.segment(i)
            out[offset : offset + length].copy_(values.reshape(-1))
        return out

    def unpack(self, flat: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """New tensors of the original shapes in ``dtype`` (the factor dtype) from a buffer;
        symmetric ones are re-symmetrised. The results never alias ``flat``."""
        if flat.shape != (self.numel,):
            raise ValueError(
                f"expected a flat buffer of {self.numel} entries, got {tuple(flat.shape)}"
            )
        tensors = []
        for i, spec in enumerate(self.specs):
            offset, length = self.segment(i)
            values = flat[offset : offset + length]
            if spec.symmetric:
                d = spec.shape[-1]
                triangles = values.reshape(*spec.shape[:-2], d * (d + 1) // 2)
                tensors.append(triu_unpack(triangles.to(dtype), d))
            else:
                tensors.append(values.reshape(spec.shape).to(dtype, copy=True))
        return tensors
