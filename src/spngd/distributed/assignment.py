"""Placement of curvature blocks on ranks (model parallelism of the curvature work).

Every Fisher block has one owner rank that inverts it and preconditions its gradient. The
placement must be identical on every rank, so it is a pure function of the block shapes and
the world size; re-balancing after a change of world size is calling it again.

Two strategies:

* ``"lpt"`` (this project's choice): greedy longest-processing-time on an estimated
  inversion + preconditioning cost; the largest block goes first to the least-loaded rank.
* ``"equal_count"``: contiguous equal-count chunks, ``np.array_split(range(L), P)``, the
  rule of the authors' chainerkfac, kept for parity with the reference.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from spngd.curvature import BatchNormBlock, CurvatureBlock, KroneckerBlock

__all__ = ["STRATEGIES", "BlockShape", "assign_blocks", "rank_loads"]

STRATEGIES = ("lpt", "equal_count")

# Cost of one unit-wise (2x2 per channel) BatchNorm block per channel: closed-form 2x2
# inverses and a few multiply-adds, negligible next to any Cholesky.
_UNIT_WISE_COST_PER_CHANNEL = 10


@dataclass(frozen=True)
class BlockShape:
    """Dimensions of one Fisher block, enough to estimate its cost.

    Kronecker (conv/FC): ``groups`` independent pairs of ``a_dim x a_dim`` and
    ``g_dim x g_dim`` factors. Unit-wise (BatchNorm): ``a_dim`` channels with a 2x2 Fisher
    each (``g_dim = 2``).
    """

    name: str
    kind: Literal["kronecker", "unit_wise"]
    a_dim: int
    g_dim: int
    groups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("kronecker", "unit_wise"):
            raise ValueError(
                f"{self.name}: kind must be 'kronecker' or 'unit_wise', got {self.kind!r}"
            )
        if self.a_dim < 1 or self.g_dim < 1 or self.groups < 1:
            raise ValueError(f"{self.name}: a_dim, g_dim and groups must be >= 1")

    @property
    def cost(self) -> int:
        """Estimated flops of inverting the block and preconditioning its gradient.

        Kronecker: ``d_A^3 + d_G^3`` for the two inverses plus ``d_G d_A (d_A + d_G)`` for
        ``G^-1 grad A^-1``, per group. Unit-wise: linear in the number of channels.
        """
        if self.kind == "unit_wise":
            return _UNIT_WISE_COST_PER_CHANNEL * self.a_dim
        a, g = self.a_dim, self.g_dim
        return self.groups * (a**3 + g**3 + g * a * (a + g))

    @classmethod
    def from_block(cls, block: CurvatureBlock) -> BlockShape:
        """Shape of an SPNGD curvature block."""
        if isinstance(block, KroneckerBlock):
            return cls(block.name, "kronecker", block.a_dim, block.g_dim, block.groups)
        if isinstance(block, BatchNormBlock):
            return cls(block.name, "unit_wise", block.channels, 2)
        raise TypeError(f"no cost model for {type(block).__name__}")


def assign_blocks(
    shapes: Sequence[BlockShape], world_size: int, strategy: str = "lpt"
) -> list[int]:
    """Owner rank of each block, in the order of ``shapes``; deterministic on every rank.

    With more ranks than blocks some ranks own nothing (they still join the collectives).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if strategy == "lpt":
        return _longest_processing_time(shapes, world_size)
    if strategy == "equal_count":
        return _equal_count(len(shapes), world_size)
    raise ValueError(f"unknown assignment strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")


def rank_loads(shapes: Sequence[BlockShape], owners: Sequence[int], world_size: int) -> list[float]:
    """Total estimated cost per rank of an assignment."""
    if len(owners) != len(shapes):
        raise ValueError(f"{len(owners)} owners for {len(shapes)} blocks")
    loads = [0.0] * world_size
    for shape, owner in zip(shapes, owners, strict=True):
        if not 0 <= owner < world_size:
            raise ValueError(f"{shape.name}: owner {owner} outside ranks 0..{world_size - 1}")
        loads[owner] += shape.cost
    return loads


def _longest_processing_time(shapes: Sequence[BlockShape], world_size: int) -> list[int]:
    """Greedy LPT: costliest block first (ties: lower index), to the least-loaded rank
    (ties: lower rank). Integer loads keep the tie-breaks exact."""
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i].cost, i))
    heap = [(0, rank) for rank in range(world_size)]
    owners = [0] * len(shapes)
    for i in order:
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + shapes[i].cost, rank))
    return owners


def _equal_count(num_blocks: int, world_size: int) -> list[int]:
    """Contiguous chunks as ``np.array_split``: the first ``L % P`` ranks get one extra."""
    size, extra = divmod(num_blocks, world_size)
    boundary = extra * (size + 1)  # blocks before it sit in the longer chunks
    return [
        i // (size + 1) if i < boundary else extra + (i - boundary) // size
        for i in range(num_blocks)
    ]
