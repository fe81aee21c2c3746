"""Unit-wise natural gradient for BatchNorm.

Each channel ``c`` gets a 2x2 Fisher over ``(gamma_c, beta_c)`` built from per-example
gradients ``u_{i,c} = sum_t delta x_hat`` and ``v_{i,c} = sum_t delta`` with
``delta = n * grad_output``; cross-channel terms are dropped. ``x_hat`` is recomputed
from the layer *input* with the batch's own statistics (the mean and inverse standard
deviation the forward computed where it can read them, see
:meth:`BatchNormBlock.forward_context`; the sample's, when the statistics come from a
sample of the batch), so modifying the BN
output in place afterwards (``out += shortcut``) cannot corrupt it, and ``gamma = 0``
is harmless. The damping is ``bn_damping_scale * lam`` (default 16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from spngd.curvature.base import CurvatureBlock, statistics_dtype
from spngd.linalg import FactorizationError, unit_wise_inverse

if TYPE_CHECKING:
    from spngd.curvature import BlockSettings


class BatchNormBlock(CurvatureBlock):
    method = "unit-wise BatchNorm"
    module_types = (nn.modules.batchnorm._BatchNorm,)
    statistic_names = ("F",)
    gradient_powers = (2,)

    @classmethod
    def for_module(
        cls, name: str, module: nn.Module, settings: BlockSettings
    ) -> BatchNormBlock | None:
        """The block of an affine BatchNorm (one without ``gamma`` and ``beta`` has no
        parameters to precondition)."""
        if not module.affine:  # type: ignore[union-attr]
            return None
        return cls(name, module, settings.bn_damping_scale)  # type: ignore[arg-type]

    def __init__(
        self, name: str, module: nn.modules.batchnorm._BatchNorm, damping_scale: float
    ) -> None:
        super().__init__(name, module)
        self.eps = module.eps
        self.channels = module.num_features
        self.damping_scale = damping_scale

    @property
    def F(self) -> torch.Tensor | None:
        """``(C, 3)`` running Fisher entries ``(f_gg, f_gb, f_bb)`` per channel."""
        return self.factors[0]

    def statistic_shape(self, index: int) -> tuple[int, ...]:
        return (self.channels, 3)

    def forward_context(self, output: object) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch mean and inverse standard deviation per channel that the forward pass
        computed (autograd keeps them for the backward), so that ``x_hat`` is not computed
        again: that takes several passes over the input where the sums need one (1.7-3.2x
        the time per layer at ResNet-20's shapes, ``benchmarks/statistics_forms.py``).

        None, and they are computed from the input, where the forward was not PyTorch's own
        BatchNorm kernel in training mode (cuDNN's on GPUs, SyncBatchNorm, a compiled
        graph), where they are below float32 (a half-precision model's), and while
        saved-tensor hooks are active: reading them would run the hooks' unpacking, which
        for non-reentrant activation checkpointing recomputes the checkpointed forward (and
        updates BatchNorm's running averages again)."""
        node = getattr(output, "grad_fn", None)
        if node is None or node.name() != "NativeBatchNormBackward0":
            return None
        if not getattr(node, "_saved_training", False) or _saved_tensor_hooks_active():
            return None
        mean, invstd = node._saved_result1, node._saved_result2
        if statistics_dtype(mean) != mean.dtype:
            return None
        return mean, invstd

    def compute_statistic(
        self,
        index: int,
        inputs: torch.Tensor,
        grad_output: torch.Tensor,
        context: object = None,
    ) -> torch.Tensor:
        n = inputs.shape[0]
        return self._per_example(inputs, grad_output, context).mean(0).mul_(n * n)

    def statistic_and_noise(
        self,
        index: int,
        inputs: torch.Tensor,
        grad_output: torch.Tensor,
        context: object = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Fisher and its sampling noise at the cost of the Fisher alone: the halves'
        estimates are means of the same per-example terms (``x_hat`` normalised with all
        the examples given, not per half), so nothing is computed twice."""
        n = inputs.shape[0]
        terms = self._per_example(inputs, grad_output, context)
        fisher = terms.mean(0)
        half = n // 2
        difference = terms[:half].mean(0) - terms[half:].mean(0)
        noise = difference.square().sum() / (2.0 * fisher.square().sum().clamp(min=1e-30))
        return fisher.mul_(n * n), noise

    def _per_example(
        self, inputs: torch.Tensor, grad_output: torch.Tensor, context: object = None
    ) -> torch.Tensor:
        """``(n, C, 3)``: ``(u^2, u v, v^2) / n^2`` per example and channel, whose mean over
        the batch times ``n^2`` is the Fisher (``delta = n * grad_output``); ``context``:
        :meth:`forward_context`'s mean and inverse standard deviation, or None."""
        dtype = statistics_dtype(inputs)
        n, channels = inputs.shape[:2]
        x = inputs.to(dtype).reshape(n, channels, -1).contiguous()
        delta = grad_output.to(dtype).reshape(n, channels, -1).contiguous()
        batch = None
        if isinstance(context, tuple):
            batch = (context[0].to(dtype), context[1].to(dtype))
        u, v = per_example_moments(x, delta, self.eps, batch)
        return torch.stack((u * u, u * v, v * v), dim=2)

    def compute_inverse(self, damping: float) -> tuple[torch.Tensor, ...]:
        inverse, valid = unit_wise_inverse(self.factors[0], self.damping_scale * damping)  # type: ignore[arg-type]
        if not bool(valid):
            raise FactorizationError("2x2 BatchNorm block is singular or not finite")
        return (inverse,)

    def propose_inverse(self, damping: float) -> torch.Tensor | None:
        """The closed-form inverse put in use at once; its validity is returned unread."""
        inverse, valid = unit_wise_inverse(self.factors[0], self.damping_scale * damping)  # type: ignore[arg-type]
        self.set_inverse((inverse,), damping)
        return valid

    def apply_inverse(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        (inverse,) = self.inverse_form  # type: ignore[misc]
        g_gamma, g_beta = (g.to(inverse.dtype) for g in grads)
        d_gamma = inverse[:, 0] * g_gamma + inverse[:, 1] * g_beta
        d_beta = inverse[:, 1] * g_gamma + inverse[:, 2] * g_beta
        return [d_gamma.to(grads[0].dtype), d_beta.to(grads[1].dtype)]

    COST_PER_CHANNEL = 10
    """Closed-form 2x2 inverses and a few multiply-adds per channel: negligible next to
    any Cholesky factorisation."""

    @property
    def inversion_cost(self) -> int:
        return self.COST_PER_CHANNEL * self.channels

    def describe(self) -> str:
        fisher = f"{self.channels} channels x 2x2 Fisher (damping x{self.damping_scale:g})"
        return f"{self.method}: {fisher}"


def _saved_tensor_hooks_active() -> bool:
    """Whether ``torch.autograd.graph.saved_tensors_hooks`` (activation checkpointing,
    ``save_on_cpu``) apply to what autograd saves now; True where torch cannot say."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


KERNEL_MIN_LOCATIONS = 16
"""Locations per example and channel from which :func:`per_example_moments` uses the
BatchNorm backward kernel for its sums."""


def per_example_moments(
    x: torch.Tensor,
    delta: torch.Tensor,
    eps: float,
    mean_invstd: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``u_{i,c} = sum_t delta x_hat`` and ``v_{i,c} = sum_t delta`` of ``(n, C, T)`` tensors.

    ``x_hat`` uses the batch mean and biased variance per channel: ``mean_invstd``, the
    mean and ``1 / sqrt(variance + eps)`` of ``x``, when the caller has them (the forward
    pass computed them, see :meth:`BatchNormBlock.forward_context`), else computed here.
    The form is :func:`moment_form`'s.
    """
    if moment_form(x.shape[2]) == "BatchNorm backward kernel":
        return moments_by_kernel(x, delta, eps, mean_invstd)
    return moments_by_dot_products(x, delta, eps, mean_invstd)


def moment_form(locations: int) -> str:
    """Which exact form :func:`per_example_moments` uses for ``locations`` per pair.

    Both centre ``x`` (two passes over it without the batch's mean and 1/std, so nothing
    cancels even far from zero mean; given them, the kernel centres each element as it
    sums), then take per-(example, channel) sums. With the forward's mean and 1/std
    (``benchmarks/statistics_forms.py``, 2 threads) the kernel took 0.42 ms at
    ``(128, 16, 32, 32)`` and 0.19 at ``(1024, 16, 8, 8)``, the dot products 0.92 and 0.31;
    at ``(1024, 64, 2, 2)`` the dot products 0.60 and the kernel 1.45.

    * ``"BatchNorm backward kernel"``: PyTorch's BatchNorm backward kernel on the
      ``(1, n C, T)`` view, where every pair is a channel of its own: one call gives
      ``sum_t delta`` and ``sum_t delta x_hat`` together in a single pass with double
      accumulators (without the batch's mean and 1/std, a first call gives the centred
      sums of squares). Measured on 2 threads against the dot products, both without the
      forward's statistics: 0.49 against 0.62 ms at ``(128, 16, 32, 32)``, 11.4 against
      16.4 at ``(32, 256, 56, 56)``, 0.34 against 0.38 at ``(1024, 32, 4, 4)``.
    * ``"centred dot products"``: one ``torch.linalg.vecdot`` or sum per quantity, below
      ``KERNEL_MIN_LOCATIONS``, where the kernel's per-channel overhead dominates
      (``(1024, 64, 2, 2)``, without the forward's statistics: 2.4 against 0.60 ms).

    Not used: ``torch.var_mean`` for the statistics of ``x`` (5.0 and 67 ms at the first
    two shapes), per-pair dot products by ``torch.bmm`` (as fast as the kernel on large
    maps, up to twice as slow on 7x7 to 14x14), and fused one-pass sums of ``x``, ``x^2``
    and ``delta x`` with a mean correction (0.48 and 13.4 ms), whose error grows with
    ``(mean / std)^2``.
    """
    if locations >= KERNEL_MIN_LOCATIONS:
        return "BatchNorm backward kernel"
    return "centred dot products"


def moments_by_dot_products(
    x: torch.Tensor,
    delta: torch.Tensor,
    eps: float,
    mean_invstd: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_example_moments` by one dot product or sum per quantity (the
    ``"centred dot products"`` form of :func:`moment_form`)."""
    if mean_invstd is None:
        centred = x - x.mean(dim=(0, 2))[:, None]
        variance = torch.linalg.vecdot(centred, centred, dim=2).mean(0) / x.shape[2]
        invstd = torch.rsqrt(variance + eps)
    else:
        mean, invstd = mean_invstd
        centred = x - mean[:, None]
    return torch.linalg.vecdot(delta, centred, dim=2) * invstd, delta.sum(2)


def moments_by_kernel(
    x: torch.Tensor,
    delta: torch.Tensor,
    eps: float,
    mean_invstd: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_example_moments` by PyTorch's BatchNorm backward kernel on the
    ``(1, n C, T)`` view (the ``"BatchNorm backward kernel"`` form of :func:`moment_form`).
    Given the batch's mean and inverse standard deviation, one call over ``x`` and
    ``delta`` gives both sums (the kernel centres and scales each element itself); without
    them, ``x`` is centred first and a first call gives its sums of squares."""
    n, channels, locations = x.shape
    pairs = n * channels
    if mean_invstd is None:
        centred = (x - x.mean(dim=(0, 2))[:, None]).view(1, pairs, locations)
        zeros = x.new_zeros(pairs)
        _, squares, _ = torch.ops.aten.native_batch_norm_backward(
            centred, centred, None, None, None, zeros, x.new_ones(pairs), True, eps,
            [False, True, False],
        )  # fmt: skip
        rstd = torch.rsqrt(squares.view(n, channels).sum(0) / (n * locations) + eps)
        source, shift = centred, zeros
    else:
        mean, rstd = mean_invstd
        source, shift = x.view(1, pairs, locations), mean.repeat(n)
    _, u, v = torch.ops.aten.native_batch_norm_backward(
        delta.view(1, pairs, locations), source, None, None, None, shift, rstd.repeat(n),
        True, eps, [False, True, True],
    )  # fmt: skip
    return u.view(n, channels), v.view(n, channels)
