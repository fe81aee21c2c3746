"""``Preconditioner``: SP-NGD's curvature side of a step, apart from the optimizer's update.

It owns the curvature blocks of a model, the hooks that record their statistics, the
refresh policy that decides which statistics and inverses to compute, and the exchange that
moves statistics and results between ranks. One step: :meth:`Preconditioner.reduce` takes
the recorded statistics (and, with several ranks, the gradients) to their owners;
:meth:`Preconditioner.precondition` folds the statistics into the factors, refreshes the
damped inverses, preconditions each owned layer's direction, reads every check in one
device read, and gathers the results. :class:`spngd.SPNGD` adds weight decay before and
momentum SGD after; docs/design.md draws the data flow.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spngd.capture import StatisticsCapture
from spngd.curvature import BlockSettings, CurvatureBlock, make_block
from spngd.curvature.kronecker import update_inverses
from spngd.distributed.exchange import DistributedConfig, Statistics, make_exchange
from spngd.guard import any_nonfinite
from spngd.refresh import Key, RefreshPolicy, relative_changes
from spngd.timing import StageTimes

FISHER_TYPES = ("empirical", "mc")


def find_blocks(
    model: nn.Module, optimized: set[int], settings: BlockSettings
) -> tuple[dict[str, CurvatureBlock], dict[str, str]]:
    """The curvature block (:func:`~spngd.curvature.make_block`, with ``settings``) of every
    module whose parameters are all in ``optimized`` (ids) and trainable and its own, by
    module name; and why each other module with optimized parameters gets momentum SGD
    instead."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    blocks: dict[str, CurvatureBlock] = {}
    plain: dict[str, str] = {}
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if id(p) in optimized]
        if not params:
            continue
        label = name or "<model>"
        block = make_block(label, module, settings)
        module_class = type(module).__name__
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if block is not None and own not in (["weight", "bias"], ["weight"]):
            # weight_norm, spectral_norm or pruning: the weight is computed from other
            # tensors, so the layer's gradient is not the one its statistics describe
            plain[label] = f"momentum SGD ({module_class}'s weight is parametrized or pruned)"
        elif block is None:
            plain[label] = f"momentum SGD ({module_class} is not supported)"
        elif len(params) != len(block.params) or not all(p.requires_grad for p in params):
            plain[label] = f"momentum SGD ({module_class} is only partly trainable)"
        elif any(owners[id(p)] > 1 for p in params):
            plain[label] = f"momentum SGD ({module_class} shares a parameter with another module)"
        else:
            blocks[label] = block
    return blocks, plain


@dataclass
class Reduced:
    """What :meth:`Preconditioner.reduce` brought to this rank: the gradients (averaged over
    ranks where SPNGD averages them), the statistics of the blocks it owns (None where
    none were recorded), and per block how many ranks contributed them."""

    grads: dict[torch.Tensor, torch.Tensor]
    statistics: dict[str, Statistics]
    contributors: dict[str, torch.Tensor]


@dataclass
class _Measured:
    """What :meth:`Preconditioner._fold` started on the device for the refresh test: a norm
    per fresh statistic (``keys``), a relative change per statistic with a previous value
    where the refresh policy reads it (``compared``) and a noise per statistic with a
    measured one (``noisy``), in that order in ``tensors``."""

    keys: list[tuple[str, int]]
    compared: list[tuple[str, int]]
    noisy: list[tuple[str, int]]
    tensors: list[torch.Tensor]


@dataclass
class _Pending:
    """A step's work done ahead of its checks, for :meth:`Preconditioner._settle`."""

    owned: dict[str, CurvatureBlock]
    arrived: dict[str, Statistics]
    measured: _Measured
    contributors: dict[str, torch.Tensor]
    before_fold: dict[str, dict[str, object]]
    before_inversion: dict[str, dict[str, object]]
    proposals: list[tuple[CurvatureBlock, float, torch.Tensor]]
    results: list[tuple[CurvatureBlock, list[torch.Tensor], list[torch.Tensor]]]


class Preconditioner:
    """The curvature blocks of one model with their hooks, refresh policy and exchange.

    Args:
        blocks: the blocks by module name (:func:`find_blocks`).
        params: every parameter the optimizer updates (the exchange averages or moves
            their gradients).
        device: where the parameters are: the step's flags live there.
        stat_decay, fisher, accumulation_steps, statistics_examples, grad_scaler,
        distributed: as :class:`spngd.SPNGD` documents them.
        refresh: when statistics and inverses are computed.
        average_gradients: whether the exchange averages gradients over ranks (the model
            is not wrapped in ``DistributedDataParallel``).
    """

    def __init__(
        self,
        blocks: dict[str, CurvatureBlock],
        params: list[torch.Tensor],
        device: torch.device,
        *,
        stat_decay: float,
        fisher: str,
        refresh: RefreshPolicy,
        accumulation_steps: int,
        statistics_examples: int | None,
        grad_scaler: torch.amp.GradScaler | None,
        distributed: DistributedConfig | None,
        average_gradients: bool,
    ) -> None:
        self.blocks = blocks
        self.device = device
        self.stat_decay = stat_decay
        self.fisher = fisher
        self.refresh = refresh
        for block in blocks.values():
            block.statistics_examples = statistics_examples
        self.times = StageTimes()
        self.exchange = make_exchange(
            blocks,
            params,
            distributed,
            average_gradients=average_gradients,
            micro_batches=accumulation_steps,
            grad_scaler=grad_scaler,
        )
        self._capture = StatisticsCapture(
            blocks.values(),
            sampled_only=fisher == "mc",
            grad_scale=accumulation_steps,
            grad_scaler=grad_scaler,
            times=self.times,
            on_recorded=self.exchange.notify_statistics,
        )
        self.steps_taken = 0
        """Steps preconditioned so far (skipped ones not counted); the refresh policy's clock."""
        self._warned_no_statistics = False
        self._set_to_compute()
        # MC labels come from the preconditioner's own generator, so that a checkpoint holds
        # the state needed to draw the same labels again; seeded from torch's global RNG.
        self._mc_generator: torch.Generator | None = None
        if fisher == "mc":
            self._mc_generator = torch.Generator(device=device)
            self._mc_generator.manual_seed(int(torch.randint(2**62, (1,)).item()))

    def remove_hooks(self) -> None:
        self._capture.remove()

    @property
    def unscales_statistics(self) -> bool:
        """Whether the statistics are divided by a ``GradScaler``'s loss scale (one was
        given at construction)."""
        return self._capture.grad_scaler is not None

    # -- statistics -----------------------------------------------------------------------
    def sample_fisher(self, logits: torch.Tensor) -> torch.Tensor:
        """Record statistics from labels sampled from ``softmax(logits)``; see
        :meth:`spngd.SPNGD.sample_fisher`."""
        if self.fisher != "mc":
            raise RuntimeError(
                f"sample_fisher() is for fisher='mc'; this optimizer uses fisher={self.fisher!r}"
            )
        if logits.dim() != 2:
            raise ValueError(
                f"sample_fisher expects logits of shape (n, classes), got {tuple(logits.shape)}"
            )
        if not logits.requires_grad:
            raise ValueError(
                "sample_fisher needs logits that require grad (not computed under torch.no_grad())"
            )
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=1)
            # A row holding NaN or inf (a diverged model) samples from the uniform
            # distribution instead of stopping here: its loss and gradients are not finite,
            # and the step is skipped like any other such step (no read of the device).
            finite = torch.isfinite(probs).all(dim=1, keepdim=True)
            probs = torch.where(finite, probs, torch.ones_like(probs))
            labels = torch.multinomial(probs, 1, generator=self._mc_generator).squeeze(1)
        params = [p for block in self.blocks.values() for p in block.params]
        self._capture.record_sampled(F.cross_entropy(logits, labels), params)
        return labels

    def drop_recorded(self) -> None:
        """Forget the statistics recorded since the last step (and anything in flight)."""
        for block in self.blocks.values():
            block.clear_pending()
        self.exchange.reset()
        self._capture.take_recorded_count()

    # -- the step -------------------------------------------------------------------------
    def check_gradients(self, grads: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Start the check whether any rank's gradients hold NaN or inf; the returned
        function gives the agreed flag (``1.0`` if so) when the step's checks are read."""
        with self.times.measure("checks"):
            return self.exchange.any_rank(any_nonfinite(grads, self.device))

    def reduce(self, grads: dict[torch.Tensor, torch.Tensor]) -> Reduced:
        """Bring the recorded statistics to their owners (and, where SPNGD averages them,
        average the gradients); warns once when blocks due for statistics recorded none."""
        self._warn_if_no_statistics()
        with self.times.measure("statistics and gradient communication"):
            statistics, grads, contributors = self.exchange.reduce(grads)
        return Reduced(grads, statistics, contributors)

    def precondition(
        self,
        reduced: Reduced,
        directions: dict[torch.Tensor, torch.Tensor],
        dampings: dict[str, float],
        nonfinite: Callable[[], torch.Tensor],
        loss_scaled: bool,
    ) -> dict[torch.Tensor, torch.Tensor] | None:
        """Every parameter's update direction for this step: ``directions`` (the gradients
        with weight decay) with each preconditioned layer's replaced by its natural
        gradient (with ``dampings[name]``), or None when the gradients were not finite
        (``nonfinite()``): then every block is as it was before the step.

        The fresh statistics are folded into the owned blocks, due inverses refreshed and
        owned layers preconditioned before anything is read; then one read gives every
        check (:meth:`_settle`) and the results are gathered from their owners. A parameter
        whose owner left its block out (a parameter lacked a gradient) gets no direction.
        ``loss_scaled``: the step runs under a GradScaler (its overflows are not warned of).
        """
        exchange, times = self.exchange, self.times
        owned = {name: block for name, block in self.blocks.items() if exchange.owns(name)}
        arrived = {name: stats for name, stats in reduced.statistics.items() if stats is not None}
        if arrived:
            self._warn_of_modules_not_called(owned, arrived, directions)
        before_fold = {name: owned[name].save() for name in arrived}
        with times.measure("refresh test"):
            measured = self._fold(owned, arrived)
        due = [
            (block, dampings[name])
            for name, block in owned.items()
            if self._inverse_due(block, dampings[name], refreshed=name in arrived)
        ]
        before_inversion = {block.name: block.save() for block, _ in due}
        with times.measure("inversion"):
            proposals = update_inverses(due)
        with times.measure("preconditioning"):
            results = self._precondition(owned, directions)
        with times.measure("refresh test"):
            pending = _Pending(
                owned, arrived, measured, reduced.contributors, before_fold, before_inversion,
                proposals, results,
            )  # fmt: skip
            skipped = self._settle(pending, dampings, nonfinite(), loss_scaled)
        if skipped:
            exchange.settle()
            return None
        preconditioned = {
            p: update
            for block, _, updates in results
            for p, update in zip(block.params, updates, strict=True)
        }
        to_compute = {
            name: self._to_compute(name, block, self.steps_taken + 1)
            for name, block in owned.items()
        }
        with times.measure("result communication"):
            preconditioned, to_compute = exchange.gather(directions, preconditioned, to_compute)
            exchange.settle()
        directions = dict(directions)
        for block in self.blocks.values():
            for p in block.params:
                if p in preconditioned:
                    directions[p] = preconditioned[p]
                else:  # its owner left the block out: no update for it on any rank
                    directions.pop(p, None)
        self.steps_taken += 1
        self._arm(to_compute)
        return directions

    def _fold(self, owned: dict[str, CurvatureBlock], arrived: dict[str, Statistics]) -> _Measured:
        """Fold the arrived statistics into the owned blocks' factors, and start (on the
        device, unread) what the refresh test needs: every fresh statistic's norm (NaN or
        inf when any entry is), its relative change against the value in use (where the
        refresh policy reads it), and its measured noise. :meth:`_settle` reads them, with
        the step's other checks."""
        keys = [
            (name, i)
            for name, stats in arrived.items()
            for i, stat in enumerate(stats)  # type: ignore[arg-type]
            if stat is not None
        ]
        reads_changes = self.refresh.reads_changes(self.steps_taken)
        compared = [
            (name, i) for name, i in keys if reads_changes and owned[name].factors[i] is not None
        ]
        noisy = [(name, i) for name, i in keys if owned[name].fresh_noise[i] is not None]
        changes = relative_changes(
            [owned[name].factors[i] for name, i in compared],  # type: ignore[misc]
            [arrived[name][i] for name, i in compared],  # type: ignore[index, misc]
        )
        norms = torch._foreach_norm([arrived[name][i] for name, i in keys]) if keys else []  # type: ignore[index, misc]
        noises = [owned[name].fresh_noise[i] for name, i in noisy]
        for name, stats in arrived.items():
            weights = tuple(self._fresh_weight((name, i)) for i in range(len(stats)))  # type: ignore[arg-type]
            owned[name].update_factors(stats, weights)  # type: ignore[arg-type]
        return _Measured(keys, compared, noisy, [*norms, *changes, *noises])  # type: ignore[list-item]

    def _fresh_weight(self, key: Key) -> float:
        """A fresh estimate's share in its statistic: ``1 - stat_decay`` with a running
        average, else the refresh policy's (1, or its pooling weight)."""
        if self.stat_decay > 0.0:
            return 1.0 - self.stat_decay
        return self.refresh.fresh_weight(key)

    def _settle(
        self,
        pending: _Pending,
        dampings: dict[str, float],
        nonfinite: torch.Tensor,
        loss_scaled: bool,
    ) -> bool:
        """Read the step's checks from the device at once, undo what they reject, and let
        the refresh policy observe the statistics; True when the gradients were not finite.

        In one read: whether any rank's gradients hold NaN or inf (``nonfinite``), the
        fresh statistics' norms, changes and noises, how many ranks contributed them,
        whether each new inverse is valid, and whether any preconditioned gradient is NaN
        or inf. With non-finite gradients every block's factors and inverse are put back
        (its statistics are as suspect as its gradients). Statistics with NaN or inf (or
        from no rank) are dropped: the block's previous factors and inverse come back (with
        one warning). A new inverse that is not valid is replaced by the fallbacks of
        :meth:`CurvatureBlock.update_inverse` (the previous inverse, or the plain gradient).
        Both recompute the block's preconditioned gradient; a NaN or inf result falls back
        to the plain gradient.
        """
        measured, owned, results = pending.measured, pending.owned, pending.results
        updates = [u for _, _, block_updates in results for u in block_updates]
        read = [
            nonfinite,
            *measured.tensors,
            *pending.contributors.values(),
            *(valid for _, _, valid in pending.proposals),
            any_nonfinite(updates, self.device),
        ]
        values = iter(torch.stack([v.reshape(()).double() for v in read]).tolist())
        if next(values) > 0:
            for name, saved in pending.before_inversion.items():
                if name not in pending.arrived:
                    owned[name].restore(saved)
            for name, saved in pending.before_fold.items():
                owned[name].restore(saved)
            return True
        finite = dict.fromkeys(pending.arrived, True)
        for name, _ in measured.keys:
            finite[name] = math.isfinite(next(values)) and finite[name]
        change_of = {key: next(values) for key in measured.compared}
        noise_of = {key: next(values) for key in measured.noisy}
        recorded = {name: next(values) > 0 for name in pending.contributors}
        valid = [next(values) > 0 for _ in pending.proposals]
        updates_bad = next(values) > 0

        redo: set[str] = set()
        for name in pending.arrived:
            if finite[name] and recorded.get(name, True):
                continue
            block = owned[name]
            block.restore(pending.before_fold[name])
            if recorded.get(name, True):
                block.warn_nonfinite_statistics()
            if block.ready and block.inverse_damping != dampings[name]:
                block.update_inverse(dampings[name])
            redo.add(name)
        for (block, damping, _), ok in zip(pending.proposals, valid, strict=True):
            if not ok and block.name not in redo:
                block.restore(pending.before_inversion[block.name])
                block.update_inverse(damping)
                redo.add(block.name)
        for index, (block, grads, block_updates) in enumerate(results):
            if block.name in redo:
                block_updates = block.precondition(grads)
            if block.name in redo or updates_bad:
                results[index] = (block, grads, block.plain_if_not_finite(grads, block_updates))

        step = self.steps_taken
        for name, block in owned.items():
            kept = name in pending.arrived and finite[name] and recorded.get(name, True)
            stats = pending.arrived[name] if kept else None
            for i, statistic in enumerate(block.statistic_names):
                computed = stats is not None and stats[i] is not None
                if computed:
                    key = (name, i)
                    self.refresh.observe(key, step, change_of.get(key), noise_of.get(key))
                self.refresh.count(name, "stats", computed)
                self.refresh.count(name, statistic, computed)
            self.refresh.count(name, "inverses", name in pending.before_inversion)
        return False

    def _inverse_due(self, block: CurvatureBlock, damping: float, refreshed: bool) -> bool:
        """Whether an owned block's inverse is recomputed this step."""
        due = (
            block.inverse_form is None
            or block.inverse_damping != damping
            or self.refresh.inverse_due(self.steps_taken, refreshed=refreshed)
        )
        return block.ready and due

    @staticmethod
    def _precondition(
        owned: dict[str, CurvatureBlock], directions: dict[torch.Tensor, torch.Tensor]
    ) -> list[tuple[CurvatureBlock, list[torch.Tensor], list[torch.Tensor]]]:
        """``(block, directions, preconditioned directions)`` of the owned blocks (blocks
        with a parameter lacking a gradient are left out: nothing is sent or applied for
        them); :meth:`_settle` checks the results."""
        results = []
        for block in owned.values():
            if all(p in directions for p in block.params):
                grads = [directions[p] for p in block.params]
                results.append((block, grads, block.precondition(grads)))
        return results

    def _warn_of_modules_not_called(
        self,
        owned: dict[str, CurvatureBlock],
        arrived: dict[str, Statistics],
        directions: dict[torch.Tensor, torch.Tensor],
    ) -> None:
        """Warn once per layer that has gradients but has never recorded statistics while
        others did: its weight is used without calling the module (MultiheadAttention's
        ``out_proj``), so it only ever gets its plain gradient."""
        for name, block in owned.items():
            silent = name not in arrived and not block.ready and any(block.to_compute)
            if silent and all(p in directions for p in block.params):
                block.warn_once(
                    "not-called",
                    f"{name!r} has gradients but records no statistics: its weight is used "
                    "without calling the module (as MultiheadAttention does with out_proj); "
                    "it gets the plain gradient",
                )

    def _warn_if_no_statistics(self) -> None:
        computing = any(any(block.to_compute) for block in self.blocks.values())
        recorded = self._capture.take_recorded_count()
        if computing and not recorded and not self._warned_no_statistics:
            self._warned_no_statistics = True
            hint = (
                " call opt.sample_fisher(logits) before loss.backward()"
                if self.fisher == "mc"
                else " is the model in train mode, and did backward run on its output?"
            )
            warnings.warn(
                "SPNGD: no curvature statistics were recorded before step();"
                f"{hint} Layers without statistics use the plain gradient.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _set_to_compute(self) -> None:
        """Set every block's statistics for the coming step from the refresh policy."""
        self._arm(
            {
                name: self._to_compute(name, block, self.steps_taken)
                for name, block in self.blocks.items()
            }
        )

    def _arm(self, to_compute: dict[str, list[bool]]) -> None:
        """Tell every block which statistics its hooks compute in the coming step, and
        whether with their noise."""
        measure_noise = self.refresh.measures_noise(self.steps_taken)
        for name, block in self.blocks.items():
            block.to_compute = to_compute[name]
            block.measure_noise = measure_noise

    def _to_compute(self, name: str, block: CurvatureBlock, step: int) -> list[bool]:
        """Which of ``block``'s statistics the hooks compute at ``step``."""
        return [self.refresh.is_due((name, i), step) for i in range(len(block.statistic_names))]

    def refresh_counts(self) -> dict[str, dict[str, int]]:
        """Statistics and inverse computations done and skipped, per layer and in total,
        collected from every rank (all ranks call this together)."""
        counts: dict[str, dict[str, int]] = {}
        for rank_counts in self.exchange.collect(self.refresh.counts_of(self.exchange.owns)):
            counts.update(rank_counts)
        return RefreshPolicy.summarize(counts)

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Each block's factors and inverse (``curvature``, collected on the group's first
        rank), the refresh policy's state, the step counter and the MC generator's state;
        all ranks call this together."""
        local = {
            "curvature": {
                name: block.state_dict()
                for name, block in self.blocks.items()
                if self.exchange.owns(name)
            },
            "refresh": self.refresh.state_dict(self.exchange.owns),
        }
        curvature: dict[str, object] = {}
        refresh: dict[str, dict] = {key: {} for key in local["refresh"]}
        for rank_state in self.exchange.collect_on_first(local):
            curvature.update(rank_state["curvature"])
            for key in refresh:
                refresh[key].update(rank_state["refresh"][key])
        state: dict[str, object] = {
            "curvature": curvature,
            "refresh": refresh,
            "step": self.steps_taken,
        }
        if self._mc_generator is not None:
            state["mc_generator"] = self._mc_generator.get_state()
        return state

    STATE_KEYS = ("curvature", "refresh", "step", "mc_generator")
    """The entries :meth:`state_dict` adds to an optimizer state dict."""

    def check_state_dict(self, state: dict[str, object]) -> None:
        """A ValueError when ``state`` (entries of :meth:`state_dict`) does not fit these
        blocks; nothing is changed."""
        curvature: dict[str, dict] = state.get("curvature", {})  # type: ignore[assignment]
        unknown = set(curvature) - set(self.blocks)
        if unknown:
            raise ValueError(
                "state_dict has curvature for modules this optimizer does not "
                f"precondition: {sorted(unknown)}"
            )
        for name, block_state in curvature.items():
            self.blocks[name].check_state_dict(block_state)

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s entries (checked by :meth:`check_state_dict`)."""
        mc_state = state.get("mc_generator")
        if mc_state is not None and self._mc_generator is not None:
            self._load_mc_generator(mc_state)  # type: ignore[arg-type]
        for name, block_state in state.get("curvature", {}).items():  # type: ignore[attr-defined]
            self.blocks[name].load_state_dict(block_state)
        refresh = state.get("refresh")
        if refresh is not None:
            self.refresh.load_state_dict(refresh)  # type: ignore[arg-type]
        self.steps_taken = state.get("step", 0)  # type: ignore[assignment]
        self._set_to_compute()

    def _load_mc_generator(self, state: torch.Tensor) -> None:
        """Restore the MC sampling generator; a state saved from a generator of another device
        type cannot be, so the labels are then drawn afresh (seeded from it)."""
        generator = self._mc_generator
        assert generator is not None
        try:
            generator.set_state(state)
        except (RuntimeError, ValueError):
            warnings.warn(
                "SPNGD: the checkpoint's MC sampling state comes from a "
                f"{'CPU' if generator.device.type != 'cpu' else 'GPU'} generator; sampled "
                "labels are drawn afresh",
                RuntimeWarning,
                stacklevel=4,
            )
            generator.manual_seed(int(state.to(torch.int64).sum()))
