"""Distributed SP-NGD (hybrid data and model parallelism): placement of curvature blocks on ranks,
flat triangle-packed communication buffers, and the communication stages."""

from __future__ import annotations

from spngd.distributed.assignment import STRATEGIES, BlockCost, assign_blocks, rank_loads
from spngd.distributed.exchange import DistributedConfig, RankFailureError
from spngd.distributed.packing import (
    COMM_DTYPES,
    FlatPacker,
    TensorSpec,
    packed_numel,
    triu_pack,
    triu_unpack,
)

__all__ = [
    "COMM_DTYPES",
    "STRATEGIES",
    "BlockCost",
    "DistributedConfig",
    "FlatPacker",
    "RankFailureError",
    "TensorSpec",
    "assign_blocks",
    "packed_numel",
    "rank_loads",
    "triu_pack",
    "triu_unpack",
]
