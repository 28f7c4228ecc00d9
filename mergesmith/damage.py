"""Predicted damage: how much each task's loss rises when its fine-tune θ_i is replaced by the merge θ.

Under the Laplace view each fine-tune sits at a minimum of its task's loss with curvature F_i (the Fisher its
sidecar holds), so the loss rises by about

    ΔL_i(θ) = ½ (θ − θ_i)ᵀ F_i (θ − θ_i)            (nats per example)

summed over tensors. Per tensor the curvature comes from the richest statistic model i's sidecar holds:

- ``kfac``: F_i ≈ s · A_i ⊗ G_i for a Linear weight, D = W − W_i (out, in): ½ s tr(G_i D A_i Dᵀ). The
  factors are means over rows (tokens) and a per-example Fisher sums its rows, so s = rows / examples
  (K-FAC's "expand" reading). With a bias, A_i has one more row and column (the input 1) and [D | d] is one
  block: the weight's and the bias's terms are accumulated apart, and their cross term s·dᵀ G_i D a when
  both are in (each side keeps one vector of size out until the other arrives).
- ``fisher``: ½ Σ F_i ⊙ (θ − θ_i)², elementwise.
- ``gram`` (a sidecar with nothing else): ½ tr(D G_i Dᵀ), the mean squared change of the layer's outputs,
  which is no loss: it is reported in its own unit and never added to a loss.

``forgetting`` is the same quadratic at the base, ½ τ_iᵀ F_i τ_i: what the task loses when the merge keeps
nothing of its fine-tune. The ratio damage / forgetting is the *normalised* damage (0: the fine-tune kept,
1: as bad as the base, in the quadratic's own terms); it needs a base model.

Computed while the merge streams, from the tensors it has read anyway plus each model's statistics: no
second pass over the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mergesmith.architecture import split_layer_name
from mergesmith.io.sidecar import recorded_examples
from mergesmith.statistics import Sidecar, StatRef

LOSS = "nats/example"
PER_ROW = "nats/row"  # K-FAC of a sidecar that does not record how many examples its rows came from
GRAM_UNIT = "output MSE"  # a Gram-only sidecar measures a layer's output change, not a loss


@dataclass(frozen=True)
class CurvatureRef:
    """Model i's curvature for one tensor: which statistic, where it is, and how to read it."""

    kind: str  # "kfac", "fisher" or "gram"
    refs: tuple[StatRef, ...]  # kfac: (A, G); fisher, gram: (F,) or (G,)
    role: str = "tensor"  # kfac: "weight", or "bias" of a module whose A carries the input 1
    module: str = ""
    scale: float = 1.0  # s = rows per example for K-FAC
    transposed: bool = False  # the weight is stored (in, out)
    unit: str = LOSS


@dataclass
class DamagePlan:
    """What predicting one output tensor's damage reads: per merged model its curvature (None: its sidecar has
    none for this tensor) and, for ``forgetting``, the base's tensor when the job itself does not read it."""

    models: list[str]
    inputs: list[int]  # each model's index among the job's merged inputs
    curvatures: list[CurvatureRef | None]
    reference: Any = None  # a TensorInput of the base, or None: the job's own base (or no base at all)

    def load(self) -> list[list[Tensor] | None]:
        return [None if c is None else [ref.sidecar.value(ref.kind, ref.key) for ref in c.refs]
                for c in self.curvatures]


def curvature_ref(tensor: str, shape: tuple[int, ...], sidecar: Sidecar,
                  weight_shape: tuple[int, ...] | None = None) -> CurvatureRef | None:
    """The curvature ``sidecar`` holds for ``tensor`` (its key in that model; a bias's module weight has
    ``weight_shape``), preferring K-FAC's, then the Fisher's, then a Gram matrix (only when the sidecar holds no
    loss curvature at all)."""
    module, _, leaf = tensor.rpartition(".")
    a_key, g_key = f"kfac_a/{module}", f"kfac_g/{module}"
    if a_key in sidecar.keys and g_key in sidecar.keys:
        examples = _examples(sidecar)
        # a sidecar that does not record its examples (older ones, without a Fisher) leaves K-FAC per row
        scale, unit = (sidecar.source.counts.get(a_key, 0) / examples, LOSS) if examples else (1.0, PER_ROW)
        transposed = module in sidecar.transposed
        refs = (StatRef(sidecar, "kfac_a", a_key), StatRef(sidecar, "kfac_g", g_key))
        if leaf == "weight" and len(shape) == 2:
            return CurvatureRef("kfac", refs, "weight", module, scale, transposed, unit)
        in_features = None if weight_shape is None else weight_shape[0 if transposed else 1]
        augmented = in_features is not None and sidecar.shape(a_key)[0] == in_features + 1
        if leaf == "bias" and augmented and shape == (sidecar.shape(g_key)[0],):
            return CurvatureRef("kfac", refs, "bias", module, scale, transposed, unit)
    if f"fisher/{tensor}" in sidecar.keys and sidecar.shape(f"fisher/{tensor}") == tuple(shape):
        return CurvatureRef("fisher", (StatRef(sidecar, "fisher", f"fisher/{tensor}"),))
    gram_key = f"gram/{module}"
    loss_kinds = {"fisher", "kfac_a"} & sidecar.kinds
    if not loss_kinds and leaf == "weight" and gram_key in sidecar.keys and len(shape) == 2:
        return CurvatureRef("gram", (StatRef(sidecar, "gram", gram_key),), module=module,
                            transposed=module in sidecar.transposed, unit=GRAM_UNIT)
    return None


def _examples(sidecar: Sidecar) -> int:
    """Examples behind the statistics: the metadata's record, else (older sidecars) a Fisher's count."""
    recorded = recorded_examples(sidecar.source.metadata)
    if recorded:
        return recorded
    return max((n for k, n in sidecar.source.counts.items() if k.startswith("fisher/")), default=0)


@dataclass
class ModelDamage:
    """One model's predicted damage, total and per tensor, with its forgetting when a base is known."""

    model: str
    unit: str = LOSS
    total: float = 0.0
    forgetting: float | None = 0.0
    tensors: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)  # tensors predicted from each statistic
    uncovered: int = 0  # floating tensors its sidecar has no curvature for

    @property
    def normalised(self) -> float | None:
        return self.total / self.forgetting if self.forgetting else None

    def by_layer(self) -> dict[str, float]:
        """Damage per layer (``model.layers.7``), tensors outside the stacks under their own names."""
        layers: dict[str, float] = {}
        for name, value in self.tensors.items():
            parts = split_layer_name(name)
            key = f"{parts[0]}.{parts[1]}" if parts else name
            layers[key] = layers.get(key, 0.0) + value
        return layers

    def worst(self, n: int = 10, *, layers: bool = True) -> list[tuple[str, float]]:
        values = self.by_layer() if layers else self.tensors
        return sorted(values.items(), key=lambda kv: -kv[1])[:n]



class DamageMeter:
    """Accumulates every model's predicted damage as the merge's outputs arrive (``add``)."""

    def __init__(self, models: Sequence[str], with_base: bool):
        self.models = {m: ModelDamage(m, forgetting=0.0 if with_base else None) for m in models}
        self._halves = _CrossTerms()

    def add(self, name: str, merged: Tensor, base: Tensor | None, inputs: Sequence[Tensor], plan: DamagePlan,
            loaded: Sequence[list[Tensor] | None]) -> None:
        """One output tensor ``merged`` against each model's ``inputs`` (and the ``base``, for forgetting)."""
        theta = merged.float()
        for model, index, curvature, stats in zip(plan.models, plan.inputs, plan.curvatures, loaded):
            record = self.models[model]
            if curvature is None or stats is None:
                record.uncovered += 1
                continue
            if record.kinds and (curvature.unit != record.unit):
                continue  # a Gram-only model never gets a loss term, nor the other way round
            record.unit = curvature.unit
            own = inputs[index].float().to(theta.device)
            forgetting = base is not None and record.forgetting is not None
            vectors = [theta - own] + ([base.float().to(theta.device) - own] if forgetting else [])
            forms = self._halves.forms((model, curvature.module), curvature, stats, vectors)
            damage = float(forms[0, 0])
            record.kinds[curvature.kind] = record.kinds.get(curvature.kind, 0) + 1
            record.tensors[name] = record.tensors.get(name, 0.0) + damage
            record.total += damage
            if forgetting:
                record.forgetting += float(forms[1, 1])

    def report(self) -> list[ModelDamage]:
        return list(self.models.values())


@dataclass
class Moments:
    """Model i's damage as a quadratic in the coefficients of a task-vector merge: for θ = θ_0 + Σ_j c_j τ_j
    (τ_j = θ_j − θ_0, θ_0 the base), ΔL_i(c) = (c − e_i)ᵀ M_i (c − e_i) with M_i[j, k] = ½ τ_jᵀ F_i τ_k summed
    over the tensors model i has curvature for (``tune.surrogate`` evaluates it)."""

    model: str
    index: int  # model i's position among the merged models (its e_i)
    unit: str = LOSS
    total: Tensor | None = None

    @property
    def forgetting(self) -> float:
        return float(self.total[self.index, self.index])


class MomentMeter:
    """Accumulates ``Moments`` for every model with a sidecar in one pass over a merge's inputs (the merged
    tensors themselves are not needed): what tuning a linear merge's coefficients exactly needs."""

    def __init__(self, models: Sequence[str]):
        self.models = {m: Moments(m, i) for i, m in enumerate(models)}
        self._halves = _CrossTerms()

    def add(self, name: str, merged: Tensor, base: Tensor | None, inputs: Sequence[Tensor], plan: DamagePlan,
            loaded: Sequence[list[Tensor] | None]) -> None:
        reference = (base if base is not None else inputs[0]).float()
        vectors = [x.float().to(reference.device) - reference for x in inputs]
        for model, curvature, stats in zip(plan.models, plan.curvatures, loaded):
            if curvature is None or stats is None or curvature.unit == GRAM_UNIT:
                continue
            record = self.models[model]
            record.unit = curvature.unit
            forms = self._halves.forms((model, curvature.module), curvature, stats, vectors)
            record.total = forms if record.total is None else record.total + forms

    def report(self) -> list[Moments]:
        return list(self.models.values())


def _pairs(lefts: Sequence[Tensor], rights: Sequence[Tensor]) -> Tensor:
    """Σ lefts[j] ⊙ rights[k] for every pair, summed in float64."""
    return torch.tensor([[float((left * right).sum(dtype=torch.float64)) for right in rights] for left in lefts],
                        dtype=torch.float64)


def bilinear_forms(curvature: CurvatureRef, stats: list[Tensor], vectors: Sequence[Tensor]
                   ) -> tuple[Tensor, dict[str, list[Tensor]] | None]:
    """B[j, k] = ½ x_jᵀ F x_k for every pair of ``vectors`` (changes of one tensor), from this tensor's part of
    the curvature, and for one side of a K-FAC block with a bias what its weight–bias cross term needs."""
    if curvature.kind == "fisher":
        fisher = stats[0].to(vectors[0])
        return 0.5 * _pairs(vectors, [fisher * x for x in vectors]), None
    if curvature.role == "bias":  # the bias column of an augmented K-FAC block
        a, g = (s.to(vectors[0]) for s in stats)
        forms = 0.5 * curvature.scale * float(a[-1, -1]) * _pairs(vectors, [g @ d for d in vectors])
        return forms, {"d": list(vectors)}
    matrices = [x.T if curvature.transposed else x for x in vectors]
    if curvature.kind == "gram":
        gram = stats[0].to(vectors[0])
        return 0.5 * _pairs(matrices, [d @ gram for d in matrices]), None
    a, g = (s.to(vectors[0]) for s in stats)
    s = curvature.scale
    inner = matrices[0].shape[1]
    gd = [g @ d for d in matrices]
    forms = 0.5 * s * _pairs(matrices, [m @ a[:inner, :inner] for m in gd])
    return forms, ({"u": [m @ a[:inner, inner] for m in gd]} if a.shape[0] == inner + 1 else None)


class _CrossTerms:
    """The forms of K-FAC blocks whose weight and bias arrive apart: each side keeps its vectors of the layer's
    output size until the other arrives, then adds the cross term ½ s (d_jᵀ G D_k a + d_kᵀ G D_j a)."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], dict[str, list[Tensor]]] = {}

    def forms(self, key: tuple[str, str], curvature: CurvatureRef, stats: list[Tensor], vectors: Sequence[Tensor]
              ) -> Tensor:
        forms, half = bilinear_forms(curvature, stats, vectors)
        if half is None:
            return forms
        other = self._pending.pop(key, None)
        if other is None:
            self._pending[key] = half
            return forms
        both = {**other, **half}
        cross = _pairs(both["d"], both["u"])
        return forms + 0.5 * curvature.scale * (cross + cross.T)
