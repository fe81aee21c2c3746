"""LR, momentum and damping schedules (the authors' recipe)."""

from __future__ import annotations

import pytest
import torch

from spngd import SPNGD
from spngd.train.config import resolve_config
from spngd.train.recipes import RECIPES
from spngd.train.schedules import Schedule, geometric_damping, polynomial_lr


def _schedule(**changes: float | None) -> Schedule:
    values = {
        "lr": 0.1,
        "warmup_epochs": 0.0,
        "decay_start": 1.0,
        "decay_end": 5.0,
        "power": 2.0,
        "momentum": 0.9,
        "damping": 1e-3,
        "damping_start": None,
        "damping_epochs": 0.0,
        "epochs_per_step": 0.5,
    }
    return Schedule(**{**values, **changes})


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_lr_matches_the_formula(name: str) -> None:
    """eta(e) at e in {0, e_start, midpoint, e_end}: eta0, eta0, eta0 / 2^p, 0."""
    recipe = RECIPES[name]
    config = resolve_config({"recipe": name, "data": "synthetic", "device": "cpu"})
    # A quarter epoch per step puts every table epoch and midpoint on a step.
    schedule = Schedule.from_config(config, train_size=4 * config.batch_size)
    start, end = recipe.lr_decay_start, recipe.lr_decay_end
    expected = {
        0.0: recipe.lr,
        start: recipe.lr,
        (start + end) / 2: recipe.lr * 0.5**recipe.lr_decay_power,
        end: 0.0,
    }
    for epoch, lr in expected.items():
        assert polynomial_lr(epoch, recipe.lr, start, end, recipe.lr_decay_power) == pytest.approx(
            lr, rel=1e-12, abs=0.0
        )
        step = round(epoch / schedule.epochs_per_step)
        assert schedule.epoch(step) == epoch
        assert schedule.lr_at(step) == pytest.approx(lr, rel=1e-12, abs=0.0)
    assert schedule.lr_at(round(start / schedule.epochs_per_step) + 1) < recipe.lr


def test_recipe_values_are_the_table_rows() -> None:
    config = resolve_config({"recipe": "imagenet-32k", "data": "synthetic", "device": "cpu"})
    assert (config.batch_size, config.epochs, config.lr, config.momentum) == (32768, 46, 3e-2, 0.97)
    assert (config.lr_decay_start, config.lr_decay_end, config.lr_decay_power) == (1.5, 49.5, 3.5)
    assert (config.damping, config.mixup_alpha, config.model) == (2e-4, 0.6, "resnet50")
    assert config.warmup_epochs == 0.0 and config.weight_decay == 0.0 and config.rescale_weights


def test_warmup_is_linear_and_counts_the_step_itself() -> None:
    schedule = _schedule(warmup_epochs=2.0, decay_start=10.0, decay_end=20.0)
    # 0.5 epochs per step, 2 warm-up epochs: steps 0..3 at 1/4, 2/4, 3/4, 4/4 of the rate.
    assert [schedule.lr_at(step) for step in range(5)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1]
    )


def test_momentum_reproduces_the_chainer_update_with_adjust_momentum() -> None:
    """Chainer: v = mu_t v - lr_t g, mu_t = mu lr_t/lr_{t-1} when the rate falls.

    The trainer's PyTorch-form SGD with ``Schedule.momentum_at`` must give the same
    parameters through warm-up, constant rate and polynomial decay.
    """
    schedule = _schedule(warmup_epochs=2.0, decay_start=3.0, decay_end=8.0)
    torch.manual_seed(0)
    gradients = torch.randn(16, 5, dtype=torch.float64)
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([theta], lr=1.0, momentum=0.9)
    chainer_theta = torch.zeros(5, dtype=torch.float64)
    velocity = torch.zeros(5, dtype=torch.float64)
    previous_lr = None
    for step, gradient in enumerate(gradients):
        schedule.apply(sgd, step)
        theta.grad = gradient.clone()
        sgd.step()
        lr = schedule.lr_at(step)
        mu = 0.9 * lr / previous_lr if previous_lr is not None and lr < previous_lr else 0.9
        velocity = mu * velocity - lr * gradient
        chainer_theta += velocity
        previous_lr = lr
        assert torch.allclose(theta.detach(), chainer_theta, rtol=1e-12, atol=1e-14), step
    momenta = [schedule.momentum_at(step) for step in range(16)]
    assert momenta[1] == pytest.approx(0.9 * 1 / 2)  # warm-up: correction lr_{t-1}/lr_t
    assert momenta[5] == 0.9 and momenta[12] == 0.9  # constant and decaying rate


def test_damping_is_constant_by_default_and_geometric_with_a_start() -> None:
    assert {_schedule().damping_at(step) for step in range(10)} == {1e-3}
    schedule = _schedule(damping_start=1e-1, damping_epochs=2.0)
    assert schedule.damping_at(0) == pytest.approx(1e-1)
    assert schedule.damping_at(2) == pytest.approx(1e-2)  # epoch 1 of 2: geometric midpoint
    assert schedule.damping_at(4) == pytest.approx(1e-3) == schedule.damping_at(9)
    assert geometric_damping(0.5, 1e-3, None, 2.0) == 1e-3


def test_apply_sets_every_group_and_spngd_uses_the_new_damping() -> None:
    torch.manual_seed(0)
    first, head = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    grouped = SPNGD(
        torch.nn.Sequential(first, head),
        lr=0.1,
        params=[
            {"params": first.parameters()},
            {"params": head.parameters(), "lr": 0.3, "damping": 0.5, "momentum": 0.0},
        ],
    )
    assert len(grouped.param_groups) == 2
    model = torch.nn.Linear(4, 3)
    opt = SPNGD(model, lr=0.1, damping=1.0, stat_interval=1)
    schedule = _schedule(damping_start=1e-1, damping_epochs=2.0, warmup_epochs=1.0)
    for optimizer in (grouped, opt):
        values = schedule.apply(optimizer, 0)
        assert values == {"lr": pytest.approx(0.05), "momentum": 0.9, "damping": pytest.approx(0.1)}
        for group in optimizer.param_groups:
            assert (group["lr"], group["momentum"], group["damping"]) == pytest.approx(
                (0.05, 0.9, 0.1)
            )
    x = torch.randn(8, 4)

    def second_update(damping: float) -> torch.Tensor:
        """Statistics only at the first step (interval 100): a new damping alone must
        refresh the inverse used at the second."""
        clone = torch.nn.Linear(4, 3)
        clone.load_state_dict(model.state_dict())
        opt = SPNGD(clone, lr=0.1, damping=1.0, stat_interval=100)
        for step in range(2):
            opt.zero_grad()
            clone(x).square().mean().backward()
            if step == 1:
                before = clone.weight.detach().clone()
                _schedule(damping=damping).apply(opt, 0)
            opt.step()
        return clone.weight.detach() - before

    assert not torch.allclose(second_update(1e-1), second_update(1e-3), atol=1e-6)
    assert torch.allclose(second_update(1.0), second_update(1.0))
