"""Training curves from metrics records."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from spngd.train.plots import moving_average, plot_runs


def test_the_loss_curve_leaves_out_skipped_steps() -> None:
    """A skipped step's NaN or inf loss must not blank the moving average from there on."""
    curve = moving_average([1.0, 3.0, math.nan, 5.0, math.inf, math.nan, math.nan], window=2)
    np.testing.assert_allclose(curve[:5], [1.0, 2.0, 3.0, 5.0, 5.0])
    assert math.isnan(curve[6])  # a window with no finite value


def test_plot_runs_writes_a_png_for_several_runs(tmp_path: Path) -> None:
    def records(scale: float) -> list[dict]:
        steps = [
            {"kind": "step", "step": s, "time": 0.1 * s, "loss": scale / s}
            | ({"val_accuracy": 1 - 1 / s} if s % 2 == 0 else {})
            for s in range(1, 21)
        ]
        return [*steps, {"kind": "epoch", "step": 20}]

    path = tmp_path / "plot.png"
    plot_runs({"SGD": records(2.0), "SP-NGD": records(1.0)}, path, "two runs")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
