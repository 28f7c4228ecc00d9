"""Subspace merges: TSV, Iso-C, Iso-CTS and WUDI, data-free methods that act on each 2-D weight's singular
vectors (or, for WUDI, its row space) rather than on its entries.

Notation: base θ_0, T inputs θ_i, task vectors Δ_i = θ_i − θ_0, a matrix's rank bound r = min(out, in), the
recipe's scale α (``alpha``). Every method returns θ_0 + α·Δ with Δ from the method's formula for a 2-D
tensor, and Δ = (1/T) Σ_i Δ_i for any other (biases, norms, convolution kernels), as the reference
implementations do. SVDs run in the compute dtype (float32 unless the recipe says float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mergesmith.lazy import lazy_import
from mergesmith.methods.registry import Param, fixed, points, register
from mergesmith.methods.task_arithmetic import task_vectors

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

ALPHA = Param("alpha", float, 1.0, interval=(-float("inf"), float("inf")),
              help="scale α of the merged task vector (θ_0 + α·Δ)")
# every row is tuned over the same scales, from far less than one summed task vector (task arithmetic's best λ
# on vision was 0.05–0.1 over six models) to the papers' α = 1 (TSV, WUDI) to 1.5; on text TSV and Iso-C chose
# the top, 1.5, so the next benchmark run should reach higher
ALPHA_GRID = [0.1, 0.2, 0.4, 0.7, 1.0, 1.5]
# measured peak over the inputs for T = 3 on a 16000×1024 matrix: TSV 9.7, Iso-C 6.8, Iso-CTS 11.3 and WUDI 10.3
# output-sized float32 copies — T task vectors and up to 9 factors, products and float64 Gram blocks
WORK_COPIES = (1, 9)


# a kept σ below this fraction of σ_max has lost too many digits in the Gram (x·(xᵀx)^(-1/2) is then off by up
# to ~ε₆₄·size/ratio², 2e-5 at this ratio and 1024): such matrices take LAPACK's float64 SVD
ILL_CONDITIONED = 1e-4
ROW_BLOCK = 4096  # rows of a tall matrix cast to float64 at a time: the embedding's Gram without its float64 copy


def gram64(x: Tensor) -> Tensor:
    """xᵀx in float64 for each (m, n) matrix in x, accumulated over blocks of rows."""
    gram = None
    for block in x.split(ROW_BLOCK, dim=-2):
        block64 = block.double()
        gram = block64.mT @ block64 if gram is None else gram.add_(block64.mT @ block64)
    return gram


def _gram_eigh(tall: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(σ, V, live) of a tall matrix from its float64 Gram, σ descending; ``live`` marks the σ above the cut
    of ``gram_svd``, and the others are set to 0."""
    values, vectors = torch.linalg.eigh(gram64(tall))
    sigma, vectors = values.flip(-1).clamp_min(0).sqrt(), vectors.flip(-1)
    # below this, float64's σ² has lost its digits (rounding of the Gram is ~size·ε₆₄·σ_max²); above it, every σ
    # a float32 matrix defines is kept: a TSV V_cat of MiniLM had a σ of 6e-6·σ_max that LAPACK resolves
    live = sigma > sigma[..., :1] * _cut(tall.shape[-2])
    return torch.where(live, sigma, 0.0), vectors, live


def _cut(size: int) -> float:
    return 10 * (size * torch.finfo(torch.float64).eps) ** 0.5


def _inverse(sigma: Tensor, live: Tensor) -> Tensor:
    return torch.where(live, 1 / torch.where(live, sigma, 1.0), 0.0)


def gram_svd(x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` (default: all r = min(m, n)) singular triplets (U, S, Vᵀ) of each (m, n) matrix in x, in
    x's dtype: σ and the short side's vectors from the eigendecomposition of the smaller Gram matrix in float64,
    the long side's as x·v/σ in x's dtype.

    Why not ``torch.linalg.svd``: on a CPU this is faster for every layer shape of the speed benchmark (a wide
    matrix by 3.5×, the embedding by 1.6×), and it never fails to converge (LAPACK's divide-and-conquer SVD does
    on rank-deficient float32 input, as Iso-CTS's projected task matrices are). Its accuracy is a float32 SVD's:
    σ² carries an error of ~max(m, n)·ε₆₄·σ_max², and x·v/σ one of ~ε·σ_max/σ. Singular values at or below
    10·√(max(m, n)·ε₆₄)·σ_max (4.7e-6 at 1024: the zeros of a rank-deficient matrix, and float32 rounding
    noise, are far below) are not resolved from the Gram and have no defined singular vectors: they come back
    as 0 with zero vectors, so that they take no part downstream."""
    wide = x.shape[-2] < x.shape[-1]
    tall = x.mT if wide else x
    sigma, vectors, live = _gram_eigh(tall)
    take = min(x.shape[-2:]) if k is None else min(k, *x.shape[-2:])
    sigma, vectors, live = sigma[..., :take], vectors[..., :take], live[..., :take]
    v = vectors * live.unsqueeze(-2)
    u = tall @ (v * _inverse(sigma, live).unsqueeze(-2)).to(x.dtype)
    u, v = (v, u) if wide else (u, v)
    return u.to(x.dtype), sigma.to(x.dtype), v.mT.to(x.dtype)


def factored_svd(left: Tensor, right: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` (default: all) singular triplets (U, S, Vᵀ) of the (m, n) matrix left @ right, whose inner
    size p is small (a LoRA delta's rank), from QR of both factors in float64: left = Q_l R_l, rightᵀ = Q_r R_r,
    and the SVD of the (p, p) core R_l R_rᵀ. Exact, and O((m + n)·p²) where ``gram_svd`` of the product costs
    O(m·n·min(m, n)). Singular values at or below ``gram_svd``'s cut come back as 0 with zero vectors, as there;
    at most min(k, p) triplets come back."""
    rows, cols, inner = left.shape[0], right.shape[1], left.shape[1]
    take = inner if k is None else min(k, inner)
    if take == 0:
        return left.new_zeros(rows, 0), left.new_zeros(0), left.new_zeros(0, cols)
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    u_core, sigma, vt_core = torch.linalg.svd(r_left @ r_right.T)
    live = (sigma > sigma[:1] * _cut(max(rows, cols)))[:take]
    u = (q_left @ u_core[:, :take]) * live
    vt = (vt_core[:take] @ q_right.T) * live[:, None]
    return u.to(left.dtype), (sigma[:take] * live).to(left.dtype), vt.to(left.dtype)


def polar(x: Tensor) -> Tensor:
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ: the nearest matrix with orthonormal columns (or rows,
    for a wide x) in Frobenius norm, as x (xᵀx)^(-1/2) with the inverse root from ``gram_svd``'s float64
    eigendecomposition. Of a rank-deficient x (the same direction kept by two tasks), the partial isometry on
    x's range: the singular vectors of zero singular values are arbitrary, so they are left out."""
    wide = x.shape[-2] < x.shape[-1]
    tall = x.mT if wide else x
    sigma, vectors, live = _gram_eigh(tall)
    top = sigma[..., :1]
    nonzero = top > 0  # a zero matrix is not ill-conditioned: its factor is 0
    weakest = torch.where(live, sigma, top).amin(-1, keepdim=True) / torch.where(nonzero, top, 1.0)
    if bool((nonzero & (weakest < ILL_CONDITIONED)).any()):
        factor = _polar_by_svd(tall).to(x.dtype)
    else:
        factor = tall @ ((vectors * _inverse(sigma, live).unsqueeze(-2)) @ vectors.mT).to(x.dtype)
    return factor.mT if wide else factor


def _polar_by_svd(tall: Tensor) -> Tensor:
    """The polar factor of an ill-conditioned tall matrix by LAPACK's float64 SVD, with ``gram_svd``'s cut."""
    p, sigma, qt = torch.linalg.svd(tall.double(), full_matrices=False)
    live = sigma > sigma[..., :1] * _cut(tall.shape[-2])
    return (p * live.unsqueeze(-2)) @ qt


def tsv_delta(deltas: Tensor) -> Tensor:
    """TSV-M (Gargiulo et al., arXiv:2412.00081) for stacked task matrices (T, out, in): keep each Δ_i's top
    k = ⌊r/T⌋ singular triplets (at least one), concatenate the U's and the V's, replace each concatenation
    by its polar factor and recombine: Δ = U_⊥ diag(S_cat) V_⊥ᵀ. A Δ_i of rank below k contributes only
    its nonzero triplets (``gram_svd``)."""
    t, rows, cols = deltas.shape
    k = max(1, min(rows, cols) // t)
    u, s, vt = gram_svd(deltas, k)
    u_cat = u.transpose(0, 1).reshape(rows, t * k)
    v_cat = vt.reshape(t * k, cols)
    return (polar(u_cat) * s.reshape(1, -1)) @ polar(v_cat)


Factors = Sequence[tuple["Tensor", "Tensor"]]  # per task (left, right), left @ right = Δ_i: adapters over the base


def _stacked(factors: Factors) -> tuple[Tensor, Tensor]:
    """Σ_i Δ_i as one product: [left_1 … left_T] @ [right_1; …; right_T]."""
    return torch.cat([left for left, _ in factors], dim=1), torch.cat([right for _, right in factors], dim=0)


def tsv_delta_factored(factors: Factors, shape: tuple[int, int]) -> Tensor:
    """``tsv_delta`` from each Δ_i's factors: every Δ_i's top ⌊r/T⌋ triplets by ``factored_svd`` (a LoRA delta
    has no more than its rank), so that the polar factors are of (out, Σ kept) and (Σ kept, in) matrices."""
    k = max(1, min(shape) // len(factors))
    parts = [factored_svd(left, right, k) for left, right in factors]
    u_cat = torch.cat([u for u, _, _ in parts], dim=1)
    v_cat = torch.cat([vt for _, _, vt in parts], dim=0)
    s_cat = torch.cat([s for _, s, _ in parts])
    return (polar(u_cat) * s_cat.reshape(1, -1)) @ polar(v_cat)


def iso_c_delta(deltas: Tensor) -> Tensor:
    """Iso-C (Marczak et al., arXiv:2502.04959): Σ_i Δ_i = U S Vᵀ with its spectrum flattened to the mean
    singular value: Δ = mean(S) · U Vᵀ."""
    u, s, vt = gram_svd(deltas.sum(0))
    return s.mean() * (u @ vt)


def iso_c_delta_factored(factors: Factors, shape: tuple[int, int]) -> Tensor:
    """``iso_c_delta`` from the factors: Σ_i Δ_i's SVD by ``factored_svd`` of the stacked factors, the mean taken
    over all r = min(out, in) singular values (the ones beyond the sum's rank are 0), as the dense path does."""
    u, s, vt = factored_svd(*_stacked(factors))
    return (s.sum() / min(shape)) * (u @ vt)


def iso_cts_split(r: int, t: int, common_space_fraction: float) -> tuple[int, int]:
    """(k_common, k_per_task) with k_common + T·k_per_task = r: the common space is ⌊r·fraction⌋ rounded so
    that the rest divides evenly among the T tasks (the reference code's rule), never more than r."""
    per_task = min(round((r - int(r * common_space_fraction)) / t), r // t)
    return r - t * per_task, per_task


def _resolved(u: Tensor, s: Tensor, vt: Tensor, scale: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The triplets of a projected task matrix with σ above ``gram_svd``'s cut relative to ``scale``, the task
    matrix's own norm (per matrix, for a stack), the others zeroed. Projecting the common subspace out of a Δ_i
    that lies inside it (a low-rank Δ_i, as a LoRA delta is) leaves only rounding noise, whose σ are large only
    relative to the noise itself: cut against that, they would enter the merge as directions of full weight."""
    live = s > scale.reshape(*scale.shape, *([1] * (s.dim() - scale.dim()))) * _cut(size)
    return u * live.unsqueeze(-2), s * live, vt * live.unsqueeze(-1)


def _frobenius(left: Tensor, right: Tensor) -> Tensor:
    """‖left @ right‖_F without forming the product: √tr((leftᵀleft)(right rightᵀ))."""
    left64, right64 = left.double(), right.double()
    return ((left64.T @ left64) * (right64 @ right64.T)).sum().clamp_min(0).sqrt().to(left.dtype)


def iso_cts_delta(deltas: Tensor, common_space_fraction: float) -> Tensor:
    """Iso-CTS (Marczak et al.): the top k_common left and right singular vectors of Σ_i Δ_i, plus each task's
    top k_per_task singular triplets of Δ_i with the common left subspace projected out (Δ_i − U_c U_cᵀ Δ_i);
    both sets of vectors orthogonalised together by polar factors, with an isotropic spectrum (the mean of the
    kept singular values): Δ = mean(S_kept) · U_⊥ V_⊥ᵀ. With no task-specific room (k_per_task = 0) it is Iso-C."""
    t, rows, cols = deltas.shape
    k_common, per_task = iso_cts_split(min(rows, cols), t, common_space_fraction)
    if per_task == 0:
        return iso_c_delta(deltas)
    u_c, s_c, vt_c = gram_svd(deltas.sum(0), k_common)
    specific = deltas - u_c @ (u_c.T @ deltas)
    u_t, s_t, vt_t = _resolved(*gram_svd(specific, per_task), deltas.flatten(1).norm(dim=1), max(rows, cols))
    u_all = torch.cat([u_t.transpose(0, 1).reshape(rows, t * per_task), u_c], dim=1)
    v_all = torch.cat([vt_t.reshape(t * per_task, cols), vt_c], dim=0)
    spectrum = torch.cat([s_t.reshape(-1), s_c])
    return spectrum.mean() * (polar(u_all) @ polar(v_all))


def iso_cts_delta_factored(factors: Factors, shape: tuple[int, int], common_space_fraction: float) -> Tensor:
    """``iso_cts_delta`` from the factors: the common subspace from the stacked factors, each task's own
    directions from (left_i − U_c U_cᵀ left_i) @ right_i, both by ``factored_svd``; the flat spectrum is the
    sum of the kept singular values over the r slots the dense path averages."""
    rank_bound = min(shape)
    k_common, per_task = iso_cts_split(rank_bound, len(factors), common_space_fraction)
    if per_task == 0:
        return iso_c_delta_factored(factors, shape)
    u_c, s_c, vt_c = factored_svd(*_stacked(factors), k_common)
    size = max(shape)
    parts = [_resolved(*factored_svd(left - u_c @ (u_c.T @ left), right, per_task), _frobenius(left, right), size)
             for left, right in factors]
    u_all = torch.cat([u for u, _, _ in parts] + [u_c], dim=1)
    v_all = torch.cat([vt for _, _, vt in parts] + [vt_c], dim=0)
    kept = sum(s.sum() for _, s, _ in parts) + s_c.sum()
    return (kept / rank_bound) * (polar(u_all) @ polar(v_all))


def wudi_system(deltas: Tensor) -> tuple[Tensor, Tensor]:
    """WUDI's objective Σ_i ‖(τ − Δ_i) Δ_iᵀ‖²_F / ‖Δ_i‖²_F is RegMean's with Grams G_i = Δ_iᵀΔ_i / ‖Δ_i‖²_F:
    returns (Σ_i G_i, Σ_i Δ_i G_i), so that its gradient is 2 (τ Σ G_i − Σ Δ_i G_i). Zero task vectors, which
    the objective divides by, take no part."""
    norms = deltas.flatten(1).pow(2).sum(1)
    live = deltas[norms > 0]
    grams = live.transpose(1, 2) @ live / norms[norms > 0].reshape(-1, 1, 1)
    return grams.sum(0), (live @ grams).sum(0)


def wudi_exact(deltas: Tensor) -> Tensor:
    """The minimiser of WUDI's objective: τ Σ G_i = Σ Δ_i G_i, solved in float64 by Cholesky; where Σ G_i is
    singular (fewer task-vector rows than inputs), the minimum-norm solution by its eigendecomposition,
    which is also where gradient descent from τ = Σ Δ_i stays (every Δ_i's rows lie in Σ G_i's range)."""
    if not bool((deltas != 0).any()):
        return torch.zeros_like(deltas[0])
    gram_sum, rhs = (m.double() for m in wudi_system(deltas))
    return _right_solve(gram_sum, rhs).to(deltas.dtype)


def _right_solve(gram_sum: Tensor, rhs: Tensor) -> Tensor:
    """τ with τ·gram_sum = rhs for a symmetric positive semi-definite gram_sum, in float64: Cholesky, or where
    it is singular the minimum-norm solution by its eigendecomposition."""
    factor, info = torch.linalg.cholesky_ex(gram_sum)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, factor).T
    values, vectors = torch.linalg.eigh(gram_sum)
    keep = values > values.max() * gram_sum.shape[0] * torch.finfo(torch.float64).eps
    return (vectors @ (_inverse(values, keep)[:, None] * (vectors.T @ rhs.T))).T


def wudi_exact_factored(factors: Factors, shape: tuple[int, int]) -> Tensor:
    """``wudi_exact`` from the factors. Every Δ_i's rows lie in the span of the stacked right factors, with an
    orthonormal basis Q (in, K) from their QR; with d_i = Δ_i Q, G_i = Q (d_iᵀd_i / ‖d_i‖²) Qᵀ, so the system
    shrinks to (K, K) and τ = X Qᵀ — the dense path's minimum-norm solution, without forming an (in, in) Gram."""
    live = [(left.double(), right.double()) for left, right in factors if left.shape[1] > 0]
    if not live:
        return factors[0][0].new_zeros(shape)
    basis, _ = torch.linalg.qr(torch.cat([right for _, right in live], dim=0).T)
    projected = [left @ (right @ basis) for left, right in live]
    projected = [d for d in projected if bool((d != 0).any())]
    if not projected:
        return factors[0][0].new_zeros(shape)
    grams = [d.T @ d / d.pow(2).sum() for d in projected]
    solution = _right_solve(sum(grams), sum(d @ g for d, g in zip(projected, grams)))
    return (solution @ basis.T).to(factors[0][0].dtype)


def wudi_adam(deltas: Tensor, *, iterations: int, lr: float) -> Tensor:
    """The paper's solve: Adam (lr ``lr``, no weight decay) on WUDI's objective from τ = Σ_i Δ_i for
    ``iterations`` steps, an early-stopped descent. The gradient is formed in closed form from
    ``wudi_system`` — the same gradient autograd gives, one (out, in)·(in, in) product per step instead of T."""
    if not bool((deltas != 0).any()):  # a frozen tensor: nothing to descend on, and nothing to pay for
        return torch.zeros_like(deltas[0])
    gram_sum, rhs = wudi_system(deltas)
    with torch.inference_mode(False):  # the engine merges under inference mode; Adam keeps its own state
        tau = deltas.sum(0).clone()
        gram_sum, rhs = gram_sum.clone(), rhs.clone()
        optimizer = torch.optim.Adam([tau], lr=lr, weight_decay=0.0)
        for _ in range(iterations):
            tau.grad = 2 * (tau @ gram_sum - rhs)
            optimizer.step()
        return tau.detach()


def _merge(base: Tensor, tensors: Sequence[Tensor], alpha: float, matrix_delta, factors: list | None = None,
           factored_delta=None) -> Tensor:
    """θ_0 + α·Δ: from each input's delta factors when the engine gives them for every input of a matrix (adapters
    over this base), else from the task vectors θ_i − θ_0."""
    if base.dim() == 2 and factors is not None and all(f is not None for f in factors):
        if all(left.shape[1] == 0 for left, _ in factors):  # no adapter touches this matrix
            return base.clone()
        return base + alpha * factored_delta(factors, tuple(base.shape)).to(base.dtype)
    deltas = task_vectors(base, tensors)
    if base.dim() == 2 and not bool(deltas.any()):  # a frozen matrix (an embedding): nothing to decompose
        return base.clone()
    delta = matrix_delta(deltas) if base.dim() == 2 else deltas.mean(0)
    return base + alpha * delta


@register("tsv", params=[ALPHA], work_copies=WORK_COPIES, reference="arXiv:2412.00081",
          tuning=fixed({"tsv": points(alpha=ALPHA_GRID)}), low_rank=True)
def tsv(base: Tensor, tensors: Sequence[Tensor], *, alpha: float, factors: list | None = None) -> Tensor:
    """Task Singular Vectors (TSV-M): each 2-D Δ_i's top ⌊r/T⌋ singular triplets, their U's and V's
    orthogonalised by polar factors, θ_0 + α U_⊥ diag(S) V_⊥ᵀ (``tsv_delta``); other tensors θ_0 + α·mean Δ_i."""
    return _merge(base, tensors, alpha, tsv_delta, factors, tsv_delta_factored)


@register("iso_c", params=[ALPHA], work_copies=WORK_COPIES, reference="arXiv:2502.04959",
          tuning=fixed({"iso_c": points(alpha=ALPHA_GRID)}), low_rank=True)
def iso_c(base: Tensor, tensors: Sequence[Tensor], *, alpha: float, factors: list | None = None) -> Tensor:
    """Iso-C: θ_0 + α·mean(S)·U Vᵀ with U S Vᵀ = Σ_i Δ_i for each 2-D tensor (a flat spectrum); other tensors
    θ_0 + α·mean Δ_i."""
    return _merge(base, tensors, alpha, iso_c_delta, factors, iso_c_delta_factored)


@register("iso_cts", params=[ALPHA, Param("common_space_fraction", float, 0.8, interval=(0.0, 1.0),
                                          help="share of the rank bound given to Σ Δ_i's common subspace")],
          reference="arXiv:2502.04959", work_copies=WORK_COPIES, tuning=fixed({"iso_cts": points(alpha=ALPHA_GRID)}),
          low_rank=True)
def iso_cts(base: Tensor, tensors: Sequence[Tensor], *, alpha: float, common_space_fraction: float,
            factors: list | None = None) -> Tensor:
    """Iso-CTS: Σ_i Δ_i's top singular vectors (the common subspace) plus each Δ_i's own top directions off
    it, orthogonalised, with a flat spectrum (``iso_cts_delta``); θ_0 + α·that; other tensors θ_0 + α·mean Δ_i."""
    return _merge(base, tensors, alpha, lambda d: iso_cts_delta(d, common_space_fraction), factors,
                  lambda f, shape: iso_cts_delta_factored(f, shape, common_space_fraction))


@register("wudi", params=[
    ALPHA,
    Param("solver", str, "exact", choices=("exact", "adam"),
          help="exact: the objective's minimiser; adam: the paper's early-stopped Adam descent"),
    Param("iterations", int, 300, interval=(1, 100_000), help="Adam steps (solver: adam)"),
    Param("lr", float, 1e-5, interval=(0.0, 1.0), open_low=True, help="Adam learning rate (solver: adam)"),
], reference="arXiv:2503.08099", work_copies=WORK_COPIES,
    tuning=fixed({f"wudi[{solver}]": points(solver=[solver], alpha=ALPHA_GRID) for solver in ("exact", "adam")}),
    # 300 Adam steps, each an (out, in)·(in, in) product: minutes for MiniLM on a CPU (its paper runs on a GPU)
    heavy=("wudi[adam]",), low_rank=True)
def wudi(base: Tensor, tensors: Sequence[Tensor], *, alpha: float, solver: str, iterations: int,
         lr: float, factors: list | None = None) -> Tensor:
    """WUDI: for each 2-D tensor, τ minimising Σ_i ‖(τ − Δ_i) Δ_iᵀ‖²_F / ‖Δ_i‖²_F, exactly or by the paper's
    Adam descent from Σ_i Δ_i; θ_0 + α τ; other tensors θ_0 + α·mean Δ_i."""
    if solver == "exact":
        return _merge(base, tensors, alpha, wudi_exact, factors, wudi_exact_factored)

    def adam(deltas: Tensor) -> Tensor:
        return wudi_adam(deltas, iterations=iterations, lr=lr)

    # Adam is not rotation-invariant, so it runs on the exact dense deltas the factors make
    return _merge(base, tensors, alpha, adam, factors,
                  lambda f, shape: adam(torch.stack([left @ right for left, right in f])))
