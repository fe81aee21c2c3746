"""``spngd`` through its entry point: the run folder, ``compare``, and one-line user errors."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch
from PIL import Image

from spngd.optimizer import SPNGD
from spngd.refresh import AdaptiveRefresh
from spngd.timing import STAGES
from spngd.train.cli import build_parser
from spngd.train.config import DEFAULTS, OPTIMIZER_DEFAULTS, flag, resolve_config
from spngd.train.data import load_data
from spngd.train.errors import Terminated, UserError
from spngd.train.models import build_model
from spngd.train.runfolder import CHECKPOINT, RunFolder
from tests.train.conftest import (
    QUIET,
    SMALL,
    TINY,
    CliRun,
    assert_one_line_error,
    write_image_folder,
)


def test_train_writes_the_run_folder(run_cli: CliRun, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("train", "--out", str(out), *TINY, "--eval-every-steps", "1")
    assert code == 0, stderr
    assert "2 steps in" in stdout and str(out) in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "plot.png",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "resnet20" and config["optimizer"] == "spngd"
    assert (
        config["batch_size"] == 32 and config["lr_decay_end"] == 0.05 and config["out"] == str(out)
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2] and len(epochs) == 1
    for record in steps:
        assert {
            "step",
            "epoch",
            "time",
            "wall_time",
            "loss",
            "accuracy",
            "lr",
            "val_accuracy",
        } <= set(record)
        assert record["epoch"] == pytest.approx(record["step"] * 32 / 1497)
        assert 0.0 <= record["val_accuracy"] <= 1.0 and record["loss"] > 0
    assert steps[0]["lr"] == pytest.approx(config["lr"])  # no warm-up, decay from step 0
    assert epochs[0]["val_accuracy"] == steps[-1]["val_accuracy"]
    assert {"train_loss", "train_accuracy", "val_loss"} <= set(epochs[0])
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2 and checkpoint["config"] == config
    model = build_model("resnet20", 10, in_channels=1)
    model.load_state_dict(checkpoint["model"])
    assert "curvature" in checkpoint["optimizer"]
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("small_digits")
def test_epoch_records_hold_the_pass_s_seconds_per_stage(
    run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SP-NGD epoch record holds each stage's seconds in that pass (>= 0, in step
    order, together less than the pass's training time; the forward and backward passes,
    which hold the statistics stages, plus the other stages too), also after a resume whose
    optimizer arrives with time on its counters; SGD records time the forward and backward
    passes only. The refresh rule options land in config.json."""
    out = tmp_path / "spngd"
    options = ("--refresh-rule", "threshold", "--refresh-noise-margin", "2")
    code, _, stderr = run_cli("train", "--out", str(out), "--epochs", "2", *SMALL, *options)
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["refresh"]["rule"], config["refresh"]["noise_margin"]) == ("threshold", 2.0)
    stage_seconds = SPNGD.stage_seconds

    def restored_with_time(self: SPNGD) -> dict[str, float]:
        """As if the checkpoint had brought 1000 s of earlier inversions."""
        seconds = stage_seconds(self)
        return {**seconds, "inversion": seconds.get("inversion", 0.0) + 1000.0}

    monkeypatch.setattr(SPNGD, "stage_seconds", restored_with_time)
    code, _, stderr = run_cli("train", "--resume", "--out", str(out), "--epochs", "3")
    assert code == 0, stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 3
    for previous, record in zip([{"time": 0.0}, *epochs], epochs, strict=False):
        pass_time = record["time"] - previous["time"]
        stages = record["stage_seconds"]
        assert list(stages) == list(STAGES)  # all ran: every step refreshes in warm-up
        assert all(seconds >= 0.0 for seconds in stages.values())
        assert sum(stages.values()) < pass_time
        in_backward = sum(stages[f"statistics {name}"] for name in "AGF")
        assert in_backward <= record["forward_backward_seconds"]
        step = sum(stages.values()) - in_backward
        assert record["forward_backward_seconds"] + step < pass_time
    sgd = tmp_path / "sgd"
    code, _, stderr = run_cli("train", "--out", str(sgd), "--optimizer", "sgd", *SMALL)
    assert code == 0, stderr
    lines = (sgd / "metrics.jsonl").read_text().splitlines()
    for record in (r for r in map(json.loads, lines) if r["kind"] == "epoch"):
        assert "stage_seconds" not in record
        assert 0.0 < record["forward_backward_seconds"] < record["time"]


def test_an_optional_setting_takes_none_and_a_bad_value_is_one_line() -> None:
    parser = build_parser()
    given = ["train", "--statistics-examples", "none", "--stat-interval", "5", "--recipe", "None"]
    options = vars(parser.parse_args([*given, "--a-examples", "none"]))
    assert options["statistics_examples"] is None and options["recipe"] is None
    assert options["a_examples"] is None
    assert options["stat_interval"] == 5
    with pytest.raises(UserError, match="invalid int or 'none' value: 'all'"):
        parser.parse_args(["train", "--statistics-examples", "all"])


def test_missing_data_folder(run_cli: CliRun, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert_one_line_error(
        run_cli("train", "--data", str(missing)), f"data folder {missing} does not exist"
    )


def test_empty_data_folder(run_cli: CliRun, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("train", "--data", str(tmp_path)), "has no train/ folder")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    assert_one_line_error(
        run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "r")),
        f"class folder {tmp_path / 'train' / 'cat'} holds no images (.jpg, .jpeg, .png,",
    )


def test_data_path_that_is_a_file_or_a_tree_without_val(run_cli: CliRun, tmp_path: Path) -> None:
    file = tmp_path / "images.zip"
    file.write_bytes(b"")
    assert_one_line_error(
        run_cli("train", "--data", str(file)),
        f"--data {file} is not a folder (nor 'digits', 'mnist1d[:SIZE]' or 'synthetic')",
    )
    root = write_image_folder(tmp_path / "images", classes=2, per_class=1)
    (root / "val" / "c9").mkdir()
    assert_one_line_error(
        run_cli("train", "--data", str(root), "--out", str(tmp_path / "r1")),
        f"{root / 'val'} has classes not in train/: c9",
    )
    shutil.rmtree(root / "val")
    assert_one_line_error(
        run_cli("train", "--data", str(root), "--out", str(tmp_path / "r2")),
        f"data folder {root} has no val/ folder",
    )


def test_a_truncated_jpeg_stops_training_naming_the_file(run_cli: CliRun, tmp_path: Path) -> None:
    """The first half of a real JPEG, named as ImageNet names its files: Pillow reads its
    header and fails on the pixels, which must still be one line naming the file."""
    root = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    buffer = io.BytesIO()
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    bad = root / "train" / "c1" / "n02.JPEG"
    bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    argv = ("--batch-size", "9", "--image-size", "8", "--workers", "0", *QUIET)
    result = run_cli("train", "--data", str(root), "--out", str(tmp_path / "run"), *argv)
    assert_one_line_error(result, f"cannot decode image {bad}", "remove or replace it")


def test_a_corrupt_validation_image_is_found_before_training(
    run_cli: CliRun, tmp_path: Path
) -> None:
    root = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    bad = root / "val" / "c0" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "run"
    argv = ("--batch-size", "4", "--image-size", "8", "--workers", "1", *QUIET)
    result = run_cli("train", "--data", str(root), "--out", str(out), *argv, "--epochs", "1")
    assert_one_line_error(result, f"cannot decode image {bad}", "remove or replace it")
    assert not (out / "metrics.jsonl").exists() or "step" not in (out / "metrics.jsonl").read_text()
    # (a pass is two steps: found after the first pass, step 1 would have been logged)


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # and its checksum
    return bytes(data)


def test_image_folders_as_people_have_them(run_cli: CliRun, tmp_path: Path) -> None:
    """JPEGs named ``.JPEG`` (ImageNet's), grayscale, palette and RGBA images, and images in
    a class folder's subfolders all count; an empty class folder and a decompression bomb
    are one-line errors."""
    root = write_image_folder(tmp_path / "images", classes=2, per_class=2)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (12, 15, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "train" / "c0" / "n01.JPEG", format="JPEG")
    Image.fromarray(pixels[:, :, 0]).save(root / "train" / "c1" / "gray.png")
    Image.fromarray(pixels).convert("P").save(root / "val" / "c0" / "palette.png")
    Image.fromarray(pixels).convert("RGBA").save(root / "val" / "c1" / "alpha.png")
    (root / "train" / "c1" / "more").mkdir()
    Image.fromarray(pixels).save(root / "train" / "c1" / "more" / "nested.jpg")
    (root / "train" / "c1" / "more" / "loop").symlink_to(root / "train" / "c1")  # ends
    config = resolve_config({"data": str(root), "device": "cpu", "image_size": 8})
    data = load_data(config)
    assert (len(data.train), len(data.val)) == (7, 6)
    assert [data.train[i][0].shape for i in range(7)] == [(3, 8, 8)] * 7
    assert [data.val[i][0].shape for i in range(6)] == [(3, 8, 8)] * 6
    (root / "train" / "c2").mkdir()
    assert_one_line_error(
        run_cli("train", "--data", str(root), "--out", str(tmp_path / "r1"), *TINY),
        f"class folder {root / 'train' / 'c2'} holds no images (.jpg, .jpeg, .png,",
    )
    (root / "train" / "c2").rmdir()
    bomb = root / "val" / "c0" / "bomb.png"
    bomb.write_bytes(_png_claiming(20000, 20000))  # 400 megapixels: past Pillow's bomb limit
    out = tmp_path / "r2"
    argv = ("--batch-size", "4", "--image-size", "8", "--workers", "0", *QUIET)
    assert_one_line_error(
        run_cli("train", "--data", str(root), "--out", str(out), *argv),
        f"cannot decode image {bomb}",
        "decompression bomb",
    )


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_stops_training_naming_the_file(
    run_cli: CliRun, tmp_path: Path, workers: str
) -> None:
    root = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    bad = root / "train" / "c1" / "2.png"
    bad.write_bytes(b"not a png at all")
    result = run_cli(
        "train",
        "--data",
        str(root),
        "--out",
        str(tmp_path / "run"),
        "--batch-size",
        "8",
        "--image-size",
        "8",
        "--workers",
        workers,
        *QUIET,
        "--epochs",
        "1",
    )
    assert_one_line_error(result, f"cannot decode image {bad}", "remove or replace it")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--model", "resnet99"), "--model must be one of resnet18, resnet34"),
        (("--recipe", "imagenet-3k"), "unknown recipe 'imagenet-3k'; valid: imagenet-4k"),
        (("--batch-size", "0"), "--batch-size must be a positive integer, got 0"),
        (("--batch-size", "-8"), "--batch-size must be a positive integer, got -8"),
        (("--batch-size", "eight"), "argument --batch-size: invalid int value: 'eight'"),
        (("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
        (("--refresh-shrink", "drop"), "--refresh-shrink must be halve or reset, got 'drop'"),
        (("--refresh-rule", "fast"), "--refresh-rule must be noise or threshold, got 'fast'"),
        (("--refresh-noise-margin", "-1"), "--refresh-noise-margin must be >= 0, got -1.0"),
        (
            ("--refresh-noise-margin", "wide"),
            "argument --refresh-noise-margin: invalid float value: 'wide'",
        ),
    ],
)
def test_bad_options(run_cli: CliRun, tmp_path: Path, argv: tuple[str, ...], needle: str) -> None:
    assert_one_line_error(run_cli("train", "--out", str(tmp_path / "r"), *argv), needle)
    assert not (tmp_path / "r").exists()


def test_output_folder_not_writable(run_cli: CliRun, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(
        run_cli("train", "--out", str(blocker / "run"), *TINY),
        f"output folder {blocker / 'run'} is not writable",
    )
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(run_cli("train", "--out", str(locked), *TINY), "is not writable")


def _file_size_limit(limit: int) -> Callable[[], None]:
    """For ``subprocess.run(preexec_fn=...)``: files the child writes stop growing at
    ``limit`` bytes, and a write past it fails with EFBIG (the signal ignored)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_the_file_system_refuses_stops_the_run_and_keeps_the_last_one(
    tmp_path: Path,
) -> None:
    """A real write limit (``RLIMIT_FSIZE``, what a full disk does to a growing file):
    ``torch.save`` fails half-way with a RuntimeError over the OSError. One line, status 2,
    the previous checkpoint intact, no temporary file left."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "spngd.train.cli", "train", "--out", str(out), *SMALL]
    first = subprocess.run([*command, "--epochs", "0.05"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    size = (out / CHECKPOINT).stat().st_size
    resumed = subprocess.run(
        [*command[:4], "--resume", "--out", str(out), "--epochs", "0.1"],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(size // 2),
    )
    assert_one_line_error(
        (resumed.returncode, resumed.stdout, resumed.stderr),
        f"cannot write checkpoint {out / CHECKPOINT} (File too large); the last checkpoint is kept",
    )
    assert torch.load(out / CHECKPOINT)["step"] == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_output_folder_holding_a_checkpoint_is_refused(run_cli: CliRun, tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / CHECKPOINT).write_bytes(b"")
    assert_one_line_error(run_cli("train", "--out", str(tmp_path), *TINY), "already holds a run")


def test_a_run_refused_before_its_first_record_leaves_nothing_behind(
    run_cli: CliRun, tmp_path: Path
) -> None:
    """Refused for its batch size after the run folder was opened, a run removes the empty
    metrics.jsonl and the folders it made, so a rerun is not told of a stopped run; a folder
    that was there stays, with its files."""
    out = tmp_path / "new" / "run"
    refused = run_cli("train", "--out", str(out), *TINY, "--batch-size", "4096")
    assert_one_line_error(refused, "fewer than one batch of 4096")
    assert not (tmp_path / "new").exists()
    status, _, stderr = run_cli("train", "--out", str(out), *TINY)
    assert (status, stderr) == (0, "")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    assert_one_line_error(run_cli("train", "--out", str(mine), *TINY, "--batch-size", "4096"))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_batch_too_small_for_batchnorm_is_one_line_and_leaves_nothing(
    run_cli: CliRun, tmp_path: Path, command: str
) -> None:
    """ResNet-18 brings 8x8 digits down to 1x1 maps: one image per step leaves its last
    BatchNorm layers one value per channel, which torch refuses in training (compare warms
    its runs up first, with a forward pass that meets it sooner)."""
    out = tmp_path / "run"
    result = run_cli(command, "--model", "resnet18", "--out", str(out), *TINY, "--batch-size", "1")
    assert_one_line_error(
        result,
        "a BatchNorm layer of resnet18 gets one value per channel (an input of shape (1, 128, 1,",
        "a micro-batch of 1 at --image-size 8 is too small for it; raise --batch-size",
    )
    assert not out.exists()


def test_console_script_exit_status_and_stderr(tmp_path: Path) -> None:
    """The installed entry point: one stderr line and status 2 from a real process."""
    result = subprocess.run(
        [sys.executable, "-m", "spngd.train.cli", "train", "--batch-size", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == "spngd: error: --batch-size must be a positive integer, got 0\n"


def as_started_from_a_terminal() -> None:
    """Give a child the stop signals' default actions, as a shell does for a command run in
    the foreground: a shell script's background job (a test run ``&``) starts ignoring
    SIGINT, and what it starts inherits that, which a run keeps."""
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def test_a_run_under_nohup_outlives_its_terminal(tmp_path: Path) -> None:
    """Started with SIGHUP ignored (``nohup spngd train``), the run keeps ignoring it: the
    terminal closing does not stop it."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [*CLI, "train", "--out", str(out), "--epochs", "1", *SMALL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGHUP)
    stdout, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr) == (0, "")
    assert " steps in " in stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_stops_the_run_with_one_line_and_status_143(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A scheduler's (or torchrun's) SIGTERM, or the SIGHUP of a closed terminal: like
    Ctrl-C, one line, the checkpoint kept, the status a shell gives a death by the signal."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spngd.train.cli",
            "train",
            "--out",
            str(out),
            "--epochs",
            "3",
            *SMALL,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_started_from_a_terminal,
    )
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert stderr == f"spngd: terminated ({signum.name})\n"
    assert torch.load(out / CHECKPOINT)["step"] > 0


CLI = (sys.executable, "-m", "spngd.train.cli")


def test_ctrl_c_pressed_repeatedly_stops_the_run_once_with_one_line(tmp_path: Path) -> None:
    """Five SIGINTs 20 ms apart, with DataLoader workers running: the first stops the run,
    the others must not cut the stop short (a traceback from the loaders' clean-up, or a
    death by the signal instead of status 130). Three runs, as the race is a matter of
    timing: the first lands during the imports of the run's start (where a KeyboardInterrupt
    inside a dataclass's making once turned the status into a death by SIGINT) or in a step."""
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        process = subprocess.Popen(
            [*CLI, "train", "--out", str(out), "--epochs", "3", "--workers", "2", *SMALL],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=as_started_from_a_terminal,
        )
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0 + 0.3 * attempt)
        for _ in range(5):
            process.send_signal(signal.SIGINT)
            time.sleep(0.02)
        _, stderr = process.communicate(timeout=60)
        assert (process.returncode, stderr) == (130, "spngd: interrupted\n"), attempt


def _start_tiny_run(out: Path) -> tuple[subprocess.Popen[str], IO[str], IO[str]]:
    """``spngd train`` of two steps into ``out`` as a process; its stdout and stderr pipes."""
    process = subprocess.Popen(
        [*CLI, "train", "--out", str(out), *TINY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    return process, process.stdout, process.stderr


def test_a_stdout_that_is_gone_or_full_is_no_traceback(tmp_path: Path) -> None:
    """``spngd train | head -0`` (the reader gone): status 0, nothing on stderr; ``>
    /dev/full``: one line saying the run is complete, status 2. The run folder is whole."""
    reader_gone, stdout, stderr = _start_tiny_run(tmp_path / "a")
    stdout.close()
    assert (reader_gone.wait(timeout=120), stderr.read()) == (0, "")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*CLI, "train", "--out", str(tmp_path / "b"), *TINY],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert (done.returncode, done.stderr) == (
        2,
        "spngd: error: cannot write to stdout (No space left on device); the run is complete\n",
    )
    assert all((tmp_path / run / CHECKPOINT).is_file() for run in ("a", "b"))


def test_a_stop_signal_after_the_run_is_over_leaves_its_status(tmp_path: Path) -> None:
    """A scheduler's SIGTERM, sent every 5 ms from the moment the run prints its last line
    until the process is gone, lands while the interpreter exits: status 0 all the same."""
    process, stdout, stderr = _start_tiny_run(tmp_path / "run")
    assert " steps in " in stdout.readline()
    while process.poll() is None:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    assert (process.returncode, stderr.read()) == (0, "")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_stop_signal_as_the_summary_is_printed_leaves_the_status(
    command: str, run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM between the summary's print and the command's return (where the test
    above, reading stdout, first signals; there it lands by chance): status 0, nothing on
    stderr. Sent by the process itself, so that it lands there every time."""
    import spngd.train.cli as cli

    report = cli._report

    def report_then_stop(*lines: str) -> None:
        report(*lines)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, "_report", report_then_stop)
    previous = signal.getsignal(signal.SIGTERM)
    status, stdout, stderr = run_cli(command, "--out", str(tmp_path / "run"), *TINY)
    assert (status, stderr) == (0, "")
    assert " steps in " in stdout
    assert signal.getsignal(signal.SIGTERM) == previous  # put back


def test_a_stop_a_library_swallows_stops_the_run_at_the_next_step(
    run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a library runs code under a bare ``except:`` (or in a finalizer) loses
    its KeyboardInterrupt there; later Ctrl-Cs are ignored as part of the stop, so the run
    must not go on: it stops before its first step."""
    import spngd.train.trainer as trainer

    def load_data_swallowing_a_ctrl_c(config: object) -> object:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises here
        except BaseException:  # the library's bare except
            pass
        return load_data(config)

    monkeypatch.setattr(trainer, "load_data", load_data_swallowing_a_ctrl_c)
    pytests = signal.signal(signal.SIGINT, signal.default_int_handler)  # SIG_IGN in a `&` job
    try:
        status, _, stderr = run_cli("train", "--out", str(tmp_path / "run"), *TINY)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, pytests)
    assert (status, stderr) == (130, "spngd: interrupted\n")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _save_interrupted_by_sigterm(options: object) -> None:
    """What torch.save does when SIGTERM lands mid-write: its file's clean-up raises its
    own error over the stop."""
    try:
        raise Terminated
    except Terminated:
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None


def _worker_ended_by_sigterm(options: object) -> None:
    """The DataLoader's SIGCHLD handler, when the group's SIGTERM ends a worker first."""
    raise RuntimeError("DataLoader worker (pid 11558) is killed by signal: Terminated. ")


@pytest.mark.parametrize("failure", [_save_interrupted_by_sigterm, _worker_ended_by_sigterm])
def test_an_error_a_sigterm_causes_in_a_clean_up_is_the_sigterm(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: Callable[[object], None],
) -> None:
    import spngd.train.cli as cli

    monkeypatch.setattr(cli, "_run_train", failure)
    assert cli.main(["train", *TINY]) == 143
    assert capsys.readouterr().err == "spngd: terminated (SIGTERM)\n"


def test_small_mistakes_are_one_clear_line(run_cli: CliRun, tmp_path: Path) -> None:
    status, _, stderr = run_cli("train", "--no-such-flag")
    assert (status, stderr) == (2, "spngd: error: unrecognized arguments: --no-such-flag\n")
    for misplaced in ((), ("--no-such-flag",), ("--epochs", "3", "train")):  # no command first
        status, _, stderr = run_cli(*misplaced)
        assert (status, stderr) == (
            2,
            "spngd: error: a command comes first: spngd train [options] or spngd compare "
            "[options] (spngd --help)\n",
        )
    assert_one_line_error(run_cli("train", "--out", "", *TINY), "--out must be a folder name")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert_one_line_error(
        run_cli("train", "--out", str(a_file), *TINY), f"--out {a_file} is a file, not a folder"
    )
    assert_one_line_error(
        run_cli("compare", "--sgd-lr", "-1", "--out", str(tmp_path / "c")),
        "--sgd-lr must be finite and >= 0, got -1.0",
    )
    (tmp_path / "c" / "spngd").mkdir(parents=True)
    (tmp_path / "c" / "spngd" / CHECKPOINT).write_bytes(b"")
    line = assert_one_line_error(run_cli("compare", "--out", str(tmp_path / "c"), *TINY))
    assert line.endswith("already holds a run; choose another --out")  # compare cannot resume


@pytest.mark.usefixtures("small_digits")
def test_run_files_get_the_modes_the_umask_gives(run_cli: CliRun, tmp_path: Path) -> None:
    out = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        assert run_cli("train", "--out", str(out), "--epochs", "1", *SMALL)[0] == 0
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes


def test_a_run_folder_in_use_by_another_process_is_refused(run_cli: CliRun, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = RunFolder(out)  # as a running spngd holds it
    try:
        assert_one_line_error(
            run_cli("train", "--out", str(out), *TINY),
            f"output folder {out} is in use by another spngd process",
        )
    finally:
        first.close()
    assert not (out / ".lock").exists()


@pytest.mark.usefixtures("small_digits")
def test_a_resume_refused_for_a_folder_in_use_says_only_that(
    run_cli: CliRun, tmp_path: Path
) -> None:
    """Warnings about the run (``--epochs`` past the saved decay's end) come once the run is
    this process's: a refused ``--resume`` prints its one line and nothing else."""
    out = tmp_path / "run"
    assert run_cli("train", "--out", str(out), "--epochs", "1", *SMALL)[0] == 0
    with open(out / ".lock", "a") as lock:  # held as a running spngd holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = run_cli("train", "--resume", "--out", str(out), "--epochs", "3")
    assert refused[0] == 2
    assert refused[2] == f"spngd: error: output folder {out} is in use by another spngd process\n"
    status, _, stderr = run_cli("train", "--resume", "--out", str(out), "--epochs", "2")
    assert status == 0
    assert stderr.startswith("spngd: warning: --epochs 2 goes past the saved --lr-decay-end 1")


def test_a_run_file_the_file_system_refuses_is_one_line(tmp_path: Path) -> None:
    """config.json past a real file size limit: one line, status 2."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "spngd.train.cli", "train", "--out", str(out), *TINY],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(200),
    )
    assert_one_line_error(
        (done.returncode, done.stdout, done.stderr),
        f"cannot write {out / 'config.json'} (File too large); the run has no checkpoint yet",
    )


def test_a_run_folder_removed_mid_run_is_one_line_that_says_so(
    run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder deleted after the first checkpoint (by hand, or a clean-up job): one
    line naming the cause, not a traceback from releasing the lock nor advice about room."""
    out = tmp_path / "run"
    save = RunFolder.save_checkpoint

    def save_once_then_lose_the_folder(self: RunFolder, payload: object) -> None:
        if (self.path / CHECKPOINT).exists():
            shutil.rmtree(self.path)
        save(self, payload)  # type: ignore[arg-type]

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_once_then_lose_the_folder)
    result = run_cli("train", "--out", str(out), "--epochs", "2", *QUIET, "--batch-size", "512")
    assert_one_line_error(
        result, f"cannot write checkpoint {out / CHECKPOINT}", "the run folder is gone"
    )


def _option_rows() -> dict[str, str]:
    """docs/cli.md's option table: each row by every flag its first cell names."""
    text = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    table = text[text.index("## Options") : text.index("## Data")]
    rows = {}
    for row in table.splitlines():
        if row.startswith("| `--"):
            for option in re.findall(r"`(--[a-z0-9-]+)", row.split("|")[1]):
                rows[option] = row
    return rows


def _numbers(text: str) -> set[float]:
    """The numbers written in ``text`` (``1,024``, ``1e-3`` and ``0.9`` alike)."""
    found = re.findall(r"(?<![\w.-])(\d[\d,]*(?:\.\d+)?(?:e-?\d+)?)", text)
    return {float(number.replace(",", "")) for number in found}


def test_docs_cli_states_every_default_as_the_config_has_it() -> None:
    """Each option's row in docs/cli.md states its default as the config resolves it: the
    number (in any spelling), the word in backticks, or ``on`` for a flag that is on; both
    optimizers' values where they differ; the refresh knobs' from AdaptiveRefresh."""
    defaults: dict[str, list[object]] = {name: [value] for name, value in DEFAULTS.items()}
    for name in OPTIMIZER_DEFAULTS["spngd"]:
        defaults[name] = [own[name] for own in OPTIMIZER_DEFAULTS.values()]
    for knob in fields(AdaptiveRefresh):
        defaults[f"refresh_{knob.name}"] = [knob.default]
    rows = _option_rows()
    for name, values in defaults.items():
        row = rows[flag(name)]
        for value in values:
            if value is None or value is False:
                continue  # unset, or a flag that is off: said in words
            if value is True:
                stated = "on" in row
            elif isinstance(value, int | float):
                stated = float(value) in _numbers(row)
            else:
                stated = f"`{value}`" in row
            assert stated, f"docs/cli.md does not state {flag(name)}'s default {value!r}"


def test_docs_cli_lists_every_option_and_only_real_ones() -> None:
    """docs/cli.md's option table cannot drift from the parser: every option of ``spngd
    train`` (each config field's, each refresh knob's) is in it, and every flag it names
    exists."""
    named = set(_option_rows())
    parser = build_parser()
    real = {
        option
        for commands in parser._subparsers._group_actions  # type: ignore[union-attr]
        for sub in commands.choices.values()
        for action in sub._actions
        for option in action.option_strings
    }
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    train_options = {
        option
        for action in train._actions
        for option in action.option_strings
        if option.startswith("--") and not option.startswith("--no-") and option != "--help"
    }
    assert "--refresh-alpha" in train_options
    assert train_options <= named, train_options - named
    assert named <= real, named - real
