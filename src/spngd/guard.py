"""Skipping steps whose gradients hold NaN or inf: one policy for SPNGD and plain SGD.

A bad step is skipped (the caller leaves parameters, momentum and curvature untouched),
counted and warned about; ``max_bad_steps`` bad steps in a row raise
:class:`NonFiniteGradientError`, so a training loop can stop with its last good
checkpoint instead of writing NaNs into it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from spngd.settings import Rule, check, int_rule


class NonFiniteGradientError(RuntimeError):
    """Too many consecutive steps had NaN or inf gradients."""


def any_nonfinite(
    grads: Sequence[torch.Tensor], device: torch.device | None = None
) -> torch.Tensor:
    """``1.0`` if any gradient entry is NaN or inf, else ``0.0`` (a 0-dim float tensor on the
    first gradient's device, or ``device`` when there are none).

    One float64 sum per gradient (of the real and imaginary parts of a complex one) and one
    over those, without a host sync: this runs every step. A sum is NaN or inf if an entry
    is (``inf - inf`` is NaN), and finite entries of float32 or narrower cannot overflow
    float64; a float64 tensor whose entries sum beyond float64's range (about 1.8e308)
    counts as bad. Over ResNet-20's 65 gradients on 2 CPU threads: 0.22 ms against 0.62 for
    a fused max-norm, and about as long as concatenating them for one sum, which copies
    every gradient.
    """
    if not grads:
        return torch.zeros((), device=device)
    target = grads[0].device
    sums = [
        (torch.view_as_real(grad) if grad.is_complex() else grad).sum(dtype=torch.float64)
        for grad in grads
    ]
    return (~torch.isfinite(torch.stack([s.to(target) for s in sums]).sum())).float()


GUARD_RULES: dict[str, Rule] = {"max_bad_steps": int_rule(1)}


class NonFiniteGuard:
    """Counts skipped steps and decides when to stop.

    ``name`` and ``advice`` go into the messages (e.g. ``"SPNGD"``, ``"Lower the learning
    rate"``).
    """

    def __init__(self, name: str, max_bad_steps: int, advice: str) -> None:
        check(name, {"max_bad_steps": max_bad_steps}, GUARD_RULES)
        self.name = name
        self.max_bad_steps = max_bad_steps
        self.advice = advice
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0

    def skip(self, bad: bool) -> bool:
        """Record one step; True if it must be skipped. Raises after too many in a row."""
        if not bad:
            self.bad_steps_in_a_row = 0
            return False
        self.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise NonFiniteGradientError(
                f"{self.name}: {self.bad_steps_in_a_row} steps in a row had NaN or inf "
                f"gradients (max_bad_steps={self.max_bad_steps}); stopping. {self.advice}, "
                "and resume from the last good checkpoint."
            )
        warnings.warn(
            f"{self.name}: NaN or inf gradient; step skipped ({self.bad_steps_in_a_row} in a "
            f"row, {self.skipped_steps} in all)",
            RuntimeWarning,
            stacklevel=4,
        )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "bad_steps_in_a_row": self.bad_steps_in_a_row}

    def pop_state(self, state: dict[str, Any]) -> None:
        """Restore the counters from an optimizer state dict, taking their entries out."""
        self.skipped_steps = state.pop("skipped_steps", 0)
        self.bad_steps_in_a_row = state.pop("bad_steps_in_a_row", 0)


class GuardedSteps:
    """What an optimizer with a :class:`NonFiniteGuard` (its ``guard``) says of its skips."""

    guard: NonFiniteGuard

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``step()`` was skipped for NaN or inf gradients."""
        return self.guard.bad_steps_in_a_row > 0

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for NaN or inf gradients so far (not those a GradScaler skips)."""
        return self.guard.skipped_steps
