"""Empirical vs Monte-Carlo Fisher: both match their brute-force definitions.

MC protocol (test contract): after the forward and before ``loss.backward()`` call
``labels = opt.sample_fisher(logits)``; the statistics then use gradients of the mean
cross-entropy against the sampled labels, while the update preconditions the true-label gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from tests.curvature._bruteforce import (
    DEFAULT_BN_KAPPA,
    FACTOR_TOL,
    UPDATE_TOL,
    assert_no_rescale_confound,
    assert_rel_close,
    bn_unitwise_fisher,
    bn_update,
    bn_uv_from_delta,
    bn_xhat,
    conv_factors,
    conv_weight_matrix,
    full_batch_layer_data,
    kron_solve,
    linear_factors,
    make_opt,
    param_change,
    reference_grads,
    rel_err,
    snapshot,
)

N = 8
N_CLS = 4
LAM = 0.1


def _model(kind: str) -> tuple[nn.Sequential, Tensor, Tensor]:
    torch.manual_seed(0)
    if kind == "conv":
        model = nn.Sequential(
            nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=2, groups=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, N_CLS),
        )
        x_shape: tuple[int, ...] = (N, 4, 7, 7)
    else:  # "bn": conv -> BN -> tanh -> linear, all trainable
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, N_CLS),
        )
        x_shape = (N, 2, 4, 4)
    model = model.double()
    torch.manual_seed(1)
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (N,))
    return model, x, y


def _expected_stats(ref: nn.Sequential, x: Tensor, labels: Tensor) -> dict[str, dict[str, Tensor]]:
    """Brute-force statistics of every block of ``ref`` computed against ``labels``.

    g is n * grad_output of the mean CE against ``labels`` (full batch); for
    the model without BN this equals the per-example loop (checked in test_conv.py).
    """
    out: dict[str, dict[str, Tensor]] = {}
    for name, m in ref.named_modules():
        if isinstance(m, nn.Conv2d):
            A, G = conv_factors(m, full_batch_layer_data(ref, m, x, labels))
            out[name] = {"A": A, "G": G}
        elif isinstance(m, nn.Linear):
            A, G = linear_factors(full_batch_layer_data(ref, m, x, labels), bias=True)
            out[name] = {"A": A.unsqueeze(0), "G": G.unsqueeze(0)}
        elif isinstance(m, nn.BatchNorm2d):
            data = full_batch_layer_data(ref, m, x, labels)
            u, v = bn_uv_from_delta(bn_xhat(m, data.a), data.g)
            out[name] = {"F": bn_unitwise_fisher(u, v)}
    return out


def _expected_update(
    ref: nn.Sequential, stats: dict[str, dict[str, Tensor]], grads: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Preconditioned true-label gradient for every parameter, from the given statistics."""
    exp: dict[str, Tensor] = {}
    for name, m in ref.named_modules():
        if isinstance(m, nn.Conv2d):
            cout_g = m.out_channels // m.groups
            w, b = torch.empty_like(m.weight), torch.empty_like(m.bias)
            for grp in range(m.groups):
                gmat = conv_weight_matrix(m, grp, grads[f"{name}.weight"], grads[f"{name}.bias"])
                U = kron_solve(stats[name]["A"][grp], stats[name]["G"][grp], gmat, LAM)
                rows = slice(grp * cout_g, (grp + 1) * cout_g)
                w[rows] = U[:, :-1].reshape(w[rows].shape)
                b[rows] = U[:, -1]
            assert_no_rescale_confound((m.weight.detach() - w).reshape(m.out_channels, -1))
            exp[f"{name}.weight"], exp[f"{name}.bias"] = w, b
        elif isinstance(m, nn.Linear):
            gmat = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], 1)
            U = kron_solve(stats[name]["A"][0], stats[name]["G"][0], gmat, LAM)
            assert_no_rescale_confound(m.weight.detach() - U[:, :-1])
            exp[f"{name}.weight"], exp[f"{name}.bias"] = U[:, :-1], U[:, -1]
        elif isinstance(m, nn.BatchNorm2d):
            dg, db = bn_update(
                stats[name]["F"],
                grads[f"{name}.weight"],
                grads[f"{name}.bias"],
                DEFAULT_BN_KAPPA * LAM,
            )
            exp[f"{name}.weight"], exp[f"{name}.bias"] = dg, db
    return exp


def _check(opt, model: nn.Module, before: dict[str, Tensor], stats, exp) -> None:
    assert set(opt.curvature) == set(stats)
    for name, st in stats.items():
        for key, val in st.items():
            assert_rel_close(getattr(opt.curvature[name], key), val, FACTOR_TOL, f"{name}.{key}")
    change = param_change(before, model)
    for k, val in exp.items():
        assert_rel_close(change[k], val, UPDATE_TOL, f"update {k}")


@pytest.mark.parametrize("kind", ["conv", "bn"])
def test_empirical_fisher_matches_bruteforce(kind: str) -> None:
    """fisher='empirical': statistics from the true labels of the same backward pass."""
    model, x, y = _model(kind)
    ref = copy.deepcopy(model)
    stats = _expected_stats(ref, x, y)
    exp = _expected_update(ref, stats, reference_grads(ref, x, y))

    opt = make_opt(model, damping=LAM, fisher="empirical")
    before = snapshot(model)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()
    _check(opt, model, before, stats, exp)


@pytest.mark.parametrize("kind", ["conv", "bn"])
def test_mc_fisher_matches_bruteforce(kind: str) -> None:
    """fisher='mc': statistics from the sampled labels, update from the true-label gradient."""
    model, x, y = _model(kind)
    ref = copy.deepcopy(model)
    grads = reference_grads(ref, x, y)

    opt = make_opt(model, damping=LAM, fisher="mc")
    before = snapshot(model)
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    torch.manual_seed(123)
    labels = opt.sample_fisher(logits)
    assert isinstance(labels, Tensor) and labels.shape == (N,)
    assert labels.dtype == torch.long
    assert int(labels.min()) >= 0 and int(labels.max()) < N_CLS
    assert (labels != y).any(), "test not discriminating: sampled labels equal the true labels"
    for k, p in model.named_parameters():
        assert p.grad is None or p.grad.abs().max().item() == 0.0, f"sample_fisher touched {k}.grad"
    cross_entropy(logits, y).backward()
    for k, p in model.named_parameters():
        assert rel_err(p.grad, grads[k]) < 1e-12, f"{k}.grad is not the true-label gradient"
    opt.step()

    stats = _expected_stats(ref, x, labels)
    exp = _expected_update(ref, stats, grads)
    _check(opt, model, before, stats, exp)
    # the MC statistics really differ from the empirical ones for this batch
    emp = _expected_stats(ref, x, y)
    assert any(rel_err(emp[n]["G"], stats[n]["G"]) > 1e-3 for n in emp if "G" in emp[n])


def test_sample_fisher_draws_from_softmax() -> None:
    """Label frequencies over copies of one example follow softmax(logits); restoring the
    optimizer's state repeats the draw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, N_CLS)).double()
    with torch.no_grad():
        model[2].weight.mul_(4.0)
    x = torch.randn(1, 3, dtype=torch.float64).expand(4000, 3).contiguous()
    opt = make_opt(model, damping=LAM, fisher="mc")
    logits = model(x)
    probs = torch.softmax(logits[0].detach(), dim=0)
    state = opt.state_dict()  # holds the sampling generator's state
    labels = opt.sample_fisher(logits)
    opt.load_state_dict(state)
    labels2 = opt.sample_fisher(model(x))
    assert torch.equal(labels, labels2)
    assert not torch.equal(labels2, opt.sample_fisher(model(x)))
    freq = torch.bincount(labels, minlength=N_CLS).double() / labels.numel()
    sigma = torch.sqrt(probs * (1 - probs) / labels.numel())
    assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-12), (freq, probs)


def test_mc_fisher_with_accumulation_matches_bruteforce() -> None:
    """With ``accumulation_steps=2`` each micro-batch's sampled-label statistics are those of
    its own mean loss (not multiplied by the accumulation count), averaged over the two."""
    model, x, y = _model("conv")
    ref = copy.deepcopy(model)
    grads = reference_grads(ref, x, y)
    opt = make_opt(model, damping=LAM, fisher="mc", accumulation_steps=2)
    before = snapshot(model)
    opt.zero_grad(set_to_none=True)
    halves = (slice(0, N // 2), slice(N // 2, N))
    expected: list[dict[str, dict[str, Tensor]]] = []
    for part in halves:
        logits = model(x[part])
        labels = opt.sample_fisher(logits)
        (cross_entropy(logits, y[part]) / 2).backward()
        expected.append(_expected_stats(ref, x[part], labels))
    opt.step()
    stats = {
        name: {key: (expected[0][name][key] + expected[1][name][key]) / 2 for key in keys}
        for name, keys in expected[0].items()
    }
    _check(opt, model, before, stats, _expected_update(ref, stats, grads))


@pytest.mark.parametrize("kind", ["conv", "bn"])
def test_mc_fisher_with_grad_scaler_matches_bruteforce(kind: str) -> None:
    """A GradScaler's loss scale is taken out of the sampled-label statistics as well."""
    model, x, y = _model(kind)
    ref = copy.deepcopy(model)
    grads = reference_grads(ref, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = make_opt(model, damping=LAM, fisher="mc", grad_scaler=scaler)
    before = snapshot(model)
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    labels = opt.sample_fisher(logits)
    scaler.scale(cross_entropy(logits, y)).backward()
    scaler.step(opt)
    scaler.update()
    stats = _expected_stats(ref, x, labels)
    _check(opt, model, before, stats, _expected_update(ref, stats, grads))
