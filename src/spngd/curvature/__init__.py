"""Curvature blocks, one module per layer kind, and the rule that picks one for a module."""

from __future__ import annotations

from dataclasses import dataclass

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
    "BlockSettings",
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


@dataclass(frozen=True)
class BlockSettings:
    """The settings that concern one layer kind or another (:class:`spngd.SPNGD` documents
    them), handed to every kind's :meth:`CurvatureBlock.for_module`, which reads its own."""

    bn_damping_scale: float
    """BatchNorm blocks are damped with this times the damping."""
    damping_form: str = DAMPING_FORMS[0]
    """How Kronecker-factored blocks are damped (:data:`DAMPING_FORMS`)."""
    a_examples: int | None = None
    """Kronecker-factored blocks take ``A`` from at most this many examples (None: as many
    as the other statistics)."""
    a_patches: int | None = None
    """Convolution blocks take ``A`` from the fewest first examples that hold this many
    patches (examples times output locations), two at least; None: from every example
    ``a_examples`` allows."""


def make_block(name: str, module: nn.Module, settings: BlockSettings) -> CurvatureBlock | None:
    """The curvature block of the first registered kind (:data:`BLOCK_KINDS`) whose module
    types ``module`` is an instance of, set up with ``settings``, or None for any other
    module."""
    for kind in BLOCK_KINDS:
        if isinstance(module, kind.module_types):
            return kind.for_module(name, module, settings)
    return None
