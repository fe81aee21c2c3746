"""Damped inverses (kept as Cholesky factors) and their fallbacks."""

from __future__ import annotations

import math

import pytest
import torch

from spngd.linalg import (
    CHOLESKY_PAD_MULTIPLE,
    FactorizationError,
    add_to_diagonal,
    batched_cholesky,
    cholesky_ex,
    kronecker_dampings,
    pi_correction,
    robust_cholesky,
    unit_wise_inverse,
)


def _spd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    return (m @ m.T / (2 * d)).unsqueeze(0)


def test_batched_cholesky_flags_every_factor_with_a_non_finite_entry() -> None:
    """A NaN, inf or overflowing value anywhere in a factor's lower triangle marks that
    entry (and only it) as failed, as checking every entry of its Cholesky factor would;
    the upper triangle is not read."""
    good_matrix = _spd(6, 3).float() + torch.eye(6)
    for bad in (float("nan"), float("inf"), -float("inf"), 3e38):
        for row in range(6):
            for column in range(6):
                broken = good_matrix.clone()
                broken[0, row, column] = bad
                lowers, good = batched_cholesky([good_matrix, broken, good_matrix])
                factor, info = torch.linalg.cholesky_ex(broken)
                every_entry = bool(info == 0) and bool(torch.isfinite(factor).all())
                assert good.tolist() == [True, every_entry, True]
                if row > column:
                    assert not every_entry
    torch.testing.assert_close(lowers[0], torch.linalg.cholesky(good_matrix))


def test_pi_and_damping_terms_are_the_papers() -> None:
    """pi = sqrt(mean diag A / mean diag G) (trace norms of equal dimension), A damped by
    pi sqrt(lam) and G by sqrt(lam) / pi (Martens & Grosse's factored Tikhonov damping, which
    SP-NGD uses; docs/optimizer.md)."""
    A, G = _spd(5, 0), _spd(3, 1)
    lam = 1e-2
    pi = math.sqrt((A.diagonal(dim1=1, dim2=2).mean() / G.diagonal(dim1=1, dim2=2).mean()).item())
    assert pi_correction(A, G).item() == pytest.approx(pi, rel=1e-12)
    a_before = A.clone()
    damping_a, damping_g = kronecker_dampings(A, G, lam)
    assert damping_a.item() == pytest.approx(pi * math.sqrt(lam), rel=1e-12)
    assert damping_g.item() == pytest.approx(math.sqrt(lam) / pi, rel=1e-12)
    damped = add_to_diagonal(A, damping_a)
    torch.testing.assert_close(damped[0], A[0] + pi * math.sqrt(lam) * torch.eye(5).double())
    torch.testing.assert_close(A, a_before)  # damping never written into the factors


def test_zero_factor_falls_back_to_pi_one() -> None:
    A, G = torch.zeros(1, 4, 4), _spd(3, 2).float()
    assert pi_correction(A, G).item() == 1.0
    damping_a, damping_g = kronecker_dampings(A, G, 1e-4)
    assert damping_a.item() == pytest.approx(1e-2) and damping_g.item() == pytest.approx(1e-2)
    lower_a = robust_cholesky(add_to_diagonal(A, damping_a))
    torch.testing.assert_close(lower_a[0], torch.eye(4) * 0.1)  # (1e-2 I)^(1/2)


@pytest.mark.parametrize("size", [CHOLESKY_PAD_MULTIPLE, 2 * CHOLESKY_PAD_MULTIPLE, 100])
def test_cholesky_ex_gives_torchs_factor_and_layout_at_padded_and_other_sizes(size: int) -> None:
    """Padded or not, the factor is LAPACK's, in its column-major layout, for a batch."""
    matrices = torch.cat([_spd(size, 0), _spd(size, 1)])
    lower, info = cholesky_ex(matrices)
    expected, expected_info = torch.linalg.cholesky_ex(matrices)
    torch.testing.assert_close(lower, expected, rtol=1e-12, atol=1e-12)
    assert info.tolist() == expected_info.tolist() == [0, 0]
    assert lower.stride() == expected.stride()
    single = cholesky_ex(matrices.float())[0]
    torch.testing.assert_close(single, expected.float(), rtol=1e-4, atol=1e-5)


def test_cholesky_ex_reports_a_factor_that_is_not_positive_definite_at_a_padded_size() -> None:
    """The padding's identity rows factorise; the failure reported is the matrix's own."""
    size = CHOLESKY_PAD_MULTIPLE
    indefinite = _spd(size, 2).clone()
    indefinite[0, 5, 5] = -1.0
    _, info = cholesky_ex(torch.cat([_spd(size, 3), indefinite]))
    _, expected = torch.linalg.cholesky_ex(indefinite)
    assert info.tolist() == [0, int(expected)]
    _, good = batched_cholesky([_spd(size, 3).float(), indefinite.float()])
    assert good.tolist() == [True, False]


def test_cholesky_failure_is_retried_in_float64_then_with_jitter() -> None:
    singular = torch.zeros(2, 3, 3)  # not positive definite at all: needs jitter
    lower = robust_cholesky(singular)
    assert lower.dtype == torch.float32
    assert torch.isfinite(torch.cholesky_solve(torch.ones(2, 3, 1), lower)).all()
    # indefinite in float32 round-off, fine in float64
    v = torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nearly = (v @ v.T + 1e-9 * torch.eye(6, dtype=torch.float64)).float()
    lower = robust_cholesky(nearly.unsqueeze(0))
    torch.testing.assert_close(lower @ lower.mT, nearly.unsqueeze(0), rtol=1e-5, atol=1e-5)


def test_nonfinite_factor_raises_a_clear_error() -> None:
    bad = _spd(3, 3).clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(FactorizationError, match="NaN or inf"):
        robust_cholesky(bad)


def test_unit_wise_inverse_matches_linalg_inv() -> None:
    gen = torch.Generator().manual_seed(4)
    u, v = torch.randn(7, 5, generator=gen, dtype=torch.float64).unbind(0)[:2]
    F = torch.stack((u * u, u * v, v * v), dim=1)
    inverse, valid = unit_wise_inverse(F, 0.1)
    assert bool(valid)
    singular = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)  # (1, 1) (1, 1)^T
    assert not bool(unit_wise_inverse(singular, 0.0)[1])
    assert not bool(unit_wise_inverse(singular * math.inf, 0.1)[1])
    for c in range(5):
        block = torch.tensor([[F[c, 0], F[c, 1]], [F[c, 1], F[c, 2]]], dtype=torch.float64)
        expected = torch.linalg.inv(block + 0.1 * torch.eye(2, dtype=torch.float64))
        got = torch.tensor(
            [[inverse[c, 0], inverse[c, 1]], [inverse[c, 1], inverse[c, 2]]], dtype=torch.float64
        )
        torch.testing.assert_close(got, expected)


def test_batched_inversion_equals_one_block_at_a_time() -> None:
    """Same-sized factors of several layers share one Cholesky call: each block's factors
    reproduce its damped factors built independently (explicit pi and identity, float64),
    and the proposals' validity flags say which factorisations held: a block whose factor
    holds NaN comes back invalid, for the optimizer to take the fallback path."""
    from torch import nn

    from spngd.curvature import LinearBlock
    from spngd.curvature.kronecker import update_inverses
    from tests.curvature._bruteforce import damped_factors

    torch.manual_seed(0)
    blocks = [LinearBlock(f"fc{i}", nn.Linear(6, 4).double()) for i in range(4)]
    for block in blocks:
        block.factors = [_spd(7, 10 + int(block.name[-1])), _spd(4, 20 + int(block.name[-1]))]
    blocks[2].factors[0] = torch.zeros(1, 7, 7, dtype=torch.float64)  # pi falls back to 1
    blocks[3].factors[1] = torch.full((1, 4, 4), float("nan"), dtype=torch.float64)
    proposals = update_inverses([(block, 1e-3) for block in blocks])
    valid = {block.name: bool(flag) for block, _, flag in proposals}
    assert valid == {"fc0": True, "fc1": True, "fc2": True, "fc3": False}
    for block in blocks[:3]:
        A, G = block.factors[0][0], block.factors[1][0]
        if not A.any():  # pi = 1 for an all-zero factor
            A_d, G_d = damped_factors(A, G, 1e-3, use_pi=False)
        else:
            A_d, G_d = damped_factors(A, G, 1e-3)
        lower_a, lower_g = block.inverse_form
        torch.testing.assert_close(lower_a[0] @ lower_a[0].T, A_d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lower_g[0] @ lower_g[0].T, G_d, rtol=1e-10, atol=1e-12)
        assert block.inverse_damping == 1e-3


def test_a_reused_inverse_is_formed_once_and_agrees_with_the_solves() -> None:
    """Gradients after a refresh go through triangular solves until those would have cost
    about what forming costs (a small factor at once), then each factor's inverse is formed
    from its Cholesky factor and applied by products, with the same result."""
    from torch import nn

    from spngd.curvature import LinearBlock

    block = LinearBlock("fc", nn.Linear(6, 4).double())
    block.factors = [_spd(7, 30), _spd(4, 31)]
    block.update_inverse(1e-3)
    gen = torch.Generator().manual_seed(5)
    grads = [
        torch.randn(4, 6, generator=gen, dtype=torch.float64),
        torch.randn(4, generator=gen, dtype=torch.float64),
    ]
    results = []
    formed_at = {}
    for use in range(8):
        results.append(block.precondition(grads))
        for which in (0, 1):
            if block.explicit_inverse and block.explicit_inverse[which] is not None:
                formed_at.setdefault(which, use)
    # formed once the uses reach d / k: G (d 4, k 7) at once, A (d 7, k 4) at its second use
    assert formed_at == {1: 0, 0: 1}
    formed = block.explicit_inverse
    block.precondition(grads)
    assert block.explicit_inverse is formed  # formed once, then reused
    first = results[0]
    for later in results[1:]:
        for a, b in zip(first, later, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # against the explicit Kronecker solve of the damped factors
    damping_a, damping_g = kronecker_dampings(*block.factors, 1e-3)
    a_damped = add_to_diagonal(block.factors[0], damping_a)
    g_damped = add_to_diagonal(block.factors[1], damping_g)
    matrix = torch.cat((grads[0], grads[1][:, None]), dim=1)
    expected = torch.linalg.solve(g_damped[0], matrix) @ torch.linalg.inv(a_damped[0])
    torch.testing.assert_close(torch.cat((first[0], first[1][:, None]), dim=1), expected)
    block.update_inverse(1e-2)  # a new inverse drops the formed one
    assert block.explicit_inverse is None and block.inverse_uses == 0
