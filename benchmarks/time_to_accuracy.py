"""Time to accuracy: ``spngd compare`` over several seeds, SGD against SP-NGD on the clock.

For each seed the script runs ``spngd compare --seed S`` with any further options given
after ``--`` (in a fresh process for each seed, as a user runs the command: SP-NGD, then
SGD, at compare's defaults unless overridden, each run after compare's untimed warm-up
step), reads both runs' ``metrics.jsonl`` and prints the steps and the
training time (the records' ``time``, which leaves out validation) to the target validation
accuracy, the accuracy at the end, and which optimizer got there first. Then the summary:
the seeds SP-NGD won on the clock, the mean steps over the seeds where both reached the
target, the median ratio of SP-NGD's step time to SGD's over each run's first steps (the
adaptive refresh's warm-up, ten steps, which refresh everything: compare's runs reach the
target within or just after it), and the mean final accuracies. Seeds are run one after the other,
SGD and SP-NGD of one seed back to back, with glibc's malloc thresholds pinned; the
machine's load still moves single times by 20-40% on our shared 2-core machines, so read
the counts over many seeds, not one seed's times.

Target: SP-NGD reaches the target in less training time than SGD on every seed.

    python benchmarks/time_to_accuracy.py [--seeds 0 1 2 3] [--target 0.97] [--out DIR]
        [-- COMPARE OPTIONS, e.g. --spngd-weight-decay 0]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pinned_malloc import pin_malloc
from spngd.refresh import AdaptiveRefresh
from spngd.train.config import OPTIMIZERS
from spngd.train.runfolder import METRICS

COST_STEPS = AdaptiveRefresh.warmup_steps
"""Steps over which each run's step time is compared: the adaptive refresh's warm-up."""


@dataclass(frozen=True)
class Run:
    """One optimizer's run of one seed: steps and training seconds to the target (inf when
    never reached), its final validation accuracy, and its mean step time over the first
    :data:`COST_STEPS` steps."""

    steps: float
    seconds: float
    final: float
    step_seconds: float


def read_run(folder: Path, target: float) -> Run:
    """The :class:`Run` recorded in ``folder/metrics.jsonl``."""
    records = [json.loads(line) for line in (folder / METRICS).read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    validated = [r for r in steps if "val_accuracy" in r]
    if not validated:
        raise SystemExit(f"{folder}: no step was validated; keep --eval-every-steps at 1")
    reached = [r for r in validated if r["val_accuracy"] >= target]
    first = steps[: min(COST_STEPS, len(steps))]
    return Run(
        steps=float(reached[0]["step"]) if reached else math.inf,
        seconds=reached[0]["time"] if reached else math.inf,
        final=validated[-1]["val_accuracy"],
        step_seconds=first[-1]["time"] / len(first),
    )


def compare_seed(seed: int, target: float, out: Path, options: list[str]) -> dict[str, Run]:
    """Run ``spngd compare --seed seed`` into ``out`` and read both runs."""
    argv = ["compare", "--seed", str(seed), "--out", str(out), "--no-progress", *options]
    command = [sys.executable, "-m", "spngd.train.cli", *argv]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"spngd {' '.join(argv)} exited with status {done.returncode}:\n{done.stderr}"
        )
    return {name: read_run(out / name, target) for name in OPTIMIZERS}


def _cell(run: Run) -> str:
    reached = f"{run.steps:3.0f} steps {run.seconds:5.2f} s" if math.isfinite(run.steps) else ""
    reached = reached or f"{'never':<17}"
    return f"{reached}  {100 * run.final:5.1f}%"


def _faster(runs: dict[str, Run]) -> str:
    sgd, spngd = runs["sgd"].seconds, runs["spngd"].seconds
    if sgd == spngd:  # neither reached the target
        return "-"
    return "SP-NGD" if spngd < sgd else "SGD"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--target", type=float, default=0.97, help="validation accuracy")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a scratch folder)")
    parser.add_argument("compare_options", nargs="*", help="options for spngd compare, after --")
    args = parser.parse_args()
    pin_malloc()
    results: dict[int, dict[str, Run]] = {}
    command = " ".join(["spngd compare", *args.compare_options])
    print(f"{command}: to {100 * args.target:g}% validation accuracy")
    print(f"{'seed':>4}  {'SGD (steps, time, final)':<33}  {'SP-NGD':<33}  faster")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        for seed in args.seeds:
            runs = results[seed] = compare_seed(
                seed, args.target, root / f"seed{seed}", args.compare_options
            )
            cells = f"{_cell(runs['sgd']):<33}  {_cell(runs['spngd']):<33}"
            print(f"{seed:>4}  {cells}  {_faster(runs)}", flush=True)
    won = [seed for seed, runs in results.items() if _faster(runs) == "SP-NGD"]
    both = [
        r
        for r in results.values()
        if math.isfinite(r["sgd"].steps) and math.isfinite(r["spngd"].steps)
    ]
    cost = statistics.median(
        r["spngd"].step_seconds / r["sgd"].step_seconds for r in results.values()
    )
    print(f"SP-NGD faster on {len(won)} of {len(results)} seeds {won}  (target: all)")
    if both:
        sgd_steps = statistics.fmean(r["sgd"].steps for r in both)
        spngd_steps = statistics.fmean(r["spngd"].steps for r in both)
        print(
            f"mean steps where both reached the target ({len(both)} seeds): SGD {sgd_steps:.1f}, "
            f"SP-NGD {spngd_steps:.1f} ({spngd_steps / sgd_steps:.2f}x)"
        )
    print(f"SP-NGD's step over SGD's, first {COST_STEPS} steps, median over seeds: {cost:.2f}x")
    finals = {
        name: statistics.fmean(r[name].final for r in results.values()) for name in OPTIMIZERS
    }
    print(
        f"final accuracy, mean: SGD {100 * finals['sgd']:.2f}%, SP-NGD {100 * finals['spngd']:.2f}%"
    )


if __name__ == "__main__":
    main()
