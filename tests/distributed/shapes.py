"""Block shapes of real models, as SPNGD builds them (shared by the distributed tests)."""

from __future__ import annotations

from torch import nn

from spngd.curvature import make_block
from spngd.distributed import BlockShape


def block_shape(name: str, module: nn.Module) -> BlockShape | None:
    """The shape of the curvature block SPNGD builds for ``module``, or None."""
    block = make_block(name, module, bn_damping_scale=16.0)
    return None if block is None else BlockShape.from_block(block)
