"""Brute-force checks of the Linear K-FAC block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.functional import cross_entropy

from tests.curvature._bruteforce import (
    FACTOR_TOL,
    UPDATE_TOL,
    assert_no_rescale_confound,
    assert_rel_close,
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

N = 7
D_IN, D_HID, N_CLS = 5, 4, 3
T_POS = 3
LAM = 0.05


def _mlp(bias: bool, seq_input: bool) -> nn.Sequential:
    """Linear(5,4) -> Tanh -> [Flatten] -> Linear(.., 3); input (n,5) or (n,T,5)."""
    torch.manual_seed(0)
    if seq_input:
        model = nn.Sequential(
            nn.Linear(D_IN, D_HID, bias=bias),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(T_POS * D_HID, N_CLS, bias=bias),
        )
    else:
        model = nn.Sequential(
            nn.Linear(D_IN, D_HID, bias=bias), nn.Tanh(), nn.Linear(D_HID, N_CLS, bias=bias)
        )
    return model.double()


def _batch(seq_input: bool, n: int = N) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    shape = (n, T_POS, D_IN) if seq_input else (n, D_IN)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (n,))
    return x, y


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {k: m for k, m in model.named_modules() if isinstance(m, nn.Linear)}


def _step(model: nn.Module, x: Tensor, y: Tensor, lam: float = LAM):
    opt = make_opt(model, damping=lam)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("seq_input", [False, True], ids=["2d", "3d"])
def test_linear_factors_match_bruteforce(bias: bool, seq_input: bool) -> None:
    """A and G of every Linear equal explicit per-example (and per-position) averages."""
    model = _mlp(bias, seq_input)
    x, y = _batch(seq_input)
    ref = copy.deepcopy(model)
    expected = {}
    for name, lin in _linears(ref).items():
        data = per_example_layer_data(ref, lin, x, y)
        expected[name] = linear_factors(data, bias)

    opt = _step(model, x, y)
    assert set(opt.curvature) == set(expected)
    for name, (A, G) in expected.items():
        d_A = D_IN + int(bias) if name == "0" else A.shape[0]
        assert A.shape[0] == d_A
        blk = opt.curvature[name]
        assert_rel_close(blk.A, A.unsqueeze(0), FACTOR_TOL, f"{name}.A")
        assert_rel_close(blk.G, G.unsqueeze(0), FACTOR_TOL, f"{name}.G")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("seq_input", [False, True], ids=["2d", "3d"])
def test_linear_update_equals_kron_solve(bias: bool, seq_input: bool) -> None:
    """U = solve(kron(G_d, A_d), vec_r(grad)) with pi-corrected damping built in the test."""
    model = _mlp(bias, seq_input)
    x, y = _batch(seq_input)
    ref = copy.deepcopy(model)
    grads = reference_grads(ref, x, y)
    expected: dict[str, Tensor] = {}
    for name, lin in _linears(ref).items():
        A, G = linear_factors(per_example_layer_data(ref, lin, x, y), bias)
        gmat = linear_grad_matrix(grads[f"{name}.weight"], grads.get(f"{name}.bias"))
        U = kron_solve(A, G, gmat, LAM)
        # the explicit Kronecker solve equals G_d^{-1} grad A_d^{-1}
        A_d, G_d = damped_factors(A, G, LAM)
        factored = torch.linalg.solve(G_d, gmat) @ torch.linalg.inv(A_d)
        assert rel_err(U, factored) < 1e-10
        # the check discriminates pi: the pi = 1 damping gives a visibly different update
        assert rel_err(kron_solve(A, G, gmat, LAM, use_pi=False), U) > 1e-3
        expected[name] = U
        assert_no_rescale_confound(lin.weight.detach() - U[:, : lin.in_features])

    before = snapshot(model)
    _step(model, x, y)
    change = param_change(before, model)
    for name, U in expected.items():
        d_in = _linears(ref)[name].in_features
        assert_rel_close(change[f"{name}.weight"], U[:, :d_in], UPDATE_TOL, f"{name}.weight")
        if bias:
            assert_rel_close(change[f"{name}.bias"], U[:, d_in], UPDATE_TOL, f"{name}.bias")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("seq_input", [False, True], ids=["2d", "3d"])
def test_gradient_identity(bias: bool, seq_input: bool) -> None:
    """(1/N) sum_{i,t} g_{i,t} abar_{i,t}^T == weight.grad (mean) and == grad/N (sum)."""
    model = _mlp(bias, seq_input)
    x, y = _batch(seq_input)
    lin = model[0]
    for data in (per_example_layer_data(model, lin, x, y), full_batch_layer_data(model, lin, x, y)):
        a = data.a.reshape(N, -1, D_IN)
        if bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=-1)
        g = data.g.reshape(N, -1, D_HID)
        per_example = torch.einsum("ito,itd->iod", g, a)

        model.zero_grad()
        cross_entropy(model(x), y).backward()
        gmat = linear_grad_matrix(lin.weight.grad, lin.bias.grad if bias else None)
        assert rel_err(per_example.mean(0), gmat) < 1e-12

        model.zero_grad()
        cross_entropy(model(x), y, reduction="sum").backward()
        gsum = linear_grad_matrix(lin.weight.grad, lin.bias.grad if bias else None)
        assert rel_err(per_example.mean(0), gsum / N) < 1e-12

        # per-example gradients from torch.func agree with g_i abar_i^T
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_i(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        pg = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, y)
        pg_mat = pg["0.weight"]
        if bias:
            pg_mat = torch.cat([pg_mat, pg["0.bias"].unsqueeze(-1)], dim=-1)
        assert rel_err(pg_mat, per_example) < 1e-12


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_single_example_fisher_is_kron(bias: bool) -> None:
    """N = 1, empirical Fisher: vec(g abar^T) vec(g abar^T)^T == G kron A."""
    model = _mlp(bias, seq_input=False)
    x, y = _batch(False, n=1)
    grads = reference_grads(model, x, y)
    opt = _step(model, x, y)
    for name in _linears(model):
        gvec = linear_grad_matrix(grads[f"{name}.weight"], grads.get(f"{name}.bias")).flatten()
        blk = opt.curvature[name]
        assert_rel_close(
            torch.kron(blk.G[0], blk.A[0]), torch.outer(gvec, gvec), FACTOR_TOL, f"{name} G(x)A"
        )


def test_frozen_linear_not_preconditioned() -> None:
    """A frozen Linear gets no block and its parameters do not move."""
    model = _mlp(True, seq_input=False)
    model[0].requires_grad_(False)
    x, y = _batch(False)
    before = snapshot(model)
    opt = _step(model, x, y)
    assert set(opt.curvature) == {"2"}
    change = param_change(before, model)
    assert change["0.weight"].abs().max().item() == 0.0
    assert change["0.bias"].abs().max().item() == 0.0
