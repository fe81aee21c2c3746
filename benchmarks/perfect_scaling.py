"""Perfect scaling from batch 128 to 512 on mnist1d, over ten seeds: whether momentum SGD
and SP-NGD stay within 1.5x of perfect scaling, ``steps(512) <= 1.5 steps(128) / 4``.

``batch_scaling.py`` tunes each optimizer on one seed and takes medians of three; at these
batches single seeds move by 30-50% from one setting to the next (docs/benchmarks.md), too
much to tell a ratio of 0.375 from 0.45. Here every point of a grid of the same size for
each optimizer and batch (three learning rates by three momenta; SP-NGD's damping fixed
per batch) runs on every seed, and each point's median counts; the best
medians at the two batches give the ratio. When the best point lies on its grid's edge,
the grid is widened by one value of that knob beyond it, up to :data:`MAX_WIDENINGS`
times (as ``batch_scaling.py`` widens its learning rates); a best point still there is
flagged. Runs are ``batch_scaling.py``'s (``train_run``: the same
model, data order per seed, validation schedule and budget), without a warm-up, which
both optimizers preferred at these batches when the study tuned it. A run still short of
the target at twice the best median so far stops and counts as not reaching it.

The best settings then run on ten held-out seeds: the best of many medians on the tuning
seeds is biased low (by chance some setting's seeds ran fast), so the held-out medians are
the ones to judge the ratio by. ``--settings-from`` skips the tuning and takes each best
setting from an earlier run's JSON, to run it on more held-out seeds. Past step 20 the
validation runs on ``batch_scaling.py``'s schedule (each time the step count has grown
by ``EVAL_GROWTH``), one validation point being about 8% of the steps at 512;
``--eval-every-step`` validates at every step, so the counts are not
rounded up to the next point. Writes ``perfect_scaling.json`` (every run) into ``--out``
and prints each point's steps per seed and median, the best per optimizer and batch, and
the ratios on the tuning and on the held-out seeds. Each run is also appended to
``perfect_scaling.runs.jsonl`` as it ends, so a study stopped part-way (it runs for hours)
keeps the runs it finished.

    python benchmarks/perfect_scaling.py [--optimizers SGD SP-NGD] [--seeds 0 1 ... 9]
        [--held-out-seeds 10 11 ... 19] [--settings-from JSON] [--eval-every-step]
        [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from batch_scaling import (
    FULL,
    MAX_WIDENINGS,
    PERFECT_SCALING_SLACK,
    Run,
    RunLog,
    commit,
    format_setting,
    load_study_data,
    round_lr,
    train_run,
)
from pinned_malloc import pin_malloc

BATCHES = (128, 512)
MODEL = "resnet8-1d"
SEEDS = tuple(range(10))
HELD_OUT_SEEDS = tuple(range(10, 20))
"""Seeds the best settings run on after tuning: the tuning seeds' best medians are the
lowest of many noisy ones (biased low), these are not."""
STUDY = replace(FULL, warmups=(0,))
"""The data, target and budget of ``batch_scaling.py``'s full study, without a warm-up."""

GRIDS: dict[str, dict[int, dict[str, tuple[float, ...]]]] = {
    "SGD": {
        128: {"lr": (0.2, 0.283, 0.4), "momentum": (0.8, 0.9, 0.95)},
        512: {"lr": (0.4, 0.566, 0.8), "momentum": (0.8, 0.9, 0.95)},
    },
    "SP-NGD": {
        128: {"lr": (0.00663, 0.00938, 0.0133), "momentum": (0.6, 0.7, 0.8), "damping": (0.001,)},
        512: {"lr": (0.0375, 0.0531, 0.0751), "momentum": (0.6, 0.7, 0.8), "damping": (0.0003,)},
    },
}
"""Per optimizer and batch, each knob's values, the grid being every combination of three
learning rates by three momenta for both: SGD's learning rates centred on those
``batch_scaling.py --warmups 0 10`` tuned (without a warm-up), momentum around the study's
0.9; SP-NGD's around the best of twenty-seed screens, at each batch's best damping from
ten-seed screens (docs/benchmarks.md has them all)."""


Axes = dict[str, list[float]]
"""A grid: each knob's values in ascending order, the grid being every combination."""


def points(axes: Axes) -> list[dict[str, float]]:
    """Every setting of the grid, the centre first (it sets the bound that stops hopeless
    runs early)."""
    settings = [
        dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())
    ]
    centre = {name: values[len(values) // 2] for name, values in axes.items()}
    return sorted(settings, key=lambda setting: setting != centre)


def edges(axes: Axes, setting: dict[str, float]) -> list[tuple[str, int]]:
    """The knobs (and ends: 0 low, -1 high) where ``setting`` takes an end value of a knob
    with several values."""
    return [
        (name, end)
        for name, values in axes.items()
        if len(values) > 1
        for end in (0, -1)
        if setting[name] == values[end]
    ]


def beyond(name: str, edge: float, inner: float) -> float:
    """The value one grid step beyond ``edge`` from its neighbour ``inner``: geometric, in
    ``1 - momentum`` for a momentum (not below 0: then ``edge`` itself when it is 0)."""
    if name == "momentum":
        return max(0.0, round(1 - (1 - edge) ** 2 / (1 - inner), 4))
    return round_lr(edge**2 / inner)


def tune(
    axes: dict[str, tuple[float, ...]], median_of: Callable[[dict[str, float], float], float]
) -> tuple[float, dict[str, float], Axes]:
    """The best median over the grid ``axes``, widened by one value beyond the best's edge
    up to :data:`MAX_WIDENINGS` times; ``median_of(setting, bound)`` runs a setting, its
    runs stopping past ``bound`` steps. Returns the best median, its setting and the grid
    as widened."""
    grid = {name: list(values) for name, values in axes.items()}
    medians: dict[tuple[float, ...], tuple[float, dict[str, float]]] = {}

    def best() -> tuple[float, dict[str, float]]:
        return min(medians.values(), key=lambda entry: entry[0])

    def run_new() -> None:
        for setting in points(grid):
            key = tuple(setting.values())
            if key not in medians:
                bound = 2 * best()[0] if medians else math.inf
                medians[key] = (median_of(setting, bound), setting)

    run_new()
    for _ in range(MAX_WIDENINGS):
        edge = edges(grid, best()[1])
        if not edge:
            break
        name, end = edge[0]
        values = grid[name]
        inner = values[1] if end == 0 else values[-2]
        value = beyond(name, values[end], inner)
        if value == values[end]:  # no room beyond (momentum 0)
            break
        if end == 0:
            values.insert(0, value)
        else:
            values.append(value)
        run_new()
    return *best(), grid


def recorded_best(
    record: dict[str, Any], optimizer: str, batch: int
) -> tuple[float, dict[str, float], Axes]:
    """What :func:`tune` returned in the run ``record`` (a ``perfect_scaling.json``) for
    ``optimizer`` at ``batch``: the best median over its tuning seeds, its setting, and the
    grid; from its ``best`` entry, or, in a file without one, from its runs (the lowest
    median, the first in run order among equals)."""
    name = f"{optimizer} {batch}"
    if name not in record["grids"]:
        raise SystemExit(f"--settings-from: no {optimizer} runs at batch {batch} in the file")
    grid = record["grids"][name]
    if "best" in record:
        best = record["best"][name]
        return best["median"], best["setting"], grid
    steps: dict[str, list[float]] = {}
    settings: dict[str, dict[str, float]] = {}
    for run in record["runs"]:
        if (run["optimizer"], run["batch"]) == (optimizer, batch) and run["seed"] in record[
            "seeds"
        ]:
            key = json.dumps(run["setting"], sort_keys=True)
            steps.setdefault(key, []).append(run["steps"])
            settings[key] = run["setting"]
    if not steps:
        raise SystemExit(f"--settings-from: no {optimizer} runs at batch {batch} in the file")
    key = min(steps, key=lambda k: statistics.median(steps[k]))
    return statistics.median(steps[key]), settings[key], grid


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--optimizers", nargs="+", choices=list(GRIDS), default=list(GRIDS))
    parser.add_argument(
        "--seeds", type=int, nargs="+", help=f"tuning seeds (default {' '.join(map(str, SEEDS))})"
    )
    parser.add_argument(
        "--held-out-seeds",
        type=int,
        nargs="*",
        default=list(HELD_OUT_SEEDS),
        help="seeds the best settings run on afterwards (none: skip)",
    )
    parser.add_argument(
        "--settings-from",
        type=Path,
        help="skip the tuning: the best settings and tuning seeds of this perfect_scaling.json",
    )
    parser.add_argument(
        "--eval-every-step",
        action="store_true",
        help="validate at every step (not on batch_scaling.py's schedule)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the JSON")
    args = parser.parse_args()
    recorded = None
    if args.settings_from is not None:
        if args.seeds is not None:
            parser.error("--settings-from takes the tuning seeds from the file: drop --seeds")
        if not args.held_out_seeds:
            parser.error("--settings-from needs --held-out-seeds to run the settings on")
        try:
            recorded = json.loads(args.settings_from.read_text())
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"--settings-from {args.settings_from}: {error}")
        missing = [
            key
            for key in ("seeds", "grids", "runs")
            if not isinstance(recorded, dict) or key not in recorded
        ]
        if missing:
            parser.error(
                f"--settings-from {args.settings_from}: not a perfect_scaling.json "
                f"(no {', '.join(missing)})"
            )
        if set(args.held_out_seeds) & set(recorded.get("held_out_seeds") or []):
            parser.error("--held-out-seeds must not repeat the file's held-out seeds")
        args.seeds = recorded["seeds"]
    elif args.seeds is None:
        args.seeds = list(SEEDS)
    if set(args.seeds) & set(args.held_out_seeds):
        parser.error("--held-out-seeds must not repeat the tuning seeds")
    pin_malloc()
    measured_at = commit()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as spngd train and batch_scaling.py do
    study = replace(STUDY, seeds=tuple(args.seeds))
    if args.eval_every_step:
        study = replace(study, eval_growth=1.0)
    data = load_study_data(study.data_size)
    print(
        f"{MODEL} on mnist1d ({len(data.train_y)} training examples), steps to "
        f"{100 * study.target:g}% validation accuracy, seeds {args.seeds}, {args.threads} "
        f"threads, commit {measured_at}",
        flush=True,
    )
    runs_log = RunLog(args.out / "perfect_scaling.runs.jsonl")

    def median_over(
        optimizer: str, batch: int, setting: dict[str, float], bound: float, seeds: list[int]
    ) -> float:
        mine: list[Run] = []
        for seed in seeds:
            mine.append(train_run(optimizer, setting, batch, seed, study, data, MODEL, bound))
            runs_log.append(mine[-1])
        median = statistics.median(run.steps for run in mine)
        steps = ", ".join(f"{run.steps:.0f}" if math.isfinite(run.steps) else "-" for run in mine)
        print(
            f"{optimizer:<7} batch {batch:>4} {format_setting(setting):>14}: {steps}; "
            f"median {median:g}" + (" (held-out seeds)" if seeds != args.seeds else ""),
            flush=True,
        )
        return median

    best: dict[tuple[str, int], tuple[float, dict[str, float], Axes]] = {}
    for optimizer, batch in itertools.product(args.optimizers, BATCHES):
        best[(optimizer, batch)] = (
            recorded_best(recorded, optimizer, batch)
            if recorded is not None
            else tune(
                GRIDS[optimizer][batch],
                functools.partial(median_over, optimizer, batch, seeds=args.seeds),
            )
        )
    held_out = (
        {
            (optimizer, batch): median_over(
                optimizer, batch, best[(optimizer, batch)][1], math.inf, args.held_out_seeds
            )
            for optimizer, batch in best
        }
        if args.held_out_seeds
        else {}
    )
    limit = PERFECT_SCALING_SLACK * BATCHES[0] / BATCHES[1]

    def verdict(small: float, large: float) -> str:
        ratio = large / small
        return (
            f"steps({BATCHES[1]}) / steps({BATCHES[0]}) {ratio:.3f}, within "
            f"{PERFECT_SCALING_SLACK}x of perfect scaling: {'yes' if ratio <= limit else 'no'} "
            f"(<= {limit:.3f})"
        )

    summary = []
    for optimizer in args.optimizers:
        (small, small_setting, _), (large, large_setting, _) = (
            best[(optimizer, b)] for b in BATCHES
        )
        on_edge = [
            f"batch {b}" for b in BATCHES if edges(best[(optimizer, b)][2], best[(optimizer, b)][1])
        ]
        summary.append(
            f"{optimizer}: median {small:g} steps at {BATCHES[0]} "
            f"({format_setting(small_setting)}), {large:g} at {BATCHES[1]} "
            f"({format_setting(large_setting)}); {verdict(small, large)}"
            + (f"; best on the grid's edge at {', '.join(on_edge)}" if on_edge else "")
        )
        if held_out:
            small, large = (held_out[(optimizer, b)] for b in BATCHES)
            summary.append(
                f"{optimizer}, the same settings on held-out seeds {args.held_out_seeds}: "
                f"median {small:g} steps at {BATCHES[0]}, {large:g} at {BATCHES[1]}; "
                f"{verdict(small, large)}"
            )
    print("\n".join(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "commit": measured_at,
        "command": " ".join(["python", *sys.argv]),
        "grids": {f"{o} {b}": best[(o, b)][2] for o, b in best},
        "best": {
            f"{o} {b}": {
                "setting": best[(o, b)][1],
                "median": best[(o, b)][0],
                "held_out_median": held_out.get((o, b)),
            }
            for o, b in best
        },
        "seeds": args.seeds,
        "settings_from": None if recorded is None else str(args.settings_from),
        "eval_every_step": args.eval_every_step,
        "held_out_seeds": args.held_out_seeds,
        "threads": args.threads,
        "summary": summary,
        "runs": [asdict(run) for run in runs_log.runs],
    }
    (args.out / "perfect_scaling.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
