"""mergekit's entry-selecting merges: SCE, RAM and RAM+ (tensor-local), Arcee Fusion and NearSwap — each
decides per entry of the task vectors τ_i = θ_i − θ_0 what survives, from statistics of those task vectors
alone. Definitions follow mergekit 0.1.5's source (tests/test_mergekit_parity.py checks every tensor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mergesmith.lazy import lazy_import
from mergesmith.methods.registry import Param, fixed, points, register
from mergesmith.methods.sparsify import top_k_mask
from mergesmith.methods.task_arithmetic import INT8_MASK, task_vectors

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")


def sce_weights(deltas: Tensor) -> Tensor:
    """SCE's "calculate" step: each model's weight is its mean squared task-vector entry, normalised to sum
    to 1 (uniform when all are ~0: Σ < 1e-6)."""
    weights = deltas.reshape(deltas.shape[0], -1).square().mean(1)
    total = float(weights.sum())
    return torch.full_like(weights, 1 / weights.numel()) if abs(total) < 1e-6 else weights / total


def sce_select_mask(deltas: Tensor, select_topk: float) -> Tensor:
    """SCE's "select" step: keep the k = ⌊select_topk · (entries whose variance over models is nonzero)⌋
    entries of largest variance across the models (population variance; equal variances: earlier first)."""
    variance = deltas.var(0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * select_topk)
    return top_k_mask(variance, k)


@register("sce", params=[Param("select_topk", float, 1.0, interval=(0.0, 1.0),
                               help="fraction of the highest-variance entries kept (1 keeps all)"),
                         INT8_MASK], reference="arXiv:2408.07990",
          tuning=fixed({"sce": points(select_topk=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0])}))
def sce(base: Tensor, tensors: Sequence[Tensor], *, select_topk: float, int8_mask: bool) -> Tensor:
    """SCE (FuseChat): select the top-variance entries of the τ_i (``select_topk``), weigh each model by its
    mean squared τ_i, erase entries whose sign disagrees with sign(Σ_i τ_i) (a sum of 0 elects +), and
    θ = θ_0 + Σ_i c_i m_i τ_i / max(Σ_i c_i m_i, 1e-6)."""
    deltas = task_vectors(base, tensors)
    if select_topk < 1:
        deltas *= sce_select_mask(deltas, select_topk)
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agrees = (deltas.sign() == elected).to(deltas.dtype)
    weighted = sce_weights(deltas).reshape(-1, *([1] * base.dim())) * agrees
    return base + (deltas * weighted).sum(0) / weighted.sum(0).clamp(min=1e-6)


def ram_parts(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """RAM's masks over stacked task vectors (T, ...): which entries each model changes (|τ_i| > ε), how many
    models change each entry, and whether an entry is changed by exactly one model."""
    changed = deltas.abs() > epsilon
    counts = changed.sum(0)
    return changed, counts, counts == 1


@register("ram", params=[Param("epsilon", float, 1e-5, interval=(0.0, float("inf")),
                               help="|τ_i| at or below this counts as unchanged")], reference="arXiv:2601.13572",
          # the threshold decides which entries count as one model's own: searched over task-vector scales
          tuning=fixed({"ram": points(epsilon=[1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3])}))
def ram(base: Tensor, tensors: Sequence[Tensor], *, epsilon: float) -> Tensor:
    """Reinforced Agent Merging: entries changed (|τ_i| > ε) by one model keep its τ_i whole, entries changed
    by several take the mean of those models' τ_i: θ = θ_0 + Σ_i [|τ_i| > ε] τ_i / max(count, 1)."""
    deltas = task_vectors(base, tensors)
    changed, counts, _ = ram_parts(deltas, epsilon)
    return base + (deltas * changed).sum(0) / counts.clamp(min=1)


@register("ramplus_tl", params=[
    Param("r", float, 0.1, interval=(0.0, float("inf")), help="strength of the unique entries' boost"),
    Param("alpha", float, 0.2, interval=(0.0, float("inf")), help="cap on the shared-to-unique ratio ρ_i"),
    Param("epsilon", float, 1e-5, interval=(0.0, float("inf")), help="|τ_i| at or below this counts as unchanged"),
], reference="arXiv:2601.13572", tuning=fixed({"ramplus_tl": points(r=[0.1, 0.5], epsilon=[1e-5, 1e-4, 1e-3])}))
def ramplus_tl(base: Tensor, tensors: Sequence[Tensor], *, r: float, alpha: float, epsilon: float) -> Tensor:
    """RAM+ (tensor-local): as RAM, but each model's unique entries are scaled by λ_i = 1 + r·min(ρ_i, α),
    where ρ_i = (model i's changed entries that others change too) / max(its unique ones, ε) in this tensor."""
    deltas = task_vectors(base, tensors)
    changed, counts, unique = ram_parts(deltas, epsilon)
    flat_changed, flat_unique = changed.reshape(len(tensors), -1), unique.reshape(1, -1)
    shared = (flat_changed & ~flat_unique).sum(1)
    rho = shared / (flat_changed & flat_unique).sum(1).double().clamp(min=epsilon)  # counts: exact in float64
    capped = torch.minimum(rho.clamp(min=0), rho.new_tensor(alpha))  # (a cap past float32's range is inf)
    boost = (1 + r * capped).to(deltas.dtype).reshape(-1, *([1] * base.dim()))
    kept = deltas * changed
    return base + (kept * unique * boost).sum(0) + (kept * ~unique).sum(0) / counts.clamp(min=1)


def floor_quantile(values: Tensor, q: float) -> Tensor:
    """The entry at index ⌊q·(n − 1)⌋ of the sorted values (no interpolation), found by selection."""
    flat = values.reshape(-1)
    return torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values


def fusion_importance(theta: Tensor, base: Tensor) -> Tensor:
    """Arcee Fusion's importance: |θ − θ_0| times KL(softmax(θ) ‖ softmax(θ_0)) along the last axis (one KL
    per row, each softmax + 1e-8)."""
    p = torch.nn.functional.softmax(theta, dim=-1) + 1e-8
    q = torch.nn.functional.softmax(base, dim=-1) + 1e-8
    return (theta - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)


@register("arcee_fusion", min_models=1, max_models=1, reference="mergekit (Arcee AI)")
def arcee_fusion(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Arcee Fusion: keep the other model's change only where its importance (``fusion_importance``) reaches
    median + 1.5·IQR of this tensor's importances (quantiles at floor indices); elsewhere the base."""
    importance = fusion_importance(tensors[0], base)
    q1, median, q3 = (floor_quantile(importance, q) for q in (0.25, 0.5, 0.75))
    return base + (tensors[0] - base) * (importance >= median + 1.5 * (q3 - q1))


@register("nearswap", min_models=1, max_models=1,
          params=[Param("t", float, interval=(0.0, float("inf")),
                        help="similarity threshold: entries closer than t move fully to the other model")],
          reference="mergekit (alchemonaut/QuartetAnemoi-70B-t0.0001)")
def nearswap(base: Tensor, tensors: Sequence[Tensor], *, t: float) -> Tensor:
    """NearSwap: w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1) per entry, θ = w θ_1 + (1 − w) θ_0 — entries
    where the two models nearly agree take the other model's value."""
    weight = (t / (base - tensors[0]).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * tensors[0] + (1 - weight) * base
