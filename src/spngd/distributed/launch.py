"""The process group of a program started by ``torchrun``: which device each rank uses,
the backend that suits it, set-up before any collective, and teardown.

``torchrun`` tells each process its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); a plain ``python`` start has none
and runs as the only rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from spngd.distributed.exchange import RankFailureError, collective_failure
from spngd.messages import first_sentence


def launched_world_size() -> int:
    """Processes ``torchrun`` started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(requested: torch.device) -> torch.device:
    """The device this process uses for ``requested``.

    Under torchrun a CUDA device without an index is GPU ``LOCAL_RANK``, one per process.
    An explicit ``cuda:N`` is kept with one process per machine; with several it would put
    them all on one GPU, so that is refused (ValueError).
    """
    if requested.type != "cuda" or launched_world_size() <= 1:
        return requested
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"this process's LOCAL_RANK is {local_rank} but the machine has "
                f"{torch.cuda.device_count()} GPU(s); start at most that many per machine"
            )
        return torch.device("cuda", local_rank)
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"--device {requested} would put every process of this machine on one GPU; "
            "give --device cuda, and each process takes the GPU of its LOCAL_RANK"
        )
    return requested


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[tuple[int, int]]:
    """``(rank, world size)`` of this process, inside the default process group.

    Under torchrun the group is initialised on entry unless it exists: NCCL for a CUDA
    ``device`` (made the current device first, and bound to the group), gloo otherwise,
    collectives failing after ``timeout_s``. A group initialised here is torn down on exit:
    after a clean run the ranks first wait for each other, so that none tears down while
    another still talks to it; after an exception they do not wait for ranks that may be
    gone. A collective that failed because a peer is gone (DDP's gradient all-reduce
    included) comes out as a :class:`RankFailureError`.
    """
    created = launched_world_size() > 1 and not dist.is_initialized()
    if created:
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
                dist.init_process_group("nccl", timeout=timeout, device_id=device)
            else:
                dist.init_process_group("gloo", timeout=timeout)
        except (RuntimeError, ValueError) as error:  # a rendezvous that fails or times out
            raise collective_failure("setting up the process group", error) from error
    try:
        yield current()
    except BaseException as error:
        reason = rank_failure(error)
        if created:
            dist.destroy_process_group()
        if reason is not None and not isinstance(error, RankFailureError):
            raise collective_failure("a collective (DDP's, or another)", error) from error
        raise
    if created:
        try:
            dist.barrier()
        except RuntimeError as error:  # a peer gone after its last collective
            dist.destroy_process_group()
            raise collective_failure("ending the run", error) from error
        dist.destroy_process_group()


def current() -> tuple[int, int]:
    """``(rank, world size)`` in the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_all(local: Any) -> list[Any]:
    """Every rank's ``local`` object, by rank, on every rank."""
    world_size = current()[1]
    if world_size == 1:
        return [local]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, local)
    return out


TRANSPORT_FAILURES = (
    "gloo",
    "nccl",
    "connection reset",
    "connection closed",
    "pair closure",
    "timed out",
    "timeout",
)
"""Words (any case) in the messages of the plain RuntimeErrors torch raises when a
collective fails because a peer is gone (gloo's transport errors are not
``torch.distributed.DistError``): "Connection reset by peer" from a dead rank, "Timed out
waiting ... for send operation" or "Application timeout caused pair closure" from a
stalled one, depending on where the survivor waits."""


def rank_failure(error: BaseException) -> str | None:
    """When ``error`` comes from a collective that failed because another rank died or
    stalled (SPNGD's own, or DDP's gradient all-reduce), the first sentence of its message;
    None for any other error."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    message = first_sentence(error)
    if isinstance(error, RankFailureError | dist.DistError):
        return message
    if isinstance(error, RuntimeError) and any(
        word in message.lower() for word in TRANSPORT_FAILURES
    ):
        return message
    return None
