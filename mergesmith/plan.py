"""Plan a merge: one job per output tensor, every input checked before any tensor is read.

A plan knows each output's name, shape, dtype, inputs, method parameters and statistics; building it
reads only headers and sidecar metadata. ``mergesmith.execute`` then streams the jobs.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mergesmith.architecture import EMBEDDING_HINTS, HEAD_PREFIXES, is_head, split_layer_name
from mergesmith.config import Recipe, resolve
from mergesmith.damage import DamagePlan, curvature_ref
from mergesmith.errors import CheckpointError, MergeWarning, RecipeError, StatisticsError
from mergesmith.io.adapter import adapter_files
from mergesmith.io.checkpoint import TensorSource
from mergesmith.io.sidecar import KINDS, weights_fingerprint
from mergesmith.methods import MergeMethod, get_method
from mergesmith.statistics import Sidecar, StatsSource, TensorStats, plan_tensor_stats


@dataclass(frozen=True)
class TensorInput:
    source: TensorSource
    key: str


@dataclass
class Job:
    """One output tensor: which inputs to read and how to combine them."""

    name: str
    method: MergeMethod
    base: TensorInput | None
    inputs: list[TensorInput]
    kwargs: dict[str, Any]
    shape: tuple[int, ...]
    out_dtype: torch.dtype  # the recipe's output dtype, else the stored dtype of the base (or first) input
    stats: TensorStats | None = None  # what a curvature method reads besides weights
    companion: Job | None = None  # a bias merged in one block with this weight (K-FAC), read and written along
    factored: bool = False  # every input is an adapter over this base: the method gets each delta's factors
    damage: DamagePlan | None = None  # how to predict each model's loss increase from its sidecar

    @property
    def own_reads(self) -> list[TensorInput]:
        return ([self.base] if self.base is not None else []) + self.inputs

    @property
    def reads(self) -> list[TensorInput]:
        return self.own_reads + (self.companion.own_reads if self.companion is not None else [])

    @property
    def outputs(self) -> list[Job]:
        return [self] + ([self.companion] if self.companion is not None else [])


@dataclass
class Plan:
    jobs: list[Job]
    method: MergeMethod
    sources: list[TensorSource]
    reference: TensorSource
    layer_counts: dict[str, int] = field(default_factory=dict)  # output layers per stack
    kept_heads: dict[str, list[str]] = field(default_factory=dict)  # heads: each — model -> its head tensors
    fallback: list[str] = field(default_factory=list)  # tensors without statistics (the method's fallback)

    def size(self, prefetch: int = 1) -> PlanSize:
        """What executing the plan reads, writes and holds in memory at most (see ``PlanSize``)."""
        by_method: dict[str, int] = {}
        for job in self.jobs:
            for out in job.outputs:
                by_method[out.method.name] = by_method.get(out.method.name, 0) + 1
        reads = [_read_bytes(job) for job in self.jobs]
        outputs = [_nbytes(out.shape, out.out_dtype) for job in self.jobs for out in job.outputs]
        return PlanSize(tensors=len(outputs), by_method=by_method, bytes_read=sum(reads),
                        bytes_written=sum(outputs), largest_read=max(reads, default=0),
                        largest_work=max((_work_bytes(job) for job in self.jobs), default=0),
                        largest_output=max(outputs, default=0), prefetch=prefetch)


THREAD_OVERHEAD = 64 << 20


@dataclass(frozen=True)
class PlanSize:
    """Bytes a merge reads and writes, and the terms of its memory bound.

    While job k is computed, the reader holds the inputs of at most ``prefetch`` + 1 later jobs (mapped
    from the page cache and checked for NaN, so resident), and the writer at most 3 finished tensors
    (two queued, one being written): peak ≈ start-up + (prefetch + 2) · largest job's input bytes + the
    largest job's working copies + 3 · the largest output tensor + 64 MB of thread stacks and arenas."""

    tensors: int
    by_method: dict[str, int]
    bytes_read: int
    bytes_written: int
    largest_read: int  # a job's input bytes as stored, statistics included
    largest_work: int  # a job's float32 (solvers: float64) working copies
    largest_output: int
    prefetch: int

    def peak_bound(self, start_up: int) -> int:
        """The most resident memory the merge needs, ``start_up`` being the process before it begins; 64 MB
        more cover the reader's and writer's thread stacks and allocator arenas, which the terms above omit."""
        return (start_up + (self.prefetch + 2) * self.largest_read + self.largest_work + 3 * self.largest_output
                + THREAD_OVERHEAD)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _read_bytes(job: Job) -> int:
    # an adapter's touched tensor arrives in float32, whatever its stored dtype
    references = [out.damage.reference for out in job.outputs if out.damage is not None and out.damage.reference]
    weights = sum(_nbytes(r.source.shape(r.key), getattr(r.source, "loaded_dtype", r.source.dtype)(r.key))
                  for r in job.reads + references)
    return weights + 4 * _stats_elements(job)


def _stats_elements(job: Job) -> int:
    """Elements of the statistics a job reads (float32 in a sidecar), its companion's included."""
    total = 0
    for each in job.outputs:
        for refs in (each.stats.refs if each.stats is not None else []):
            total += sum(math.prod(ref.sidecar.shape(ref.key)) for ref in refs.values() if ref.kind in KINDS)
        for curvature in (each.damage.curvatures if each.damage is not None else []):  # loaded again, on their own
            total += sum(math.prod(ref.sidecar.shape(ref.key)) for ref in (curvature.refs if curvature else ()))
    return total


def _work_bytes(job: Job) -> int:
    """Working copies while computing: every input and the method's temporaries of the output's size in
    float32 (``MergeMethod.work_copies``: 3 for elementwise methods); with statistics, float64 solves (CG keeps
    residual, direction, product and iterate per model) and a float64 copy of each statistic. Predicting damage
    comes after and holds 5 float32 copies at most (the input, δ, G δ, G δ A, the result)."""
    elements = sum(math.prod(out.shape) for out in job.outputs)
    damage = 4 * elements * 5 if any(out.damage is not None for out in job.outputs) else 0
    if job.stats is None:
        inputs = len(job.own_reads)
        per_model, fixed = max((out.method.work_copies for out in job.outputs), key=lambda c: c[0] * inputs + c[1])
        return max(4 * elements * (inputs + per_model * inputs + fixed), damage)
    return max(8 * elements * (len(job.own_reads) + 6) + 8 * _stats_elements(job), damage)



@dataclass(frozen=True)
class _Source:
    model: str
    layer_start: int
    length: int | None  # None: every layer of the model
    parameters: dict[str, Any] | None
    stats: str | None = None  # the model's statistics sidecar


@dataclass(frozen=True)
class _Slice:
    sources: list[_Source]
    base_model: str | None
    parameters: dict[str, Any] | None

    def length(self, available: int) -> int:
        lengths = {s.length for s in self.sources if s.length is not None}
        if len(lengths) > 1:
            raise RecipeError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return lengths.pop() if lengths else available


def _normalised_slices(recipe: Recipe, uses_base: bool) -> list[_Slice]:
    """Both recipe forms as slices; ``models:`` is one slice over all layers, plus the base if unlisted."""
    if recipe.models is not None:
        sources = [_Source(m.model, 0, None, m.parameters, m.stats) for m in recipe.models]
        if uses_base and recipe.base_model not in (None, *(m.model for m in recipe.models)):
            sources.append(_Source(recipe.base_model, 0, None, None, recipe.base_stats))
        return [_Slice(sources, recipe.base_model, None)]
    return [_Slice([_Source(src.model, src.layer_range[0], src.layer_range[1] - src.layer_range[0], src.parameters,
                            src.stats or (recipe.base_stats if src.model == recipe.base_model else None))
                    for src in out.sources], out.base_model or recipe.base_model, out.parameters)
            for out in recipe.slices or []]


def _check_shapes(job_name: str, reads: list[TensorInput]) -> tuple[int, ...]:
    """The common shape of a job's inputs; a missing tensor, a shape mismatch, or a floating-point tensor in
    one model that is an integer or boolean one in another (not a weight to average) is a CheckpointError.
    Floating dtypes may differ: every input is merged in the compute dtype."""
    shapes = []
    for read in reads:
        try:
            shapes.append(read.source.shape(read.key))
        except KeyError:
            raise CheckpointError(f"tensor '{read.key}' is missing from model '{read.source.name}' "
                                  f"(needed for output '{job_name}')") from None
    first = reads[0]
    for read, shape in zip(reads, shapes):
        if shape != shapes[0]:
            hint = " Is one checkpoint transposed?" if tuple(reversed(shape)) == shapes[0] else ""
            raise CheckpointError(f"Shape mismatch for '{job_name}': '{first.source.name}' has {shapes[0]}, "
                                  f"'{read.source.name}' has {shape}.{hint}")
    if len({read.source.dtype(read.key).is_floating_point for read in reads}) > 1:
        dtypes = ", ".join(f"'{r.source.name}' has {str(r.source.dtype(r.key)).removeprefix('torch.')}"
                           for r in reads)
        raise CheckpointError(f"dtype mismatch for '{job_name}': {dtypes}; are these checkpoints of the same model?")
    return shapes[0]


def _check_same_keys(sources: list[TensorSource], reference: TensorSource,
                     ignored: Callable[[str], bool] = lambda name: False) -> None:
    expected = {k for k in reference.keys() if not ignored(k)}
    for source in sources:
        if source is reference:
            continue
        keys = {k for k in source.keys() if not ignored(k)}
        missing, unexpected = sorted(expected - keys), sorted(keys - expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"'{source.name}' lacks {_first(missing)}")
            if unexpected:
                parts.append(f"'{source.name}' has unexpected {_first(unexpected)}")
            raise CheckpointError(f"tensor names differ from '{reference.name}': {'; '.join(parts)}. "
                                  f"Are they the same architecture?")


def _first(names: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def seed_for(seed: int, name: str) -> int:
    """A per-tensor seed, so random methods do not depend on execution order."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _Planner:
    def __init__(self, recipe: Recipe, method: MergeMethod, source: Callable[[str], TensorSource],
                 open_stats: Callable[[str], StatsSource] | None, damage: bool = True):
        self.recipe, self.method, self.source = recipe, method, source
        self.damage = damage
        self.reference_source = source  # where a base the method does not read is opened for forgetting
        self.uses_base = method.base != "ignored"
        self.open_stats = open_stats
        self.sidecars: dict[str, Sidecar] = {}
        self.with_stats: list[str] = []  # tensors merged with their statistics
        self.fallback: list[str] = []  # tensors no model has statistics for: the method's fallback

    def sidecar(self, src: _Source) -> Sidecar | None:
        if src.stats is None or self.open_stats is None:
            return None
        if src.stats not in self.sidecars:
            self.sidecars[src.stats] = Sidecar(src.model, self.open_stats(src.stats))
            _check_sidecars(self.sidecars.values())
        return self.sidecars[src.stats]

    def _check_fingerprint(self, model: str, key: str, sidecar: Sidecar) -> None:
        """A sidecar measured on other weights of the same architecture (another fine-tune's statistics, a
        swapped path) would merge without any shape error, and wrongly: compare the weights it records."""
        if weights_fingerprint(self.source(model).get(key)) != sidecar.fingerprints[key]:
            raise StatisticsError(f"{sidecar.where()} was measured on other weights: '{key}' differs from model "
                                  f"'{model}''s; give each model the sidecar measured on it")

    def _check_base_stats(self, base: _Source, kinds: tuple[str, ...]) -> None:
        sidecar = self.sidecar(base)
        lacking = [k for k in kinds if sidecar is None or k not in sidecar.kinds]
        if lacking:
            where = f"its sidecar {base.stats} has no '{lacking[0]}'" if sidecar is not None else "it has none"
            raise RecipeError(f"recipe: {self.method.name} with these parameters needs the base model's "
                              f"'{lacking[0]}' statistics and {where}; give the base one: base_model: "
                              f"{{model: {base.model}, stats: DIR}}")

    def tensor_stats(self, name: str, shape: tuple[int, ...], kwargs: dict[str, Any], base_src: _Source | None,
                     others: list[_Source], key_of: Callable[[_Source], str]) -> TensorStats | None:
        if self.method.needs is None:
            return None
        kinds = self.method.statistics(kwargs)
        ordered = ([base_src] if base_src else []) + others
        inputs = [(s.model, key_of(s), self.sidecar(s)) for s in ordered]
        stats = plan_tensor_stats(name, shape, kinds, inputs, 0 if base_src else None,
                                  lambda model, key: key in self.source(model).keys())
        for (model, key, sidecar), refs in zip(inputs, stats.refs):
            if refs and key in sidecar.fingerprints:
                self._check_fingerprint(model, key, sidecar)
        covered = any(stats.refs[i] for i in range(1 if base_src else 0, len(stats.refs)))
        (self.with_stats if covered or not kinds else self.fallback).append(name)
        return stats

    def job(self, name: str, out_slice: _Slice, key_of: Callable[[_Source], str], t: float) -> Job:
        base_model = out_slice.base_model if self.uses_base else None
        base_src = next((s for s in out_slice.sources if s.model == base_model), None)
        if base_model is not None and base_src is None:
            raise RecipeError(f"base_model '{base_model}' must be one of the slice's sources")
        others = [s for s in out_slice.sources if s is not base_src]
        where = f"tensor '{name}'"
        self.method.check_inputs(base_src is not None, len(others), where)
        base = TensorInput(self.source(base_src.model), key_of(base_src)) if base_src else None
        inputs = [TensorInput(self.source(s.model), key_of(s)) for s in others]
        shape = _check_shapes(name, ([base] if base else []) + inputs)
        shared_scopes = [out_slice.parameters, self.recipe.parameters]
        shared = resolve(shared_scopes, name, t)
        per_model = [resolve([s.parameters], key_of(s), t) for s in others]
        for values in per_model:  # per-model keys set on the slice or globally apply to every model
            for key, value in shared.items():
                if self._is_per_model(key):
                    values.setdefault(key, value)
        shared_only = {k: v for k, v in shared.items() if not self._is_per_model(k)}
        kwargs = self.method.bind(shared_only, per_model, where)
        self.method.check(kwargs, base_src is not None, len(others), f"recipe (at tensor '{name}')")
        if base_src is not None and self.method.base_needs is not None:
            self._check_base_stats(base_src, self.method.base_needs(kwargs))
        first = (base or inputs[0])
        stored = first.source.dtype(first.key)
        out_dtype = self.recipe.output_dtype if stored.is_floating_point and self.recipe.output_dtype else stored
        stats = self.tensor_stats(name, shape, kwargs, base_src, others, key_of) if stored.is_floating_point else None
        factored = self.method.low_rank and base is not None and all(_adapter_over(i, base) for i in inputs)
        damage = self.damage_plan(shape, out_slice, base_src, others, key_of) \
            if self.damage and stored.is_floating_point else None
        return Job(name, self.method, base, inputs, kwargs, shape, out_dtype, stats, factored=factored, damage=damage)

    def damage_plan(self, shape: tuple[int, ...], out_slice: _Slice, base_src: _Source | None,
                    others: list[_Source], key_of: Callable[[_Source], str]) -> DamagePlan | None:
        """Each merged model's curvature for this tensor from its sidecar (``mergesmith.damage``), and the base's
        tensor for forgetting when the method does not read it; None when no model has a sidecar."""
        models, indices, curvatures = [], [], []
        for index, src in enumerate(others):
            sidecar = self.sidecar(src)
            if sidecar is None:
                continue
            key = key_of(src)
            weight = key.removesuffix(".bias") + ".weight" if key.endswith(".bias") else None
            holder = self.source(src.model)
            weight_shape = holder.shape(weight) if weight is not None and weight in holder.keys() else None
            curvature = curvature_ref(key, shape, sidecar, weight_shape)
            if curvature is not None and key in sidecar.fingerprints:
                self._check_fingerprint(src.model, key, sidecar)
            models.append(src.model)
            indices.append(index)
            curvatures.append(curvature)
        if not models:
            return None
        reference = None
        base_model = out_slice.base_model
        if base_src is None and base_model is not None and self.recipe.models is not None:
            reference = TensorInput(self.reference_source(base_model), key_of(others[0]))
        return DamagePlan(models, indices, curvatures, reference)

    def _is_per_model(self, key: str) -> bool:
        try:
            return self.method.param(key).per_model
        except KeyError:
            return False


def _adapter_over(read: TensorInput, base: TensorInput) -> bool:
    """Whether ``read`` is an adapter's tensor over exactly the base tensor ``base``, so that the adapter's factors
    are its task vector."""
    adapter_base = getattr(read.source, "base_path", None)
    base_path = getattr(base.source, "path", None)
    return (adapter_base is not None and base_path is not None and read.key == base.key
            and not hasattr(base.source, "low_rank") and adapter_base == base_path.resolve())


def build_plan(recipe: Recipe, open_source: Callable[[str], TensorSource],
               open_stats: Callable[[str], StatsSource] | None = None, *, damage: bool = True) -> Plan:
    """Turn a recipe into one job per output tensor; every input (statistics included, opened with
    ``open_stats``) is checked before anything is read. With ``damage``, every job also plans the prediction of
    each model's loss increase from the sidecars the recipe names (``mergesmith.damage``)."""
    method = get_method(recipe.merge_method)
    cache: dict[str, TensorSource] = {}

    def source(model: str) -> TensorSource:
        if model not in cache:
            cache[model] = open_source(model)
        return cache[model]

    uses_base = method.base != "ignored"
    if method.base == "required" and recipe.base_model is None and all(
            s.base_model is None for s in recipe.slices or []):
        raise RecipeError(f"recipe: method '{method.name}' needs a base_model")
    check_recipe_values(recipe, method)
    listed = {m.model for m in recipe.models or []} | {src.model for out in recipe.slices or [] for src in out.sources}
    serves_adapters = any(adapter_files(model) for model in listed)  # the adapters' base, merged or not
    if not uses_base and recipe.base_model is not None and recipe.base_model not in listed and not serves_adapters:
        warnings.warn(MergeWarning(f"'{method.name}' does not use a base model: base_model '{recipe.base_model}' "
                                   f"is neither read nor merged (list it under models to merge it)"), stacklevel=2)
    slices = _normalised_slices(recipe, uses_base)
    for index, out_slice in enumerate(slices):
        has_base = uses_base and any(s.model == out_slice.base_model for s in out_slice.sources)
        where = "recipe" if recipe.models is not None else f"recipe: slices[{index}]"
        method.check_inputs(has_base, len(out_slice.sources) - has_base, where)
    first_slice = slices[0]
    reference_model = first_slice.base_model if uses_base and first_slice.base_model else first_slice.sources[0].model
    reference = source(reference_model)
    head_prefixes = tuple(recipe.head_tensors or HEAD_PREFIXES)
    heads_kept = recipe.heads != "merge"
    if recipe.models is not None:
        _check_same_keys([source(s.model) for s in first_slice.sources], reference,
                         (lambda k: is_head(k, head_prefixes)) if heads_kept else (lambda k: False))

    layered: dict[str, dict[int, list[str]]] = {}
    pre, post = [], []
    for key in reference.keys():
        parts = split_layer_name(key)
        if parts:
            layered.setdefault(parts[0], {}).setdefault(parts[1], []).append(parts[2])
        elif any(h in key for h in EMBEDDING_HINTS):
            pre.append(key)
        else:
            post.append(key)
    if recipe.slices is not None and len(layered) != 1:
        raise RecipeError(f"'slices' need a model with one stack of layers; found {len(layered)} "
                          f"({', '.join(sorted(layered)) or 'none'})")

    planner = _Planner(recipe, method, source, open_stats, damage)
    unread: dict[str, TensorSource] = {}  # a base only forgetting reads is no input of the merge (plan.sources)
    planner.reference_source = lambda model: cache.get(model) or unread.get(model) or unread.setdefault(
        model, open_source(model))
    if heads_kept:  # head tensors are copied (or kept aside), not merged
        post = [k for k in post if not is_head(k, head_prefixes)]
        pre = [k for k in pre if not is_head(k, head_prefixes)]
    jobs = [planner.job(key, first_slice, lambda s, k=key: k, 0.0) for key in pre]
    layer_counts: dict[str, int] = {}
    for stack, layers in layered.items():
        out_index = 0
        for out_slice in slices:
            length = out_slice.length(len(layers))
            for offset in range(length):
                t = offset / (length - 1) if length > 1 else 1.0  # mergekit: t runs 0 → 1 within each slice
                rests = layers.get(out_slice.sources[0].layer_start + offset) or layers[min(layers)]
                for rest in rests:
                    jobs.append(planner.job(f"{stack}.{out_index}.{rest}", out_slice,
                                            lambda s, o=offset, r=rest, st=stack: f"{st}.{s.layer_start + o}.{r}", t))
                out_index += 1
        layer_counts[stack] = out_index
    jobs += [planner.job(key, slices[-1], lambda s, k=key: k, 0.0) for key in post]
    kept: dict[str, list[str]] = {}
    if heads_kept:
        jobs += _head_jobs(recipe, source, head_prefixes)
        if recipe.heads == "each":
            kept = {s.model: [k for k in source(s.model).keys() if is_head(k, head_prefixes)]
                    for s in slices[-1].sources if s.model != recipe.base_model or not uses_base}
            if not any(kept.values()):
                raise RecipeError(f"heads: each, but no model has a tensor starting with {', '.join(head_prefixes)}; "
                                  f"name the head tensors with head_tensors: [prefix, ...]")
    if planner.fallback and not planner.with_stats:
        sidecar = next(iter(planner.sidecars.values()))
        raise StatisticsError(f"no statistic in {sidecar.where()} matches a tensor of the checkpoints (it has e.g. "
                              f"'{min(sidecar.keys)}', the merge needs e.g. '{planner.fallback[0]}'); were the "
                              f"statistics measured on this architecture?")
    jobs = _pair_joint_biases(jobs)
    solved_jointly = {job.companion.name for job in jobs if job.companion is not None}
    return Plan(jobs, method, list(cache.values()), reference, layer_counts, kept,
                [name for name in planner.fallback if name not in solved_jointly])


def check_recipe_values(recipe: Recipe, method: MergeMethod) -> None:
    """Every parameter value the recipe writes (a scalar, each entry of a gradient, each condition's value)
    checked against the method's declaration and named by its place in the recipe, before any file is
    opened. Interpolated gradient values lie between checked entries, so they need no second look."""
    for where, params in recipe.parameter_scopes():
        per_model = where.startswith("models[") or ".sources[" in where
        method.check_keys(params, f"recipe: {where}parameters", per_model=per_model)
        for name, setting in params.items():
            declared = method.param(name)
            for value in _leaf_values(setting):
                declared.validate(value, f"recipe: {where}parameters.{name}")


def _leaf_values(setting: Any) -> list[Any]:
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return [setting]
    return [leaf for entry in setting
            for leaf in (_leaf_values(entry["value"]) if isinstance(entry, dict) else [entry])]


def _head_jobs(recipe: Recipe, source: Callable[[str], TensorSource], prefixes: tuple[str, ...]) -> list[Job]:
    """Copies of the head tensors from the model the ``heads`` policy names (base, or one model). With
    ``each``, the main checkpoint gets the base's head when the base has one, and none otherwise."""
    if recipe.heads == "each":
        owner = recipe.base_model
        if owner is None or not any(is_head(k, prefixes) for k in source(owner).keys()):
            return []
    else:
        owner = recipe.base_model if recipe.heads == "base" else recipe.heads
    copy = get_method("passthrough")
    holder = source(owner)
    names = [k for k in holder.keys() if is_head(k, prefixes)]
    if not names:
        raise RecipeError(f"heads: {recipe.heads}, but '{owner}' has no tensor starting with {', '.join(prefixes)}; "
                          f"name the head tensors with head_tensors: [prefix, ...]")
    out_dtype = recipe.output_dtype
    return [Job(k, copy, None, [TensorInput(holder, k)], copy.bind({}, [{}], f"tensor '{k}'"), holder.shape(k),
                out_dtype if out_dtype and holder.dtype(k).is_floating_point else holder.dtype(k)) for k in names]


def _check_sidecars(sidecars: Any) -> None:
    """Statistics measured on different architectures (another model identity) cannot be merged together."""
    identified = [s for s in sidecars if s.source.model]
    for other in identified[1:]:
        if other.source.model != identified[0].source.model:
            first = identified[0]
            raise StatisticsError(f"{other.where()} and {first.where()} were measured on different architectures "
                                  f"(model identity {other.source.model} vs {first.source.model})")



def _pair_joint_biases(jobs: list[Job]) -> list[Job]:
    """Attach each bias that K-FAC solves together with its weight to the weight's job."""
    by_name = {job.name: job for job in jobs}
    taken = set()
    for job in jobs:
        bias = job.stats.joint_bias if job.stats is not None else None
        if bias is not None and bias in by_name:
            job.companion = by_name[bias]
            taken.add(bias)
    return [job for job in jobs if job.name not in taken]
