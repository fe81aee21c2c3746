"""``spngd train --resume``: an interrupted run continues exactly, from the
newest usable checkpoint, and a resume that cannot work is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from spngd.train.cli import main
from spngd.train.runfolder import CHECKPOINT, CONFIG, METRICS, PREVIOUS
from spngd.train.trainer import Trainer
from tests.distributed.harness import run_workers
from tests.train.conftest import SMALL, CliRun, assert_one_line_error, small_digits_runs

pytestmark = pytest.mark.usefixtures("small_digits")


def _records(out: Path, kind: str = "step") -> list[dict[str, Any]]:
    lines = (out / METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _tensors(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) state dict, in a fixed order."""
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from _tensors(state[key])
    elif isinstance(state, list | tuple):
        for item in state:
            yield from _tensors(item)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C right after ``step`` is logged (a pass's checkpoint may lie before it)."""
    fit_step = Trainer.fit_step

    def interrupted(self: Trainer, *args: Any) -> Any:
        result = fit_step(self, *args)
        if self.step == step:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Trainer, "fit_step", interrupted)


@pytest.mark.parametrize(
    "options",
    [
        # SP-NGD with everything that draws random numbers (MC Fisher, mixup, crops, flips)
        # and a refresh warm-up of one step, so that the steps compared skip statistics
        (
            *("--fisher", "mc", "--mixup-alpha", "0.4", "--crop", "pad", "--flip"),
            *("--refresh-warmup-steps", "1"),
        ),
        ("--optimizer", "sgd", "--warmup-epochs", "1"),
    ],
    ids=["spngd", "sgd"],
)
def test_interrupted_run_resumes_exactly(
    run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: tuple[str, ...]
) -> None:
    """4 steps (2 passes) in one go equal 3 steps, Ctrl-C, and ``--resume`` from step 2."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, stderr = run_cli("train", "--out", str(straight), "--epochs", "2", *SMALL, *options)
    assert code == 0, stderr
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        code, _, stderr = run_cli("train", "--out", str(resumed), "--epochs", "2", *SMALL, *options)
    assert (code, stderr) == (130, "spngd: interrupted\n")
    assert torch.load(resumed / CHECKPOINT)["step"] == 2
    assert [r["step"] for r in _records(resumed)] == [1, 2, 3]
    code, stdout, stderr = run_cli("train", "--resume", "--out", str(resumed))
    assert code == 0, stderr
    assert "4 steps" in stdout
    want, got = torch.load(straight / CHECKPOINT), torch.load(resumed / CHECKPOINT)
    for key in ("model", "optimizer", "ranks", "data_order"):
        for a, b in zip(_tensors(want[key]), _tensors(got[key]), strict=True):
            assert torch.equal(a, b), key
    assert (got["step"], got["passes"]) == (4, 2)
    # metrics.jsonl: the step logged after the checkpoint is dropped and redone, once
    steps = _records(resumed)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["loss"] for r in steps] == [r["loss"] for r in _records(straight)]
    assert [r["step"] for r in _records(resumed, "resume")] == [2]
    assert got["train_time"] >= steps[-1]["time"] > steps[1]["time"]  # time runs on
    if "--refresh-warmup-steps" in options:
        assert sum(r["refresh_counts"]["stats_skipped"] for r in _records(straight, "epoch")) > 0


def _straight_and_resumed(rank: int, world_size: int, out: str) -> None:
    """On each rank: 4 steps in one go, and 3 steps, Ctrl-C, ``--resume``."""
    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun sets; the group exists
    argv = ("--epochs", "2", "--refresh-warmup-steps", "1", *SMALL)  # steps 2-4 may skip
    with pytest.MonkeyPatch.context() as patch, small_digits_runs(patch):
        assert main(["train", "--out", f"{out}/straight", *argv]) == 0
        with pytest.MonkeyPatch.context() as interrupt:
            _interrupt_after(interrupt, 3)
            assert main(["train", "--out", f"{out}/resumed", *argv]) == 130
        assert main(["train", "--resume", "--out", f"{out}/resumed"]) == 0


def test_interrupted_run_resumes_exactly_on_two_ranks(tmp_path: Path) -> None:
    """The same under torchrun's setting: every rank's RNG state is saved and restored."""
    run_workers(_straight_and_resumed, 2, str(tmp_path))
    want = torch.load(tmp_path / "straight" / CHECKPOINT)
    got = torch.load(tmp_path / "resumed" / CHECKPOINT)
    assert len(got["ranks"]) == 2 and got["data_order"] is None  # a sampler per rank
    for key in ("model", "optimizer", "ranks"):
        for a, b in zip(_tensors(want[key]), _tensors(got[key]), strict=True):
            assert torch.equal(a, b), key
    assert [r["step"] for r in _records(tmp_path / "resumed")] == [1, 2, 3, 4]
    epochs = _records(tmp_path / "straight", "epoch")
    assert sum(r["refresh_counts"]["stats_skipped"] for r in epochs) > 0


@pytest.fixture(scope="module")
def two_pass_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished SP-NGD run of 2 passes (4 steps): checkpoint.pt at step 4, the previous
    one at step 2. Tests copy it."""
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as patch, small_digits_runs(patch):
        assert main(["train", "--out", str(out), "--epochs", "2", *SMALL]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    run_cli: CliRun, tmp_path: Path, two_pass_run: Path
) -> None:
    out = _copy(two_pass_run, tmp_path)
    newest = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(newest[: len(newest) // 2])  # torn, as by a bad disk
    code, stdout, stderr = run_cli(
        "train", "--resume", "--out", str(out), "--epochs", "3", "--lr-decay-end", "3"
    )
    assert code == 0, stderr
    assert stderr.splitlines() == [
        f"spngd: warning: checkpoint {out / CHECKPOINT} is unusable (PytorchStreamReader "
        "failed reading zip archive: failed finding central directory, kept as "
        "checkpoint.pt.bad); resuming from checkpoint.prev.pt at step 2"
    ]
    assert "6 steps" in stdout
    assert (out / "checkpoint.pt.bad").read_bytes() == newest[: len(newest) // 2]
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / CHECKPOINT)["step"] == 6
    assert torch.load(out / PREVIOUS)["step"] == 4
    assert json.loads((out / "config.json").read_text())["epochs"] == 3.0


def test_options_given_on_resume_override_the_saved_ones(
    run_cli: CliRun, tmp_path: Path, two_pass_run: Path
) -> None:
    out = _copy(two_pass_run, tmp_path)
    options = ("--epochs", "3", "--lr-decay-end", "3", "--lr", "0.01", "--weight-decay", "1e-4")
    code, stdout, stderr = run_cli("train", "--resume", "--out", str(out), *options)
    assert code == 0, stderr
    assert "6 steps" in stdout
    # the schedule goes on from step 4 (epoch 2) with the new rate and decay end
    assert _records(out)[-2]["lr"] == pytest.approx(0.01 * (1 - 2 / 3) ** 2)
    config = json.loads((out / "config.json").read_text())
    assert (config["epochs"], config["lr_decay_end"], config["lr"]) == (3.0, 3.0, 0.01)
    groups = torch.load(out / CHECKPOINT)["optimizer"]["param_groups"]
    assert {group["weight_decay"] for group in groups} == {1e-4}


def test_resume_without_a_checkpoint_is_a_one_line_error(run_cli: CliRun, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("train", "--resume"), "--resume needs --out")
    missing = tmp_path / "nowhere"
    assert_one_line_error(
        run_cli("train", "--resume", "--out", str(missing)), f"run folder {missing} does not exist"
    )
    assert_one_line_error(
        run_cli("train", "--resume", "--out", str(tmp_path)), f"{tmp_path} holds no checkpoint"
    )  # nor a saved run to start again
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    torch.save({"model": {}}, tmp_path / PREVIOUS)
    assert_one_line_error(
        run_cli("train", "--resume", "--out", str(tmp_path)),
        f"no usable checkpoint in {tmp_path} (checkpoint.pt: ",
        "checkpoint.prev.pt: no valid 'optimizer' entry)",
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--model", "resnet32"), "--model resnet32 differs from the saved run's 'resnet20'"),
        (("--optimizer", "sgd"), "--optimizer sgd differs from the saved run's 'spngd'"),
        (("--data", "synthetic"), "--data synthetic differs from the saved run's 'digits'"),
        (("--batch-size", "64"), "--batch-size 64 differs from the saved run's 32"),
    ],
)
def test_resume_with_a_conflicting_option_is_a_one_line_error(
    run_cli: CliRun, tmp_path: Path, two_pass_run: Path, argv: tuple[str, ...], needle: str
) -> None:
    out = _copy(two_pass_run, tmp_path)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert_one_line_error(run_cli("train", "--resume", "--out", str(out), *argv), needle)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


@pytest.mark.usefixtures("small_digits")
def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed_or_rerun(
    run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C at step 1 (the first checkpoint comes at step 2): ``--resume`` starts the run
    again from its first step with its saved options (and new ones, as the NaN stop
    advises: a lower learning rate), and a plain rerun into the folder starts afresh."""
    out = tmp_path / "run"
    argv = ("train", "--out", str(out), "--epochs", "2", *SMALL)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        assert run_cli(*argv, "--lr", "0.05")[0] == 130
    assert not (out / CHECKPOINT).exists() and [r["step"] for r in _records(out)] == [1]
    code, stdout, stderr = run_cli("train", "--resume", "--out", str(out), "--lr", "0.01")
    assert code == 0, stderr
    assert "holds no checkpoint (the run stopped before its first one): it starts again" in stderr
    assert len(stderr.strip().splitlines()) == 1  # one warning, not one more from the folder
    assert "4 steps" in stdout and [r["step"] for r in _records(out)] == [1, 2, 3, 4]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["lr"], saved["epochs"]) == (0.01, 2)
    rerun = tmp_path / "rerun"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        assert run_cli("train", "--out", str(rerun), "--epochs", "2", *SMALL)[0] == 130
    code, stdout, stderr = run_cli("train", "--out", str(rerun), "--epochs", "1", *SMALL)
    assert code == 0, stderr
    assert "stopped before its first checkpoint; it is started again" in stderr
    assert [r["step"] for r in _records(rerun)] == [1, 2]


def test_resuming_a_finished_run_says_so_and_changes_nothing(
    run_cli: CliRun, tmp_path: Path, two_pass_run: Path
) -> None:
    out = _copy(two_pass_run, tmp_path)
    before = {name: (out / name).read_bytes() for name in (METRICS, "config.json", "plot.png")}
    for _ in range(2):
        code, _, stderr = run_cli("train", "--resume", "--out", str(out), "--lr", "0.5")
        assert code == 0, stderr
        assert "is already complete (4 of 4 steps); nothing to train" in stderr
    assert {name: (out / name).read_bytes() for name in before} == before


def test_resuming_past_the_saved_decay_end_warns_that_the_rate_stays_zero(
    run_cli: CliRun, tmp_path: Path, two_pass_run: Path
) -> None:
    out = _copy(two_pass_run, tmp_path)
    code, _, stderr = run_cli("train", "--resume", "--out", str(out), "--epochs", "3")
    assert code == 0, stderr
    assert (
        "spngd: warning: --epochs 3 goes past the saved --lr-decay-end 2: the learning rate "
        "stays 0 after epoch 2 (give --lr-decay-end to move it)"
    ) in stderr.splitlines()
    # resumed again with the same --epochs, the complete run is said to be complete, alone
    code, _, stderr = run_cli("train", "--resume", "--out", str(out), "--epochs", "3")
    assert code == 0, stderr
    assert [line.split(" is ")[-1][:16] for line in stderr.splitlines()] == ["already complete"]


def test_lines_of_metrics_that_are_not_records_are_kept_on_resume(
    run_cli: CliRun, tmp_path: Path, two_pass_run: Path
) -> None:
    """A blank line and hand-written notes in the middle and at the end of metrics.jsonl:
    every record up to the checkpoint survives the resume, the notes stay (a last line is
    taken for one a crash tore only without its newline), one warning says so."""
    out = _copy(two_pass_run, tmp_path)
    lines = (out / METRICS).read_text().splitlines()
    lines[2:2] = ["", "my note: lr looked too high here"]
    lines.append("my last note")
    (out / METRICS).write_text("\n".join(lines) + "\n")
    code, _, stderr = run_cli(
        "train", "--resume", "--out", str(out), "--epochs", "3", "--lr-decay-end", "3"
    )
    assert code == 0, stderr
    assert f"line(s) 4, {len(lines)} are not records; kept as they are" in stderr
    lines = (out / METRICS).read_text().splitlines()
    assert "my note: lr looked too high here" in lines and "my last note" in lines
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_of_another_run_is_refused(
    run_cli: CliRun, tmp_path: Path, two_pass_run: Path
) -> None:
    """config.json records another seed than the checkpoint (as when a checkpoint is copied
    in from another run): resuming would train that run here, under this run's records."""
    out = _copy(two_pass_run, tmp_path)
    config = json.loads((out / CONFIG).read_text())
    (out / CONFIG).write_text(json.dumps({**config, "seed": config["seed"] + 1}))
    before = (out / METRICS).read_bytes()
    assert_one_line_error(
        run_cli("train", "--resume", "--out", str(out), "--epochs", "3"),
        f"--resume: {out / CHECKPOINT} belongs to another run: its --seed is "
        f"{config['seed']}, {out / CONFIG}'s {config['seed'] + 1}",
    )
    assert (out / METRICS).read_bytes() == before


@pytest.mark.parametrize("damage", ["not json", "[1, 2]", '{"lr": -0.02}'])
def test_config_json_is_a_record_rewritten_from_the_checkpoint(
    run_cli: CliRun, tmp_path: Path, two_pass_run: Path, damage: str
) -> None:
    """A resume takes the checkpoint's options and the flags given now, whatever config.json
    holds (edits there do not count: give flags); an unreadable one gets a warning."""
    out = _copy(two_pass_run, tmp_path)
    saved = json.loads((out / CONFIG).read_text())
    (out / CONFIG).write_text(damage)
    code, _, stderr = run_cli("train", "--resume", "--out", str(out), "--epochs", "3")
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if "written again" in line]
    assert len(warnings) == (0 if damage.startswith("{") else 1), stderr
    assert json.loads((out / CONFIG).read_text())["lr"] == saved["lr"]
