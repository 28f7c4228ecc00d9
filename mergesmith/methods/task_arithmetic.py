"""Weighted averages and the task-vector family: task arithmetic, TIES, DARE, DELLA and Model Breadcrumbs.

Notation: base θ_0, inputs θ_i, task vectors τ_i = θ_i − θ_0, per-model weights w_i, global scale λ.
Every task-vector method returns θ_0 + λ·combine(w_i · sparsify(τ_i)); the TIES-style methods combine
with ``consensus_combine``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mergesmith.errors import RecipeError
from mergesmith.lazy import lazy_import
from mergesmith.methods.registry import Param, fixed, nonzero_weight_sum, points, register, weights_sum_to_zero
from mergesmith.methods.sparsify import (
    BLOCK,
    bernoulli_mask,
    blocks,
    breadcrumbs_mask,
    consensus_combine,
    della_keep_probabilities,
    drop_and_rescale_,
    keep_top_magnitude_,
    outside,
    top_magnitude_floor_,
)

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

# drops entries of τ_i in place (returns None), or returns a magnitude floor to apply later
Sparsifier = Callable[["Tensor", int], "Tensor | None"]

# float32 temporaries of TIES and breadcrumbs-TIES for plan.py's memory bound, (per input model, fixed): 4 inputs
# + 2·4 + 2 = 14 output-sized copies for three models and a base, above the 13.4 measured at worst
TRIM_WORK_COPIES = (2, 2)
WEIGHT = Param("weight", float, 1.0, per_model=True, interval=(-float("inf"), float("inf")),
               help="model weight w_i (negative subtracts the model's task vector)")
DENSITY = Param("density", float, 1.0, per_model=True, interval=(0.0, 1.0),
                help="fraction of τ_i kept (0 keeps none: the base; 1 keeps all)")
LAMBDA = Param("lambda", float, 1.0, arg="scale", interval=(-float("inf"), float("inf")),
               help="scale λ of the combined task vector")
INT8_MASK = Param("int8_mask", bool, False, help="accepted for mergekit recipes; masks are boolean here")
RESCALE_CHOICES = ("inverse_density", "l1", "none")


def _rescale_param(default: str) -> Param:
    return Param("rescale", str, default, choices=(True, False, *RESCALE_CHOICES),
                 help="rescale after the drop: inverse_density (DARE paper), l1 (mergekit), none")


def _rescale_mode(rescale: bool | str, default_when_true: str) -> str:
    # mergekit spells the switch as a boolean: `true` means its L1-norm rescale for magnitude trims, and
    # for DARE we keep the paper's 1/density (see docs/methods.md).
    if rescale is True:
        return default_when_true
    if rescale is False:
        return "none"
    return rescale


@register("linear", base="ignored", params=[WEIGHT, Param("normalize", bool, True, help="divide by Σ w_i")],
          upcast_inputs=False,
          validate=nonzero_weight_sum,
          reference="arXiv:2203.05482", tuning=fixed({"linear": [{}]}))  # the plain average has nothing to tune
def linear(base: Tensor | None, tensors: Sequence[Tensor], *, weight: Sequence[float], normalize: bool) -> Tensor:
    """Weighted average: Σ_i w_i θ_i / Σ_i w_i (without ``normalize``: Σ_i w_i θ_i). The base is not used."""
    divisor = 1.0
    if normalize:
        divisor = sum(weight)
        if weights_sum_to_zero(weight):
            raise RecipeError("linear: the model weights sum to zero; set normalize: false or change the weights")
    coefficients = [w / divisor for w in weight]
    merged = torch.empty_like(tensors[0])
    out, inputs = merged.view(-1), [t.reshape(-1) for t in tensors]
    scratch = torch.empty(min(out.numel(), BLOCK), dtype=merged.dtype, device=merged.device)
    for block in blocks(out.numel()):
        # inputs may be stored in bfloat16: widen each block explicitly (a scalar product would stay in
        # bfloat16, and mixed-dtype kernels are several times slower than a copy plus a float32 op)
        out[block].copy_(inputs[0][block]).mul_(coefficients[0])
        for tensor, c in zip(inputs[1:], coefficients[1:]):
            widened = scratch[:out[block].numel()].copy_(tensor[block])
            out[block].add_(widened, alpha=c)
    return merged


def task_vectors(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """τ stacked: (T, *shape), τ_i = θ_i − θ_0, in the base's dtype (each input widened before subtracting:
    mixed-dtype subtraction is much slower)."""
    deltas = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for i, tensor in enumerate(tensors):
        deltas[i].copy_(tensor).sub_(base)
    return deltas


def task_vector_merge(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *, scale: float,
                      normalize: bool, elect_sign: bool,
                      sparsify: Sparsifier | None = None) -> Tensor:
    """θ_0 + λ · combine(w_i · sparsify(τ_i)); ``sparsify(τ_i, i)`` drops entries of τ_i in place, or
    returns a magnitude floor below which entries count as dropped (see ``top_magnitude_floor_``).

    Without sign election the combine is linear, so it runs as θ_0 + Σ_i (λ w_i / D) sparsify(τ_i) with
    D = Σ_i w_i under ``normalize`` (else 1): one model at a time, or in cache-sized blocks when nothing
    is sparsified.
    """
    if not tensors:
        return base.clone()
    if elect_sign:
        deltas = task_vectors(base, tensors)
        floors = []
        for i in range(len(tensors)):
            floor = sparsify(deltas[i], i) if sparsify is not None else None
            floors.append(0.0 if floor is None else float(floor))
        w = torch.tensor(list(weights), dtype=base.dtype, device=base.device)
        floor_column = torch.tensor(floors, dtype=base.dtype, device=base.device).reshape(-1, 1)
        combined = consensus_combine(deltas, w, normalize=normalize, floors=floor_column if any(floors) else None)
        if scale != 1:
            combined.mul_(scale)
        return combined.add_(base)
    if normalize and weights_sum_to_zero(weights):
        raise RecipeError("the model weights sum to zero and normalize: true divides by their sum; change the "
                          "weights or set normalize: false")
    divisor = sum(weights) if normalize else 1.0
    coefficients = [scale * w / divisor for w in weights]
    if sparsify is not None:
        merged = base.clone()
        for i, tensor in enumerate(tensors):
            delta = tensor.to(base.dtype, copy=True).sub_(base)
            floor = sparsify(delta, i)
            if floor is not None:
                delta.masked_fill_(delta.abs() < floor, 0)
            merged.add_(delta, alpha=coefficients[i])
        return merged
    merged = torch.empty_like(base)
    out, flat_base, inputs = merged.view(-1), base.reshape(-1), [t.reshape(-1) for t in tensors]
    scratch = torch.empty(min(out.numel(), BLOCK), dtype=base.dtype, device=base.device)
    for block in blocks(out.numel()):
        out[block].copy_(flat_base[block])
        for tensor, c in zip(inputs, coefficients):
            delta = scratch[:out[block].numel()].copy_(tensor[block]).sub_(flat_base[block])
            out[block].add_(delta, alpha=c)
    return merged


@register("task_arithmetic", params=[WEIGHT, LAMBDA, Param("normalize", bool, False, help="divide by Σ w_i"),
                                     INT8_MASK],
          upcast_inputs=False, validate=nonzero_weight_sum, reference="arXiv:2212.04089",
          tuning=fixed({"task_arithmetic": points(**{"lambda": [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]})}))
def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float], scale: float,
                    normalize: bool, int8_mask: bool) -> Tensor:
    """Task arithmetic: θ_0 + λ Σ_i w_i τ_i (divided by Σ_i w_i when ``normalize``)."""
    return task_vector_merge(base, tensors, weight, scale=scale, normalize=normalize, elect_sign=False)


def _magnitude_trim(density: Sequence[float], rescale: str) -> Sparsifier:
    def trim(delta: Tensor, i: int) -> Tensor | None:
        if density[i] >= 1:
            return None
        if rescale == "none":
            return top_magnitude_floor_(delta, density[i])
        drop_and_rescale_(delta, lambda d: keep_top_magnitude_(d, density[i]), density[i], rescale)
        return None
    return trim


@register("ties", params=[WEIGHT, DENSITY, LAMBDA,
                          Param("normalize", bool, True, help="divide by the agreeing models' Σ w_i"),
                          _rescale_param("none"),
                          INT8_MASK], upcast_inputs=False, reference="arXiv:2306.01708",
          # measured on a 32000×1024 tensor of 3 models: 10.4 float32 copies beyond the inputs (12.6 when every task
          # vector is zero, as for a tensor no adapter touches): the magnitude trim's sort and masks
          work_copies=TRIM_WORK_COPIES,
          # the disjoint mean (normalize) has one task vector's scale, so λ is searched from 1 down (the paper: k =
          # 20 % and λ from validation; interfering tasks are best served by less than one task vector)
          tuning=fixed({"ties": points(density=[0.2, 0.5], **{"lambda": [0.3, 0.6, 1.0]})}))
def ties(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float], density: Sequence[float],
         scale: float, normalize: bool, rescale: bool | str, int8_mask: bool) -> Tensor:
    """TIES: trim τ_i to its top ⌊density·n⌋ magnitudes (at least one), elect per entry the sign of
    Σ_i w_i τ̂_i (ties go to +), sum the w_i τ̂_i that agree with it and divide by the summed w_i of the
    agreeing models; θ = θ_0 + λ·that. This is mergekit's definition ("sum" consensus, weighted
    denominator); with ``normalize: false`` the agreeing sum is not divided.
    """
    trim = _magnitude_trim(density, _rescale_mode(rescale, "l1"))
    return task_vector_merge(base, tensors, weight, scale=scale, normalize=normalize, elect_sign=True,
                             sparsify=trim)


def _dare_drop(density: Sequence[float], rescale: str, generator: torch.Generator) -> Sparsifier:
    def drop(delta: Tensor, i: int) -> None:
        if density[i] < 1:
            drop_and_rescale_(delta, outside(bernoulli_mask(delta, density[i], generator)), density[i], rescale)
    return drop


DARE_PARAMS = [WEIGHT, DENSITY, LAMBDA, Param("normalize", bool, False, help="divide by Σ w_i (agreeing ones: ties)"),
               _rescale_param("inverse_density"),
               INT8_MASK]


@register("dare_linear", params=DARE_PARAMS, random=True, upcast_inputs=False, validate=nonzero_weight_sum,
          reference="arXiv:2311.03099",
          tuning=fixed({"dare_linear": points(density=[0.3, 0.6], **{"lambda": [0.1, 0.2, 0.4]})}))
def dare_linear(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float], density: Sequence[float],
                scale: float, normalize: bool, rescale: bool | str, int8_mask: bool,
                generator: torch.Generator) -> Tensor:
    """DARE: keep each entry of τ_i with probability p = density, divide survivors by p (the paper's
    1/(1−drop) rescale; ``rescale: l1`` gives mergekit's L1-norm match), then task arithmetic."""
    drop = _dare_drop(density, _rescale_mode(rescale, "inverse_density"), generator)
    return task_vector_merge(base, tensors, weight, scale=scale, normalize=normalize, elect_sign=False,
                             sparsify=drop)


@register("dare_ties", params=DARE_PARAMS, random=True, upcast_inputs=False, reference="arXiv:2311.03099",
          tuning=fixed({"dare_ties": points(density=[0.3, 0.6], normalize=[True], **{"lambda": [0.3, 0.6, 1.0]})}))
def dare_ties(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float], density: Sequence[float],
              scale: float, normalize: bool, rescale: bool | str, int8_mask: bool,
              generator: torch.Generator) -> Tensor:
    """DARE drop-and-rescale of each τ_i, then TIES sign election and disjoint sum (as ``ties``)."""
    drop = _dare_drop(density, _rescale_mode(rescale, "inverse_density"), generator)
    return task_vector_merge(base, tensors, weight, scale=scale, normalize=normalize, elect_sign=True,
                             sparsify=drop)


EPSILON = Param("epsilon", float, 0.15, per_model=True, interval=(0.0, 1.0),
                help="spread of DELLA's keep probabilities: density ± epsilon from smallest to largest |τ_i|")
DELLA_PARAMS = [WEIGHT, DENSITY, EPSILON, LAMBDA,
                Param("normalize", bool, True, help="divide by Σ w_i (agreeing ones: della)"),
                _rescale_param("inverse_density"), INT8_MASK]


def _validate_della(kwargs: dict, has_base: bool, n_models: int) -> str | None:
    for i, (density, epsilon) in enumerate(zip(kwargs["density"], kwargs["epsilon"])):
        if 0 < density < 1 and not (density - epsilon >= 0 and density + epsilon <= 1):
            return (f"model {i}: density ± epsilon ({density:g} ± {epsilon:g}) must lie in [0, 1], for they are "
                    f"keep probabilities; lower epsilon or move density")
    return None


def _della_drop(density: Sequence[float], epsilon: Sequence[float], rescale: str,
                generator: torch.Generator) -> Sparsifier:
    def drop(delta: Tensor, i: int) -> None:
        if density[i] >= 1:
            return
        if density[i] <= 0:
            delta.zero_()
            return
        probabilities = della_keep_probabilities(delta, density[i], epsilon[i])
        # drawn on the CPU as DARE's mask is, so that epsilon = 0 draws DARE's very mask from the same seed
        draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32).to(delta.device)
        keep = draws < probabilities
        if rescale == "inverse_density":  # each survivor divided by its own keep probability (the paper)
            delta.div_(probabilities).masked_fill_(~keep, 0)
        else:
            drop_and_rescale_(delta, outside(keep), density[i], rescale)
    return drop


@register("della", params=DELLA_PARAMS, random=True, upcast_inputs=False, validate=_validate_della,
          reference="arXiv:2406.11617",
          tuning=fixed({"della": points(density=[0.3, 0.6], epsilon=[0.1], **{"lambda": [0.3, 0.6, 1.0]})}))
def della(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float], density: Sequence[float],
          epsilon: Sequence[float], scale: float, normalize: bool, rescale: bool | str, int8_mask: bool,
          generator: torch.Generator) -> Tensor:
    """DELLA: MAGPRUNE drops each entry of τ_i with a keep probability that grows with its magnitude rank in
    its row (density ± epsilon, ``della_keep_probabilities``), divides survivors by their probability,
    then TIES sign election and disjoint mean (as ``ties``); epsilon = 0 is DARE-TIES."""
    drop = _della_drop(density, epsilon, _rescale_mode(rescale, "inverse_density"), generator)
    return task_vector_merge(base, tensors, weight, scale=scale, normalize=normalize, elect_sign=True,
                             sparsify=drop)


@register("della_linear", params=[*DELLA_PARAMS[:4],
                                  Param("normalize", bool, False, help="divide by Σ w_i"),
                                  *DELLA_PARAMS[5:]],
          random=True, upcast_inputs=False, reference="arXiv:2406.11617",
          validate=lambda kwargs, has_base, n: _validate_della(kwargs, has_base, n) or nonzero_weight_sum(
              kwargs, has_base, n),
          tuning=fixed({"della_linear": points(density=[0.3, 0.6], epsilon=[0.1], **{"lambda": [0.1, 0.2, 0.4]})}))
def della_linear(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float], density: Sequence[float],
                 epsilon: Sequence[float], scale: float, normalize: bool, rescale: bool | str, int8_mask: bool,
                 generator: torch.Generator) -> Tensor:
    """DELLA's MAGPRUNE drop of each τ_i (as ``della``), then task arithmetic; epsilon = 0 is dare_linear."""
    drop = _della_drop(density, epsilon, _rescale_mode(rescale, "inverse_density"), generator)
    return task_vector_merge(base, tensors, weight, scale=scale, normalize=normalize, elect_sign=False,
                             sparsify=drop)


GAMMA = Param("gamma", float, 0.01, per_model=True, interval=(0.0, 1.0),
              help="fraction of τ_i's largest entries dropped as outliers")
BREADCRUMB_PARAMS = [WEIGHT, DENSITY, GAMMA, LAMBDA,
                     Param("normalize", bool, False, help="divide by Σ w_i (agreeing ones: ties)"),
                     _rescale_param("none"),
                     INT8_MASK]


def _crumbs(density: Sequence[float], gamma: Sequence[float], rescale: str) -> Sparsifier:
    def crumb(delta: Tensor, i: int) -> None:
        if density[i] < 1:
            drop_and_rescale_(delta, outside(breadcrumbs_mask(delta, density[i], gamma[i])), density[i], rescale)
    return crumb


@register("breadcrumbs", params=BREADCRUMB_PARAMS, upcast_inputs=False, validate=nonzero_weight_sum,
          reference="arXiv:2312.06795",
          tuning=fixed({"breadcrumbs": points(density=[0.5, 0.9], **{"lambda": [0.1, 0.2, 0.4]})}))
def breadcrumbs(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float], density: Sequence[float],
                gamma: Sequence[float], scale: float, normalize: bool, rescale: bool | str,
                int8_mask: bool) -> Tensor:
    """Model Breadcrumbs: drop the largest ⌊γn⌋ and the smallest entries of each τ_i so ⌊density·n⌋
    remain (``breadcrumbs_mask``), then task arithmetic."""
    crumb = _crumbs(density, gamma, _rescale_mode(rescale, "l1"))
    return task_vector_merge(base, tensors, weight, scale=scale, normalize=normalize, elect_sign=False,
                             sparsify=crumb)


@register("breadcrumbs_ties", params=BREADCRUMB_PARAMS, upcast_inputs=False, reference="arXiv:2312.06795",
          work_copies=TRIM_WORK_COPIES,  # measured as TIES's: 10.5 copies beyond the inputs, 13.4 at zero vectors
          tuning=fixed({"breadcrumbs_ties": points(density=[0.5, 0.9], normalize=[True],
                                                   **{"lambda": [0.3, 0.6, 1.0]})}))
def breadcrumbs_ties(base: Tensor, tensors: Sequence[Tensor], *, weight: Sequence[float],
                     density: Sequence[float], gamma: Sequence[float], scale: float, normalize: bool,
                     rescale: bool | str, int8_mask: bool) -> Tensor:
    """Model Breadcrumbs trim of each τ_i, then TIES sign election and disjoint sum (as ``ties``)."""
    crumb = _crumbs(density, gamma, _rescale_mode(rescale, "l1"))
    return task_vector_merge(base, tensors, weight, scale=scale, normalize=normalize, elect_sign=True,
                             sparsify=crumb)
