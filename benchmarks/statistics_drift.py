"""How much SP-NGD's statistics change from step to step, and how much of that is noise.

The adaptive refresh skips a statistic while a fresh estimate stays
within ``alpha`` (relative Frobenius norm, default 0.1) of the one in use. Whether it can
skip therefore depends on two things this script measures, per kind of statistic (conv and
Linear ``A`` and ``G``, BatchNorm ``F``):

1. drift: ResNet-20 trained with SP-NGD (statistics every step) on the embedded digits at
   32x32 with pad-crop and flips; after ``--from-step`` steps, the median relative change
   between the fresh estimates of steps ``t - k`` and ``t`` for lags ``k`` = 1 .. 16;
2. noise: the weights then frozen, the median relative difference between the estimates of
   two independent batches of the same size, at 1x, 4x and 16x the batch.

A statistic whose lag-1 change is above ``alpha`` is refreshed at every step; one whose
change grows with the lag is drifting (the weights move), one whose change is flat in the
lag is dominated by sampling noise, which only a larger batch (or a larger ``alpha``)
removes.

    python benchmarks/statistics_drift.py [--batch-size 128] [--steps 80] [--lr 0.1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from spngd import SPNGD
from spngd.refresh import relative_changes
from spngd.train.config import resolve_config
from spngd.train.data import load_data
from spngd.train.models import build_model

LAGS = (1, 2, 4, 8, 16)
Snapshot = dict[tuple[str, str], torch.Tensor]
"""Fresh statistics of one step by (layer, statistic name)."""


def snapshot(opt: SPNGD) -> Snapshot:
    """The statistics just computed (every step, no running average: the factors in use)."""
    return {
        (name, statistic): factor.clone()
        for name, block in opt.curvature.items()
        for statistic, factor in zip(block.statistic_names, block.factors, strict=True)
        if factor is not None
    }


def medians(pairs: list[tuple[Snapshot, Snapshot]]) -> dict[str, float]:
    """Median relative change per statistic name over all layers and pairs."""
    changes: dict[str, list[float]] = {}
    for before, after in pairs:
        for (layer, statistic), value in after.items():
            (change,) = relative_changes([before[(layer, statistic)]], [value])
            changes.setdefault(statistic, []).append(change.item())
    return {statistic: statistics.median(values) for statistic, values in changes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--from-step", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps < args.from_step + max(LAGS) + 1:
        parser.error("--steps must exceed --from-step by more than 16")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = resolve_config({"data": "digits", "image_size": 32, "crop": "pad", "flip": True})
    data = load_data(config)
    model = build_model("resnet20", data.num_classes, in_channels=data.in_channels)
    opt = SPNGD(model, lr=args.lr, momentum=0.9, stat_interval=1)
    generator = torch.Generator().manual_seed(0)

    def step(batch_size: int) -> Snapshot:
        indices = torch.randint(0, len(data.train), (batch_size,), generator=generator)
        images, labels = zip(*(data.train[int(i)] for i in indices), strict=True)
        opt.zero_grad()
        F.cross_entropy(model(torch.stack(images)), torch.tensor(labels)).backward()
        opt.step()
        return snapshot(opt)

    history = [step(args.batch_size) for _ in range(args.steps)]
    print(
        f"ResNet-20, digits at 32x32, batch {args.batch_size}, lr {args.lr:g}: median relative "
        f"change of the fresh statistics over steps {args.from_step}..{args.steps - 1}"
    )
    table = {
        lag: medians(
            [(history[t - lag], history[t]) for t in range(args.from_step + lag, args.steps)]
        )
        for lag in LAGS
    }
    names = list(table[1])
    print(f"  {'lag (steps)':<14}" + "".join(f"{name:>8}" for name in names))
    for lag, row in table.items():
        print(f"  {lag:<14}" + "".join(f"{row[name]:>8.1%}" for name in names))

    for group in opt.param_groups:  # frozen weights: what is left is sampling noise
        group["lr"], group["momentum"] = 0.0, 0.0
    print("weights frozen: two independent batches of the same size")
    for factor in (1, 4, 16):
        size = factor * args.batch_size
        row = medians([(step(size), step(size))])
        print(f"  batch {size:<8}" + "".join(f"{row[name]:>8.1%}" for name in names))


if __name__ == "__main__":
    main()
