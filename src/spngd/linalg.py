"""Damped inverses of symmetric positive semi-definite factors, with numerical fallbacks.

Kronecker factors' inverses are kept as Cholesky factors and applied by triangular solves
(see :func:`robust_cholesky`), or, for the exact Kronecker damping, as eigendecompositions
(:func:`robust_eigh`); BatchNorm's 2x2 blocks are inverted in closed form.
Everything works on batches ``(..., d, d)`` so that same-shaped factors (the groups of a
grouped convolution, or several layers) are factorised in one call.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import pad

MIN_DAMPING = 1e-7
"""Floor for each factor's damping term (ASDL does the same)."""

JITTER_STEPS = (1e-6, 1e-4, 1e-2)
"""Relative jitter (times the mean diagonal) tried when a Cholesky factorisation fails."""


CHOLESKY_PAD_MULTIPLE = 128
"""On CPU, factors whose size is a multiple of this are factorised padded (see
:func:`cholesky_ex`)."""
CHOLESKY_PAD = 8
"""Rows and columns of identity that pad such a factor."""


class FactorizationError(RuntimeError):
    """Raised when a factor cannot be inverted even in float64 with jitter."""


def pi_correction(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Trace-norm pi = sqrt((tr A / d_A) / (tr G / d_G)) per batch entry (see
    docs/optimizer.md, Conventions).

    Entries where pi is 0, inf or NaN (an all-zero factor) fall back to pi = 1, so the
    damping is still split evenly between the two factors.
    """
    mean_diag_a = torch.diagonal(A, dim1=-2, dim2=-1).mean(-1)
    mean_diag_g = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    pi = torch.sqrt(mean_diag_a / mean_diag_g)
    bad = ~torch.isfinite(pi) | (pi <= 0)
    return torch.where(bad, torch.ones_like(pi), pi)


def add_to_diagonal(matrix: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Return ``matrix + value * I`` (``value`` broadcast over the batch dimensions), as a
    copy whose diagonal is added to in place: one pass over the matrix, against three for
    building ``value * I`` and adding it (0.05 against 0.18 ms at ``d = 577``)."""
    out = matrix.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(value[..., None])
    return out


def kronecker_dampings(
    A: torch.Tensor, G: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pi-corrected dampings ``pi sqrt(lam)`` of ``A`` and ``sqrt(lam)/pi`` of ``G``,
    one per batch entry, each at least :data:`MIN_DAMPING`."""
    pi = pi_correction(A, G)
    root = math.sqrt(damping)
    return torch.clamp(pi * root, min=MIN_DAMPING), torch.clamp(root / pi, min=MIN_DAMPING)


def batched_cholesky(matrices: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Lower Cholesky factors of many same-shaped ``(b_i, d, d)`` SPD batches in one call.

    Nothing is read from the device here: the second result holds, per entry of
    ``matrices``, whether its factorisation succeeded and is finite (a bool tensor), for
    the caller to read with its other checks and retry a failed entry with
    :func:`robust_cholesky`. Finite means a finite diagonal: every entry below the diagonal
    enters the sum under a later diagonal entry's square root, so a NaN or inf anywhere
    in the factor reaches the diagonal (checking all ``d^2`` entries took 0.4x the
    factorisation's time at ``d = 577``).
    """
    lower, info = cholesky_ex(torch.cat(matrices))
    diagonal = torch.diagonal(lower, dim1=-2, dim2=-1)
    good = (info == 0) & torch.isfinite(diagonal).all(-1)
    sizes = [matrix.shape[0] for matrix in matrices]
    return list(lower.split(sizes)), _all_per_entry(good, sizes)


def batched_eigh(
    matrices: list[torch.Tensor],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None:
    """Eigendecompositions ``(eigenvalues, eigenvectors)`` of many same-shaped ``(b_i, d, d)``
    symmetric batches in one call, eigenvalues clamped at 0 (the factors are positive
    semi-definite; rounding can make the smallest slightly negative).

    As :func:`batched_cholesky`, with the per-entry finiteness on the device; None when the
    call itself fails (then retry each entry with :func:`robust_eigh`).
    """
    try:
        values, vectors = torch.linalg.eigh(torch.cat(matrices))
    except RuntimeError:
        return None
    good = torch.isfinite(values).all(-1) & torch.isfinite(vectors).flatten(1).all(1)
    sizes = [matrix.shape[0] for matrix in matrices]
    parts = list(zip(values.clamp(min=0.0).split(sizes), vectors.split(sizes), strict=True))
    return parts, _all_per_entry(good, sizes)


def _all_per_entry(good: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per consecutive run of ``sizes`` rows of ``good``, whether all are True."""
    if all(size == 1 for size in sizes):
        return good
    return torch.stack([chunk.all() for chunk in good.split(sizes)])


def robust_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`batched_eigh` of one batch, retried in float64 (result cast back) when it
    fails; :class:`FactorizationError` when that fails too or the input is not finite."""
    if not torch.isfinite(matrix).all():
        raise FactorizationError("factor contains NaN or inf")
    for attempt in (matrix, matrix.double()):
        result = batched_eigh([attempt])
        if result is not None and bool(result[1].all()):
            values, vectors = result[0][0]
            return values.to(matrix.dtype), vectors.to(matrix.dtype)
    raise FactorizationError("eigendecomposition failed in float64")


def robust_cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors ``L`` (``L L^T = matrix``) of symmetric positive definite
    matrices, which stand for their inverses.

    Applying the inverse takes two triangular solves (``torch.cholesky_solve``), which for
    a factor refreshed at every step is several times cheaper than forming ``L^-T L^-1``
    first (on CPU, for ResNet factors d = 576..4608: 2-4x per refresh); Cholesky is what
    the authors' code uses. A failed factorisation is retried in float64, then with
    growing jitter on the diagonal (the result is cast back to the input's dtype);
    :class:`FactorizationError` is raised only if all fail or the input is not finite.
    """
    if not torch.isfinite(matrix).all():
        raise FactorizationError("factor contains NaN or inf")
    lower = _cholesky_or_none(matrix)
    if lower is not None:
        return lower
    wide = matrix.double()
    scale = torch.diagonal(wide, dim1=-2, dim2=-1).abs().mean(-1).clamp(min=1.0)
    for jitter in (0.0, *JITTER_STEPS):
        lower = _cholesky_or_none(add_to_diagonal(wide, jitter * scale))
        if lower is not None:
            return lower.to(matrix.dtype)
    raise FactorizationError("Cholesky failed in float64 even with jitter")


def _cholesky_or_none(matrix: torch.Tensor) -> torch.Tensor | None:
    """Cholesky factor, or None when the factorisation fails or the result is not finite."""
    lower, info = cholesky_ex(matrix)
    if bool((info != 0).any()) or not torch.isfinite(lower).all():
        return None
    return lower


def cholesky_ex(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex``: the lower Cholesky factors of ``(..., d, d)`` matrices and
    the LAPACK status per matrix (0: success), the factors in LAPACK's column-major layout.

    On CPU, a size ``d`` that is a multiple of :data:`CHOLESKY_PAD_MULTIPLE` is factorised
    as the block-diagonal ``[[M, 0], [0, I]]`` with :data:`CHOLESKY_PAD` rows of identity,
    whose factor is ``[[L, 0], [0, I]]``: the same ``L``, computed on a matrix whose
    leading dimension is not such a multiple. On an AVX-512 Xeon, MKL's factorisation,
    which torch's CPU build calls, runs several times slower at those sizes, the ones
    ResNets' channel counts give (2 threads, ms per factorisation, plain against padded:
    ``d = 1024`` 10.3 against 2.6, 2048 45 against 22, 4096 249 against 142, 128 0.09
    against 0.04; at sizes that are not multiples it is no faster, e.g. 1000: 2.2 against
    2.8, 2049: 17.8 against 25.0). On an AVX2 AMD EPYC the padded form ran 0.6x to 1.4x
    as fast, by size, with no clear gain or loss (docs/performance.md).
    """
    size = matrix.shape[-1]
    if matrix.device.type != "cpu" or size % CHOLESKY_PAD_MULTIPLE:
        return torch.linalg.cholesky_ex(matrix)
    padded = pad(matrix, (0, CHOLESKY_PAD, 0, CHOLESKY_PAD))
    padded.diagonal(dim1=-2, dim2=-1)[..., size:] = 1.0
    lower, info = torch.linalg.cholesky_ex(padded)
    return lower[..., :size, :size].mT.contiguous().mT, info


def unit_wise_inverse(F: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form inverses of the damped 2x2 blocks ``[[f_gg, f_gb], [f_gb, f_bb]] + lam I``.

    ``F`` has shape ``(C, 3)`` holding ``(f_gg, f_gb, f_bb)`` per channel; the first result
    has the same layout holding the entries of each inverse (the paper's unit-wise
    Fisher). The second is a 0-dim bool tensor: whether every block was invertible and
    the result finite (not read here).
    """
    f_gg = F[:, 0] + damping
    f_gb = F[:, 1]
    f_bb = F[:, 2] + damping
    det = f_gg * f_bb - f_gb * f_gb
    inverse = torch.stack((f_bb, -f_gb, f_gg), dim=1) / det[:, None]
    return inverse, (det > 0).all() & torch.isfinite(inverse).all()
