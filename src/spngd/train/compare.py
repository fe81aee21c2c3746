"""``spngd compare``: train with several optimizers on the same data, one plot of all."""

from __future__ import annotations

from pathlib import Path

from spngd.train.config import TrainConfig
from spngd.train.plots import plot_runs
from spngd.train.runfolder import RunFolder
from spngd.train.trainer import RunResult, Trainer, run_title


def compare(configs: dict[str, TrainConfig], out: Path) -> dict[str, RunResult]:
    """Train each labelled config into its run folder, each warmed up first
    (:meth:`~spngd.train.trainer.Trainer.fit`); draw all into ``out/compare.png``."""
    results = {}
    for label, config in configs.items():
        with RunFolder(config.out, resumable=False) as run:
            results[label] = Trainer(config, run).fit(warm_up=True)
    first = next(iter(configs.values()))
    plot_runs(
        {label: result.records for label, result in results.items()},
        out / "compare.png",
        f"{' vs '.join(configs)}: {run_title(first)}",
    )
    return results
