"""Placement of curvature blocks on ranks by a cost model, no processes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from torch import nn

from spngd.curvature import BatchNormBlock
from spngd.distributed import STRATEGIES, BlockCost, assign_blocks, rank_loads
from spngd.train.models import build_model
from tests.distributed.shapes import costs_of, model_blocks, real_block


def _unit(cost: int, name: str = "bn") -> BlockCost:
    return BlockCost(name, cost)


def _random_shapes(seed: int, count: int) -> list[BlockCost]:
    """Costs spread like a network's: many small blocks, a few up to 10^9."""
    rng = random.Random(seed)
    return [BlockCost(f"b{i}", int(10 ** rng.uniform(1, 9))) for i in range(count)]


@pytest.fixture(scope="module")
def resnet50_blocks() -> list:
    return model_blocks(build_model("resnet50", 1000))


@pytest.fixture(scope="module")
def resnet50_shapes(resnet50_blocks: list) -> list[BlockCost]:
    return costs_of(resnet50_blocks)


def test_each_block_kind_declares_its_cost() -> None:
    """Kronecker: ``d_A^3 + d_G^3 + d_G d_A (d_A + d_G)`` per group; unit-wise BatchNorm:
    10 per channel; modules without a block have no cost."""
    assert real_block("fc", nn.Linear(2, 2)).inversion_cost == 27 + 8 + 2 * 3 * 5
    depthwise = nn.Conv2d(32, 32, 3, groups=32, bias=False)
    assert real_block("dw", depthwise).inversion_cost == 32 * (729 + 1 + 9 * 10)
    grouped = nn.Conv2d(8, 6, (3, 2), groups=2)  # d_A = 4 * 6 + 1, d_G = 3, 2 groups
    assert real_block("c", grouped).inversion_cost == 2 * (25**3 + 27 + 3 * 25 * 28)
    conv1d = nn.Conv1d(4, 6, 5, bias=False)  # d_A = 20, d_G = 6
    assert real_block("c1", conv1d).inversion_cost == 8000 + 216 + 6 * 20 * 26
    assert real_block("bn", nn.BatchNorm2d(64)).inversion_cost == 640
    assert real_block("b", nn.BatchNorm2d(7, affine=False)) is None
    assert real_block("r", nn.ReLU()) is None


@pytest.mark.parametrize("cost", [-1, 2.5, True, None])
def test_block_cost_validation(cost: object) -> None:
    with pytest.raises(ValueError, match=f"x: cost must be an integer >= 0, got {cost!r}"):
        BlockCost("x", cost)  # type: ignore[arg-type]


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


def test_resnet50_lpt_beats_equal_count(
    resnet50_blocks: list, resnet50_shapes: list[BlockCost]
) -> None:
    shapes = resnet50_shapes
    assert len(shapes) == 107  # 53 conv + 1 FC + 53 BN
    assert sum(isinstance(b, BatchNormBlock) for b in resnet50_blocks) == 53
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


def test_rebalance_on_world_size_change(resnet50_shapes: list[BlockCost]) -> None:
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
        with pytest.raises(ValueError, match=rf"world_size must be an integer >= 1, got {bad}$"):
            assign_blocks([_unit(10)], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lpt, equal_count"):
        assign_blocks([_unit(10)], 2, "round_robin")
    with pytest.raises(ValueError, match=r"^2 owners for 1 blocks$"):
        rank_loads([_unit(10)], [0, 1], 2)
    with pytest.raises(ValueError, match=r"owner 2 outside ranks 0\.\.1$"):
        rank_loads([_unit(10)], [2], 2)
