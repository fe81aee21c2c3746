"""The Kronecker damping ``(G ⊗ A + lam I)^-1`` against explicit Kronecker solves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spngd import SPNGD
from spngd.curvature import KroneckerBlock
from tests.curvature._bruteforce import rel_err, snapshot

LAM = 0.05


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 16, 3),
    ).double()


def _batch(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, 4, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=gen
    )


def _plain_step(model: nn.Module, opt: SPNGD, seed: int) -> dict[str, Tensor]:
    """One step at lr 1 without momentum; returns the update of every parameter."""
    before = snapshot(model)
    x, y = _batch(seed)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}  # type: ignore[union-attr]
    opt.step()
    return {name: before[name] - p.detach() for name, p in model.named_parameters()} | {
        f"grad {name}": g for name, g in grads.items()
    }


def _expected(block: KroneckerBlock, weight_grad: Tensor, bias_grad: Tensor, lam: float) -> Tensor:
    """Per group, ``solve(kron(G, A) + lam I, vec(grad))``, in the layer's weight layout."""
    matrix = block.gradient_matrix([weight_grad, bias_grad])
    out = torch.empty_like(matrix)
    for g in range(block.groups):
        A, G = block.factors[0][g], block.factors[1][g]  # type: ignore[index]
        big = torch.kron(G, A) + lam * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
        out[g] = torch.linalg.solve(big, matrix[g].flatten()).reshape(matrix[g].shape)
    return out


def _assert_updates_exact(opt: SPNGD, change: dict[str, Tensor], lam: float) -> None:
    for name, block in opt.curvature.items():
        assert isinstance(block, KroneckerBlock)
        want = _expected(block, change[f"grad {name}.weight"], change[f"grad {name}.bias"], lam)
        got = block.gradient_matrix([change[f"{name}.weight"], change[f"{name}.bias"]])
        assert rel_err(got, want) < 1e-10, name


def test_kronecker_damping_equals_the_explicit_kronecker_solve() -> None:
    model = _model()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=LAM, damping_form="kronecker")
    change = _plain_step(model, opt, seed=0)
    _assert_updates_exact(opt, change, LAM)
    # The factored (pi) damping gives a visibly different update on the same problem.
    factored = _model()
    other = _plain_step(factored, SPNGD(factored, lr=1.0, momentum=0.0, damping=LAM), seed=0)
    assert rel_err(other["0.weight"], change["0.weight"]) > 1e-3


def test_refreshing_one_factor_keeps_the_others_eigendecomposition() -> None:
    model = _model()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=LAM, damping_form="kronecker")
    _plain_step(model, opt, seed=0)
    kept = {name: block.eigen[1] for name, block in opt.curvature.items()}
    for block in opt.curvature.values():
        block.to_compute = [True, False]  # A only: G and its eigendecomposition stay
    change = _plain_step(model, opt, seed=1)
    for name, block in opt.curvature.items():
        assert block.eigen[1] is kept[name]
        assert block.eigen[0] is not None
    _assert_updates_exact(opt, change, LAM)  # exactly what refactorising both gives


def test_a_new_damping_rescales_without_a_new_eigendecomposition() -> None:
    model = _model()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=LAM, damping_form="kronecker")
    _plain_step(model, opt, seed=0)
    kept = {name: list(block.eigen) for name, block in opt.curvature.items()}
    for block in opt.curvature.values():
        block.to_compute = [False, False]
    opt.param_groups[0]["damping"] = 0.2
    change = _plain_step(model, opt, seed=1)
    for name, block in opt.curvature.items():
        assert block.eigen[0] is kept[name][0] and block.eigen[1] is kept[name][1]
    _assert_updates_exact(opt, change, 0.2)


def test_kronecker_damping_resumes_exactly_from_a_state_dict() -> None:
    model = _model()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=LAM, damping_form="kronecker")
    _plain_step(model, opt, seed=0)
    twin = _model()
    twin.load_state_dict(model.state_dict())
    resumed = SPNGD(twin, lr=1.0, momentum=0.0, damping=LAM, damping_form="kronecker")
    resumed.load_state_dict(opt.state_dict())
    for block in (*opt.curvature.values(), *resumed.curvature.values()):
        block.to_compute = [False, True]  # G only: A's eigendecomposition must be recomputed
    first, second = _plain_step(model, opt, seed=1), _plain_step(twin, resumed, seed=1)
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=1e-12, atol=1e-14)


def test_unknown_damping_form_is_rejected() -> None:
    with pytest.raises(ValueError, match="damping_form must be one of"):
        SPNGD(_model(), lr=0.1, damping_form="diagonal")


def _factored_expected(
    block: KroneckerBlock, weight_grad: Tensor, bias_grad: Tensor, lam: float, damping_a: Tensor
) -> Tensor:
    """Per group, ``solve(kron(G + lam/d_A I, A + d_A I), vec(grad))`` for the given ``d_A``."""
    matrix = block.gradient_matrix([weight_grad, bias_grad])
    out = torch.empty_like(matrix)
    for g in range(block.groups):
        A, G = block.factors[0][g], block.factors[1][g]  # type: ignore[index]
        a_damped = A + damping_a[g] * torch.eye(A.shape[0], dtype=A.dtype)
        g_damped = G + lam / damping_a[g] * torch.eye(G.shape[0], dtype=G.dtype)
        big = torch.kron(g_damped, a_damped)
        out[g] = torch.linalg.solve(big, matrix[g].flatten()).reshape(matrix[g].shape)
    return out


def _pi_damping(block: KroneckerBlock, lam: float) -> Tensor:
    """``pi sqrt(lam)`` from the block's current factors, computed here from traces."""
    A, G = block.factors  # type: ignore[misc]
    mean_a = torch.diagonal(A, dim1=-2, dim2=-1).mean(-1)
    mean_g = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    return torch.sqrt(mean_a / mean_g) * lam**0.5


def test_keep_a_refreshes_g_alone_against_a_s_kept_factorisation_and_damping() -> None:
    """``factored-keep-a`` (the default): a step that refreshes only G keeps A's Cholesky
    factor and its damping ``d_A`` and damps the new G by ``lam / d_A``, exactly; a refresh
    of A computes pi from the current factors again."""
    model = _model()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=LAM, stat_interval=1)
    _plain_step(model, opt, seed=0)
    kept = {name: (block.inverse_form[0], block.a_damping) for name, block in opt.curvature.items()}
    for block in opt.curvature.values():
        block.to_compute = [False, True]
    change = _plain_step(model, opt, seed=1)
    for name, block in opt.curvature.items():
        lower_a, damping_a = kept[name]
        assert block.inverse_form[0] is lower_a and block.a_damping is damping_a
        assert rel_err(_pi_damping(block, LAM), damping_a) > 1e-3  # pi has moved with G
        want = _factored_expected(
            block, change[f"grad {name}.weight"], change[f"grad {name}.bias"], LAM, damping_a
        )
        got = block.gradient_matrix([change[f"{name}.weight"], change[f"{name}.bias"]])
        assert rel_err(got, want) < 1e-10, name
    for block in opt.curvature.values():
        block.to_compute = [True, False]
    change = _plain_step(model, opt, seed=2)
    for name, block in opt.curvature.items():
        assert block.inverse_form[0] is not kept[name][0]
        torch.testing.assert_close(block.a_damping, _pi_damping(block, LAM), rtol=1e-12, atol=0)
        want = _factored_expected(
            block,
            change[f"grad {name}.weight"],
            change[f"grad {name}.bias"],
            LAM,
            block.a_damping,
        )
        got = block.gradient_matrix([change[f"{name}.weight"], change[f"{name}.bias"]])
        assert rel_err(got, want) < 1e-10, name


def test_the_paper_s_factored_damping_refactorises_both_when_g_alone_is_refreshed() -> None:
    model = _model()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=LAM, stat_interval=1, damping_form="factored")
    _plain_step(model, opt, seed=0)
    kept = {name: block.inverse_form[0] for name, block in opt.curvature.items()}
    for block in opt.curvature.values():
        block.to_compute = [False, True]
    change = _plain_step(model, opt, seed=1)
    for name, block in opt.curvature.items():
        assert block.inverse_form[0] is not kept[name]
        damping_a = _pi_damping(block, LAM)
        want = _factored_expected(
            block, change[f"grad {name}.weight"], change[f"grad {name}.bias"], LAM, damping_a
        )
        got = block.gradient_matrix([change[f"{name}.weight"], change[f"{name}.bias"]])
        assert rel_err(got, want) < 1e-10, name


def test_keep_a_resumes_exactly_from_a_state_dict() -> None:
    """The kept damping of A travels in the state dict: a resumed optimizer refreshing G
    alone takes the same step as the original."""
    model = _model()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=LAM, stat_interval=1)
    _plain_step(model, opt, seed=0)
    twin = _model()
    twin.load_state_dict(model.state_dict())
    resumed = SPNGD(twin, lr=1.0, momentum=0.0, damping=LAM, stat_interval=1)
    resumed.load_state_dict(opt.state_dict())
    for block in (*opt.curvature.values(), *resumed.curvature.values()):
        block.to_compute = [False, True]
    first, second = _plain_step(model, opt, seed=1), _plain_step(twin, resumed, seed=1)
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=1e-12, atol=1e-14)
