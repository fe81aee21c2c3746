"""The large-batch scaling study: steps and training time to a validation target against
batch size, for momentum SGD, AdamW and SP-NGD, on mnist1d.

Every optimizer trains the same model (``resnet8-1d`` unless ``--model``) from the same
initial weights on the same data order (both drawn from the seed), with the same schedule:
a linear warm-up over the first :data:`WARMUP_STEPS` steps, then a constant learning rate
(with ``--warmups 0 10``, the warm-up length is tuned too: each grid point runs with each).
Validation (all held-out examples; BatchNorm statistics recomputed under the current weights
from a fixed sample of training examples, see :mod:`spngd.train.evaluation`, or with
``--eval-batchnorm running`` torch's running averages) runs on a geometric
grid of steps, every step up to 20 and then whenever the step count has grown by 5%, so a
step count to the target is exact to within 5%; a run stops at the target. Training time
is the sum of the steps' seconds, validation left out.

Tuning, per batch size and optimizer, on seed 0: a grid of :data:`GRID_POINTS` settings
per optimizer (learning rates for SGD and AdamW, two learning rates by two dampings for
SP-NGD), centred by each optimizer's scaling rule: the centre is ``lr(128) * (B / 128)^p``
with the square-root rule ``p = 1/2`` for SGD and AdamW, and ``p = 0`` for SP-NGD, whose
best learning rate does not grow with the batch (docs/benchmarks.md). When the best point
lies on the grid's edge, the grid is widened by one point beyond it, up to
:data:`MAX_WIDENINGS` times; a best point still on the edge is flagged in the table.
A tuning run stops once it needs more steps than the best run so far (it cannot win). The
best setting then runs with seeds 1 and 2: steps and times are medians of three seeds.
SP-NGD's every-step refresh (``stat_interval=1``) runs with the best setting of its default
refresh. Each run is capped at :data:`MAX_EPOCHS` passes over the data ("never").

Writes ``batch_scaling.json`` (every run: optimizer, setting, batch, seed, steps, seconds,
accuracy reached, why it stopped) and ``batch_scaling.png`` (log-log steps against batch
with the perfect-scaling line, and time to target against batch) into ``--out``, and prints
the table and the targets' ratios. Each run is also appended to
``batch_scaling.runs.jsonl`` as it ends, so a study stopped part-way keeps the runs it
finished.

    python benchmarks/batch_scaling.py [--quick] [--out DIR] [--threads 2]
        [--batches 8192 16384] [--warmups 0 10]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.utils.data import TensorDataset

from pinned_malloc import pin_malloc
from spngd import SPNGD
from spngd.train import mnist1d
from spngd.train.evaluation import (
    BATCHNORM_STATISTICS,
    batchnorm_sample,
    recompute_batchnorm_statistics,
)
from spngd.train.models import build_model

WARMUP_STEPS = 10
GRID_POINTS = 4
MAX_WIDENINGS = 2
MAX_EPOCHS = 12.0
EVAL_GROWTH = 1.05
"""Validation runs at every step up to 20, then when the step count has grown by 5% (a
:class:`Study` may validate more often)."""
SEEDS = (0, 1, 2)
PERFECT_SCALING_SLACK = 1.5
"""The targets' "within 1.5x of perfect scaling": ``steps(B) <= 1.5 steps(B0) B0 / B``."""
MOMENTUM = 0.9
"""Momentum of SGD and of SP-NGD's update, unless a setting gives its own."""


@dataclass(frozen=True)
class Study:
    """What one invocation measures."""

    batches: tuple[int, ...]
    data_size: int
    target: float
    max_epochs: float = MAX_EPOCHS
    seeds: tuple[int, ...] = SEEDS
    eval_growth: float = EVAL_GROWTH
    """Past step 20 validation waits until the step count has grown by this factor (1: it
    runs at every step)."""
    warmups: tuple[int, ...] = (WARMUP_STEPS,)
    """Warm-up lengths in steps; more than one: each grid point runs with each, for every
    optimizer alike, and the setting names its warm-up."""

    def grid(self, settings: list[dict[str, float]]) -> list[dict[str, float]]:
        """``settings`` (one grid point's) with each warm-up length, when it is tuned."""
        if len(self.warmups) == 1:
            return settings
        return [{**setting, "warmup_steps": w} for setting in settings for w in self.warmups]


FULL = Study(batches=(128, 512, 2048, 8192, 16384), data_size=mnist1d.DEFAULT_SIZE, target=0.97)
QUICK = Study(batches=(128, 2048), data_size=20_000, target=0.9, max_epochs=5.0, seeds=(0,))


# -- the contenders --------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """An optimizer with the centre and spacing of its learning-rate grid at batch 128."""

    name: str
    base_lr: float
    lr_ratio: float
    """Neighbouring grid points differ by this factor."""
    lr_exponent: float = 0.5
    """The grid's centre at batch ``B`` is ``base_lr * (B / 128) ** lr_exponent``."""
    dampings: tuple[float, ...] = ()
    """SP-NGD: every learning rate is tried with each of these."""
    extra: dict[str, Any] = field(default_factory=dict)

    def settings(self, batch: int, index: int) -> list[dict[str, float]]:
        """The settings at learning-rate grid point ``index`` (an integer around 0) at
        ``batch``: one per damping for SP-NGD."""
        centre = self.base_lr * (batch / 128) ** self.lr_exponent
        lr = round_lr(centre * self.lr_ratio ** (index + 0.5))
        if not self.dampings:
            return [{"lr": lr}]
        return [{"lr": lr, "damping": d} for d in self.dampings]

    def initial_span(self) -> tuple[int, int]:
        """Learning-rate indices of the first grid: :data:`GRID_POINTS` settings in all."""
        count = GRID_POINTS // max(1, len(self.dampings))
        return -(count // 2), count - count // 2 - 1


def round_lr(lr: float) -> float:
    return float(f"{lr:.3g}")


SGD = Contender("SGD", base_lr=0.1, lr_ratio=2.0)
ADAMW = Contender("AdamW", base_lr=6e-3, lr_ratio=2.0)
SPNGD_DEFAULT = Contender(
    "SP-NGD", base_lr=0.1, lr_ratio=2.0, lr_exponent=0.0, dampings=(0.001, 0.01)
)
SPNGD_EVERY_STEP = "SP-NGD every step"
TUNED = (SGD, ADAMW, SPNGD_DEFAULT)


def make_optimizer(name: str, model: nn.Module, setting: dict[str, float]) -> torch.optim.Optimizer:
    momentum = setting.get("momentum", MOMENTUM)
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=setting["lr"], momentum=momentum)
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=setting["lr"], weight_decay=0.01)
    every_step = {"stat_interval": 1} if name == SPNGD_EVERY_STEP else {}
    return SPNGD(
        model, lr=setting["lr"], damping=setting["damping"], momentum=momentum, **every_step
    )


# -- one run ---------------------------------------------------------------------------------


@dataclass
class Run:
    optimizer: str
    setting: dict[str, float]
    batch: int
    seed: int
    steps: float
    """First validated step at or above the target (inf: not reached)."""
    seconds: float
    """Training time up to that step (or up to the stop)."""
    accuracy: float
    """Validation accuracy at the last validation."""
    stopped: str
    """``target``, ``cap`` (:data:`MAX_EPOCHS`), ``pruned`` (past the best so far) or
    ``diverged`` (non-finite loss)."""


class RunLog:
    """A study's runs so far (:attr:`runs`), each also appended as it ends to a JSON-lines
    file (``asdict(run)``, one per line), so that a study stopped part-way (interrupted or
    killed) keeps every run it finished; the study's JSON, written at the end, holds them
    all again. The first run replaces an earlier study's file, so a study that stops before
    its first run (a bad setting) leaves that file as it was."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: list[Run] = []

    def append(self, run: Run) -> None:
        if not self.runs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a" if self.runs else "w") as file:
            file.write(json.dumps(asdict(run)) + "\n")
        self.runs.append(run)


@dataclass(frozen=True)
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    batchnorm_sample: torch.Tensor | None
    """Training examples validation's BatchNorm statistics come from (None: running ones)."""


def eval_steps(growth: float) -> Iterator[int]:
    """1, 2, ..., 20, then each time the first step after the last one that is at least
    ``growth`` times it."""
    step = 1
    while True:
        yield step
        step = step + 1 if step < 20 else max(step + 1, math.ceil(step * growth))


def batches(data: Data, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches, pass after pass, in an order drawn from ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    count = len(data.train_y)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch + 1, batch):
            index = order[start : start + batch]
            yield data.train_x[index], data.train_y[index]


@torch.no_grad()
def accuracy(model: nn.Module, data: Data) -> float:
    if data.batchnorm_sample is not None:
        sample = data.batchnorm_sample.split(4096)
        recompute_batchnorm_statistics(model, [(x, None) for x in sample], torch.device("cpu"))
    model.eval()
    correct = sum(
        int((model(x).argmax(1) == y).sum())
        for x, y in zip(data.val_x.split(4096), data.val_y.split(4096), strict=True)
    )
    model.train()
    return correct / len(data.val_y)


def train_run(
    name: str,
    setting: dict[str, float],
    batch: int,
    seed: int,
    study: Study,
    data: Data,
    model_name: str,
    prune_after: float = math.inf,
    to_the_cap: bool = False,
) -> Run:
    """Train until the target (or, ``to_the_cap``, for the whole budget, the accuracy then
    being the final one), the cap, ``prune_after`` steps, or a non-finite loss."""
    torch.manual_seed(seed)
    model = build_model(model_name, mnist1d.CLASSES, in_channels=1)
    optimizer = make_optimizer(name, model, setting)
    cap = math.ceil(study.max_epochs * len(data.train_y) / batch)
    warmup = setting.get("warmup_steps", study.warmups[0])
    schedule = eval_steps(study.eval_growth)
    next_eval = next(schedule)
    seconds, reached, reached_seconds, last = 0.0, math.inf, math.inf, 0.0

    def outcome(stopped: str) -> Run:
        if math.isfinite(reached):
            return Run(name, setting, batch, seed, reached, reached_seconds, last, stopped)
        return Run(name, setting, batch, seed, math.inf, seconds, last, stopped)

    for step, (x, y) in enumerate(batches(data, batch, seed), start=1):
        if step > prune_after:
            return outcome("pruned")
        for group in optimizer.param_groups:
            group["lr"] = setting["lr"] * (min(1.0, step / warmup) if warmup else 1.0)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        finite = math.isfinite(loss.item())
        seconds += time.perf_counter() - start
        if not finite:
            return outcome("diverged")
        if step == next_eval or step == cap:
            last = accuracy(model, data)
            while next_eval <= step:
                next_eval = next(schedule)
            if last >= study.target and not math.isfinite(reached):
                reached, reached_seconds = float(step), seconds
                if not to_the_cap:
                    return outcome("target")
        if step == cap:
            return outcome("cap")
    raise AssertionError("unreachable")


# -- tuning and the study --------------------------------------------------------------------


def rank(run: Run) -> tuple[float, float]:
    """Fewer steps to the target first; among runs that missed it, higher accuracy."""
    return run.steps, -run.accuracy


def tune(
    contender: Contender,
    batch: int,
    study: Study,
    data: Data,
    model: str,
    log: Callable[[Run], None],
) -> tuple[Run, bool]:
    """The best run of the first seed on the (widened) grid, and whether its learning rate
    sits on the grid's edge."""
    lo, hi = contender.initial_span()
    runs: dict[int, Run] = {}
    """The best run at each learning-rate index."""

    def try_index(index: int) -> None:
        for setting in study.grid(contender.settings(batch, index)):
            bound = min((r.steps for r in runs.values()), default=math.inf)
            outcome = train_run(
                contender.name, setting, batch, study.seeds[0], study, data, model, bound
            )
            log(outcome)
            if index not in runs or rank(outcome) < rank(runs[index]):
                runs[index] = outcome

    for index in range(lo, hi + 1):
        try_index(index)
    for _ in range(MAX_WIDENINGS):
        best = min(runs, key=lambda i: rank(runs[i]))
        if best == lo:
            lo -= 1
            try_index(lo)
        elif best == hi:
            hi += 1
            try_index(hi)
        else:
            break
    best = min(runs, key=lambda i: rank(runs[i]))
    return runs[best], best in (lo, hi)


@dataclass
class Result:
    """One optimizer at one batch size: its tuned setting and the runs of every seed."""

    optimizer: str
    batch: int
    setting: dict[str, float]
    on_edge: bool
    runs: list[Run]

    @property
    def steps(self) -> float:
        return statistics.median(r.steps for r in self.runs)

    @property
    def seconds(self) -> float:
        """Median seconds to the target, a run that missed it counting as inf."""
        return statistics.median(
            [r.seconds if math.isfinite(r.steps) else math.inf for r in self.runs]
        )


def run_study(study: Study, data: Data, model: str, log: Callable[[Run], None]) -> list[Result]:
    """Tune every optimizer at every batch size, then run the best settings on the other
    seeds (a best setting that missed the target on the first seed is not run again: its
    median could not reach the target)."""
    results: list[Result] = []
    for batch in study.batches:
        for contender in TUNED:
            best, on_edge = tune(contender, batch, study, data, model, log)
            seeds = study.seeds[1:] if math.isfinite(best.steps) else ()
            runs = [best]
            for seed in seeds:
                runs.append(
                    train_run(contender.name, best.setting, batch, seed, study, data, model)
                )
                log(runs[-1])
            results.append(Result(contender.name, batch, best.setting, on_edge, runs))
            if contender is SPNGD_DEFAULT:
                every = []
                for seed in (study.seeds[0], *seeds):
                    every.append(
                        train_run(SPNGD_EVERY_STEP, best.setting, batch, seed, study, data, model)
                    )
                    log(every[-1])
                results.append(Result(SPNGD_EVERY_STEP, batch, best.setting, on_edge, every))
    return results


def final_accuracies(
    results: list[Result], study: Study, data: Data, model: str, log: Callable[[Run], None]
) -> dict[str, float]:
    """Validation accuracy after the whole budget (:attr:`Study.max_epochs`) at the largest
    batch, first seed, each tuned optimizer's best setting."""
    finals = {}
    for result in results:
        if result.batch != study.batches[-1] or result.optimizer == SPNGD_EVERY_STEP:
            continue
        first = result.runs[0]
        if first.stopped != "cap":
            first = train_run(
                result.optimizer,
                result.setting,
                result.batch,
                first.seed,
                study,
                data,
                model,
                to_the_cap=True,
            )
            log(first)
        finals[result.optimizer] = first.accuracy
    return finals


def largest_scaling_batch(results: list[Result], optimizer: str, batches: tuple[int, ...]) -> int:
    """The largest batch up to which ``optimizer`` stays within 1.5x of perfect scaling from
    the smallest batch: ``steps(B) <= 1.5 steps(B0) B0 / B`` at every batch up to it."""
    steps = {r.batch: r.steps for r in results if r.optimizer == optimizer}
    base = batches[0]
    largest = 0
    for batch in batches:
        if not steps[batch] <= PERFECT_SCALING_SLACK * steps[base] * base / batch:
            break
        largest = batch
    return largest


def report(results: list[Result], finals: dict[str, float], study: Study) -> list[str]:
    """The table and the targets' ratios, as printed lines."""
    names = [*(c.name for c in TUNED), SPNGD_EVERY_STEP]
    lines = [
        f"steps / seconds to {100 * study.target:g}% validation accuracy, median of seeds "
        f"{list(study.seeds)} ('-': not within {study.max_epochs:g} epochs; '*': best "
        "setting on the grid's edge)"
    ]
    lines.append(f"{'batch':>6}  " + "  ".join(f"{n:>24}" for n in names))
    table = {(r.optimizer, r.batch): r for r in results}
    for batch in study.batches:
        cells = []
        for name in names:
            result = table[(name, batch)]
            edge = "*" if result.on_edge and name != SPNGD_EVERY_STEP else " "
            steps = f"{result.steps:.0f}" if math.isfinite(result.steps) else "-"
            seconds = f"{result.seconds:.1f}s" if math.isfinite(result.seconds) else "-"
            cells.append(f"{steps:>8} {seconds:>8} {edge}{format_setting(result.setting):>6}")
        lines.append(f"{batch:>6}  " + "  ".join(cells))
    largest = study.batches[-1]
    spngd = table[("SP-NGD", largest)].steps
    ratios = []
    for name, target in (("SGD", 0.3), ("AdamW", 0.5)):
        other = table[(name, largest)].steps
        if math.isfinite(other):
            ratios.append(f"SP-NGD / {name} steps {spngd / other:.2f} (target <= {target})")
        else:
            ratios.append(f"{name} did not reach the target (target: SP-NGD <= {target}x)")
    lines.append(f"at batch {largest}: " + ", ".join(ratios))
    within = {n: largest_scaling_batch(results, n, study.batches) for n in ("SP-NGD", "SGD")}
    lines.append(
        f"within {PERFECT_SCALING_SLACK}x of perfect scaling up to batch: SP-NGD "
        f"{within['SP-NGD']}, SGD {within['SGD']} (target: SP-NGD's at least 4x SGD's)"
    )
    refresh = [
        table[("SP-NGD", b)].steps / table[(SPNGD_EVERY_STEP, b)].steps for b in study.batches
    ]
    lines.append(
        "SP-NGD default refresh / every-step refresh, steps per batch: "
        + ", ".join(f"{r:.2f}" for r in refresh)
        + " (target <= 1.05)"
    )
    lines.append(
        f"validation accuracy after {study.max_epochs:g} epochs at batch {largest}: "
        + ", ".join(f"{name} {100 * acc:.2f}%" for name, acc in finals.items())
        + " (target: SP-NGD's not below SGD's)"
    )
    return lines


def format_setting(setting: dict[str, float]) -> str:
    """``lr[/momentum][/damping][/wN]``: the setting's values in its order (the learning
    rate, then whichever of momentum, SP-NGD's damping and a tuned warm-up it gives)."""
    return "/".join(
        f"w{v:g}" if name == "warmup_steps" else f"{v:g}" for name, v in setting.items()
    )


def plot(results: list[Result], study: Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (steps_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [*(c.name for c in TUNED), SPNGD_EVERY_STEP]
    for name in names:
        mine = [r for r in results if r.optimizer == name]
        batches = [r.batch for r in mine]
        steps_axis.plot(batches, [r.steps for r in mine], "o-", label=name)
        time_axis.plot(batches, [r.seconds for r in mine], "o-", label=name)
    base = next(r for r in results if r.optimizer == "SGD" and r.batch == study.batches[0])
    perfect = [base.steps * study.batches[0] / b for b in study.batches]
    steps_axis.plot(study.batches, perfect, "k--", linewidth=1, label="perfect scaling (SGD)")
    for axis, what in ((steps_axis, "steps"), (time_axis, "training seconds")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size")
        axis.set_ylabel(f"{what} to {100 * study.target:g}% validation accuracy")
        axis.grid(True, which="both", alpha=0.3)
    steps_axis.legend(fontsize=8)
    figure.suptitle("mnist1d: median of seeds " + ", ".join(map(str, study.seeds)))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def load_study_data(size: int, eval_batchnorm: str = BATCHNORM_STATISTICS[0]) -> Data:
    (train_x, train_y), (val_x, val_y) = mnist1d.load(size)
    sample = None
    if eval_batchnorm == "recomputed":
        sample = train_x[batchnorm_sample(TensorDataset(train_x), seed=0).indices]
    return Data(train_x, train_y, val_x, val_y, sample)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(record: dict[str, Any]) -> str:
    """Median steps and seconds per optimizer and batch of a saved study, for docs/."""
    names = [*(c.name for c in TUNED), SPNGD_EVERY_STEP]
    batches = record["study"]["batches"]
    cells = {(r["optimizer"], r["batch"]): r for r in record["results"]}
    lines = [
        "| batch | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for batch in batches:
        row = []
        for name in names:
            result = cells[(name, batch)]
            steps, seconds = float(result["steps"]), float(result["seconds"])
            edge = "*" if result["on_edge"] and name != SPNGD_EVERY_STEP else ""
            setting = format_setting(result["setting"])
            if math.isfinite(steps):
                time_text = f"{seconds:.1f} s" if math.isfinite(seconds) else "—"
                row.append(f"{steps:.0f} steps, {time_text} ({setting}{edge})")
            else:
                row.append(f"never ({setting}{edge})")
        lines.append(f"| {batch:,} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument(
        "--quick", action="store_true", help="two batch sizes, one seed, 20,000 examples"
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the JSON and PNG")
    parser.add_argument("--model", default="resnet8-1d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--eval-batchnorm",
        choices=BATCHNORM_STATISTICS,
        default=BATCHNORM_STATISTICS[0],
        help="validation's BatchNorm statistics",
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", help="these batch sizes (default: the study's)"
    )
    parser.add_argument(
        "--warmups",
        type=int,
        nargs="+",
        default=[WARMUP_STEPS],
        help="warm-up lengths in steps, tuned for every optimizer when several "
        f"(default: {WARMUP_STEPS})",
    )
    parser.add_argument(
        "--table", type=Path, help="print a saved batch_scaling.json as a Markdown table; no runs"
    )
    args = parser.parse_args()
    if any(w < 0 for w in args.warmups) or any(b < 1 for b in args.batches or ()):
        parser.error("--warmups must be >= 0 and --batches >= 1")
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    pin_malloc()
    torch.set_num_threads(args.threads)
    # As spngd train does, so that the steps are timed as training runs them
    # (docs/performance.md, "Subnormal numbers").
    torch.set_flush_denormal(True)
    study = replace(
        QUICK if args.quick else FULL,
        warmups=tuple(args.warmups),
        **({"batches": tuple(sorted(args.batches))} if args.batches else {}),
    )
    data = load_study_data(study.data_size, args.eval_batchnorm)
    print(
        f"{args.model} on mnist1d ({len(data.train_y)} training, {len(data.val_y)} validation "
        f"examples), batches {list(study.batches)}, {args.threads} threads, BatchNorm "
        f"statistics {args.eval_batchnorm} at validation, commit {commit()}",
        flush=True,
    )
    runs_log = RunLog(args.out / "batch_scaling.runs.jsonl")
    started = time.perf_counter()

    def log(run: Run) -> None:
        runs_log.append(run)
        steps = f"{run.steps:.0f}" if math.isfinite(run.steps) else "-"
        print(
            f"  [{time.perf_counter() - started:6.0f}s] {run.optimizer:<18} batch {run.batch:>5} "
            f"{format_setting(run.setting):>12} seed {run.seed}: {steps:>6} steps "
            f"{run.seconds:7.1f}s  {run.stopped} at {100 * run.accuracy:.1f}%",
            flush=True,
        )

    results = run_study(study, data, args.model, log)
    finals = final_accuracies(results, study, data, args.model, log)
    lines = report(results, finals, study)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "commit": commit(),
        "command": " ".join(["python", *sys.argv]),
        "study": asdict(study),
        "model": args.model,
        "threads": args.threads,
        "eval_batchnorm": args.eval_batchnorm,
        "results": [
            {
                **{k: v for k, v in asdict(r).items() if k != "runs"},
                "steps": r.steps,
                "seconds": r.seconds,
            }
            for r in results
        ],
        "final_accuracies": finals,
        "runs": [asdict(r) for r in runs_log.runs],
        "report": lines,
    }
    (args.out / "batch_scaling.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    plot(results, study, args.out / "batch_scaling.png")
    print(f"wrote {args.out / 'batch_scaling.json'} and {args.out / 'batch_scaling.png'}")


if __name__ == "__main__":
    main()
