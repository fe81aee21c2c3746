"""Curvature blocks, one module per layer kind, and the rule that picks one for a module."""

from __future__ import annotations

from torch import nn

from spngd.curvature.base import CurvatureBlock
from spngd.curvature.batchnorm import BatchNormBlock
from spngd.curvature.conv import Conv2dBlock
from spngd.curvature.conv1d import Conv1dBlock
from spngd.curvature.kronecker import DAMPING_FORMS, KroneckerBlock
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


def make_block(
    name: str,
    module: nn.Module,
    bn_damping_scale: float,
    damping_form: str = DAMPING_FORMS[0],
) -> CurvatureBlock | None:
    """The curvature block for a supported module kind, or None for any other module;
    Kronecker-factored blocks are damped in ``damping_form``, BatchNorm blocks with
    ``bn_damping_scale`` times the damping."""
    kronecker: KroneckerBlock
    if isinstance(module, nn.Linear):
        kronecker = LinearBlock(name, module)
    elif isinstance(module, nn.Conv2d):
        kronecker = Conv2dBlock(name, module)
    elif isinstance(module, nn.Conv1d):
        kronecker = Conv1dBlock(name, module)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return BatchNormBlock(name, module, bn_damping_scale)
    else:
        return None
    kronecker.damping_form = damping_form
    return kronecker
