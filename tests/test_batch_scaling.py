"""``benchmarks/batch_scaling.py``: its validation schedule, its grid widening, and a tiny
study run end to end into a JSON and a PNG."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():  # the script, imported as a module
    return load_benchmark("batch_scaling")


def test_validation_runs_every_step_to_20_then_every_5_percent(bench) -> None:
    steps = list(itertools.islice(bench.eval_steps(1.05), 30))
    assert steps[:20] == list(range(1, 21))
    assert steps[20:24] == [21, 23, 25, 27]
    assert all(b == math.ceil(a * 1.05) for a, b in itertools.pairwise(steps[19:]))
    assert list(itertools.islice(bench.eval_steps(1.0), 30)) == list(range(1, 31))


def test_the_grid_widens_past_an_edge_best_and_flags_a_best_still_there(bench, monkeypatch) -> None:
    """Steps fall with the learning rate, so the best is always the grid's top edge: the
    grid grows by one point per widening, each run bounded by the best so far."""
    tried = []

    def fake_run(name, setting, batch, seed, study, data, model, prune_after=math.inf):
        tried.append((setting["lr"], prune_after))
        return bench.Run(name, setting, batch, seed, 100 / setting["lr"], 1.0, 0.9, "target")

    monkeypatch.setattr(bench, "train_run", fake_run)
    study = bench.Study(batches=(128,), data_size=800, target=0.9)
    best, on_edge = bench.tune(bench.SGD, 128, study, None, "resnet8-1d", lambda run: None)
    lrs = [lr for lr, _ in tried]
    assert lrs == [0.0354, 0.0707, 0.141, 0.283, 0.566, 1.13]  # 4 points, then 2 widenings
    assert best.setting == {"lr": 1.13} and on_edge
    assert tried[0][1] == math.inf and tried[1][1] == pytest.approx(100 / 0.0354)


def test_a_tuned_warm_up_doubles_every_optimizers_grid_alike(bench, monkeypatch) -> None:
    tried = []

    def fake_run(name, setting, batch, seed, study, data, model, prune_after=math.inf):
        tried.append(setting)
        steps = 50 - setting["lr"] + setting["warmup_steps"]  # best: lr 0.141, no warm-up
        return bench.Run(name, setting, batch, seed, steps if setting["lr"] < 0.2 else 99, 1.0,
                         0.9, "target")  # fmt: skip

    monkeypatch.setattr(bench, "train_run", fake_run)
    study = bench.Study(batches=(128,), data_size=800, target=0.9, warmups=(0, 10))
    # SGD's 0.141 sits inside its grid; SP-NGD's on its edge, which widens by one learning
    # rate (two dampings): each grid point runs with each warm-up
    for contender, runs in ((bench.SGD, 2 * 4), (bench.SPNGD_DEFAULT, 2 * (4 + 2))):
        tried.clear()
        best, _ = bench.tune(contender, 128, study, None, "resnet8-1d", lambda run: None)
        assert len(tried) == runs
        assert {setting["warmup_steps"] for setting in tried} == {0, 10}
        assert best.setting["warmup_steps"] == 0
    assert bench.format_setting({"lr": 0.0354, "damping": 0.001, "warmup_steps": 0}) == (
        "0.0354/0.001/w0"
    )
    assert bench.format_setting({"lr": 0.0189, "momentum": 0.4667, "damping": 0.001}) == (
        "0.0189/0.4667/0.001"
    )


def test_a_tiny_study_writes_every_run_and_the_plot(bench, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPNGD_CACHE", str(tmp_path / "cache"))
    tiny = bench.Study(batches=(64, 256), data_size=1600, target=0.3, max_epochs=2.0, seeds=(0, 1))
    monkeypatch.setattr(bench, "QUICK", tiny)
    monkeypatch.setattr(bench, "pin_malloc", lambda: None)
    monkeypatch.setattr(
        sys, "argv", ["batch_scaling.py", "--quick", "--out", str(tmp_path), "--threads", "1"]
    )
    (tmp_path / "batch_scaling.runs.jsonl").write_text('{"an earlier study": 1}\n')
    bench.main()
    record = json.loads((tmp_path / "batch_scaling.json").read_text())
    assert (tmp_path / "batch_scaling.png").read_bytes()[:4] == b"\x89PNG"
    names = {"SGD", "AdamW", "SP-NGD", "SP-NGD every step"}
    assert {(r["optimizer"], r["batch"]) for r in record["results"]} == {
        (name, batch) for name in names for batch in (64, 256)
    }
    assert {r["optimizer"] for r in record["runs"]} == names
    logged = (tmp_path / "batch_scaling.runs.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in logged] == record["runs"]
    assert all(r["stopped"] in ("target", "cap", "pruned", "diverged") for r in record["runs"])
    assert set(record["final_accuracies"]) == {"SGD", "AdamW", "SP-NGD"}
    assert any(line.startswith("at batch 256: ") and "AdamW" in line for line in record["report"])


@pytest.mark.parametrize("name", ["SGD", "SP-NGD", "SP-NGD every step"])
def test_momentum_comes_from_the_setting(bench, name: str) -> None:
    momenta = []
    for setting in ({"lr": 0.1, "momentum": 0.7}, {"lr": 0.1}):
        model = bench.build_model("resnet8-1d", 10, in_channels=1)
        optimizer = bench.make_optimizer(name, model, {**setting, "damping": 0.001})
        momenta.append(optimizer.param_groups[0]["momentum"])
    assert momenta == [0.7, bench.MOMENTUM]
