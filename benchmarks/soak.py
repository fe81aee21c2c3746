"""Memory soak: many SPNGD steps with every-step refresh; resident memory must stay flat.

A small BatchNorm CNN trains on random data for ``--steps`` steps (default 2,000) with
statistics and inverses refreshed every step, and the checkpoint state taken every 100
steps (as a training loop would). Resident set size (RSS) is sampled after the warm-up and
at the end; the script prints both and the growth (target: <= 10%), and exits non-zero
when the target is missed. glibc's malloc thresholds are pinned at 1 GiB as in the other
benchmarks.

    python benchmarks/soak.py [--steps 2000] [--warmup 100]
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from pinned_malloc import pin_malloc
from spngd import SPNGD

TARGET_GROWTH = 0.10


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    pin_malloc()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    opt = SPNGD(model, lr=0.05, stat_interval=1)
    data = [(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))) for _ in range(8)]
    after_warmup = 0
    for step in range(args.steps):
        images, labels = data[step % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()
        if step % 100 == 99:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, io.BytesIO())
        if step + 1 == args.warmup:
            after_warmup = resident_bytes()
    final = resident_bytes()
    growth = final / after_warmup - 1.0
    print(
        f"{args.steps} steps, every-step refresh: RSS after {args.warmup} warm-up steps "
        f"{after_warmup / 2**20:.1f} MiB, at the end {final / 2**20:.1f} MiB, "
        f"growth {100 * growth:+.1f}% (target <= {100 * TARGET_GROWTH:.0f}%)"
    )
    sys.exit(0 if growth <= TARGET_GROWTH else 1)


if __name__ == "__main__":
    main()
