"""Placement of curvature blocks on ranks by a cost model, no processes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from torch import nn

from spngd.distributed import STRATEGIES, BlockShape, assign_blocks, rank_loads
from spngd.train.models import build_model
from tests.distributed.shapes import block_shape


def _unit(cost: int, name: str = "bn") -> BlockShape:
    """A unit-wise block of the given cost (10 per channel)."""
    assert cost % 10 == 0
    return BlockShape(name, "unit_wise", cost // 10, 2)


def _random_shapes(seed: int, count: int) -> list[BlockShape]:
    rng = random.Random(seed)
    shapes = []
    for i in range(count):
        if rng.random() < 0.3:
            shapes.append(BlockShape(f"bn{i}", "unit_wise", rng.randint(1, 2048), 2))
        else:
            a, g, groups = rng.randint(1, 600), rng.randint(1, 600), rng.choice((1, 1, 2, 4))
            shapes.append(BlockShape(f"conv{i}", "kronecker", a, g, groups))
    return shapes


@pytest.fixture(scope="module")
def resnet50_shapes() -> list[BlockShape]:
    model = build_model("resnet50", 1000)
    shapes = [block_shape(n, m) for n, m in model.named_modules()]
    return [s for s in shapes if s is not None]


def test_costs() -> None:
    assert BlockShape("fc", "kronecker", 3, 2).cost == 27 + 8 + 2 * 3 * 5
    assert BlockShape("dw", "kronecker", 9, 1, groups=32).cost == 32 * (729 + 1 + 9 * 10)
    assert BlockShape("bn", "unit_wise", 64, 2).cost == 640


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "diagonal", "a_dim": 3, "g_dim": 3}, "x: kind must be"),
        ({"kind": "kronecker", "a_dim": 0, "g_dim": 3}, "x: a_dim, g_dim and groups must be >= 1"),
        (
            {"kind": "kronecker", "a_dim": 3, "g_dim": 3, "groups": 0},
            "x: a_dim, g_dim and groups must be >= 1",
        ),
    ],
)
def test_block_shape_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BlockShape("x", **kwargs)


def test_shapes_of_real_blocks() -> None:
    assert block_shape("fc", nn.Linear(5, 3)) == BlockShape("fc", "kronecker", 6, 3)
    conv = nn.Conv2d(8, 6, (3, 2), groups=2)
    assert block_shape("c", conv) == BlockShape("c", "kronecker", 4 * 6 + 1, 3, 2)
    conv = nn.Conv2d(8, 6, 3, bias=False)
    assert block_shape("c", conv) == BlockShape("c", "kronecker", 72, 6)
    assert block_shape("b", nn.BatchNorm2d(7)) == BlockShape("b", "unit_wise", 7, 2)
    assert block_shape("b", nn.BatchNorm2d(7, affine=False)) is None
    assert block_shape("r", nn.ReLU()) is None


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8, 40])
def test_every_block_owned_once(strategy: str, world_size: int) -> None:
    shapes = _random_shapes(0, 23)
    owners = assign_blocks(shapes, world_size, strategy)
    assert len(owners) == len(shapes)
    assert all(isinstance(o, int) and 0 <= o < world_size for o in owners)
    loads = rank_loads(shapes, owners, world_size)
    assert sum(loads) == pytest.approx(sum(s.cost for s in shapes))
    if world_size > len(shapes):
        assert loads[len(shapes) :] == [0.0] * (world_size - len(shapes))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic(strategy: str) -> None:
    shapes = _random_shapes(1, 30)
    first = assign_blocks(shapes, 4, strategy)
    assert all(assign_blocks(list(shapes), 4, strategy) == first for _ in range(3))


def test_lpt_by_hand() -> None:
    shapes = [_unit(c) for c in (70, 50, 40, 30, 10)]
    # 70 -> r0; 50 -> r1; 40 -> r1 (90); 30 -> r0 (100); 10 -> r1 (100).
    assert assign_blocks(shapes, 2) == [0, 1, 1, 0, 1]
    # Equal costs: lower index first, and to the lowest of the least-loaded ranks.
    assert assign_blocks([_unit(10)] * 5, 2) == [0, 1, 0, 1, 0]
    assert assign_blocks([_unit(10), _unit(20), _unit(10)], 3) == [1, 0, 2]


@pytest.mark.parametrize("num_blocks", range(13))
def test_equal_count_is_array_split(num_blocks: int) -> None:
    shapes = [_unit(10 * (i + 1)) for i in range(num_blocks)]
    for world_size in range(1, 9):
        expected = [0] * num_blocks
        for rank, chunk in enumerate(np.array_split(np.arange(num_blocks), world_size)):
            for i in chunk:
                expected[i] = rank
        assert assign_blocks(shapes, world_size, "equal_count") == expected


@pytest.mark.parametrize("seed", range(5))
def test_lpt_classic_bound(seed: int) -> None:
    shapes = _random_shapes(seed, 37)
    total = sum(s.cost for s in shapes)
    biggest = max(s.cost for s in shapes)
    for world_size in range(1, 9):
        loads = rank_loads(shapes, assign_blocks(shapes, world_size), world_size)
        assert max(loads) <= total / world_size + biggest


def test_resnet50_lpt_beats_equal_count(resnet50_shapes: list[BlockShape]) -> None:
    shapes = resnet50_shapes
    assert len(shapes) == 107  # 53 conv + 1 FC + 53 BN
    assert sum(s.kind == "unit_wise" for s in shapes) == 53
    total = sum(s.cost for s in shapes)
    biggest = max(s.cost for s in shapes)
    assert total == 530_877_872_180
    assert biggest / total == pytest.approx(0.2073, abs=1e-4)  # one stage-4 3x3 conv
    # The reference splits blocks in lexicographic module order; check both orders.
    for ordered in (shapes, sorted(shapes, key=lambda s: s.name)):
        for world_size in range(2, 9):
            lpt = max(rank_loads(ordered, assign_blocks(ordered, world_size), world_size))
            equal = rank_loads(
                ordered, assign_blocks(ordered, world_size, "equal_count"), world_size
            )
            assert lpt < max(equal)
            # Within 0.5% of the lower bound max(mean load, biggest block): near-optimal.
            assert lpt <= 1.005 * max(total / world_size, biggest)
            if world_size >= 5:
                assert lpt == biggest  # optimal: no rank waits longer than the 4608^3 block


def test_rebalance_on_world_size_change(resnet50_shapes: list[BlockShape]) -> None:
    """Re-assigning for another world size balances again: the busiest rank carries at most
    the even share plus the largest block (the greedy rule's bound), for 2 and 3 ranks."""
    total = sum(s.cost for s in resnet50_shapes)
    largest = max(s.cost for s in resnet50_shapes)
    for world_size in (2, 3):
        owners = assign_blocks(resnet50_shapes, world_size)
        assert len(owners) == len(resnet50_shapes)
        assert set(owners) == set(range(world_size))
        loads = rank_loads(resnet50_shapes, owners, world_size)
        assert max(loads) <= total / world_size + largest
        assert max(loads) < 1.05 * total / world_size  # many blocks: close to even


def test_empty_and_invalid() -> None:
    assert assign_blocks([], 3) == []
    assert assign_blocks([], 3, "equal_count") == []
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="world_size"):
            assign_blocks([_unit(10)], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lpt, equal_count"):
        assign_blocks([_unit(10)], 2, "round_robin")
    with pytest.raises(ValueError, match="owners"):
        rank_loads([_unit(10)], [0, 1], 2)
    with pytest.raises(ValueError, match="outside"):
        rank_loads([_unit(10)], [2], 2)
