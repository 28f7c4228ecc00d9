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

    def as_dict(self, n: int = 10) -> dict[str, Any]:
        return {"model": self.model, "unit": self.unit, "total": self.total, "forgetting": self.forgetting,
                "normalised": self.normalised, "kinds": dict(self.kinds), "uncovered": self.uncovered,
                "worst_layers": self.worst(n), "worst_tensors": self.worst(n, layers=False)}


class DamageMeter:
    """Accumulates every model's predicted damage as the merge's outputs arrive (``add``)."""

    def __init__(self, models: Sequence[str], with_base: bool):
        self.models = {m: ModelDamage(m, forgetting=0.0 if with_base else None) for m in models}
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}  # (model, module) -> half a K-FAC block

    def add(self, name: str, merged: Tensor, base: Tensor | None, inputs: Sequence[Tensor], plan: DamagePlan,
            loaded: Sequence[list[Tensor] | None]) -> None:
        """One output tensor ``merged`` against each model's ``inputs`` (and the ``base``, for forgetting)."""
        theta = merged.float()
        for model, index, curvature, stats in zip(plan.models, plan.inputs, plan.curvatures, loaded):
            own = inputs[index]
            record = self.models[model]
            if curvature is None or stats is None:
                record.uncovered += 1
                continue
            if record.kinds and (curvature.unit != record.unit):
                continue  # a Gram-only model never gets a loss term, nor the other way round
            record.unit = curvature.unit
            own = own.float().to(theta.device)
            damage = self._quadratic(model, name, curvature, stats, theta - own, "merge")
            lost = self._quadratic(model, name, curvature, stats, base.float() - own, "base") \
                if base is not None and record.forgetting is not None else None
            record.kinds[curvature.kind] = record.kinds.get(curvature.kind, 0) + 1
            record.tensors[name] = record.tensors.get(name, 0.0) + damage
            record.total += damage
            if lost is not None:
                record.forgetting += lost

    def _quadratic(self, model: str, name: str, curvature: CurvatureRef, stats: list[Tensor], delta: Tensor,
                   side: str) -> float:
        if curvature.kind == "fisher":
            return 0.5 * float((stats[0].to(delta) * delta.square()).sum(dtype=torch.float64))
        if curvature.kind == "gram":
            d = delta.T if curvature.transposed else delta
            return 0.5 * float(((d @ stats[0].to(d)) * d).sum(dtype=torch.float64))
        a, g = (s.to(delta) for s in stats)
        s = curvature.scale
        if curvature.role == "weight":
            d = delta.T if curvature.transposed else delta
            inner = d.shape[1]
            gd = g @ d
            value = 0.5 * s * float(((gd @ a[:inner, :inner]) * d).sum(dtype=torch.float64))
            half = {"u": gd @ a[:inner, inner]} if a.shape[0] == inner + 1 else None
        else:  # the bias column of an augmented block
            value = 0.5 * s * float(a[-1, -1]) * float(delta @ (g @ delta))
            half = {"d": delta}
        if half is not None:
            value += self._cross(model, curvature.module, side, half, s)
        return value

    def _cross(self, model: str, module: str, side: str, half: dict[str, Tensor], scale: float) -> float:
        """The weight–bias cross term s·dᵀ G D a of a K-FAC block, once both of its halves have arrived."""
        key = (model, f"{module}/{side}")
        other = self._pending.pop(key, None)
        if other is None:
            self._pending[key] = half
            return 0.0
        both = {**other, **half}
        return scale * float((both["d"].double() * both["u"].double()).sum())

    def report(self) -> list[ModelDamage]:
        return list(self.models.values())
