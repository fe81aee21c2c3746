"""Curvature blocks, one module per layer kind, and the rule that picks one for a module."""

from __future__ import annotations

from torch import nn

from spngd.curvature.base import CurvatureBlock
from spngd.curvature.batchnorm import BatchNormBlock
from spngd.curvature.conv import Conv2dBlock
from spngd.curvature.conv1d import Conv1dBlock
from spngd.curvature.kronecker import KroneckerBlock
from spngd.curvature.linear import LinearBlock

__all__ = [
    "BatchNormBlock",
    "Conv1dBlock",
    "Conv2dBlock",
    "CurvatureBlock",
    "KroneckerBlock",
    "LinearBlock",
    "make_block",
]


def make_block(name: str, module: nn.Module, bn_damping_scale: float) -> CurvatureBlock | None:
    """The curvature block for a supported module kind, or None for any other module."""
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module)
    if isinstance(module, nn.Conv2d):
        return Conv2dBlock(name, module)
    if isinstance(module, nn.Conv1d):
        return Conv1dBlock(name, module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return BatchNormBlock(name, module, bn_damping_scale)
    return None
