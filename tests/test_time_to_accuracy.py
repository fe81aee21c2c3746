"""``benchmarks/time_to_accuracy.py``: ``spngd compare`` over seeds, read back and summarised."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "time_to_accuracy.py"


def test_two_seeds_of_compare_are_tabled_from_their_records(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seeds", "0", "1", "--target", "0", "--out",
         str(tmp_path), "--", "--epochs", "0.05", "--batch-size", "32", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for seed in (0, 1):
        row = next(line for line in lines if line.split()[:1] == [str(seed)])
        assert row.count(" 1 steps ") == 2  # a target of 0 is reached at the first validation
        for name in ("sgd", "spngd"):
            metrics = tmp_path / f"seed{seed}" / name / "metrics.jsonl"
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            final = [r["val_accuracy"] for r in records if r["kind"] == "step"][-1]
            assert f"{100 * final:5.1f}%" in row
    assert any(line.startswith("SP-NGD faster on ") and "of 2 seeds" in line for line in lines)
    assert any(
        line.startswith("mean steps where both reached the target (2 seeds)") for line in lines
    )
    assert any(line.startswith("final accuracy, mean: SGD ") for line in lines)
