"""When to recompute statistics and inverses: SP-NGD's adaptive frequency, or fixed intervals.

Adaptive (spec section 6.2, all knobs [R] because the paper's values could not be read):
every statistic key (a layer's ``A``, ``G``, or BatchNorm ``F``) has an interval. At a
refresh step the fresh estimate ``X_new`` is compared with the statistic in use ``X``
by ``d = ||X_new - X||_F / max(||X||_F, 1e-12)``; ``d <= alpha`` grows the interval
(``double`` or ``plus1``, capped), otherwise it shrinks (``reset`` to 1 or ``halve``). The
next refresh is ``interval`` steps later. The first ``warmup_steps`` steps always refresh.
With ``stat_decay = 0`` (the default) ``X`` is the previous fresh estimate, exactly the
spec's rule; with a running average it is the average in use. ``alpha < 0`` refreshes
every step; ``alpha = inf`` grows every interval to the cap.

A layer's inverse is recomputed when any of its statistics was refreshed (pi couples the
two Kronecker factors) or its damping changed. Fixed mode (``stat_interval=k``) computes
all statistics every ``k`` steps and inverses every ``inverse_interval`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Key = tuple[str, int]
"""A statistic: (layer name, index of the statistic within the layer's block)."""


GROW_RULES = ("double", "plus1")
SHRINK_RULES = ("reset", "halve")


@dataclass(frozen=True, kw_only=True)
class AdaptiveRefresh:
    """Knobs of the adaptive rule (defaults: spec section 6.2)."""

    alpha: float = 0.1
    grow: Literal["double", "plus1"] = "double"
    shrink: Literal["reset", "halve"] = "reset"
    max_interval: int = 32
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        if math.isnan(self.alpha):
            raise ValueError("refresh alpha must be a number (negative: refresh every step)")
        if self.grow not in GROW_RULES:
            rules = " or ".join(map(repr, GROW_RULES))
            raise ValueError(f"refresh grow must be {rules}, got {self.grow!r}")
        if self.shrink not in SHRINK_RULES:
            rules = " or ".join(map(repr, SHRINK_RULES))
            raise ValueError(f"refresh shrink must be {rules}, got {self.shrink!r}")
        if self.max_interval < 1:
            raise ValueError(f"refresh max_interval must be >= 1, got {self.max_interval}")
        if self.warmup_steps < 0:
            raise ValueError(f"refresh warmup_steps must be >= 0, got {self.warmup_steps}")

    def grown(self, interval: int) -> int:
        return min(2 * interval if self.grow == "double" else interval + 1, self.max_interval)

    def shrunk(self, interval: int) -> int:
        return 1 if self.shrink == "reset" else max(1, interval // 2)


def relative_change(reference: torch.Tensor, fresh: torch.Tensor) -> float:
    """``||fresh - reference||_F / max(||reference||_F, 1e-12)`` (spec metric ``rel_fro``)."""
    return ((fresh - reference).norm() / reference.norm().clamp(min=1e-12)).item()


class RefreshPolicy:
    """Decides, per statistic key and step, whether to compute; counts what was done.

    State is identical on every rank as long as every rank observes the same (globally
    reduced) statistics, so decisions never diverge.
    """

    def __init__(
        self,
        stat_interval: int | None,
        inverse_interval: int | None,
        adaptive: AdaptiveRefresh,
    ) -> None:
        for name, value in (
            ("stat_interval", stat_interval),
            ("inverse_interval", inverse_interval),
        ):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        if inverse_interval is not None and stat_interval is None:
            raise ValueError(
                "inverse_interval needs a fixed stat_interval (with the adaptive "
                "rule inverses follow the refreshed statistics)"
            )
        self.stat_interval = stat_interval
        self.inverse_interval = inverse_interval
        self.adaptive = adaptive
        self.interval: dict[Key, int] = {}
        self.next_step: dict[Key, int] = {}
        self.counts: dict[str, dict[str, int]] = {}

    @property
    def is_adaptive(self) -> bool:
        return self.stat_interval is None

    def needs(self, key: Key, step: int) -> bool:
        """Whether statistic ``key`` is computed at optimizer step ``step``."""
        if not self.is_adaptive:
            return step % self.stat_interval == 0  # type: ignore[operator]
        return step < self.adaptive.warmup_steps or step >= self.next_step.get(key, 0)

    def observe(
        self, key: Key, step: int, in_use: torch.Tensor | None, fresh: torch.Tensor
    ) -> None:
        """Adapt ``key``'s interval after computing ``fresh`` at ``step``."""
        if not self.is_adaptive:
            return
        interval = self.interval.get(key, 1)
        if in_use is not None and step >= self.adaptive.warmup_steps:
            similar = relative_change(in_use, fresh) <= self.adaptive.alpha
            interval = self.adaptive.grown(interval) if similar else self.adaptive.shrunk(interval)
        self.interval[key] = interval
        self.next_step[key] = step + interval

    def inverse_due(self, step: int, refreshed: bool) -> bool:
        """Whether a layer whose statistics were (not) refreshed at ``step`` re-inverts."""
        if self.inverse_interval is None:
            return refreshed
        return step % self.inverse_interval == 0

    def count(self, layer: str, what: str, done: bool) -> None:
        """Tally one computation of ``what`` (``stats``, ``inverses``, or one statistic's
        name such as ``A``) as done or skipped."""
        counts = self.counts.setdefault(layer, dict.fromkeys(COUNTERS, 0))
        counts.setdefault(f"{what}_computed", 0)
        counts.setdefault(f"{what}_skipped", 0)
        counts[f"{what}_{'computed' if done else 'skipped'}"] += 1

    @staticmethod
    def summarize(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """Per layer and ``"total"``: statistics (all, and per statistic name) and inverses
        computed and skipped."""
        report = {layer: dict(c) for layer, c in counts.items()}
        names = dict.fromkeys(COUNTERS)
        for c in counts.values():
            names.update(dict.fromkeys(c))
        report["total"] = {name: sum(c.get(name, 0) for c in counts.values()) for name in names}
        return report

    def state_dict(self) -> dict[str, object]:
        return {
            "interval": dict(self.interval),
            "next_step": dict(self.next_step),
            "counts": {layer: dict(c) for layer, c in self.counts.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.interval = dict(state["interval"])  # type: ignore[call-overload]
        self.next_step = dict(state["next_step"])  # type: ignore[call-overload]
        self.counts = {layer: dict(c) for layer, c in state["counts"].items()}  # type: ignore[attr-defined]


COUNTERS = ("stats_computed", "stats_skipped", "inverses_computed", "inverses_skipped")


def computed_shares(counts: dict[str, int]) -> dict[str, float]:
    """From one layer's (or the total's) counts of :meth:`SPNGD.stats`, the share computed
    of all statistics (``stats``), of each statistic by name (``A``, ``G``, ``F``) and of
    the inverses, e.g. ``{"stats": 0.9, "A": 0.6, "G": 1.0, "inverses": 1.0}``."""
    shares = {}
    for key, done in counts.items():
        what, _, outcome = key.rpartition("_")
        total = done + counts.get(f"{what}_skipped", 0)
        if outcome == "computed" and total:
            shares[what] = done / total
    return shares
