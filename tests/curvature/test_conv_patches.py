"""The two ways of computing a convolution's A factor agree with im2col by F.unfold.

The shift method (stride 1) builds A from shifted self-correlations minus exact border
corrections; the patch method handles everything else. Both must equal the plain
``sum over examples and locations of patch patch^T``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd.curvature.conv import (
    Conv2dBlock,
    patch_first_moment,
    second_moment_by_patches,
    second_moment_by_shifts,
)

GEOMETRIES = [
    # (height, width, kernel, padding, dilation, groups, channels)
    (7, 9, (3, 3), (1, 1), (1, 1), 1, 4),
    (8, 8, (3, 3), (1, 1), (2, 2), 2, 4),
    (10, 6, (3, 2), (2, 0), (1, 2), 4, 4),
    (9, 9, (5, 5), (2, 2), (1, 1), 1, 3),
    (6, 7, (3, 3), (0, 0), (1, 1), 1, 2),
    (12, 12, (3, 3), (1, 1), (1, 1), 3, 3),
    (5, 5, (1, 1), (0, 0), (1, 1), 1, 3),
    (5, 11, (3, 3), (2, 2), (2, 1), 1, 2),
    (4, 6, (3, 5), (3, 1), (1, 1), 2, 2),
    (7, 9, (3, 5), (1, 2), (1, 1), 1, 4),
]


def _unfold_moments(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, channels = x.shape[:2]
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    patches = patches.view(n, groups, channels // groups * kernel[0] * kernel[1], -1)
    return torch.einsum("ngil,ngjl->gij", patches, patches), patches.sum((0, 3))


@pytest.mark.parametrize(
    ("height", "width", "kernel", "padding", "dilation", "groups", "channels"), GEOMETRIES
)
def test_shift_and_patch_methods_equal_unfold(
    height: int,
    width: int,
    kernel: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    channels: int,
) -> None:
    x = torch.randn(
        3,
        channels,
        height,
        width,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(height * width),
    )
    second, first = _unfold_moments(x, kernel, (1, 1), padding, dilation, groups)
    torch.testing.assert_close(
        second_moment_by_shifts(x, kernel, padding, dilation, groups), second
    )
    torch.testing.assert_close(
        second_moment_by_patches(x, kernel, (1, 1), padding, dilation, groups), second
    )
    torch.testing.assert_close(
        patch_first_moment(x, kernel, (1, 1), padding, dilation, groups)[0], first
    )


@pytest.mark.parametrize("stride", [(2, 2), (2, 1), (3, 2)])
def test_strided_patches_equal_unfold(stride: tuple[int, int]) -> None:
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    second, first = _unfold_moments(x, (3, 3), stride, (1, 1), (1, 1), 2)
    torch.testing.assert_close(
        second_moment_by_patches(x, (3, 3), stride, (1, 1), (1, 1), 2), second
    )
    torch.testing.assert_close(patch_first_moment(x, (3, 3), stride, (1, 1), (1, 1), 2)[0], first)


def test_shift_method_in_float32_stays_accurate() -> None:
    """Border corrections subtract from the full correlation: no harmful cancellation."""
    x = torch.randn(16, 8, 32, 32, generator=torch.Generator().manual_seed(2)) + 3.0
    second, _ = _unfold_moments(x.double(), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    got = second_moment_by_shifts(x, (3, 3), (1, 1), (1, 1), 1).double()
    assert ((got - second).norm() / second.norm()).item() < 1e-5


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
        nn.Conv2d(3, 4, (2, 3), padding="same", dilation=2),
        nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular", groups=3),
    ],
    ids=["reflect-same", "same-even-kernel", "circular-grouped"],
)
def test_non_zero_or_asymmetric_padding_is_applied_explicitly(conv: nn.Conv2d) -> None:
    conv = conv.double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    block = Conv2dBlock("conv", conv)
    padded = F.pad(
        x,
        conv._reversed_padding_repeated_twice,
        mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode,
    )
    second, first = _unfold_moments(
        padded, conv.kernel_size, conv.stride, (0, 0), conv.dilation, conv.groups
    )
    locations = conv(x).shape[2] * conv(x).shape[3]
    expected = torch.cat((second, first[:, :, None]), 2)
    corner = torch.cat(
        (first, torch.full((conv.groups, 1), 2.0 * locations, dtype=torch.float64)), 1
    )
    expected = torch.cat((expected, corner[:, None, :]), 1) / 2
    torch.testing.assert_close(block.a_factor(x), expected)
