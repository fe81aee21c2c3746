"""ResNet models in plain PyTorch (no torchvision) for the SP-NGD experiments.

Two families share the same residual block classes:

* ImageNet-style ResNet-18/34/50 (He et al. 2016, torchvision v1.5 layout: 7x7 stem, max-pool,
  four stages, stride of a bottleneck on its 3x3 conv). Parameter counts match torchvision.
* CIFAR-style ResNet-20/32/56 (He et al. 2016, sec. 4.2: 3x3 stem, three stages of 16/32/64
  channels), using 1x1 conv + BatchNorm projection shortcuts when the shape changes (option B).
* Their 1-D versions for sequences ``(C, L)`` such as mnist1d's: ``resnet8-1d`` (one block
  per stage) and ``resnet20-1d``, with Conv1d and BatchNorm1d in place of the 2-D layers.

The residual sum is written as ``out += shortcut`` followed by ``nn.ReLU(inplace=True)`` on
purpose: the optimizer's curvature hooks must cope with in-place operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResidualBlock",
    "build_model",
    "spatial_dims",
]


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dims: int = 2
) -> nn.Conv1d | nn.Conv2d:
    """Bias-free 'same'-padded convolution (the following BatchNorm provides the bias) over
    ``dims`` (1 or 2) spatial dimensions."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    padding = kernel_size // 2
    return conv(in_channels, out_channels, kernel_size, stride, padding=padding, bias=False)


def _norm(channels: int, dims: int = 2) -> nn.BatchNorm1d | nn.BatchNorm2d:
    return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)


class ResidualBlock(nn.Module):
    """Computes ``relu(residual(x) + shortcut(x))``; subclasses define the residual branch.

    The shortcut is the identity when the shape is unchanged, otherwise a strided 1x1 conv
    followed by BatchNorm (projection shortcut, option B).
    """

    expansion: ClassVar[int] = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, dims: int = 2) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.residual = self._residual_branch(in_channels, width, stride, dims)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                _conv(in_channels, out_channels, 1, stride, dims), _norm(out_channels, dims)
            )
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _residual_branch(in_channels: int, width: int, stride: int, dims: int) -> nn.Sequential:
        """Build the residual branch; it must end with a BatchNorm (see ``last_bn``)."""
        raise NotImplementedError

    @property
    def last_bn(self) -> nn.BatchNorm1d | nn.BatchNorm2d:
        """Final BatchNorm of the residual branch (zeroed by ``zero_init_residual``)."""
        return self.residual[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        out = self.residual(x)
        out += shortcut
        return self.relu(out)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets); stride on the first conv."""

    expansion: ClassVar[int] = 1

    @staticmethod
    def _residual_branch(in_channels: int, width: int, stride: int, dims: int) -> nn.Sequential:
        return nn.Sequential(
            _conv(in_channels, width, 3, stride, dims),
            _norm(width, dims),
            nn.ReLU(inplace=True),
            _conv(width, width, 3, 1, dims),
            _norm(width, dims),
        )


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50); stride on the 3x3 conv as in v1.5."""

    expansion: ClassVar[int] = 4

    @staticmethod
    def _residual_branch(in_channels: int, width: int, stride: int, dims: int) -> nn.Sequential:
        out_channels = width * Bottleneck.expansion
        return nn.Sequential(
            _conv(in_channels, width, 1, 1, dims),
            _norm(width, dims),
            nn.ReLU(inplace=True),
            _conv(width, width, 3, stride, dims),
            _norm(width, dims),
            nn.ReLU(inplace=True),
            _conv(width, out_channels, 1, 1, dims),
            _norm(out_channels, dims),
        )


class ResNet(nn.Module):
    """Stem, stages of residual blocks, global average pool and a linear classifier.

    The first stage keeps the resolution, every later stage halves it in its first block. The
    ImageNet stem is a stride-2 7x7 conv plus a stride-2 max-pool; the CIFAR stem is a 3x3 conv.
    The adaptive pool lets both families accept any input size large enough for their strides.
    ``dims`` is the number of spatial dimensions: 2 for images, 1 for sequences.
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        imagenet_stem: bool,
        num_classes: int,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        dims: int = 2,
    ) -> None:
        super().__init__()
        kernel_size, stride = (7, 2) if imagenet_stem else (3, 1)
        stem: list[nn.Module] = [
            _conv(in_channels, widths[0], kernel_size, stride, dims),
            _norm(widths[0], dims),
            nn.ReLU(inplace=True),
        ]
        if imagenet_stem:
            pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
            stem.append(pool(kernel_size=3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)

        stages: list[nn.Module] = []
        channels = widths[0]
        for index, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks: list[nn.Module] = []
            for position in range(depth):
                first_stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(channels, width, first_stride, dims))
                channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """He-normal convs, unit/zero BatchNorm; the Linear layer keeps PyTorch's default.

        With ``zero_init_residual`` every block starts as ``relu(shortcut(x))``, which is known
        to help large-batch training (Goyal et al. 2017).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv1d | nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, ResidualBlock):
                    nn.init.zeros_(module.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(features, 1))


@dataclass(frozen=True)
class _Spec:
    """Architecture of one named model."""

    block: type[ResidualBlock]
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    imagenet_stem: bool
    dims: int = 2


_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)

_SPECS: dict[str, _Spec] = {
    "resnet18": _Spec(BasicBlock, (2, 2, 2, 2), _IMAGENET_WIDTHS, imagenet_stem=True),
    "resnet34": _Spec(BasicBlock, (3, 4, 6, 3), _IMAGENET_WIDTHS, imagenet_stem=True),
    "resnet50": _Spec(Bottleneck, (3, 4, 6, 3), _IMAGENET_WIDTHS, imagenet_stem=True),
    "resnet20": _Spec(BasicBlock, (3, 3, 3), _CIFAR_WIDTHS, imagenet_stem=False),
    "resnet32": _Spec(BasicBlock, (5, 5, 5), _CIFAR_WIDTHS, imagenet_stem=False),
    "resnet56": _Spec(BasicBlock, (9, 9, 9), _CIFAR_WIDTHS, imagenet_stem=False),
    "resnet8-1d": _Spec(BasicBlock, (1, 1, 1), _CIFAR_WIDTHS, imagenet_stem=False, dims=1),
    "resnet20-1d": _Spec(BasicBlock, (3, 3, 3), _CIFAR_WIDTHS, imagenet_stem=False, dims=1),
}

MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)
"""Names accepted by :func:`build_model`."""


def spatial_dims(name: str) -> int:
    """What the named model reads: 2 for images ``(C, H, W)``, 1 for sequences ``(C, L)``."""
    return _SPECS[name].dims


def build_model(
    name: str, num_classes: int, zero_init_residual: bool = False, in_channels: int = 3
) -> nn.Module:
    """Build a freshly initialised ResNet by name (one of :data:`MODEL_NAMES`).

    Raises:
        ValueError: if ``name`` is not a known model.
    """
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return ResNet(
        spec.block,
        spec.depths,
        spec.widths,
        spec.imagenet_stem,
        num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
        dims=spec.dims,
    )
