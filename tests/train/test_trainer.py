"""The training loop: weights rescaling, atomic checkpoints, records, mixup switch-off."""

from __future__ import annotations

import errno
import gc
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from spngd.train.augment import soft_targets
from spngd.train.config import resolve_config
from spngd.train.errors import UserError
from spngd.train.models import build_model
from spngd.train.optimizers import make_optimizer, rescale_weights
from spngd.train.runfolder import CHECKPOINT, PREVIOUS, RunFolder
from spngd.train.step import train_step
from spngd.train.trainer import Trainer, existing_objects_left_out_of_gc


def _bounded(model: nn.Module) -> list[tuple[float, float]]:
    """(||W||_F, sqrt(2 d_out)) of every conv and Linear weight."""
    return [
        (float(m.weight.detach().norm()), math.sqrt(2 * m.weight.shape[0]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]


def test_rescaling_shrinks_conv_and_linear_weights_only() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, in_channels=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0).add_(0.5)
    others = {  # biases and BatchNorm parameters
        f"{name}.{key}": p.detach().clone()
        for name, module in model.named_modules()
        for key, p in module.named_parameters(recurse=False)
        if key == "bias" or not isinstance(module, nn.Conv2d | nn.Linear)
    }
    assert len(others) == 2 * 21 + 1  # 21 BatchNorms (gamma, beta) and the classifier bias
    before = _bounded(model)
    rescale_weights(model)
    for (norm_before, bound), (norm, _) in zip(before, _bounded(model), strict=True):
        assert norm_before > bound and norm == pytest.approx(bound, rel=1e-6)
    for name, p in model.named_parameters():
        if name in others:
            assert torch.equal(p, others[name]), name
    small = nn.Linear(50, 8)
    with torch.no_grad():
        small.weight.mul_(0.01)
    weight = small.weight.detach().clone()
    rescale_weights(small)
    assert torch.equal(small.weight, weight)  # shrink only


def test_weights_stay_bounded_after_every_training_step() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, in_channels=1)
    opt = make_optimizer(model, resolve_config({"optimizer": "sgd", "lr": 1.0, "device": "cpu"}))
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        train_step(model, opt, [(images, soft_targets(labels, 10))], rescale=True)
        norms = _bounded(model)
        assert all(norm <= bound * (1 + 1e-6) for norm, bound in norms)
        assert sum(norm > bound * (1 - 1e-6) for norm, bound in norms) > 5  # shrunk to the bound


def test_checkpoint_is_replaced_atomically_keeping_the_previous_one_and_kept_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunFolder(tmp_path / "run")
    run.save_checkpoint({"step": 1, "weights": torch.ones(3)})
    run.save_checkpoint({"step": 2, "weights": torch.ones(3)})

    def full_disk(payload: object, file: object) -> None:
        file.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"No space left on device.*last checkpoint is kept"):
        run.save_checkpoint({"step": 3})
    monkeypatch.undo()
    run.close()
    assert torch.load(tmp_path / "run" / CHECKPOINT)["step"] == 2
    assert torch.load(tmp_path / "run" / PREVIOUS)["step"] == 1
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        CHECKPOINT,
        PREVIOUS,
        "metrics.jsonl",
    }
    run.close()


def test_records_follow_the_schedule_and_carry_refresh_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = resolve_config(
        {
            "batch_size": 32,
            "epochs": 0.05,
            "warmup_epochs": 0.05,
            "lr_decay_end": 1.0,
            "device": "cpu",
            "out": str(tmp_path),
            "threads": 2,
        }
    )
    with RunFolder(tmp_path) as run:
        trainer = Trainer(config, run)
        result = trainer.fit()
    steps = [r for r in result.records if r["kind"] == "step"]
    assert [r["lr"] for r in steps] == pytest.approx([trainer.schedule.lr_at(i) for i in range(2)])
    assert steps[0]["lr"] < steps[1]["lr"]  # warm-up
    assert steps[1]["momentum"] == pytest.approx(0.9 * steps[0]["lr"] / steps[1]["lr"])
    epoch = next(r for r in result.records if r["kind"] == "epoch")
    if hasattr(trainer.optimizer, "stats"):
        assert epoch["refresh_counts"] == trainer.optimizer.refresh_counts()["total"]
    assert torch.get_num_threads() == 2
    progress = capsys.readouterr().err
    assert "loss=" in progress and "acc=" in progress and "steps_per_s=" in progress


def test_a_cpu_run_flushes_subnormal_numbers(tmp_path: Path) -> None:
    """Subnormal floats slow CPU arithmetic several times over; a CPU run flushes them to
    zero (inputs and results), for every optimizer alike."""
    torch.set_flush_denormal(False)
    subnormal = torch.tensor([1e-40])
    assert (subnormal * 1.0).item() != 0.0
    config = resolve_config({"epochs": 0.02, "device": "cpu", "out": str(tmp_path)})
    try:
        with RunFolder(tmp_path) as run:
            Trainer(config, run)
        assert (subnormal * 1.0).item() == 0.0
        assert (torch.tensor([1e-30]) * 1e-10).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_mixup_runs_until_its_switch_off_epoch(tmp_path: Path) -> None:
    config = resolve_config(
        {
            "batch_size": 32,
            "mixup_alpha": 0.4,
            "mixup_off_epoch": 1.0,
            "label_smoothing": 0.1,
            "device": "cpu",
            "out": str(tmp_path),
        }
    )
    with RunFolder(tmp_path) as run:
        trainer = Trainer(config, run)
    images, labels = next(iter(trainer.train_loader))
    plain = soft_targets(labels, 10, 0.1)
    first = trainer.prepare(images, labels, epoch=0.0)
    assert torch.equal(first[0], images) and torch.equal(first[1], plain)
    mixed = trainer.prepare(images.flip(0), labels.flip(0), epoch=0.5)
    assert not torch.equal(mixed[1], plain.flip(0))
    late = trainer.prepare(images, labels, epoch=1.0)
    assert torch.equal(late[0], images) and torch.equal(late[1], plain)


def test_a_trainer_under_torchrun_without_the_process_group_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each process would otherwise train alone, all writing the same run folder."""
    from spngd.train.runfolder import SilentRunFolder
    from spngd.train.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = resolve_config({"device": "cpu", "out": str(tmp_path / "run")})
    with pytest.raises(UserError, match="under torchrun a Trainer needs the process group"):
        Trainer(config, SilentRunFolder(config.out))


@pytest.mark.parametrize("optimizer", ["spngd", "sgd"])
def test_a_warm_up_leaves_the_run_as_it_was(tmp_path: Path, optimizer: str) -> None:
    """``spngd compare`` warms up each run with a step of a throwaway model and optimizer
    before it trains; the run then takes the same steps to the bit, random augmentation,
    mixup and SP-NGD's statistics included."""
    results = {}
    for warmed in (False, True):
        config = resolve_config(
            {
                "optimizer": optimizer,
                "mixup_alpha": 0.2,
                "data": "synthetic",
                "image_size": 8,
                "batch_size": 16,
                "epochs": 0.05,
                "device": "cpu",
                "progress": False,
                "out": str(tmp_path / str(warmed)),
            }
        )
        with RunFolder(config.out) as run:
            trainer = Trainer(config, run)
            results[warmed] = trainer.fit(warm_up=warmed), trainer.model.state_dict()
    (cold, cold_state), (warm, warm_state) = results[False], results[True]
    losses = [[r["loss"] for r in result.records if r["kind"] == "step"] for result in (cold, warm)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert all(torch.equal(cold_state[k], warm_state[k]) for k in cold_state)


def test_training_leaves_the_objects_it_starts_with_out_of_gc_and_gives_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full garbage collection walks every tracked object (hundreds of thousands once
    torch is imported); during training it walks only those made since training began."""
    frozen_during_steps = []
    fit_step = Trainer.fit_step

    def recording(self: Trainer, *args: object) -> object:
        frozen_during_steps.append(gc.get_freeze_count())
        return fit_step(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "fit_step", recording)
    config = resolve_config(
        {"batch_size": 32, "epochs": 0.05, "device": "cpu", "progress": False, "out": str(tmp_path)}
    )
    assert gc.get_freeze_count() == 0
    with RunFolder(tmp_path) as run:
        Trainer(config, run).fit()
    assert len(frozen_during_steps) == 2 and min(frozen_during_steps) > 10_000
    assert gc.get_freeze_count() == 0


def test_objects_the_caller_froze_stay_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with existing_objects_left_out_of_gc():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
