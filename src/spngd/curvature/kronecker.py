"""Kronecker-factored (K-FAC) blocks: the part shared by Linear and the convolutions.

The Fisher of a weight ``W`` (``d_G x d_A``, bias as the last column) is approximated by
``G ⊗ A`` per group (K-FAC for Linear, KFC for convolutions; docs/optimizer.md,
Conventions). With pi-corrected factored Tikhonov damping the preconditioned gradient is
``(G + sqrt(lam)/pi I)^-1 grad (A + pi sqrt(lam) I)^-1``.

Three damping forms (``damping_form``):

- ``"factored-keep-a"`` (default) and ``"factored"`` (the paper's): the two damped factors'
  inverses are kept as their Cholesky factors (``inverse`` holds ``(L_A, L_G)``). The first
  gradients after a refresh are preconditioned by triangular solves (cheap when statistics
  are refreshed every step); an inverse used often enough is formed once, as
  ``L^-T L^-1``, and applied by matrix products from then on. With ``"factored"``, a
  refresh of either factor refactorises both, since pi moves both dampings. With
  ``"factored-keep-a"``, pi (so ``A``'s damping ``d_A = pi sqrt(lam)``) is recomputed only
  when ``A`` is refreshed: a refresh of ``G`` alone factorises ``G + (lam / d_A) I`` and
  keeps ``A``'s Cholesky factor and formed inverse, so the product of the dampings is still
  ``lam``. ``A`` is the large factor of a convolution (``C_in k^2``), refreshed far less
  often than ``G``, and its factorisation and formed inverse dominate the inversion cost.
  On CPU a symmetric eigendecomposition (where a new damping would be a diagonal change)
  costs 13-17x a Cholesky factorisation at ``d = 145..1153``.
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
from typing import TYPE_CHECKING

import torch

from spngd.curvature.base import CurvatureBlock
from spngd.linalg import (
    MIN_DAMPING,
    add_to_diagonal,
    batched_cholesky,
    batched_eigh,
    kronecker_dampings,
    robust_cholesky,
    robust_eigh,
)

if TYPE_CHECKING:
    from spngd.curvature import BlockSettings

DAMPING_FORMS = ("factored-keep-a", "factored", "kronecker")
"""The damping forms of Kronecker blocks (module docstring); the first is the default."""

FORM_AFTER = 1.0
"""A damped factor's inverse is formed from its Cholesky factor (``torch.cholesky_inverse``)
at the use that brings its uses to ``FORM_AFTER * d / k`` (``d`` its size, ``k`` the other
factor's), or at once where that is at most 1. Forming costs what ``c d / k`` products with
the inverse save over the two triangular solves, with ``c`` measured at 0.4-1.1 for
``d = 145..577`` and 1.2-2.3 for ``d = 1153..4609`` (2 CPU threads, ``k = d / 9``, as in 3x3
convolutions; one factor at a time, the medians of a few runs that moved by up to 2x).
Forming at about the break-even use bounds what not knowing the inverse's lifetime in
advance costs (the rent-or-buy argument: at most twice the cost with ``c = 1``, up to about
3.5 times at the measured extremes of ``c``); a ``G`` (``d`` far below ``k``) is formed
before its first use, for which one product with the inverse and its forming took 0.05 ms
against 0.24 ms for the solves at ``d, k = 64, 577``. In the adaptive refresh of ResNet-20
on the digits at batch 1,024, interleaved in one process, preconditioning took 5.0-5.6 ms
per step against 5.7-6.3 when forming at three times the break-even use (three runs)."""


class KroneckerBlock(CurvatureBlock):
    """Block with factors ``(A, G)`` of shapes ``(groups, d_A, d_A)`` and ``(groups, d_G, d_G)``."""

    groups: int = 1
    statistic_names = ("A", "G")
    gradient_powers = (0, 2)
    halves_combine = True
    damping_form: str = DAMPING_FORMS[0]
    """One of :data:`DAMPING_FORMS` (module docstring); set before the first inverse."""

    restorable = (*CurvatureBlock.restorable, "eigen", "a_damping", "a_earlier_uses")

    @classmethod
    def for_module(
        cls, name: str, module: torch.nn.Module, settings: BlockSettings
    ) -> KroneckerBlock:
        block = cls(name, module)
        block.damping_form = settings.damping_form
        block.a_examples = settings.a_examples
        return block

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        super().__init__(name, module)
        self.eigen: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
        """Kronecker damping: per factor, ``(eigenvalues, eigenvectors)`` of its current
        value (None until computed, and again whenever the factor changes)."""
        self.a_damping: torch.Tensor | None = None
        """Factored dampings: the damping (one per group) in the Cholesky factor of ``A`` in
        use; None until one is computed, and again whenever ``A`` changes."""
        self.a_earlier_uses = 0
        """Gradients preconditioned with the Cholesky factor of ``A`` in use under earlier
        inverses (it is kept when only ``G`` is refactorised)."""
        self.a_examples: int | None = None
        """At most this many examples of a pair feed ``A`` (None: as many as the other
        statistics): ``A`` averages ``a a^T`` over examples and locations, so a sample
        estimates it closely, while ``G`` (per-example gradients) needs more examples."""

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

    def statistic_examples(self, index: int, grad_output: torch.Tensor) -> int | None:
        limits = [self.statistics_examples, self.a_examples if index == 0 else None]
        given = [limit for limit in limits if limit is not None]
        return min(given) if given else None

    @property
    def inverse_form_name(self) -> str:  # type: ignore[override]
        return "eigen-kronecker" if self.damping_form == "kronecker" else "cholesky"

    def update_factors(
        self, fresh: tuple[torch.Tensor | None, ...], weights: tuple[float, ...]
    ) -> None:
        super().update_factors(fresh, weights)
        for i, new in enumerate(fresh):
            if new is not None:
                self.eigen[i] = None
        if fresh[0] is not None:
            self.a_damping = None

    def state_dict(self) -> dict[str, object]:
        a_damping = None if self.a_damping is None else self.a_damping.cpu()
        return {
            **super().state_dict(),
            "a_damping": a_damping,
            "a_earlier_uses": self.a_earlier_uses,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        self.eigen[:] = [None, None]
        a_damping = state.get("a_damping")
        self.a_damping = None if a_damping is None else a_damping.to(self.params[0].device)  # type: ignore[attr-defined]
        self.a_earlier_uses = state.get("a_earlier_uses", 0)  # type: ignore[assignment]

    statistic_symmetric = True

    @property
    def inversion_cost(self) -> int:
        """``d_A^3 + d_G^3`` for the two factorisations plus ``d_G d_A (d_A + d_G)`` for
        ``G^-1 grad A^-1``, per group."""
        a, g = self.a_dim, self.g_dim
        return self.groups * (a**3 + g**3 + g * a * (a + g))

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
        self,
        index: int,
        inputs: torch.Tensor,
        grad_output: torch.Tensor,
        context: object = None,
    ) -> torch.Tensor:
        if index == 0:
            return self.a_factor(inputs)
        return self.g_factor(grad_output, self.batch_size(inputs))

    def compute_inverse(self, damping: float) -> tuple[torch.Tensor, ...]:
        if self.damping_form != "kronecker":
            a_damped, g_damped = self.damped_factors(damping)
            lower_a = self.inverse_form[0] if a_damped is None else robust_cholesky(a_damped)  # type: ignore[index]
            return lower_a, robust_cholesky(g_damped)
        for i, factor in enumerate(self.factors):
            if self.eigen[i] is None:
                self.eigen[i] = robust_eigh(factor)  # type: ignore[arg-type]
        return self.kronecker_inverse(damping)

    def kronecker_inverse(self, damping: float) -> tuple[torch.Tensor, ...]:
        """``(Q_A, Q_G, 1 / (lambda_G lambda_A^T + lam))`` from the current eigendecompositions."""
        (values_a, vectors_a), (values_g, vectors_g) = self.eigen  # type: ignore[misc]
        scaling = 1.0 / (values_g[:, :, None] * values_a[:, None, :] + damping)
        return vectors_a, vectors_g, scaling

    def damped_factors(self, damping: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The factored dampings' ``A + d_A I`` and ``G + d_G I`` (new tensors), with
        ``d_A d_G = lam``, and ``d_A`` noted in :attr:`a_damping`.

        ``d_A = pi sqrt(lam)`` from the current factors, except that with
        ``"factored-keep-a"`` and an ``A`` unchanged since its Cholesky factor in use was
        computed (at the same ``lam``), ``d_A`` stays and ``A`` is None: that factor is kept.
        """
        A, G = self.factors  # type: ignore[misc]
        if (
            self.damping_form == "factored-keep-a"
            and self.a_damping is not None
            and self.inverse_form is not None
            and self.inverse_damping == damping
        ):
            damping_g = torch.clamp(damping / self.a_damping, min=MIN_DAMPING)
            return None, add_to_diagonal(G, damping_g)
        damping_a, damping_g = kronecker_dampings(A, G, damping)  # type: ignore[arg-type]
        self.a_damping = damping_a
        return add_to_diagonal(A, damping_a), add_to_diagonal(G, damping_g)  # type: ignore[arg-type]

    def set_inverse(self, inverse: tuple[torch.Tensor, ...], damping: float) -> None:
        """As the base class; a Cholesky factor kept from the inverse in use keeps its
        formed inverse too."""
        kept = [old is new for old, new in zip(self.inverse_form or (), inverse, strict=False)]
        formed = self.explicit_inverse
        self.a_earlier_uses = self.a_earlier_uses + self.inverse_uses if kept[:1] == [True] else 0
        super().set_inverse(inverse, damping)
        if self.damping_form != "kronecker" and formed is not None and any(kept):
            self.explicit_inverse = tuple(  # type: ignore[assignment]
                f if k else None for f, k in zip(formed, kept, strict=False)
            )

    def apply_inverse(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.damping_form == "kronecker":
            vectors_a, vectors_g, scaling = self.inverse_form  # type: ignore[misc]
            matrix = self.gradient_matrix(grads).to(vectors_a.dtype)
            rotated = vectors_g.mT @ matrix @ vectors_a
            update = vectors_g @ (rotated * scaling) @ vectors_a.mT
            return [u.to(g.dtype) for u, g in zip(self.split_matrix(update), grads, strict=True)]
        lower_a, _ = self.inverse_form  # type: ignore[misc]
        matrix = self.gradient_matrix(grads).to(lower_a.dtype)
        right = self._apply_factor(0, matrix.mT).mT  # grad A^-1 (A is symmetric)
        update = self._apply_factor(1, right)  # G^-1 grad A^-1
        return [u.to(g.dtype) for u, g in zip(self.split_matrix(update), grads, strict=True)]

    def _apply_factor(self, which: int, rhs: torch.Tensor) -> torch.Tensor:
        """``X^-1 rhs`` for damped factor ``which`` (0: ``A``, 1: ``G``) from its Cholesky
        factor: by two triangular solves until what products with the inverse would have
        saved has reached what forming it costs, then by products with the inverse, formed
        once.

        Forming ``(L L^T)^-1`` costs about ``d^3`` and a product saves about ``d^2 k`` over
        the solves (``k`` the other factor's size), so the inverse is formed once its uses
        reach ``FORM_AFTER * d / k``: ``G`` (small) at once, ``A`` of a 3x3 convolution at
        about its ninth use. Inverses refreshed more often are never formed.
        """
        lower = self.inverse_form[which]  # type: ignore[index]
        formed = list(self.explicit_inverse or (None, None))
        if formed[which] is None:
            size, other = lower.shape[-1], rhs.shape[-1]
            uses = self.inverse_uses + (self.a_earlier_uses if which == 0 else 0)
            if uses + 1 < FORM_AFTER * size / other:
                return torch.cholesky_solve(rhs.to(lower.dtype), lower)
            formed[which] = torch.cholesky_inverse(lower)
            self.explicit_inverse = tuple(formed)  # type: ignore[assignment]
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
        if block.damping_form != "kronecker":
            damped[index] = block.damped_factors(damping)  # type: ignore[assignment]
            to_factorise = [(i, f) for i, f in enumerate(damped[index]) if f is not None]
        else:
            to_factorise = [(i, f) for i, f in enumerate(block.factors) if block.eigen[i] is None]
        for which, matrix in to_factorise:
            key = (block.inverse_form_name, matrix.shape[-1], matrix.dtype, matrix.device)
            by_size.setdefault(key, []).append((index, which, matrix))
    parts: dict[int, list[torch.Tensor | None]] = {
        i: [due[i][0].inverse_form[0] if damped[i][0] is None else None, None]  # type: ignore[index]
        for i in damped
    }
    valid: dict[int, list[torch.Tensor]] = {}
    failed: set[int] = set()
    written: set[tuple[int, int]] = set()
    for (form, *_), entries in by_size.items():
        matrices = [matrix for _, _, matrix in entries]
        if form == "cholesky":
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
