"""K-FAC for ``nn.Linear``.

Extra leading dimensions of the input (``(n, *, d)``) are folded in with the batch as
*locations*, exactly like the output positions of a convolution (KFC convention):
``A = (1/n) sum_{i,t} a a^T`` and ``G = (1/(n T)) sum_{i,t} g g^T``. A Linear on ``T``
positions therefore gives the same curvature as the equivalent 1x1 convolution, and the
product ``A ⊗ G`` stays at per-example Fisher scale.

Both factors are one Gram product ``rows^T rows`` of the ``(N, d)`` row matrix, scaled inside
the product (:func:`gram`). With a bias, ``A`` is the Gram product of ``[rows, 1]``: when
there are at most as many rows as features, the rows are augmented (a copy of ``N (d + 1)``
numbers) instead of bordering the ``d x d`` result afterwards (copies of ``(d + 1)^2``).
For ResNet-50's classifier (32 rows of 2048, 2 threads) ``A`` takes 1.4 ms instead of 2.1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from spngd.curvature.base import statistics_dtype
from spngd.curvature.kronecker import KroneckerBlock, append_bias_moments

ONEDNN_MIN_WORK = 1 << 24
"""Multiply-adds ``N d^2`` from which :func:`gram` hands a product to oneDNN."""


class LinearBlock(KroneckerBlock):
    method = "K-FAC Linear"
    module_types = (nn.Linear,)

    def __init__(self, name: str, module: nn.Linear) -> None:
        super().__init__(name, module)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.a_dim = module.in_features + int(self.has_bias)
        self.g_dim = module.out_features

    def a_factor(self, inputs: torch.Tensor) -> torch.Tensor:
        n = self.batch_size(inputs)
        rows = inputs.reshape(-1, self.in_features).to(statistics_dtype(inputs))
        count = rows.shape[0]
        if not self.has_bias:
            return gram(rows, 1.0 / n).unsqueeze(0)
        if count <= self.in_features:
            augmented = torch.cat((rows, rows.new_ones(count, 1)), dim=1)
            return gram(augmented, 1.0 / n).unsqueeze(0)
        second = gram(rows, 1.0 / n).unsqueeze(0)
        return append_bias_moments(second, rows.sum(0).unsqueeze(0).div_(n), count / n)

    def g_factor(self, grad_output: torch.Tensor, batch_size: int) -> torch.Tensor:
        rows = grad_output.reshape(-1, self.out_features).to(statistics_dtype(grad_output))
        locations = rows.shape[0] / batch_size
        # (1/(n T)) sum (n go)(n go)^T = (n / T) sum go go^T
        return gram(rows, batch_size / locations).unsqueeze(0)

    def gradient_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        matrix = grads[0] if not self.has_bias else torch.cat((grads[0], grads[1][:, None]), 1)
        return matrix.unsqueeze(0)

    def split_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        matrix = matrix[0]
        if not self.has_bias:
            return [matrix]
        return [matrix[:, : self.in_features], matrix[:, self.in_features]]

    def describe(self) -> str:
        return f"{self.method}: A {self.a_dim}x{self.a_dim}, G {self.g_dim}x{self.g_dim}"


def gram(rows: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * rows^T rows`` of an ``(N, d)`` matrix, by the faster of two kernels.

    oneDNN's convolution kernels run about twice as fast as the BLAS (MKL) matrix product on
    the AMD EPYC (Zen 5) CPU this was measured on (2 threads): for ``(N, d)`` = (4096, 256),
    (2304, 576), (2048, 2048) a Gram product took 1.3, 3.7, 49 ms there against 2.6, 7.2,
    81 ms by ``addmm``. It is one 1x1 convolution weight gradient
    (:func:`onednn_product`), so it goes there when it is large enough
    (``N d^2 >= ONEDNN_MIN_WORK``) and not too flat (``4 N >= d``): below that both take
    about 0.1 ms or BLAS wins (few rows of many features, as in ResNet-50's classifier:
    32 x 2049 took 1.6 ms by BLAS, 3.0 by oneDNN; (72, 576): 0.31 against 0.42). Beyond
    ``d = 2304`` oneDNN's single product falls behind (4608: 1.14x slower), so such
    matrices stay with BLAS (:func:`spngd.curvature.conv.patch_second_moment` splits its
    own into blocks).
    """
    if gram_form(*rows.shape) == "oneDNN":
        return onednn_product(rows, rows).mul_(scale)
    return torch.addmm(rows.new_zeros(()), rows.T, rows, beta=0, alpha=scale)


def gram_form(count: int, dim: int) -> str:
    """``"oneDNN"`` or ``"BLAS"``: the kernel :func:`gram` uses for ``count`` rows of ``dim``."""
    if count * dim * dim >= ONEDNN_MIN_WORK and 4 * count >= dim and dim <= 2304:
        return "oneDNN"
    return "BLAS"


def onednn_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``right^T left`` for ``(N, d_l)`` and ``(N, d_r)`` matrices, shape ``(d_r, d_l)``.

    Computed as the weight gradient of a 1x1 convolution over an ``N x 1`` image whose
    channels are the columns: a row-major matrix is already that image in channels-last
    order, so nothing is copied, and the product runs in oneDNN (float32) rather than BLAS.
    """
    count = left.shape[0]
    image_left = left.contiguous().view(1, count, 1, -1).permute(0, 3, 1, 2)
    image_right = right.contiguous().view(1, count, 1, -1).permute(0, 3, 1, 2)
    weight = conv2d_weight(image_left, (right.shape[1], left.shape[1], 1, 1), image_right)
    return weight.view(right.shape[1], left.shape[1])
