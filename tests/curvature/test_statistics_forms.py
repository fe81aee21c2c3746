"""Every form the statistics can take equals its brute-force definition.

The library picks a form per shape (``channel_moment_form``, ``patch_moment_form``,
``gram_form``); each test first asserts that its shape selects the branch under test, then
compares with explicit per-example, per-location sums (``tests/curvature/_bruteforce.py``)
or ``F.unfold`` patches, in float64 with tight tolerances. A few float32 cases check the
oneDNN and BatchNorm kernels themselves (which float64 does not run) against float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spngd.curvature import BatchNormBlock, Conv2dBlock, LinearBlock
from spngd.curvature.batchnorm import moment_form, per_example_moments
from spngd.curvature.conv import (
    GRAM_SUMMATIONS,
    channel_moment_form,
    channel_second_moment,
    gram_summation_form,
    patch_moment_form,
    patch_second_moment,
    second_moment_by_image_gram,
)
from spngd.curvature.linear import gram, gram_form
from tests.curvature._bruteforce import (
    FACTOR_TOL,
    LayerData,
    assert_rel_close,
    bn_unitwise_fisher,
    bn_uv_from_delta,
    bn_xhat,
    conv_factors,
    linear_factors,
)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _channel_reference(t: Tensor, groups: int) -> Tensor:
    """sum over examples i and locations s of t[i,:,s] t[i,:,s]^T per group, by loops."""
    n, channels = t.shape[:2]
    per_group = channels // groups
    flat = t.reshape(n, channels, -1)
    out = t.new_zeros(groups, per_group, per_group)
    for i in range(n):
        for s in range(flat.shape[2]):
            column = flat[i, :, s].view(groups, per_group)
            out += column[:, :, None] * column[:, None, :]
    return out


CHANNEL_ARGS = ("n", "channels", "height", "width", "groups", "last", "form")
CHANNEL_CASES = [
    (3, 72, 4, 4, 1, False, "oneDNN conv"),  # more than 64 channels
    (4, 72, 3, 3, 1, False, "oneDNN conv"),  # the same, an even batch (two parts)
    (3, 8, 5, 5, 1, False, "copy + batched GEMM"),  # small map
    (4, 8, 8, 8, 1, False, "per-example bmm"),  # few channels, 64 locations
    (2, 8, 16, 17, 1, True, "oneDNN conv"),  # channels-last grad, large map
    (2, 8, 16, 16, 1, False, "per-example bmm"),  # few channels, large map
    (2, 12, 16, 17, 3, False, "per-example bmm"),  # groups, large map
    (2, 6, 17, 16, 6, False, "per-example bmm"),  # depthwise, large map
    (4, 12, 16, 16, 3, False, "copy + batched GEMM"),  # groups, smaller map
    (4, 12, 4, 3, 2, True, "copy + batched GEMM"),  # groups, channels-last grad
    (4, 6, 2, 2, 6, False, "copy + batched GEMM"),  # depthwise, smaller map
]


@pytest.mark.parametrize(CHANNEL_ARGS, CHANNEL_CASES)
def test_channel_second_moment_forms(
    n: int, channels: int, height: int, width: int, groups: int, last: bool, form: str
) -> None:
    """The whole batch's moment, and on an even batch each half's from one call."""
    t = _randn(n, channels, height, width)
    if last:
        t = t.contiguous(memory_format=torch.channels_last)
    assert channel_moment_form(t, groups) == form
    per_group = channels // groups
    for parts in (1, 2) if n % 2 == 0 else (1,):
        moments = channel_second_moment(t, groups, parts)
        assert moments.shape == (parts, groups, per_group, per_group)
        for moment, part in zip(moments, t.split(n // parts), strict=True):
            torch.testing.assert_close(
                moment, _channel_reference(part, groups), rtol=1e-12, atol=1e-12
            )


def test_channel_second_moment_rejects_unequal_parts() -> None:
    with pytest.raises(ValueError, match="3 examples do not split into 2 equal parts"):
        channel_second_moment(_randn(3, 4, 2, 2), 1, parts=2)


@pytest.mark.parametrize(CHANNEL_ARGS, CHANNEL_CASES)
def test_conv_g_factor_forms_match_bruteforce(
    n: int, channels: int, height: int, width: int, groups: int, last: bool, form: str
) -> None:
    """G of a block whose output gradient has each shape equals the explicit KFC loops."""
    conv = nn.Conv2d(groups * 2, channels, 1, groups=groups).double()
    x = _randn(n, groups * 2, height, width, seed=1)
    grad_output = _randn(n, channels, height, width, seed=2)
    if last:
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    assert channel_moment_form(grad_output, groups) == form
    _, expected = conv_factors(conv, LayerData(a=x, g=n * grad_output))
    block = Conv2dBlock("conv", conv)
    assert_rel_close(block.g_factor(grad_output, n), expected, FACTOR_TOL, f"G ({form})")


def test_channel_forms_in_float32_stay_accurate() -> None:
    """The oneDNN and BLAS kernels (float32 only) agree with float64 to ~1e-6."""
    for n, channels, size, groups in ((8, 96, 8, 1), (4, 16, 32, 1), (16, 32, 4, 8)):
        t = _randn(n, channels, size, size, seed=3, dtype=torch.float32)
        expected = channel_second_moment(t.double(), groups)[0]
        got = channel_second_moment(t, groups)[0].double()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def _unfold_second_moment(
    x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], groups: int,
) -> Tensor:  # fmt: skip
    n, channels = x.shape[:2]
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    patches = patches.view(n, groups, channels // groups * kernel[0] * kernel[1], -1)
    return torch.einsum("ngil,ngjl->gij", patches, patches)


# (C, H, W, kernel, stride, padding, dilation, groups, expected form)
PATCH_CASES = [
    (5, 6, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, "channel moment"),
    (6, 7, 6, (1, 1), (2, 2), (0, 0), (1, 1), 3, "channel moment"),
    (72, 5, 5, (1, 1), (2, 1), (0, 0), (1, 1), 1, "channel moment"),
    (8, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1, "shifts, channels-last"),
    (8, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, "image Gram"),
    (8, 4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "shifts, channels-last"),  # borders: half
    (8, 8, 9, (3, 3), (1, 1), (2, 2), (2, 2), 1, "shifts, channels-last"),
    (64, 4, 4, (1, 1), (1, 1), (1, 1), (1, 1), 1, "shifts, channels-last"),  # padded 1x1
    (256, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "shifts, channels-last"),
    (4, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1), 2, "shifts, channels-last"),
    (8, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, "image Gram"),
    (64, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1, "image Gram"),
    (5, 3, 3, (3, 3), (2, 2), (1, 1), (1, 1), 1, "image Gram"),
    (4, 3, 2, (3, 2), (1, 2), (2, 1), (2, 1), 1, "image Gram"),
    (2, 3, 3, (3, 3), (1, 1), (0, 0), (1, 1), 1, "image Gram"),  # one output position
    (64, 1, 10, (1, 3), (1, 1), (0, 1), (1, 1), 1, "image Gram"),  # a Conv1d layer
    (32, 11, 11, (7, 7), (2, 2), (3, 3), (1, 1), 1, "patches, oneDNN row blocks"),  # gathers
    (512, 3, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, "patches, oneDNN row blocks"),  # C H W > 4096
    (256, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, "patches, oneDNN row blocks"),
    (8, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, "patches, oneDNN row blocks"),
    (3, 11, 10, (7, 7), (2, 2), (3, 3), (1, 1), 1, "image Gram"),
    (3, 40, 40, (7, 7), (2, 2), (3, 3), (1, 1), 1, "patches, oneDNN row blocks"),
    (12, 9, 9, (3, 2), (3, 2), (0, 1), (2, 1), 1, "patches, oneDNN row blocks"),
    (24, 7, 9, (1, 3), (2, 2), (0, 1), (1, 1), 1, "patches, oneDNN row blocks"),
    (3, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "shifts, channels-last"),
    (1, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "image Gram"),
    (1, 13, 13, (3, 3), (1, 1), (1, 1), (1, 1), 1, "patches, one oneDNN product"),
    (3, 4, 4, (1, 1), (1, 1), (1, 1), (1, 1), 1, "patches, one oneDNN product"),  # padded 1x1
    (7, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, "patches, one oneDNN product"),
    (2, 5, 5, (3, 3), (2, 2), (1, 1), (1, 1), 1, "image Gram"),
    (2, 11, 11, (3, 3), (2, 2), (1, 1), (1, 1), 1, "patches, one oneDNN product"),
    (4, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2, "patches, batched BLAS"),
    (4, 8, 3, (3, 3), (1, 1), (1, 1), (1, 1), 4, "patches, batched BLAS"),
    (4, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), 2, "patches, batched BLAS"),
    (4, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1), 4, "patches, batched BLAS"),
]


@pytest.mark.parametrize(
    ("channels", "height", "width", "kernel", "stride", "padding", "dilation", "groups", "form"),
    PATCH_CASES,
)
def test_patch_second_moment_forms_equal_unfold(
    channels: int, height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int], dilation: tuple[int, int], groups: int, form: str,
) -> None:  # fmt: skip
    shape = (channels, height, width)
    assert patch_moment_form(shape, kernel, stride, padding, dilation, groups) == form
    x = _randn(3, channels, height, width, seed=height * width)
    expected = _unfold_second_moment(x, kernel, stride, padding, dilation, groups)
    got = patch_second_moment(x, kernel, stride, padding, dilation, groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# the image-Gram cases whose count matrix, (kh kw)^2 (H W + 1)^2 entries, stays small when
# forced (it is cached per geometry)
GRAM_CASES = [
    case
    for case in PATCH_CASES
    if case[-1] == "image Gram" and (case[3][0] * case[3][1] * (case[1] * case[2] + 1)) ** 2 < 2**20
]


@pytest.mark.parametrize("summation", GRAM_SUMMATIONS)
@pytest.mark.parametrize(
    ("channels", "height", "width", "kernel", "stride", "padding", "dilation", "groups", "form"),
    GRAM_CASES,
)
def test_image_gram_summations_equal_unfold(
    channels: int, height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int], dilation: tuple[int, int], groups: int, form: str, summation: str,
) -> None:  # fmt: skip
    """Both ways of summing the image Gram over output positions, whichever the rule picks;
    an unknown way is an error."""
    x = _randn(3, channels, height, width, seed=height * width + 1)
    expected = _unfold_second_moment(x, kernel, stride, padding, dilation, groups)
    got = second_moment_by_image_gram(x, kernel, stride, padding, dilation, summation)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="summation must be one of"):
        second_moment_by_image_gram(x, kernel, stride, padding, dilation, "sum")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "stride", "padding", "summation"),
    [
        ((2, 2), (1, 1), (1, 1), "count matrix"),  # 25 position pairs / 4 output positions
        ((4, 4), (1, 1), (1, 1), "count matrix"),  # 289 / 16
        ((4, 4), (2, 2), (1, 1), "gather"),  # 289 / 4
        ((8, 8), (1, 1), (1, 1), "gather"),  # 4225 / 64
    ],
)
def test_gram_summation_form(
    size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], summation: str
) -> None:
    assert gram_summation_form(size, (3, 3), stride, padding, (1, 1)) == summation


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    ("channels", "height", "width", "kernel", "stride", "padding", "dilation", "groups", "form"),
    [case for case in PATCH_CASES if case[0] * case[1] * case[2] < 4096],  # loops stay short
)
def test_conv_a_factor_forms_match_bruteforce(
    channels: int, height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int], dilation: tuple[int, int], groups: int, form: str, bias: bool,
) -> None:  # fmt: skip
    """A of a block (bias row and column included) equals the explicit KFC loops."""
    shape = (channels, height, width)
    assert patch_moment_form(shape, kernel, stride, padding, dilation, groups) == form
    conv = nn.Conv2d(
        channels, groups, kernel, stride, padding, dilation, groups=groups, bias=bias
    ).double()
    x = _randn(2, channels, height, width, seed=7)
    grad_output = torch.zeros_like(conv(x))
    expected, _ = conv_factors(conv, LayerData(a=x, g=grad_output))
    block = Conv2dBlock("conv", conv)
    assert_rel_close(block.a_factor(x), expected, FACTOR_TOL, f"A ({form})")


def test_patch_forms_in_float32_stay_accurate() -> None:
    """The oneDNN row-block products, the channels-last shifts and the image Gram, float32
    against float64."""
    x = torch.relu(_randn(16, 8, 12, 12, seed=4, dtype=torch.float32)) + 1.0
    for kernel, stride, padding, groups in (
        ((3, 3), (2, 2), (1, 1), 1),
        ((3, 3), (1, 1), (1, 1), 1),
        ((1, 1), (2, 2), (0, 0), 1),
    ):
        expected = _unfold_second_moment(x.double(), kernel, stride, padding, (1, 1), groups)
        got = patch_second_moment(x, kernel, stride, padding, (1, 1), groups).double()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    small = torch.relu(_randn(64, 16, 2, 3, seed=5, dtype=torch.float32)) + 1.0
    assert patch_moment_form((16, 2, 3), (3, 3), (1, 1), (1, 1), (1, 1), 1) == "image Gram"
    expected = _unfold_second_moment(small.double(), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    got = patch_second_moment(small, (3, 3), (1, 1), (1, 1), (1, 1), 1).double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


# (rows, features, expected gram form); A adds a bias column when rows <= features
LINEAR_CASES = [
    (1100, 128, "oneDNN"),  # rows > features: bordered A
    (256, 256, "oneDNN"),  # rows <= features: augmented A
    (7, 40, "BLAS"),  # few rows of many features
    (300, 20, "BLAS"),  # small product
]


@pytest.mark.parametrize(("count", "features", "form"), LINEAR_CASES)
def test_gram_forms(count: int, features: int, form: str) -> None:
    assert gram_form(count, features) == form
    rows = _randn(count, features, seed=5)
    torch.testing.assert_close(gram(rows, 0.5), 0.5 * rows.T @ rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("count", "features", "form"), LINEAR_CASES)
def test_linear_factors_forms_match_bruteforce(count: int, features: int, form: str) -> None:
    """A (bias augmented or bordered) and G of Linear(features, features) vs explicit loops."""
    linear = nn.Linear(features, features).double()
    data = LayerData(a=_randn(count, features, seed=6), g=_randn(count, features, seed=7))
    expected_a, expected_g = linear_factors(data, bias=True)
    block = LinearBlock("fc", linear)
    assert gram_form(count, features + int(count <= features)) == form
    assert_rel_close(block.a_factor(data.a)[0], expected_a, FACTOR_TOL, f"A ({form})")
    got_g = block.g_factor(data.g / count, count)[0]  # g = n * grad_output
    assert_rel_close(got_g, expected_g, FACTOR_TOL, f"G ({form})")


def test_gram_in_float32_stays_accurate() -> None:
    rows = _randn(4096, 256, seed=8, dtype=torch.float32)
    assert gram_form(*rows.shape) == "oneDNN"
    expected = rows.double().T @ rows.double()
    got = gram(rows).double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6


BN_CASES = [
    ((6, 3), "centred dot products"),
    ((6, 3, 5), "centred dot products"),
    ((5, 4, 3, 3), "centred dot products"),
    ((4, 3, 17), "BatchNorm backward kernel"),
    ((5, 4, 4, 5), "BatchNorm backward kernel"),
]


@pytest.mark.parametrize(("shape", "form"), BN_CASES, ids=[str(s) for s, _ in BN_CASES])
def test_bn_per_example_moments_match_bruteforce(shape: tuple[int, ...], form: str) -> None:
    """u = sum_t delta x_hat and v = sum_t delta by each form, with x_hat's batch mean and
    inverse std computed or given, and the block's F."""
    locations = shape[2] * (shape[3] if len(shape) > 3 else 1) if len(shape) > 2 else 1
    assert moment_form(locations) == form
    x = _randn(*shape, seed=9) * 2.0 + 3.0
    delta = _randn(*shape, seed=10)
    bn = nn.BatchNorm1d(shape[1], eps=1e-3) if len(shape) < 4 else nn.BatchNorm2d(shape[1])
    u, v = bn_uv_from_delta(bn_xhat(bn, x), delta)
    n, channels = shape[:2]
    got_u, got_v = per_example_moments(
        x.reshape(n, channels, -1), delta.reshape(n, channels, -1), bn.eps
    )
    torch.testing.assert_close(got_u, u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_v, v, rtol=1e-12, atol=1e-12)
    flat = x.reshape(n, channels, -1)
    mean = flat.mean(dim=(0, 2))
    invstd = torch.rsqrt(flat.var(dim=(0, 2), correction=0) + bn.eps)
    given_u, given_v = per_example_moments(
        flat, delta.reshape(n, channels, -1), bn.eps, (mean, invstd)
    )
    torch.testing.assert_close(given_u, u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(given_v, v, rtol=1e-12, atol=1e-12)
    block = BatchNormBlock("bn", bn.double(), 16.0)
    expected = bn_unitwise_fisher(u, v)
    assert_rel_close(block.compute_statistic(0, x, delta / n), expected, FACTOR_TOL, "F")


@pytest.mark.parametrize("size", [2, 6], ids=["dot-products", "kernel"])
@pytest.mark.parametrize("mean", [0.0, 3.0, 30.0])
def test_bn_fisher_in_float32_with_offset_inputs(mean: float, size: int) -> None:
    """Inputs far from zero mean lose nothing to cancellation: float32 within 1e-5."""
    generator = torch.Generator().manual_seed(11)
    shape = (32, 8, size, size)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2.0 + mean
    x = x + torch.randn(1, 8, 1, 1, generator=generator, dtype=torch.float64)
    grad_output = torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-3
    block = BatchNormBlock("bn", nn.BatchNorm2d(8), 16.0)
    expected = block.compute_statistic(0, x, grad_output)
    got = block.compute_statistic(0, x.float(), grad_output.float()).double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
