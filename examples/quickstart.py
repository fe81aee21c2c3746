"""Train a small BatchNorm CNN with SPNGD and with SGD on a synthetic task, side by side.

Runs offline in a few seconds on 2 CPU cores and prints the loss curve of each
optimizer, then what SPNGD does with every layer (``opt.describe()``).

    python examples/quickstart.py [--steps 40] [--batch 256] [--fisher empirical|mc]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from spngd import SPNGD


def make_task(examples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes of noisy 8x8 templates."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (examples,), generator=gen)
    return 0.6 * templates[labels] + torch.randn(examples, 1, 8, 8, generator=gen), labels


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def train(name: str, args: argparse.Namespace) -> nn.Module:
    images, labels = make_task(args.batch * 8)
    model = make_model()
    if name == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    else:
        opt = SPNGD(model, lr=0.1, momentum=0.9, damping=1e-3, fisher=args.fisher)
    start = time.perf_counter()
    for step in range(args.steps):
        part = slice((step % 8) * args.batch, (step % 8 + 1) * args.batch)
        opt.zero_grad()
        logits = model(images[part])
        if isinstance(opt, SPNGD) and args.fisher == "mc":
            opt.sample_fisher(logits)  # MC Fisher: statistics from sampled labels
        loss = F.cross_entropy(logits, labels[part])
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"{name:>5} step {step:3d}  loss {loss.item():.4f}")
    print(f"{name:>5} {args.steps} steps in {time.perf_counter() - start:.1f} s")
    if isinstance(opt, SPNGD):
        for module, how in opt.describe().items():
            print(f"       {module:>4}: {how}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--fisher", choices=("empirical", "mc"), default="empirical")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for name in ("SGD", "SPNGD"):
        train(name, args)


if __name__ == "__main__":
    main()
