"""The hooks survive real models: in-place ops, reuse, evaluation passes, lone forwards."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from spngd import SPNGD


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)


class Residual(nn.Module):
    """conv -> BN -> ``out += shortcut`` -> in-place ReLU, as in ResNets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out += x
        return self.head(self.relu(out).flatten(1))


def test_inplace_ops_do_not_change_statistics() -> None:
    """Same factors with in-place residual/ReLU as with their out-of-place versions."""
    x, y = _data()
    torch.manual_seed(0)
    model = Residual()
    reference = Residual()
    reference.load_state_dict(model.state_dict())
    reference.relu = nn.ReLU(inplace=False)

    def out_of_place(self: Residual, inp: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(inp)) + inp
        return self.head(self.relu(out).flatten(1))

    results = []
    for net, forward in ((model, None), (reference, out_of_place)):
        opt = SPNGD(net, lr=0.1)
        logits = net(x) if forward is None else forward(net, x)
        F.cross_entropy(logits, y).backward()
        opt.step()
        results.append(opt)
    for name in ("conv", "bn", "head"):
        for mine, ref in zip(
            results[0].curvature[name].factors, results[1].curvature[name].factors, strict=True
        ):
            torch.testing.assert_close(mine, ref)


def test_eval_and_no_grad_passes_record_nothing() -> None:
    x, y = _data()
    model = Residual()
    opt = SPNGD(model, lr=0.1)
    with torch.no_grad():
        model(x)
    model.eval()
    F.cross_entropy(model(x), y).backward()
    assert not any(block.has_pending for block in opt.curvature.values())
    model.train()
    F.cross_entropy(model(x), y).backward()
    assert all(block.has_pending for block in opt.curvature.values())


def test_forward_without_backward_leaves_nothing() -> None:
    """A forward pass whose graph is dropped (on other inputs) records nothing: the next
    step's factors equal, bit for bit, those of a model that never saw it."""
    x, y = _data()
    model, clean = Residual(), Residual()
    clean.load_state_dict(model.state_dict())
    opt, clean_opt = SPNGD(model, lr=0.1), SPNGD(clean, lr=0.1)
    model(torch.randn_like(x))  # graph dropped, no backward
    assert not any(block.has_pending for block in opt.curvature.values())
    for net, optimizer in ((model, opt), (clean, clean_opt)):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    for name, block in opt.curvature.items():
        for factor, expected in zip(block.factors, clean_opt.curvature[name].factors, strict=True):
            assert expected is not None and torch.equal(factor, expected), name


def test_module_called_twice_averages_both_calls() -> None:
    """A layer used twice in one forward contributes both (input, grad) pairs, averaged."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 5)
    model = nn.Sequential(layer)
    x = torch.randn(8, 5)
    opt = SPNGD(model, lr=0.0, momentum=0.0)  # lr 0: the reference below reuses the layer
    hidden = layer(x)
    out = layer(torch.tanh(hidden))
    out.square().mean().backward()
    opt.step()

    # brute force: each call's factors, then their mean
    hidden_ref = hidden.detach().requires_grad_()
    out_ref = layer(torch.tanh(hidden_ref))
    (g_out,) = torch.autograd.grad(out_ref.square().mean(), out_ref, retain_graph=True)
    (g_hidden,) = torch.autograd.grad(out_ref.square().mean(), hidden_ref)
    n = x.shape[0]

    def a_of(inp: torch.Tensor) -> torch.Tensor:
        aug = torch.cat((inp, torch.ones(n, 1)), 1)
        return aug.T @ aug / n

    expected_a = (a_of(x) + a_of(torch.tanh(hidden.detach()))) / 2
    expected_g = ((n * g_hidden).T @ (n * g_hidden) + (n * g_out).T @ (n * g_out)) / (2 * n)
    block = opt.curvature["0"]
    torch.testing.assert_close(block.A[0], expected_a)
    torch.testing.assert_close(block.G[0], expected_g)


def test_gradient_accumulation_averages_micro_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = SPNGD(model, lr=0.1)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    for part in (slice(0, 5), slice(5, 10)):
        (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
    opt.step()
    accumulated = opt.curvature["0"].A.clone()
    aug = torch.cat((x, torch.ones(10, 1)), 1)
    torch.testing.assert_close(accumulated[0], aug.T @ aug / 10)


def test_accumulated_micro_batches_equal_one_large_batch() -> None:
    """K=2 micro-batches of 32 (loss / K each) step exactly like one batch of 64."""
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 4)
    ).double()
    x = torch.randn(64, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    whole, micro = base, copy.deepcopy(base)
    opt_whole = SPNGD(whole, lr=0.5, damping=1e-3)
    opt_micro = SPNGD(micro, lr=0.5, damping=1e-3, accumulation_steps=2)
    for _ in range(2):
        opt_whole.zero_grad()
        F.cross_entropy(whole(x), y).backward()
        opt_whole.step()
        opt_micro.zero_grad()
        for part in (slice(0, 32), slice(32, 64)):
            (F.cross_entropy(micro(x[part]), y[part]) / 2).backward()
        opt_micro.step()
    for a, b in zip(whole.parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_a_layer_input_is_let_go_once_its_statistics_are_taken() -> None:
    """The hooks hold a layer's input only until its output's gradient arrives: by the time
    the backward reaches the layers below, its memory can be reused."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    SPNGD(model, lr=0.1)
    watched: list[StorageWeakRef] = []
    let_go: list[bool] = []

    def watch(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        watched.append(StorageWeakRef(inputs[0].untyped_storage()))

    def look_below(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        output.register_hook(lambda grad: let_go.append(watched[0].expired()))

    model[2].register_forward_hook(watch)
    model[0].register_forward_hook(look_below)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    F.cross_entropy(model(x), y).backward()
    assert let_go == [True]
