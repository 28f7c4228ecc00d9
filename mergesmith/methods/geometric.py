"""Geometric combines: SLERP, NuSLERP, Multi-SLERP, the Karcher mean, Model Stock, and passthrough (layer
stacking)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mergesmith.errors import RecipeError
from mergesmith.lazy import lazy_import
from mergesmith.methods.registry import Param, fixed, points, register
from mergesmith.methods.task_arithmetic import WEIGHT

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")


def _unit(x: Tensor, eps: float) -> Tensor:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norm > eps, norm, 1.0)


def slerp_vectors(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of the flattened tensors v0 → v1 at ``t``:
    θ = arccos(v̂0·v̂1), result = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1 (on the unnormalised tensors),
    falling back to (1−t)·v0 + t·v1 when |v̂0·v̂1| > ``dot_threshold`` (nearly colinear or antipodal).
    Norms at or below ``eps`` are treated as 1, as in mergekit."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    dot = float((_unit(a, eps) * _unit(b, eps)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * v0 + (math.sin(t * theta) / sin_theta) * v1


@register("slerp", params=[Param("t", float, interval=(0.0, 1.0),
                                 help="interpolation position: 0 gives the base, 1 the other model")],
          min_models=1, max_models=1, reference="Shoemake 1985; mergekit")
def slerp(base: Tensor, tensors: Sequence[Tensor], *, t: float) -> Tensor:
    """SLERP from the base (t = 0) to the single other model (t = 1), whole tensor at once (slerp_vectors)."""
    return slerp_vectors(t, base, tensors[0])


def nuslerp_rows(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    """NuSLERP: spherical interpolation along the last axis (``row_wise``: along the first; ``flatten``:
    over the whole tensor), each vector independently; (nearly) colinear vectors, 1 − cos² ≤ eps², are
    interpolated linearly. Norms are clamped below at 1e-7 when normalising."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@register("nuslerp", base="optional", min_models=2, max_models=2,
          params=[WEIGHT, Param("nuslerp_row_wise", bool, False, help="interpolate each column, not each row"),
                  Param("nuslerp_flatten", bool, True, help="interpolate the whole tensor as one vector")],
          reference="mergekit")
def nuslerp(base: Tensor | None, tensors: Sequence[Tensor], *, weight: Sequence[float], nuslerp_row_wise: bool,
            nuslerp_flatten: bool) -> Tensor:
    """NuSLERP of two models at t = w_2/(w_1 + w_2) (0.5 when the weights sum to ~0); with a base, it
    interpolates the task vectors and adds the base back."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    v0, v1 = tensors
    if base is None:
        return nuslerp_rows(t, v0, v1, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    return base + nuslerp_rows(t, v0 - base, v1 - base, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)


@register("multislerp", base="optional", reference="mergekit (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
          tuning=fixed({"multislerp": [{}]}),  # equal weights: nothing else to set
          params=[WEIGHT, Param("normalize_weights", bool, True, help="divide the weights by their sum"),
                  Param("eps", float, 1e-8, interval=(0.0, float("inf")), open_low=True,
                        help="added to norms before dividing by them")])
def multislerp(base: Tensor | None, tensors: Sequence[Tensor], *, weight: Sequence[float], normalize_weights: bool,
               eps: float) -> Tensor:
    """Multi-SLERP: barycentric interpolation on the sphere of the flattened inputs (their task vectors, with
    a base): unit vectors ûᵢ = vᵢ/(‖vᵢ‖ + eps), mean direction m = Σ wᵢûᵢ/‖Σ wᵢûᵢ‖, tangent t = Σ wᵢ(ûᵢ −
    (ûᵢ·m)m), result (cos‖t‖ m + sin‖t‖ t/‖t‖)·Σ wᵢ‖vᵢ‖ (‖t‖ + eps in both places). One input is returned as is;
    two that cancel (Σ wᵢûᵢ = 0) are averaged linearly, more are an error — unless every vᵢ is zero (a tensor
    no fine-tune changed), which merges to itself where mergekit raises the same error."""
    if len(tensors) == 1:
        return tensors[0]
    vectors = torch.stack([t if base is None else t - base for t in tensors]).reshape(len(tensors), -1)
    if not bool(vectors.any()):  # identical inputs (a tensor no fine-tune changed): nothing to interpolate
        return tensors[0].clone()
    w = torch.tensor(list(weight), dtype=vectors.dtype, device=vectors.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    units = vectors / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise RecipeError("multislerp: the weighted sum of the unit inputs is zero (inputs that cancel, such "
                              "as a and −a with equal weights); change the weights")
        result = w[0] * vectors[0] + w[1] * vectors[1]
    else:
        mean = mean / mean_norm
        tangent = (w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
        tangent_norm = torch.linalg.vector_norm(tangent) + eps
        result = (mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)) * (
            norms.squeeze(1) * w).sum()
    result = result.reshape(tensors[0].shape)
    return result if base is None else result + base


def karcher_mean(tensors: Sequence[Tensor], weights: Sequence[float], *, max_iter: int, tol: float) -> Tensor:
    """The weighted Karcher (Fréchet) mean of the inputs' directions on the unit sphere, by Riemannian gradient
    steps from the normalised weighted mean of the unit vectors (up to ``max_iter``, stopping when the
    tangent step is below ``tol``), times the weighted mean norm. Inputs with norm ≤ tol take no part in the
    direction; if none is left the result is zero. mergekit's definition, in one float dtype throughout."""
    if len(tensors) == 1:
        return tensors[0]
    flat = torch.stack([t.reshape(-1) for t in tensors])
    norms = torch.linalg.vector_norm(flat, dim=1)
    live = [i for i in range(len(tensors)) if float(norms[i]) > tol]
    if not live:
        return torch.zeros_like(tensors[0])
    total = sum(weights[i] for i in live)
    alphas = [weights[i] / total for i in live]
    units = flat[live] / norms[live, None]
    mean = sum(a * u for a, u in zip(alphas, units))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            dot = torch.clamp(mean @ unit, -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) >= tol:
                tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = torch.linalg.vector_norm(mean)
        if float(length) > tol:
            mean = mean / length
    scale = sum(w * n for w, n in zip(weights, norms))
    return (scale * mean).reshape(tensors[0].shape)


@register("karcher", base="optional", reference="arXiv:2603.04972",
          tuning=fixed({"karcher": [{}]}),  # max_iter and tol only decide how exactly the mean is found
          params=[Param("max_iter", int, 10, interval=(0, float("inf")), help="Riemannian gradient steps at most"),
                  Param("tol", float, 1e-5, interval=(0.0, 1.0), open_low=True, open_high=True,
                        help="stop when the tangent step is below this")])
def karcher(base: Tensor | None, tensors: Sequence[Tensor], *, max_iter: int, tol: float) -> Tensor:
    """Karcher mean: the equal-weight Riemannian mean on the sphere of every input (the base counts as one
    input, as in mergekit), scaled by the inputs' mean norm (``karcher_mean``)."""
    inputs = [*([base] if base is not None else []), *tensors]
    return karcher_mean(inputs, [1 / len(inputs)] * len(inputs), max_iter=max_iter, tol=tol)


@register("model_stock", min_models=2, reference="arXiv:2403.19522",
          tuning=fixed({"model_stock": points(filter_wise=[False, True])}),
          params=[Param("filter_wise", bool, False, help="one interpolation ratio per row, not per tensor")])
def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool) -> Tensor:
    """Model Stock: with N fine-tunes, cos θ = mean pairwise cosine of their task vectors (per row when
    ``filter_wise``), t = N cos θ / (1 + (N−1) cos θ), θ = t·mean(θ_i) + (1−t)·θ_0. Where the denominator
    vanishes (|·| < 1e-6) the base is kept. Cosines use norms clamped below at 1e-6."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if base.dim() == 1 else w for w in tensors]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = [((offsets[i] * offsets[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    average = torch.stack(ws).mean(dim=0)
    return (t * average + (1 - t) * w0).reshape(shape)


@register("passthrough", base="ignored", max_models=1,
          params=[Param("scale", float, 1.0, per_model=True, interval=(-float("inf"), float("inf")),
                        help="factor the copied tensor is multiplied by")])
def passthrough(base: Tensor | None, tensors: Sequence[Tensor], *, scale: Sequence[float]) -> Tensor:
    """Copy the single input tensor, times ``scale``; with ``slices`` it stacks layers from several models."""
    return tensors[0] * scale[0] if scale[0] != 1 else tensors[0]


__all__ = ["slerp_vectors", "nuslerp_rows"]
