"""Large-batch evidence: optimizer steps SGD and SP-NGD need to reach a validation accuracy.

ResNet-20 on the embedded 8x8 digits (1,497 training / 300 validation images) at ``spngd
train``'s default batch, 1,024 (each pass over the data is one step on a random 1,024 of
the 1,497 images), by default; ``--batch-size`` and ``--image-size`` (the digits resized)
change both. Both optimizers use the same data, model, epochs, weight rescaling,
polynomial decay, weight decay and validation (BatchNorm statistics recomputed under
the current weights, ``--eval-batchnorm``); SGD gets its learning rate and warm-up from a
grid (the grid point with the fewest mean steps to the target wins). SP-NGD uses one fixed
setting, its damping and learning rate from screens (docs/benchmarks.md), twice: with its
adaptive statistics refresh (the default, the one compared with SGD) and with statistics
and inverses every step (``stat_interval=1``).
Validation runs after every step. For each seed the script prints the first step at which
validation accuracy reached the target and the accuracy at the end; then SP-NGD's mean
steps over the best SGD's, SP-NGD's mean final accuracy against the best mean final
accuracy of any SGD learning rate, and adaptive SP-NGD's mean steps over every-step
SP-NGD's.

Targets: a steps ratio <= 0.5 and final accuracy within 0.5 points; the adaptive refresh
needs no more than 5% more steps than every-step refresh. glibc's malloc thresholds are
pinned and torch uses 1 thread by default (2 threads on our shared 2-core machine made an
SP-NGD step several times slower). The thread count changes the floating-point order, so
step counts differ between thread counts, as they do by a few steps from seed to seed (97%
is 291 of the 300 validation images).

    python benchmarks/steps_to_accuracy.py [--seeds 0 1 2] [--target 0.97] [--epochs 60]
        [--sgd-lrs [X ...]] [--sgd-warmups E [E ...]] [--spngd-lr X] [--spngd-momentum X]
        [--spngd-warmup-epochs E] [--spngd-weight-decay X] [--damping X]
        [--damping-start X --damping-decay-epochs E]
        [--a-examples K|none] [--a-patches P|none] [--eval-batchnorm running]
        [--batch-size N] [--image-size S]
        [--refresh-alpha X] [--refresh-rule noise|threshold] ...
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pinned_malloc import pin_malloc
from spngd.refresh import AdaptiveRefresh, computed_shares
from spngd.train.cli import _or_none, add_nested_options, nest
from spngd.train.config import (
    DATA_DEFAULTS,
    DEFAULTS,
    OPTIMIZER_DEFAULTS,
    resolve_config,
)
from spngd.train.runfolder import RunFolder
from spngd.train.trainer import train

SHARED = {
    "data": "digits",
    "model": "resnet20",
    "batch_size": DEFAULTS["batch_size"],
    "weight_decay": OPTIMIZER_DEFAULTS["sgd"]["weight_decay"],
    "device": "cpu",
}
SGD = {"optimizer": "sgd", "momentum": OPTIMIZER_DEFAULTS["sgd"]["momentum"]}
SPNGD = {
    "optimizer": "spngd",
    "lr": OPTIMIZER_DEFAULTS["spngd"]["lr"],
    "damping": DEFAULTS["damping"],
    "momentum": OPTIMIZER_DEFAULTS["spngd"]["momentum"],
}
"""SP-NGD at the training defaults, the best of this script's screens."""
ADAPTIVE = "sp-ngd"
EVERY_STEP = "sp-ngd every step"


@dataclass(frozen=True)
class Outcome:
    """One run: the first step at or above the target (inf if never) and the final accuracy."""

    steps: float
    final: float
    computed: str
    """Share of the statistics (A, G, BatchNorm F) and inverses the run computed."""


def run(options: dict[str, Any], target: float, folder: Path) -> Outcome:
    config = resolve_config(
        {**options, "eval_every_steps": 1, "progress": False, "out": str(folder)}
    )
    with RunFolder(folder) as run_folder:
        result = train(config, run_folder)
    reached = [r["step"] for r in result.records if r.get("val_accuracy", 0.0) >= target]
    counts = [r["refresh_counts"] for r in result.records if "refresh_counts" in r]
    shares = computed_shares(counts[-1]) if counts else {}
    computed = " ".join(f"{what} {share:.0%}" for what, share in shares.items())
    return Outcome(float(reached[0]) if reached else math.inf, result.val_accuracy, computed)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf


def _row(name: str, outcomes: list[Outcome]) -> str:
    steps = " ".join(f"{o.steps:>4.0f}" if math.isfinite(o.steps) else "   -" for o in outcomes)
    finals = " ".join(f"{100 * o.final:5.1f}" for o in outcomes)
    mean_steps = _mean([o.steps for o in outcomes])
    mean_final = 100 * statistics.fmean(o.final for o in outcomes)
    return f"{name:<20} {steps}   {mean_steps:>6.1f}   {finals}   {mean_final:5.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.97, help="validation accuracy")
    parser.add_argument("--epochs", type=float, default=60.0)
    parser.add_argument(
        "--sgd-lrs",
        type=float,
        nargs="*",
        default=[0.1, 0.2, 0.4],
        help="SGD's learning-rate grid (none: compare only the two SP-NGD refresh settings)",
    )
    parser.add_argument(
        "--sgd-warmups",
        type=float,
        nargs="+",
        default=[OPTIMIZER_DEFAULTS["sgd"]["warmup_epochs"]],
        help="SGD's warm-up grid, in epochs (each paired with every learning rate)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--batch-size", type=int, default=SHARED["batch_size"], help="examples per step"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=DATA_DEFAULTS["digits"]["image_size"],
        help="side the 8x8 digits are resized to (32 puts 1,024 output locations in "
        "ResNet-20's first stage)",
    )
    add_nested_options(parser, "refresh", AdaptiveRefresh)  # adaptive SP-NGD's knobs
    parser.add_argument(
        "--no-every-step", action="store_true", help="skip the every-step SP-NGD contender"
    )
    parser.add_argument("--damping-form", help="SP-NGD's damping form: factored or kronecker")
    parser.add_argument("--damping", type=float, help=f"SP-NGD's damping ({SPNGD['damping']})")
    parser.add_argument(
        "--damping-start",
        type=float,
        help="SP-NGD's initial damping, moving log-linearly to --damping (none: constant)",
    )
    parser.add_argument(
        "--damping-decay-epochs",
        type=float,
        help=f"epochs over which the damping moves ({DEFAULTS['damping_decay_epochs']:g})",
    )
    parser.add_argument("--spngd-lr", type=float, help=f"SP-NGD's learning rate ({SPNGD['lr']})")
    parser.add_argument(
        "--spngd-momentum", type=float, help=f"SP-NGD's momentum ({SPNGD['momentum']})"
    )
    parser.add_argument(
        "--spngd-warmup-epochs",
        type=float,
        help="SP-NGD's learning-rate warm-up in epochs "
        f"({OPTIMIZER_DEFAULTS['spngd']['warmup_epochs']:g})",
    )
    parser.add_argument(
        "--spngd-weight-decay",
        type=float,
        help=f"SP-NGD's weight decay ({SHARED['weight_decay']:g}, as SGD's)",
    )
    parser.add_argument(
        "--statistics-examples", type=int, help="SP-NGD's examples per statistic (1024)"
    )
    parser.add_argument(
        "--a-examples",
        type=_or_none(int),
        default=argparse.SUPPRESS,
        help="SP-NGD's examples for A (256; none: as many as the other statistics)",
    )
    parser.add_argument(
        "--a-patches",
        type=_or_none(int),
        default=argparse.SUPPRESS,
        help="SP-NGD's patches for a Conv layer's A (none, the default: all its examples')",
    )
    parser.add_argument(
        "--eval-batchnorm", help="validation's BatchNorm statistics: recomputed or running"
    )
    args = parser.parse_args()
    pin_malloc()
    torch.set_num_threads(args.threads)
    shared = {
        **SHARED,
        "epochs": args.epochs,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
    }
    if args.eval_batchnorm is not None:
        shared["eval_batchnorm"] = args.eval_batchnorm
    contenders = {
        f"sgd lr={lr:g} wu={warmup:g}": {**shared, **SGD, "lr": lr, "warmup_epochs": warmup}
        for warmup in args.sgd_warmups
        for lr in args.sgd_lrs
    }
    refresh = nest(vars(args)).get("refresh", {})
    knobs = {
        "damping_form": args.damping_form,
        "damping": args.damping,
        "damping_start": args.damping_start,
        "damping_decay_epochs": args.damping_decay_epochs,
        "lr": args.spngd_lr,
        "momentum": args.spngd_momentum,
        "warmup_epochs": args.spngd_warmup_epochs,
        "weight_decay": args.spngd_weight_decay,
        "statistics_examples": args.statistics_examples,
    }
    chosen = {k: v for k, v in knobs.items() if v is not None} | {"refresh": refresh}
    for name in ("a_examples", "a_patches"):
        if name in vars(args):
            chosen[name] = vars(args)[name]
    contenders[ADAPTIVE] = {**shared, **SPNGD, **chosen}
    if not args.no_every_step:
        contenders[EVERY_STEP] = {**shared, **SPNGD, **chosen, "stat_interval": 1}
    print(
        f"ResNet-20 on digits at {args.image_size}x{args.image_size}, "
        f"batch {args.batch_size}, {args.epochs:g} epochs, "
        f"target {100 * args.target:g}% validation accuracy, seeds {args.seeds}"
    )
    print(f"{'':<20} {'steps to target':<{5 * len(args.seeds)}} {'mean':>6}   final accuracy (%)")
    results: dict[str, list[Outcome]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, options in contenders.items():
            results[name] = [
                run({**options, "seed": seed}, args.target, Path(scratch) / f"{name}-{seed}")
                for seed in args.seeds
            ]
            print(_row(name, results[name]), flush=True)
    steps = {name: _mean([o.steps for o in outcomes]) for name, outcomes in results.items()}
    sgd = [name for name in results if name.startswith("sgd")]
    if sgd:
        best = min(sgd, key=lambda name: steps[name])
        ratio = steps[ADAPTIVE] / steps[best]
        best_final = max(statistics.fmean(o.final for o in results[name]) for name in sgd)
        spngd_final = statistics.fmean(o.final for o in results[ADAPTIVE])
        gap = 100 * (best_final - spngd_final)
        print(f"steps SP-NGD / best SGD ({best}): {ratio:.2f}  (target <= 0.5: {ratio <= 0.5})")
        print(
            f"final accuracy SP-NGD {100 * spngd_final:.2f}% vs best SGD "
            f"{100 * best_final:.2f}%: {gap:+.2f} points behind  (target <= 0.5: {gap <= 0.5})"
        )
    if EVERY_STEP in steps:
        refresh = steps[ADAPTIVE] / steps[EVERY_STEP]
        print(
            f"steps SP-NGD adaptive / every-step refresh: {refresh:.2f}  "
            f"(target <= 1.05: {refresh <= 1.05})"
        )
    shares = ", ".join(o.computed for o in results[ADAPTIVE])
    print(f"adaptive refresh, share computed per seed: {shares}")


if __name__ == "__main__":
    main()
