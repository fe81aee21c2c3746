"""The paper's ImageNet recipe per batch size, as ``--recipe`` presets.

Values: the paper's per-batch-size hyper-parameters, taken from the authors'
ResNet-50-D configs (tyohei/chainerkfac ``examples/imagenet/configs/*.json``). Common to all
rows: no warm-up (the rate is held until ``e_start``), polynomial decay to 0 at ``e_end``, no
weight decay, no label smoothing, no running average of statistics (``cov_ema_decay`` 1.0),
BatchNorm damping x16, weights rescaling, running mixup for all epochs. The TPAMI paper's own
ResNet-50 values are unconfirmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """One row of the table: batch size N and the schedule that goes with it."""

    batch_size: int
    epochs: float
    lr: float
    lr_decay_start: float
    lr_decay_end: float
    lr_decay_power: float
    momentum: float
    damping: float
    mixup_alpha: float

    def settings(self) -> dict[str, Any]:
        """Config values this preset sets (the row plus what all rows share)."""
        return {
            "model": "resnet50",
            "optimizer": "spngd",
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "lr": self.lr,
            "warmup_epochs": 0.0,
            "lr_decay_start": self.lr_decay_start,
            "lr_decay_end": self.lr_decay_end,
            "lr_decay_power": self.lr_decay_power,
            "momentum": self.momentum,
            "damping": self.damping,
            "weight_decay": 0.0,
            "stat_decay": 0.0,
            "rescale_weights": True,
            "mixup_alpha": self.mixup_alpha,
            "mixup_off_epoch": None,
            "label_smoothing": 0.0,
        }


RECIPES: dict[str, Recipe] = {
    "imagenet-4k": Recipe(4_096, 36, 8.18e-3, 1, 53, 11, 0.997, 2.5e-4, 0.4),
    "imagenet-8k": Recipe(8_192, 36, 1.25e-2, 1, 53.5, 8, 0.993, 2.5e-4, 0.4),
    "imagenet-16k": Recipe(16_384, 36, 2.5e-2, 1, 53.5, 8, 0.985, 2.5e-4, 0.4),
    "imagenet-32k": Recipe(32_768, 46, 3.0e-2, 1.5, 49.5, 3.5, 0.97, 2.0e-4, 0.6),
    "imagenet-65k": Recipe(65_536, 61, 4.0e-2, 2, 64.5, 2.9, 0.95, 1.5e-4, 0.6),
    "imagenet-131k": Recipe(131_072, 81, 7.0e-2, 1, 95, 3.0, 0.93, 1.0e-4, 1.0),
}
"""Presets by ``--recipe`` name: the paper's names for the batch sizes (4K is 4,096, 65K is
65,536, 131K is 131,072)."""
