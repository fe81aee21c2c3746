"""Brute-force checks of the Conv2d KFC block, grouped/depthwise too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from tests.curvature._bruteforce import (
    FACTOR_TOL,
    UPDATE_TOL,
    assert_no_rescale_confound,
    assert_rel_close,
    conv_factors,
    conv_patches,
    conv_weight_matrix,
    damped_factors,
    full_batch_layer_data,
    kron_solve,
    linear_factors,
    linear_grad_matrix,
    make_opt,
    param_change,
    per_example_layer_data,
    reference_grads,
    rel_err,
    snapshot,
)

N = 5
HW = 7  # input 7x7; k=3, stride 2, padding 1, dilation 2 -> output 3x3
N_CLS = 3
LAM = 0.1

# (C_in, C_out, groups): plain, grouped, depthwise x2 multiplier, depthwise x1
CONFIGS = [(3, 4, 1), (4, 6, 2), (3, 6, 3), (3, 3, 3)]
CONFIG_IDS = ["plain", "groups2", "depthwise_x2", "depthwise_x1"]


def _convnet(cin: int, cout: int, groups: int, bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, dilation=2, groups=groups, bias=bias),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(cout * 3 * 3, N_CLS, bias=bias),
    )
    return model.double()


def _batch(cin: int) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    x = torch.randn(N, cin, HW, HW, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (N,))
    return x, y


def _step(model: nn.Module, x: Tensor, y: Tensor, lam: float = LAM):
    opt = make_opt(model, damping=lam)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("cin", "cout", "groups"), CONFIGS, ids=CONFIG_IDS)
def test_unfold_bruteforce_is_consistent(cin: int, cout: int, groups: int, bias: bool) -> None:
    """Sanity of the brute force: W_g @ patches == conv output, (1/N) sum g abar^T == grad."""
    model = _convnet(cin, cout, groups, bias)
    x, y = _batch(cin)
    conv = model[0]
    data = full_batch_layer_data(model, conv, x, y)
    with torch.no_grad():
        out = conv(x)
    model.zero_grad()
    cross_entropy(model(x), y).backward()
    cout_g = cout // groups
    for grp in range(groups):
        W = conv_weight_matrix(conv, grp, conv.weight.detach(), conv.bias)
        gW = conv_weight_matrix(conv, grp, conv.weight.grad, conv.bias.grad if bias else None)
        acc = torch.zeros_like(gW)
        for i in range(N):
            cols = conv_patches(conv, x[i], grp)
            rows = out[i, grp * cout_g : (grp + 1) * cout_g].reshape(cout_g, -1)
            assert rel_err(W.detach() @ cols, rows) < 1e-12
            g_i = data.g[i, grp * cout_g : (grp + 1) * cout_g].reshape(cout_g, -1)
            acc += g_i @ cols.T
        assert rel_err(acc / N, gW) < 1e-12
    # per-example loop gives the same g as n * grad_output of the full batch
    pex = per_example_layer_data(model, conv, x, y)
    assert rel_err(pex.g, data.g) < 1e-12


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("cin", "cout", "groups"), CONFIGS, ids=CONFIG_IDS)
def test_conv_factors_match_bruteforce(cin: int, cout: int, groups: int, bias: bool) -> None:
    """Per-group A_g (summed over locations) and G_g (averaged) equal explicit loops."""
    model = _convnet(cin, cout, groups, bias)
    x, y = _batch(cin)
    ref = copy.deepcopy(model)
    A, G = conv_factors(ref[0], per_example_layer_data(ref, ref[0], x, y))
    d_A = (cin // groups) * 9 + int(bias)
    assert A.shape == (groups, d_A, d_A)
    assert G.shape == (groups, cout // groups, cout // groups)
    A_fc, G_fc = linear_factors(per_example_layer_data(ref, ref[3], x, y), bias)

    opt = _step(model, x, y)
    assert set(opt.curvature) == {"0", "3"}
    assert_rel_close(opt.curvature["0"].A, A, FACTOR_TOL, "conv.A")
    assert_rel_close(opt.curvature["0"].G, G, FACTOR_TOL, "conv.G")
    assert_rel_close(opt.curvature["3"].A, A_fc.unsqueeze(0), FACTOR_TOL, "fc.A")
    assert_rel_close(opt.curvature["3"].G, G_fc.unsqueeze(0), FACTOR_TOL, "fc.G")


@pytest.mark.parametrize(
    ("patches", "a_examples", "examples"),
    [
        (1, None, 2),
        (10, None, 2),
        (19, None, 3),
        (27, None, 3),
        (28, None, 4),
        (45, None, N),
        (None, None, N),
        (45, 3, 3),
        (10, 3, 2),
    ],
)
def test_a_comes_from_the_first_examples_that_hold_a_patches(
    patches: int | None, a_examples: int | None, examples: int
) -> None:
    """With 9 output locations per example, ``A`` is the brute-force ``A`` of the first
    ``max(2, ceil(patches / 9))`` examples (all ``N`` from 45 patches, and with None), or
    of fewer where ``a_examples`` says so; ``G`` still comes from every example."""
    model = _convnet(3, 4, 1, True)
    x, y = _batch(3)
    ref = copy.deepcopy(model)
    A, _ = conv_factors(ref[0], per_example_layer_data(ref, ref[0], x[:examples], y[:examples]))
    _, G = conv_factors(ref[0], per_example_layer_data(ref, ref[0], x, y))
    opt = make_opt(model, damping=LAM, a_patches=patches, a_examples=a_examples)
    cross_entropy(model(x), y).backward()
    opt.step()
    assert_rel_close(opt.curvature["0"].A, A, FACTOR_TOL, "conv.A")
    assert_rel_close(opt.curvature["0"].G, G, FACTOR_TOL, "conv.G")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("cin", "cout", "groups"), CONFIGS, ids=CONFIG_IDS)
def test_conv_update_equals_kron_solve(cin: int, cout: int, groups: int, bias: bool) -> None:
    """Per group: U_g = solve(kron(G_d, A_d), vec_r(grad_g)), pi-damped, built in the test."""
    model = _convnet(cin, cout, groups, bias)
    x, y = _batch(cin)
    ref = copy.deepcopy(model)
    conv = ref[0]
    grads = reference_grads(ref, x, y)
    A, G = conv_factors(conv, per_example_layer_data(ref, conv, x, y))
    cout_g = cout // groups
    exp_w = torch.empty_like(conv.weight)
    exp_b = torch.empty(cout, dtype=torch.float64)
    for grp in range(groups):
        gmat = conv_weight_matrix(conv, grp, grads["0.weight"], grads.get("0.bias"))
        U = kron_solve(A[grp], G[grp], gmat, LAM)
        A_d, G_d = damped_factors(A[grp], G[grp], LAM)
        assert rel_err(U, torch.linalg.solve(G_d, gmat) @ torch.linalg.inv(A_d)) < 1e-10
        rows = slice(grp * cout_g, (grp + 1) * cout_g)
        n_w = (cin // groups) * 9
        exp_w[rows] = U[:, :n_w].reshape(cout_g, cin // groups, 3, 3)
        if bias:
            exp_b[rows] = U[:, n_w]
    assert_no_rescale_confound((conv.weight.detach() - exp_w).reshape(cout, -1))
    A_fc, G_fc = linear_factors(per_example_layer_data(ref, ref[3], x, y), bias)
    U_fc = kron_solve(A_fc, G_fc, linear_grad_matrix(grads["3.weight"], grads.get("3.bias")), LAM)

    before = snapshot(model)
    _step(model, x, y)
    change = param_change(before, model)
    assert_rel_close(change["0.weight"], exp_w, UPDATE_TOL, "conv.weight update")
    d_fc = ref[3].in_features
    assert_rel_close(change["3.weight"], U_fc[:, :d_fc], UPDATE_TOL, "fc.weight update")
    if bias:
        assert_rel_close(change["0.bias"], exp_b, UPDATE_TOL, "conv.bias update")
        assert_rel_close(change["3.bias"], U_fc[:, d_fc], UPDATE_TOL, "fc.bias update")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_k1_conv_on_1x1_equals_linear(bias: bool) -> None:
    """A k=1 conv on a 1x1 input has the same A, G and update as the equivalent Linear."""
    d_in, d_out = 5, 4
    torch.manual_seed(0)
    lin_model = nn.Sequential(
        nn.Flatten(), nn.Linear(d_in, d_out, bias=bias), nn.Tanh(), nn.Linear(d_out, N_CLS)
    ).double()
    conv_model = nn.Sequential(
        nn.Conv2d(d_in, d_out, 1, bias=bias), nn.Flatten(), nn.Tanh(), nn.Linear(d_out, N_CLS)
    ).double()
    with torch.no_grad():
        conv_model[0].weight.copy_(lin_model[1].weight.reshape(d_out, d_in, 1, 1))
        if bias:
            conv_model[0].bias.copy_(lin_model[1].bias)
        conv_model[3].load_state_dict(lin_model[3].state_dict())
    torch.manual_seed(1)
    x = torch.randn(N, d_in, 1, 1, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (N,))

    lin_before, conv_before = snapshot(lin_model), snapshot(conv_model)
    opt_l = _step(lin_model, x, y)
    opt_c = _step(conv_model, x, y)
    assert_rel_close(opt_c.curvature["0"].A, opt_l.curvature["1"].A, FACTOR_TOL, "A")
    assert_rel_close(opt_c.curvature["0"].G, opt_l.curvature["1"].G, FACTOR_TOL, "G")
    d_l = param_change(lin_before, lin_model)
    d_c = param_change(conv_before, conv_model)
    assert_rel_close(
        d_c["0.weight"].reshape(d_out, d_in), d_l["1.weight"], UPDATE_TOL, "weight update"
    )
    if bias:
        assert_rel_close(d_c["0.bias"], d_l["1.bias"], UPDATE_TOL, "bias update")
    assert_rel_close(d_c["3.weight"], d_l["3.weight"], UPDATE_TOL, "head update")
