"""Wall-clock seconds per stage of SP-NGD's work, cheap enough to leave on.

Each stage is timed with two ``time.perf_counter()`` calls and one dict update (about a
microsecond), so the optimizer times every step. On a GPU the figures are the host's time
to issue the work, not the kernels' run time, unless the device is synchronised around it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STAGES = (
    "statistics A",
    "statistics G",
    "statistics F",
    "checks",
    "statistics and gradient communication",
    "refresh test",
    "inversion",
    "preconditioning",
    "result communication",
    "update",
)
"""The stages SPNGD times, in the order a step runs them (statistics during backward)."""


@dataclass
class StageTimes:
    """Seconds spent per stage, summed since construction (or since the counters were
    loaded from a checkpoint)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def snapshot(self) -> dict[str, float]:
        """A copy of the totals, stages in :data:`STAGES` order (others after)."""
        ordered = {stage: self.seconds[stage] for stage in STAGES if stage in self.seconds}
        ordered.update(self.seconds)
        return ordered


def seconds_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-stage seconds between two snapshots (stages that did not run are left out)."""
    return {
        stage: total - before.get(stage, 0.0)
        for stage, total in after.items()
        if total - before.get(stage, 0.0) > 0.0
    }
