"""SPNGD with torch.compile, autocast and GradScaler."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd import SPNGD, AdaptiveRefresh
from tests.curvature._bruteforce import (
    LayerData,
    assert_rel_close,
    conv_factors,
    full_batch_layer_data,
    linear_factors,
    rel_err,
)
from tests.small_models import conv_bn_net


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 9, 9, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def test_compiled_model_steps_like_the_eager_one() -> None:
    """Hooks on the modules of a torch.compile'd model record the same statistics.

    The test uses the ``aot_eager`` backend to stay fast on CPU; the default inductor
    backend was checked by hand the same way (largest parameter difference 5e-6).
    """
    eager, compiled = conv_bn_net(), conv_bn_net()
    opt_eager = SPNGD(eager, lr=0.1, stat_interval=1)
    opt_compiled = SPNGD(compiled, lr=0.1, stat_interval=1)
    forward = torch.compile(compiled, backend="aot_eager")
    for step in range(3):
        x, y = _data(step)
        for net, opt in ((eager, opt_eager), (forward, opt_compiled)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for name, block in opt_eager.curvature.items():
        for a, b in zip(block.factors, opt_compiled.curvature[name].factors, strict=True):
            torch.testing.assert_close(a, b)


def test_bfloat16_autocast_keeps_float32_statistics() -> None:
    """Under bf16 autocast the layers' inputs and output gradients are bf16, but their
    statistics are accumulated in float32: they match a float64 brute force on the very
    tensors the hooks saw far more tightly than a bf16 accumulation could."""
    full, mixed = conv_bn_net(), conv_bn_net()
    reference = copy.deepcopy(mixed)
    start = [p.detach().clone() for p in full.parameters()]
    opt_full = SPNGD(full, lr=0.1, stat_interval=1)
    opt_mixed = SPNGD(mixed, lr=0.1, stat_interval=1)
    x, y = _data(0)
    for net, opt, autocast in ((full, opt_full, False), (mixed, opt_mixed, True)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv_data = full_batch_layer_data(reference, reference[0], x, y)
        fc_data = full_batch_layer_data(reference, reference[5], x, y)
    assert fc_data.g.dtype == torch.bfloat16  # what the hooks are handed
    as_float64 = lambda d: LayerData(a=d.a.double(), g=d.g.double())  # noqa: E731
    conv_A, conv_G = conv_factors(reference[0], as_float64(conv_data))
    fc_A, fc_G = linear_factors(as_float64(fc_data), bias=True)
    expected = {"0": (conv_A, conv_G), "5": (fc_A.unsqueeze(0), fc_G.unsqueeze(0))}
    for name, (want_A, want_G) in expected.items():
        block = opt_mixed.curvature[name]
        assert block.A.dtype == block.G.dtype == torch.float32
        assert_rel_close(block.A, want_A, 1e-5, f"{name}.A")
        assert_rel_close(block.G, want_G, 1e-5, f"{name}.G")
    # a bf16 accumulation of the same products is off by far more than that tolerance
    g = fc_data.g.reshape(-1, 3)
    assert rel_err((g.T @ g).float() / len(g), fc_G.float()) > 1e-3
    # The update from bf16 activations and gradients points the same way (the damped
    # inverse amplifies bf16 rounding in low-curvature directions, so not much closer).
    step_full = torch.cat(
        [(a - p0).flatten() for p0, a in zip(start, full.parameters(), strict=True)]
    )
    step_mixed = torch.cat(
        [(b - p0).flatten() for p0, b in zip(start, mixed.parameters(), strict=True)]
    )
    assert torch.isfinite(step_mixed).all()
    assert F.cosine_similarity(step_mixed, step_full, dim=0).item() > 0.95


def test_grad_scaler_loss_scale_is_taken_out_of_the_statistics() -> None:
    plain, scaled = conv_bn_net(), conv_bn_net()
    opt_plain = SPNGD(plain, lr=0.1, stat_interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt_scaled = SPNGD(scaled, lr=0.1, stat_interval=1, grad_scaler=scaler)
    for step in range(3):
        x, y = _data(step)
        opt_plain.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt_plain.step()
        opt_scaled.zero_grad()
        scaler.scale(F.cross_entropy(scaled(x), y)).backward()
        scaler.step(opt_scaled)
        scaler.update()
    for name, block in opt_plain.curvature.items():
        for a, b in zip(block.factors, opt_scaled.curvature[name].factors, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
def test_a_grad_scaler_the_optimizer_was_not_given_is_refused(unscale_first: bool) -> None:
    """Stepped by a GradScaler it was not built with, SPNGD would precondition with
    statistics that carry the loss scale squared (its damping lost against them): an
    error naming the fix, the model untouched."""
    model = conv_bn_net()
    start = [p.detach().clone() for p in model.parameters()]
    opt = SPNGD(model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _data(0)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if unscale_first:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"build it with SPNGD\(\.\.\., grad_scaler=scaler\)"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))


def _recorded_linear_data(model: nn.Module) -> dict[nn.Module, list[tuple[torch.Tensor, ...]]]:
    """Each Linear layer's input and output gradient, as autograd hands them over, per
    backward pass (a brute-force record beside SPNGD's own hooks)."""
    pairs: dict[nn.Module, list[tuple[torch.Tensor, ...]]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            pairs[module] = []

            def forward_hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                saved = inputs[0].detach()
                output.register_hook(lambda g, m=m, saved=saved: pairs[m].append((saved, g)))

            module.register_forward_hook(forward_hook)
    return pairs


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("backward_inside", [False, True], ids=["outside", "inside"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_statistics_under_autocast_are_float32_products_of_the_half_precision_tensors(
    dtype: torch.dtype, backward_inside: bool, fisher: str
) -> None:
    """Whatever autocast does to the forward and backward, SPNGD's statistics are the
    float32 products of the tensors the layers saw (checked against float64 products of
    the same tensors), with the float16 loss scale taken out after promotion."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    pairs = _recorded_linear_data(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=dtype == torch.float16)
    opt = SPNGD(model, lr=0.1, stat_interval=1, fisher=fisher, grad_scaler=scaler)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    with torch.autocast("cpu", dtype=dtype):
        logits = model(x)
        if fisher == "mc":
            opt.sample_fisher(logits)
        loss = F.cross_entropy(logits, y)
        if backward_inside:
            scaler.scale(loss).backward()
    if not backward_inside:
        scaler.scale(loss).backward()
    scaler.step(opt)
    scale = 2.0**10 if dtype == torch.float16 else 1.0
    for module, recorded in pairs.items():
        a, grad = recorded[0]  # MC: the sampled-label pass comes first
        assert a.dtype == dtype or module is model[0]
        assert grad.dtype == dtype
        a = torch.cat([a.double(), torch.ones(32, 1, dtype=torch.float64)], dim=1)
        g = grad.double() / scale * 32
        block = opt.curvature[next(n for n, m in model.named_modules() if m is module)]
        torch.testing.assert_close(block.factors[0][0].double(), a.T @ a / 32, rtol=1e-5, atol=0)
        torch.testing.assert_close(block.factors[1][0].double(), g.T @ g / 32, rtol=1e-5, atol=0)


def test_adaptive_refresh_under_torch_compile_never_recompiles() -> None:
    """The statistics hooks run outside the compiled graphs, so switching a layer's
    statistics on and off from step to step adds no compilation (Dynamo would otherwise
    guard on each layer's decision)."""
    from torch._dynamo.testing import CompileCounter

    model = conv_bn_net()
    opt = SPNGD(model, lr=0.1, refresh=AdaptiveRefresh(warmup_steps=3))  # skips from step 3
    counter = CompileCounter()
    forward = torch.compile(model, backend=counter)
    patterns = set()
    frames_after_first_step = None
    for step in range(16):
        x, y = _data(step)
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        patterns.add(tuple(any(block.to_compute) for block in opt.curvature.values()))
        frames_after_first_step = frames_after_first_step or counter.frame_count
    assert len(patterns) > 2  # the layers' statistics were switched on and off
    assert counter.frame_count == frames_after_first_step
