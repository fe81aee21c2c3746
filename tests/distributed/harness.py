"""Run a function on several gloo processes (torch.multiprocessing spawn, CPU)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    fn: Callable[..., None],
    args: tuple[Any, ...],
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    fn(rank, world_size, *args)
    # every rank is done with its collectives before any tears the group down
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: gloo's threads sometimes abort the process there
    # ("terminate called without an active exception") after a clean run.
    os._exit(0)


def run_workers(
    fn: Callable[..., None], world_size: int, *args: Any, timeout_s: float = 60.0
) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; re-raise failures."""
    mp.spawn(
        _entry, args=(world_size, free_port(), timeout_s, fn, args), nprocs=world_size, join=True
    )


def start_workers(
    fn: Callable[..., None], world_size: int, *args: Any, timeout_s: float = 60.0
) -> mp.ProcessContext:
    """Like :func:`run_workers` but returns at once; the caller joins the processes."""
    return mp.start_processes(
        _entry,
        args=(world_size, free_port(), timeout_s, fn, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
