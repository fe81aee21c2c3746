"""Distributed SP-NGD: communication volume for ResNet-50 and a per-stage time breakdown.

Part 1 (exact arithmetic, no processes): bytes sent per rank on a refresh step (every
statistic refreshed, gradients averaged by DistributedDataParallel) for ResNet-50's layer
shapes, from the same ``FlatPacker``/``TensorSpec`` layouts and block placement as
``spngd.distributed.exchange``, at world sizes 2, 4 and 8 and comm dtypes float32, bfloat16
and float16, against a naive float32 all-reduce of every full factor.

Part 2 (measured): mean milliseconds per step and stage of SPNGD (refresh every step) and of
plain SGD, both on ``DistributedDataParallel`` CIFAR ResNet-20 with random 32x32 data, local
batch 32, for 2 and 4 gloo processes of one thread each; mean and max over ranks. glibc's
malloc thresholds are pinned at 1 GiB (the script re-executes itself with them set).

    python benchmarks/distributed.py [--quick] [--worlds 2 4] [--warmup 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spngd import SPNGD
from spngd.curvature import CurvatureBlock
from spngd.distributed import DistributedConfig, FlatPacker, TensorSpec, assign_blocks
from spngd.distributed.assignment import BlockCost
from spngd.distributed.exchange import gather_specs, reduce_specs, statistic_spec
from spngd.timing import seconds_since
from spngd.train.models import build_model

PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MB = 1_000_000


def pin_malloc() -> None:
    """Re-execute this script with glibc's malloc thresholds pinned, unless they are."""
    if any(os.environ.get(key) != value for key, value in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_MALLOC})


# -- part 1: communication volume ------------------------------------------------------------
@dataclass(frozen=True)
class Layouts:
    """Element counts of one model's buffers, per owner rank, at one world size."""

    reduce: list[int]  # statistics bucket reduced onto each owner (packed, with counts)
    gather: list[int]  # preconditioned-gradient buffer of each owner (unpadded)
    full_factors: int  # every statistic unpacked: A, G d x d per group; BN (C, 3)
    packed_factors: int  # conv/FC triangles + BN (C, 3), no counts
    gradients: int  # every parameter of a curvature block


def curvature_blocks(model: nn.Module) -> dict[str, CurvatureBlock]:
    """SPNGD's blocks for ``model`` at its defaults (the learning rate plays no part)."""
    return SPNGD(model, lr=0.1).curvature


def layouts(blocks: dict[str, CurvatureBlock], world_size: int) -> Layouts:
    """The exchange's bucket layouts on a refresh step under DDP (no gradients reduced):
    each block's ``reduce_specs`` and ``gather_specs``, with the owners from
    ``assign_blocks`` under the default config. The per-owner totals are what counts:
    every bytes-sent model below adds over buckets, so splitting an owner's share into
    several buckets changes nothing.
    """
    costs = [BlockCost(block.name, block.inversion_cost) for block in blocks.values()]
    owners = assign_blocks(costs, world_size, DistributedConfig().assignment)
    reduce: list[list[TensorSpec]] = [[] for _ in range(world_size)]
    gather: list[list[TensorSpec]] = [[] for _ in range(world_size)]
    full = packed = grads = 0
    for block, owner in zip(blocks.values(), owners, strict=True):
        block.to_compute = [True] * len(block.statistic_names)
        block.measure_noise = True
        reduce[owner] += reduce_specs(block, average_gradients=False)
        gather[owner] += gather_specs(block)
        stats = [statistic_spec(block, i) for i in range(len(block.statistic_names))]
        full += sum(math.prod(spec.shape) for spec in stats)
        packed += sum(spec.numel for spec in stats)
        grads += sum(p.numel() for p in block.params)
    return Layouts(
        reduce=[FlatPacker(specs).numel for specs in reduce],
        gather=[FlatPacker(specs).numel for specs in gather],
        full_factors=full,
        packed_factors=packed,
        gradients=grads,
    )


def ring_all_reduce(numel: int, p: int) -> Fraction:
    """Elements one rank sends in a ring all-reduce of ``numel`` elements."""
    return Fraction(2 * (p - 1), p) * numel


def direct_reduce(buckets: list[int], rank: int) -> Fraction:
    """Elements ``rank`` sends when every non-owner sends each bucket once (chain/tree)."""
    return Fraction(sum(n for owner, n in enumerate(buckets) if owner != rank))


def gloo_ring_reduce(buckets: list[int], rank: int) -> Fraction:
    """gloo's reduce: ring reduce-scatter ((P-1)/P of the bucket) then each non-root sends
    its reduced 1/P chunk to the root; segment rounding ignored."""
    p = len(buckets)
    own = Fraction(p - 1, p) * buckets[rank]
    return own + sum(n for owner, n in enumerate(buckets) if owner != rank)


def all_gather_padded(sizes: list[int]) -> Fraction:
    """Elements one rank sends in the exchange's all-gather: every rank's buffer is padded to
    the largest, S, and a ring (or direct) all-gather sends (P-1) S per rank."""
    return Fraction((len(sizes) - 1) * max(sizes))


def mean_max(values: list[Fraction]) -> tuple[Fraction, Fraction]:
    return sum(values, Fraction(0)) / len(values), max(values)


def communication_volume(worlds: list[int]) -> None:
    """Print part 1."""
    model = build_model("resnet50", 1000)
    blocks = curvature_blocks(model)
    kinds: dict[str, int] = {}
    for block in blocks.values():
        kinds[type(block.module).__name__] = kinds.get(type(block.module).__name__, 0) + 1
    base = layouts(blocks, 1)
    print("== 1. Bytes sent per rank on a refresh step: ResNet-50 (1000 classes) ==")
    print(
        f"blocks: {', '.join(f'{n} {k}' for k, n in kinds.items())}; "
        f"placement '{DistributedConfig().assignment}'; gradients averaged by DDP"
    )
    print("elements per step (independent of the world size):")
    print(f"  statistics, full (A, G d x d; BN (C, 3))           {base.full_factors:>13,}")
    print(f"  statistics, packed (triangles; BN (C, 3))         {base.packed_factors:>13,}")
    print(f"    + per block a count and noise scalars (reduce)   {sum(base.reduce):>12,}")
    print(f"  preconditioned gradients + per-block headers      {sum(base.gather):>13,}")
    print(f"  gradients of the preconditioned layers            {base.gradients:>13,}")
    print("bytes-sent models (per rank; B = buffer bytes, P = world size):")
    print("  naive: ring all-reduce of all full factors in float32: 2(P-1)/P x B")
    print("  SP-NGD statistics: one reduce per owner's bucket, two models:")
    print("    direct (chain/tree, e.g. NCCL ring reduce): each non-owner sends the bucket once,")
    print("      the owner sends nothing -> rank r sends sum of the other owners' buckets;")
    print("    gloo (ring reduce-scatter, then 1/P chunks to the root): B per bucket it does")
    print("      not own, (P-1)/P x B for its own (segment rounding ignored)")
    print("  SP-NGD results: all-gather of per-owner buffers padded to the largest, S:")
    print("    ring or direct, (P-1) x S per rank (padding counted)")
    print("  DDP gradient all-reduce (both schemes, float32): ring, 2(P-1)/P x B")
    print("  ratios are SP-NGD / naive for the mean rank and for the busiest rank")
    for p in worlds:
        lay = layouts(blocks, p)
        naive = ring_all_reduce(lay.full_factors, p) * 4
        ddp = ring_all_reduce(lay.gradients, p) * 4
        print(
            f"\nP={p}: reduce buckets {min(lay.reduce):,}..{max(lay.reduce):,} elements, "
            f"gather buffers {min(lay.gather):,}..{max(lay.gather):,} (padded to the largest)"
        )
        print(
            f"  naive statistics {float(naive) / MB:.1f} MB/rank; "
            f"DDP gradients {float(ddp) / MB:.1f} MB/rank"
        )
        print(
            f"  {'comm':<9}{'stats MB mean/max':>19}{'ratio mean/max':>16}"
            f"{'gloo ratio':>12}{'gather MB':>11}{'stats+gather':>14}{'+DDP vs naive+DDP':>19}"
        )
        for label, dtype in COMM_DTYPES.items():
            size = torch.empty((), dtype=dtype).element_size()
            ranks = range(p)
            stats = [direct_reduce(lay.reduce, r) * size for r in ranks]
            gloo = [gloo_ring_reduce(lay.reduce, r) * size for r in ranks]
            gather = all_gather_padded(lay.gather) * size
            s_mean, s_max = mean_max(stats)
            g_mean, g_max = mean_max(gloo)
            total_mean, total_max = s_mean + gather, s_max + gather
            print(
                f"  {label:<9}{float(s_mean) / MB:>9.1f}/{float(s_max) / MB:<9.1f}"
                f"{float(s_mean / naive):>8.3f}/{float(s_max / naive):<7.3f}"
                f"{float(g_mean / naive):>6.3f}/{float(g_max / naive):<5.3f}"
                f"{float(gather) / MB:>11.1f}"
                f"{float(total_mean / naive):>8.3f}/{float(total_max / naive):<5.3f}"
                f"{float((total_mean + ddp) / (naive + ddp)):>12.3f}/"
                f"{float((total_max + ddp) / (naive + ddp)):<5.3f}"
            )
    print(
        "\n'stats+gather' and '+DDP' are ratios: (statistics reduce + result all-gather) / naive"
        "\nstatistics all-reduce, then with the DDP gradient all-reduce added to both sides."
    )


# -- part 2: time per stage ----------------------------------------------------------------
FWD_BWD = "forward+backward"
OTHER = "rest of step()"
TOTAL = "total"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StepTimer:
    """Per-step stage seconds of one optimizer: the wall time of forward+backward and of
    ``step()``, each minus the optimizer's own stages recorded inside it. ``seconds``
    returns a fresh snapshot of cumulative seconds per stage (``SPNGD.stage_seconds``)."""

    def __init__(self, seconds: Callable[[], dict[str, float]], rest: str = OTHER) -> None:
        self.seconds = seconds
        self.rest = rest
        self.totals: dict[str, float] = {}
        self.in_backward: set[str] = set()
        self.steps = 0

    def add(self, stage: str, value: float) -> None:
        self.totals[stage] = self.totals.get(stage, 0.0) + value

    def run(self, fwd_bwd: Callable[[], None], step: Callable[[], Any]) -> None:
        before = self.seconds()
        t0 = time.perf_counter()
        fwd_bwd()
        t1 = time.perf_counter()
        middle = self.seconds()
        step()
        t2 = time.perf_counter()
        after = self.seconds()
        in_bwd = seconds_since(before, middle)
        in_step = seconds_since(middle, after)
        self.add(FWD_BWD, t1 - t0 - sum(in_bwd.values()))
        for key, value in in_bwd.items():
            label = f"{key} (in backward)" if key in after and key in in_step else key
            self.in_backward.add(label)
            self.add(label, value)
        for key, value in in_step.items():
            self.add(key, value)
        self.add(self.rest, t2 - t1 - sum(in_step.values()))
        self.add(TOTAL, t2 - t0)
        self.steps += 1

    def means_ms(self) -> dict[str, float]:
        return {k: 1e3 * v / self.steps for k, v in self.totals.items()}


def worker(
    rank: int, world_size: int, port: int, warmup: int, rounds: int, steps: int, out: str
) -> None:
    """One gloo rank: time DDP+SPNGD and DDP+SGD, interleaved; rank 0 writes the results."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
    )
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1000 + rank)
        images = torch.randn(32, 3, 32, 32, generator=gen)
        labels = torch.randint(0, 10, (32,), generator=gen)
        ngd_model = DistributedDataParallel(build_model("resnet20", 10))
        late_model = DistributedDataParallel(build_model("resnet20", 10))
        sgd_model = DistributedDataParallel(build_model("resnet20", 10))
        ngd = SPNGD(ngd_model, lr=0.01, momentum=0.9, stat_interval=1)
        late = SPNGD(
            late_model,
            lr=0.01,
            momentum=0.9,
            stat_interval=1,
            distributed=DistributedConfig(overlap=False),
        )
        sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)

        def fwd_bwd(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
            def run() -> None:
                opt.zero_grad()
                F.cross_entropy(model(images), labels).backward()

            return run

        contenders = {
            "SPNGD": (ngd.stage_seconds, OTHER, fwd_bwd(ngd_model, ngd), ngd.step),
            "SPNGD no overlap": (late.stage_seconds, OTHER, fwd_bwd(late_model, late), late.step),
            "SGD": (dict, "update (all of step())", fwd_bwd(sgd_model, sgd), sgd.step),
        }
        for seconds, rest, run, step in contenders.values():
            timer = StepTimer(seconds, rest)
            for _ in range(warmup):
                timer.run(run, step)
        timers = {name: StepTimer(c[0], c[1]) for name, c in contenders.items()}
        dist.barrier()
        for _ in range(rounds):
            for name, (_, _, run, step) in contenders.items():
                for _ in range(steps):
                    timers[name].run(run, step)
        local = {
            "means": {name: timer.means_ms() for name, timer in timers.items()},
            "in_backward": sorted(timers["SPNGD"].in_backward),
        }
        gathered: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def measure(world_size: int, warmup: int, rounds: int, steps: int) -> list[dict[str, Any]]:
    """Spawn ``world_size`` gloo ranks and return each rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(
            worker,
            args=(world_size, free_port(), warmup, rounds, steps, out),
            nprocs=world_size,
            join=True,
        )
        with open(out) as f:
            return json.load(f)


def print_breakdown(results: dict[int, list[dict[str, Any]]], optimizer: str) -> None:
    """One row per stage, mean and max over ranks of the mean ms/step, per world size."""
    stages: list[str] = []
    for ranks in results.values():
        for rank in ranks:
            for stage in rank["means"][optimizer]:
                if stage not in stages:
                    stages.append(stage)
    stages = [s for s in stages if s != TOTAL] + [TOTAL]
    header = f"  {'stage (ms/step)':<44}"
    for p in results:
        header += f"{f'P={p} mean':>11}{'max':>8}{'%':>5}"
    print(header)
    for stage in stages:
        line = f"  {stage:<44}"
        for ranks in results.values():
            values = [rank["means"][optimizer].get(stage, 0.0) for rank in ranks]
            total = max(rank["means"][optimizer][TOTAL] for rank in ranks)
            mean, top = sum(values) / len(values), max(values)
            line += f"{mean:>11.1f}{top:>8.1f}{100 * top / total:>5.0f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--volume-worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer")
    args = parser.parse_args()
    pin_malloc()
    warmup, steps = (1, 2) if args.quick else (args.warmup, args.steps)
    start = time.perf_counter()
    communication_volume(args.volume_worlds)
    print(
        f"\n== 2. Time per stage: DDP CIFAR ResNet-20, random 32x32 data, local batch 32, "
        f"gloo, 1 thread/rank, {os.cpu_count()} cores ==\n"
        f"{warmup} warm-up steps, then {steps} timed steps per optimizer, SPNGD (with and "
        f"without overlap) and SGD\nalternating step by step; SPNGD refreshes statistics and "
        f"inverses every step.\n"
        f"load average before timing: {os.getloadavg()[0]:.1f} (other processes on the "
        f"machine compete for the cores and inflate the times)"
    )
    results = {p: measure(p, warmup, steps, 1) for p in args.worlds}
    print(
        "mean: over ranks of each rank's mean; max: the slowest rank; %: max / slowest "
        "rank's total.\nforward+backward excludes the stages the optimizer times inside "
        "backward; it includes DDP's gradient all-reduce.\n'rest of step()' is the time in "
        "step() outside the optimizer's named stages."
    )
    print("\nSPNGD (stat_interval=1; statistics reduced during backward, overlap=True):")
    print_breakdown(results, "SPNGD")
    print("\nSPNGD without overlap (statistics reduced at step(), overlap=False):")
    print_breakdown(results, "SPNGD no overlap")
    comm = "statistics and gradient communication"
    for p, ranks in results.items():
        waits = [
            max(rank["means"][name].get(comm, 0.0) for rank in ranks)
            for name in ("SPNGD no overlap", "SPNGD")
        ]
        print(
            f"P={p}: waiting for the statistics reduction in step(): {waits[0]:.1f} ms "
            f"without overlap, {waits[1]:.1f} ms with it ({waits[0] - waits[1]:.1f} ms "
            "hidden behind backward)"
        )
    print("\nSGD with momentum (reference):")
    print_breakdown(results, "SGD")
    for p, ranks in results.items():
        ngd = max(rank["means"]["SPNGD"][TOTAL] for rank in ranks)
        sgd = max(rank["means"]["SGD"][TOTAL] for rank in ranks)
        print(f"P={p}: SPNGD / SGD step time (slowest rank) = {ngd / sgd:.2f}")
    print(f"\n(wall time of this script: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
