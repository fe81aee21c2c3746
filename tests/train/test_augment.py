"""Tensor augmentation: crops, flips, running mixup and label smoothing."""

from __future__ import annotations

import pytest
import torch

from spngd.train.augment import (
    RunningMixup,
    pad_crop,
    random_flip,
    random_resized_crop,
    resize_center_crop,
    soft_targets,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_mixup_first_batch_unmixed_then_mixed_with_the_previous_mixed_batch() -> None:
    mixup = RunningMixup(alpha=1.0)
    batches = [torch.randn(64, 3, 4, 4) for _ in range(3)]
    labels = [torch.randint(0, 10, (64,)) for _ in range(3)]
    first_x, first_t = mixup(batches[0], soft_targets(labels[0], 10))
    assert torch.equal(first_x, batches[0])
    assert torch.equal(first_t, soft_targets(labels[0], 10))  # hard labels
    previous_x, previous_t = first_x, first_t
    for x, y in zip(batches[1:], labels[1:], strict=True):
        targets = soft_targets(y, 10)
        mixed_x, mixed_t = mixup(x, targets)
        assert torch.allclose(mixed_t.sum(dim=1), torch.ones(64))
        # lambda per example, read from the images: x_mixed = lam x + (1 - lam) x_prev.
        lam = ((mixed_x - previous_x) / (x - previous_x)).flatten(1).median(dim=1).values
        assert lam.min() >= 0.5 - 1e-5 and lam.max() <= 1.0 + 1e-5
        assert lam.std() > 0.05  # drawn per example
        expected_t = lam[:, None] * targets + (1 - lam[:, None]) * previous_t
        assert torch.allclose(mixed_t, expected_t, atol=1e-4)
        expected_x = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * previous_x
        assert torch.allclose(mixed_x, expected_x, atol=1e-4)
        current = mixed_t.gather(1, y[:, None]).squeeze(1)
        assert current.min() >= 0.5 - 1e-6  # the current label dominates
        previous_x, previous_t = mixed_x, mixed_t


def test_mixup_restarts_when_the_batch_shape_changes() -> None:
    mixup = RunningMixup(alpha=0.4)
    mixup(torch.randn(8, 3), soft_targets(torch.zeros(8, dtype=torch.long), 4))
    x = torch.randn(5, 3)
    assert torch.equal(mixup(x, soft_targets(torch.ones(5, dtype=torch.long), 4))[0], x)


def test_label_smoothing_rows_sum_to_one() -> None:
    targets = soft_targets(torch.tensor([2, 0]), 5, smoothing=0.1)
    assert torch.allclose(targets.sum(dim=1), torch.ones(2))
    assert targets[0, 2] == pytest.approx(0.9 + 0.02) and targets[0, 1] == pytest.approx(0.02)


def test_pad_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    image = torch.arange(1.0, 1.0 + 2 * 8 * 8).view(2, 8, 8)
    shifts = set()
    for _ in range(40):
        out = pad_crop(image, padding=2)
        assert out.shape == image.shape
        padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
        matches = [
            (top, left)
            for top in range(5)
            for left in range(5)
            if torch.equal(out, padded[:, top : top + 8, left : left + 8])
        ]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 5


def test_flip_mirrors_about_half_the_time() -> None:
    image = torch.randn(3, 4, 5)
    flips = 0
    for _ in range(200):
        out = random_flip(image)
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
        flips += torch.equal(out, image.flip(-1))
    assert 70 < flips < 130


def test_random_resized_crop_size_and_variety() -> None:
    image = torch.rand(3, 40, 60)
    outputs = [random_resized_crop(image, 16) for _ in range(10)]
    assert all(out.shape == (3, 16, 16) for out in outputs)
    assert not torch.allclose(outputs[0], outputs[1])
    assert all(out.min() >= -1e-5 and out.max() <= 1 + 1e-5 for out in outputs)  # no padding


def test_evaluation_view_is_a_centre_crop_of_the_short_side() -> None:
    image = torch.rand(3, 30, 50)
    out = resize_center_crop(image, 21, crop_fraction=0.875)  # short side 24, then 21
    assert out.shape == (3, 21, 21)
    constant = resize_center_crop(torch.full((1, 30, 50), 0.5), 21)
    assert torch.allclose(constant, torch.full_like(constant, 0.5))
