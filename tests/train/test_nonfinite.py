"""NaN and inf in ``spngd train``, injected: steps are skipped and counted,
too many in a row stop the run with one line, and the last good checkpoint survives."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from spngd.train import step as step_module
from spngd.train.augment import soft_targets
from spngd.train.config import resolve_config
from spngd.train.models import build_model
from spngd.train.optimizers import make_optimizer
from spngd.train.runfolder import CHECKPOINT, METRICS, PREVIOUS
from spngd.train.step import Batch, train_step
from spngd.train.trainer import Trainer
from tests.train.conftest import SMALL, CliRun, assert_one_line_error

pytestmark = pytest.mark.usefixtures("small_digits")


def _poison(monkeypatch: pytest.MonkeyPatch, steps: range, what: str) -> None:
    """During ``steps`` (0-based) the targets (so the loss) or the images are NaN."""
    prepare = Trainer.prepare

    def poisoned(self: Trainer, images: torch.Tensor, labels: torch.Tensor, epoch: float) -> Batch:
        images, targets = prepare(self, images, labels, epoch)
        if self.step not in steps:
            return images, targets
        return (images, targets * math.nan) if what == "loss" else (images * math.nan, targets)

    monkeypatch.setattr(Trainer, "prepare", poisoned)


@pytest.mark.parametrize(("optimizer", "advice"), [("spngd", "raise the damping"), ("sgd", "")])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    run_cli: CliRun,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    optimizer: str,
    advice: str,
) -> None:
    """Steps 1-2 fine (checkpoint), 3 skipped, 4 the second bad one in a row: stop; then
    ``--resume`` with a lower rate finishes the run."""
    out = tmp_path / "run"
    argv = ("--out", str(out), "--optimizer", optimizer, "--epochs", "2", *SMALL)
    with monkeypatch.context() as patch:
        _poison(patch, range(2, 99), "loss")
        result = run_cli("train", *argv, "--max-bad-steps", "2")
    name = optimizer.upper()
    line = assert_one_line_error(
        result,
        f"{name}: 2 steps in a row had NaN or inf gradients (max_bad_steps=2); stopping.",
        advice,
        f"The last good checkpoint (step 2) is kept in {out}.",
        code=3,
    )
    assert result[2].splitlines() == [
        f"spngd: warning: {name}: NaN or inf gradient; step skipped (1 in a row, 1 in all)",
        line,
    ]
    checkpoint = torch.load(out / CHECKPOINT)
    assert checkpoint["step"] == 2 and not (out / PREVIOUS).exists()
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    code, stdout, stderr = run_cli("train", "--resume", "--out", str(out), "--lr", "0.01")
    assert code == 0, stderr
    assert "4 steps" in stdout


def test_skipped_steps_are_counted_and_the_run_goes_on(run_cli: CliRun, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        _poison(patch, range(2, 3), "loss")
        code, _, stderr = run_cli("train", "--out", str(out), "--epochs", "2", *SMALL)
    assert code == 0, stderr
    assert (
        stderr
        == "spngd: warning: SPNGD: NaN or inf gradient; step skipped (1 in a row, 1 in all)\n"
    )
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert math.isnan(records[3]["loss"]) and math.isfinite(records[-2]["loss"])


def test_a_nan_batch_leaves_parameters_and_batchnorm_statistics_untouched(
    run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN images at step 3: the forward pass updates BatchNorm's running statistics
    before the optimizer sees NaN gradients; the skipped step puts them back, so the run
    goes on and every checkpoint is finite."""
    out = tmp_path / "run"
    _poison(monkeypatch, range(2, 3), "images")
    code, stdout, stderr = run_cli("train", "--out", str(out), "--epochs", "2", *SMALL)
    assert code == 0, stderr
    assert stderr.endswith("step skipped (1 in a row, 1 in all)\n") and "4 steps" in stdout
    checkpoint = torch.load(out / CHECKPOINT)
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_train_step_restores_the_buffers_of_a_skipped_step() -> None:
    torch.manual_seed(0)
    for name in ("spngd", "sgd"):
        model = build_model("resnet20", num_classes=10)
        opt = make_optimizer(model, resolve_config({"optimizer": name, "device": "cpu"}))
        images, targets = torch.randn(8, 3, 8, 8), soft_targets(torch.arange(8), 10)
        train_step(model, opt, [(images, targets)], rescale=True)
        before = copy.deepcopy(model.state_dict())
        with pytest.warns(RuntimeWarning, match="NaN or inf gradient; step skipped"):
            train_step(model, opt, [(images * math.nan, targets)], rescale=True)
        assert opt.skipped_steps == 1
        after = model.state_dict()
        assert all(torch.equal(after[key], value) for key, value in before.items())


def test_a_model_holding_nan_is_not_checkpointed(
    run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a model end a pass holding NaN anyway (here a running mean poisoned after
    step 3), the pass's checkpoint is not written: the run stops and keeps step 2's."""
    out = tmp_path / "run"
    rescale = step_module.rescale_weights
    calls = []

    def poisoning_rescale(model: torch.nn.Module) -> None:
        rescale(model)
        calls.append(1)
        if len(calls) == 3:
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_mean.fill_(math.nan)

    monkeypatch.setattr(step_module, "rescale_weights", poisoning_rescale)
    assert_one_line_error(
        # running statistics: recomputing them for validation would overwrite the poison
        run_cli("train", "--out", str(out), "--epochs", "2", "--eval-batchnorm", "running", *SMALL),
        "the model holds NaN or inf after step 4",
        f"stopping without a checkpoint of it. The last good checkpoint (step 2) is kept in {out}.",
        code=3,
    )
    assert torch.load(out / CHECKPOINT)["step"] == 2 and not (out / PREVIOUS).exists()
