"""Small models shared by tests (seeded, so every process builds the same weights)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_net() -> nn.Module:
    """Conv-BatchNorm-ReLU, a strided conv and a Linear head: every kind of block, for
    3 x 9 x 9 inputs and 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 16, 3),
    )
