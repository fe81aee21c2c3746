"""Per-stage timers."""

from __future__ import annotations

import time

import pytest

from spngd.timing import STAGES, StageTimes, seconds_since


def test_stages_accumulate_and_snapshot_in_step_order() -> None:
    times = StageTimes()
    for stage in ("update", "statistics A", "update", "custom"):
        with times.measure(stage):
            time.sleep(0.01)
    snapshot = times.snapshot()
    assert list(snapshot) == ["statistics A", "update", "custom"]
    assert snapshot["update"] >= 0.02 and 0.01 <= snapshot["statistics A"] < snapshot["update"]
    assert set(STAGES) >= {"statistics A", "update"}


def test_a_stage_that_raises_is_still_timed() -> None:
    times = StageTimes()
    with pytest.raises(KeyError), times.measure("inversion"):
        time.sleep(0.01)
        raise KeyError
    assert times.seconds["inversion"] >= 0.01


def test_seconds_since_leaves_out_stages_that_did_not_run() -> None:
    before = {"inversion": 1.0, "update": 2.0}
    after = {"inversion": 1.5, "update": 2.0, "checks": 0.25}
    assert seconds_since(before, after) == {"inversion": 0.5, "checks": 0.25}
