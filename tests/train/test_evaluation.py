"""Validation's BatchNorm statistics: recomputed under the current weights, training untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spngd.train.evaluation import (
    BATCHNORM_EXAMPLES,
    batchnorm_loader,
    batchnorm_sample,
    recompute_batchnorm_statistics,
)
from tests.train.conftest import SMALL, TINY, CliRun


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))


def test_recomputed_statistics_are_the_mean_of_each_batchs_own() -> None:
    net = _net()
    net.eval()
    batches = [torch.randn(5, 2, 6, 6) * 3 + 1, torch.randn(7, 2, 6, 6) - 2]
    loader = [(batch, torch.zeros(len(batch))) for batch in batches]
    with torch.no_grad():
        conv_out = [net[0](batch) for batch in batches]
    means = [out.mean(dim=(0, 2, 3)) for out in conv_out]
    variances = [out.var(dim=(0, 2, 3), unbiased=True) for out in conv_out]

    recompute_batchnorm_statistics(net, loader, torch.device("cpu"))

    norm = net[1]
    torch.testing.assert_close(norm.running_mean, (means[0] + means[1]) / 2)
    torch.testing.assert_close(norm.running_var, (variances[0] + variances[1]) / 2)
    assert norm.momentum == 0.1 and not net.training  # settings and mode as they were
    assert all(p.grad is None for p in net.parameters())


def test_the_sample_is_fixed_by_the_seed_and_leaves_the_global_generator_alone() -> None:
    data = TensorDataset(torch.arange(5000.0), torch.zeros(5000))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = batchnorm_sample(data, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.indices == batchnorm_sample(data, seed=3).indices
    assert first.indices != batchnorm_sample(data, seed=4).indices
    assert len(first) == BATCHNORM_EXAMPLES and len(set(first.indices)) == BATCHNORM_EXAMPLES
    small = TensorDataset(torch.arange(10.0), torch.zeros(10))
    assert sorted(batchnorm_sample(small, seed=0).indices) == list(range(10))


def test_the_loader_reads_the_sample_as_validation_does() -> None:
    data = TensorDataset(torch.arange(3000.0), torch.zeros(3000))
    loader = batchnorm_loader(data, 3, like=DataLoader(data, batch_size=500))
    values = torch.cat([x for x, _ in loader])
    assert [len(x) for x, _ in loader] == [500] * 4 + [BATCHNORM_EXAMPLES - 2000]
    assert values.long().tolist() == batchnorm_sample(data, 3).indices


def test_a_last_batch_of_one_example_is_left_out() -> None:
    """A BatchNorm on 1x1 maps cannot take one example's statistics (the run stopped with a
    traceback before its first validation); a remainder of two or more is kept."""
    for size, batches in ((9, [4, 4]), (10, [4, 4, 2]), (1, [1])):
        data = TensorDataset(torch.arange(float(size)), torch.zeros(size))
        loader = batchnorm_loader(data, 0, like=DataLoader(data, batch_size=4))
        assert [len(x) for x, _ in loader] == batches, size
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    images = TensorDataset(torch.randn(9, 2, 1, 1), torch.zeros(9))
    loader = batchnorm_loader(images, 0, like=DataLoader(images, batch_size=4))
    recompute_batchnorm_statistics(model, loader, torch.device("cpu"))


@pytest.mark.usefixtures("small_digits")
def test_recomputed_statistics_change_validation_and_nothing_else(
    run_cli: CliRun, tmp_path: Path
) -> None:
    """The same run with ``running`` and ``recomputed`` statistics: identical training
    records (validation draws nothing from the training order or the global generator),
    different validation figures."""
    records = {}
    for choice in ("running", "recomputed"):
        out = tmp_path / choice
        argv = ["train", "--out", str(out), *SMALL, "--epochs", "3", "--eval-every-steps", "1"]
        code, _, stderr = run_cli(*argv, "--eval-batchnorm", choice)
        assert code == 0, stderr
        lines = (out / "metrics.jsonl").read_text().splitlines()
        records[choice] = [json.loads(line) for line in lines if '"step"' in line]
    steps = {c: [r for r in rs if r["kind"] == "step"] for c, rs in records.items()}
    assert len(steps["running"]) == len(steps["recomputed"]) == 6
    for running, recomputed in zip(steps["running"], steps["recomputed"], strict=True):
        assert running["loss"] == recomputed["loss"]
        assert running["accuracy"] == recomputed["accuracy"]
    assert [r["val_loss"] for r in steps["running"]] != [r["val_loss"] for r in steps["recomputed"]]


def test_validation_leaves_an_augmented_run_as_it_was(run_cli: CliRun, tmp_path: Path) -> None:
    """Random crops and flips draw from the global generator: validating after every step,
    with BatchNorm statistics recomputed, must not move them, so the training records are
    those of a run validated once per pass."""
    losses = {}
    for every in ("0", "1"):
        out = tmp_path / every
        argv = ["train", "--out", str(out), *TINY, "--data", "synthetic", "--image-size", "8"]
        code, _, stderr = run_cli(*argv, "--batch-size", "16", "--eval-every-steps", every)
        assert code == 0, stderr
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses[every] = [json.loads(line)["loss"] for line in lines if '"kind": "step"' in line]
    assert len(losses["0"]) >= 3 and losses["0"] == losses["1"]
