"""A preconditioned gradient that is not finite although the gradient is (docs/troubleshooting.md):
that layer takes its plain gradient, with one warning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd import SPNGD


def test_a_nonfinite_preconditioned_gradient_falls_back_to_the_plain_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = SPNGD(model, lr=0.1, momentum=0.0, stat_interval=1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the layer has an inverse from here on
    block = opt.curvature["0"]
    block.apply_inverse = lambda grads: [g * torch.inf for g in grads]  # type: ignore[method-assign]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    with pytest.warns(
        RuntimeWarning,
        match="preconditioned gradient of '0' is not finite; using the plain gradient for it",
    ):
        opt.step()
    for p, old, grad in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p, old - 0.1 * grad)
