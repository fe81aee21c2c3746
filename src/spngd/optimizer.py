"""``SPNGD``: the natural-gradient optimizer (K-FAC + unit-wise BatchNorm Fisher).

Each step: fold the statistics recorded by the hooks during backward into the running
factors, refresh the damped inverses, add weight decay to the gradients, precondition
every supported layer's gradient with its block, then apply momentum SGD (PyTorch
convention, which equals the authors' Chainer update; see docs/optimizer.md).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from spngd import amp
from spngd.capture import StatisticsCapture
from spngd.curvature import CurvatureBlock, make_block
from spngd.curvature.kronecker import DAMPING_FORMS, KroneckerBlock, update_inverses
from spngd.distributed.exchange import DistributedConfig, Statistics, make_exchange
from spngd.guard import GuardedSteps, NonFiniteGuard, any_nonfinite
from spngd.refresh import AdaptiveRefresh, RefreshPolicy, relative_changes
from spngd.timing import StageTimes

FISHER_TYPES = ("empirical", "mc")


@dataclass
class _Measured:
    """What :meth:`SPNGD._fold` started on the device for the refresh test: a norm per
    fresh statistic (``keys``), a relative change per statistic with a previous value
    (``compared``) and a noise per statistic with a measured one (``noisy``), in that
    order in ``tensors``."""

    keys: list[tuple[str, int]]
    compared: list[tuple[str, int]]
    noisy: list[tuple[str, int]]
    tensors: list[torch.Tensor]


@dataclass
class _Pending:
    """A step's work done ahead of its checks, for :meth:`SPNGD._settle`."""

    owned: dict[str, CurvatureBlock]
    arrived: dict[str, Statistics]
    measured: _Measured
    contributors: dict[str, torch.Tensor]
    before_fold: dict[str, dict[str, object]]
    before_inversion: dict[str, dict[str, object]]
    proposals: list[tuple[CurvatureBlock, float, torch.Tensor]]
    results: list[tuple[CurvatureBlock, list[torch.Tensor], list[torch.Tensor]]]


class SPNGD(GuardedSteps, Optimizer):
    """Scalable and Practical Natural Gradient Descent (Osawa et al., TPAMI 2020).

    Linear, Conv1d and Conv2d layers are preconditioned with Kronecker-factored curvature
    (K-FAC; grouped and depthwise convolutions per group), BatchNorm layers with the
    unit-wise 2x2 Fisher per channel; every other parameter gets momentum SGD on its
    raw gradient. ``describe()`` lists what each module gets.

    Args:
        model: the module whose layers are preconditioned. Hooks are installed on it;
            call :meth:`remove_hooks` to take them off.
        lr: learning rate.
        momentum: heavy-ball momentum, PyTorch convention (``buf = mu buf + u``).
        damping: Tikhonov damping ``lam`` > 0. Kronecker factors get pi-corrected
            factored damping with ``lam_eff = max(damping, weight_decay)``
            (docs/optimizer.md, Conventions); BatchNorm blocks get ``bn_damping_scale * lam_eff``.
        weight_decay: L2 coefficient, added to the gradient before preconditioning
            (the paper's recipe uses none; it also floors the damping, as in the
            authors' code).
        stat_decay: weight of the *old* statistics in the running average
            ``X = stat_decay X_old + (1 - stat_decay) X_new``. The default 0 uses the
            current batch's statistics only, as the paper's ImageNet configs do.
        fisher: ``"empirical"`` (statistics from the ordinary backward with the
            training labels; no extra pass) or ``"mc"`` (one label sampled per example
            from the model's softmax; call :meth:`sample_fisher` with the logits before
            ``loss.backward()``).
        bn_damping_scale: the BatchNorm damping multiplier kappa (16, what the authors'
            released script uses).
        damping_form: how Linear and Conv layers are damped. ``"factored"`` (the paper's):
            ``(G + sqrt(lam)/pi I)^-1 grad (A + pi sqrt(lam) I)^-1`` with Cholesky factors,
            pi from the current factors at every inversion; ``"factored-keep-a"``
            (default): the same, but pi is recomputed only when ``A`` is refreshed, so a
            refresh of ``G`` alone keeps ``A``'s factorisation; ``"kronecker"``: the exact
            ``(G ⊗ A + lam I)^-1`` in the factors' eigenbases, where refreshing one factor
            leaves the other's decomposition alone (see :mod:`spngd.curvature.kronecker`
            for the costs of each).
        stat_interval: ``None`` (default) refreshes each statistic by SP-NGD's adaptive
            rule (see :mod:`spngd.refresh`); an int ``k`` computes all statistics every
            ``k`` steps (1: every step).
        inverse_interval: with a fixed ``stat_interval``, recompute inverses every this
            many steps (default: whenever statistics were computed).
        refresh: knobs of the adaptive rule (threshold, growth, cap, warm-up).
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss (mixed precision):
            output gradients are divided by its current scale before statistics are
            taken. Call ``scaler.step(opt)`` as usual: it calls :meth:`step` on every rank,
            which unscales the gradients and skips an overflowing step on all ranks.
        max_bad_steps: a step whose gradients contain NaN or inf is skipped (parameters,
            momentum and curvature untouched) with a warning; after this many such steps
            in a row ``step()`` raises :class:`NonFiniteGradientError`. Under
            ``GradScaler.step`` such a step is an overflow the scaler answers by lowering
            its scale: skipped silently and not counted.
        distributed: communication settings when ``torch.distributed`` is initialised
            with more than one rank (default ``DistributedConfig()``). Each layer's
            statistics are reduced to one owner rank, which inverts and preconditions it;
            results are all-gathered. Works with a ``DistributedDataParallel``-wrapped model
            (gradients already averaged) or an unwrapped one (then SPNGD averages them, and
            broadcasts rank 0's parameters at construction).
        accumulation_steps: backward passes per step (gradient accumulation). Each
            micro-batch's loss is taken to be divided by it, so that the accumulated
            gradient is the mean over the whole batch; statistics are rescaled to match
            and averaged over the micro-batches, so K steps of batch B equal one of B*K.
        params: parameters or param groups to optimize (default: every parameter of
            ``model`` that requires grad). Groups may set ``lr``, ``momentum``,
            ``damping`` and ``weight_decay``; the parameters of one layer must share
            ``damping`` and ``weight_decay``.

    Statistics assume the loss is a mean over dimension 0 of each layer's input (the
    batch): the per-example output gradient is ``n * grad_output``. Calls between two
    steps (gradient accumulation, or a layer used more than once) are averaged.
    """

    _step_supports_amp_scaling = True
    """``GradScaler.step`` then calls :meth:`step` on every rank, overflow or not, with the
    step's ``grad_scale`` (None once ``unscale_`` ran) and ``found_inf`` set on the
    optimizer: SPNGD unscales the gradients itself, and ranks skip an overflowing step
    together instead of one rank skipping while the others wait in a collective."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.9,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        stat_decay: float = 0.0,
        fisher: str = "empirical",
        bn_damping_scale: float = 16.0,
        damping_form: str = DAMPING_FORMS[0],
        stat_interval: int | None = None,
        inverse_interval: int | None = None,
        refresh: AdaptiveRefresh | None = None,
        accumulation_steps: int = 1,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_bad_steps: int = 10,
        distributed: DistributedConfig | None = None,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SPNGD needs the model (an nn.Module) first, got {type(model)}")
        if not 0.0 <= stat_decay < 1.0:
            raise ValueError(f"stat_decay must be in [0, 1), got {stat_decay}")
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if damping_form not in DAMPING_FORMS:
            raise ValueError(f"damping_form must be one of {DAMPING_FORMS}, got {damping_form!r}")
        if not bn_damping_scale > 0.0:
            raise ValueError(f"bn_damping_scale must be > 0, got {bn_damping_scale}")
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps}")
        wrapped = isinstance(model, nn.parallel.DistributedDataParallel)
        if wrapped:
            model = model.module
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        self.stat_decay = stat_decay
        self.fisher = fisher
        self.bn_damping_scale = bn_damping_scale
        self.curvature: dict[str, CurvatureBlock] = {}
        self._block_group: dict[str, int] = {}
        self._plain: dict[str, str] = {}
        self._build_blocks(model)
        if refresh is not None and not isinstance(refresh, AdaptiveRefresh):
            raise TypeError(f"refresh must be an AdaptiveRefresh, got {type(refresh).__name__}")
        self.refresh = RefreshPolicy(stat_interval, inverse_interval, refresh or AdaptiveRefresh())
        for block in self.curvature.values():
            block.measure_noise = self.refresh.uses_noise
            if isinstance(block, KroneckerBlock):
                block.damping_form = damping_form
        self.accumulation_steps = accumulation_steps
        self.guard = NonFiniteGuard(
            "SPNGD", max_bad_steps, advice="Lower the learning rate or raise the damping"
        )
        self._step = 0
        self._device = next(iter(self.param_groups[0]["params"])).device
        """Where the parameters are (the first one's device): the step's flags live there."""
        self.times = StageTimes()
        self._exchange = make_exchange(
            self.curvature,
            [p for g in self.param_groups for p in g["params"]],
            distributed,
            average_gradients=not wrapped,
            micro_batches=accumulation_steps,
            grad_scaler=grad_scaler,
        )
        self._capture = StatisticsCapture(
            self.curvature.values(),
            sampled_only=fisher == "mc",
            grad_scale=accumulation_steps,
            grad_scaler=grad_scaler,
            times=self.times,
            on_recorded=self._exchange.notify_statistics,
        )
        self._warned_no_statistics = False
        self._set_to_compute()
        # MC labels come from the optimizer's own generator, so that a checkpoint holds the
        # state needed to draw the same labels again; seeded from torch's global RNG.
        self._mc_generator: torch.Generator | None = None
        if fisher == "mc":
            self._mc_generator = torch.Generator(device=self._device)
            self._mc_generator.manual_seed(int(torch.randint(2**62, (1,)).item()))

    # -- construction ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        checks = {
            "lr": group["lr"] >= 0.0,
            "momentum": 0.0 <= group["momentum"] < 1.0,
            "damping": group["damping"] > 0.0,
            "weight_decay": group["weight_decay"] >= 0.0,
        }
        rules = {"lr": ">= 0", "momentum": "in [0, 1)", "damping": "> 0", "weight_decay": ">= 0"}
        for key, ok in checks.items():
            if not ok:
                self.param_groups.pop()
                raise ValueError(f"{key} must be {rules[key]}, got {group[key]}")

    def _build_blocks(self, model: nn.Module) -> None:
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        owners = Counter(
            id(p) for _, module in model.named_modules() for p in module.parameters(recurse=False)
        )
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if id(p) in group_of]
            if not params:
                continue
            label = name or "<model>"
            block = make_block(label, module, self.bn_damping_scale)
            kind = type(module).__name__
            if block is None:
                self._plain[label] = f"momentum SGD ({kind} is not supported)"
            elif len(params) != len(block.params) or not all(p.requires_grad for p in params):
                self._plain[label] = f"momentum SGD ({kind} is only partly trainable)"
            elif any(owners[id(p)] > 1 for p in params):
                self._plain[label] = f"momentum SGD ({kind} shares a parameter with another module)"
            else:
                groups = {group_of[id(p)] for p in params}
                settings = {
                    (self.param_groups[i]["damping"], self.param_groups[i]["weight_decay"])
                    for i in groups
                }
                if len(settings) > 1:
                    raise ValueError(
                        f"the parameters of {label!r} are in param groups with different "
                        "damping or weight_decay; one layer is preconditioned as one block"
                    )
                self.curvature[label] = block
                self._block_group[label] = min(groups)
        if not self.curvature:
            warnings.warn(
                "SPNGD: the model has no trainable Linear, Conv1d, Conv2d or BatchNorm layer; "
                "every parameter gets plain momentum SGD",
                UserWarning,
                stacklevel=3,
            )

    def describe(self) -> dict[str, str]:
        """How each module with optimized parameters is preconditioned, by module name."""
        lines = {name: block.describe() for name, block in self.curvature.items()}
        lines.update(self._plain)
        return lines

    def remove_hooks(self) -> None:
        """Take the statistics hooks off the model (the optimizer then acts as momentum SGD)."""
        self._capture.remove()

    # -- statistics -----------------------------------------------------------------------
    def sample_fisher(self, logits: torch.Tensor) -> torch.Tensor:
        """MC Fisher: record statistics from labels sampled from ``softmax(logits)``.

        Call after the forward pass and before ``loss.backward()``. Draws one label per
        row of ``logits`` (shape ``(n, classes)``) with the optimizer's own generator
        (seeded from torch's global RNG at construction, saved in ``state_dict``), backpropagates
        the mean cross-entropy against them (keeping the graph for the real backward)
        to record the curvature statistics, and returns the sampled labels. Parameter
        ``.grad`` is not touched.
        """
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
            labels = torch.multinomial(probs, 1, generator=self._mc_generator).squeeze(1)
        params = [p for block in self.curvature.values() for p in block.params]
        self._capture.record_sampled(F.cross_entropy(logits, labels), params)
        return labels

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and the statistics recorded since the last step, together."""
        super().zero_grad(set_to_none=set_to_none)
        self._drop_recorded()

    def _drop_recorded(self) -> None:
        """Forget the statistics recorded since the last step (and anything in flight)."""
        for block in self.curvature.values():
            block.clear_pending()
        self._exchange.reset()
        self._capture.take_recorded_count()

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update: reduce to owners, refresh and precondition owned layers, gather,
        apply momentum SGD (single process: the same stages with nothing to move).

        Each stage is timed (:meth:`stage_seconds`). Nothing waits for the device until
        all the step's work up to the update is issued: then one read gives every check at
        once (gradients, statistics and updates finite, the refresh test's distances,
        inverses valid; see :meth:`_settle`), and, with several ranks, a second gives the
        headers the owners sent with their results. That is whatever the number of layers,
        and nothing is read during backward.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        exchange = self._exchange
        times = self.times
        # Set by GradScaler.step for this call: the loss scale the gradients still carry.
        loss_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        grads = {
            p: p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        }
        with times.measure("checks"):
            nonfinite = exchange.any_rank(any_nonfinite(list(grads.values()), self._device))
        if loss_scale is not None:
            torch._foreach_mul_(list(grads.values()), amp.reciprocal(loss_scale))
        self._warn_if_no_statistics()
        if any(g.is_sparse for g in grads.values()):
            raise RuntimeError("SPNGD does not support sparse gradients")
        with times.measure("statistics and gradient communication"):
            fresh, grads, contributors = exchange.reduce(grads)
        directions = self._weight_decayed(grads)
        owned = {name: block for name, block in self.curvature.items() if exchange.owns(name)}
        arrived = {name: stats for name, stats in fresh.items() if stats is not None}
        before_fold = {name: owned[name].save() for name in arrived}
        with times.measure("refresh test"):
            measured = self._fold(owned, arrived)
        due = [
            (block, self._block_damping(name))
            for name, block in owned.items()
            if self._inverse_due(name, block, refreshed=name in arrived)
        ]
        before_inversion = {block.name: block.save() for block, _ in due}
        with times.measure("inversion"):
            proposals = update_inverses(due)
        with times.measure("preconditioning"):
            results = self._precondition(owned, directions)
        with times.measure("refresh test"):
            pending = _Pending(
                owned, arrived, measured, contributors, before_fold, before_inversion,
                proposals, results,
            )  # fmt: skip
            skipped = self._settle(pending, nonfinite(), loss_scaled=hasattr(self, "found_inf"))
        if skipped:
            exchange.settle()
            return loss
        preconditioned = {
            p: update
            for block, _, updates in results
            for p, update in zip(block.params, updates, strict=True)
        }
        to_compute = {
            name: self._to_compute(name, block, self._step + 1) for name, block in owned.items()
        }
        with times.measure("result communication"):
            preconditioned, to_compute = exchange.gather(directions, preconditioned, to_compute)
            exchange.settle()
        for block in self.curvature.values():
            for p in block.params:
                if p in preconditioned:
                    directions[p] = preconditioned[p]
                else:  # its owner left the block out: no update for it on any rank
                    directions.pop(p, None)
        with times.measure("update"):
            for group in self.param_groups:
                self._apply_momentum(group, directions)
        self._step += 1
        for name, block in self.curvature.items():
            block.to_compute = to_compute[name]
        return loss

    @property
    def steps_taken(self) -> int:
        """Steps applied so far (skipped ones not counted); also ``state_dict()["step"]``."""
        return self._step

    def stage_seconds(self) -> dict[str, float]:
        """Seconds spent in each stage of SP-NGD's work since construction, in step order:
        ``statistics A``/``G``/``F`` (in the hooks, during backward), ``checks``
        (non-finite gradients), ``statistics and gradient communication``, ``refresh test``
        (distances of fresh statistics, the step's one read of all checks, interval
        bookkeeping), ``inversion``, ``preconditioning``, ``result communication`` and
        ``update`` (momentum SGD). This rank's figures, host time: on a GPU the read in
        ``refresh test`` also waits for the inversion and preconditioning issued before it.
        With one process the two communication stages only move statistics out of the
        hooks' buffers."""
        return self.times.snapshot()

    def _fold(self, owned: dict[str, CurvatureBlock], arrived: dict[str, Statistics]) -> _Measured:
        """Fold the arrived statistics into the owned blocks' factors, and start (on the
        device, unread) what the refresh test needs: every fresh statistic's norm (NaN or
        inf when any entry is), its relative change against the value it replaces, and its
        measured noise. :meth:`_settle` reads them, with the step's other checks."""
        keys = [
            (name, i)
            for name, stats in arrived.items()
            for i, stat in enumerate(stats)  # type: ignore[arg-type]
            if stat is not None
        ]
        compared = [(name, i) for name, i in keys if owned[name].factors[i] is not None]
        noisy = [(name, i) for name, i in keys if owned[name].fresh_noise[i] is not None]
        changes = relative_changes(
            [owned[name].factors[i] for name, i in compared],  # type: ignore[misc]
            [arrived[name][i] for name, i in compared],  # type: ignore[index, misc]
        )
        norms = torch._foreach_norm([arrived[name][i] for name, i in keys]) if keys else []  # type: ignore[index, misc]
        noises = [owned[name].fresh_noise[i] for name, i in noisy]
        for name, stats in arrived.items():
            owned[name].update_factors(stats, self.stat_decay)  # type: ignore[arg-type]
        return _Measured(keys, compared, noisy, [*norms, *changes, *noises])  # type: ignore[list-item]

    def _settle(self, pending: _Pending, nonfinite: torch.Tensor, loss_scaled: bool) -> bool:
        """Read the step's checks from the device at once, undo what they reject, and let
        the refresh policy observe the statistics; True when the step is skipped.

        In one read: whether any rank's gradients hold NaN or inf (``nonfinite``), the
        fresh statistics' norms, changes and noises, how many ranks contributed them,
        whether each new inverse is valid, and whether any preconditioned gradient is NaN
        or inf. With non-finite gradients the step is skipped: every block's factors and
        inverse are put back (its statistics are as suspect as its gradients) and the
        guard counts it, unless the step runs under a GradScaler (``loss_scaled``), whose
        overflows are skipped silently (the scaler lowers its scale). Statistics with NaN
        or inf (or from no rank) are dropped:
        the block's previous factors and inverse come back (with one warning). A new
        inverse that is not valid is replaced by the fallbacks of
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
            any_nonfinite(updates, self._device),
        ]
        values = iter(torch.stack([v.reshape(()).double() for v in read]).tolist())
        if next(values) > 0:
            for name, saved in pending.before_inversion.items():
                if name not in pending.arrived:
                    owned[name].restore(saved)
            for name, saved in pending.before_fold.items():
                owned[name].restore(saved)
            return True if loss_scaled else self.guard.skip(True)
        if not loss_scaled:
            self.guard.skip(False)
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
            damping = self._block_damping(name)
            if block.ready and block.inverse_damping != damping:
                block.update_inverse(damping)
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

        step = self._step
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

    def _inverse_due(self, name: str, block: CurvatureBlock, refreshed: bool) -> bool:
        """Whether an owned block's inverse is recomputed this step."""
        damping = self._block_damping(name)
        due = (
            block.inverse is None
            or block.inverse_damping != damping
            or self.refresh.inverse_due(self._step, refreshed=refreshed)
        )
        return block.ready and due

    def _precondition(
        self, owned: dict[str, CurvatureBlock], directions: dict[torch.Tensor, torch.Tensor]
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

    def _warn_if_no_statistics(self) -> None:
        computing = any(any(block.to_compute) for block in self.curvature.values())
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
                stacklevel=3,
            )

    def _set_to_compute(self) -> None:
        """Set every block's statistics for the coming step from the refresh policy."""
        for name, block in self.curvature.items():
            block.to_compute = self._to_compute(name, block, self._step)

    def _to_compute(self, name: str, block: CurvatureBlock, step: int) -> list[bool]:
        """Which of ``block``'s statistics the hooks compute at ``step``."""
        return [self.refresh.is_due((name, i), step) for i in range(len(block.statistic_names))]

    def refresh_counts(self) -> dict[str, dict[str, int]]:
        """Statistics and inverse computations done and skipped, per layer and in total.

        Under ``torch.distributed`` each layer is counted by its owner and the counts are
        collected from every rank: all ranks must call this together.
        """
        counts: dict[str, dict[str, int]] = {}
        for rank_counts in self._exchange.collect(self.refresh.counts):
            counts.update(rank_counts)
        return RefreshPolicy.summarize(counts)

    def _block_damping(self, name: str) -> float:
        group = self.param_groups[self._block_group[name]]
        return max(group["damping"], group["weight_decay"])

    def _weight_decayed(
        self, grads: dict[torch.Tensor, torch.Tensor]
    ) -> dict[torch.Tensor, torch.Tensor]:
        """``grad + weight_decay * p`` for every parameter with a gradient (new tensors where
        the decay is not 0, fused over each group)."""
        directions = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p in grads]
            decayed = [grads[p] for p in params]
            if params and group["weight_decay"] != 0.0:
                decayed = list(torch._foreach_add(decayed, params, alpha=group["weight_decay"]))
            directions.update(zip(params, decayed, strict=True))
        return directions

    def _apply_momentum(
        self, group: dict[str, Any], directions: dict[torch.Tensor, torch.Tensor]
    ) -> None:
        """Momentum SGD on the group's parameters that have a direction, fused over the
        group (``foreach`` kernels: a few launches instead of three per parameter)."""
        params = [p for p in group["params"] if p in directions]
        steps = [directions[p] for p in params]
        if not params:
            return
        if group["momentum"] != 0.0:
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            started = [i for i, buf in enumerate(buffers) if buf is not None]
            if started:
                running = [buffers[i] for i in started]
                torch._foreach_mul_(running, group["momentum"])
                torch._foreach_add_(running, [steps[i] for i in started])
            for i, buf in enumerate(buffers):
                if buf is None:
                    buffers[i] = self.state[params[i]]["momentum_buffer"] = steps[i].clone()
            steps = buffers  # type: ignore[assignment]
        torch._foreach_add_(params, steps, alpha=-group["lr"])

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus each block's factors and inverse, the refresh
        policy's state and the step counter.

        Curvature tensors are on the CPU, loaded back onto the parameters' device. Under
        ``torch.distributed`` the curvature of every layer is collected from its owner on
        the group's first rank, whose state dict resumes on any number of ranks (the
        others hold their own layers'); all ranks must call this together.
        """
        state = super().state_dict()
        local = {
            "curvature": {
                name: block.state_dict()
                for name, block in self.curvature.items()
                if self._exchange.owns(name)
            },
            "refresh": self.refresh.state_dict(),
        }
        curvature: dict[str, Any] = {}
        refresh: dict[str, Any] = {key: {} for key in ("interval", "next_step", "noise", "counts")}
        for rank_state in self._exchange.collect_on_first(local):
            curvature.update(rank_state["curvature"])
            for key in refresh:
                refresh[key].update(rank_state["refresh"][key])
        state["curvature"] = curvature
        state["refresh"] = refresh
        state["step"] = self._step
        state.update(self.guard.state_dict())
        if self._mc_generator is not None:
            state["mc_generator"] = self._mc_generator.get_state()
        return state

    def _check_momentum_shapes(self, state_dict: dict[str, Any]) -> None:
        """A ValueError when a saved momentum buffer does not have its parameter's shape
        (torch's own loading checks only the number of parameters)."""
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict.get("state", {}).items():
            buffer = saved.get("momentum_buffer")
            if buffer is not None and index < len(params) and buffer.shape != params[index].shape:
                raise ValueError(
                    f"the saved momentum of parameter {index} has shape {tuple(buffer.shape)}; "
                    f"the parameter's is {tuple(params[index].shape)}"
                )

    def _load_mc_generator(self, state: torch.Tensor) -> None:
        """Restore the MC sampling generator; a state saved from another device's kind of
        generator cannot be, so the labels are then drawn afresh (seeded from it)."""
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
                stacklevel=3,
            )
            generator.manual_seed(int(state.to(torch.int64).sum()))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state; a ValueError, with nothing changed, for one
        that is not an SPNGD state dict or does not fit this model."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or "state" not in state_dict:
            raise ValueError("not an optimizer state dict (no 'state' and 'param_groups')")
        missing = {key for group in groups for key in self.defaults if key not in group}
        if missing:
            raise ValueError(
                f"not an SPNGD state dict: its param groups lack {', '.join(sorted(missing))}"
            )
        state_dict = dict(state_dict)
        curvature = state_dict.pop("curvature", {})
        refresh = state_dict.pop("refresh", None)
        step = state_dict.pop("step", 0)
        mc_state = state_dict.pop("mc_generator", None)
        counters = {
            key: state_dict.pop(key) for key in self.guard.state_dict() if key in state_dict
        }
        unknown = set(curvature) - set(self.curvature)
        if unknown:
            raise ValueError(
                "state_dict has curvature for modules this optimizer does not "
                f"precondition: {sorted(unknown)}"
            )
        for name, block_state in curvature.items():
            self.curvature[name].check_state_dict(block_state)
        self._check_momentum_shapes(state_dict)
        super().load_state_dict(state_dict)  # checks its groups before changing anything
        self.guard.pop_state(counters)
        if mc_state is not None and self._mc_generator is not None:
            self._load_mc_generator(mc_state)
        for name, block_state in curvature.items():
            self.curvature[name].load_state_dict(block_state)
        if refresh is not None:
            self.refresh.load_state_dict(refresh)
        self._step = step
        self._set_to_compute()
