"""Which device each torchrun process takes (no processes needed: the environment is
what torchrun sets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spngd.distributed.launch import launched_world_size, rank_device


def _torchrun(monkeypatch: pytest.MonkeyPatch, world: int, local_world: int, local: int) -> None:
    """What torchrun sets, on a machine with 4 GPUs."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


@pytest.mark.parametrize(
    ("requested", "world", "local_world", "local", "expected"),
    [
        ("cuda", 1, 1, 0, "cuda"),  # one process: torch's current device
        ("cuda:1", 1, 1, 0, "cuda:1"),
        ("cpu", 4, 4, 3, "cpu"),
        ("cuda", 4, 4, 3, "cuda:3"),  # one GPU per process
        ("cuda", 8, 4, 1, "cuda:1"),  # two machines of four
        ("cuda:2", 2, 1, 0, "cuda:2"),  # one process per machine keeps its choice
    ],
)
def test_each_process_takes_the_gpu_of_its_local_rank(
    monkeypatch: pytest.MonkeyPatch,
    requested: str,
    world: int,
    local_world: int,
    local: int,
    expected: str,
) -> None:
    _torchrun(monkeypatch, world, local_world, local)
    assert launched_world_size() == world
    assert rank_device(torch.device(requested)) == torch.device(expected)


def test_one_gpu_named_for_several_processes_of_a_machine_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _torchrun(monkeypatch, 2, 2, 1)
    with pytest.raises(ValueError, match="would put every process of this machine on one GPU"):
        rank_device(torch.device("cuda:0"))


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun(monkeypatch, 8, 8, 5)
    with pytest.raises(ValueError, match="LOCAL_RANK is 5 but the machine has 4 GPU"):
        rank_device(torch.device("cuda"))


def test_dist_timeout_is_the_process_groups_timeout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``spngd train --dist-timeout 7`` under torchrun (its environment) creates the group
    with a 7-second timeout; a rendezvous that fails is the one-line rank failure."""
    import datetime

    import torch.distributed as dist

    from spngd.train.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    created: dict[str, object] = {}

    def init_process_group(backend: str, **kwargs: object) -> None:
        created.update(backend=backend, **kwargs)
        raise RuntimeError("connection refused. More text.")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    status = main(["train", "--dist-timeout", "7", "--device", "cpu", "--no-progress"])
    assert created == {"backend": "gloo", "timeout": datetime.timedelta(seconds=7)}
    assert status == 3
    assert capsys.readouterr().err == (
        "spngd: error: setting up the process group with the other ranks failed; a rank has "
        "probably died or stalled past the process group's timeout (connection refused)\n"
    )


def test_a_collective_a_stalled_or_dead_peer_broke_is_a_rank_failure(tmp_path: Path) -> None:
    """gloo's words for a peer gone, in any case, wherever the survivor waits (inside a
    process group, where such errors come from)."""
    import torch.distributed as dist

    from spngd.distributed.launch import rank_failure

    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        for message in (
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset "
            "by peer",
            "Application timeout caused pair closure",
            "[pair.cc:598] Timed out waiting 10000ms for send operation to complete",
        ):
            assert rank_failure(RuntimeError(message)) == message
        assert rank_failure(RuntimeError("shape '[2, 3]' is invalid for input of size 5")) is None
    finally:
        dist.destroy_process_group()
