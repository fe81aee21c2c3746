"""The optimizers ``spngd train`` builds and the weight rescaling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spngd.train.optimizers import GuardedSGD, rescale_weights


def test_rescaling_bounds_conv_and_linear_weights_and_leaves_the_rest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(100.0)  # far above sqrt(2 * 4)
        model[3].weight.mul_(1e-3)  # far below sqrt(2 * 3): untouched
        model[1].weight.fill_(50.0)
    small = model[3].weight.clone()
    bias = model[0].bias.clone()
    rescale_weights(model)
    assert model[0].weight.norm().item() == pytest.approx(math.sqrt(8.0), rel=1e-6)
    assert torch.equal(model[3].weight, small) and torch.equal(model[0].bias, bias)
    assert torch.all(model[1].weight == 50.0)


def _pair() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    first = nn.Linear(3, 2)
    second = nn.Linear(3, 2)
    second.load_state_dict(first.state_dict())
    return first, second


def test_guarded_sgd_steps_as_torch_sgd_and_skips_a_non_finite_step() -> None:
    guarded_model, plain_model = _pair()
    guarded = GuardedSGD(
        guarded_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, max_bad_steps=10
    )
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(5, 3)
    for _ in range(3):
        for model, opt in ((guarded_model, guarded), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert all(
        torch.equal(a, b)
        for a, b in zip(guarded_model.parameters(), plain_model.parameters(), strict=True)
    )
    before = [p.clone() for p in guarded_model.parameters()]
    momentum = [guarded.state[p]["momentum_buffer"].clone() for p in guarded_model.parameters()]
    guarded.zero_grad()
    (guarded_model(x).sum() * math.nan).backward()
    with pytest.warns(RuntimeWarning, match="SGD: NaN or inf gradient; step skipped"):
        guarded.step()
    assert guarded.last_step_skipped and guarded.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(guarded_model.parameters(), before, strict=True))
    for p, m in zip(guarded_model.parameters(), momentum, strict=True):
        assert torch.equal(guarded.state[p]["momentum_buffer"], m)


def test_guarded_sgd_state_carries_its_counters() -> None:
    model, twin = _pair()
    opt = GuardedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0, max_bad_steps=10)
    opt.guard.skipped_steps, opt.guard.bad_steps_in_a_row = 4, 1
    state = opt.state_dict()
    assert (state["skipped_steps"], state["bad_steps_in_a_row"]) == (4, 1)
    restored = GuardedSGD(
        twin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0, max_bad_steps=10
    )
    restored.load_state_dict(state)
    assert restored.skipped_steps == 4 and restored.last_step_skipped
    assert "skipped_steps" in state  # the caller's dict is left whole
