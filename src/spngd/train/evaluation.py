"""Validation: accuracy and loss in eval mode, with BatchNorm statistics that fit the weights.

A BatchNorm layer evaluates with running averages of its batch statistics (momentum 0.1:
roughly the last 10 steps' batches, each taken under the weights of its own step). An
optimizer that moves the weights far in a few steps, as natural gradient does at large batch,
leaves those averages describing older weights, and the network evaluates worse than it is.
``recomputed`` (the default) sets them, before each validation, from a fixed sample of
:data:`BATCHNORM_EXAMPLES` training examples under the validation transform, passed through
the current weights ("precise BN"); ``running`` keeps torch's averages. Neither changes
training: BatchNorm normalises training batches by their own statistics, and the sample is
drawn by its own generator, not from the training order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

BATCHNORM_STATISTICS = ("recomputed", "running")
"""Where validation's BatchNorm statistics come from (see the module docstring)."""

BATCHNORM_EXAMPLES = 2048
"""Training examples (all, when there are fewer) whose statistics ``recomputed`` uses."""


def batchnorm_sample(train_as_val: Dataset, seed: int) -> Subset:
    """The fixed sample of training examples validation's BatchNorm statistics come from:
    :data:`BATCHNORM_EXAMPLES` of them, chosen by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_as_val), generator=generator)  # type: ignore[arg-type]
    return Subset(train_as_val, order[:BATCHNORM_EXAMPLES].tolist())


def batchnorm_loader(train_as_val: Dataset, seed: int, like: DataLoader) -> DataLoader:
    """:func:`batchnorm_sample` in batches, read as ``like`` (the validation loader) reads;
    a last batch of one example is left out (BatchNorm cannot take the statistics of one
    value per channel, and one example would weigh as much as a full batch). Like the
    validation loader it has its own generator, so that reading it leaves the global one,
    which the training augmentation draws from, alone."""
    sample = batchnorm_sample(train_as_val, seed)
    batch_size = like.batch_size or 1
    return DataLoader(
        sample,
        batch_size=batch_size,
        num_workers=like.num_workers,
        pin_memory=like.pin_memory,
        drop_last=len(sample) > 1 and len(sample) % batch_size == 1,
        generator=torch.Generator(),
    )


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> None:
    """Set every BatchNorm layer's running mean and variance to the average of its batch
    statistics over ``loader``'s inputs (a forward in train mode, without gradients),
    momentum as it was."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over ``inputs``
    training = model.training
    model.train()
    try:
        for inputs, _ in loader:
            model(inputs.to(device, non_blocking=True))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(training)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``loader``, in eval mode (with the BatchNorm
    statistics the model holds)."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    model.train()
    return loss / count, correct / count
