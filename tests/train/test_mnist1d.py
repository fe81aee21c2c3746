"""mnist1d: generated offline, split, cached, and trained on by ``spngd train``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from spngd.train import mnist1d
from spngd.train.config import resolve_config
from spngd.train.errors import UserError
from tests.train.conftest import SMALL, CliRun, assert_one_line_error

SIZE = 800


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPNGD_CACHE", str(folder))
    return folder


def test_sizes_are_read_from_the_data_name() -> None:
    assert mnist1d.size_of("mnist1d") == mnist1d.DEFAULT_SIZE == 80_000
    assert mnist1d.size_of("mnist1d:800") == 800
    assert mnist1d.size_of("digits") is None and mnist1d.size_of("/data/mnist1d") is None
    for bad in ("mnist1d:", "mnist1d:ten", "mnist1d:-800", "mnist1d:79"):
        with pytest.raises(UserError, match="the size must be a whole number of at least 80"):
            mnist1d.size_of(bad)


def test_the_default_set_holds_a_validation_set_of_10000_and_room_for_batch_16384() -> None:
    held_out = mnist1d.DEFAULT_SIZE // mnist1d.VAL_SHARE
    assert held_out == 10_000 and mnist1d.DEFAULT_SIZE - held_out >= 4 * 16_384


def test_generation_is_seeded_split_cached_and_leaves_global_rngs_alone(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    random.seed(3)
    np.random.seed(3)
    expected_python, expected_numpy = random.random(), np.random.random()
    random.seed(3)
    np.random.seed(3)
    (train_x, train_y), (val_x, val_y) = mnist1d.load(SIZE)
    assert random.random() == expected_python and np.random.random() == expected_numpy
    assert train_x.shape == (700, 1, 40) and val_x.shape == (100, 1, 40)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert set(val_y.tolist()) == set(range(10)) and set(train_y.tolist()) == set(range(10))
    assert abs(float(torch.cat((train_x, val_x)).std()) - 1.0) < 0.01  # standardized
    assert (cache / f"mnist1d-{SIZE}.npz").is_file()

    def no_generation(size: int) -> None:
        raise AssertionError("the cached copy should have been read")

    monkeypatch.setattr(mnist1d, "generate", no_generation)
    (again_x, again_y), _ = mnist1d.load(SIZE)
    assert torch.equal(again_x, train_x) and torch.equal(again_y, train_y)
    monkeypatch.undo()
    fresh_x, fresh_y = mnist1d.generate(SIZE)  # the same examples without the cache
    assert np.array_equal(fresh_x[SIZE // 8 :], train_x[:, 0].numpy())
    assert np.array_equal(fresh_y[: SIZE // 8], val_y.numpy())


def test_a_damaged_cache_is_generated_again(cache: Path) -> None:
    mnist1d.load(SIZE)
    path = cache / f"mnist1d-{SIZE}.npz"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match=f"generating mnist1d-{SIZE}.npz again"):
        (train_x, _), _ = mnist1d.load(SIZE)
    assert train_x.shape == (700, 1, 40) and path.read_bytes() == good


def test_an_unwritable_cache_costs_a_warning_only(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPNGD_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="mnist1d is not cached"):
        (train_x, _), _ = mnist1d.load(SIZE)
    assert train_x.shape == (700, 1, 40)


def test_the_data_picks_a_1d_model_and_refuses_an_image_model() -> None:
    config = resolve_config({"data": "mnist1d:800", "device": "cpu"})
    assert config.model == "resnet8-1d" and config.data == "mnist1d:800"
    with pytest.raises(UserError, match="--model resnet20 does not fit --data mnist1d: use a 1-D"):
        resolve_config({"data": "mnist1d", "model": "resnet20", "device": "cpu"})
    with pytest.raises(UserError, match="--model resnet8-1d does not fit --data digits: use an"):
        resolve_config({"model": "resnet8-1d", "device": "cpu"})


@pytest.mark.parametrize(
    ("option", "value"), [("crop", "pad"), ("crop", "resized"), ("flip", True), ("image_size", 32)]
)
def test_image_options_are_refused_not_ignored(option: str, value: object) -> None:
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UserError, match=f"{flag} does not apply to --data mnist1d: its examples"):
        resolve_config({"data": "mnist1d:800", "device": "cpu", option: value})
    fixed = {"crop": "none", "flip": False, "image_size": 40}  # its own values are accepted
    assert resolve_config({"data": "mnist1d:800", "device": "cpu", **fixed}).image_size == 40


def test_train_on_mnist1d(run_cli: CliRun, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        "train",
        "--data",
        f"mnist1d:{SIZE}",
        *SMALL,
        "--batch-size",
        "70",
        "--epochs",
        "2",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    assert "20 steps in" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[-1]["val_accuracy"] > 0.2  # ten classes: chance is 0.1
    bad = run_cli("train", "--data", "mnist1d:12", "--out", str(tmp_path / "x"), *SMALL)
    assert_one_line_error(bad, "--data mnist1d:12: the size must be a whole number")
