"""Which block kind preconditions which module (``spngd.curvature.make_block``)."""

from __future__ import annotations

from torch import nn

from spngd.curvature import (
    BLOCK_KINDS,
    BatchNormBlock,
    BlockSettings,
    Conv1dBlock,
    Conv2dBlock,
    KroneckerBlock,
    LinearBlock,
    make_block,
)


def test_each_supported_module_gets_its_kinds_block_with_the_kinds_settings() -> None:
    cases = [
        (nn.Linear(3, 2), LinearBlock),
        (nn.Conv2d(3, 2, 3), Conv2dBlock),
        (nn.Conv1d(3, 2, 3), Conv1dBlock),
        (nn.BatchNorm1d(3), BatchNormBlock),
        (nn.BatchNorm2d(3), BatchNormBlock),
        (nn.BatchNorm3d(3), BatchNormBlock),
    ]
    for module, kind in cases:
        block = make_block(
            "m", module, BlockSettings(bn_damping_scale=4.0, damping_form="kronecker")
        )
        assert type(block) is kind, module
        if isinstance(block, KroneckerBlock):
            assert block.damping_form == "kronecker"
        else:
            assert block.damping_scale == 4.0  # type: ignore[union-attr]


def test_modules_no_kind_can_precondition_get_no_block() -> None:
    for module in (nn.BatchNorm2d(3, affine=False), nn.LayerNorm(3), nn.Conv3d(3, 2, 3), nn.ReLU()):
        assert make_block("m", module, BlockSettings(bn_damping_scale=16.0)) is None, module


def test_every_registered_kind_names_the_modules_it_preconditions() -> None:
    assert all(kind.module_types for kind in BLOCK_KINDS)
