"""Which statistics a curvature merge reads for each tensor, checked against the checkpoints before any
tensor is merged.

A sidecar keys its statistics by parameter (``fisher/<param>``) or by Linear module (``gram/<module>``,
``kfac_a/<module>``, ``kfac_g/<module>``, where the weight is ``<module>.weight``). Methods always see a
weight as (out, in): a module stored the other way round (GPT-2's Conv1D, listed in the sidecar's
``transposed`` metadata) is transposed on the way in and back on the way out. With a bias, K-FAC's input
factor has one more row and column (the constant input 1), and the weight and bias are solved as one
block [W | b].
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mergesmith.checks import value_range
from mergesmith.errors import MergeError, StatisticsError
from mergesmith.methods.curvature import fisher_problem

MODULE_KINDS = ("gram", "kfac_a", "kfac_g")
# computed from the sidecar, not stored: kind -> the stored kind it is computed from
DERIVED = {"fisher_norm": "fisher", "fisher_count": "fisher", "gram_norm": "gram", "kfac_norm": "kfac_a"}


class StatsSource(Protocol):
    """A sidecar as the engine reads it (``mergesmith.io.sidecar.StatsReader`` or ``MemoryStats``)."""

    path: Any  # where the statistics come from, for messages
    counts: dict[str, int]
    model: str
    metadata: dict[str, Any]

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> torch.Tensor: ...


class MemoryStats:
    """Statistics held in memory, keyed like a sidecar (for ``merge_state_dicts``)."""

    def __init__(self, name: str, tensors: Mapping[str, torch.Tensor], counts: Mapping[str, int] | None = None):
        self.path = name
        self._tensors = dict(tensors)
        self.counts = dict(counts or {})
        self.model = ""
        self.metadata: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class Sidecar:
    """One model's statistics, with what the planner asks of them: kinds, shapes, norms, layouts."""

    def __init__(self, model: str, source: StatsSource):
        self.model, self.source = model, source
        self.keys = set(source.keys())
        self.kinds = {key.split("/", 1)[0] for key in self.keys}
        self.transposed = set(json.loads(source.metadata.get("transposed", "[]")))
        self.fingerprints: dict[str, str] = json.loads(source.metadata.get("fingerprints", "{}"))
        self.skipped = _read_skipped(source)
        self._norms: dict[str, float] = {}

    def skip_reason(self, kind: str, tensor: str) -> str | None:
        """Why measure left ``kind`` of ``tensor`` out on purpose (--exclude, the factor budget), from the
        sidecar's ``skipped`` metadata; None when it did not."""
        stored = DERIVED.get(kind, kind)
        module = tensor.rpartition(".")[0]  # a weight's or bias's module owns its Fisher and its factors
        entry = self.skipped.get(module)
        if entry is None or stored not in entry["kinds"]:
            return None
        return (f"its sidecar {self.source.path} records module '{module}' as skipped at measure time "
                f"({entry['reason']})")

    def where(self) -> str:
        return f"model '{self.model}' (statistics {self.source.path})"

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.source.shape(key))

    def norm(self, kind: str) -> float:
        """The L2 norm of every entry of a kind, over the whole model (read once, on first use)."""
        if kind not in self._norms:
            total = sum(float(self.source.get(k).double().square().sum()) for k in sorted(self.keys)
                        if k.startswith(f"{kind}/"))
            self._norms[kind] = total ** 0.5
        return self._norms[kind]

    def kronecker_norm(self) -> float:
        """The Frobenius norm of the whole model's K-FAC precision, block-diagonal in its layers:
        √(Σ_l ‖A_l ⊗ G_l‖²) = √(Σ_l ‖A_l‖² ‖G_l‖²) (read once, on first use)."""
        if "kfac" not in self._norms:
            total = 0.0
            for key in sorted(k for k in self.keys if k.startswith("kfac_a/")):
                other = "kfac_g/" + key.removeprefix("kfac_a/")
                if other in self.keys:
                    total += (float(self.source.get(key).double().square().sum())
                              * float(self.source.get(other).double().square().sum()))
            self._norms["kfac"] = total ** 0.5
        return self._norms["kfac"]

    def value(self, kind: str, key: str) -> Any:
        if kind in ("fisher_norm", "gram_norm"):
            return self.norm(DERIVED[kind])
        if kind == "kfac_norm":
            return self.kronecker_norm()
        if kind == "fisher_count":
            return self.source.counts.get(key)
        tensor = self.source.get(key)
        if kind == "fisher":
            problem = fisher_problem(tensor)
        else:
            problem = _covariance_problem(tensor) if kind in MODULE_KINDS else None
        if problem is not None:
            raise StatisticsError(f"{self.where()}: '{key}' {problem}; measure it again")
        return tensor


def _covariance_problem(matrix: torch.Tensor) -> str | None:
    """What is wrong with a Gram or K-FAC factor, if anything: NaN or infinite entries, nothing but zeros (no
    Linear layer's inputs, or output gradients, are all exactly zero: the measurement broke), or a negative
    diagonal entry (a covariance's diagonal is a mean of squares). One pass over the matrix, as the Fisher's
    check, and one over its diagonal."""
    if matrix.numel() == 0:
        return None
    low, high = value_range(matrix)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        return "has NaN or infinite entries"
    if bool(low == 0) and bool(high == 0):
        return "is all zeros, a sign of a broken measurement"
    if matrix.dim() == 2 and matrix.shape[0] == matrix.shape[1]:
        least = matrix.diagonal().min()
        if bool(least < 0):
            return (f"has a negative diagonal entry ({float(least):.3g}), but a covariance's diagonal is a mean of "
                    f"squares")
    return None


def _read_skipped(source: StatsSource) -> dict[str, dict[str, Any]]:
    """The ``skipped`` metadata, {module: {"kinds": [...], "reason": "..."}} (absent: nothing skipped)."""
    text = source.metadata.get("skipped")
    if text is None:
        return {}
    try:
        skipped = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        skipped = None
    if not isinstance(skipped, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("kinds"), list) and isinstance(entry.get("reason"), str)
            for entry in skipped.values()):
        raise StatisticsError(f"{source.path}: the metadata's 'skipped' is not a JSON object of {{module: {{\"kinds\": "
                              f"[...], \"reason\": \"...\"}}}}; the sidecar is damaged: measure again")
    return skipped


@dataclass(frozen=True)
class StatRef:
    """One statistic of one tensor of one model, read when the job runs."""

    sidecar: Sidecar
    kind: str
    key: str

    def load(self) -> Any:
        return self.sidecar.value(self.kind, self.key)


def stat_key(kind: str, tensor: str) -> str | None:
    """The sidecar key of ``kind`` for a tensor, or None when that kind has none for it (a bias has no Gram)."""
    kind = DERIVED.get(kind, kind)
    if kind == "fisher":
        return f"fisher/{tensor}"
    if not tensor.endswith(".weight"):
        return None
    return f"{kind}/{tensor.removesuffix('.weight')}"


@dataclass
class TensorStats:
    """What a job reads besides weights: per model (base first when there is one) {kind: StatRef}."""

    refs: list[dict[str, StatRef]]
    transposed: bool = False  # the weight is stored (in, out)
    joint_bias: str | None = None  # the bias tensor solved together with this weight

    def load(self) -> list[dict[str, Any]]:
        return [{kind: ref.load() for kind, ref in refs.items()} for refs in self.refs]


def plan_tensor_stats(name: str, shape: tuple[int, ...], kinds: tuple[str, ...],
                      inputs: list[tuple[str, str, Sidecar | None]], base_index: int | None,
                      has_key: Callable[[str, str], bool]) -> TensorStats:
    """Check and locate the statistics ``kinds`` of one output tensor for every input (model, tensor key,
    sidecar); the base's are optional. ``has_key(model, key)`` says whether a model's checkpoint holds a tensor
    (for the bias K-FAC's augmented factor refers to)."""
    refs: list[dict[str, StatRef]] = []
    transposed = joint_bias = None
    for index, (model, key, sidecar) in enumerate(inputs):
        found: dict[str, StatRef] = {}
        for kind in kinds:
            stored = DERIVED.get(kind, kind)
            if sidecar is None or stored not in sidecar.kinds:
                if index == base_index:
                    continue
                raise _missing_kind(model, sidecar, stored)
            stat = stat_key(kind, key)
            if stat is None or stat not in sidecar.keys:
                continue
            found[kind] = StatRef(sidecar, kind, stat)
            if kind in MODULE_KINDS or kind == "fisher":
                layout = _check_shape(name, shape, kind, sidecar, stat, has_key(model, _bias_of(key)))
                if kind in MODULE_KINDS:
                    transposed = layout[0] if transposed is None else transposed
                if layout[1]:
                    joint_bias = _bias_of(name)
        refs.append(found)
    _check_consistent(name, kinds, inputs, refs, base_index)
    return TensorStats(refs, bool(transposed), joint_bias)


def _missing_kind(model: str, sidecar: Sidecar | None, kind: str) -> MergeError:
    if sidecar is None:
        return MergeError(f"model '{model}' has no statistics, and the merge needs '{kind}'; add 'stats: DIR' to "
                          f"its entry in the recipe")
    has = ", ".join(sorted(sidecar.kinds)) or "none"
    return MergeError(f"{sidecar.where()} has no '{kind}' statistics (it has: {has}); measure it with "
                      f"--kind {kind.split('_')[0]}")


def _bias_of(weight_key: str) -> str:
    return weight_key.removesuffix(".weight") + ".bias"


def _check_shape(name: str, shape: tuple[int, ...], kind: str, sidecar: Sidecar, key: str,
                 has_bias: bool) -> tuple[bool, bool]:
    """(transposed, joint bias) of a statistic that fits the tensor; a misfit is a MergeError."""
    got = sidecar.shape(key)
    if kind == "fisher":
        if got != tuple(shape):
            raise _misfit(sidecar, key, got, f"{tuple(shape)}, the shape of '{name}'")
        return False, False
    if len(shape) != 2:
        raise _misfit(sidecar, key, got, f"a matrix: '{name}' has shape {tuple(shape)}, not (out, in)")
    module = key.split("/", 1)[1]
    transposed = module in sidecar.transposed
    out_features, in_features = (shape[1], shape[0]) if transposed else shape
    if kind == "kfac_g":
        expected = [(out_features, out_features)]
    elif kind == "kfac_a":
        expected = [(in_features, in_features)] + ([(in_features + 1,) * 2] if has_bias else [])
    else:
        expected = [(in_features, in_features)]
    if got not in expected:
        raise _misfit(sidecar, key, got, " or ".join(str(e) for e in expected) + f" for '{name}' {tuple(shape)}")
    return transposed, kind == "kfac_a" and got[0] == in_features + 1


def _misfit(sidecar: Sidecar, key: str, got: tuple[int, ...], expected: str) -> MergeError:
    return MergeError(f"{sidecar.where()}: '{key}' has shape {got}, expected {expected}; were these statistics "
                      f"measured on another model?")


def _check_consistent(name: str, kinds: tuple[str, ...], inputs: list, refs: list[dict[str, StatRef]],
                      base_index: int | None) -> None:
    """Every merged model has a statistic for this tensor, or none has (then the method's fallback applies)."""
    for kind in kinds:
        present = [kind in r for i, r in enumerate(refs) if i != base_index]
        if any(present) and not all(present):
            merged = [entry for i, entry in enumerate(inputs) if i != base_index]
            lacking, key, sidecar = merged[present.index(False)]
            what = f"model '{lacking}' has no '{DERIVED.get(kind, kind)}' statistic for '{name}' while other models do"
            reason = sidecar.skip_reason(kind, key) if sidecar is not None else None
            if reason is not None:
                raise StatisticsError(f"{what}: {reason}; measure every model with the same --exclude and "
                                      f"--max-factor-size, so that all of them skip it (the method's fallback) "
                                      f"or none does")
            raise StatisticsError(f"{what}; measure every model's statistics the same way")
