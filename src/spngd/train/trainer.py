"""The run around the training step (:mod:`spngd.train.step`): data, model and optimizer
set-up, schedule, evaluation, logging, checkpoints and resuming."""

from __future__ import annotations

import gc
import math
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from spngd.distributed import launch
from spngd.guard import NonFiniteGradientError
from spngd.messages import first_sentence
from spngd.optimizer import SPNGD
from spngd.timing import seconds_since
from spngd.train import stopping
from spngd.train.augment import RunningMixup, soft_targets
from spngd.train.config import TrainConfig
from spngd.train.data import ImageFiles, load_data, make_loaders
from spngd.train.errors import TrainingStoppedError, UserError
from spngd.train.evaluation import (
    batchnorm_loader,
    evaluate,
    recompute_batchnorm_statistics,
)
from spngd.train.models import build_model
from spngd.train.optimizers import make_optimizer
from spngd.train.runfolder import Checkpoint, RunFolder, SilentRunFolder, all_finite
from spngd.train.schedules import Schedule
from spngd.train.step import Batch, StepResult, groups_of, train_step

ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"
"""How torch's BatchNorm refuses a training batch of one value per channel."""


@dataclass(frozen=True)
class RunResult:
    """What a run produced: its metric records and final figures."""

    records: list[dict[str, Any]]
    steps: int
    val_accuracy: float
    train_time: float


class Trainer:
    """One training run: model, optimizer, data, schedule and the records of what happened.

    Steps follow the schedule until ``round(epochs * train_size / batch_size)`` are done,
    passing over the data as often as needed. Validation runs every ``eval_every_steps``
    steps, at the end of each pass and at the end; each pass ends with an ``epoch`` record
    and a checkpoint. ``time`` in the records counts training only (data loading and steps,
    not validation, checkpoints or plots).

    With ``checkpoint``, the run continues from it (see :meth:`restore`); the records of
    ``run.history`` come first.
    """

    def __init__(
        self,
        config: TrainConfig,
        run: RunFolder | SilentRunFolder,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        torch.manual_seed(config.seed)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.config, self.run = config, run
        self.device = device_of_this_rank(config)
        if self.device.type == "cpu":
            # Subnormal floats make CPU arithmetic many times slower, and training reaches
            # them (docs/performance.md, "Subnormal numbers"): flush them to zero.
            torch.set_flush_denormal(True)
        self.rank, self.world_size = launch.current()
        if launch.launched_world_size() > 1 and self.world_size == 1:
            raise UserError(
                "under torchrun a Trainer needs the process group: run it inside "
                "spngd.distributed.launch.process_group (spngd train does)"
            )
        self.data = load_data(config)
        self.train_loader, self.val_loader = make_loaders(
            self.data, config, self.rank, self.world_size
        )
        if isinstance(self.data.val, ImageFiles):
            # Decode every validation image now, not after the first pass over the training
            # set: a bad file there would otherwise cost a pass (an hour on ImageNet).
            for _ in self.val_loader:
                pass
        self.batchnorm_loader: DataLoader | None = None
        if config.eval_batchnorm == "recomputed":
            self.batchnorm_loader = batchnorm_loader(
                self.data.train_as_val, config.seed, self.val_loader
            )
        self.model = self._new_model()
        # under torchrun: DDP averages gradients; SPNGD spreads the curvature over the ranks
        self.net: nn.Module = (
            DistributedDataParallel(self.model) if self.world_size > 1 else self.model
        )
        self.optimizer = make_optimizer(self.net, config)
        self.schedule = Schedule.from_config(config, len(self.data.train))
        self.mixup = RunningMixup(config.mixup_alpha) if config.mixup_alpha > 0 else None
        self.total_steps = max(1, round(config.epochs / self.schedule.epochs_per_step))
        self.steps_per_pass = len(self.train_loader) // config.accumulate
        self.records: list[dict[str, Any]] = list(run.history)
        self.step, self.passes, self.train_time, self.wall_time = 0, 0, 0.0, 0.0
        self.val_loss, self.val_accuracy = math.nan, math.nan
        self.saved_step: int | None = None
        """Step of the last checkpoint written or resumed from (None: none yet)."""
        if checkpoint is not None:
            self.restore(checkpoint)

    def _new_model(self) -> nn.Module:
        """A freshly initialised model of this run's kind on its device (initialised from the
        global RNG)."""
        config = self.config
        return build_model(
            config.model, self.data.num_classes, config.zero_init_residual, self.data.in_channels
        ).to(self.device)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: model, optimizer state (SP-NGD's curvature included),
        step and pass counters (so the schedule's position), times, last validation, the
        data order, and each rank's RNG and mixup chain when the number of ranks is the same.
        """
        payload = checkpoint.payload
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(
                f"checkpoint {checkpoint.path} does not fit this run ({first_sentence(error)})"
            ) from None
        for group in self.optimizer.param_groups:  # the one setting the schedule leaves alone
            group["weight_decay"] = self.config.weight_decay
        self.step, self.passes = payload["step"], payload["passes"]
        self.train_time, self.wall_time = payload["train_time"], payload["wall_time"]
        self.val_loss, self.val_accuracy = payload["val_loss"], payload["val_accuracy"]
        self.saved_step = self.step
        generator = self.train_loader.generator
        if generator is not None and payload["data_order"] is not None:
            generator.set_state(payload["data_order"])
        ranks = payload["ranks"]
        if len(ranks) == self.world_size:
            torch.set_rng_state(ranks[self.rank]["rng"])
            if self.mixup is not None and ranks[self.rank]["mixup"] is not None:
                self.mixup.previous = tuple(t.to(self.device) for t in ranks[self.rank]["mixup"])
        elif self.rank == 0:
            warnings.warn(
                f"the checkpoint comes from {len(ranks)} rank(s), this run has "
                f"{self.world_size}: augmentation and mixup draw afresh",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.step >= self.total_steps:
            warnings.warn(
                f"the run in {self.config.out} is already complete ({self.step} of "
                f"{self.total_steps} steps); nothing to train (give a larger --epochs to go on)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.log(
            {
                "kind": "resume",
                "step": self.step,
                "epoch": self.schedule.epoch(self.step),
                "checkpoint": checkpoint.path.name,
            }
        )

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, epoch: float) -> Batch:
        """Move a micro-batch to the device; soft targets, label smoothing, running mixup."""
        config = self.config
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        targets = soft_targets(labels, self.data.num_classes, config.label_smoothing)
        if self.mixup is not None and (
            config.mixup_off_epoch is None or epoch < config.mixup_off_epoch
        ):
            return self.mixup(images, targets)
        return images, targets

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.run.log(record)

    def validate(self) -> dict[str, float]:
        """Validation loss and accuracy, with BatchNorm statistics per ``--eval-batchnorm``."""
        if self.batchnorm_loader is not None:
            recompute_batchnorm_statistics(self.model, self.batchnorm_loader, self.device)
        self.val_loss, self.val_accuracy = evaluate(self.model, self.val_loader, self.device)
        return {"val_loss": self.val_loss, "val_accuracy": self.val_accuracy}

    def _warm_up(self) -> None:
        """One untimed training step of a new model of this run's kind, with a new optimizer
        of this run's kind, on a micro-batch of random images, leaving the run as it was
        (its model, optimizer, mixup and RNG): the process's one-time costs for these shapes
        (the convolution kernels' set-up, SP-NGD's first factorisations, the first
        allocations) are then paid outside ``time``, as a benchmark's warm-up iterations
        are. ``spngd compare`` warms up every run it trains in one process, so that each
        optimizer's time counts its steps alone and the first run does not pay the others'
        set-up. One process only: the throwaway model is not wrapped for several ranks."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            example, _ = self.data.train_as_val[0]
            model = self._new_model()
            size = self.train_loader.batch_size
            images = torch.randn(size, *example.shape)
            labels = torch.randint(self.data.num_classes, (size,))
            train_step(
                model,
                make_optimizer(model, self.config),
                [(images, labels)],
                self.config.rescale_weights,
                lambda x, y: (
                    x.to(self.device),
                    soft_targets(y.to(self.device), self.data.num_classes),
                ),
            )

    def fit(self, warm_up: bool = False) -> RunResult:
        """Run the remaining steps; write config, metrics, checkpoints and the plot.
        With ``warm_up``, first one untimed training step of a throwaway model that leaves
        the run as it was (:meth:`_warm_up`).

        Too many non-finite steps in a row, or a model holding NaN or inf at a checkpoint,
        raise :class:`TrainingStoppedError`; the last good checkpoint stays as it was.
        """
        if self.step >= self.total_steps:  # a finished run resumed: nothing to write
            return RunResult(self.records, self.step, self.val_accuracy, self.train_time)
        self.run.write_config(self.config.to_dict())
        progress = self.config.progress and self.rank == 0
        try:
            if warm_up:
                self._warm_up()
            start = time.perf_counter() - self.wall_time
            with (
                tqdm(
                    total=self.total_steps, initial=self.step, unit="step", disable=not progress
                ) as bar,
                existing_objects_left_out_of_gc(),
            ):
                while self.step < self.total_steps:
                    self.fit_pass(bar, start)
        except NonFiniteGradientError as error:
            raise TrainingStoppedError(f"{error} {self._last_good()}") from None
        except ValueError as error:
            if not str(error).startswith(ONE_VALUE_PER_CHANNEL):
                raise
            shape = tuple(map(int, re.findall(r"[0-9]+", str(error).split("input size")[-1])))
            raise UserError(
                f"a BatchNorm layer of {self.config.model} gets one value per channel (an "
                f"input of shape {shape}): a micro-batch of {self.train_loader.batch_size} "
                f"at --image-size {self.config.image_size} is too small for it; raise "
                "--batch-size or --image-size"
            ) from None
        self.run.plot(self.records, run_title(self.config))
        return RunResult(self.records, self.step, self.val_accuracy, self.train_time)

    def fit_pass(self, bar: tqdm, start: float) -> None:
        """One pass over the data, cut short at the run's last step; then its epoch record
        and checkpoint. SP-NGD's stage timers are read as the pass begins, so the record
        counts this pass's seconds only."""
        if hasattr(self.train_loader.sampler, "set_epoch"):
            self.train_loader.sampler.set_epoch(self.passes)  # type: ignore[union-attr]
        self.passes += 1
        results: list[StepResult] = []
        stages = self.stage_seconds()
        tick = time.perf_counter()
        for group in groups_of(self.train_loader, self.config.accumulate):
            stopping.raise_if_lost()
            ends_pass = len(results) + 1 == self.steps_per_pass
            results.append(self.fit_step(group, tick, start, ends_pass))
            bar.update()
            bar.set_postfix(
                loss=f"{results[-1].loss:.3f}",
                acc=f"{results[-1].correct / results[-1].examples:.3f}",
                val_acc=f"{self.val_accuracy:.3f}",
                steps_per_s=f"{self.step / self.train_time:.2f}",
            )
            if ends_pass or self.step == self.total_steps:
                break
            tick = time.perf_counter()
        self.end_pass(results, time.perf_counter() - start, stages)

    def fit_step(
        self,
        group: list[tuple[torch.Tensor, torch.Tensor]],
        tick: float,
        start: float,
        ends_pass: bool,
    ) -> StepResult:
        """One scheduled step on a group of micro-batches; logs its ``step`` record.

        ``tick`` is when fetching this group began (training time counts data loading).
        Validates after the step when it is due or ends a pass or the run.
        """
        values = self.schedule.apply(self.optimizer, self.step)
        epoch = self.schedule.epoch(self.step)
        result = train_step(
            self.net,
            self.optimizer,
            group,
            self.config.rescale_weights,
            lambda images, labels: self.prepare(images, labels, epoch),
        )
        self.step += 1
        self.train_time += time.perf_counter() - tick
        self.wall_time = time.perf_counter() - start
        record = {
            "kind": "step",
            "step": self.step,
            "epoch": self.schedule.epoch(self.step),
            "time": self.train_time,
            "wall_time": self.wall_time,
            "loss": result.loss,
            "accuracy": result.correct / result.examples,
            **values,
        }
        every = self.config.eval_every_steps
        if ends_pass or self.step == self.total_steps or (every and self.step % every == 0):
            record |= self.validate()
        self.log(record)
        return result

    def stage_seconds(self) -> dict[str, float]:
        """SP-NGD's cumulative seconds per stage (:meth:`SPNGD.stage_seconds`); empty for SGD."""
        if isinstance(self.optimizer, SPNGD):
            return self.optimizer.stage_seconds()
        return {}

    def end_pass(
        self, results: list[StepResult], wall_time: float, stages_before: dict[str, float]
    ) -> None:
        """Log the pass's ``epoch`` record and checkpoint, unless the model holds NaN or inf
        (then :class:`TrainingStoppedError`).

        The record carries the seconds the pass's forward and backward passes took and, for
        SP-NGD, its statistics counts and the seconds per stage since ``stages_before`` (the
        snapshot taken when the pass began, so after a resume the counters' state at
        restore), rounded to microseconds, the timers' own resolution.
        """
        self.wall_time = wall_time
        record = {
            "kind": "epoch",
            "step": self.step,
            "epoch": self.schedule.epoch(self.step),
            "time": self.train_time,
            "wall_time": wall_time,
            "train_loss": sum(r.loss for r in results) / len(results),
            "train_accuracy": sum(r.correct for r in results) / sum(r.examples for r in results),
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "skipped_steps": self.optimizer.skipped_steps,
            "forward_backward_seconds": round(sum(r.forward_backward_seconds for r in results), 6),
        }
        if isinstance(self.optimizer, SPNGD):
            record["refresh_counts"] = self.optimizer.refresh_counts()["total"]
            spent = seconds_since(stages_before, self.stage_seconds())
            record["stage_seconds"] = {stage: round(s, 6) for stage, s in spent.items()}
        self.log(record)
        if not all_finite(self.model.state_dict()):
            raise TrainingStoppedError(
                f"the model holds NaN or inf after step {self.step} (in a weight or a "
                "buffer); stopping without a checkpoint of it. "
                f"{self._last_good()}"
            )
        self.run.save_checkpoint(self.checkpoint())
        self.saved_step = self.step

    def checkpoint(self) -> dict[str, Any]:
        """What :meth:`restore` needs; every rank calls this together (SPNGD's state and the
        ranks' RNG states are collected from all ranks)."""
        generator = self.train_loader.generator
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.schedule.epoch(self.step),
            "passes": self.passes,
            "train_time": self.train_time,
            "wall_time": self.wall_time,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "data_order": None if generator is None else generator.get_state(),
            "ranks": self._rank_states(),
            "config": self.config.to_dict(),
        }

    def _rank_states(self) -> list[dict[str, Any]]:
        """Every rank's torch RNG state (augmentation, mixup) and mixup chain, by rank."""
        previous = None if self.mixup is None else self.mixup.previous
        own = {
            "rng": torch.get_rng_state(),
            "mixup": None if previous is None else tuple(t.cpu() for t in previous),
        }
        return launch.gather_all(own)

    def _last_good(self) -> str:
        if self.saved_step is None:
            return "No checkpoint was written yet."
        return f"The last good checkpoint (step {self.saved_step}) is kept in {self.run.path}."


def device_of_this_rank(config: TrainConfig) -> torch.device:
    """The device this process trains on (see :func:`spngd.distributed.launch.rank_device`)."""
    try:
        return launch.rank_device(torch.device(config.device))
    except ValueError as error:
        raise UserError(str(error)) from None


@contextmanager
def existing_objects_left_out_of_gc() -> Iterator[None]:
    """Within the block, Python's cyclic garbage collector skips the objects that exist as
    it begins (``gc.freeze``; released after): the modules imported, the data, model and
    optimizer. A full collection walks every object it tracks, and a training process holds
    several hundred thousand, most of them torch's and matplotlib's: such a collection takes
    over 100 ms, as long as a step, and lands inside one whenever the count of new objects
    calls for it (docs/performance.md, "Time to accuracy"). Skipped, a collection walks
    only what training made since.
    Garbage already in cycles is collected first, so that it is not kept for the run;
    reference counting still frees everything that is not in a cycle. Where the caller has
    frozen objects itself, they stay as they are (unfreezing would release theirs too)."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train(
    config: TrainConfig, run: RunFolder | SilentRunFolder, checkpoint: Checkpoint | None = None
) -> RunResult:
    """Train as ``config`` says into ``run``, continuing from ``checkpoint`` if given (see
    :class:`Trainer`)."""
    return Trainer(config, run, checkpoint).fit()


def run_title(config: TrainConfig) -> str:
    """The title of a run's plot: model, data and batch."""
    return f"{config.model} on {Path(config.data).name}, batch {config.batch_size}"
