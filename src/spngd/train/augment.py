"""Augmentation on tensors: crops and flips per image, running mixup and label smoothing per batch.

Per-image transforms take a float ``(C, H, W)`` tensor and draw from torch's global RNG, which
DataLoader seeds per worker, so runs repeat for a fixed seed. Batch transforms run in the
training loop, on the batch each process trains on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor], torch.Tensor]


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a ``(C, H, W)`` image (antialiased when shrinking)."""
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(
        image.unsqueeze(0), size=(height, width), mode="bilinear", antialias=True
    ).squeeze(0)


def random_resized_crop(
    image: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """ImageNet-style crop: a random area fraction and aspect ratio, resized to ``size``.

    Ten tries to fit the drawn box in the image, then the largest centred box within the
    ratio range (the usual fallback of Inception-style pipelines).
    """
    height, width = image.shape[-2:]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return resize(image[:, top : top + h, left : left + w], size, size)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return resize(image[:, top : top + h, left : left + w], size, size)


def pad_crop(image: torch.Tensor, padding: int) -> torch.Tensor:
    """CIFAR-style crop: zero-pad each side by ``padding``, crop back to the original size."""
    height, width = image.shape[-2:]
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
    return padded[:, top : top + height, left : left + width]


def random_flip(image: torch.Tensor) -> torch.Tensor:
    """Mirror left-right with probability 1/2."""
    return image.flip(-1) if torch.rand(1).item() < 0.5 else image


def resize_center_crop(
    image: torch.Tensor, size: int, crop_fraction: float = 0.875
) -> torch.Tensor:
    """Evaluation view: short side to ``size / crop_fraction``, then the centred ``size`` square."""
    height, width = image.shape[-2:]
    short = round(size / crop_fraction)
    scale = short / min(height, width)
    image = resize(image, max(size, round(height * scale)), max(size, round(width * scale)))
    height, width = image.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot rows, with ``smoothing`` of the mass spread evenly over all classes."""
    targets = F.one_hot(labels, num_classes).float()
    return targets * (1.0 - smoothing) + smoothing / num_classes


class RunningMixup:
    """The authors' running mixup (their released training script).

    Each example is mixed with the same row of the *previous mixed* batch:
    ``x = lam x + (1 - lam) x_prev``, ``t = lam t + (1 - lam) t_prev`` with
    ``lam ~ Beta(alpha, alpha)`` per example, folded to ``max(lam, 1 - lam)`` so the current
    example always dominates. The first batch (and any batch whose shape differs from the
    previous one) passes unmixed and starts a new chain.
    """

    def __init__(self, alpha: float) -> None:
        if not alpha > 0.0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.beta = torch.distributions.Beta(alpha, alpha)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch of images and soft targets with the previous mixed batch."""
        previous = self.previous
        if previous is not None and previous[0].shape == images.shape:
            lam = self.beta.sample((images.shape[0],)).to(images.device)
            lam = torch.maximum(lam, 1.0 - lam)
            images = torch.lerp(previous[0], images, lam.view(-1, *[1] * (images.dim() - 1)))
            targets = torch.lerp(previous[1], targets, lam.view(-1, 1))
        self.previous = (images.detach(), targets.detach())
        return images, targets
