"""Brute-force checks of the unit-wise BatchNorm Fisher block.

Per-example BN gradients: x_hat is computed once from the batch (batch mean, biased variance,
module eps) and held fixed; torch.func.vmap(grad(...)) then differentiates, per example,
gamma, beta -> CE(tail(gamma * x_hat_i + beta), y_i), where ``tail`` is the network after the
BN layer. This ignores the dependence of the batch statistics on example i, as the paper does,
and is cross-checked against u = sum_t delta x_hat, v = sum_t delta with delta = n * grad_output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from spngd.curvature.batchnorm import BatchNormBlock
from tests.curvature._bruteforce import (
    DEFAULT_BN_KAPPA,
    FACTOR_TOL,
    UPDATE_TOL,
    assert_no_rescale_confound,
    assert_rel_close,
    bn_full_fisher,
    bn_unitwise_fisher,
    bn_update,
    bn_uv_from_delta,
    bn_uv_vmap,
    bn_xhat,
    conv_factors,
    full_batch_layer_data,
    kron_solve,
    linear_factors,
    linear_grad_matrix,
    make_opt,
    param_change,
    reference_grads,
    rel_err,
    snapshot,
)

N = 6
N_CLS = 3
LAM = 0.002  # lam_BN = 16 * LAM = 0.032, comparable to the F_c entries (~0.05)
LAM_MIXED = 0.2  # keeps the conv/fc updates below the weight-rescaling bound


def _randomise_bn(bn: nn.Module) -> None:
    with torch.no_grad():
        bn.weight.copy_(1.0 + 0.3 * torch.randn_like(bn.weight))
        bn.bias.copy_(0.3 * torch.randn_like(bn.bias))


def _bn_model(kind: str) -> tuple[nn.Sequential, int, Tensor, Tensor]:
    """(model, index of the BN layer, x, y); all non-BN layers are frozen."""
    torch.manual_seed(0)
    if kind == "bn2d":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3, eps=1e-3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, N_CLS),
        )
        x_shape: tuple[int, ...] = (N, 2, 6, 6)
    elif kind == "bn1d":
        model = nn.Sequential(
            nn.Linear(5, 4), nn.BatchNorm1d(4, eps=1e-3), nn.Tanh(), nn.Linear(4, N_CLS)
        )
        x_shape = (N, 5)
    elif kind == "bn3d":  # (n, C, D, H, W), after a layer SP-NGD leaves to SGD
        model = nn.Sequential(
            nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 8, N_CLS)
        )
        x_shape = (N, 2, 3, 3, 3)
    else:  # bn1d on (n, C, L)
        model = nn.Sequential(
            nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, N_CLS)
        )
        x_shape = (N, 2, 5)
    model = model.double()
    _randomise_bn(model[1])
    for i, m in enumerate(model):
        if i != 1:
            m.requires_grad_(False)
    torch.manual_seed(1)
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (N,))
    return model, 1, x, y


def _bn_bruteforce(model: nn.Sequential, idx: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example (u, v) of the BN layer ``model[idx]``; both derivations cross-checked."""
    ref = copy.deepcopy(model)
    bn = ref[idx]
    data = full_batch_layer_data(ref, bn, x, y)
    xhat = bn_xhat(bn, data.a)
    u, v = bn_uv_from_delta(xhat, data.g)
    u2, v2 = bn_uv_vmap(ref[idx + 1 :], bn.weight, bn.bias, xhat, y)
    assert rel_err(u2, u) < 1e-10, "vmap/grad per-example gamma grads != sum_t delta x_hat"
    assert rel_err(v2, v) < 1e-10, "vmap/grad per-example beta grads != sum_t delta"
    return u, v


KINDS = ["bn2d", "bn1d", "bn1d_3d", "bn3d"]


@pytest.mark.parametrize("kind", KINDS)
def test_bn_per_example_grads_average_to_grad(kind: str) -> None:
    """(1/N) sum_i u_i == gamma.grad and (1/N) sum_i v_i == beta.grad (brute-force sanity)."""
    model, idx, x, y = _bn_model(kind)
    u, v = _bn_bruteforce(model, idx, x, y)
    grads = reference_grads(model, x, y)
    assert rel_err(u.mean(0), grads[f"{idx}.weight"]) < 1e-12
    assert rel_err(v.mean(0), grads[f"{idx}.bias"]) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_bn_statistics_take_the_batch_mean_and_std_the_forward_computed(kind: str) -> None:
    """In training mode the block reads the batch mean and 1 / std from the forward's
    autograd node (so x_hat costs no second pass over the input); F from them equals F
    from the input alone. In eval mode there is nothing to read."""
    model, idx, x, _ = _bn_model(kind)
    bn = model[idx]
    seen: dict[str, Tensor] = {}

    def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        seen.update(input=inputs[0].detach(), output=output)

    handle = bn.register_forward_hook(keep)
    model(x)
    block = BatchNormBlock("bn", bn, DEFAULT_BN_KAPPA)
    context = block.forward_context(seen["output"])
    assert context is not None
    layer_input = seen["input"]
    dims = [0, *range(2, layer_input.dim())]
    mean, invstd = context
    torch.testing.assert_close(mean, layer_input.mean(dims), rtol=1e-12, atol=1e-12)
    variance = layer_input.var(dims, correction=0)
    torch.testing.assert_close(invstd, torch.rsqrt(variance + bn.eps), rtol=1e-12, atol=1e-12)
    delta = torch.randn_like(seen["output"])
    torch.testing.assert_close(
        block.compute_statistic(0, layer_input, delta, context),
        block.compute_statistic(0, layer_input, delta),
        rtol=1e-12,
        atol=0.0,
    )
    model.eval()
    model(x)
    handle.remove()
    assert block.forward_context(seen["output"]) is None


def test_bn_statistics_read_nothing_under_saved_tensor_hooks_or_below_float32() -> None:
    """Under non-reentrant activation checkpointing, reading the forward's saved tensors
    would recompute the checkpointed forward (BatchNorm's running averages counted three
    times); a bfloat16 layer's mean and 1/std are not read (statistics are float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    head = nn.Linear(3 * 4 * 4, N_CLS)
    opt = make_opt(nn.Sequential(model, head), damping=LAM)
    x, y = torch.randn(N, 2, 6, 6), torch.randint(0, N_CLS, (N,))
    features = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    assert int(model[1].num_batches_tracked) == 1
    cross_entropy(head(features), y).backward()
    opt.step()
    assert int(model[1].num_batches_tracked) == 2  # the one recomputation of the backward
    assert opt.curvature["0.1"].F is not None

    bn = nn.BatchNorm2d(3).bfloat16()
    output = bn(torch.randn(N, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True))
    assert BatchNormBlock("bn", bn, DEFAULT_BN_KAPPA).forward_context(output) is None


@pytest.mark.parametrize("kind", KINDS)
def test_bn_unitwise_fisher_matches_bruteforce(kind: str) -> None:
    """curvature[bn].F == (1/N) sum_i [u v]^T [u v] per channel == full-Fisher 2x2 sub-blocks."""
    model, idx, x, y = _bn_model(kind)
    u, v = _bn_bruteforce(model, idx, x, y)
    Fc = bn_unitwise_fisher(u, v)
    full = bn_full_fisher(u, v)
    C = u.shape[1]
    sub = torch.stack(
        [torch.stack([full[c, c], full[c, C + c], full[C + c, C + c]]) for c in range(C)]
    )
    assert rel_err(Fc, sub) < 1e-12
    assert rel_err(full[C:, :C], full[:C, C:].T) < 1e-12

    opt = make_opt(model, damping=LAM)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()
    assert set(opt.curvature) == {str(idx)}
    F_impl = opt.curvature[str(idx)].F
    assert_rel_close(F_impl, Fc, FACTOR_TOL, "BN F (unit-wise)")
    assert_rel_close(F_impl, sub, FACTOR_TOL, "BN F vs full 2Cx2C Fisher sub-blocks")


@pytest.mark.parametrize("kappa", [None, 4.0], ids=["default_kappa", "kappa4"])
@pytest.mark.parametrize("kind", KINDS)
def test_bn_update_equals_2x2_solve(kind: str, kappa: float | None) -> None:
    """[dgamma_c; dbeta_c] = (F_c + kappa*lam I)^{-1} [grad_gamma_c; grad_beta_c] per channel."""
    model, idx, x, y = _bn_model(kind)
    u, v = _bn_bruteforce(model, idx, x, y)
    Fc = bn_unitwise_fisher(u, v)
    grads = reference_grads(model, x, y)
    lam_bn = (DEFAULT_BN_KAPPA if kappa is None else kappa) * LAM
    exp_g, exp_b = bn_update(Fc, grads[f"{idx}.weight"], grads[f"{idx}.bias"], lam_bn)

    # the closed-form 2x2 inverse agrees with torch.linalg.inv
    fgg, fgb, fbb = Fc[:, 0] + lam_bn, Fc[:, 1], Fc[:, 2] + lam_bn
    D = fgg * fbb - fgb**2
    closed = torch.stack([torch.stack([fbb, -fgb], -1), torch.stack([-fgb, fgg], -1)], -2)
    M = torch.stack([torch.stack([fgg, fgb], -1), torch.stack([fgb, fbb], -1)], -2)
    assert rel_err(closed / D[:, None, None], torch.linalg.inv(M)) < 1e-12

    extra = {} if kappa is None else {"bn_damping_scale": kappa}
    opt = make_opt(model, damping=LAM, **extra)
    before = snapshot(model)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()
    change = param_change(before, model)
    assert_rel_close(change[f"{idx}.weight"], exp_g, UPDATE_TOL, "BN gamma update")
    assert_rel_close(change[f"{idx}.bias"], exp_b, UPDATE_TOL, "BN beta update")
    for k, dv in change.items():
        if not k.startswith(f"{idx}."):
            assert dv.abs().max().item() == 0.0, f"frozen parameter {k} moved"


def test_mixed_conv_bn_linear_model() -> None:
    """Conv -> BN -> Tanh -> Flatten -> Linear, all trainable: every block and update matches.

    With BN downstream the conv's g is n * grad_output of the full batch, which
    includes the batch-statistics coupling; the brute force uses exactly that.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, N_CLS),
    ).double()
    _randomise_bn(model[1])
    torch.manual_seed(1)
    x = torch.randn(N, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (N,))

    ref = copy.deepcopy(model)
    grads = reference_grads(ref, x, y)
    A_c, G_c = conv_factors(ref[0], full_batch_layer_data(ref, ref[0], x, y))
    A_l, G_l = linear_factors(full_batch_layer_data(ref, ref[4], x, y), bias=True)
    u, v = _bn_bruteforce(ref, 1, x, y)
    Fc = bn_unitwise_fisher(u, v)
    U_c = kron_solve(
        A_c[0],
        G_c[0],
        torch.cat([grads["0.weight"].reshape(3, -1), grads["0.bias"][:, None]], 1),
        LAM_MIXED,
    )
    U_l = kron_solve(A_l, G_l, linear_grad_matrix(grads["4.weight"], grads["4.bias"]), LAM_MIXED)
    dg, db = bn_update(Fc, grads["1.weight"], grads["1.bias"], DEFAULT_BN_KAPPA * LAM_MIXED)
    assert_no_rescale_confound(ref[0].weight.detach().reshape(3, -1) - U_c[:, :-1])
    assert_no_rescale_confound(ref[4].weight.detach() - U_l[:, :-1])

    opt = make_opt(model, damping=LAM_MIXED)
    before = snapshot(model)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()
    assert set(opt.curvature) == {"0", "1", "4"}
    assert_rel_close(opt.curvature["0"].A, A_c, FACTOR_TOL, "conv.A")
    assert_rel_close(opt.curvature["0"].G, G_c, FACTOR_TOL, "conv.G")
    assert_rel_close(opt.curvature["4"].A, A_l.unsqueeze(0), FACTOR_TOL, "fc.A")
    assert_rel_close(opt.curvature["4"].G, G_l.unsqueeze(0), FACTOR_TOL, "fc.G")
    assert_rel_close(opt.curvature["1"].F, Fc, FACTOR_TOL, "bn.F")
    change = param_change(before, model)
    assert_rel_close(change["0.weight"].reshape(3, -1), U_c[:, :-1], UPDATE_TOL, "conv.weight")
    assert_rel_close(change["0.bias"], U_c[:, -1], UPDATE_TOL, "conv.bias")
    assert_rel_close(change["4.weight"], U_l[:, :-1], UPDATE_TOL, "fc.weight")
    assert_rel_close(change["4.bias"], U_l[:, -1], UPDATE_TOL, "fc.bias")
    assert_rel_close(change["1.weight"], dg, UPDATE_TOL, "bn.weight")
    assert_rel_close(change["1.bias"], db, UPDATE_TOL, "bn.bias")
