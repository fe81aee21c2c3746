"""Kronecker-factored (K-FAC) blocks: the part shared by Linear and Conv2d.

The Fisher of a weight ``W`` (``d_G x d_A``, bias as the last column) is approximated by
``G ⊗ A`` per group (K-FAC for Linear, KFC for convolutions; docs/optimizer.md,
Conventions). With pi-corrected factored Tikhonov damping the preconditioned gradient is
``(G + sqrt(lam)/pi I)^-1 grad (A + pi sqrt(lam) I)^-1``.

Two damping forms (``damping_form``):

- ``"factored"`` (default, the paper's): the two damped factors' inverses are kept as their
  Cholesky factors (``inverse`` holds ``(L_A, L_G)``). The first gradients after a
  refresh are preconditioned by triangular solves (cheap when statistics are refreshed
  every step); an inverse used often enough is formed once, as ``L^-T L^-1``, and applied
  by matrix products from then on (a product is several times faster than the solves).
  A refresh of either factor refactorises both, since pi moves both dampings: on CPU a
  symmetric eigendecomposition costs 13-17x a Cholesky factorisation at
  ``d = 145..1153``, so keeping the factors' eigendecompositions (where a new damping is a
  diagonal change) would pay only for a factor refreshed less than about once in six of
  its layer's inversions.
- ``"kronecker"``: the exact damping of the Kronecker product, ``(G ⊗ A + lam I)^-1``
  (kfac-pytorch's default), applied in the factors' eigenbases:
  ``Q_G [(Q_G^T grad Q_A) / (lambda_G lambda_A^T + lam)] Q_A^T``. Each factor's
  eigendecomposition is recomputed only when that factor is refreshed; a new damping
  recomputes the scaling alone (``inverse`` holds ``(Q_A, Q_G, scaling)``). On CUDA
  ``torch.linalg.eigh`` reads its status on the host: each batched eigendecomposition
  waits for the device once.

Subclasses say how ``A`` and ``G`` come from a layer's input and output gradient, and how
the parameters' gradients map to and from the ``(groups, d_G, d_A)`` matrix.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from spngd.curvature.base import CurvatureBlock
from spngd.linalg import (
    batched_cholesky,
    batched_eigh,
    damped_kronecker_cholesky,
    damped_kronecker_factors,
    inverse_from_cholesky,
    robust_eigh,
)

DAMPING_FORMS = ("factored", "kronecker")
"""The damping forms of Kronecker blocks; the first is the default."""


class KroneckerBlock(CurvatureBlock):
    """Block with factors ``(A, G)`` of shapes ``(groups, d_A, d_A)`` and ``(groups, d_G, d_G)``."""

    groups: int = 1
    statistic_names = ("A", "G")
    halves_combine = True
    damping_form: str = DAMPING_FORMS[0]
    """``"factored"`` or ``"kronecker"`` (module docstring); set before the first inverse."""

    restorable = (*CurvatureBlock.restorable, "eigen")

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        super().__init__(name, module)
        self.eigen: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
        """Kronecker damping: per factor, ``(eigenvalues, eigenvectors)`` of its current
        value (None until computed, and again whenever the factor changes)."""

    a_dim: int
    """Size of ``A`` per group (input features x kernel, +1 with a bias)."""
    g_dim: int
    """Size of ``G`` per group (output features)."""

    @abstractmethod
    def a_factor(self, inputs: torch.Tensor) -> torch.Tensor:
        """``A = (1/n) sum over examples (and locations) of a a^T``, bias-augmented."""

    @abstractmethod
    def g_factor(self, grad_output: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``G`` from ``g = n * grad_output`` (averaged over locations)."""

    @abstractmethod
    def gradient_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Parameter gradients as a ``(groups, d_G, d_A)`` matrix (bias column last)."""

    @abstractmethod
    def split_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`gradient_matrix`: one tensor per parameter."""

    @property
    def inverse_kind(self) -> str:  # type: ignore[override]
        return "cholesky" if self.damping_form == "factored" else "eigen-kronecker"

    def update_factors(self, fresh: tuple[torch.Tensor | None, ...], stat_decay: float) -> None:
        super().update_factors(fresh, stat_decay)
        for i, new in enumerate(fresh):
            if new is not None:
                self.eigen[i] = None

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        self.eigen[:] = [None, None]

    statistic_symmetric = True

    def statistic_shape(self, index: int) -> tuple[int, ...]:
        dim = self.a_dim if index == 0 else self.g_dim
        return (self.groups, dim, dim)

    @property
    def A(self) -> torch.Tensor | None:
        return self.factors[0]

    @property
    def G(self) -> torch.Tensor | None:
        return self.factors[1]

    def compute_statistic(
        self, index: int, inputs: torch.Tensor, grad_output: torch.Tensor
    ) -> torch.Tensor:
        if index == 0:
            return self.a_factor(inputs)
        return self.g_factor(grad_output, self.batch_size(inputs))

    def compute_inverse(self, damping: float) -> tuple[torch.Tensor, ...]:
        A, G = self.factors  # type: ignore[misc]
        if self.damping_form == "factored":
            return damped_kronecker_cholesky(A, G, damping)
        for i, factor in enumerate(self.factors):
            if self.eigen[i] is None:
                self.eigen[i] = robust_eigh(factor)  # type: ignore[arg-type]
        return self.kronecker_inverse(damping)

    def kronecker_inverse(self, damping: float) -> tuple[torch.Tensor, ...]:
        """``(Q_A, Q_G, 1 / (lambda_G lambda_A^T + lam))`` from the current eigendecompositions."""
        (values_a, vectors_a), (values_g, vectors_g) = self.eigen  # type: ignore[misc]
        scaling = 1.0 / (values_g[:, :, None] * values_a[:, None, :] + damping)
        return vectors_a, vectors_g, scaling

    def damped_factors(self, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        A, G = self.factors  # type: ignore[misc]
        return damped_kronecker_factors(A, G, damping)

    def apply_inverse(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.damping_form == "kronecker":
            vectors_a, vectors_g, scaling = self.inverse  # type: ignore[misc]
            matrix = self.gradient_matrix(grads).to(vectors_a.dtype)
            rotated = vectors_g.mT @ matrix @ vectors_a
            update = vectors_g @ (rotated * scaling) @ vectors_a.mT
            return [u.to(g.dtype) for u, g in zip(self.split_matrix(update), grads, strict=True)]
        lower_a, _ = self.inverse  # type: ignore[misc]
        matrix = self.gradient_matrix(grads).to(lower_a.dtype)
        right = self._apply_factor(0, matrix.mT).mT  # grad A^-1 (A is symmetric)
        update = self._apply_factor(1, right)  # G^-1 grad A^-1
        return [u.to(g.dtype) for u, g in zip(self.split_matrix(update), grads, strict=True)]

    def _apply_factor(self, which: int, rhs: torch.Tensor) -> torch.Tensor:
        """``X^-1 rhs`` for damped factor ``which`` (0: ``A``, 1: ``G``) from its Cholesky
        factor: by two triangular solves until those have cost about what forming the
        inverse costs, then by products with the inverse, formed once.

        Forming ``L^-T L^-1`` costs about ``d^3`` and saves about ``d^2 k`` per use (``k``
        the other factor's size), so the inverse is formed at use ``ceil(d / k)``: ``G``
        (small) at its second use, ``A`` of a 3x3 convolution after about nine. Inverses
        that are refreshed every step or two are never formed.
        """
        lower = self.inverse[which]  # type: ignore[index]
        formed = list(self.formed_inverse or (None, None))
        if formed[which] is None:
            size, other = lower.shape[-1], rhs.shape[-1]
            if self.inverse_uses < max(1, -(-size // other)):
                return torch.cholesky_solve(rhs.to(lower.dtype), lower)
            formed[which] = inverse_from_cholesky(lower)
            self.formed_inverse = tuple(formed)  # type: ignore[assignment]
        return torch.matmul(formed[which], rhs.to(lower.dtype))

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None


def append_bias_moments(
    second_moment: torch.Tensor, first_moment: torch.Tensor, count: float
) -> torch.Tensor:
    """Augment ``sum a a^T`` with the row/column of ``sum a`` and the corner ``count``.

    That is the second moment of ``[a; 1]``: the bias acts as a weight on a constant 1.
    Shapes: ``(g, d, d)``, ``(g, d)`` -> ``(g, d + 1, d + 1)``.
    """
    groups, dim, _ = second_moment.shape
    out = second_moment.new_empty(groups, dim + 1, dim + 1)
    out[:, :dim, :dim] = second_moment
    out[:, :dim, dim] = first_moment
    out[:, dim, :dim] = first_moment
    out[:, dim, dim] = count
    return out


def update_inverses(
    due: list[tuple[CurvatureBlock, float]],
) -> list[tuple[CurvatureBlock, float, torch.Tensor]]:
    """Refresh the inverses of several blocks at their dampings, without reading the device.

    Kronecker factors of the same size (the repeated layers of a ResNet stage, the groups of
    a grouped convolution) go through one batched Cholesky call, or, with the Kronecker
    damping, one batched eigendecomposition of the factors that changed; other blocks
    :meth:`~CurvatureBlock.propose_inverse`. Returns each block whose new inverse is in use
    unchecked, with its damping and a 0-dim bool tensor saying whether it is valid: the
    caller reads those together and, for a block where it is False, restores the state it
    saved and takes :meth:`~CurvatureBlock.update_inverse`'s path with fallbacks.
    """
    by_size: dict[tuple[str, int, torch.dtype, torch.device], list[tuple[int, int, torch.Tensor]]]
    by_size = {}
    damped: dict[int, tuple[torch.Tensor, ...]] = {}
    for index, (block, damping) in enumerate(due):
        if not (isinstance(block, KroneckerBlock) and block.ready):
            continue
        if block.damping_form == "factored":
            damped[index] = block.damped_factors(damping)
            to_factorise = list(enumerate(damped[index]))
        else:
            to_factorise = [(i, f) for i, f in enumerate(block.factors) if block.eigen[i] is None]
        for which, matrix in to_factorise:
            key = (block.damping_form, matrix.shape[-1], matrix.dtype, matrix.device)
            by_size.setdefault(key, []).append((index, which, matrix))
    parts: dict[int, list[torch.Tensor | None]] = {i: [None, None] for i in damped}
    valid: dict[int, list[torch.Tensor]] = {}
    failed: set[int] = set()
    written: set[tuple[int, int]] = set()
    for (form, *_), entries in by_size.items():
        matrices = [matrix for _, _, matrix in entries]
        if form == "factored":
            lowers, good = batched_cholesky(matrices)
            results: list[object] = lowers
        else:
            eigen = batched_eigh(matrices)
            if eigen is None:  # the call itself failed: each block takes its own path
                failed.update(index for index, _, _ in entries)
                continue
            results, good = eigen  # type: ignore[assignment]
        for position, ((index, which, _), result) in enumerate(zip(entries, results, strict=True)):
            valid.setdefault(index, []).append(good[position])
            if index in damped:
                parts[index][which] = result  # type: ignore[assignment]
            else:
                due[index][0].eigen[which] = result  # type: ignore[attr-defined]
                written.add((index, which))
    proposals: list[tuple[CurvatureBlock, float, torch.Tensor]] = []
    for index, (block, damping) in enumerate(due):
        if index in failed:  # recomputed, and checked, one factor at a time
            block.eigen[:] = [  # type: ignore[attr-defined]
                None if (index, which) in written else entry
                for which, entry in enumerate(block.eigen)  # type: ignore[attr-defined]
            ]
        if index in failed or not block.ready:
            block.update_inverse(damping)
        elif isinstance(block, KroneckerBlock):
            inverse = tuple(parts[index]) if index in damped else block.kronecker_inverse(damping)
            block.set_inverse(inverse, damping)  # type: ignore[arg-type]
            checks = valid.get(index)
            if checks:  # else only the damping changed, on decompositions already checked
                proposals.append((block, damping, torch.stack(checks).all()))
        else:
            check = block.propose_inverse(damping)
            if check is not None:
                proposals.append((block, damping, check))
    return proposals
