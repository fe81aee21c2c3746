"""The optimizers ``spngd train`` builds from its config: SPNGD, or momentum SGD that
skips non-finite steps the same way; and the weight rescaling both use after a step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from spngd.guard import GuardedSteps, NonFiniteGuard, any_nonfinite
from spngd.optimizer import SPNGD
from spngd.train.config import TrainConfig

RESCALED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def rescale_weights(model: nn.Module) -> None:
    """Shrink every conv and Linear weight to Frobenius norm at most ``sqrt(2 d_out)``.

    ``W <- W min(1, sqrt(2 d_out) / (||W||_F + 1e-9))``, as the authors' code does: the
    expected norm of a He-initialised weight. Biases and BatchNorm parameters are left alone.
    """
    for module in model.modules():
        if isinstance(module, RESCALED):
            weight = module.weight
            bound = math.sqrt(2.0 * weight.shape[0])
            weight.mul_((bound / (weight.norm() + 1e-9)).clamp(max=1.0))


class GuardedSGD(GuardedSteps, torch.optim.SGD):
    """Momentum SGD that, like SPNGD, skips a step whose gradients hold NaN or inf.

    The skipped step leaves parameters and momentum untouched and warns; after
    ``max_bad_steps`` such steps in a row ``step()`` raises :class:`NonFiniteGradientError`,
    so the trainer stops both optimizers the same way (:class:`spngd.guard.NonFiniteGuard`).
    Under DDP the gradients are already averaged, so every rank skips the same steps.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float,
        weight_decay: float,
        max_bad_steps: int,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.guard = NonFiniteGuard("SGD", max_bad_steps, advice="Lower the learning rate")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Torch's SGD step, or a skipped and counted one if a gradient is NaN or inf."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not self.guard.skip(bool(any_nonfinite(grads))):
            super().step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Torch's SGD state plus the skipped-step counters (as SPNGD's state dict has)."""
        return {**super().state_dict(), **self.guard.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.guard.pop_state(state_dict)
        super().load_state_dict(state_dict)


def make_optimizer(model: nn.Module, config: TrainConfig) -> SPNGD | GuardedSGD:
    """SPNGD (accumulating statistics over ``config.accumulate`` micro-batches) or SGD, both
    skipping steps with NaN or inf gradients up to ``config.max_bad_steps`` in a row."""
    if config.optimizer == "sgd":
        return GuardedSGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            max_bad_steps=config.max_bad_steps,
        )
    return SPNGD(
        model,
        lr=config.lr,
        momentum=config.momentum,
        damping=config.damping,
        weight_decay=config.weight_decay,
        stat_decay=config.stat_decay,
        fisher=config.fisher,
        damping_form=config.damping_form,
        stat_interval=config.stat_interval,
        inverse_interval=config.inverse_interval,
        statistics_examples=config.statistics_examples,
        a_examples=config.a_examples,
        a_patches=config.a_patches,
        refresh=config.refresh,
        distributed=config.distributed,
        accumulation_steps=config.accumulate,
        max_bad_steps=config.max_bad_steps,
    )
