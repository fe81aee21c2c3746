"""Per-step hyperparameters from the fractional epoch: learning rate, momentum, damping.

Everything is re-evaluated every optimizer step from ``e = step * batch_size / train_size``
(as the authors' configs do), so a schedule does not depend on how the data is cut into passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.optim import Optimizer

if TYPE_CHECKING:
    from spngd.train.config import TrainConfig


def polynomial_lr(epoch: float, lr: float, start: float, end: float, power: float) -> float:
    """``lr`` until ``start``, then ``lr (1 - (e - start)/(end - start))^power``, 0 from ``end``."""
    if epoch < start:
        return lr
    if epoch >= end:
        return 0.0
    return lr * (1.0 - (epoch - start) / (end - start)) ** power


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear warm-up multiplier: ``e / warmup_epochs`` capped at 1 (1 without warm-up)."""
    return 1.0 if warmup_epochs <= 0.0 else min(1.0, epoch / warmup_epochs)


def geometric_damping(epoch: float, damping: float, start: float | None, epochs: float) -> float:
    """Damping moving log-linearly from ``start`` to ``damping`` over ``epochs``, then constant.

    ``start=None`` keeps ``damping`` constant, as the authors' configs do.
    """
    if start is None or epoch >= epochs:
        return damping
    return damping * (start / damping) ** (1.0 - epoch / epochs)


@dataclass(frozen=True)
class Schedule:
    """The learning rate, momentum and damping of every optimizer step."""

    lr: float
    warmup_epochs: float
    decay_start: float
    decay_end: float
    power: float
    momentum: float
    damping: float
    damping_start: float | None
    damping_epochs: float
    epochs_per_step: float

    @classmethod
    def from_config(cls, config: TrainConfig, train_size: int) -> Schedule:
        return cls(
            lr=config.lr,
            warmup_epochs=config.warmup_epochs,
            decay_start=config.lr_decay_start,
            decay_end=config.lr_decay_end,
            power=config.lr_decay_power,
            momentum=config.momentum,
            damping=config.damping,
            damping_start=config.damping_start,
            damping_epochs=config.damping_decay_epochs,
            epochs_per_step=config.batch_size / train_size,
        )

    def epoch(self, step: int) -> float:
        """Fractional epoch at the start of ``step`` (0-based): examples seen / train size."""
        return step * self.epochs_per_step

    def lr_at(self, step: int) -> float:
        """Learning rate of ``step``; warm-up counts the step itself, so step 0 is not wasted."""
        e = self.epoch(step)
        base = polynomial_lr(e, self.lr, self.decay_start, self.decay_end, self.power)
        return base * warmup_factor(e + self.epochs_per_step, self.warmup_epochs)

    def momentum_at(self, step: int) -> float:
        """Momentum for PyTorch's ``buf = mu buf + g; p -= lr buf`` form.

        The authors' Chainer update ``v = mu_t v - lr_t g`` with ``adjust_momentum``
        (``mu_t = mu lr_t/lr_{t-1}`` when the rate falls, ``mu`` otherwise) equals PyTorch's
        form with ``mu min(1, lr_{t-1}/lr_t)``: ``mu`` while the rate is constant or falls,
        and Goyal et al.'s momentum correction while it rises (warm-up).
        """
        lr = self.lr_at(step)
        if step == 0 or lr == 0.0:
            return self.momentum
        return self.momentum * min(1.0, self.lr_at(step - 1) / lr)

    def damping_at(self, step: int) -> float:
        return geometric_damping(
            self.epoch(step), self.damping, self.damping_start, self.damping_epochs
        )

    def apply(self, optimizer: Optimizer, step: int) -> dict[str, float]:
        """Set every param group's ``lr``, ``momentum`` (and ``damping``, where it has one).

        SPNGD recomputes a layer's inverse when its group's damping changes. Returns the
        values set, for logging.
        """
        values = {
            "lr": self.lr_at(step),
            "momentum": self.momentum_at(step),
            "damping": self.damping_at(step),
        }
        for group in optimizer.param_groups:
            for key, value in values.items():
                if key in group:
                    group[key] = value
        return values
