"""Checks of SP-NGD on a GPU, in one short run: what CPU tests cannot show.

1. **Host synchronisations**: a few steps of a small conv net under
   ``torch.cuda.set_sync_debug_mode("warn")``, counting the synchronising calls per
   ``backward()`` and per ``step()``.
2. **CPU-vs-device parity**: the same model, batch and step on the CPU (float64) and on the
   device (float32), with TF32 off and on: largest relative error of every block's
   statistics (``A``, ``G``, ``F``) and of the update.
3. **Mixed precision**: five steps with fp16 autocast and a GradScaler, and with bf16
   autocast, against float32 on the device: cosine of the total update and relative
   distance of the parameters.
4. **State dict round trip**: on the device, save after two steps (through bytes, loaded
   onto the CPU first, as a checkpoint would be), load into a fresh optimizer and continue:
   both continuations must agree, and the saved curvature must be on the CPU.
5. **Step time per stage**: ResNet-50 at 224x224, batch 32 (``--batch``), SGD and SP-NGD
   (default refresh) interleaved, with the device synchronised around each step; SP-NGD's
   stages (host time to issue them) beside the step ratio.
6. **Distributed parity** with 2 or more devices: 2 processes (NCCL on GPUs, gloo with
   ``--device cpu``), DDP, against one process with the two shares as micro-batches, with
   float32 and bfloat16 communication: largest difference from the single process and
   whether the ranks' parameters are bit-identical.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--batch 32]

``--device cpu`` runs what applies without CUDA (the test suite does so with ``--quick``,
to keep the script working).
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import os
import socket
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spngd import SPNGD
from spngd.train.models import build_model


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def batch(seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=gen), torch.randint(0, 10, (size,), generator=gen)


def train_steps(
    model: nn.Module,
    opt: SPNGD,
    device: torch.device,
    steps: range,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    for step in steps:
        x, y = (t.to(device) for t in batch(step))
        opt.zero_grad()
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=bool(autocast)):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double().cpu()
    return float((got.double().cpu() - want).norm() / want.norm().clamp(min=1e-30))


# -- 1 ----------------------------------------------------------------------------------------
def host_syncs(device: torch.device) -> None:
    if device.type != "cuda":
        print("host synchronisations: skipped (needs CUDA)")
        return
    model = small_model().to(device)
    opt = SPNGD(model, lr=0.05)
    train_steps(model, opt, device, range(3))
    counts = []
    for step in range(3, 9):
        x, y = (t.to(device) for t in batch(step))
        opt.zero_grad()
        per_phase = []
        for phase in ("backward", "step"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                if phase == "backward":
                    F.cross_entropy(model(x), y).backward()
                else:
                    opt.step()
                torch.cuda.set_sync_debug_mode("default")
            per_phase.append(sum("synchroniz" in str(w.message) for w in caught))
        counts.append(tuple(per_phase))
    print(f"host synchronisations per (backward, step), steps 4-9: {counts}")


# -- 2 ----------------------------------------------------------------------------------------
def parity(device: torch.device) -> None:
    modes = [False, True] if device.type == "cuda" else [False]
    for tf32 in modes:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        results = {}
        for where, dtype in (("reference", torch.float64), ("device", torch.float32)):
            model = small_model().to(dtype)
            target = torch.device("cpu") if where == "reference" else device
            model = model.to(target)
            start = [p.detach().clone() for p in model.parameters()]
            opt = SPNGD(model, lr=0.1, stat_interval=1)
            x, y = batch(0)
            opt.zero_grad()
            F.cross_entropy(model(x.to(target, dtype)), y.to(target)).backward()
            opt.step()
            stats = {
                f"{name}.{key}": factor
                for name, block in opt.curvature.items()
                for key, factor in zip(block.statistic_names, block.factors, strict=True)
            }
            update = torch.cat(
                [(p.detach() - s).flatten() for p, s in zip(model.parameters(), start, strict=True)]
            )
            results[where] = (stats, update)
        (cpu_stats, cpu_update), (dev_stats, dev_update) = results["reference"], results["device"]
        worst = {kind: 0.0 for kind in ("A", "G", "F")}
        for key, want in cpu_stats.items():
            kind = key.rsplit(".", 1)[1]
            worst[kind] = max(worst[kind], relative(dev_stats[key], want))
        errors = ", ".join(f"{kind} {error:.1e}" for kind, error in worst.items())
        print(
            f"parity, {device} float32 vs CPU float64 (TF32 {'on' if tf32 else 'off'}): largest "
            f"relative error {errors}; update {relative(dev_update, cpu_update):.1e}"
        )


# -- 3 ----------------------------------------------------------------------------------------
def mixed_precision(device: torch.device, steps: int) -> None:
    def run(autocast: torch.dtype | None, scaled: bool) -> list[torch.Tensor]:
        model = small_model().to(device)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12) if scaled else None
        opt = SPNGD(model, lr=0.05, grad_scaler=scaler)
        train_steps(model, opt, device, range(steps), autocast, scaler)
        return [p.detach() for p in model.parameters()]

    start = [p.detach().to(device) for p in small_model().parameters()]
    full = run(None, False)
    full_step = torch.cat([(p - s).flatten() for p, s in zip(full, start, strict=True)])
    cases = [("bf16 autocast", torch.bfloat16, False)]
    if device.type == "cuda":
        cases.insert(0, ("fp16 autocast + GradScaler", torch.float16, True))
    for label, dtype, scaled in cases:
        mixed = run(dtype, scaled)
        mixed_step = torch.cat([(p - s).flatten() for p, s in zip(mixed, start, strict=True)])
        cosine = F.cosine_similarity(mixed_step, full_step, dim=0).item()
        finite = all(bool(torch.isfinite(p).all()) for p in mixed)
        distance = relative(
            torch.cat([p.flatten() for p in mixed]), torch.cat([p.flatten() for p in full])
        )
        print(
            f"{label} vs float32, {steps} steps: update cosine {cosine:.4f}, parameters' "
            f"relative distance {distance:.1e}, finite {finite}"
        )


# -- 4 ----------------------------------------------------------------------------------------
def state_dict_round_trip(device: torch.device) -> None:
    model = small_model().to(device)
    opt = SPNGD(model, lr=0.05, fisher="mc")
    train_steps_mc(model, opt, device, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)
    on_cpu = all(
        t.device.type == "cpu"
        for block in saved["optimizer"]["curvature"].values()
        for t in block["factors"]
        if t is not None
    )
    resumed = small_model().to(device)
    resumed.load_state_dict(saved["model"])
    resumed_opt = SPNGD(resumed, lr=0.05, fisher="mc")
    resumed_opt.load_state_dict(saved["optimizer"])
    train_steps_mc(model, opt, device, range(2, 4))
    train_steps_mc(resumed, resumed_opt, device, range(2, 4))
    same = all(
        torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters(), strict=True)
    )
    print(
        f"state dict round trip (MC Fisher): curvature saved on the CPU {on_cpu}, "
        f"continuation identical {same}"
    )


def train_steps_mc(model: nn.Module, opt: SPNGD, device: torch.device, steps: range) -> None:
    for step in steps:
        x, y = (t.to(device) for t in batch(step))
        opt.zero_grad()
        logits = model(x)
        opt.sample_fisher(logits)
        F.cross_entropy(logits, y).backward()
        opt.step()


# -- 5 ----------------------------------------------------------------------------------------
def resnet50_timing(device: torch.device, batch_size: int, rounds: int) -> None:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    base = build_model("resnet50", 1000).to(device)
    models = {"SGD": base, "SPNGD": copy.deepcopy(base)}
    opts: dict[str, torch.optim.Optimizer] = {
        "SGD": torch.optim.SGD(models["SGD"].parameters(), lr=0.01, momentum=0.9),
        "SPNGD": SPNGD(models["SPNGD"], lr=0.01),
    }
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)

    def step(name: str) -> float:
        synchronize()
        start = time.perf_counter()
        opts[name].zero_grad()
        F.cross_entropy(models[name](x), y).backward()
        opts[name].step()
        synchronize()
        return time.perf_counter() - start

    for name in opts:  # warm-up, past the refresh's own warm-up of full refreshes
        for _ in range(5 if rounds > 3 else 1):
            step(name)
    spngd = opts["SPNGD"]
    assert isinstance(spngd, SPNGD)
    stages_before = spngd.stage_seconds()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name in opts:
            times[name].append(step(name))
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    stages = {
        stage: 1e3 * (seconds - stages_before.get(stage, 0.0)) / rounds
        for stage, seconds in spngd.stage_seconds().items()
    }
    shown = ", ".join(f"{stage} {ms:.1f}" for stage, ms in stages.items() if ms >= 0.05)
    print(
        f"ResNet-50 224x224 batch {batch_size} on {device}: SGD {1e3 * median['SGD']:.1f} ms, "
        f"SPNGD {1e3 * median['SPNGD']:.1f} ms per step ({median['SPNGD'] / median['SGD']:.2f}x); "
        f"SPNGD stages (ms per step, host time): {shown}"
    )


# -- 6 ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, device_type: str, port: int, comm: torch.dtype, out: str) -> None:
    from spngd.distributed import DistributedConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=2)
    model = small_model().to(device)
    ddp = DistributedDataParallel(model)
    opt = SPNGD(ddp, lr=0.05, distributed=DistributedConfig(comm_dtype=comm))
    for step in range(4):
        x, y = batch(step, 32)
        part = slice(16 * rank, 16 * (rank + 1))
        opt.zero_grad()
        F.cross_entropy(ddp(x[part].to(device)), y[part].to(device)).backward()
        opt.step()
    torch.save([p.detach().cpu() for p in model.parameters()], f"{out}/rank{rank}.pt")
    # Free the DDP wrapper before the group goes: torch's DDP + gloo teardown can abort a
    # rank at exit while a DistributedDataParallel holding the group is alive
    # (docs/troubleshooting.md).
    del opt, ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def distributed_parity(device: torch.device, out: str) -> None:
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        print("distributed parity: skipped (needs 2 GPUs)")
        return
    model = small_model().to(device)
    opt = SPNGD(model, lr=0.05, accumulation_steps=2)
    for step in range(4):
        x, y = batch(step, 32)
        opt.zero_grad()
        for part in (slice(0, 16), slice(16, 32)):
            (F.cross_entropy(model(x[part].to(device)), y[part].to(device)) / 2).backward()
        opt.step()
    reference = [p.detach().cpu() for p in model.parameters()]
    for comm in (torch.float32, torch.bfloat16):
        mp.spawn(_ddp_worker, args=(device.type, _free_port(), comm, out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(2)]
        identical = all(torch.equal(a, b) for a, b in zip(*ranks, strict=True))
        largest = max(float((a - b).abs().max()) for a, b in zip(ranks[0], reference, strict=True))
        backend = "NCCL" if device.type == "cuda" else "gloo"
        print(
            f"2 ranks ({backend}, {str(comm).removeprefix('torch.')} communication) vs one "
            f"process: largest parameter difference {largest:.1e}; ranks bit-identical {identical}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps, no ResNet-50")
    parser.add_argument("--batch", type=int, default=32, help="ResNet-50 batch size")
    parser.add_argument("--out", default="/tmp/spngd-gpu-check", help="scratch folder")
    args = parser.parse_args()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    checks: list[tuple[str, Callable[[], None]]] = [
        ("host synchronisations", lambda: host_syncs(device)),
        ("parity", lambda: parity(device)),
        ("mixed precision", lambda: mixed_precision(device, 2 if args.quick else 5)),
        ("state dict", lambda: state_dict_round_trip(device)),
        ("distributed parity", lambda: distributed_parity(device, args.out)),
    ]
    if not args.quick:
        checks.append(("ResNet-50", lambda: resnet50_timing(device, args.batch, 10)))
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    for name, check in checks:
        start = time.perf_counter()
        check()
        print(f"  [{name}: {time.perf_counter() - start:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
