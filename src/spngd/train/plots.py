"""Training curves: loss and validation accuracy against optimizer steps and wall time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (shorter at the start), to read noisy losses.

    NaN and inf (the loss of a skipped step) are left out of the mean, so that one bad
    step does not blank the rest of the curve; a window without a finite value gives NaN.
    """
    data = np.asarray(values, dtype=float)
    finite = np.isfinite(data)
    sums = np.cumsum(np.insert(np.where(finite, data, 0.0), 0, 0.0))
    counts = np.cumsum(np.insert(finite, 0, False))
    ends = np.arange(1, len(data) + 1)
    starts = np.maximum(ends - window, 0)
    count = counts[ends] - counts[starts]
    total = sums[ends] - sums[starts]
    return np.divide(total, count, out=np.full(len(data), np.nan), where=count > 0)


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> None:
    """Draw one or more runs' ``metrics.jsonl`` records into a 2x2 PNG.

    Top row against optimizer steps, bottom row against training time (seconds, without
    evaluation); left: training loss (moving average), right: validation accuracy.
    """
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    axes = figure.subplots(2, 2)
    for label, records in runs.items():
        steps = [r for r in records if r["kind"] == "step"]
        evals = [r for r in steps if "val_accuracy" in r]
        window = max(1, len(steps) // 50)
        loss = moving_average([r["loss"] for r in steps], window)
        accuracy = [100.0 * r["val_accuracy"] for r in evals]
        for row, x in enumerate(("step", "time")):
            axes[row, 0].plot([r[x] for r in steps], loss, label=label or None)
            axes[row, 1].plot([r[x] for r in evals], accuracy, marker=".", label=label or None)
    for row, xlabel in enumerate(("optimizer step", "training time (s)")):
        axes[row, 0].set(xlabel=xlabel, ylabel="training loss", yscale="log")
        axes[row, 1].set(xlabel=xlabel, ylabel="validation accuracy (%)")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            if any(runs):
                ax.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
