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
    "BLOCK_KINDS",
    "SUPPORTED_LAYERS",
    "BatchNormBlock",
    "Conv1dBlock",
    "Conv2dBlock",
    "CurvatureBlock",
    "KroneckerBlock",
    "LinearBlock",
    "make_block",
]


BLOCK_KINDS: tuple[type[CurvatureBlock], ...] = (
    LinearBlock,
    Conv2dBlock,
    Conv1dBlock,
    BatchNormBlock,
)
"""The registered layer kinds: a new kind is a block module and one entry here."""

SUPPORTED_LAYERS = ", ".join(
    module_type.__name__.lstrip("_") for kind in BLOCK_KINDS for module_type in kind.module_types
)
"""The module classes SP-NGD preconditions, for messages (``Linear, Conv2d, ...``)."""


def make_block(
    name: str,
    module: nn.Module,
    bn_damping_scale: float,
    damping_form: str = DAMPING_FORMS[0],
    a_examples: int | None = None,
) -> CurvatureBlock | None:
    """The curvature block of the first registered kind (:data:`BLOCK_KINDS`) whose module
    types ``module`` is an instance of, or None for any other module; Kronecker-factored
    blocks are damped in ``damping_form`` and take ``A`` from at most ``a_examples``
    examples, BatchNorm blocks are damped with ``bn_damping_scale`` times the damping."""
    for kind in BLOCK_KINDS:
        if isinstance(module, kind.module_types):
            return kind.for_module(name, module, bn_damping_scale, damping_form, a_examples)
    return None
