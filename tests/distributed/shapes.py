"""Curvature blocks of real models, as SPNGD builds them (shared by the distributed tests)."""

from __future__ import annotations

from torch import nn

from spngd.curvature import BlockSettings, CurvatureBlock, make_block
from spngd.distributed import BlockCost


def real_block(name: str, module: nn.Module) -> CurvatureBlock | None:
    """The curvature block SPNGD builds for ``module``, or None."""
    return make_block(name, module, BlockSettings(bn_damping_scale=16.0))


def model_blocks(model: nn.Module) -> list[CurvatureBlock]:
    blocks = [real_block(name, module) for name, module in model.named_modules()]
    return [block for block in blocks if block is not None]


def costs_of(blocks: list[CurvatureBlock]) -> list[BlockCost]:
    return [BlockCost(block.name, block.inversion_cost) for block in blocks]
