"""The solver core of every curvature merge: linear algebra on tensors, knowing nothing of modules or files.

A merge solves, per parameter block, (Σ_i w_i C_i) X = Σ_i w_i C_i W_i (docs/design.md, "One equation behind
every method"). The precision sum takes three shapes, and each has its solver here:

- ``solve_diagonal``: C_i diagonal (Fisher merging, gradient matching): an elementwise division.
- ``solve_gram``: C_i = G_i ⊗ I on the input side (RegMean): one Cholesky factorisation of the Gram sum.
- ``kron_cg``: C_i = G_i ⊗ A_i (MaTS with K-FAC): conjugate gradient on X ↦ Σ_i w_i G_i X A_i, without
  forming any Kronecker product, preconditioned by one Kronecker product that is cheap to invert.

Inputs may be float32 or float64 on any device and are never modified. ``solve_gram`` and ``kron_cg`` compute
in float64 (float32 on MPS, which lacks it) and return the right-hand side's dtype. Warnings (singular
systems, no convergence) are ``SolveWarning``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergesmith.errors import MergeWarning, StatisticsError
from mergesmith.lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

# The jitter schedule for singular Cholesky factorisations, relative to mean(diag): 1e-10, 1e-9, ..., 1e-1.
JITTER_EXPONENTS = tuple(range(-10, 0))


class SolveWarning(MergeWarning):
    """A system was singular (and got a jitter) or an iterative solve stopped short of its tolerance: a
    ``MergeWarning``, so the command line shows it as one ``warning:`` line naming the tensor."""


def solve_diagonal(precision: Tensor, rhs: Tensor, fallback: Tensor | None = None) -> Tensor:
    """x = rhs / precision elementwise, where ``precision`` = Σ_i w_i c_i is a diagonal precision sum.

    Where precision == 0 no model cares about the entry, so the system says nothing about it: the entry is
    taken from ``fallback`` (for example the plain average) when given, else 0 — never 0/0. All three tensors
    have one shape; the result has their promoted dtype.
    """
    _check_same_shape(rhs, {"precision": precision, "fallback": fallback})
    cares = precision != 0
    x = rhs / torch.where(cares, precision, torch.ones_like(precision))
    return torch.where(cares, x, torch.zeros((), dtype=x.dtype, device=x.device) if fallback is None else fallback)


def _check_same_shape(rhs: Tensor, others: dict[str, Tensor | None]) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != rhs.shape:
            raise ValueError(f"Shape mismatch: {name} has {tuple(tensor.shape)}, rhs has {tuple(rhs.shape)}; "
                             f"they must be equal")


def _wide_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the factorisations run in float64 (see solve_gram)
    return torch.float32 if device.type == "mps" else torch.float64


def _cholesky_with_jitter(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lower Cholesky factors L Lᵀ = S + ε·s·I of a batch of symmetric PSD matrices S (..., n, n), s = mean(diag S).

    ε = 0 where plain Cholesky succeeds, else the first of 1e-10, 1e-9, ..., 1e-1 that works (s = 1 for an
    all-zero diagonal, i.e. a zero matrix). Returns (L, ε, failed), the last two of the batch shape; ``failed``
    marks matrices no jitter could factorise (NaN/inf entries, or negative eigenvalues beyond 0.1·s), whose
    L is meaningless.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    epsilon = matrix.new_zeros(matrix.shape[:-2])
    failed = info != 0
    if not bool(failed.any()):
        return factor, epsilon, failed
    scale = matrix.diagonal(dim1=-2, dim2=-1).mean(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for exponent in JITTER_EXPONENTS:
        retry, info = torch.linalg.cholesky_ex(matrix + (10.0**exponent * scale)[..., None, None] * eye)
        fixed = failed & (info == 0)
        factor = torch.where(fixed[..., None, None], retry, factor)
        epsilon = torch.where(fixed, 10.0**exponent, epsilon)
        failed = failed & ~fixed
        if not bool(failed.any()):
            break
    return factor, epsilon, failed


def solve_gram(gram: Tensor, rhs: Tensor, *, name: str = "") -> Tensor:
    """X with gram @ X = rhs, for a symmetric positive semi-definite ``gram`` (in, in) and rhs (in, k) or (in,).

    One Cholesky factorisation. A singular Gram (a feature no input row ever used, fewer rows than
    features) fails it; then ε·mean(diag) is added to the diagonal for the first ε of 1e-10, 1e-9, ..., 1e-1
    that works, with one SolveWarning naming ``name``. On a consistent singular system (rhs in the range of
    the Gram, as Σ_i G_i W_i always is) the jitter leaves the equations on the Gram's range satisfied to
    about ε, and X's null-space part is rhs's (zero up to rounding) divided by ε·mean(diag): the jitter keeps
    the answer finite, it is no regulariser.

    Computed in float64 whatever the input dtype (float32 on MPS, which lacks float64) and returned in
    rhs's dtype: a Gram XᵀX squares the condition number of X, float32 Cholesky loses all accuracy from
    a condition number of ~1e7, and a jitter of 1e-10·mean(diag) would be below float32's resolution.
    """
    label = f"'{name}'" if name else "solve_gram"
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{label}: the Gram matrix must be square (in, in), got {tuple(gram.shape)}")
    if rhs.dim() not in (1, 2) or rhs.shape[0] != gram.shape[0]:
        raise ValueError(f"Shape mismatch for {label}: the Gram matrix is {tuple(gram.shape)}, so rhs must be "
                         f"({gram.shape[0]}, k) or ({gram.shape[0]},), got {tuple(rhs.shape)}")
    wide = _wide_dtype(gram.device)
    factor, epsilon, failed = _cholesky_with_jitter(gram.to(wide))
    if bool(failed):
        raise StatisticsError(f"{label}: the Gram matrix is not positive semi-definite (or has NaN/inf entries): "
                              f"Cholesky failed even with 0.1·mean(diag) added to its diagonal")
    if bool(epsilon > 0):
        warnings.warn(f"{label}: the Gram sum is singular: added {float(epsilon):.0e}·mean(diag) to its diagonal; "
                      f"use alpha < 1 or more data to make it well-posed", SolveWarning, stacklevel=2)
    x = torch.cholesky_solve(rhs.to(wide).reshape(gram.shape[0], -1), factor)
    return x.reshape(rhs.shape).to(rhs.dtype)


@dataclass
class CGReport:
    """What a conjugate-gradient solve did. Tensors have the batch shape of the blocks (() for one block)."""

    iterations: int  # iterations run: the most any block needed
    initial_residual: Tensor  # ‖b − M x0‖ / ‖b‖ per block (see kron_cg for b = 0)
    final_residual: Tensor  # the same at the end, recomputed from the solution rather than the recurrence
    converged: Tensor  # final_residual <= tol, per block


def kron_matvec(a_factors: Sequence[Tensor], g_factors: Sequence[Tensor], x: Tensor,
                weights: Sequence[float]) -> Tensor:
    """Σ_i w_i G_i X A_i for X (..., out, in), A_i (..., in, in), G_i (..., out, out); zero weights are skipped.

    With row-major vec, vec(G X A) = (G ⊗ Aᵀ) vec(X) = (G ⊗ A) vec(X) for symmetric A: this is the matrix-vector
    product of the K-FAC precision Σ_i w_i G_i ⊗ A_i without forming it.
    """
    total = torch.zeros_like(x)
    for a, g, w in zip(a_factors, g_factors, weights):
        if w != 0:
            total.add_(g @ x @ a, alpha=w)
    return total


def _inner(u: Tensor, v: Tensor) -> Tensor:
    """Frobenius inner product per block: (..., m, n) × (..., m, n) → (...)."""
    return (u * v).sum(dim=(-2, -1))


def _norm(u: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(u)


@dataclass
class _KronInverse:
    """P⁻¹(R) = Ḡ⁻¹ R Ā⁻¹ / s for the preconditioner P(X) = s·Ḡ X Ā, from Cholesky factors of Ḡ and Ā."""

    g_cholesky: Tensor  # (..., out, out)
    a_cholesky: Tensor  # (..., in, in)
    scale: Tensor  # (...)

    def __call__(self, r: Tensor) -> Tensor:
        y = torch.cholesky_solve(r, self.g_cholesky)
        y = torch.cholesky_solve(y.mT, self.a_cholesky).mT  # Ā is symmetric: Y Ā⁻¹ = (Ā⁻¹ Yᵀ)ᵀ
        return y / self.scale[..., None, None]


def _mean_diag(matrix: Tensor) -> Tensor:
    return matrix.diagonal(dim1=-2, dim2=-1).mean(-1)


def _kron_means(a_factors: Sequence[Tensor], g_factors: Sequence[Tensor],
                weights: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(Ā, Ḡ, s) for the preconditioner P = s·Ḡ ⊗ Ā of Σ_i w_i G_i ⊗ A_i (see kron_cg)."""
    a_scales = [_mean_diag(a) for a in a_factors]  # a_i = tr(A_i)/in
    g_scales = [_mean_diag(g) for g in g_factors]  # g_i = tr(G_i)/out
    # ρ_i ∝ w_i √(a_i g_i), applied to the unit-scale shapes A_i/a_i and G_i/g_i
    a_weights = [w * torch.sqrt(g / _positive(a)) for a, g, w in zip(a_scales, g_scales, weights)]
    g_weights = [w * torch.sqrt(a / _positive(g)) for a, g, w in zip(a_scales, g_scales, weights)]
    total = _positive(sum(w * torch.sqrt(a * g) for a, g, w in zip(a_scales, g_scales, weights)))
    a_bar = sum(c[..., None, None] * a for c, a in zip(a_weights, a_factors)) / total[..., None, None]
    g_bar = sum(c[..., None, None] * g for c, g in zip(g_weights, g_factors)) / total[..., None, None]
    scale = sum(w * a * g for a, g, w in zip(a_scales, g_scales, weights))
    return a_bar, g_bar, scale


def _positive(x: Tensor) -> Tensor:
    """x where it is > 0, else 1: a divisor for quantities that are 0 only when what they divide is 0 too."""
    return torch.where(x > 0, x, torch.ones_like(x))


def _kron_preconditioner(a_factors: Sequence[Tensor], g_factors: Sequence[Tensor], weights: Sequence[float],
                         label: str) -> _KronInverse:
    a_bar, g_bar, scale = _kron_means(a_factors, g_factors, weights)
    a_cholesky, a_epsilon, a_failed = _cholesky_with_jitter(a_bar)
    g_cholesky, g_epsilon, g_failed = _cholesky_with_jitter(g_bar)
    if bool(a_failed.any() | g_failed.any()):
        raise StatisticsError(f"{label}: the K-FAC factors are not positive semi-definite (or have NaN/inf entries): "
                              f"the preconditioner's Cholesky factorisation failed")
    epsilon = float(torch.maximum(a_epsilon.max(), g_epsilon.max()))
    if epsilon > 0:
        warnings.warn(f"{label}: the K-FAC factors are singular (their mean needed jitter {epsilon:.0e}·mean(diag)), "
                      f"so the system is too and preconditioned CG may fit noise along its null space; damp the "
                      f"factors (A + δ·tr(A)/in·I, G + δ·tr(G)/out·I)", SolveWarning, stacklevel=3)
    return _KronInverse(g_cholesky, a_cholesky, _positive(scale))


def kron_cg(a_factors: Sequence[Tensor], g_factors: Sequence[Tensor], rhs: Tensor, *,
            weights: Sequence[float] | None = None, x0: Tensor | None = None, precondition: bool = True,
            max_iters: int = 100, tol: float = 1e-6, residual_history: list | None = None,
            name: str = "") -> tuple[Tensor, CGReport]:
    """Solve Σ_i w_i G_i X A_i = rhs for X by (preconditioned) conjugate gradient, forming no Kronecker product.

    Shapes: rhs, x0 and X (..., out, in); A_i (..., in, in), the input-side K-FAC factor (with a bias the
    block is [W | b] and A_i is (in + 1)²); G_i (..., out, out), the output-gradient factor; both symmetric
    PSD. Weights w_i >= 0, default 1. Leading dimensions are a batch of independent blocks solved together
    (factors may broadcast over it); a block stops updating once its relative residual ‖rhs − M(X)‖ / ‖rhs‖
    (Frobenius) is <= tol. With row-major vec, M = Σ_i w_i G_i ⊗ A_i: symmetric PSD in the Frobenius inner
    product, which is what CG needs. x0 defaults to zeros.

    Preconditioner: P(X) = s·Ḡ X Ā, applied as P⁻¹(R) = Ḡ⁻¹ R Ā⁻¹ / s with Cholesky factors of Ā and Ḡ
    computed once. A model's factors are defined only up to a split of its scale, G ⊗ A = (G/c) ⊗ (cA),
    and plain means of the A_i and of the G_i depend on that arbitrary choice; so each model is split
    evenly first (equal mean diagonals), which gives

        a_i = tr(A_i)/in,  g_i = tr(G_i)/out,  ρ_i = w_i √(a_i g_i) / Σ_j w_j √(a_j g_j),
        Ā = Σ_i ρ_i A_i/a_i,  Ḡ = Σ_i ρ_i G_i/g_i,  s = Σ_i w_i a_i g_i.

    P does not depend on how any model's scale is split, and equals M when the models share their factors
    up to scale (one iteration then suffices). On MiniLM K-FAC factors it needed about as few iterations as the
    plain weighted means at their measured scales (which stalled once the splits were perturbed by 100×)
    and fewer than weights ρ_i ∝ w_i, ρ_i ∝ w_i a_i g_i, or the Frobenius-nearest Kronecker product. Where Ā
    or Ḡ is exactly singular (Cholesky fails) it gets the jitter of solve_gram, with a SolveWarning.

    Singular systems: K-FAC factors from little data are rank deficient (MiniLM on 64 examples: layer-0
    inputs of rank 53 of 385, last-layer output gradients of rank 62 of 384), so M is singular or nearly
    so. Plain CG from x0 then tends to the solution nearest x0 and moves little along tiny eigenvalues;
    preconditioned CG resolves those within a few iterations, i.e. fits noise divided by ~0. On undamped
    MiniLM factors its answers lay 7·10² to 3·10¹⁰ times farther from plain CG's than plain CG's from x0
    (8 to 4·10³ times with damping δ = 1e-6; 0.1 to 1.6 times with δ = 0.1, where it reached 1e-6 and plain
    CG had not). So damp the factors, A_i + δ·a_i·I and G_i + δ·g_i·I, before preconditioning
    (benchmarks/speed/solve_results.md measures δ from 0 to 0.1).

    A block with rhs = 0 is measured relative to its initial residual instead; when that is 0 as well
    (x0 solves it, as zeros do) it is returned unchanged with residual 0, as it is when max_iters = 0.

    Computed in float64 (float32 on MPS) whatever the input dtypes, returned in rhs's dtype: in float32,
    plain CG on MiniLM layer-0 factors (δ = 1e-3) diverged (relative residual 15 after 150 iterations) where float64
    reached 2e-3. ``report.final_residual`` is recomputed from X (one more application of M), not taken
    from the recurrence; a SolveWarning names ``name`` when a block ends above tol. ``residual_history``,
    when a list, receives the recurrence's relative residual (a batch-shaped tensor) after every iteration.
    """
    label = f"'{name}'" if name else "kron_cg"
    weights = _check_kron_inputs(a_factors, g_factors, rhs, weights, x0, max_iters, tol, label)
    dtype = _wide_dtype(rhs.device)
    a_factors = [a.to(dtype) for a in a_factors]
    g_factors = [g.to(dtype) for g in g_factors]
    b = rhs.to(dtype)

    def operator(v: Tensor) -> Tensor:
        return kron_matvec(a_factors, g_factors, v, weights)

    x = torch.zeros_like(b) if x0 is None else x0.to(dtype, copy=True)
    r = b.clone() if x0 is None else b - operator(x)
    b_norm = _norm(b)
    reference = torch.where(b_norm > 0, b_norm, _norm(r))  # b = 0: relative to the initial residual
    reference = torch.where(reference > 0, reference, torch.ones_like(reference))
    initial = _norm(r) / reference
    residual, active, iterations = initial.clone(), initial > tol, 0
    if max_iters > 0 and bool(active.any()):
        inverse = _kron_preconditioner(a_factors, g_factors, weights, label) if precondition else None
        iterations = _cg_loop(operator, inverse, x, r, residual, active, reference, max_iters, tol,
                              residual_history)
        residual = _norm(b - operator(x)) / reference
    report = CGReport(iterations, initial, residual, residual <= tol)
    if max_iters > 0 and not bool(report.converged.all()):
        stalled = int((~report.converged).sum())
        warnings.warn(f"{label}: conjugate gradient stopped after {iterations} iterations with relative residual "
                      f"{float(residual.max()):.1e} > tol {tol:g} in {stalled} of {report.converged.numel()} "
                      f"block(s); raise max_iters, or add a damping δ·I to the K-FAC factors if the system is "
                      f"near-singular", SolveWarning, stacklevel=2)
    return x.to(rhs.dtype), report


def _cg_loop(operator, inverse, x: Tensor, r: Tensor, residual: Tensor, active: Tensor, reference: Tensor,
             max_iters: int, tol: float, history: list | None) -> int:
    """Preconditioned CG iterations, updating x, r, residual and active in place; returns the count.

    Blocks are independent: each has its own step sizes, and a block whose residual reached tol (or whose
    search direction has no curvature left, p·Mp <= 0, which happens only at a solution of a singular
    system) keeps its x and r from then on.
    """
    z = r if inverse is None else inverse(r)
    p = z.clone()
    rz = _inner(r, z)
    for iteration in range(1, max_iters + 1):
        q = operator(p)
        pq = _inner(p, q)
        active &= pq > 0
        alpha = torch.where(active, rz / torch.where(pq > 0, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        x.add_(alpha[..., None, None] * p)
        r.sub_(alpha[..., None, None] * q)
        residual.copy_(torch.where(active, _norm(r) / reference, residual))
        active &= residual > tol
        if history is not None:
            history.append(residual.clone())
        if not bool(active.any()):
            return iteration
        z = r if inverse is None else inverse(r)
        rz_next = _inner(r, z)
        beta = rz_next / torch.where(rz > 0, rz, torch.ones_like(rz))
        p = z + beta[..., None, None] * p
        rz = rz_next
    return max_iters


def _check_kron_inputs(a_factors, g_factors, rhs, weights, x0, max_iters, tol, label) -> list[float]:
    n = len(a_factors)
    if n == 0 or len(g_factors) != n:
        raise ValueError(f"{label}: need one A and one G factor per model, got {n} A and {len(g_factors)} G factors")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{label}: {len(weights)} weights for {n} models; give one per model")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{label}: weights must be finite, >= 0 and not all 0, got {weights}")
    if rhs.dim() < 2:
        raise ValueError(f"{label}: rhs must be (..., out, in), got {tuple(rhs.shape)}")
    *batch, out, inp = rhs.shape
    for kind, factors, size in (("A", a_factors, inp), ("G", g_factors, out)):
        for i, f in enumerate(factors):
            if f.dim() < 2 or f.shape[-2:] != (size, size) or not _broadcasts_to(f.shape[:-2], batch):
                raise ValueError(f"Shape mismatch for {label}: {kind} factor {i} has {tuple(f.shape)}, expected "
                                 f"(..., {size}, {size}) for rhs {tuple(rhs.shape)}")
    if x0 is not None and x0.shape != rhs.shape:
        raise ValueError(f"Shape mismatch for {label}: x0 has {tuple(x0.shape)}, rhs has {tuple(rhs.shape)}")
    if max_iters < 0 or tol < 0:
        raise ValueError(f"{label}: max_iters and tol must be >= 0, got {max_iters} and {tol}")
    return weights


def _broadcasts_to(shape, batch) -> bool:
    try:
        return list(torch.broadcast_shapes(tuple(shape), tuple(batch))) == list(batch)
    except RuntimeError:
        return False
