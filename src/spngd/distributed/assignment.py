"""Placement of curvature blocks on ranks (model parallelism of the curvature work).

Every Fisher block has one owner rank that inverts it and preconditions its gradient. The
placement must be identical on every rank, so it is a pure function of the blocks' costs and
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

__all__ = ["STRATEGIES", "BlockCost", "assign_blocks", "rank_loads"]

STRATEGIES = ("lpt", "equal_count")


@dataclass(frozen=True)
class BlockCost:
    """One Fisher block to place: its name and estimated cost
    (:attr:`~spngd.curvature.CurvatureBlock.inversion_cost`, which each block kind declares)."""

    name: str
    cost: int

    def __post_init__(self) -> None:
        if isinstance(self.cost, bool) or not isinstance(self.cost, int) or self.cost < 0:
            raise ValueError(f"{self.name}: cost must be an integer >= 0, got {self.cost!r}")


def assign_blocks(shapes: Sequence[BlockCost], world_size: int, strategy: str = "lpt") -> list[int]:
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


def rank_loads(shapes: Sequence[BlockCost], owners: Sequence[int], world_size: int) -> list[float]:
    """Total estimated cost per rank of an assignment."""
    if len(owners) != len(shapes):
        raise ValueError(f"{len(owners)} owners for {len(shapes)} blocks")
    loads = [0.0] * world_size
    for shape, owner in zip(shapes, owners, strict=True):
        if not 0 <= owner < world_size:
            raise ValueError(f"{shape.name}: owner {owner} outside ranks 0..{world_size - 1}")
        loads[owner] += shape.cost
    return loads


def _longest_processing_time(shapes: Sequence[BlockCost], world_size: int) -> list[int]:
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
