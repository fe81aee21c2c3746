"""spngd: Scalable and Practical Natural Gradient Descent (SP-NGD) for PyTorch."""

from __future__ import annotations

from spngd.optimizer import SPNGD

__all__ = ["SPNGD"]
__version__ = "0.1.0"
