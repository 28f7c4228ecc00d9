"""The solver core of every curvature merge: linear algebra on tensors, knowing nothing of modules or files.

A merge solves, per parameter block, (Σ_i w_i C_i) X = Σ_i w_i C_i W_i (docs/design.md, "One equation behind
every method"). The precision sum takes three shapes, and each has its solver here:

- ``solve_diagonal``: C_i diagonal (Fisher merging, gradient matching): an elementwise division.
- ``solve_gram``: C_i = G_i ⊗ I on the input side (RegMean): one Cholesky factorisation of the Gram sum.
- ``kron_cg``: C_i = G_i ⊗ A_i (MaTS with K-FAC): conjugate gradient on X ↦ Σ_i w_i G_i X A_i, without
  forming any Kronecker product, preconditioned by one Kronecker product that is cheap to invert.

Inputs may be float32 or float64 on any device and are never modified; results come back in the dtype of
the right-hand side. Warnings (singular systems, no convergence) are ``SolveWarning``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The jitter schedule for singular Cholesky factorisations, relative to mean(diag): 1e-10, 1e-9, ..., 1e-1.
JITTER_EXPONENTS = tuple(range(-10, 0))
_PRECONDITIONER = "trace"


class SolveWarning(UserWarning):
    """A system was singular (and got a jitter) or an iterative solve stopped short of its tolerance."""


def solve_diagonal(precision: Tensor, rhs: Tensor, fallback: Tensor | None = None) -> Tensor:
    """x = rhs / precision elementwise, where ``precision`` = Σ_i w_i c_i is a diagonal precision sum.

    Where precision == 0 no model cares about the entry, so the system says nothing about it: the entry is
    taken from ``fallback`` (for example the plain average) when given, else 0 — never 0/0. All three tensors
    have one shape; the result has the promoted dtype of precision and rhs.
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
    about ε and gives ~0 on its null space; it keeps the answer finite, it is no regulariser.

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
        raise ValueError(f"{label}: the Gram matrix is not positive semi-definite (or has NaN/inf entries): "
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


def _safe(s):
    return torch.where(s > 0, s, torch.ones_like(s))


def _mean_diag(matrix: Tensor) -> Tensor:
    return matrix.diagonal(dim1=-2, dim2=-1).mean(-1)


def _kron_means(a_factors: Sequence[Tensor], g_factors: Sequence[Tensor],
                weights: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(Ā, Ḡ, s) with s·Ḡ ⊗ Ā ≈ Σ_i w_i G_i ⊗ A_i; exact when the models share their factors up to scale."""
    if _PRECONDITIONER == "mean":
        total = sum(weights)
        return (sum(w * a for a, w in zip(a_factors, weights)) / total,
                sum(w * g for g, w in zip(g_factors, weights)) / total, torch.tensor(total))
    if _PRECONDITIONER in ("anorm", "gnorm"):
        a_scales = [_mean_diag(a) for a in a_factors]
        g_scales = [_mean_diag(g) for g in g_factors]
        total = sum(weights)
        if _PRECONDITIONER == "anorm":
            a_bar = sum(w * a / _safe(s)[..., None, None] for a, s, w in zip(a_factors, a_scales, weights)) / total
            g_bar = sum(w * g * s[..., None, None] for g, s, w in zip(g_factors, a_scales, weights))
        else:
            g_bar = sum(w * g / _safe(s)[..., None, None] for g, s, w in zip(g_factors, g_scales, weights)) / total
            a_bar = sum(w * a * s[..., None, None] for a, s, w in zip(a_factors, g_scales, weights))
        return a_bar, g_bar, torch.ones(())
    if _PRECONDITIONER == "unit":
        a_scales = [_mean_diag(a) for a in a_factors]
        g_scales = [_mean_diag(g) for g in g_factors]
        total = sum(weights)
        a_bar = sum(w * a / _safe(s)[..., None, None] for a, s, w in zip(a_factors, a_scales, weights)) / total
        g_bar = sum(w * g / _safe(s)[..., None, None] for g, s, w in zip(g_factors, g_scales, weights)) / total
        return a_bar, g_bar, sum(w * a * g for a, g, w in zip(a_scales, g_scales, weights))
    if _PRECONDITIONER == "nkp":
        return _nearest_kron(a_factors, g_factors, weights)
    a_scales = [_mean_diag(a) for a in a_factors]
    g_scales = [_mean_diag(g) for g in g_factors]
    # Σ_i w_i (a_i g_i) (G_i/g_i) ⊗ (A_i/a_i), with a_i = tr(A_i)/in: each model's shape at unit scale
    a_bar = sum(w * gs[..., None, None] * a for a, gs, w in zip(a_factors, g_scales, weights))
    g_bar = sum(w * as_[..., None, None] * g for g, as_, w in zip(g_factors, a_scales, weights))
    scale = sum(w * as_ * gs for as_, gs, w in zip(a_scales, g_scales, weights))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None, None]
    return a_bar / safe, g_bar / safe, scale


def _nearest_kron(a_factors, g_factors, weights, iterations: int = 30):
    n = len(a_factors)
    k_a = torch.stack([torch.stack([_inner(a_factors[i], a_factors[j]) for j in range(n)], -1) for i in range(n)], -2)
    k_g = torch.stack([torch.stack([_inner(g_factors[i], g_factors[j]) for j in range(n)], -1) for i in range(n)], -2)
    w = torch.tensor(list(weights), dtype=k_a.dtype, device=k_a.device)
    beta = torch.ones(k_a.shape[:-1], dtype=k_a.dtype, device=k_a.device)
    for _ in range(iterations):
        alpha = w * (k_a @ beta[..., None])[..., 0]
        alpha = alpha / alpha.norm(dim=-1, keepdim=True)
        beta = w * (k_g @ alpha[..., None])[..., 0]
        beta = beta / beta.norm(dim=-1, keepdim=True)
    g_bar = sum(alpha[..., i, None, None] * g_factors[i] for i in range(n))
    a_bar = sum(beta[..., i, None, None] * a_factors[i] for i in range(n))
    ga, aa = _mean_diag(g_bar), _mean_diag(a_bar)
    g_bar, a_bar = g_bar / ga[..., None, None], a_bar / aa[..., None, None]
    scale = sum(weights[i] * _inner(g_factors[i], g_bar) * _inner(a_factors[i], a_bar) for i in range(n))
    scale = scale / (_inner(g_bar, g_bar) * _inner(a_bar, a_bar))
    return a_bar, g_bar, scale


def _kron_preconditioner(a_factors: Sequence[Tensor], g_factors: Sequence[Tensor], weights: Sequence[float],
                         label: str) -> _KronInverse:
    a_bar, g_bar, scale = _kron_means(a_factors, g_factors, weights)
    a_cholesky, _, a_failed = _cholesky_with_jitter(a_bar)
    g_cholesky, _, g_failed = _cholesky_with_jitter(g_bar)
    if bool(a_failed.any() | g_failed.any()):
        raise ValueError(f"{label}: the K-FAC factors are not positive semi-definite (or have NaN/inf entries): "
                         f"the preconditioner's Cholesky factorisation failed")
    return _KronInverse(g_cholesky, a_cholesky, torch.where(scale > 0, scale, torch.ones_like(scale)))


def kron_cg(a_factors: Sequence[Tensor], g_factors: Sequence[Tensor], rhs: Tensor, *,
            weights: Sequence[float] | None = None, x0: Tensor | None = None, precondition: bool = True,
            max_iters: int = 100, tol: float = 1e-6, residual_history: list | None = None,
            name: str = "") -> tuple[Tensor, CGReport]:
    """Solve Σ_i w_i G_i X A_i = rhs for X by (preconditioned) conjugate gradient. DOC TODO"""
    label = f"'{name}'" if name else "kron_cg"
    weights = _check_kron_inputs(a_factors, g_factors, rhs, weights, x0, max_iters, tol, label)
    dtype = _compute_dtype(rhs, a_factors, g_factors, x0)
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


def _compute_dtype(rhs: Tensor, a_factors, g_factors, x0) -> torch.dtype:
    dtype = rhs.dtype
    for t in (*a_factors, *g_factors, *([x0] if x0 is not None else [])):
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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
