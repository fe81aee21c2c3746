"""Large-batch evidence: optimizer steps SGD and SP-NGD need to reach a validation accuracy.

ResNet-20 on the embedded 8x8 digits (1,497 training / 300 validation images) at batch 1,024,
32x ``spngd train``'s default of 32 (each pass over the data is one step on a random 1,024 of
the 1,497 images). Both optimizers use the same data, model, epochs, weights
rescaling and polynomial decay; SGD adds warm-up and weight decay and gets its learning rate
from a small grid (the grid point with the fewest mean steps to the target wins), SP-NGD
uses one fixed setting. Validation runs after every step. For each seed the script prints
the first step at which validation accuracy reached the target and the accuracy at the end;
then SP-NGD's mean steps over the best SGD's, and SP-NGD's mean final accuracy against the
best mean final accuracy of any SGD learning rate.

Issue 4's target: ratio <= 0.5, final accuracy within 0.5 points. glibc's malloc thresholds
are pinned (the script re-executes itself) and torch uses 2 threads. SP-NGD's setting was
picked from single-seed runs at this batch (lr 0.1/damping 1e-2: 25 steps to 97%; lr
0.2/damping 3e-2: 17); results vary by several steps from seed to seed, and between thread
counts, which change the floating-point order.

    python benchmarks/steps_to_accuracy.py [--seeds 0 1 2] [--target 0.97] [--epochs 60]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spngd.train.config import resolve_config
from spngd.train.runfolder import RunFolder
from spngd.train.trainer import train

PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
SHARED = {"data": "digits", "model": "resnet20", "batch_size": 1024, "device": "cpu"}
SGD = {"optimizer": "sgd", "warmup_epochs": 5.0, "weight_decay": 5e-4, "momentum": 0.9}
SPNGD = {"optimizer": "spngd", "lr": 0.2, "damping": 3e-2, "momentum": 0.9, "weight_decay": 0.0}


def pin_malloc() -> None:
    """Re-execute this script with glibc's malloc thresholds pinned, unless they are."""
    if any(os.environ.get(key) != value for key, value in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_MALLOC})


@dataclass(frozen=True)
class Outcome:
    """One run: the first step at or above the target (inf if never) and the final accuracy."""

    steps: float
    final: float


def run(options: dict[str, Any], target: float, folder: Path) -> Outcome:
    config = resolve_config(
        {**options, "eval_every_steps": 1, "progress": False, "out": str(folder)}
    )
    with RunFolder(folder) as run_folder:
        result = train(config, run_folder)
    reached = [r["step"] for r in result.records if r.get("val_accuracy", 0.0) >= target]
    return Outcome(float(reached[0]) if reached else math.inf, result.val_accuracy)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf


def _row(name: str, outcomes: list[Outcome]) -> str:
    steps = " ".join(f"{o.steps:>4.0f}" if math.isfinite(o.steps) else "   -" for o in outcomes)
    finals = " ".join(f"{100 * o.final:5.1f}" for o in outcomes)
    mean_steps = _mean([o.steps for o in outcomes])
    mean_final = 100 * statistics.fmean(o.final for o in outcomes)
    return f"{name:<18} {steps}   {mean_steps:>6.1f}   {finals}   {mean_final:5.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.97, help="validation accuracy")
    parser.add_argument("--epochs", type=float, default=60.0)
    parser.add_argument("--sgd-lrs", type=float, nargs="+", default=[0.2, 0.4, 0.8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_malloc()
    torch.set_num_threads(args.threads)
    shared = {**SHARED, "epochs": args.epochs, "threads": args.threads}
    contenders = {f"sgd lr={lr:g}": {**shared, **SGD, "lr": lr} for lr in args.sgd_lrs}
    spngd_name = f"sp-ngd lr={SPNGD['lr']:g}"
    contenders[spngd_name] = {**shared, **SPNGD}
    print(
        f"ResNet-20 on digits, batch {SHARED['batch_size']}, {args.epochs:g} epochs, "
        f"target {100 * args.target:g}% validation accuracy, seeds {args.seeds}"
    )
    print(f"{'':<18} {'steps to target':<{5 * len(args.seeds)}} {'mean':>6}   final accuracy (%)")
    results: dict[str, list[Outcome]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, options in contenders.items():
            results[name] = [
                run({**options, "seed": seed}, args.target, Path(scratch) / f"{name}-{seed}")
                for seed in args.seeds
            ]
            print(_row(name, results[name]), flush=True)
    sgd = {name: outcomes for name, outcomes in results.items() if name.startswith("sgd")}
    best = min(sgd, key=lambda name: _mean([o.steps for o in sgd[name]]))
    ratio = _mean([o.steps for o in results[spngd_name]]) / _mean([o.steps for o in sgd[best]])
    best_final = max(statistics.fmean(o.final for o in outcomes) for outcomes in sgd.values())
    spngd_final = statistics.fmean(o.final for o in results[spngd_name])
    gap = 100 * (best_final - spngd_final)
    print(f"steps SP-NGD / best SGD ({best}): {ratio:.2f}  (target <= 0.5: {ratio <= 0.5})")
    print(
        f"final accuracy SP-NGD {100 * spngd_final:.2f}% vs best SGD {100 * best_final:.2f}%: "
        f"{gap:+.2f} points behind  (target <= 0.5: {gap <= 0.5})"
    )


if __name__ == "__main__":
    main()
