"""Unit-wise natural gradient for BatchNorm (spec section 4).

Each channel ``c`` gets a 2x2 Fisher over ``(gamma_c, beta_c)`` built from per-example
gradients ``u_{i,c} = sum_t delta x_hat`` and ``v_{i,c} = sum_t delta`` with
``delta = n * grad_output``; cross-channel terms are dropped. ``x_hat`` is recomputed
from the layer *input* with the batch's own statistics (spec [R]), so modifying the BN
output in place afterwards (``out += shortcut``) cannot corrupt it, and ``gamma = 0``
is harmless. The damping is ``bn_damping_scale * lam`` (spec kappa, default 16).
"""

from __future__ import annotations

import torch
from torch import nn

from spngd.curvature.base import CurvatureBlock, statistics_dtype
from spngd.linalg import unit_wise_inverse


class BatchNormBlock(CurvatureBlock):
    kind = "unit-wise BatchNorm"
    statistic_names = ("F",)

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

    def compute_statistic(
        self, index: int, inputs: torch.Tensor, grad_output: torch.Tensor
    ) -> torch.Tensor:
        dtype = statistics_dtype(inputs)
        n, channels = inputs.shape[:2]
        x = inputs.to(dtype).reshape(n, channels, -1)
        delta = grad_output.to(dtype).reshape(n, channels, -1)
        # Two passes, no x_hat tensor: centre once, then per-(example, channel) dot products
        # (torch.var_mean is several times slower than this on CPU).
        centred = x - x.mean(dim=(0, 2))[:, None]
        rstd = torch.rsqrt(
            torch.linalg.vecdot(centred, centred, dim=2).mean(0) / x.shape[2] + self.eps
        )
        v = delta.sum(2)
        u = torch.linalg.vecdot(delta, centred, dim=2) * rstd  # sum_t delta x_hat
        fisher = torch.stack(((u * u).mean(0), (u * v).mean(0), (v * v).mean(0)), dim=1)
        return fisher * (n * n)  # delta = n * grad_output

    def compute_inverse(self, damping: float) -> tuple[torch.Tensor, ...]:
        return (unit_wise_inverse(self.factors[0], self.damping_scale * damping),)  # type: ignore[index]

    def apply_inverse(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        (inverse,) = self.inverse  # type: ignore[misc]
        g_gamma, g_beta = (g.to(inverse.dtype) for g in grads)
        d_gamma = inverse[:, 0] * g_gamma + inverse[:, 1] * g_beta
        d_beta = inverse[:, 1] * g_gamma + inverse[:, 2] * g_beta
        return [d_gamma.to(grads[0].dtype), d_beta.to(grads[1].dtype)]

    def describe(self) -> str:
        return (
            f"{self.kind}: {self.channels} channels x 2x2 Fisher (damping x{self.damping_scale:g})"
        )
