"""``spngd compare``: both optimizers on the same data and settings, one plot."""

from __future__ import annotations

import json
from pathlib import Path

from spngd.train.cli import PER_OPTIMIZER
from spngd.train.config import COMPARE_DEFAULTS, DEFAULTS, OPTIMIZER_DEFAULTS, SPNGD_DEFAULTS
from tests.train.conftest import TINY, CliRun


def test_compare_trains_both_optimizers_into_one_plot(run_cli: CliRun, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    code, stdout, stderr = run_cli(
        "compare", "--out", str(out), *TINY, "--batch-size", "32", "--sgd-lr", "0.3",
        "--spngd-warmup-epochs", "0.02",
    )  # fmt: skip
    assert code == 0, stderr
    assert "sgd: 2 steps" in stdout and "spngd: 2 steps" in stdout
    assert (out / "compare.png").stat().st_size > 10_000
    sgd = json.loads((out / "sgd" / "config.json").read_text())
    spngd = json.loads((out / "spngd" / "config.json").read_text())
    own_defaults = OPTIMIZER_DEFAULTS
    assert (sgd["lr"], sgd["warmup_epochs"]) == (0.3, own_defaults["sgd"]["warmup_epochs"])
    assert (spngd["lr"], spngd["warmup_epochs"]) == (own_defaults["spngd"]["lr"], 0.02)
    assert spngd["weight_decay"] == own_defaults["spngd"]["weight_decay"]
    assert (spngd["batch_size"], spngd["epochs"]) == (32, 0.05)  # given
    # compare's own default: validated after every step; the damping is training's default
    assert spngd["eval_every_steps"] == COMPARE_DEFAULTS["eval_every_steps"]
    assert spngd["damping"] == DEFAULTS["damping"] != SPNGD_DEFAULTS["damping"]
    own = {"optimizer", "out", *PER_OPTIMIZER}
    assert {k: v for k, v in sgd.items() if k not in own} == {
        k: v for k, v in spngd.items() if k not in own
    }
