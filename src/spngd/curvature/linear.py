"""K-FAC for ``nn.Linear`` (spec section 2).

Extra leading dimensions of the input (``(n, *, d)``) are folded in with the batch as
*locations*, exactly like the output positions of a convolution (KFC convention):
``A = (1/n) sum_{i,t} a a^T`` and ``G = (1/(n T)) sum_{i,t} g g^T``. A Linear on ``T``
positions therefore gives the same curvature as the equivalent 1x1 convolution, and the
product ``A ⊗ G`` stays at per-example Fisher scale.
"""

from __future__ import annotations

import torch
from torch import nn

from spngd.curvature.base import statistics_dtype
from spngd.curvature.kronecker import KroneckerBlock, append_bias_moments


class LinearBlock(KroneckerBlock):
    kind = "K-FAC Linear"

    def __init__(self, name: str, module: nn.Linear) -> None:
        super().__init__(name, module)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.a_dim = module.in_features + int(self.has_bias)
        self.g_dim = module.out_features

    def a_factor(self, inputs: torch.Tensor) -> torch.Tensor:
        n = self.batch_size(inputs)
        rows = inputs.reshape(-1, self.in_features).to(statistics_dtype(inputs))
        second = (rows.T @ rows).unsqueeze(0)
        if self.has_bias:
            second = append_bias_moments(second, rows.sum(0).unsqueeze(0), rows.shape[0])
        return second / n

    def g_factor(self, grad_output: torch.Tensor, batch_size: int) -> torch.Tensor:
        rows = grad_output.reshape(-1, self.out_features).to(statistics_dtype(grad_output))
        locations = rows.shape[0] / batch_size
        # (1/(n T)) sum (n go)(n go)^T = (n / T) sum go go^T
        return (rows.T @ rows).unsqueeze(0) * (batch_size / locations)

    def gradient_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        matrix = grads[0] if not self.has_bias else torch.cat((grads[0], grads[1][:, None]), 1)
        return matrix.unsqueeze(0)

    def split_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        matrix = matrix[0]
        if not self.has_bias:
            return [matrix]
        return [matrix[:, : self.in_features], matrix[:, self.in_features]]

    def describe(self) -> str:
        return f"{self.kind}: A {self.a_dim}x{self.a_dim}, G {self.g_dim}x{self.g_dim}"
