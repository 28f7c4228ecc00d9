"""Curvature-aware merges: each is a declaration of its per-model precision C_i in one linear system,

    (C_0 + Σ_i λ_i C_i) θ = C_0 θ_0 + Σ_i λ_i C_i θ_i,

solved by ``mergesmith.solve`` (elementwise for diagonal C_i, Cholesky for Gram matrices, conjugate gradient
for Kronecker factors). Statistics arrive per tensor as ``stats[i] = {kind: tensor}`` (see the registry);
a tensor no model has the statistic for goes through the method's stated fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mergesmith.checks import value_range
from mergesmith.errors import RecipeError, StatisticsError
from mergesmith.lazy import lazy_import
from mergesmith.methods.registry import Param, fixed, nonzero_weight_sum, points, register, weights_sum_to_zero
from mergesmith.solve import kron_cg, solve_diagonal, solve_gram

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

# not task_arithmetic's WEIGHT: λ_i weighs a precision matrix, and Σ λ_i C_i is positive semi-definite only
# for λ_i ≥ 0 (a negative weight would make the system indefinite and its solve fail or mislead)
WEIGHT = Param("weight", float, 1.0, per_model=True, interval=(0.0, float("inf")),
               help="model weight λ_i >= 0, how much model i's precision counts")
Stats = Sequence[dict[str, Any]]


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_i λ_i θ_i / Σ_i λ_i."""
    total = sum(weights)
    if weights_sum_to_zero(weights):
        raise RecipeError("the model weights sum to zero; a weighted average is undefined")
    return sum(w * t for w, t in zip(weights, tensors)) / total


def statistic(stats: Stats, kind: str, name: str) -> list[Tensor] | None:
    """Every model's ``kind`` statistic for this tensor, or None when no model has one."""
    found = [s.get(kind) for s in stats]
    if all(f is None for f in found):
        return None
    if any(f is None for f in found):
        missing = next(i for i, f in enumerate(found) if f is None)
        raise StatisticsError(f"'{name}': model {missing} has no '{kind}' statistic for this tensor while other "
                              f"models do; measure every model's statistics the same way")
    return found


def fisher_problem(fisher: Tensor) -> str | None:
    """What is wrong with a diagonal Fisher, if anything: it must be finite and non-negative (a mean of
    squares); dividing by anything else would silently give a wrong model."""
    low, high = value_range(fisher)  # one pass, as the engine's check of every input and output
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        return "has NaN or infinite entries"
    if bool(low < 0):
        return f"has negative entries (min {float(low):.3g}), but a Fisher is a mean of squares"
    return None


def checked_fisher(fisher: Tensor, model: int | str, name: str) -> Tensor:
    problem = fisher_problem(fisher)
    if problem is not None:
        raise StatisticsError(f"'{name}': the Fisher of model {model} {problem}; measure it again")
    return fisher


def _needs_fisher(kwargs: dict[str, Any]) -> tuple[str, ...]:
    return ("fisher", "fisher_norm") if kwargs["fisher_normalize"] == "global" else ("fisher",)


@register("fisher", base="ignored", needs=_needs_fisher, validate=nonzero_weight_sum,
          reference="arXiv:2111.09832",
          # the floor sets how far an entry's Fisher must rise above it to count: from pure Fisher weighting
          # (1e-10) towards the plain average (1e-4, above most entries of a small model's empirical Fisher)
          tuning=fixed({"fisher": points(fisher_normalize=["none", "global"], fisher_floor=[1e-10, 1e-7, 1e-4])}),
          params=[
    WEIGHT,
    Param("fisher_floor", float, 1e-6, interval=(0.0, float("inf")), help="lower bound on every Fisher entry"),
    Param("floor_first_only", bool, False, help="floor only the first model's Fisher (favor_target_model)"),
    Param("fisher_normalize", str, "none", choices=("none", "global", "per_tensor"),
          help="divide each Fisher by its L2 norm over the whole model or over this tensor"),
])
def fisher(base: None, tensors: Sequence[Tensor], *, weight: Sequence[float], fisher_floor: float,
           floor_first_only: bool, fisher_normalize: str, stats: Stats, base_stats: dict, name: str) -> Tensor:
    """Fisher merging (Matena & Raffel): θ = Σ_i λ_i F̂_i θ_i / Σ_i λ_i F̂_i elementwise, with F̂_i = F_i / s_i
    (s_i = 1, the L2 norm of model i's whole Fisher, or of this tensor's), then F̂_i ← max(F̂_i, fisher_floor)
    for every model (or only the first). Entries where Σ_i λ_i F̂_i = 0, and tensors without a Fisher, take
    the weighted average Σ_i λ_i θ_i / Σ_i λ_i."""
    average = weighted_average(tensors, weight)
    fishers = statistic(stats, "fisher", name)
    if fishers is None:
        return average
    precision = torch.zeros_like(average)
    rhs = torch.zeros_like(average)
    for i, (theta, f, s) in enumerate(zip(tensors, fishers, stats)):
        f = checked_fisher(f.to(average), i, name)
        if fisher_normalize != "none":
            # the whole model's norm comes from the engine; a lone tensor is its own whole model
            norm = s.get("fisher_norm") if fisher_normalize == "global" else None
            norm = float(torch.linalg.vector_norm(f) if norm is None else norm)
            f = f / norm if norm > 0 else f
        if fisher_floor > 0 and (i == 0 or not floor_first_only):
            f = f.clamp(min=fisher_floor)
        precision += weight[i] * f
        rhs += weight[i] * f * theta
    return solve_diagonal(precision, rhs, fallback=average)


def _tilde(gram: Tensor, alpha: float) -> Tensor:
    """RegMean's off-diagonal scaling: α G + (1 − α) diag(G)."""
    return gram if alpha == 1.0 else alpha * gram + (1 - alpha) * torch.diag_embed(gram.diagonal())


def _regmean_fallback(base: Tensor | None, tensors: Sequence[Tensor], weight: Sequence[float], fallback: str,
                      name: str) -> Tensor:
    if fallback == "base":
        if base is None:
            raise RecipeError(f"'{name}': fallback 'base' needs a base_model in the recipe")
        return base
    return weighted_average(tensors, weight)


def gram_solve(tensors: Sequence[Tensor], grams: Sequence[Tensor], weight: Sequence[float], alpha: float,
               name: str) -> Tensor:
    """Wᵀ = (Σ_i λ_i G̃_i)⁻¹ Σ_i λ_i G̃_i W_iᵀ for weights W_i (out, in) and Grams G_i (in, in).

    Solved for the departure from the weighted average W̄ — W = W̄ + ((Σ λ_i G̃_i)⁻¹ Σ λ_i G̃_i (W_i − W̄)ᵀ)ᵀ,
    the same W — so that input directions no model's data reached (a singular Gram sum) keep the average
    instead of collapsing to zero, and identical models merge to themselves exactly."""
    average = weighted_average(tensors, weight)
    tilde = [_tilde(g.to(average), alpha) for g in grams]
    gram_sum = sum(w * g for w, g in zip(weight, tilde))
    rhs = sum(w * g @ (t - average).T for w, g, t in zip(weight, tilde, tensors))
    return average + solve_gram(gram_sum, rhs, name=name).T


def _validate_regmean(kwargs: dict[str, Any], has_base: bool, n_models: int) -> str | None:
    if kwargs["fallback"] == "base" and not has_base:
        return "regmean's fallback: base takes tensors without a Gram matrix from the base; add a base_model or " \
               "set fallback: linear"
    return nonzero_weight_sum(kwargs, has_base, n_models)


@register("regmean", base="optional", needs=lambda kwargs: ("gram",), validate=_validate_regmean,
          reference="arXiv:2212.09849", tuning=fixed({"regmean": points(alpha=[0.1, 0.3, 0.5, 0.7, 0.9, 1.0])}),
          params=[
    WEIGHT,
    Param("alpha", float, 1.0, interval=(0.0, 1.0), help="scale of the Gram matrices' off-diagonal entries"),
    Param("fallback", str, "linear", choices=("linear", "base"),
          help="for tensors without a Gram matrix: the weighted average, or the base's tensor"),
])
def regmean(base: Tensor | None, tensors: Sequence[Tensor], *, weight: Sequence[float], alpha: float, fallback: str,
            stats: Stats, base_stats: dict, name: str) -> Tensor:
    """RegMean (Jin et al.): for a Linear weight W_i (out, in) with input Gram G_i = XᵀX/n,
    Wᵀ = (Σ_i λ_i G̃_i)⁻¹ Σ_i λ_i G̃_i W_iᵀ with G̃_i = α G_i + (1 − α) diag(G_i). Tensors without a Gram
    matrix (biases, norms, embeddings) take the fallback: the weighted average or the base's tensor."""
    grams = statistic(stats, "gram", name)
    if grams is None:
        return _regmean_fallback(base, tensors, weight, fallback, name)
    return gram_solve(tensors, grams, weight, alpha, name)


@register("regmean_plusplus", base="optional", layerwise=True, reference="arXiv:2508.03121",
          needs=lambda kwargs: ("gram",),  # measured at merge time (mergesmith.layerwise), not read from a sidecar
          tuning=fixed({"regmean_plusplus": points(alpha=[0.1, 0.3, 0.5, 0.7, 0.9, 1.0])}), params=[
    WEIGHT,
    Param("alpha", float, 1.0, interval=(0.0, 1.0), help="scale of the Gram matrices' off-diagonal entries"),
])
def regmean_plusplus(base: Tensor | None, tensors: Sequence[Tensor], *, weight: Sequence[float], alpha: float,
                     stats: Stats, base_stats: dict, name: str) -> Tensor:
    """RegMean++ (Nguyen et al.): RegMean whose Gram matrices of layer l are measured on each model's
    calibration data run through the merged layers below l (its own layer l above them), merged from the lowest
    layer up at merge time (``mergesmith.layerwise``); tensors without a Gram matrix take the weighted average."""
    return regmean(base, tensors, weight=weight, alpha=alpha, fallback="linear", stats=stats, base_stats=base_stats,
                   name=name)


_MATS_KINDS = {"identity": (), "fisher": ("fisher",), "gram": ("gram",), "kfac": ("kfac_a", "kfac_g")}
# each precision's whole-model norm, supplied by the engine per model (mergesmith.statistics.DERIVED)
_MATS_NORMS = {"fisher": "fisher_norm", "gram": "gram_norm", "kfac": "kfac_norm"}


def _mats_needs(kwargs: dict[str, Any]) -> tuple[str, ...]:
    kinds = _MATS_KINDS[kwargs["precision"]]
    if kwargs.get("precision_normalize", "none") == "global" and kwargs["precision"] in _MATS_NORMS:
        return (*kinds, _MATS_NORMS[kwargs["precision"]])
    return kinds


def _validate_mats(kwargs: dict[str, Any], has_base: bool, n_models: int) -> str | None:
    # only the iterative solves (fisher, kfac) start from ``init``; identity and gram ignore it
    if kwargs["precision"] in ("fisher", "kfac") and kwargs["init"] != "average" and not has_base:
        return (f"mats starts conjugate gradient from init '{kwargs['init']}', which needs a base_model; add one "
                f"or set init: average")
    return nonzero_weight_sum(kwargs, has_base, n_models)


@register("mats", base="optional", needs=_mats_needs, validate=_validate_mats, reports=True,
          reference="arXiv:2312.04339", tuning=fixed({
              # the diagonal solve is exact: the start only fills the entries no model's Fisher covers
              "mats[fisher]": [*points(precision=["fisher"], init=["task_arithmetic"], **{"lambda": [0.1, 0.3, 1.0]}),
                               *points(precision=["fisher"], init=["average", "base"])],
              "mats[gram]": [{"precision": "gram"}],  # an exact solve with nothing to set (RegMean at α = 1)
              "mats[kfac]": points(precision=["kfac"], damping=[1e-3, 1e-2, 1e-1], **{"lambda": [0.1, 0.5]}),
              # every model's precision at one scale (issue 12, item 0: one fine-tune's Fisher was 10²-10⁶ the others')
              "mats[fisher-normalized]": [
                  *points(precision=["fisher"], precision_normalize=["global"], init=["task_arithmetic"],
                          **{"lambda": [0.1, 0.3, 1.0]}),
                  *points(precision=["fisher"], precision_normalize=["global"], init=["average", "base"])],
              "mats[kfac-normalized]": points(precision=["kfac"], precision_normalize=["global"],
                                              damping=[1e-3, 1e-2, 1e-1], **{"lambda": [0.1, 0.5]})}),
          params=[
    WEIGHT,
    Param("precision", str, "kfac", choices=("identity", "fisher", "gram", "kfac"), help="the precision C_i"),
    Param("init", str, "task_arithmetic", choices=("task_arithmetic", "average", "base"),
          help="where conjugate gradient starts"),
    Param("lambda", float, 1.0, arg="scale", interval=(-float("inf"), float("inf")),
          help="task-arithmetic scale λ of the starting point"),
    Param("max_iters", int, 100, interval=(1, float("inf")), help="conjugate-gradient iterations at most"),
    Param("tol", float, 1e-4, interval=(0.0, 1.0), open_low=True, open_high=True,
          help="relative residual ‖b − Mx‖/‖b‖ to stop at"),
    Param("preconditioner", bool, True, help="precondition CG with the mean factors' Kronecker product"),
    Param("damping", float, 1e-3, interval=(0.0, float("inf")),
          help="K-FAC damping δ: each factor F gets δ·mean(diag F) added to its diagonal"),
    Param("precision_normalize", str, "none", choices=("none", "global"),
          help="global: divide each model's precision C_i by its Frobenius norm over the whole model"),
])
def mats(base: Tensor | None, tensors: Sequence[Tensor], *, weight: Sequence[float], precision: str, init: str,
         scale: float, max_iters: int, tol: float, preconditioner: bool, damping: float, precision_normalize: str,
         stats: Stats, base_stats: dict, name: str, report: dict[str, Any] | None = None) -> Tensor:
    """MaTS (Tam et al.): solve (Σ_i λ_i C_i) θ = Σ_i λ_i C_i θ_i with C_i the identity (the weighted
    average), the diagonal Fisher (elementwise), the Gram matrix G_i ⊗ I (Cholesky, as RegMean) or K-FAC
    A_i ⊗ G_i, i.e. C_i(W) = G_i W A_i, by (preconditioned) conjugate gradient from ``init``: θ_0 + λ Σ_i τ_i,
    the average or the base. Tensors without the statistic take the weighted average; Fisher entries no
    model cares about keep the starting value. CG's iterations and initial and final relative residuals go
    into ``report`` when given.

    K-FAC factors measured on little data are singular (rank ≤ rows), so the system has no unique solution
    and CG in finite precision breaks down on it. ``damping`` δ makes each factor positive definite, F ←
    F + δ·mean(diag F)·I, K-FAC's usual Tikhonov damping (0 solves the system exactly as given); CG runs in
    float64 whatever the compute dtype (float32 on MPS).

    ``precision_normalize: global`` divides each model's C_i by its Frobenius norm over the whole model — ‖F_i‖,
    the Gram matrices' √(Σ_l ‖G_l‖²), K-FAC's √(Σ_l ‖A_l‖²‖G_l‖²) — so that a model whose gradients are larger
    (a less confident fine-tune) does not take the merge over by its statistics' scale alone (docs/quality.md,
    "Why the Fisher-weighted merges fall behind")."""
    average = weighted_average(tensors, weight)
    kinds = _MATS_KINDS[precision]
    if not kinds or any(statistic(stats, kind, name) is None for kind in kinds):
        return average
    start = _mats_start(base, tensors, average, init, scale, name)
    scales = (_precision_norms(stats, precision, name) if precision_normalize == "global"
              else [1.0] * len(tensors))
    if precision == "fisher":
        fishers = [checked_fisher(f.to(average), i, name) / c
                   for i, (f, c) in enumerate(zip(statistic(stats, "fisher", name), scales))]
        total = sum(w * f for w, f in zip(weight, fishers))
        return solve_diagonal(total, sum(w * f * t for w, f, t in zip(weight, fishers, tensors)), fallback=start)
    if precision == "gram":
        grams = [g / c for g, c in zip(statistic(stats, "gram", name), scales)]
        return gram_solve(tensors, grams, weight, 1.0, name)
    wide = torch.float32 if average.device.type == "mps" else torch.float64
    a_factors = [damped(a.to(wide), damping) for a in statistic(stats, "kfac_a", name)]
    g_factors = [damped(g.to(wide), damping) / c for g, c in zip(statistic(stats, "kfac_g", name), scales)]
    rhs = sum(w * g @ t.to(wide) @ a for w, a, g, t in zip(weight, a_factors, g_factors, tensors))
    merged, outcome = kron_cg(a_factors, g_factors, rhs, weights=list(weight), x0=start.to(wide),
                              precondition=preconditioner, max_iters=max_iters, tol=tol, name=name)
    if report is not None:
        report.update(iterations=outcome.iterations, initial_residual=float(outcome.initial_residual.max()),
                      final_residual=float(outcome.final_residual.max()))
    return merged.to(average.dtype)


def _precision_norms(stats: Stats, precision: str, name: str) -> list[float]:
    """Each model's whole-model precision norm (1 where it is 0: a model that cares about nothing stays so)."""
    norms = []
    for i, s in enumerate(stats):
        norm = s.get(_MATS_NORMS[precision])
        if norm is None:
            raise StatisticsError(f"'{name}': model {i} has no {_MATS_NORMS[precision]} for "
                                  f"precision_normalize: global")
        norms.append(float(norm) if float(norm) > 0 else 1.0)
    return norms


def damped(factor: Tensor, damping: float) -> Tensor:
    """F + δ·mean(diag F)·I: the damping is relative, so it means the same at any scale of the statistics."""
    if damping == 0:
        return factor
    return factor + damping * factor.diagonal().mean() * torch.eye(factor.shape[0], dtype=factor.dtype,
                                                                   device=factor.device)


def _mats_start(base: Tensor | None, tensors: Sequence[Tensor], average: Tensor, init: str, scale: float,
                name: str) -> Tensor:
    if init == "average":
        return average
    if base is None:
        raise RecipeError(f"'{name}': mats init '{init}' needs a base_model; add one or set init: average")
    if init == "base":
        return base
    return base + scale * sum(t - base for t in tensors)


@register("gradient_matching", base="required", validate=nonzero_weight_sum, reference="arXiv:2310.12808",
          # with δ = 0 the α_t cancel (a Fisher-weighted mean of task vectors); a larger δ moves the merge towards
          # task arithmetic with λ = α_t (1/T: the average; 1/(2T): half of it). The base's Fisher as prior needs
          # a base that has a head to measure with.
          tuning=lambda n: {"gradient_matching": points(prior=[0.0, 1e-2, 1.0], weight=[0.5 / n, 1 / n])},
          base_needs=lambda kwargs: ("fisher",) if kwargs["prior"] == "base" else (),
          needs=lambda kwargs: ("fisher", "fisher_count"), params=[
    WEIGHT,
    Param("data_size", float, 0.0, per_model=True, interval=(0.0, float("inf")),
          help="examples behind each model's Fisher (0: the count its sidecar records)"),
    Param("prior", float, 0.0, interval=(0.0, float("inf")), words=("base",),
          help="H_0: a number δ (δ·I), or 'base' for the base model's Fisher"),
])
def gradient_matching(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float],
                      data_size: Sequence[float], prior: float | str, stats: Stats, base_stats: dict,
                      name: str) -> Tensor:
    """Uncertainty-based gradient matching (Daheim et al.): θ = θ_0 + H̄⁻¹ Σ_t α_t (H_0 + H_t) τ_t with
    H̄ = H_0 + Σ_t α_t H_t, diagonal H_t = N_t F_t (N_t = data_size, by default the sidecar's example count)
    and H_0 = δ·I or N_0 F_0 from the base's sidecar. Entries where H̄ = 0 take θ_0 + Σ_t α_t τ_t / Σ_t α_t
    (the limit δ → 0), as do tensors without a Fisher."""
    task_vectors = [t - base for t in tensors]
    average_step = weighted_average(task_vectors, weight)
    fishers = statistic(stats, "fisher", name)
    if fishers is None:
        return base + average_step
    hessians = [_size(n, s, i, name) * checked_fisher(f.to(base), i, name)
                for i, (f, n, s) in enumerate(zip(fishers, data_size, stats))]
    if prior == "base":
        if base_stats.get("fisher") is None:
            raise StatisticsError(f"'{name}': prior 'base' needs the base model's Fisher: give base_model a stats "
                                  f"sidecar")
        h0 = _size(0.0, base_stats, "base", name) * checked_fisher(base_stats["fisher"].to(base), "base", name)
    else:
        h0 = torch.full_like(base, float(prior))
    total = h0 + sum(a * h for a, h in zip(weight, hessians))
    rhs = sum(a * (h0 + h) * tau for a, h, tau in zip(weight, hessians, task_vectors))
    return base + solve_diagonal(total, rhs, fallback=average_step)


def _size(data_size: float, stats: dict, model: int | str, name: str) -> float:
    if data_size > 0:
        return data_size
    count = stats.get("fisher_count")
    if count is None or float(count) <= 0:
        raise StatisticsError(f"'{name}': model {model} has no example count for its Fisher; set its data_size")
    return float(count)
