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


def deep_conv_bn_net(pairs: int) -> nn.Module:
    """``2 * pairs + 2`` curvature blocks: conv, then ``pairs`` x (conv, BatchNorm), Linear."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1)]
    for _ in range(pairs):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 36, 3))
