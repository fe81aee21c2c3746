"""Which modules the preconditioner takes as curvature blocks, and why it leaves the others
to momentum SGD (``spngd.preconditioner.find_blocks``)."""

from __future__ import annotations

from torch import nn

from spngd.curvature import BatchNormBlock, BlockSettings, Conv2dBlock, LinearBlock
from spngd.preconditioner import find_blocks


class Tied(nn.Module):
    """A head whose weight is the embedding's (tied weights), beside layers of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.bias.requires_grad_(False)
        self.fc = nn.Linear(4, 3)


def _find(model: nn.Module, optimized: set[int] | None = None) -> tuple[dict, dict]:
    if optimized is None:
        optimized = {id(p) for p in model.parameters()}
    return find_blocks(
        model, optimized, BlockSettings(bn_damping_scale=16.0, damping_form="kronecker")
    )


def test_each_supported_module_of_its_own_trainable_parameters_is_a_block() -> None:
    blocks, plain = _find(Tied())
    assert {name: type(block) for name, block in blocks.items()} == {
        "conv": Conv2dBlock,
        "bn": BatchNormBlock,
        "fc": LinearBlock,
    }
    assert plain == {
        "embed": "momentum SGD (Embedding is not supported)",
        "head": "momentum SGD (Linear shares a parameter with another module)",
        "frozen": "momentum SGD (Linear is only partly trainable)",
    }
    assert blocks["conv"].damping_form == "kronecker"  # type: ignore[attr-defined]
    assert blocks["bn"].damping_scale == 16.0  # type: ignore[attr-defined]


def test_modules_whose_parameters_are_not_optimized_are_left_out() -> None:
    model = Tied()
    blocks, plain = _find(model, {id(p) for p in model.fc.parameters()})
    assert list(blocks) == ["fc"] and plain == {}


def test_a_bare_supported_model_is_its_own_block() -> None:
    blocks, plain = _find(nn.Linear(3, 2))
    assert list(blocks) == ["<model>"] and plain == {}
