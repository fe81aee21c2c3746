"""One training step, shared by ``spngd train``, ``spngd compare``, the benchmarks and the
tests: micro-batches through forward and backward, the optimizer's step, and what a skipped
step must leave untouched."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spngd.optimizer import SPNGD
from spngd.train.optimizers import GuardedSGD, rescale_weights

Batch = tuple[torch.Tensor, torch.Tensor]
"""Images and soft targets (one probability row per image)."""


@dataclass(frozen=True)
class StepResult:
    """Mean training loss of one step, its correctly classified examples, and the seconds
    its forward and backward passes took (SP-NGD's statistics, computed in backward hooks,
    included)."""

    loss: float
    correct: int
    examples: int
    forward_backward_seconds: float


def train_step(
    model: nn.Module,
    optimizer: SPNGD | GuardedSGD,
    micro_batches: Sequence[Batch],
    rescale: bool,
    prepare: Callable[[torch.Tensor, torch.Tensor], Batch] = lambda x, y: (x, y),
) -> StepResult:
    """One optimizer step on ``K = len(micro_batches)`` micro-batches.

    Each micro-batch is passed through ``prepare`` (to the device, targets) just before
    its forward, so one at a time is on the device. Its mean loss is divided by K before
    its backward, so gradients (and SPNGD's statistics, with ``accumulation_steps=K``, each
    micro-batch's from its own sample of ``statistics_examples``, ``A`` of ``a_examples`` and
    ``a_patches``)
    accumulate to those of the whole batch; a DistributedDataParallel model averages them
    across ranks once, in the last micro-batch's backward (``no_sync`` before). Accuracy
    counts the argmax of the target, the current label under mixup. The
    forward and backward passes are timed up to the last micro-batch's loss and accuracy
    reads, which wait for the device, so the figure holds on a GPU too. When the optimizer
    skips the step (NaN or inf gradients), the model's buffers (BatchNorm running
    statistics) are put back and the weights are not rescaled, so a non-finite batch leaves
    no trace in the model.
    """
    buffers = [buffer.clone() for buffer in model.buffers()]
    optimizer.zero_grad()
    sample_fisher = isinstance(optimizer, SPNGD) and optimizer.preconditioner.fisher == "mc"
    loss_sum, correct, examples = 0.0, 0, 0
    start = time.perf_counter()
    last = len(micro_batches) - 1
    for index, (inputs, labels) in enumerate(micro_batches):
        images, targets = prepare(inputs, labels)
        accumulating = isinstance(model, DistributedDataParallel) and index < last
        with model.no_sync() if accumulating else contextlib.nullcontext():  # type: ignore[operator]
            logits = model(images)
            if sample_fisher:
                optimizer.sample_fisher(logits)
            loss = F.cross_entropy(logits, targets)
            (loss / len(micro_batches)).backward()
        loss_sum += loss.item()
        correct += int((logits.argmax(1) == targets.argmax(1)).sum())
        examples += len(images)
    forward_backward = time.perf_counter() - start
    optimizer.step()
    if optimizer.last_step_skipped:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
    elif rescale:
        rescale_weights(model)
    return StepResult(loss_sum / len(micro_batches), correct, examples, forward_backward)


def groups_of(loader: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` items; a shorter last group is dropped."""
    group: list[Any] = []
    for item in loader:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
