"""Communication stages of hybrid data/model parallel SP-NGD (spec section 8).

Per step: (1) every rank's statistics (only those refreshed this step), and its gradients
when the model is not wrapped in DistributedDataParallel, are summed onto each block's
owner rank — one bucketed ``reduce`` per owner, all in flight at once (reduce-scatter
style); (2) owners invert and precondition their blocks (in the optimizer); (3) every
owner's preconditioned gradients, with the refresh decisions for the next step, are
all-gathered. Symmetric factors travel as packed upper triangles in ``comm_dtype``.

:class:`LocalExchange` is the single-process case: rank 0 owns everything and nothing
moves, so the optimizer runs one code path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from spngd.curvature import BatchNormBlock, CurvatureBlock
from spngd.distributed.assignment import STRATEGIES, BlockShape, assign_blocks
from spngd.distributed.packing import COMM_DTYPES, FlatPacker, TensorSpec

Statistics = tuple[torch.Tensor | None, ...] | None


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How SPNGD distributes curvature work over ``torch.distributed`` ranks.

    comm_dtype: dtype of every buffer sent (statistics and preconditioned gradients);
        the factors themselves stay in their own dtype. float16 needs statistics within
        its range (about 6.5e4); bfloat16 has float32's range.
    assignment: ``"lpt"`` (greedy by inversion + preconditioning cost) or
        ``"equal_count"`` (contiguous chunks, as the authors' code).
    process_group: the group to use (default: the world).
    """

    comm_dtype: torch.dtype = torch.float32
    assignment: str = "lpt"
    process_group: Any = None

    def __post_init__(self) -> None:
        if self.comm_dtype not in COMM_DTYPES:
            raise ValueError(f"comm_dtype must be one of {COMM_DTYPES}, got {self.comm_dtype}")
        if self.assignment not in STRATEGIES:
            raise ValueError(f"assignment must be one of {STRATEGIES}, got {self.assignment!r}")


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over steps (reset with :meth:`clear`)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def clear(self) -> None:
        self.seconds.clear()


class LocalExchange:
    """One process: this rank owns every block and no data moves."""

    rank = 0
    world_size = 1

    def __init__(self, blocks: dict[str, CurvatureBlock]) -> None:
        self.owner = dict.fromkeys(blocks, 0)

    def owns(self, name: str) -> bool:
        return True

    def reduce(
        self, fresh: dict[str, Statistics], grads: dict[torch.Tensor, torch.Tensor]
    ) -> tuple[dict[str, Statistics], dict[torch.Tensor, torch.Tensor]]:
        return fresh, grads

    def gather(
        self, directions: dict[torch.Tensor, torch.Tensor], plans: dict[str, list[bool]]
    ) -> tuple[dict[torch.Tensor, torch.Tensor], dict[str, list[bool]]]:
        return directions, plans

    def collect(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        return [local]


class DistributedExchange:
    """The collectives of one SPNGD optimizer on a process group."""

    def __init__(
        self,
        blocks: dict[str, CurvatureBlock],
        plain_params: Sequence[torch.Tensor],
        config: DistributedConfig,
        average_gradients: bool,
    ) -> None:
        self.blocks = blocks
        self.plain_params = list(plain_params)
        self.config = config
        self.group = config.process_group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.average_gradients = average_gradients
        params = [p for block in blocks.values() for p in block.params] + self.plain_params
        self.device = params[0].device if params else torch.device("cpu")
        # Received buffers are unpacked in the factor dtype (at least float32).
        self.factor_dtype = torch.promote_types(
            params[0].dtype if params else torch.float32, torch.float32
        )
        shapes = [BlockShape.from_block(block) for block in blocks.values()]
        owners = assign_blocks(shapes, self.world_size, config.assignment)
        self.owner = dict(zip(blocks, owners, strict=True))
        self.owned_by = [[n for n in blocks if self.owner[n] == r] for r in range(self.world_size)]

    def owns(self, name: str) -> bool:
        return self.owner[name] == self.rank

    # -- stage 1: statistics (and gradients) to the owners ----------------------------------
    def _reduce_specs(self, name: str) -> list[TensorSpec]:
        """Bucket entries of one block: contributor count, wanted statistics, gradients."""
        block = self.blocks[name]
        specs = [TensorSpec((1,))]
        for i, wanted in enumerate(block.wanted):
            if wanted:
                specs.append(statistic_spec(block, i))
        if self.average_gradients:
            specs.extend(TensorSpec(tuple(p.shape)) for p in block.params)
        return specs

    def reduce(
        self, fresh: dict[str, Statistics], grads: dict[torch.Tensor, torch.Tensor]
    ) -> tuple[dict[str, Statistics], dict[torch.Tensor, torch.Tensor]]:
        """Owners receive the mean over ranks of their blocks' statistics (and gradients);
        gradients of parameters outside any block are all-reduced when averaging."""
        dtype = self.config.comm_dtype
        buckets, packers, works = [], [], []
        for rank, names in enumerate(self.owned_by):
            specs, tensors = [], []
            for name in names:
                block_specs = self._reduce_specs(name)
                specs.extend(block_specs)
                tensors.extend(self._reduce_entries(name, fresh.get(name), grads, block_specs))
            packer = FlatPacker(specs)
            bucket = (
                packer.pack(tensors, dtype)
                if specs
                else torch.zeros(0, dtype=dtype, device=self.device)
            )
            packers.append(packer)
            buckets.append(bucket)
            if specs:
                works.append(dist.reduce(bucket, dst=rank, group=self.group, async_op=True))
        plain = [p for p in self.plain_params if p in grads] if self.average_gradients else []
        plain_flat = None
        if plain:
            plain_flat = torch.cat([grads[p].reshape(-1).to(dtype) for p in plain])
            works.append(dist.all_reduce(plain_flat, group=self.group, async_op=True))
        wait_all(works, "reducing statistics and gradients")

        averaged = dict(grads)
        if plain_flat is not None:
            offset = 0
            for p in plain:
                averaged[p] = (
                    plain_flat[offset : offset + p.numel()].view_as(p) / self.world_size
                ).to(p.dtype)
                offset += p.numel()
        owned: dict[str, Statistics] = {}
        entries = []
        if buckets[self.rank].numel():
            entries = packers[self.rank].unpack(buckets[self.rank], self.factor_dtype)
        position = 0
        for name in self.owned_by[self.rank]:
            block = self.blocks[name]
            count = round(entries[position].item())
            position += 1
            stats: list[torch.Tensor | None] = []
            for wanted in block.wanted:
                if wanted:
                    stats.append(entries[position] / count if count else None)
                    position += 1
                else:
                    stats.append(None)
            owned[name] = tuple(stats) if count else None
            if self.average_gradients:
                for p in block.params:
                    averaged[p] = (entries[position] / self.world_size).to(p.dtype)
                    position += 1
        return owned, averaged

    def _reduce_entries(
        self,
        name: str,
        fresh: Statistics,
        grads: dict[torch.Tensor, torch.Tensor],
        specs: list[TensorSpec],
    ) -> list[torch.Tensor]:
        block = self.blocks[name]
        device = block.params[0].device
        entries = [torch.full((1,), float(fresh is not None), device=device)]
        position = 1
        for i, wanted in enumerate(block.wanted):
            if wanted:
                stat = fresh[i] if fresh is not None else None
                if stat is None:
                    stat = torch.zeros(specs[position].shape, device=device)
                entries.append(stat)
                position += 1
        if self.average_gradients:
            entries.extend(grads.get(p, torch.zeros_like(p)) for p in block.params)
        return entries

    # -- stage 3: preconditioned gradients and next-step plans to everyone ----------------
    def _gather_specs(self, rank: int) -> list[TensorSpec]:
        specs = []
        for name in self.owned_by[rank]:
            block = self.blocks[name]
            specs.append(TensorSpec((1 + len(block.statistic_names),)))  # valid flag + plan
            specs.extend(TensorSpec(tuple(p.shape)) for p in block.params)
        return specs

    def gather(
        self, directions: dict[torch.Tensor, torch.Tensor], plans: dict[str, list[bool]]
    ) -> tuple[dict[torch.Tensor, torch.Tensor], dict[str, list[bool]]]:
        """Every rank receives every owner's preconditioned gradients and statistic plans."""
        dtype = self.config.comm_dtype
        packers = [FlatPacker(self._gather_specs(r)) for r in range(self.world_size)]
        size = max(packer.numel for packer in packers)
        mine = []
        for name in self.owned_by[self.rank]:
            block = self.blocks[name]
            valid = all(p in directions for p in block.params)
            header = [float(valid), *map(float, plans[name])]
            mine.append(torch.tensor(header, device=block.params[0].device))
            mine.extend(directions[p] if valid else torch.zeros_like(p) for p in block.params)
        send = torch.zeros(size, dtype=dtype, device=self.device)
        if mine:
            packers[self.rank].pack(mine, dtype, out=send[: packers[self.rank].numel])
        received = [
            torch.empty(size, dtype=dtype, device=self.device) for _ in range(self.world_size)
        ]
        wait_all(
            [dist.all_gather(received, send, group=self.group, async_op=True)],
            "gathering preconditioned gradients",
        )
        gathered = dict(directions)
        all_plans = dict(plans)
        for rank, packer in enumerate(packers):
            if rank == self.rank or not packer.numel:
                continue
            entries = iter(packer.unpack(received[rank][: packer.numel], self.factor_dtype))
            for name in self.owned_by[rank]:
                block = self.blocks[name]
                header = next(entries)
                all_plans[name] = [bool(v) for v in header[1:].tolist()]
                for p in block.params:
                    direction = next(entries)
                    if header[0].item():
                        gathered[p] = direction.to(p.dtype)
        return gathered, all_plans

    def collect(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``local`` object (for checkpoints and counters)."""
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, local, group=self.group)
        except RuntimeError as error:
            raise collective_failure("collecting optimizer state", error) from error
        return out


def statistic_spec(block: CurvatureBlock, index: int) -> TensorSpec:
    """Layout of statistic ``index`` of ``block`` (Kronecker factors are symmetric)."""
    if isinstance(block, BatchNormBlock):
        return TensorSpec((block.channels, 3))
    dim = block.a_dim if index == 0 else block.g_dim  # type: ignore[attr-defined]
    return TensorSpec((block.groups, dim, dim), symmetric=True)  # type: ignore[attr-defined]


def wait_all(works: list[Any], what: str) -> None:
    """Wait for async collectives; a failure (dead peer, timeout) becomes a clear error."""
    try:
        for work in works:
            work.wait()
    except RuntimeError as error:
        raise collective_failure(what, error) from error


def collective_failure(what: str, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"SPNGD: {what} with the other ranks failed; a rank has probably died or stalled "
        f"past the process group's timeout ({error})"
    )
