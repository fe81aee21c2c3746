"""``SPNGD``: the natural-gradient optimizer (K-FAC + unit-wise BatchNorm Fisher).

A thin ``torch.optim.Optimizer`` over a :class:`~spngd.preconditioner.Preconditioner`, which
owns the curvature blocks, their hooks, the refresh policy and the exchange between ranks.
Each step: add weight decay to the gradients, let the preconditioner replace every
supported layer's direction by its natural gradient, then apply momentum SGD (PyTorch
convention, which equals the authors' Chainer update; see docs/optimizer.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from spngd import amp
from spngd.curvature import SUPPORTED_LAYERS, BlockSettings, CurvatureBlock
from spngd.curvature.kronecker import DAMPING_FORMS
from spngd.distributed.exchange import DistributedConfig
from spngd.guard import GUARD_RULES, GuardedSteps, NonFiniteGuard
from spngd.preconditioner import FISHER_TYPES, Preconditioner, find_blocks
from spngd.refresh import INTERVAL_RULES, AdaptiveRefresh, RefreshPolicy, check_intervals
from spngd.settings import InvalidSettingError, Rule, check, int_rule, optional_int_rule

SETTING_RULES: dict[str, Rule] = {
    "lr": (lambda v: 0.0 <= v < math.inf, "finite and >= 0"),
    "momentum": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "damping": (lambda v: 0.0 < v < math.inf, "finite and > 0"),
    "weight_decay": (lambda v: 0.0 <= v < math.inf, "finite and >= 0"),
    "stat_decay": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "fisher": (lambda v: v in FISHER_TYPES, f"one of {', '.join(FISHER_TYPES)}"),
    "damping_form": (lambda v: v in DAMPING_FORMS, f"one of {', '.join(DAMPING_FORMS)}"),
    "bn_damping_scale": (lambda v: 0.0 < v < math.inf, "finite and > 0"),
    "accumulation_steps": int_rule(1),
    "statistics_examples": optional_int_rule(2),
    "a_examples": optional_int_rule(2),
    "a_patches": optional_int_rule(1),
    **INTERVAL_RULES,
    **GUARD_RULES,
}
"""The rule of each of SPNGD's scalar settings (a param group's ``lr``, ``momentum``,
``damping`` and ``weight_decay`` included; the intervals' and ``max_bad_steps``'s are
their owners', checked when the refresh policy and the guard are built)."""


GROUP_SETTINGS = ("lr", "momentum", "damping", "weight_decay")
"""The settings a param group may hold."""


def check_settings(**values: Any) -> None:
    """An :class:`~spngd.settings.InvalidSettingError` for the first value SPNGD would
    refuse (keyword names as :class:`SPNGD` takes them)."""
    check("SPNGD", values, SETTING_RULES)
    if "inverse_interval" in values:
        check_intervals(values.get("stat_interval"), values["inverse_interval"])


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
            ``X = stat_decay X_old + (1 - stat_decay) X_new``. The default 0 takes no
            running average, as the paper's ImageNet configs do: a refreshed statistic is
            the current batch's, or, while the adaptive refresh finds its changes small,
            the mean of its estimates since (``AdaptiveRefresh.pool``).
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
        statistics_examples: take each micro-batch's curvature statistics from at most its
            first this many examples (``None``: all), which should then be in random
            order. The statistics are means over examples, so a random subset estimates
            the same factors at a fraction of the cost, which otherwise grows with the
            batch while the preconditioning does not. Each micro-batch (and each rank)
            contributes its own sample, so with accumulation or several ranks the
            statistics average more examples than one batch of the same size would take.
            The default 1,024 leaves per-GPU batches of the paper's size untouched and
            took the same steps to the target at 8 and 16 times that batch in 0.8x the
            time (docs/performance.md, which also shows where fewer examples cost steps).
        a_examples: take the Kronecker factor ``A`` of Linear and Conv layers (the second
            moment of the layer input) from at most this many of those examples (``None``:
            as many as the other statistics). ``A`` averages over examples and a
            convolution's output locations and does not depend on the loss, so a small
            sample estimates it closely, while it is a convolution's costliest statistic
            (``(C_in k^2)^2`` per location and example). The default 256 leaves the
            paper's per-GPU batches untouched and took no more steps to the target at
            batch 1,024 (docs/performance.md).
        a_patches: take a convolution's ``A`` from the fewest first examples that hold
            this many patches (examples times output locations), ``max(2, ceil(a_patches /
            locations))`` of the examples ``a_examples`` allows (``None``, the default: all
            of them). On large maps each example holds hundreds of patches, so a few
            examples estimate ``A`` closely where its cost grows with every one. Off by
            default: on the digits resized to 32x32 the cheaper steps did not add up to
            less time to the target (docs/performance.md).
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
            and averaged over the micro-batches, so K steps of batch B equal one of
            B*K (with ``statistics_examples`` and ``a_examples`` at least B, ``a_patches`` at
            least B times a convolution's output locations, or None).
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
        statistics_examples: int | None = 1024,
        a_examples: int | None = 256,
        a_patches: int | None = None,
        refresh: AdaptiveRefresh | None = None,
        accumulation_steps: int = 1,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_bad_steps: int = 10,
        distributed: DistributedConfig | None = None,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SPNGD needs the model (an nn.Module) first, got {type(model)}")
        check_settings(
            stat_decay=stat_decay,
            fisher=fisher,
            damping_form=damping_form,
            bn_damping_scale=bn_damping_scale,
            accumulation_steps=accumulation_steps,
            statistics_examples=statistics_examples,
            a_examples=a_examples,
            a_patches=a_patches,
        )
        if refresh is not None and not isinstance(refresh, AdaptiveRefresh):
            raise TypeError(f"refresh must be an AdaptiveRefresh, got {type(refresh).__name__}")
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
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        blocks, self._plain = find_blocks(
            model,
            set(group_of),
            BlockSettings(bn_damping_scale, damping_form, a_examples, a_patches),
        )
        self._block_group = {
            name: self._group_of_block(block, group_of) for name, block in blocks.items()
        }
        if not blocks:
            warnings.warn(
                f"SPNGD: the model has no trainable layer of a kind it preconditions "
                f"({SUPPORTED_LAYERS}); every parameter gets plain momentum SGD",
                UserWarning,
                stacklevel=2,
            )
        self.guard = NonFiniteGuard(
            "SPNGD", max_bad_steps, advice="Lower the learning rate or raise the damping"
        )
        self.preconditioner = Preconditioner(
            blocks,
            [p for g in self.param_groups for p in g["params"]],
            next(iter(self.param_groups[0]["params"])).device,
            stat_decay=stat_decay,
            fisher=fisher,
            refresh=RefreshPolicy(stat_interval, inverse_interval, refresh or AdaptiveRefresh()),
            accumulation_steps=accumulation_steps,
            statistics_examples=statistics_examples,
            grad_scaler=grad_scaler,
            distributed=distributed,
            average_gradients=not wrapped,
        )

    # -- construction ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Torch's, while SPNGD is built; refused afterwards: each layer's curvature block,
        hooks and (with several ranks) owner are set up at construction, so parameters
        added later would get plain SGD, unaveraged over the ranks of an unwrapped model."""
        if "preconditioner" in self.__dict__:
            raise ValueError(
                "SPNGD sets up each layer's curvature when it is built and cannot take "
                "param groups afterwards; build a new SPNGD with every group in params "
                "(a group can hold lr=0 until it should train)"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_settings(**{key: group[key] for key in GROUP_SETTINGS})
        except InvalidSettingError:
            self.param_groups.pop()
            raise

    def _group_of_block(self, block: CurvatureBlock, group_of: dict[int, int]) -> int:
        """The param group whose damping and weight decay a block uses (a ValueError when
        its parameters are in groups that disagree on them)."""
        groups = {group_of[id(p)] for p in block.params}
        settings = {
            (self.param_groups[i]["damping"], self.param_groups[i]["weight_decay"]) for i in groups
        }
        if len(settings) > 1:
            raise ValueError(
                f"the parameters of {block.name!r} are in param groups with different "
                "damping or weight_decay; one layer is preconditioned as one block"
            )
        return min(groups)

    @property
    def curvature(self) -> dict[str, CurvatureBlock]:
        """The curvature block of each preconditioned module, by module name."""
        return self.preconditioner.blocks

    @property
    def refresh(self) -> RefreshPolicy:
        """When statistics and inverses are computed (SP-NGD's adaptive rule by default)."""
        return self.preconditioner.refresh

    def describe(self) -> dict[str, str]:
        """How each module with optimized parameters is preconditioned, by module name."""
        lines = {name: block.describe() for name, block in self.curvature.items()}
        lines.update(self._plain)
        return lines

    def remove_hooks(self) -> None:
        """Take the statistics hooks off the model (the optimizer then acts as momentum SGD)."""
        self.preconditioner.remove_hooks()

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
        return self.preconditioner.sample_fisher(logits)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and the statistics recorded since the last step, together."""
        super().zero_grad(set_to_none=set_to_none)
        self.preconditioner.drop_recorded()

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update: reduce to owners, refresh and precondition owned layers, gather,
        apply momentum SGD (single process: the same stages with nothing to move).

        Each stage is timed (:meth:`stage_seconds`). Nothing waits for the device until
        all the step's work up to the update is issued: then one read gives every check at
        once (gradients, statistics and updates finite, the refresh test's distances,
        inverses valid), and, with several ranks, a second gives the headers the owners
        sent with their results. That is whatever the number of layers, and nothing is
        read during backward.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pre = self.preconditioner
        # Set by GradScaler.step for this call: the loss scale the gradients still carry.
        loss_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        loss_scaled = hasattr(self, "found_inf")
        if loss_scaled and not pre.unscales_statistics:
            raise RuntimeError(
                "SPNGD was stepped by a GradScaler it was not given: build it with "
                "SPNGD(..., grad_scaler=scaler), so that its curvature statistics are "
                "unscaled like the gradients"
            )
        grads = {
            p: p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        }
        if any(g.is_sparse for g in grads.values()):
            raise RuntimeError("SPNGD does not support sparse gradients")
        nonfinite = pre.check_gradients(list(grads.values()))
        if loss_scale is not None:
            torch._foreach_mul_(list(grads.values()), amp.reciprocal(loss_scale))
        reduced = pre.reduce(grads)
        dampings = {name: self._block_damping(name) for name in self._block_group}
        directions = pre.precondition(
            reduced, self._weight_decayed(reduced.grads), dampings, nonfinite, loss_scaled
        )
        if not loss_scaled:
            self.guard.skip(directions is None)
        if directions is None:
            return loss
        with pre.times.measure("update"):
            for group in self.param_groups:
                self._apply_momentum(group, directions)
        return loss

    @property
    def steps_taken(self) -> int:
        """Steps applied so far (skipped ones not counted); also ``state_dict()["step"]``."""
        return self.preconditioner.steps_taken

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
        return self.preconditioner.times.snapshot()

    def refresh_counts(self) -> dict[str, dict[str, int]]:
        """Statistics and inverse computations done and skipped, per layer and in total.

        Under ``torch.distributed`` each layer is counted by its owner and the counts are
        collected from every rank: all ranks must call this together.
        """
        return self.preconditioner.refresh_counts()

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
        state.update(self.preconditioner.state_dict())
        state.update(self.guard.state_dict())
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
        for group in groups:  # the rules a new group obeys, before anything changes
            check_settings(**{key: group[key] for key in GROUP_SETTINGS})
        state_dict = dict(state_dict)
        curvature_state = {
            key: state_dict.pop(key) for key in Preconditioner.STATE_KEYS if key in state_dict
        }
        counters = {
            key: state_dict.pop(key) for key in self.guard.state_dict() if key in state_dict
        }
        self.preconditioner.check_state_dict(curvature_state)
        self._check_momentum_shapes(state_dict)
        super().load_state_dict(state_dict)  # checks its groups before changing anything
        self.guard.pop_state(counters)
        self.preconditioner.load_state_dict(curvature_state)
