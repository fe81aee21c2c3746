"""Training utilities: model definitions and helpers for the SP-NGD experiments."""

from __future__ import annotations
