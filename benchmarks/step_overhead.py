"""Time per training step of SPNGD at several refresh settings, SGD, and peers, in one run.

Contenders: SGD with momentum; SPNGD with statistics and inverses every step, with the
adaptive refresh (the default), and with fixed intervals 10/100; ASDL's K-FAC
(``asdfghjkl``) and kfac-pytorch (``kfac``) at every-step refresh when importable
(skipped with a message otherwise). Models: CIFAR ResNet-20 at batch 128 and 512 (32x32),
ImageNet ResNet-50 at 224x224, batch 32, few steps. 2 threads.

All contenders of one model run in the same process, interleaved round by round, so
machine noise hits them alike; glibc's malloc thresholds are pinned at 1 GiB (the script
re-executes itself with them set). Times after ``--warmup`` steps; for the adaptive
refresh this is the amortized cost once its warm-up (10 steps of full refresh) is over,
and the printed shares of statistics (all; conv/Linear ``A`` and ``G``; BatchNorm ``F``)
and inverses computed in the timed steps say how much it skipped.

    python benchmarks/step_overhead.py [--quick] [--models resnet20 resnet50]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spngd import SPNGD
from spngd.refresh import computed_shares
from spngd.train.models import build_model

PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

Step = Callable[[torch.Tensor, torch.Tensor], None]


def pin_malloc() -> None:
    """Re-execute this script with glibc's malloc thresholds pinned, unless they are."""
    if any(os.environ.get(key) != value for key, value in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_MALLOC})


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer) -> Step:
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()

    return step


def asdl_step(model: nn.Module) -> Step:
    """ASDL K-FAC (empirical Fisher, curvature and inverse every step) + SGD."""
    from asdl import KfacGradientMaker, PreconditioningConfig

    config = PreconditioningConfig(
        data_size=1, damping=1e-3, curvature_upd_interval=1, preconditioner_upd_interval=1
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


def kfac_pytorch_step(model: nn.Module) -> Step:
    """kfac-pytorch (KAISA) preconditioner, factors and inverses every step, + SGD."""
    import kfac

    preconditioner = kfac.preconditioner.KFACPreconditioner(
        model, factor_update_steps=1, inv_update_steps=1, damping=1e-3
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        preconditioner.step()
        opt.step()

    return step


PEERS = {
    "ASDL every step": ("asdl", asdl_step),
    "kfac-pytorch every step": ("kfac", kfac_pytorch_step),
}


def contenders(base: nn.Module) -> tuple[dict[str, Step], dict[str, SPNGD]]:
    steps: dict[str, Step] = {}
    spngd: dict[str, SPNGD] = {}
    model = copy.deepcopy(base)
    steps["SGD"] = optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    for name, kwargs in (
        ("SPNGD every step", {"stat_interval": 1}),
        ("SPNGD adaptive", {}),
        ("SPNGD fixed 10/100", {"stat_interval": 10, "inverse_interval": 100}),
    ):
        model = copy.deepcopy(base)
        spngd[name] = SPNGD(model, lr=0.01, momentum=0.9, **kwargs)  # type: ignore[arg-type]
        steps[name] = optimizer_step(model, spngd[name])
    for name, (module, make) in PEERS.items():
        if importlib.util.find_spec(module) is None:
            print(f"  ({name}: package {module!r} not importable, skipped)")
            continue
        steps[name] = make(copy.deepcopy(base))
    return steps, spngd


def measure(
    model_name: str, batch: int, size: int, warmup: int, rounds: int, steps_per_round: int
) -> None:
    torch.manual_seed(0)
    classes = 1000 if model_name == "resnet50" else 10
    data = [
        (torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))) for _ in range(4)
    ]
    steps, spngd = contenders(build_model(model_name, num_classes=classes))
    counter = {name: 0 for name in steps}

    def run(name: str, count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            images, labels = data[counter[name] % len(data)]
            steps[name](images, labels)
            counter[name] += 1
        return time.perf_counter() - start

    for name in steps:
        seconds = run(name, warmup)
        print(f"  ({name}: {warmup} warm-up steps took {seconds:.0f} s)", flush=True)
    before = {name: opt.stats()["total"] for name, opt in spngd.items()}
    totals = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name in steps:
            totals[name] += run(name, steps_per_round)
    per_step = {name: total / (rounds * steps_per_round) for name, total in totals.items()}
    print(
        f"\n{model_name} {size}x{size}, batch {batch}: {warmup} warm-up steps, then "
        f"{rounds} interleaved rounds x {steps_per_round} steps"
    )
    print(f"  {'contender':<26}{'ms/step':>10}{'x SGD':>8}   computed in the timed steps")
    for name, seconds in per_step.items():
        share = ""
        if name in spngd:
            after = spngd[name].stats()["total"]
            timed = {key: count - before[name].get(key, 0) for key, count in after.items()}
            share = " ".join(f"{what} {s:.0%}" for what, s in computed_shares(timed).items())
        print(f"  {name:<26}{1e3 * seconds:>10.1f}{seconds / per_step['SGD']:>8.2f}   {share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet50"])
    parser.add_argument("--quick", action="store_true", help="fewer steps (rougher figures)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_malloc()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; SPNGD refresh settings as named; peers at every-step refresh")
    quick = args.quick
    for model_name in args.models:
        if model_name == "resnet20":
            for batch in (128, 512):
                measure(
                    "resnet20",
                    batch,
                    32,
                    warmup=12 if quick else 40,
                    rounds=2 if quick else 4,
                    steps_per_round=4 if quick else 10,
                )
        else:
            measure(
                model_name,
                32,
                224,
                warmup=12 if quick else 20,
                rounds=2,
                steps_per_round=2 if quick else 5,
            )


if __name__ == "__main__":
    main()
