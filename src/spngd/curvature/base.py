"""Per-layer curvature state shared by every layer kind.

A block owns the statistics of one module: it accumulates them from the hooks
(:meth:`CurvatureBlock.accumulate`), folds them into the running factors at a step,
keeps the damped inverse in use, and preconditions the module's gradient. Subclasses
supply only the layer math: how statistics are computed, inverted and applied.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from spngd.linalg import FactorizationError
from spngd.timing import StageTimes

if TYPE_CHECKING:
    from spngd.curvature import BlockSettings


class CurvatureBlock(ABC):
    """Statistics, inverse and preconditioning of one module's parameters.

    A block has one or more statistics (``statistic_names``, e.g. ``A`` and ``G``).
    ``factors`` holds the running value of each (``None`` until first computed) and
    ``inverse_form`` a tuple of tensors that stand for the damped inverse (the inverse
    itself, Cholesky factors or eigenbases: the subclass's ``inverse_form_name`` says
    which). ``to_compute`` says which statistics the hooks compute at the current step (set
    by the refresh policy); a block without an inverse passes gradients through.
    """

    method: str = "curvature"
    """How the block preconditions, as :meth:`describe` names it (``"K-FAC Conv2d"``)."""
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    """The module classes this kind preconditions (:func:`spngd.curvature.make_block` looks
    a module up in each registered kind's)."""
    statistic_names: tuple[str, ...] = ()
    unbatched_dims: ClassVar[int | None] = None
    """The number of dimensions of an input the module takes without a batch dimension
    (``(C, H, W)`` for Conv2d: 3), recorded as a batch of one; None where none is taken."""
    halves_combine: bool = False
    """Whether a statistic of the whole batch is the example-weighted mean of those of its
    two halves (true for sums over examples; not for BatchNorm, whose ``x_hat`` uses the
    batch's own mean and variance)."""
    gradient_powers: tuple[int, ...] = ()
    """Per statistic, the power ``p`` with which it scales with the output gradient,
    ``X(c g) = c^p X(g)`` (``A`` 0, ``G`` and BatchNorm's ``F`` 2), set by each block kind:
    :meth:`statistic_and_noise` rescales each half's statistic by it rather than a copy of
    the half's gradient."""
    inverse_form_name: str = "inverse"
    """What ``inverse_form`` holds: ``inverse`` (the inverse itself), ``cholesky`` or
    ``eigen-kronecker`` (saved in checkpoints beside the form)."""

    @classmethod
    @abstractmethod
    def for_module(
        cls, name: str, module: nn.Module, settings: BlockSettings
    ) -> CurvatureBlock | None:
        """This kind's block for ``module`` (an instance of one of :attr:`module_types`),
        set up with the settings that concern the kind, or None where the kind cannot
        precondition this module."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.params: list[nn.Parameter] = [p for p in module.parameters(recurse=False)]
        self.factors: list[torch.Tensor | None] = [None] * len(self.statistic_names)
        self.to_compute: list[bool] = [True] * len(self.statistic_names)
        self.inverse_form: tuple[torch.Tensor, ...] | None = None
        self.inverse_damping: float | None = None
        self.inverse_uses = 0
        """Gradients preconditioned with the current ``inverse_form`` so far."""
        self.explicit_inverse: tuple[torch.Tensor, ...] | None = None
        """For subclasses whose ``inverse_form`` is not the inverse itself: the inverse
        formed from it for repeated use (dropped whenever ``inverse_form`` changes)."""
        self.statistics_examples: int | None = None
        """At most this many examples of each forward/backward pair (its first ones) feed
        the statistics; None: all (see :meth:`accumulate`)."""
        self.measure_noise = False
        """Measure each computed statistic's sampling noise (the adaptive refresh's noise
        rule reads it): see :meth:`statistic_and_noise`."""
        self.fresh_noise: list[torch.Tensor | None] = [None] * len(self.statistic_names)
        """Relative sampling noise of the statistics :meth:`take_pending` last returned, on
        this rank (None where not measured)."""
        self._pending: list[torch.Tensor | None] | None = None
        self.clear_pending()
        self._warned: set[str] = set()

    # -- layer math supplied by subclasses ------------------------------------------------
    @abstractmethod
    def compute_statistic(
        self,
        index: int,
        inputs: torch.Tensor,
        grad_output: torch.Tensor,
        context: object = None,
    ) -> torch.Tensor:
        """Statistic ``statistic_names[index]`` of one forward/backward pair, at
        per-example Fisher scale; ``context`` is :meth:`forward_context`'s for exactly these
        examples, or None."""

    def forward_context(self, output: object) -> object:
        """What the statistics can take from the forward pass besides the layer input, read
        when the layer has run (its ``output``): None here; BatchNorm takes the batch mean
        and inverse standard deviation its forward computed. It describes the whole batch,
        so a sample or half of the batch is computed without it."""
        return None

    @abstractmethod
    def statistic_shape(self, index: int) -> tuple[int, ...]:
        """Shape of statistic ``statistic_names[index]``."""

    statistic_symmetric: bool = False
    """Whether the statistics are symmetric matrices in their last two dimensions (then
    only their upper triangles need to travel)."""

    @abstractmethod
    def compute_inverse(self, damping: float) -> tuple[torch.Tensor, ...]:
        """Damped inverse of ``self.factors``; raises FactorizationError on failure."""

    @abstractmethod
    def apply_inverse(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Precondition the gradients of ``self.params`` with ``self.inverse_form``."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying how this module is preconditioned."""

    @property
    @abstractmethod
    def inversion_cost(self) -> int:
        """Estimated flops of inverting this block and preconditioning its gradient: what
        the distributed assignment balances over the ranks."""

    @staticmethod
    def batch_size(inputs: torch.Tensor) -> int:
        """Number of examples ``n`` in a layer input; dimension 0 is the batch."""
        return inputs.shape[0] if inputs.dim() > 1 else 1

    # -- statistics -----------------------------------------------------------------------
    def accumulate(
        self,
        inputs: torch.Tensor,
        grad_output: torch.Tensor,
        times: StageTimes,
        grad_factor: float | torch.Tensor = 1.0,
        context: object = None,
    ) -> None:
        """Add the ``to_compute`` statistics of one forward/backward pair (called from the
        hooks), each timed as stage ``statistics <name>``; with ``measure_noise``, also
        their sampling noise (:meth:`statistic_and_noise`). ``grad_factor`` turns the
        output gradient into that of the unscaled mean loss (see
        :class:`spngd.capture.StatisticsCapture`); ``context`` is the pair's
        :meth:`forward_context`."""
        if inputs.dim() > 1 and inputs.shape[0] == 0:
            return  # an empty batch tells nothing about the curvature
        if inputs.dim() == self.unbatched_dims:
            inputs, grad_output = inputs.unsqueeze(0), grad_output.unsqueeze(0)
        examples = self.batch_size(inputs)
        inputs, grad_output = self.subsample(inputs, grad_output, grad_factor)
        stats: list[torch.Tensor | None] = []
        noises: list[torch.Tensor | None] = []
        # A backward inside autocast would run the products below in half precision.
        with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
            for index, name in enumerate(self.statistic_names):
                stat = noise = None
                if self.to_compute[index]:
                    with times.measure(f"statistics {name}"):
                        x, g = self.statistic_sample(index, inputs, grad_output)
                        whole = context if self.batch_size(x) == examples else None
                        if self.measure_noise and self.batch_size(x) >= 2:
                            stat, noise = self.statistic_and_noise(index, x, g, whole)
                        else:
                            stat = self.compute_statistic(index, x, g, whole)
                stats.append(stat)
                noises.append(noise)
        if self._pending is None:
            self._pending, self._pending_noise = stats, noises
        else:
            for total, new in zip(self._pending, stats, strict=True):
                if total is not None and new is not None:
                    total.add_(new)
            self._pending_noise = [
                None if total is None or new is None else total + new
                for total, new in zip(self._pending_noise, noises, strict=True)
            ]
        self._pending_count += 1

    def subsample(
        self, inputs: torch.Tensor, grad_output: torch.Tensor, grad_factor: float | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``statistics_examples`` examples of a pair, output gradients in the
        statistics dtype, multiplied by ``grad_factor`` and rescaled so that each example's
        gradient is still the whole batch's ``n * grad_output``: the statistics, means over
        examples, estimate the same expectations at a fraction of the cost (a BatchNorm
        block normalises the sample by the sample's own mean and variance). The first
        examples of a shuffled batch are a random sample of it. Only the sample is copied.
        """
        n = self.batch_size(inputs)
        limit = self.statistics_examples
        sampled = limit is not None and n > limit
        if sampled:
            inputs, grad_output = inputs[:limit], grad_output[:limit]
        # Promoted before the products, so that a half-precision gradient's small values
        # survive the rescaling. Unscaled first and rescaled for the sample second: a
        # micro-batch's gradient, scaled down by the accumulation, then meets the sample's
        # factor as the same gradient unscaled (a rank's own, under DDP) does, bit for bit
        # where the accumulation is a power of two.
        grad_output = grad_output.to(statistics_dtype(grad_output))
        if not (isinstance(grad_factor, float) and grad_factor == 1.0):
            grad_output = grad_output * grad_factor
        if sampled:
            grad_output = grad_output * (n / limit)
        return inputs, grad_output

    def statistic_examples(self, index: int, grad_output: torch.Tensor) -> int | None:
        """At most this many examples of a pair (``grad_output``, its output gradient) feed
        statistic ``index`` (None: all): ``statistics_examples`` here; a kind whose
        statistic tolerates a smaller sample lowers it for that statistic."""
        return self.statistics_examples

    def statistic_sample(
        self, index: int, inputs: torch.Tensor, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first :meth:`statistic_examples` of a pair :meth:`subsample` prepared, output
        gradients rescaled again so that each example's is still the whole batch's (only
        where statistic ``index`` depends on their scale, :attr:`gradient_powers`)."""
        limit = self.statistic_examples(index, grad_output)
        n = self.batch_size(inputs)
        if limit is None or n <= limit:
            return inputs, grad_output
        grad_output = grad_output[:limit]
        if self.gradient_powers[index]:
            grad_output = grad_output * (n / limit)
        return inputs[:limit], grad_output

    def statistic_and_noise(
        self,
        index: int,
        inputs: torch.Tensor,
        grad_output: torch.Tensor,
        context: object = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistic ``index`` and its sampling noise, from the two halves of the batch.

        Each half gives its own estimate ``X_1``, ``X_2`` (rescaled by :attr:`gradient_powers`
        as if each example's gradient were still the whole batch's ``n * grad_output``). Their
        difference holds no drift, only noise: two independent whole-batch estimates are
        expected to differ by ``E ||X - X'||^2 = ||X_1 - X_2||^2 / 2`` (equal halves), and
        the noise is returned relative to ``||X||^2``, comparable with the squared relative
        change the refresh rule measures. Blocks whose statistics are sums over examples
        (``halves_combine``) get ``X`` from the halves at no extra cost; the others compute
        it from the whole batch as usual.
        """
        n = self.batch_size(inputs)
        half = n // 2
        power = self.gradient_powers[index]
        first, second = self.statistic_halves(index, inputs, grad_output)
        if power:
            first.mul_((n / half) ** power)
            second.mul_((n / (n - half)) ** power)
        if self.halves_combine:
            stat = first.mul(half / n).add_(second, alpha=(n - half) / n)
        else:
            stat = self.compute_statistic(index, inputs, grad_output, context)
        noise = (first - second).square().sum() / (2.0 * stat.square().sum().clamp(min=1e-30))
        return stat, noise

    def statistic_halves(
        self, index: int, inputs: torch.Tensor, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`compute_statistic` of the first ``n // 2`` examples and of the rest, as two
        tensors that do not overlap (the caller scales them in place); a kind with a form
        that computes both at once overrides it."""
        half = self.batch_size(inputs) // 2
        first = self.compute_statistic(index, inputs[:half], grad_output[:half])
        second = self.compute_statistic(index, inputs[half:], grad_output[half:])
        return first, second

    def clear_pending(self) -> None:
        """Forget statistics accumulated since the last step."""
        self._pending = None
        self._pending_noise: list[torch.Tensor | None] = [None] * len(self.statistic_names)
        self._pending_count = 0

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    @property
    def ready(self) -> bool:
        """Every statistic has a value, so an inverse can be computed."""
        return all(f is not None for f in self.factors)

    def take_pending(self) -> tuple[torch.Tensor | None, ...] | None:
        """Mean of the statistics accumulated since the last step, and reset the buffer.

        Several pairs (gradient accumulation over micro-batches, or a module called more
        than once) are averaged, as if each were a separate micro-batch. Finiteness is
        checked by the optimizer for all blocks at once, with the step's other checks.
        """
        if self._pending is None:
            self.fresh_noise = [None] * len(self.statistic_names)
            return None
        count = self._pending_count
        mean = tuple(None if t is None else (t if count == 1 else t / count) for t in self._pending)
        # The mean of ``count`` independent estimates has 1/count of their (mean) noise.
        self.fresh_noise = [None if t is None else t / (count * count) for t in self._pending_noise]
        self.clear_pending()
        return mean

    def warn_nonfinite_statistics(self) -> None:
        """Warn (once) that this block's fresh statistics held NaN or inf and were dropped:
        the previous factors and inverse stay in use."""
        self.warn_once(
            "nonfinite-stats",
            f"statistics of {self.name!r} contain NaN or inf; they are dropped and the "
            "previous inverse stays in use (plain gradient if there is none)",
        )

    def update_factors(
        self, fresh: tuple[torch.Tensor | None, ...], weights: tuple[float, ...]
    ) -> None:
        """Fold fresh statistics into the factors in use (``None`` entries are kept):
        ``factor <- (1 - w) * factor + w * fresh`` with each statistic's weight ``w`` (the
        running average's ``1 - stat_decay``, or the refresh's pooling weight); a first
        value is taken as it is (no identity initialisation, so no bias).
        """
        for i, (new, weight) in enumerate(zip(fresh, weights, strict=True)):
            if new is None:
                continue
            old = self.factors[i]
            if old is None or weight == 1.0:
                self.factors[i] = new
            else:
                self.factors[i] = old.mul(1.0 - weight).add_(new, alpha=weight)

    # -- inverse and preconditioning ------------------------------------------------------
    def update_inverse(self, damping: float) -> None:
        """Recompute the inverse from the current factors; keep the old one on failure."""
        if not self.ready:
            return
        try:
            inverse = self.compute_inverse(damping)
        except FactorizationError as error:
            self.warn_once(
                "inverse",
                f"could not invert the curvature of {self.name!r} ({error}); keeping the "
                "previous inverse (plain gradient if there is none)",
            )
            return
        self.set_inverse(inverse, damping)

    def propose_inverse(self, damping: float) -> torch.Tensor | None:
        """Put a new inverse in use without reading the device: returns a 0-dim bool tensor
        saying whether it is valid, for the caller to read with the step's other checks
        (and, where it is not, :meth:`restore` the state saved before and
        :meth:`update_inverse`). Blocks without such a form check at once (None)."""
        self.update_inverse(damping)
        return None

    restorable: tuple[str, ...] = (
        "factors",
        "inverse_form",
        "inverse_damping",
        "inverse_uses",
        "explicit_inverse",
    )
    """The attributes :meth:`save` and :meth:`restore` cover."""

    def save(self) -> dict[str, object]:
        """The factors and inverse in use, to :meth:`restore` if what replaces them turns
        out not to be finite (references: nothing is copied but the lists)."""
        return {
            name: list(value) if isinstance(value := getattr(self, name), list) else value
            for name in self.restorable
        }

    def restore(self, saved: dict[str, object]) -> None:
        for name, value in saved.items():
            setattr(self, name, list(value) if isinstance(value, list) else value)

    def set_inverse(self, inverse: tuple[torch.Tensor, ...], damping: float) -> None:
        """Put a freshly computed inverse (for ``damping``) in use."""
        self.inverse_form = inverse
        self.inverse_damping = damping
        self.inverse_uses = 0
        self.explicit_inverse = None

    def precondition(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preconditioned gradients, or ``grads`` unchanged when there is no inverse yet.

        The result is not checked here (that would read the device once per block); the
        optimizer checks all blocks' results at once and calls :meth:`plain_if_not_finite`
        only when something is wrong.
        """
        if self.inverse_form is None:
            return grads
        updates = self.apply_inverse(grads)
        self.inverse_uses += 1
        return updates

    def plain_if_not_finite(
        self, grads: list[torch.Tensor], updates: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``grads`` (with one warning) when ``updates`` hold NaN or inf although ``grads``
        do not; else ``updates``."""
        if all(bool(torch.isfinite(u).all()) for u in updates):
            return updates
        if all(bool(torch.isfinite(g).all()) for g in grads):
            self.warn_once(
                "nonfinite-update",
                f"preconditioned gradient of {self.name!r} is not finite; using the plain "
                "gradient for it",
            )
            return grads
        return updates

    def warn_once(self, key: str, message: str) -> None:
        """Emit ``message`` as a RuntimeWarning the first time ``key`` occurs for this block."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"SPNGD: {message}", RuntimeWarning, stacklevel=4)

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Factors and inverse on the CPU (:meth:`load_state_dict` puts them back on the
        parameters' device), so that a checkpoint loads on any device."""
        cpu = torch.device("cpu")
        return {
            "factors": _to_device(self.factors, cpu),
            "inverse_form": _to_device(self.inverse_form, cpu),
            "inverse_form_name": self.inverse_form_name,
            "inverse_damping": self.inverse_damping,
            "inverse_uses": self.inverse_uses,
        }

    def check_state_dict(self, state: dict[str, object]) -> None:
        """A ValueError when a saved statistic does not have this block's shape (a model
        with the same layer names but other sizes)."""
        for index, factor in enumerate(state["factors"]):  # type: ignore[arg-type]
            expected = self.statistic_shape(index)
            if factor is not None and tuple(factor.shape) != expected:
                raise ValueError(
                    f"the saved {self.statistic_names[index]} of {self.name!r} has shape "
                    f"{tuple(factor.shape)}; this layer's is {expected}"
                )

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s values (checked by :meth:`check_state_dict`) onto
        the parameters' device."""
        device = self.params[0].device
        self.factors = list(_to_device(state["factors"], device))  # type: ignore[call-overload]
        self.inverse_damping = state["inverse_damping"]  # type: ignore[assignment]
        self.inverse_uses = state.get("inverse_uses", 0)  # type: ignore[assignment]
        self.explicit_inverse = None
        # A form this block does not keep (or one saved without its name) is not read: the
        # inverse is recomputed from the saved factors when next due.
        same_form = state.get("inverse_form_name") == self.inverse_form_name
        self.inverse_form = _to_device(state["inverse_form"], device) if same_form else None  # type: ignore[assignment]


def _to_device(tensors: object, device: torch.device) -> object:
    """Move a tensor, or a list/tuple of optional tensors, to ``device``."""
    if tensors is None:
        return None
    if isinstance(tensors, torch.Tensor):
        return tensors.to(device)
    return type(tensors)(_to_device(t, device) for t in tensors)  # type: ignore[call-arg]


def statistics_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Statistics are accumulated in at least float32, even for half-precision activations."""
    return torch.promote_types(tensor.dtype, torch.float32)
