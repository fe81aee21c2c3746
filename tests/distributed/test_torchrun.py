"""``spngd train`` under torchrun: two gloo ranks, rank 0 writes the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import free_port


@pytest.mark.skipif(
    shutil.which("spngd") is None, reason="the spngd console script is not installed"
)
def test_spngd_train_runs_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "--no-python",
        shutil.which("spngd") or "spngd",
        "train",
        "--epochs",
        "0.5",
        "--batch-size",
        "32",
        "--threads",
        "1",
        "--no-progress",
        "--distributed-comm-dtype",
        "bfloat16",
        "--distributed-assignment",
        "equal_count",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 ranks" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["kind"] == "epoch" and last["val_accuracy"] > 0.5
    assert last["refresh_counts"]["stats_computed"] > 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "checkpoint.pt", "plot.png"}
    distributed = json.loads((out / "config.json").read_text())["distributed"]
    assert (distributed["comm_dtype"], distributed["assignment"]) == ("bfloat16", "equal_count")
