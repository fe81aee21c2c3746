"""spngd: Scalable and Practical Natural Gradient Descent (SP-NGD) for PyTorch."""

from __future__ import annotations

from spngd.distributed import DistributedConfig
from spngd.guard import NonFiniteGradientError
from spngd.optimizer import SPNGD
from spngd.refresh import AdaptiveRefresh

__all__ = ["SPNGD", "AdaptiveRefresh", "DistributedConfig", "NonFiniteGradientError"]
__version__ = "0.1.0"
