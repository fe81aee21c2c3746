"""``benchmarks/perfect_scaling.py``: its grid, the bound on hopeless runs, the best medians
and their ratio, and a tiny run end to end into a JSON."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():  # the script, imported as a module
    return load_benchmark("perfect_scaling")


TINY_GRIDS = {
    "SGD": {64: {"lr": (0.1, 0.2, 0.4), "momentum": (0.9,)}, 256: {"lr": (0.4,)}},
    "SP-NGD": {
        64: {"lr": (0.01, 0.02), "damping": (0.01,)},
        256: {"lr": (0.02,), "damping": (0.003, 0.01, 0.03)},
    },
}


def test_the_grid_is_every_combination_centre_first(bench) -> None:
    grid = {name: list(values) for name, values in bench.GRIDS["SP-NGD"][512].items()}
    points = bench.points(grid)
    assert len(points) == 9 and len({tuple(p.items()) for p in points}) == 9
    assert points[0] == {"lr": 0.0531, "momentum": 0.7, "damping": 0.0003}
    assert bench.edges(grid, points[0]) == []
    corner = {"lr": 0.0375, "momentum": 0.8, "damping": 0.0003}
    assert bench.edges(grid, corner) == [("lr", 0), ("momentum", -1)]  # one damping: no edge
    assert all(len(bench.points(g)) == 9 for o in bench.GRIDS.values() for g in o.values())


def test_the_grid_widens_past_an_edge_best_twice_at_most(bench) -> None:
    """Steps fall with the learning rate and with the momentum's distance from 0.9: the
    best runs off the top of the learning rates, each new one bounded by twice the best."""
    tried = []

    def median_of(setting: dict[str, float], bound: float) -> float:
        tried.append((setting, bound))
        return 100 / setting["lr"] + 1000 * abs(setting["momentum"] - 0.9)

    axes = {"lr": (0.1, 0.2, 0.4), "momentum": (0.8, 0.9, 0.95)}
    median, setting, grid = bench.tune(axes, median_of)
    assert tried[0] == ({"lr": 0.2, "momentum": 0.9}, math.inf)
    assert tried[1][1] == 1000.0  # twice the centre's 500
    assert grid == {"lr": [0.1, 0.2, 0.4, 0.8, 1.6], "momentum": [0.8, 0.9, 0.95]}
    assert len(tried) == 9 + 3 + 3
    assert (median, setting) == (62.5, {"lr": 1.6, "momentum": 0.9})
    assert bench.edges(grid, setting) == [("lr", -1)]
    assert bench.beyond("momentum", 0.95, 0.9) == 0.975
    assert bench.beyond("momentum", 0.8, 0.9) == 0.6
    assert bench.beyond("damping", 0.001, 0.003) == 0.000333
    assert bench.beyond("momentum", 0.2, 0.6) == 0.0  # not below 0


def test_momentum_widening_stops_at_zero(bench) -> None:
    """Fewer steps the lower the momentum: the grid widens down to 0, then stops."""
    tried = []

    def median_of(setting: dict[str, float], bound: float) -> float:
        tried.append(setting["momentum"])
        return 100 + 100 * setting["momentum"]

    median, setting, grid = bench.tune({"momentum": (0.2, 0.6, 0.8)}, median_of)
    assert grid == {"momentum": [0.0, 0.2, 0.6, 0.8]}  # beyond 0.2: -0.6, so 0; then none
    assert (median, setting) == (100.0, {"momentum": 0.0}) and len(tried) == 4


def test_held_out_seeds_must_not_repeat_the_tuning_seeds(bench, monkeypatch, capsys) -> None:
    argv = ["perfect_scaling.py", "--seeds", "0", "1", "--held-out-seeds", "1", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        bench.main()
    assert "--held-out-seeds must not repeat the tuning seeds" in capsys.readouterr().err


def test_the_best_medians_give_the_ratio_and_hopeless_runs_stop_early(
    bench, monkeypatch, capsys, tmp_path: Path
) -> None:
    """Steps fall with the learning rate, grow with the seed and with SP-NGD's damping; a
    run past its bound reports that it was pruned, as ``train_run`` does."""
    bounds = []

    def fake_run(name, setting, batch, seed, study, data, model, prune_after=math.inf):
        bounds.append(prune_after)
        steps = (10 if batch == 64 else 1) * (1 + seed) / setting["lr"]
        steps *= 1 + 10 * setting.get("damping", 0.0)
        if steps > prune_after:
            return bench.Run(name, setting, batch, seed, math.inf, 1.0, 0.5, "pruned")
        return bench.Run(name, setting, batch, seed, steps, 1.0, 0.9, "target")

    monkeypatch.setattr(bench, "GRIDS", TINY_GRIDS)
    monkeypatch.setattr(bench, "BATCHES", (64, 256))
    monkeypatch.setattr(bench, "train_run", fake_run)
    monkeypatch.setattr(bench, "load_study_data", lambda size: SimpleNamespace(train_y=[0] * 5))
    monkeypatch.setattr(bench, "pin_malloc", lambda: None)
    argv = ["perfect_scaling.py", "--seeds", "0", "1", "2", "--held-out-seeds", "4", "5"]
    argv += ["--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    # SGD at 64: the centre (lr 0.2) first, unbounded: 50, 100, 150 steps; then 0.1, bounded
    # by twice that median: its seeds take 100, 200 and (past 200) are pruned; the best runs
    # off the top, 0.8 and 1.6 are added
    assert bounds[:6] == [math.inf] * 3 + [200.0] * 3
    assert lines[1].split() == "SGD batch 64 0.2/0.9: 50, 100, 150; median 100".split()
    assert lines[2].split() == "SGD batch 64 0.1/0.9: 100, 200, -; median 200".split()
    assert lines[5].split() == "SGD batch 64 1.6/0.9: 6, 12, 19; median 12.5".split()
    # SP-NGD at 256: damping 0.01 (the centre) 55, 110, 165; 0.003 51.5, 103, 154.5; the
    # best runs off the bottom
    assert lines[11].split() == "SP-NGD batch 256 0.02/0.01: 55, 110, 165; median 110".split()
    assert lines[12].endswith("median 103")
    # the best settings on the held-out seeds, unbounded: SGD's 1.6 at 64 takes 31.25 and
    # 37.5 steps, its 0.4 at 256 12.5 and 15
    assert lines[-8].split() == (
        "SGD batch 64 1.6/0.9: 31, 38; median 34.375 (held-out seeds)".split()
    )
    assert bounds[-4:] == [math.inf] * 4
    assert lines[-3] == (
        "SGD, the same settings on held-out seeds [4, 5]: median 34.375 steps at 64, 13.75 at "
        "256; steps(256) / steps(64) 0.400, within 1.5x of perfect scaling: no (<= 0.375)"
    )
    assert lines[-4] == (
        "SGD: median 12.5 steps at 64 (1.6/0.9), 5 at 256 (0.4); steps(256) / steps(64) 0.400, "
        "within 1.5x of perfect scaling: no (<= 0.375); best on the grid's edge at batch 64"
    )
    assert lines[-2] == (
        "SP-NGD: median 275 steps at 64 (0.08/0.01), 100.27 at 256 (0.02/0.00027); steps(256) "
        "/ steps(64) 0.365, within 1.5x of perfect scaling: yes (<= 0.375); best on the grid's "
        "edge at batch 64, batch 256"
    )
    record = json.loads((tmp_path / "perfect_scaling.json").read_text())
    assert len(record["runs"]) == 3 * (5 + 1 + 4 + 5) + 2 * 4
    assert record["summary"] == lines[-4:]
    assert record["held_out_seeds"] == [4, 5]
    assert record["best"]["SP-NGD 256"] == {
        "setting": {"lr": 0.02, "damping": 0.00027},
        "median": pytest.approx(100.27),
        "held_out_median": pytest.approx(100.27 * 5.5 / 2),
    }
    assert record["grids"]["SP-NGD 256"] == {
        "lr": [0.02],
        "damping": [0.00027, 0.0009, 0.003, 0.01, 0.03],
    }
    assert record["grids"]["SGD 64"] == {"lr": [0.1, 0.2, 0.4, 0.8, 1.6], "momentum": [0.9]}


def test_an_interrupted_study_keeps_the_runs_it_finished(
    bench, monkeypatch, tmp_path: Path
) -> None:
    finished = []

    def fake_run(name, setting, batch, seed, study, data, model, prune_after=math.inf):
        if len(finished) == 4:
            raise KeyboardInterrupt
        finished.append(bench.Run(name, setting, batch, seed, 10.0 + seed, 1.0, 0.9, "target"))
        return finished[-1]

    monkeypatch.setattr(bench, "GRIDS", TINY_GRIDS)
    monkeypatch.setattr(bench, "BATCHES", (64, 256))
    monkeypatch.setattr(bench, "train_run", fake_run)
    monkeypatch.setattr(bench, "load_study_data", lambda size: SimpleNamespace(train_y=[0] * 5))
    monkeypatch.setattr(bench, "pin_malloc", lambda: None)
    argv = ["perfect_scaling.py", "--seeds", "0", "1", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    (tmp_path / "perfect_scaling.runs.jsonl").write_text('{"an earlier study": 1}\n')
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    logged = (tmp_path / "perfect_scaling.runs.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in logged] == [asdict(run) for run in finished]
    assert not (tmp_path / "perfect_scaling.json").exists()


def test_a_tiny_run_trains_for_real(bench, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPNGD_CACHE", str(tmp_path / "cache"))
    tiny = bench.replace(bench.STUDY, data_size=1600, target=0.3, max_epochs=2.0)
    grids = {
        "SP-NGD": {b: {"lr": (0.02,), "momentum": (0.7,), "damping": (0.01,)} for b in (64, 256)}
    }
    monkeypatch.setattr(bench, "STUDY", tiny)
    monkeypatch.setattr(bench, "GRIDS", grids)
    monkeypatch.setattr(bench, "BATCHES", (64, 256))
    monkeypatch.setattr(bench, "pin_malloc", lambda: None)
    argv = ["perfect_scaling.py", "--optimizers", "SP-NGD", "--seeds", "0", "--held-out-seeds"]
    argv += ["--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    record = json.loads((tmp_path / "perfect_scaling.json").read_text())
    assert [(r["batch"], r["optimizer"]) for r in record["runs"]] == [
        (64, "SP-NGD"),
        (256, "SP-NGD"),
    ]
    assert all(r["setting"]["momentum"] == 0.7 for r in record["runs"])
    assert all(r["stopped"] in ("target", "cap") for r in record["runs"])


def test_settings_from_an_earlier_run_skip_the_tuning(
    bench, monkeypatch, capsys, tmp_path: Path
) -> None:
    """The best median per optimizer and batch over the file's tuning seeds (the first of
    equals; held-out runs in it do not count) runs on the new held-out seeds alone, each
    validated at every step when asked."""
    grid = {"lr": [0.1, 0.2], "damping": [0.01]}

    def run(lr: float, batch: int, seed: int, steps: float) -> dict:
        return {
            "optimizer": "SP-NGD",
            "setting": {"lr": lr, "damping": 0.01},
            "batch": batch,
            "seed": seed,
            "steps": steps,
            "seconds": 1.0,
            "accuracy": 0.9,
            "stopped": "target",
        }

    earlier = {
        "seeds": [0, 1],
        "grids": {"SP-NGD 64": grid, "SP-NGD 256": grid},
        "runs": [run(0.1, 64, 0, 40), run(0.1, 64, 1, 60), run(0.2, 64, 0, 50),
                 run(0.2, 64, 1, 50), run(0.2, 64, 5, 1), run(0.1, 256, 0, 30),
                 run(0.1, 256, 1, math.inf), run(0.2, 256, 0, 20), run(0.2, 256, 1, 24)],
    }  # fmt: skip
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    calls = []

    def fake_run(name, setting, batch, seed, study, data, model, prune_after=math.inf):
        calls.append((setting["lr"], batch, seed, study.eval_growth, prune_after))
        return bench.Run(name, setting, batch, seed, 100 / batch + seed, 1.0, 0.9, "target")

    monkeypatch.setattr(bench, "BATCHES", (64, 256))
    monkeypatch.setattr(bench, "train_run", fake_run)
    monkeypatch.setattr(bench, "load_study_data", lambda size: SimpleNamespace(train_y=[0] * 5))
    monkeypatch.setattr(bench, "pin_malloc", lambda: None)
    argv = ["perfect_scaling.py", "--optimizers", "SP-NGD", "--held-out-seeds", "7", "8", "9"]
    argv += ["--settings-from", str(tmp_path / "earlier.json"), "--eval-every-step"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    bench.main()
    assert calls == [(0.1, 64, seed, 1.0, math.inf) for seed in (7, 8, 9)] + [
        (0.2, 256, seed, 1.0, math.inf) for seed in (7, 8, 9)
    ]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("SP-NGD: median 50 steps at 64 (0.1/0.01), 22 at 256 (0.2/0.01)")
    record = json.loads((tmp_path / "perfect_scaling.json").read_text())
    assert record["seeds"] == [0, 1] and record["eval_every_step"] is True
    assert record["best"]["SP-NGD 256"]["held_out_median"] == pytest.approx(8 + 100 / 256)
    assert len(record["runs"]) == 6
    # A file written this way has no runs on its tuning seeds: its best entries are read.
    calls.clear()
    again = ["perfect_scaling.py", "--optimizers", "SP-NGD", "--held-out-seeds", "10"]
    again += ["--settings-from", str(tmp_path / "perfect_scaling.json"), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", again)
    bench.main()
    assert [call[:2] for call in calls] == [(0.1, 64), (0.2, 256)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0"], "drop --seeds"),
        (["--held-out-seeds"], "needs --held-out-seeds"),
        (["--held-out-seeds", "1"], "must not repeat the tuning seeds"),
        (["--held-out-seeds", "4"], "must not repeat the file's held-out seeds"),
    ],
)
def test_settings_from_rejects_what_it_cannot_use(
    bench, monkeypatch, capsys, tmp_path: Path, extra: list[str], message: str
) -> None:
    earlier = {"seeds": [0, 1], "held_out_seeds": [4], "grids": {}, "runs": []}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    argv = ["perfect_scaling.py", "--settings-from", str(tmp_path / "earlier.json"), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err


def test_a_study_that_stops_before_its_first_run_leaves_the_earlier_runs_log(
    bench, monkeypatch, tmp_path: Path
) -> None:
    earlier = {"seeds": [0], "held_out_seeds": [], "grids": {}, "runs": []}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    (tmp_path / "perfect_scaling.runs.jsonl").write_text('{"an earlier study": 1}\n')
    monkeypatch.setattr(bench, "load_study_data", lambda size: SimpleNamespace(train_y=[0] * 5))
    monkeypatch.setattr(bench, "pin_malloc", lambda: None)
    argv = ["perfect_scaling.py", "--settings-from", str(tmp_path / "earlier.json")]
    argv += ["--held-out-seeds", "7", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="no SGD runs at batch"):
        bench.main()
    logged = (tmp_path / "perfect_scaling.runs.jsonl").read_text()
    assert logged == '{"an earlier study": 1}\n'


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"seeds": [0]}'])
def test_settings_from_a_file_that_is_not_a_record_is_one_clear_error(
    bench, monkeypatch, capsys, tmp_path: Path, text: str
) -> None:
    (tmp_path / "earlier.json").write_text(text)
    argv = ["perfect_scaling.py", "--settings-from", str(tmp_path / "earlier.json")]
    monkeypatch.setattr(sys, "argv", [*argv, "--held-out-seeds", "3"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--settings-from" in capsys.readouterr().err
