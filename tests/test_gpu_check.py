"""``benchmarks/gpu_check.py`` keeps working: its CPU-applicable checks, run for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    parity = next(line for line in lines if line.startswith("parity"))
    update_error = float(parity.rsplit("update ", 1)[1])
    assert update_error < 1e-3  # float32 against float64 on one step
    assert "continuation identical True" in done.stdout
    assert done.stdout.count("ranks bit-identical True") == 2
