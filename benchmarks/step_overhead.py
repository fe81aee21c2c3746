"""Time per training step of SPNGD at several refresh settings, SGD, and peers, in one run.

Contenders: SGD with momentum; SPNGD with statistics and inverses every step, with the
adaptive refresh (the default), and with fixed intervals 10/100; ASDL's K-FAC (``asdl``)
and kfac-pytorch (``kfac``, at its default eigendecompositions), each every step and at
10/100, when importable (skipped with a message otherwise); ``--only`` picks some by name.
Neither peer is on PyPI; to time them beside spngd, install both in a scratch environment
that sees spngd's packages:

    python -m venv --system-site-packages /tmp/peers
    /tmp/peers/bin/pip install --no-deps git+https://github.com/kazukiosawa/asdl
    /tmp/peers/bin/pip install --no-deps git+https://github.com/gpauloski/kfac-pytorch
    /tmp/peers/bin/python benchmarks/step_overhead.py ...

Models (``--models``): ``resnet20``, CIFAR ResNet-20 at batch 128 and 512 (32x32);
``resnet20-digits``, the same network on 8x8 images, the size of ``spngd train``'s digits,
at batch 1024 (3 channels, 10 classes); ``resnet50``, ImageNet ResNet-50 at 224x224,
batch 32 (about 20 minutes with ``--only SGD "SPNGD adaptive"``). Random data, 2 threads.

All contenders of one model run in the same process, interleaved round by round, so
machine noise hits them alike; glibc's malloc thresholds are pinned at 1 GiB (the script
re-executes itself with them set). Times after warm-up steps (10 on ResNet-20 and 20 on
ResNet-50, 100 for the adaptive refresh on both, then 64 and 32 timed steps; 2 with
``--quick``, the adaptive refresh always past its own warm-up of full refreshes), so for
the adaptive refresh they are the amortized cost in a steady state (not with ``--quick``),
and the printed shares of statistics (all; conv/Linear ``A`` and ``G``; BatchNorm ``F``)
and inverses computed in the timed steps say how much it skipped. A second table splits
each SPNGD contender's timed steps into SP-NGD's stages (``SPNGD.stage_seconds``) and the
rest: forward, backward without the statistics, and what an SGD step also does.

    python benchmarks/step_overhead.py [--quick] [--models resnet20 resnet20-digits resnet50]
        [--only SGD "SPNGD adaptive"]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pinned_malloc import pin_malloc
from spngd import SPNGD
from spngd.refresh import AdaptiveRefresh, computed_shares
from spngd.timing import STAGES, seconds_since
from spngd.train.models import build_model

Step = Callable[[torch.Tensor, torch.Tensor], None]


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer) -> Step:
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()

    return step


def asdl_step(model: nn.Module, stat_interval: int, inverse_interval: int) -> Step:
    """ASDL K-FAC (empirical Fisher; curvature every ``stat_interval`` steps, inverses every
    ``inverse_interval``) + SGD."""
    from asdl import KfacGradientMaker, PreconditioningConfig

    config = PreconditioningConfig(
        data_size=1,
        damping=1e-3,
        curvature_upd_interval=stat_interval,
        preconditioner_upd_interval=inverse_interval,
    )
    maker = KfacGradientMaker(model, config, fisher_type="fisher_emp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad()
        dummy = maker.setup_model_call(model, images)
        maker.setup_loss_call(F.cross_entropy, dummy, labels)
        maker.forward_and_backward()
        opt.step()

    return step


def kfac_pytorch_step(model: nn.Module, stat_interval: int, inverse_interval: int) -> Step:
    """kfac-pytorch (KAISA) preconditioner at its defaults (eigendecompositions), factors
    every ``stat_interval`` steps and inverses every ``inverse_interval``, + SGD."""
    import kfac

    preconditioner = kfac.preconditioner.KFACPreconditioner(
        model,
        factor_update_steps=stat_interval,
        inv_update_steps=inverse_interval,
        damping=1e-3,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        preconditioner.step()
        opt.step()

    return step


PEERS: dict[str, tuple[str, Callable[[nn.Module, int, int], Step], tuple[int, int]]] = {
    "ASDL every step": ("asdl", asdl_step, (1, 1)),
    "ASDL 10/100": ("asdl", asdl_step, (10, 100)),
    "kfac-pytorch every step": ("kfac", kfac_pytorch_step, (1, 1)),
    "kfac-pytorch 10/100": ("kfac", kfac_pytorch_step, (10, 100)),
}
"""Peers by contender name: the module to import, the step's maker, and the intervals
(statistics, inverses) it is given, as ``SPNGD every step`` and ``SPNGD fixed 10/100``."""


SPNGD_SETTINGS: dict[str, dict[str, object]] = {
    "SPNGD every step": {"stat_interval": 1},
    "SPNGD adaptive": {},
    "SPNGD adaptive, factored": {"damping_form": "factored"},
    "SPNGD fixed 10/100": {"stat_interval": 10, "inverse_interval": 100},
}
CONTENDERS = ("SGD", *SPNGD_SETTINGS, *PEERS)
REST = "forward+backward+SGD-like rest"
"""The part of an SPNGD step outside SP-NGD's stages: zero_grad, forward, loss, and backward
without the statistics the hooks compute in it."""
ADAPTIVE_WARMUP = AdaptiveRefresh.warmup_steps + 2
"""Past the adaptive rule's warm-up (every step refreshes), so its skipping is timed."""


@dataclass(frozen=True)
class Timing:
    """Steps of one measurement: warm-up per contender (the adaptive SPNGD at least
    :data:`ADAPTIVE_WARMUP`, or ``adaptive_warmup``), then interleaved rounds. The
    adaptive rule refreshes in bursts (intervals double up to 32 steps), so its amortized
    cost needs a steady state and a timed window of several intervals."""

    warmup: int
    rounds: int
    steps_per_round: int
    adaptive_warmup: int = ADAPTIVE_WARMUP

    def warmup_of(self, contender: str) -> int:
        if contender.startswith("SPNGD adaptive"):
            return max(self.warmup, self.adaptive_warmup)
        return self.warmup


@dataclass(frozen=True)
class Case:
    """One measured setting: a model on random images of one size at one batch."""

    model: str
    batch: int
    size: int
    classes: int
    quick: Timing
    full: Timing


SMALL = {"quick": Timing(2, 2, 4), "full": Timing(10, 8, 8, adaptive_warmup=100)}
CASES: dict[str, tuple[Case, ...]] = {
    "resnet20": (Case("resnet20", 128, 32, 10, **SMALL), Case("resnet20", 512, 32, 10, **SMALL)),
    "resnet20-digits": (Case("resnet20", 1024, 8, 10, **SMALL),),
    "resnet50": (
        Case("resnet50", 32, 224, 1000, Timing(2, 2, 2), Timing(20, 4, 8, adaptive_warmup=100)),
    ),
}


def contenders(base: nn.Module, names: Sequence[str]) -> tuple[dict[str, Step], dict[str, SPNGD]]:
    """The step functions of the contenders in ``names``, each on its own copy of ``base``;
    and the SPNGD optimizers among them."""
    steps: dict[str, Step] = {}
    spngd: dict[str, SPNGD] = {}
    if "SGD" in names:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps["SGD"] = optimizer_step(model, opt)
    for name, kwargs in SPNGD_SETTINGS.items():
        if name in names:
            model = copy.deepcopy(base)
            spngd[name] = SPNGD(model, lr=0.01, momentum=0.9, **kwargs)  # type: ignore[arg-type]
            steps[name] = optimizer_step(model, spngd[name])
    for name, (module, make, intervals) in PEERS.items():
        if name not in names:
            continue
        if importlib.util.find_spec(module) is None:
            print(f"  ({name}: package {module!r} not importable, skipped)")
            continue
        steps[name] = make(copy.deepcopy(base), *intervals)
    return steps, spngd


def measure(case: Case, timing: Timing, names: Sequence[str]) -> None:
    """Time the contenders in ``names`` on ``case``; print the table and SPNGD's stages."""
    torch.manual_seed(0)
    batch, size, classes = case.batch, case.size, case.classes
    data = [
        (torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))) for _ in range(4)
    ]
    steps, spngd = contenders(build_model(case.model, num_classes=classes), names)
    counter = dict.fromkeys(steps, 0)

    def run(name: str, count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            images, labels = data[counter[name] % len(data)]
            steps[name](images, labels)
            counter[name] += 1
        return time.perf_counter() - start

    for name in steps:
        seconds = run(name, timing.warmup_of(name))
        print(f"  ({name}: {counter[name]} warm-up steps took {seconds:.0f} s)", flush=True)
    before = {name: opt.refresh_counts()["total"] for name, opt in spngd.items()}
    stages_before = {name: opt.stage_seconds() for name, opt in spngd.items()}
    totals = dict.fromkeys(steps, 0.0)
    for _ in range(timing.rounds):
        for name in steps:
            totals[name] += run(name, timing.steps_per_round)
    timed = timing.rounds * timing.steps_per_round
    per_step = {name: total / timed for name, total in totals.items()}
    print(
        f"\n{case.model} {size}x{size}, batch {batch}, {classes} classes: warm-up steps as "
        f"above, then {timing.rounds} interleaved rounds x {timing.steps_per_round} steps"
    )
    print(f"  {'contender':<26}{'ms/step':>10}{'x SGD':>8}   computed in the timed steps")
    for name, seconds in per_step.items():
        share = ""
        if name in spngd:
            after = spngd[name].refresh_counts()["total"]
            counts = {key: count - before[name].get(key, 0) for key, count in after.items()}
            share = " ".join(f"{what} {s:.0%}" for what, s in computed_shares(counts).items())
        ratio = f"{seconds / per_step['SGD']:>8.2f}" if "SGD" in per_step else f"{'-':>8}"
        print(f"  {name:<26}{1e3 * seconds:>10.1f}{ratio}   {share}")
    if spngd:
        spent = {
            name: seconds_since(stages_before[name], opt.stage_seconds())
            for name, opt in spngd.items()
        }
        print_stages(spent, {name: per_step[name] for name in spngd}, timed)


def print_stages(
    spent: dict[str, dict[str, float]], per_step: dict[str, float], timed: int
) -> None:
    """Milliseconds per timed step in each of SP-NGD's stages, per SPNGD contender, and the
    rest of the step (:data:`REST`); ``-`` for a stage a contender never ran."""
    order = {stage: index for index, stage in enumerate(STAGES)}
    stages = sorted(
        {s for seconds in spent.values() for s in seconds},
        key=lambda s: (order.get(s, len(order)), s),
    )
    width = max(len(name) for name in spent) + 2
    print(f"\n  {'ms per timed step':<40}" + "".join(f"{name:>{width}}" for name in spent))

    def row(label: str, values: list[float | None]) -> None:
        cells = "".join(
            f"{'-':>{width}}" if v is None else f"{1e3 * v:>{width}.1f}" for v in values
        )
        print(f"  {label:<40}{cells}")

    for stage in stages:
        row(
            stage,
            [seconds[stage] / timed if stage in seconds else None for seconds in spent.values()],
        )
    row("all stages", [sum(seconds.values()) / timed for seconds in spent.values()])
    row(REST, [per_step[name] - sum(seconds.values()) / timed for name, seconds in spent.items()])
    row("total", list(per_step.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=tuple(CASES), default=list(CASES))
    parser.add_argument(
        "--only",
        nargs="+",
        choices=CONTENDERS,
        default=list(CONTENDERS),
        metavar="NAME",
        help=f"time only these contenders: {', '.join(map(repr, CONTENDERS))} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps (rougher figures)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_malloc()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; refresh settings as named (statistics/inverse intervals)")
    for model in args.models:
        for case in CASES[model]:
            measure(case, case.quick if args.quick else case.full, args.only)


if __name__ == "__main__":
    main()
