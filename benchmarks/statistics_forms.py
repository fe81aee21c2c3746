"""Time every exact form of each curvature statistic at the layer shapes of ResNets.

Statistics: a convolution's ``G`` (output-gradient second moment) and ``A`` (patch second
moment), BatchNorm's unit-wise ``F``, and a Linear layer's ``A`` and ``G``. Shapes are the
distinct layers of ResNet-20 on 32x32 images at batch 128, ResNet-20 on 8x8 digits at batch
1024 and ResNet-50 on 224x224 images at batch 32 (read off the models on the meta device),
plus grouped variants of their 3x3 convolutions (4 channels per group, and depthwise).

For each statistic and shape, every candidate form is checked against a float64 reference
(largest relative error printed) and timed: candidates interleaved round by round, the
median of ``--repeats`` rounds, 2 threads, glibc's malloc thresholds pinned at 1 GiB (the
script re-executes itself with them set). Printed per shape: ms per candidate (``*`` the
fastest), the form the library picks, and the library's statistic against the baseline
forms kept in this script (per-example products for ``G``, one BLAS product of all patches
where the shift method is not used, centring for ``F``, BLAS plus bordering for Linear).
The totals weight each shape by how often it occurs in its model.

    python benchmarks/statistics_forms.py [--quick] [--models resnet20 digits resnet50]
        [--statistics conv-G conv-A bn-F linear-A linear-G] [--repeats 5]

``--quick`` (under a minute) times ResNet-20 at both batch sizes only, with shorter rounds.
On a machine shared with other jobs, run it at real-time priority (``chrt -f 10 python
benchmarks/statistics_forms.py ...``): otherwise OpenMP threads waiting for a descheduled
sibling dominate the times (a 0.2 ms product then takes 30 ms).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from pinned_malloc import pin_malloc
from spngd.curvature import BatchNormBlock, Conv2dBlock, LinearBlock
from spngd.curvature.batchnorm import (
    moment_form,
    moments_by_dot_products,
    moments_by_kernel,
)
from spngd.curvature.conv import (
    GRAM_SUMMATIONS,
    IMAGE_GRAM_MAX_FEATURES,
    border_rows,
    channel_moment_form,
    gram_summation_form,
    output_size,
    patch_moment_form,
    second_moment_by_image_gram,
    second_moment_by_patches,
    second_moment_by_shifts,
)
from spngd.curvature.kronecker import append_bias_moments
from spngd.curvature.linear import gram_form, onednn_product
from spngd.train.models import build_model

EPS = 1e-5
MODELS = {
    # name: (model, batch, image size, input channels, classes)
    "resnet20": ("resnet20", 128, 32, 3, 10),
    "digits": ("resnet20", 1024, 8, 1, 10),
    "resnet50": ("resnet50", 32, 224, 3, 1000),
}
STATISTICS = ("conv-G", "conv-A", "bn-F", "linear-A", "linear-G")
CHANNELS_LAST_GRAD = "(oneDNN conv on a channels-last grad)"
"""Not a form for the NCHW gradient: what the library does when the gradient is
channels-last, printed for reference and left out of the fastest."""

Form = Callable[[], torch.Tensor]


# -- layer shapes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvShape:
    x: tuple[int, ...]
    out: tuple[int, ...]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int


@dataclass
class Layers:
    """Distinct layer shapes of one model, each with how often it occurs."""

    conv: dict[ConvShape, int] = field(default_factory=dict)
    bn: dict[tuple[int, ...], int] = field(default_factory=dict)
    linear: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = field(default_factory=dict)


def model_layers(key: str) -> Layers:
    """Shapes seen by every Conv2d, BatchNorm2d and Linear in one forward on the meta device."""
    name, batch, size, channels, classes = MODELS[key]
    model = build_model(name, num_classes=classes, in_channels=channels).to("meta")
    layers = Layers()

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        shape = tuple(inputs[0].shape)
        if isinstance(module, nn.Conv2d):
            conv = ConvShape(
                shape,
                tuple(output.shape),
                module.kernel_size,  # type: ignore[arg-type]
                module.stride,  # type: ignore[arg-type]
                module.padding,  # type: ignore[arg-type]
                module.groups,
            )
            layers.conv[conv] = layers.conv.get(conv, 0) + 1
        elif isinstance(module, nn.BatchNorm2d):
            layers.bn[shape] = layers.bn.get(shape, 0) + 1
        elif isinstance(module, nn.Linear):
            pair = (shape, tuple(output.shape))
            layers.linear[pair] = layers.linear.get(pair, 0) + 1

    for module in model.modules():
        module.register_forward_hook(record)
    with torch.no_grad():
        model(torch.empty(batch, channels, size, size, device="meta"))
    return layers


def grouped_variants(layers: Layers) -> dict[ConvShape, int]:
    """Each 3x3 convolution with 4 input channels per group and depthwise (counted once)."""
    variants: dict[ConvShape, int] = {}
    for conv in layers.conv:
        if conv.kernel != (3, 3) or conv.x[1] < 8:
            continue
        for groups in (conv.x[1] // 4, conv.x[1]):
            grouped = ConvShape(conv.x, conv.out, conv.kernel, conv.stride, conv.padding, groups)
            variants[grouped] = 1
    return variants


# -- baseline forms (kept here to compare against) -------------------------------------------


def _statistics_dtype(t: torch.Tensor) -> torch.Tensor:
    """The conversion the blocks apply (a no-op for float32), kept for like-for-like times."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def baseline_conv_g(go: torch.Tensor, groups: int) -> torch.Tensor:
    """One BLAS product per example (and group), summed over the batch."""
    go = _statistics_dtype(go)
    n, channels, height, width = go.shape
    per_group = channels // groups
    rows = go.reshape(n * groups, per_group, height * width)
    second = torch.bmm(rows, rows.transpose(1, 2))
    second = second.view(n, groups, per_group, per_group).sum(0)
    return second * (n / (height * width))


def baseline_patches(x: torch.Tensor, conv: ConvShape) -> torch.Tensor:
    """im2col in channels-last order and one BLAS product per group."""
    n, channels, height, width = x.shape
    (kh, kw), stride, padding, groups = conv.kernel, conv.stride, conv.padding, conv.groups
    out_h = output_size(height, kh, stride[0], padding[0], 1)
    out_w = output_size(width, kw, stride[1], padding[1], 1)
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    padded = padded.permute(0, 2, 3, 1).contiguous()
    s_n, s_h, s_w, s_c = padded.stride()
    patches = padded.as_strided(
        (n, out_h, out_w, kh, kw, channels),
        (s_n, s_h * stride[0], s_w * stride[1], s_h, s_w, s_c),
    )
    per_group = channels // groups
    rows = patches.reshape(n * out_h * out_w, kh * kw, groups, per_group)
    rows = rows.permute(2, 0, 1, 3).reshape(groups, n * out_h * out_w, kh * kw * per_group)
    second = torch.bmm(rows.transpose(1, 2), rows)
    second = second.view(groups, kh, kw, per_group, kh, kw, per_group)
    dim = per_group * kh * kw
    return second.permute(0, 3, 1, 2, 6, 4, 5).reshape(groups, dim, dim)


def baseline_shift_rule(conv: ConvShape) -> bool:
    """Shifts only for stride 1 where border rows/columns are at most a quarter of the map."""
    if conv.stride != (1, 1) or conv.kernel == (1, 1):
        return False
    for axis in range(2):
        excluded = border_rows(conv.x[2 + axis], conv.kernel[axis], conv.padding[axis], 1)
        if 4 * len({r for rows in excluded for r in rows}) > conv.x[2 + axis]:
            return False
    return True


def baseline_conv_a(x: torch.Tensor, conv: ConvShape) -> torch.Tensor:
    x = _statistics_dtype(x)
    if baseline_shift_rule(conv):
        second = second_moment_by_shifts(x, conv.kernel, conv.padding, (1, 1), conv.groups)
    else:
        second = baseline_patches(x, conv)
    return second / x.shape[0]


def baseline_bn_f(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Centre ``x`` once, then per-(example, channel) dot products."""
    n, channels = x.shape[:2]
    x = _statistics_dtype(x).reshape(n, channels, -1)
    delta = _statistics_dtype(delta).reshape(n, channels, -1)
    centred = x - x.mean(dim=(0, 2))[:, None]
    rstd = torch.rsqrt(torch.linalg.vecdot(centred, centred, dim=2).mean(0) / x.shape[2] + EPS)
    v = delta.sum(2)
    u = torch.linalg.vecdot(delta, centred, dim=2) * rstd
    return fisher(u, v)


def baseline_linear_a(inputs: torch.Tensor) -> torch.Tensor:
    rows = _statistics_dtype(inputs.reshape(-1, inputs.shape[-1]))
    second = (rows.T @ rows).unsqueeze(0)
    second = append_bias_moments(second, rows.sum(0).unsqueeze(0), rows.shape[0])
    return second / rows.shape[0]


def baseline_linear_g(grad_output: torch.Tensor) -> torch.Tensor:
    rows = _statistics_dtype(grad_output.reshape(-1, grad_output.shape[-1]))
    return (rows.T @ rows).unsqueeze(0) * rows.shape[0]


def fisher(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n = u.shape[0]
    return torch.stack(((u * u).mean(0), (u * v).mean(0), (v * v).mean(0)), 1) * (n * n)


# -- candidate forms ------------------------------------------------------------------------


def _per_example(go: torch.Tensor, groups: int) -> torch.Tensor:
    n, channels, height, width = go.shape
    per_group = channels // groups
    rows = go.view(n * groups, per_group, height * width)
    return torch.bmm(rows, rows.transpose(1, 2)).view(n, groups, per_group, per_group).sum(0)


def _onednn(go: torch.Tensor, groups: int) -> torch.Tensor:
    channels = go.shape[1]
    return conv2d_weight(go, (channels, channels // groups, 1, 1), go, groups=groups)


def _copy_gemm(go: torch.Tensor, groups: int) -> torch.Tensor:
    rows = go.transpose(0, 1).reshape(groups, go.shape[1] // groups, -1)
    return torch.bmm(rows, rows.transpose(1, 2))


def _einsum(go: torch.Tensor, groups: int) -> torch.Tensor:
    n, channels = go.shape[:2]
    view = go.view(n, groups, channels // groups, -1)
    return torch.einsum("ngct,ngdt->gcd", view, view)


def _chunked(go: torch.Tensor, groups: int) -> torch.Tensor:
    n, channels = go.shape[:2]
    per_group = channels // groups
    step = max(1, (1 << 20) // go[0].numel())  # copies of at most 4 MiB
    out = go.new_zeros(groups, per_group, per_group)
    for start in range(0, n, step):
        rows = go[start : start + step].transpose(0, 1).reshape(groups, per_group, -1)
        out.baddbmm_(rows, rows.transpose(1, 2))
    return out


CHANNEL_FORMS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "per-example bmm": _per_example,
    "oneDNN conv": _onednn,
    "copy + batched GEMM": _copy_gemm,
    "einsum": _einsum,
    "chunked copy + GEMM": _chunked,
}


def conv_g_forms(go: torch.Tensor, groups: int) -> dict[str, Form]:
    forms: dict[str, Form] = {
        name: (lambda f=f: f(go, groups)) for name, f in CHANNEL_FORMS.items()
    }
    if groups == 1:
        last = go.contiguous(memory_format=torch.channels_last)
        forms[CHANNELS_LAST_GRAD] = lambda: _onednn(last, 1)
    if groups == go.shape[1]:
        flat = go.view(go.shape[0], go.shape[1], -1)
        forms["squared sums"] = lambda: torch.linalg.vecdot(flat, flat).sum(0)
    return forms


def conv_a_forms(x: torch.Tensor, conv: ConvShape) -> dict[str, Form]:
    kernel, stride, padding, groups = conv.kernel, conv.stride, conv.padding, conv.groups
    forms: dict[str, Form] = {"patches, batched BLAS": lambda: baseline_patches(x, conv)}
    if conv.kernel == (1, 1) and conv.padding == (0, 0):
        sub = x[:, :, :: stride[0], :: stride[1]]
        for name, f in CHANNEL_FORMS.items():
            forms[f"channel moment, {name}"] = lambda f=f: f(sub.contiguous(), groups)
        if stride != (1, 1):
            channels = x.shape[1]
            forms["strided oneDNN conv"] = lambda: conv2d_weight(
                x, (channels, channels // groups, 1, 1), sub.contiguous(), stride, groups=groups
            )
        return forms
    if stride == (1, 1):
        forms["shifts, NCHW"] = lambda: second_moment_by_shifts(x, kernel, padding, (1, 1), groups)
        forms["shifts, channels-last"] = lambda: second_moment_by_shifts(
            x.contiguous(memory_format=torch.channels_last), kernel, padding, (1, 1), groups
        )
    if groups == 1:
        forms["patches, one oneDNN product"] = lambda: second_moment_by_patches(
            x, kernel, stride, padding, (1, 1), groups, row_blocks=False
        )
        forms["patches, oneDNN row blocks"] = lambda: second_moment_by_patches(
            x, kernel, stride, padding, (1, 1), groups
        )
        if x[0].numel() <= IMAGE_GRAM_MAX_FEATURES:
            # the count matrix, (kh kw)^2 (H W + 1)^2 entries, only where it stays small: it
            # is cached per geometry (the stem at 32x32 would hold 340 MB)
            small = (kernel[0] * kernel[1] * (x.shape[2] * x.shape[3] + 1)) ** 2 <= 2**22
            for summation in GRAM_SUMMATIONS if small else ("gather",):
                forms[f"image Gram, {summation}"] = functools.partial(
                    second_moment_by_image_gram, x, kernel, stride, padding, (1, 1), summation
                )
    return forms


def batch_mean_invstd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and ``1 / sqrt(variance + eps)`` per channel, as a BatchNorm forward in
    training mode computes them (``BatchNormBlock.forward_context`` reads them from it)."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), torch.rsqrt(x.var(dims, correction=0) + EPS)


def bn_forms(
    x: torch.Tensor, delta: torch.Tensor, forward: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Form]:
    """Every form of BatchNorm's per-example sums; ``forward``: the batch mean and 1/std
    that the forward computed, which some forms take."""
    n, channels = x.shape[:2]
    x3, d3 = x.reshape(n, channels, -1), delta.reshape(n, channels, -1)

    def correction() -> torch.Tensor:
        # one pass per reduction, no centred tensor: sums of x, x^2 and delta x per pair
        count = x3.shape[0] * x3.shape[2]
        mean = x3.sum((0, 2)) / count
        var = torch.linalg.vecdot(x3, x3, dim=2).sum(0) / count - mean * mean
        v = d3.sum(2)
        u = (torch.linalg.vecdot(d3, x3, dim=2) - mean * v) * torch.rsqrt(var + EPS)
        return fisher(u, v)

    def var_mean() -> torch.Tensor:
        var, mean = torch.var_mean(x3, dim=(0, 2), correction=0)
        v = d3.sum(2)
        u = torch.linalg.vecdot(d3, x3 - mean[:, None], dim=2) * torch.rsqrt(var + EPS)
        return fisher(u, v)

    def batched_dots() -> torch.Tensor:
        centred = x3 - x3.mean(dim=(0, 2))[:, None]
        flat = centred.reshape(-1, 1, x3.shape[2])
        var = torch.bmm(flat, flat.transpose(1, 2)).view(n, channels).mean(0) / x3.shape[2]
        v = d3.sum(2)
        u = torch.bmm(d3.reshape(-1, 1, x3.shape[2]), flat.transpose(1, 2)).view(n, channels)
        return fisher(u * torch.rsqrt(var + EPS), v)

    return {
        "centred dot products": lambda: fisher(*moments_by_dot_products(x3, d3, EPS)),
        "BatchNorm backward kernel": lambda: fisher(*moments_by_kernel(x3, d3, EPS)),
        "dot products, the forward's mean and 1/std": lambda: fisher(
            *moments_by_dot_products(x3, d3, EPS, forward)
        ),
        "kernel, the forward's mean and 1/std": lambda: fisher(
            *moments_by_kernel(x3, d3, EPS, forward)
        ),
        "sums with correction": correction,
        "torch.var_mean": var_mean,
        "batched dot products": batched_dots,
    }


def linear_a_forms(rows: torch.Tensor) -> dict[str, Form]:
    count = rows.shape[0]

    def augmented(product: Callable[[torch.Tensor], torch.Tensor]) -> Form:
        return lambda: product(torch.cat((rows, rows.new_ones(count, 1)), 1)).div_(count)

    def bordered(product: Callable[[torch.Tensor], torch.Tensor]) -> Form:
        def form() -> torch.Tensor:
            second = product(rows).div_(count).unsqueeze(0)
            return append_bias_moments(second, rows.sum(0).unsqueeze(0).div_(count), 1.0)

        return form

    def blas(m: torch.Tensor) -> torch.Tensor:
        return m.T @ m

    def onednn(m: torch.Tensor) -> torch.Tensor:
        return onednn_product(m, m)

    return {
        "BLAS + border": lambda: baseline_linear_a(rows),
        "BLAS on [rows, 1]": augmented(blas),
        "oneDNN + border": bordered(onednn),
        "oneDNN on [rows, 1]": augmented(onednn),
    }


def linear_g_forms(rows: torch.Tensor) -> dict[str, Form]:
    count = float(rows.shape[0])
    return {
        "BLAS, then scaled": lambda: baseline_linear_g(rows),
        "BLAS, scaled in the product": lambda: torch.addmm(
            rows.new_zeros(()), rows.T, rows, beta=0, alpha=count
        ),
        "oneDNN": lambda: onednn_product(rows, rows).mul_(count),
    }


# -- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    statistic: str
    label: str
    count: int
    forms: dict[str, Form]
    pick: str
    baseline: Form
    library: Form
    reference: Callable[[], torch.Tensor]
    """The statistic in float64 (baseline form), to measure each form's error against."""


def conv_g_case(conv: ConvShape, count: int, source: str) -> Case:
    go = torch.randn(conv.out, generator=torch.Generator().manual_seed(0))
    module = nn.Conv2d(conv.x[1], conv.out[1], conv.kernel, conv.stride, conv.padding,
                       groups=conv.groups, bias=False)  # fmt: skip
    block = Conv2dBlock("conv", module)
    n = go.shape[0]
    locations = go.shape[2] * go.shape[3]
    return Case(
        "conv-G",
        f"{source} {conv.out} groups {conv.groups}",
        count,
        {
            name: _scaled(form, n / locations)
            for name, form in conv_g_forms(go, conv.groups).items()
        },
        channel_moment_form(go, conv.groups),
        lambda: baseline_conv_g(go, conv.groups),
        lambda: block.g_factor(go, n),
        lambda: baseline_conv_g(go.double(), conv.groups),
    )


def _scaled(form: Form, scale: float) -> Form:
    return lambda: form().reshape(-1).mul_(scale)


def conv_a_case(conv: ConvShape, count: int, source: str) -> Case:
    x = torch.relu(torch.randn(conv.x, generator=torch.Generator().manual_seed(1)))
    module = nn.Conv2d(conv.x[1], conv.out[1], conv.kernel, conv.stride, conv.padding,
                       groups=conv.groups, bias=False)  # fmt: skip
    block = Conv2dBlock("conv", module)
    n = x.shape[0]
    return Case(
        "conv-A",
        f"{source} {conv.x} k{conv.kernel[0]} s{conv.stride[0]} groups {conv.groups}",
        count,
        {name: _scaled(form, 1.0 / n) for name, form in conv_a_forms(x, conv).items()},
        _a_pick(x, conv),
        lambda: baseline_conv_a(x, conv),
        lambda: block.a_factor(x),
        lambda: baseline_conv_a(x.double(), conv),
    )


def _a_pick(x: torch.Tensor, conv: ConvShape) -> str:
    geometry = (conv.kernel, conv.stride, conv.padding, (1, 1), conv.groups)
    form = patch_moment_form(conv.x[1:], *geometry)
    if form == "image Gram":
        return f"image Gram, {gram_summation_form(conv.x[2:], *geometry[:-1])}"
    if form != "channel moment":
        return form
    sub = x[:, :, :: conv.stride[0], :: conv.stride[1]]
    return f"channel moment, {channel_moment_form(sub, conv.groups)}"


FORWARD_FORMS = {
    "BatchNorm backward kernel": "kernel, the forward's mean and 1/std",
    "centred dot products": "dot products, the forward's mean and 1/std",
}
"""The form the library takes at each :func:`moment_form`: through the hooks, a BatchNorm
forward in training mode gives it the batch's mean and 1/std."""


def bn_case(shape: tuple[int, ...], count: int, source: str) -> Case:
    generator = torch.Generator().manual_seed(2)
    offsets = torch.randn(1, shape[1], 1, 1, generator=generator)
    x = torch.randn(shape, generator=generator) + 0.5 + offsets  # nonzero means
    delta = torch.randn(shape, generator=generator) * 1e-3
    block = BatchNormBlock("bn", nn.BatchNorm2d(shape[1], eps=EPS), 16.0)
    forward = batch_mean_invstd(x)  # what the hooks read from the forward
    return Case(
        "bn-F",
        f"{source} {shape}",
        count,
        bn_forms(x, delta, forward),
        FORWARD_FORMS[moment_form(x[0, 0].numel())],
        lambda: baseline_bn_f(x, delta),
        lambda: block.compute_statistic(0, x, delta, forward),
        lambda: baseline_bn_f(x.double(), delta.double()),
    )


def linear_cases(
    shapes: tuple[tuple[int, ...], tuple[int, ...]], count: int, source: str
) -> Iterator[Case]:
    (n, d_in), (_, d_out) = shapes
    generator = torch.Generator().manual_seed(3)
    a = torch.relu(torch.randn(n, d_in, generator=generator))
    g = torch.randn(n, d_out, generator=generator)
    block = LinearBlock("fc", nn.Linear(d_in, d_out))
    a_engine = gram_form(n, d_in + 1 if n <= d_in else d_in)
    a_pick = f"{a_engine} on [rows, 1]" if n <= d_in else f"{a_engine} + border"
    yield Case(
        "linear-A",
        f"{source} {(n, d_in)} + bias",
        count,
        linear_a_forms(a),
        a_pick,
        lambda: baseline_linear_a(a),
        lambda: block.a_factor(a),
        lambda: baseline_linear_a(a.double()),
    )
    yield Case(
        "linear-G",
        f"{source} {(n, d_out)}",
        count,
        linear_g_forms(g),
        "oneDNN" if gram_form(n, d_out) == "oneDNN" else "BLAS, scaled in the product",
        lambda: baseline_linear_g(g),
        lambda: block.g_factor(g, n),
        lambda: baseline_linear_g(g.double()),
    )


def cases_for(model: str, wanted: set[str]) -> list[Case]:
    layers = model_layers(model)
    out: list[Case] = []
    convs = {**layers.conv, **grouped_variants(layers)}
    if "conv-G" in wanted:
        by_output: dict[tuple[tuple[int, ...], int], tuple[ConvShape, int]] = {}
        for conv, count in convs.items():
            key = (conv.out, conv.groups)
            by_output[key] = (conv, by_output.get(key, (conv, 0))[1] + count)
        out += [conv_g_case(conv, count, model) for conv, count in by_output.values()]
    if "conv-A" in wanted:
        out += [conv_a_case(conv, count, model) for conv, count in convs.items()]
    if "bn-F" in wanted:
        out += [bn_case(shape, count, model) for shape, count in layers.bn.items()]
    for shapes, count in layers.linear.items():
        out += [c for c in linear_cases(shapes, count, model) if c.statistic in wanted]
    return out


# -- timing ---------------------------------------------------------------------------------


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value = value.double().reshape(reference.shape)
    return ((value - reference).norm() / reference.norm()).item()


def time_forms(forms: dict[str, Form], repeats: int, sample_seconds: float) -> dict[str, float]:
    """Median ms per call of each form, interleaved round by round."""
    loops: dict[str, int] = {}
    for name, form in forms.items():
        start = time.perf_counter()
        form()
        loops[name] = max(1, int(sample_seconds / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, form in forms.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                form()
            samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def run_case(case: Case, repeats: int, sample_seconds: float) -> tuple[float, float]:
    reference = case.reference()
    forms = {**case.forms, "baseline": case.baseline, "library": case.library}
    errors = {name: relative_error(form(), reference) for name, form in forms.items()}
    worst = max(errors, key=errors.__getitem__)
    ms = time_forms(forms, repeats, sample_seconds)
    fastest = min((name for name in case.forms if name != CHANNELS_LAST_GRAD), key=ms.__getitem__)
    before, after = ms.pop("baseline"), ms.pop("library")
    print(
        f"{case.label:<52} x{case.count:<3} baseline {before:8.2f}  library {after:8.2f} ms"
        f"  ({before / after:4.2f}x)  picks: {case.pick}"
    )
    cells = [f"{name} {value:.2f}{'*' if name == fastest else ''}" for name, value in ms.items()]
    print(
        f"      {' | '.join(cells)}   (rel. error: library {errors['library']:.0e}, "
        f"largest {errors[worst]:.0e} {worst})",
        flush=True,
    )
    return before * case.count, after * case.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--statistics", nargs="+", choices=STATISTICS, default=list(STATISTICS))
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, shorter rounds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_malloc()
    torch.set_num_threads(args.threads)
    models = args.models or (["resnet20", "digits"] if args.quick else list(MODELS))
    sample_seconds = 0.002 if args.quick else 0.02
    print(
        f"{args.threads} threads, median of {args.repeats} interleaved rounds; ms per call "
        "(* fastest candidate); baseline and library include the block's scaling"
    )
    totals: dict[tuple[str, str], list[float]] = {}
    for model in models:
        cases = cases_for(model, set(args.statistics))
        for statistic in args.statistics:
            chosen = [case for case in cases if case.statistic == statistic]
            if chosen:
                print(f"\n== {statistic}, {model} ==")
            for case in chosen:
                before, after = run_case(case, args.repeats, sample_seconds)
                total = totals.setdefault((model, statistic), [0.0, 0.0])
                total[0] += before
                total[1] += after
    print("\nper forward/backward pair, every layer of the model (grouped variants included):")
    for (model, statistic), (before, after) in totals.items():
        print(
            f"  {model:<9} {statistic:<9} baseline {before:9.1f}  library {after:9.1f} ms"
            f"  ({before / after:4.2f}x)"
        )


if __name__ == "__main__":
    main()
