"""Communication stages of hybrid data/model parallel SP-NGD.

Per step: (1) every rank's statistics (only those refreshed this step), and its gradients
when the model is not wrapped in DistributedDataParallel, are summed onto each block's
owner rank — one bucketed ``reduce`` per owner, all in flight at once; (2) owners invert
and precondition their blocks (in the preconditioner); (3) every owner's preconditioned
gradients, with the refresh decisions for the next step, are all-gathered, and every rank
(the owner too) applies them as received; (4) with gloo, a barrier ends the step
(:meth:`DistributedExchange.settle`). Symmetric factors travel as packed upper triangles
in ``comm_dtype``.

:class:`LocalExchange` is the single-process case: rank 0 owns everything and nothing
moves, so the optimizer runs one code path.
"""

from __future__ import annotations

import atexit
import functools
import gc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from spngd.amp import inverse_loss_scale
from spngd.curvature import CurvatureBlock
from spngd.distributed.assignment import STRATEGIES, BlockCost, assign_blocks
from spngd.distributed.packing import COMM_DTYPES, FlatPacker, TensorSpec
from spngd.messages import first_sentence
from spngd.settings import Rule, check, int_rule, setting

Statistics = tuple[torch.Tensor | None, ...] | None


COMM_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in COMM_DTYPES}
"""The dtypes of :attr:`DistributedConfig.comm_dtype` by name (``"bfloat16"``)."""


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How SPNGD distributes curvature work over ``torch.distributed`` ranks; a bad value is
    an :class:`~spngd.settings.InvalidSettingError`.

    comm_dtype: dtype of every buffer sent (statistics and preconditioned gradients);
        the factors themselves stay in their own dtype. float16 needs statistics within
        its range (about 6.5e4); bfloat16 has float32's range.
    assignment: ``"lpt"`` (greedy by inversion + preconditioning cost) or
        ``"equal_count"`` (contiguous chunks, as the authors' code).
    process_group: the group to use (default: the world).
    overlap: start each bucket's reduction during backward, as soon as its layers'
        statistics (and gradients, for an unwrapped model) of the last micro-batch are
        in, instead of at ``step()``. Needs every layer called once per micro-batch.
    bucket_elements: layers are grouped, in backward order, into phases of about this
        many communicated elements; each phase sends one buffer per owner rank.
    """

    comm_dtype: torch.dtype = setting(
        torch.float32,
        "dtype of the statistics and preconditioned gradients sent between ranks: "
        + ", ".join(COMM_DTYPE_NAMES),
        names=COMM_DTYPE_NAMES,
    )
    assignment: str = setting("lpt", "which rank owns each layer: lpt or equal_count")
    process_group: Any = None
    overlap: bool = setting(
        True, "reduce each bucket of statistics during backward, as soon as it is complete"
    )
    bucket_elements: int = setting(1 << 22, "elements per communicated bucket")

    def __post_init__(self) -> None:
        knobs = {name: getattr(self, name) for name in _RULES}
        check("DistributedConfig", knobs, _RULES)


_RULES: dict[str, Rule] = {
    "comm_dtype": (lambda v: v in COMM_DTYPES, f"one of {', '.join(COMM_DTYPE_NAMES)}"),
    "assignment": (lambda v: v in STRATEGIES, " or ".join(STRATEGIES)),
    "overlap": (lambda v: isinstance(v, bool), "True or False"),
    "bucket_elements": int_rule(1),
}


class LocalExchange:
    """One process: this rank owns every block and no data moves."""

    def __init__(self, blocks: dict[str, CurvatureBlock]) -> None:
        self.blocks = blocks

    def owns(self, name: str) -> bool:
        return True

    def notify_statistics(self, name: str) -> None:
        """A block recorded statistics (nothing to start in one process)."""

    def reset(self) -> None:
        """Gradients and statistics were cleared (nothing in flight in one process)."""

    def reduce(
        self, grads: dict[torch.Tensor, torch.Tensor]
    ) -> tuple[dict[str, Statistics], dict[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
        """Every block's statistics recorded since the last step (None where none were),
        and the gradients."""
        return {name: block.take_pending() for name, block in self.blocks.items()}, grads, {}

    def gather(
        self,
        plain: dict[torch.Tensor, torch.Tensor],
        preconditioned: dict[torch.Tensor, torch.Tensor],
        to_compute: dict[str, list[bool]],
    ) -> tuple[dict[torch.Tensor, torch.Tensor], dict[str, list[bool]]]:
        """The preconditioned directions and the statistics to compute as they are (nothing
        moves)."""
        return preconditioned, to_compute

    def collect(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        return [local]

    def collect_on_first(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        return [local]

    def settle(self) -> None:
        """Nothing to wait for in one process."""

    def any_rank(self, flag: torch.Tensor) -> Callable[[], torch.Tensor]:
        """``flag`` (0 or 1) as a function to call when it is needed (nothing to agree on)."""
        return lambda: flag


@dataclass
class _Bucket:
    """One owner's share of one phase, and its reduction once launched."""

    owner: int
    names: list[str]
    packer: FlatPacker | None = None
    buffer: torch.Tensor | None = None
    work: Any = None

    def clear(self) -> None:
        self.packer = self.buffer = self.work = None


class DistributedExchange:
    """The collectives of one SPNGD optimizer on a process group."""

    def __init__(
        self,
        blocks: dict[str, CurvatureBlock],
        plain_params: Sequence[torch.Tensor],
        config: DistributedConfig,
        average_gradients: bool,
        micro_batches: int,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.blocks = blocks
        self.grad_scaler = grad_scaler
        self.plain_params = list(plain_params)
        self.config = config
        self.group = config.process_group
        self.backend = dist.get_backend(self.group)
        if self.backend == "gloo":
            collect_garbage_at_exit()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.average_gradients = average_gradients
        params = [p for block in blocks.values() for p in block.params] + self.plain_params
        self.device = params[0].device if params else torch.device("cpu")
        # Received buffers are unpacked in the factor dtype (at least float32).
        self.factor_dtype = torch.promote_types(
            params[0].dtype if params else torch.float32, torch.float32
        )
        costs = [BlockCost(block.name, block.inversion_cost) for block in blocks.values()]
        owners = assign_blocks(costs, self.world_size, config.assignment)
        self.owner = dict(zip(blocks, owners, strict=True))
        self.owned_by = [[n for n in blocks if self.owner[n] == r] for r in range(self.world_size)]
        self.micro_batches = micro_batches
        self.buckets = self._make_buckets()
        self._next = 0
        self._pairs: Counter[str] = Counter()
        self._grads_in: Counter[torch.Tensor] = Counter()
        self._launched: dict[str, bool] = {}
        if average_gradients and config.overlap:
            for block in blocks.values():
                for p in block.params:
                    p.register_post_accumulate_grad_hook(self._notify_grad)

    @property
    def buckets_launched(self) -> int:
        """How many of :attr:`buckets` this step's reduction has started (with overlap,
        backward starts each one as soon as its blocks and gradients are in)."""
        return self._next

    def owns(self, name: str) -> bool:
        return self.owner[name] == self.rank

    # -- stage 1: statistics (and gradients) to the owners ----------------------------------
    def _make_buckets(self) -> list[_Bucket]:
        """Phases of layers in backward order (reverse registration), one bucket per owner
        within a phase; buckets are launched in this order on every rank."""
        buckets: list[_Bucket] = []
        phase: list[str] = []
        size = 0
        for name in reversed(list(self.blocks)):
            block = self.blocks[name]
            phase.append(name)
            size += sum(statistic_spec(block, i).numel for i in range(len(block.to_compute)))
            if size >= self.config.bucket_elements:
                buckets.extend(self._phase_buckets(phase))
                phase, size = [], 0
        return buckets + self._phase_buckets(phase)

    def _phase_buckets(self, phase: list[str]) -> list[_Bucket]:
        return [
            _Bucket(rank, [n for n in phase if self.owner[n] == rank])
            for rank in range(self.world_size)
            if any(self.owner[n] == rank for n in phase)
        ]

    def reset(self) -> None:
        """Forget this step's progress (called by ``zero_grad``); waits out any bucket
        already in flight, whose data is then stale."""
        for bucket in self.buckets:
            if bucket.work is not None:
                wait_all([bucket.work], "reducing statistics and gradients")
            bucket.clear()
        self._next = 0
        self._pairs.clear()
        self._grads_in.clear()
        self._launched.clear()

    def notify_statistics(self, name: str) -> None:
        """A block recorded one micro-batch's statistics (called from the hooks)."""
        if self._launched.get(name):
            raise RuntimeError(
                f"SPNGD: {name!r} recorded statistics after they were sent to its owner; is "
                "it called more than once per forward? Use DistributedConfig(overlap=False)."
            )
        self._pairs[name] += 1
        self._launch_ready()

    def _notify_grad(self, param: torch.Tensor) -> None:
        self._grads_in[param] += 1
        self._launch_ready()

    def _block_ready(self, name: str) -> bool:
        block = self.blocks[name]
        stats_in = not any(block.to_compute) or self._pairs[name] >= self.micro_batches
        grads_in = not self.average_gradients or all(
            self._grads_in[p] >= self.micro_batches for p in block.params
        )
        return stats_in and grads_in

    def _launch_ready(self) -> None:
        """Start, in the fixed order, every bucket whose layers are all complete."""
        if not self.config.overlap:
            return
        while self._next < len(self.buckets) and all(
            self._block_ready(n) for n in self.buckets[self._next].names
        ):
            self._launch(self.buckets[self._next], during_backward=True)

    def _launch(self, bucket: _Bucket, during_backward: bool) -> None:
        """Pack and start one bucket. Gradients sent during backward still carry the
        GradScaler's loss scale (``step()`` unscales them later), so they are unscaled
        as they are packed."""
        dtype = self.config.comm_dtype
        unscale = None
        if during_backward and self.average_gradients:
            unscale = inverse_loss_scale(self.grad_scaler, self.device)
        specs, tensors = [], []
        for name in bucket.names:
            block = self.blocks[name]
            fresh = block.take_pending()
            self._launched[name] = True
            block_specs = reduce_specs(block, self.average_gradients)
            specs.extend(block_specs)
            tensors.extend(self._reduce_entries(name, fresh, block_specs, unscale))
        bucket.packer = FlatPacker(specs)
        bucket.buffer = bucket.packer.pack(tensors, dtype)
        bucket.work = dist.reduce(
            bucket.buffer, group_dst=bucket.owner, group=self.group, async_op=True
        )
        self._next += 1

    def _reduce_entries(
        self,
        name: str,
        fresh: Statistics,
        specs: list[TensorSpec],
        unscale: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        block = self.blocks[name]
        device = block.params[0].device
        entries = [torch.full((1,), float(fresh is not None), device=device)]
        position = 1
        for i, computed in enumerate(block.to_compute):
            if computed:
                stat = fresh[i] if fresh is not None else None
                if stat is None:
                    stat = torch.zeros(specs[position].shape, device=device)
                entries.append(stat)
                position += 1
        if block.measure_noise:
            for i, computed in enumerate(block.to_compute):
                if computed:
                    noise = block.fresh_noise[i] if fresh is not None else None
                    entries.append(torch.zeros(1, device=device) if noise is None else noise[None])
        if self.average_gradients:
            for p in block.params:
                if p.grad is None:
                    entries.append(torch.zeros_like(p))
                else:
                    entries.append(p.grad if unscale is None else p.grad * unscale)
        return entries

    def reduce(
        self, grads: dict[torch.Tensor, torch.Tensor]
    ) -> tuple[dict[str, Statistics], dict[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
        """Owners receive the mean over ranks of their blocks' statistics (and gradients);
        gradients of parameters outside any block are all-reduced when averaging.

        Also returns, per owned block with statistics to compute, how many ranks recorded them
        (a 0-dim tensor, not read here: with none, the statistics are zeros, not to be
        used)."""
        while self._next < len(self.buckets):  # whatever backward did not start
            self._launch(self.buckets[self._next], during_backward=False)
        dtype = self.config.comm_dtype
        works = [bucket.work for bucket in self.buckets]
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
                chunk = plain_flat[offset : offset + p.numel()].view_as(p)
                averaged[p] = (chunk / self.world_size).to(p.dtype)
                offset += p.numel()
        owned: dict[str, Statistics] = {}
        contributors: dict[str, torch.Tensor] = {}
        for bucket in self.buckets:
            if bucket.owner == self.rank:
                entries = iter(bucket.packer.unpack(bucket.buffer, self.factor_dtype))
                for name in bucket.names:
                    owned[name] = self._unpack_block(name, entries, averaged, contributors)
        self.reset()
        return owned, averaged, contributors

    def _unpack_block(
        self,
        name: str,
        entries: Iterator[torch.Tensor],
        averaged: dict[torch.Tensor, torch.Tensor],
        contributors: dict[str, torch.Tensor],
    ) -> Statistics:
        block = self.blocks[name]
        count = next(entries).reshape(())
        contributors[name] = count
        divisor = count.clamp(min=1)
        stats = [next(entries) / divisor if computed else None for computed in block.to_compute]
        if block.measure_noise:
            # The mean of ``count`` ranks' estimates: 1/count of their mean noise.
            block.fresh_noise = [
                next(entries).reshape(()) / divisor.square() if computed else None
                for computed in block.to_compute
            ]
        if self.average_gradients:
            for p in block.params:
                averaged[p] = (next(entries) / self.world_size).to(p.dtype)
        return tuple(stats) if any(block.to_compute) else None

    # -- stage 3: preconditioned gradients and next step's statistics to everyone ---------
    def gather(
        self,
        plain: dict[torch.Tensor, torch.Tensor],
        preconditioned: dict[torch.Tensor, torch.Tensor],
        to_compute: dict[str, list[bool]],
    ) -> tuple[dict[torch.Tensor, torch.Tensor], dict[str, list[bool]]]:
        """Every block's preconditioned directions and statistics to compute, as every rank
        (the owner included) receives them, so replicas apply identical values.

        A block is missing from the directions when its owner left it out (a parameter
        without a gradient). Where a 16-bit ``comm_dtype`` cannot hold a preconditioned
        direction, the owner sends the ``plain`` one instead and warns once. The headers
        of all blocks are read from the device once.
        """
        dtype = self.config.comm_dtype
        packers = [
            FlatPacker(
                [spec for name in self.owned_by[r] for spec in gather_specs(self.blocks[name])]
            )
            for r in range(self.world_size)
        ]
        own = packers[self.rank]
        send = torch.zeros(max(packer.numel for packer in packers), dtype=dtype, device=self.device)
        if own.numel:
            own.pack(self._gather_entries(preconditioned, to_compute), dtype, out=send[: own.numel])
            if torch.finfo(dtype).bits < 32:
                self._plain_where_unrepresentable(send, own, plain, preconditioned)
        received = [torch.empty_like(send) for _ in range(self.world_size)]
        wait_all(
            [dist.all_gather(received, send, group=self.group, async_op=True)],
            "gathering preconditioned gradients",
        )
        names, headers, directions = [], [], []
        for rank, packer in enumerate(packers):
            if not packer.numel:
                continue
            entries = iter(packer.unpack(received[rank][: packer.numel], self.factor_dtype))
            for name in self.owned_by[rank]:
                names.append(name)
                headers.append(next(entries))
                directions.append([next(entries) for _ in self.blocks[name].params])
        values = iter(torch.cat(headers).tolist() if headers else [])
        gathered: dict[torch.Tensor, torch.Tensor] = {}
        all_to_compute: dict[str, list[bool]] = {}
        for name, block_directions in zip(names, directions, strict=True):
            block = self.blocks[name]
            valid, fell_back = next(values), next(values)
            all_to_compute[name] = [bool(next(values)) for _ in block.statistic_names]
            if valid:
                gathered.update(
                    (p, d.to(p.dtype)) for p, d in zip(block.params, block_directions, strict=True)
                )
            if fell_back and self.owns(name):
                block.warn_once(
                    "unrepresentable-update",
                    f"preconditioned gradient of {name!r} exceeds the range of {dtype}; the "
                    "plain gradient is sent and applied for it instead",
                )
        return gathered, all_to_compute

    def _gather_entries(
        self, preconditioned: dict[torch.Tensor, torch.Tensor], to_compute: dict[str, list[bool]]
    ) -> list[torch.Tensor]:
        names = self.owned_by[self.rank]
        valid = {name: all(p in preconditioned for p in self.blocks[name].params) for name in names}
        rows = [[float(valid[name]), 0.0, *map(float, to_compute[name])] for name in names]
        # all headers in one copy to the device (one per block would wait for it each time)
        flat = torch.tensor([value for row in rows for value in row])
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        headers = flat.to(self.device, non_blocking=True).split([len(row) for row in rows])
        entries: list[torch.Tensor] = []
        for name, header in zip(names, headers, strict=True):
            entries.append(header)
            entries.extend(
                preconditioned[p] if valid[name] else torch.zeros_like(p)
                for p in self.blocks[name].params
            )
        return entries

    def _plain_where_unrepresentable(
        self,
        send: torch.Tensor,
        packer: FlatPacker,
        plain: dict[torch.Tensor, torch.Tensor],
        preconditioned: dict[torch.Tensor, torch.Tensor],
    ) -> None:
        """In the packed buffer, replace each owned block's directions by its plain ones
        where any packed value is infinite, and set the header's flag; on the device."""
        index = 0
        for name in self.owned_by[self.rank]:
            params = self.blocks[name].params
            header, _ = packer.segment(index)
            first, _ = packer.segment(index + 1)
            last, length = packer.segment(index + len(params))
            index += 1 + len(params)
            if not all(p in preconditioned for p in params):
                continue
            span = send[first : last + length]
            fits = torch.isfinite(span).all()
            plain_values = torch.cat([plain[p].reshape(-1) for p in params]).to(send.dtype)
            span.copy_(torch.where(fits, span, plain_values))
            send[header + 1] = (~fits).to(send.dtype)

    def settle(self) -> None:
        """With gloo, wait until every rank is done with the collectives so far (one
        barrier, about 0.2 ms on one machine). A process group torn down right after
        (a script's last lines after ``step()`` or ``state_dict()``) could otherwise close
        a connection a peer still reads from, and gloo aborts that peer ("terminate called
        without an active exception"). NCCL needs no such wait, and its barrier would
        block the host on the device."""
        if self.backend == "gloo":
            wait_all([dist.barrier(group=self.group, async_op=True)], "ending the step")

    def any_rank(self, flag: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start agreeing whether ``flag`` (0 or 1) is set on any rank (one tiny all-reduce)
        and return a function that waits for it and gives the agreed flag, unread."""
        flag = flag.to(self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

        def agreed() -> torch.Tensor:
            wait_all([work], "agreeing on skipping a non-finite step")
            return flag

        return agreed

    def collect(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``local`` object, on every rank (for counters)."""
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, local, group=self.group)
        except RuntimeError as error:
            raise collective_failure("collecting optimizer state", error) from error
        self.settle()
        return out

    def collect_on_first(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``local`` object on the group's first rank; this rank's alone on the
        others (for checkpoints, which the first rank writes)."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        try:
            dist.gather_object(local, out, group_dst=0, group=self.group)
        except RuntimeError as error:
            raise collective_failure("collecting optimizer state", error) from error
        self.settle()
        return out if out is not None else [local]


def make_exchange(
    blocks: dict[str, CurvatureBlock],
    params: Sequence[torch.Tensor],
    config: DistributedConfig | None,
    average_gradients: bool,
    micro_batches: int,
    grad_scaler: torch.amp.GradScaler | None,
) -> LocalExchange | DistributedExchange:
    """The exchange for this process: local unless torch.distributed runs several ranks in
    ``config``'s group. When SPNGD averages the gradients itself (``average_gradients``),
    ``params`` start from the group's first rank's values, as DDP does."""
    group = config.process_group if config is not None else None
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return LocalExchange(blocks)
    params = list(params)
    if average_gradients:
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            try:
                dist.broadcast(flat, group_src=0, group=group)
            except RuntimeError as error:
                raise collective_failure("broadcasting initial parameters", error) from error
            torch.nn.utils.vector_to_parameters(flat, params)
    in_blocks = {id(p) for block in blocks.values() for p in block.params}
    return DistributedExchange(
        blocks,
        [p for p in params if id(p) not in in_blocks],
        config or DistributedConfig(),
        average_gradients,
        micro_batches,
        grad_scaler,
    )


def statistic_spec(block: CurvatureBlock, index: int) -> TensorSpec:
    """Layout of statistic ``index`` of ``block`` in a communication buffer."""
    return TensorSpec(block.statistic_shape(index), symmetric=block.statistic_symmetric)


def reduce_specs(block: CurvatureBlock, average_gradients: bool) -> list[TensorSpec]:
    """A block's entries in its owner's reduced bucket: the contributor count, the
    statistics to compute this step (and their measured noise), and, where SPNGD averages
    them, the gradients."""
    specs = [TensorSpec((1,))]
    computed = [i for i, due in enumerate(block.to_compute) if due]
    specs.extend(statistic_spec(block, i) for i in computed)
    if block.measure_noise:
        specs.extend(TensorSpec((1,)) for _ in computed)
    if average_gradients:
        specs.extend(TensorSpec(tuple(p.shape)) for p in block.params)
    return specs


def gather_specs(block: CurvatureBlock) -> list[TensorSpec]:
    """A block's entries in its owner's gathered buffer: a header (valid, fell back to the
    plain gradient, the statistics to compute next), then the parameters' directions."""
    header = TensorSpec((2 + len(block.statistic_names),))
    return [header, *(TensorSpec(tuple(p.shape)) for p in block.params)]


@functools.cache
def collect_garbage_at_exit() -> None:
    """Collect garbage once at interpreter exit, while the interpreter is still whole.

    An optimizer and its model's hooks, and DDP's reducer, hold each other in reference
    cycles: they outlive the function that made them and, left to themselves, are freed
    during interpreter finalization. Freed there, after ``destroy_process_group()``, gloo's
    objects they hold abort the process in about 1 run in 16 ("terminate called without an
    active exception"; SPNGD, SPNGD with DDP and plain SGD with DDP alike). Collected at exit
    instead, none of 250 runs aborted (docs/troubleshooting.md). Registered once, by the
    first gloo exchange.
    """
    atexit.register(gc.collect)


def wait_all(works: list[Any], what: str) -> None:
    """Wait for async collectives; a failure (dead peer, timeout) becomes a clear error."""
    try:
        for work in works:
            work.wait()
    except RuntimeError as error:
        raise collective_failure(what, error) from error


class RankFailureError(RuntimeError):
    """A collective of SPNGD failed: another rank died, or stalled past the process
    group's timeout."""


def collective_failure(what: str, error: BaseException) -> RankFailureError:
    """The one-line error for a collective that failed (``error``, torch's, cut to its
    first sentence: gloo's run on with advice for developers)."""
    return RankFailureError(
        f"SPNGD: {what} with the other ranks failed; a rank has probably died or stalled "
        f"past the process group's timeout ({first_sentence(error)})"
    )
