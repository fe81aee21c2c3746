"""Time per training step of SPNGD (statistics and inverses every step) vs SGD with momentum.

CIFAR-style ResNet-20 with BatchNorm on random 32x32 images, 2 threads, batch 128 and
512. Both optimizers run in the same process and are interleaved round by round, so
machine noise hits both alike; glibc's malloc thresholds are pinned at 1 GiB (the
script re-executes itself with them set) so a step's time does not depend on what ran
before it. Prints each mean time and the ratio SPNGD / SGD.

    python benchmarks/step_overhead.py [--batches 128 512] [--rounds 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spngd import SPNGD
from spngd.train.models import build_model

PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def pin_malloc() -> None:
    """Re-execute this script with glibc's malloc thresholds pinned, unless they are."""
    if any(os.environ.get(key) != value for key, value in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_MALLOC})


def make_step(
    model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()

    return step


def time_steps(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Mean seconds per step of each optimizer, interleaved over ``rounds``."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    base = build_model("resnet20", num_classes=10)
    sgd_model, ngd_model = copy.deepcopy(base), copy.deepcopy(base)
    contenders = {
        "SGD": make_step(
            sgd_model,
            torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9),
            images,
            labels,
        ),
        "SPNGD": make_step(ngd_model, SPNGD(ngd_model, lr=0.01, momentum=0.9), images, labels),
    }
    for step in contenders.values():  # warm-up: allocator, kernels, first statistics
        time_steps(step, 2)
    totals = dict.fromkeys(contenders, 0.0)
    for _ in range(rounds):
        for name, step in contenders.items():
            totals[name] += time_steps(step, steps)
    return {name: total / rounds for name, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_malloc()
    torch.set_num_threads(args.threads)
    print(
        f"ResNet-20 (CIFAR), {args.threads} threads, refresh every step, "
        f"{args.rounds} interleaved rounds x {args.steps} steps"
    )
    print(f"{'batch':>6} {'SGD ms/step':>12} {'SPNGD ms/step':>14} {'ratio':>6}")
    for batch in args.batches:
        times = measure(batch, args.rounds, args.steps)
        ratio = times["SPNGD"] / times["SGD"]
        print(f"{batch:>6} {1e3 * times['SGD']:>12.1f} {1e3 * times['SPNGD']:>14.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
