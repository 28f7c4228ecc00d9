"""Layer-by-layer merging on the merged model's own activations: RegMean++ (Nguyen et al., arXiv:2508.03121).

RegMean merges each Linear weight with the Gram matrices G_i = X_iᵀX_i / n of the inputs that *model i* gives
the layer. Once the layers below l are merged, the merged model feeds layer l other inputs. RegMean++ measures
layer l's Grams on each model's calibration data run through the *merged* layers below l and then through
model i's own layer l (in which its own attention feeds its own MLP), merges layer l, and goes on upward:

    h_i⁰       = the merged model's embedding of model i's data (non-layer tensors: the weighted average)
    G_i^(l,j)  = the Gram of module j's input when model i's layer l runs on h_iˡ
    Wˡ         = RegMean of the models' layer l with the Grams G_i^(l,·) (the engine's own solve)
    h_i^(l+1)  = the merged layer l applied to h_iˡ

The network is never built whole: a copy of the architecture with no layers computes h_i⁰ (its layer stack
replaced by one module that captures what the stack is called with: the hidden states and the masks and
position embeddings every layer shares), and each layer is built on its own from its class. Memory: every
model's hidden states for its calibration data, one layer of each model, and that layer's Grams.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergesmith.architecture import split_layer_name
from mergesmith.config import CalibrationSpec, Recipe, parse_recipe
from mergesmith.errors import RecipeError, UsageError

OnLayer = Callable[[int, int, float], None]  # (layer, layers, seconds)


@dataclasses.dataclass
class _Inputs:
    """One batch at the input of the current layer: its hidden states, the other arguments every layer of
    the stack gets (masks, position embeddings), and the token mask that says which rows count."""

    hidden: Tensor
    args: tuple  # positional arguments after the hidden states (BERT passes its attention mask so)
    kwargs: dict[str, Any]
    mask: Tensor | None


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict[str, Any]):
        super().__init__("captured")
        self.args_, self.kwargs = args, kwargs


class _Capture(nn.Module):
    """Stands in for the layer stack: stops the forward at the first layer's call and hands over its arguments."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(args, kwargs)


def planning_recipe(recipe: Recipe) -> Recipe:
    """The recipe as a weighted average with an optional base, as RegMean takes one (``mats`` with the identity
    precision): its plan names every output tensor, its dtype, the heads kept and the files beside the weights
    (config and head from the base when there is one), and merges every tensor outside the layer stack as
    RegMean's fallback does."""
    data = recipe.model_dump(exclude_none=True)
    data["merge_method"] = "mats"
    data.pop("calibration", None)
    data.pop("base_stats", None)
    data["parameters"] = {**{k: v for k, v in (data.get("parameters") or {}).items() if k == "weight"},
                          "precision": "identity", "init": "average"}
    for entry in data["models"]:
        entry.pop("data", None)
        entry.pop("stats", None)
        if "parameters" in entry:
            entry["parameters"] = {k: v for k, v in entry["parameters"].items() if k == "weight"}
    return parse_recipe(data)


def _weights(recipe: Recipe) -> list[float]:
    top = (recipe.parameters or {}).get("weight", 1.0)
    values = [(m.parameters or {}).get("weight", top) for m in recipe.models]
    for m, w in zip(recipe.models, values):
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise RecipeError(f"recipe: {recipe.merge_method} takes one number as each model's weight; {m.model} has "
                              f"{w!r} (gradients and filters are for tensor-by-tensor methods)")
    return [float(w) for w in values]


def merge_layerwise(recipe: Recipe, label: str, output: Path, *, device: str = "cpu", seed: int = 0,
                    overwrite: bool = False, shard_bytes: int, on_plan: Callable | None = None,
                    on_tensor: Callable | None = None, on_notice: Callable | None = None,
                    on_layer: OnLayer | None = None) -> Any:
    """``merge`` for a layer-wise method: checks, then the tensors outside the layer stack (weighted average),
    then layer by layer, each written as soon as it is merged; the directory, config, tokenizer, heads and card
    as for any merge."""
    from mergesmith.api import _checked, _protected, finish_output
    from mergesmith.execute import MergeSummary, execute, peak_rss_bytes
    from mergesmith.io.writer import OutputTensor, ShardedWriter, atomic_output_dir
    from mergesmith.validation import model_batches

    started = time.perf_counter()
    weights = _weights(recipe)
    alpha = (recipe.parameters or {}).get("alpha", 1.0)
    plan, config_dir, tokenizer_dir = _checked(recipe, label, output, overwrite, False)  # planned as linear
    if len(plan.layer_counts) != 1:
        raise UsageError(f"{recipe.merge_method}: the models need one stack of numbered layers (found "
                         f"{len(plan.layer_counts)}: {', '.join(plan.layer_counts) or 'none'})")
    stack, count = next(iter(plan.layer_counts.items()))
    models = [m.model for m in recipe.models]
    sources = {s.name: s for s in plan.sources}
    calibration = recipe.calibration or CalibrationSpec()
    task, skeleton, data = model_batches(
        recipe, {m.model: m.data for m in recipe.models}, text_field=calibration.text_field, label_field=None,
        examples=calibration.examples, batch_size=calibration.batch_size,
        max_length=calibration.max_length, seed=calibration.seed, device=device, purpose=recipe.merge_method)

    def layer_of(job: Any) -> int | None:
        parts = [split_layer_name(out.name) for out in job.outputs]
        indices = {p[1] for p in parts if p and p[0] == stack}
        return indices.pop() if len(indices) == 1 and all(p and p[0] == stack for p in parts) else None

    by_layer: dict[int, list[Any]] = {}
    outside = []
    for job in plan.jobs:
        index = layer_of(job)
        (by_layer.setdefault(index, []) if index is not None else outside).append(job)
    if on_plan is not None:
        on_plan(plan)
    timings: list[dict[str, float]] = []
    with atomic_output_dir(output, overwrite, inputs=_protected(recipe, label), log=on_notice) as directory:
        outputs = [OutputTensor(out.name, out.shape, out.out_dtype) for job in plan.jobs for out in job.outputs]
        writer = ShardedWriter(directory, outputs, shard_bytes, metadata={"mergesmith_method": recipe.merge_method})
        try:
            summary = execute(dataclasses.replace(plan, jobs=outside), writer.add, device=device, seed=seed,
                              on_tensor=on_tensor)
            network, layer_class, config = _skeleton(skeleton, task, stack, count, sources, models, weights, device)
            inputs = [[_first_inputs(network, batch) for batch in d.batches] for d in data]
            del network
            for index in range(count):
                t0 = time.perf_counter()
                jobs = by_layer.get(index, [])
                names = [out.name for job in jobs for out in job.outputs]
                stored = {m: {n: sources[m].get(n) for n in names} for m in models}
                summary.bytes_read += sum(t.numel() * t.element_size() for d in stored.values() for t in d.values())
                own = {m: {n: t.float() for n, t in d.items()} for m, d in stored.items()}
                del stored
                prefix = f"{stack}.{index}."
                grams = {m: _grams(_layer(layer_class, config, index, own[m], prefix, device), inputs[i], prefix)
                         for i, m in enumerate(models)}
                measured = time.perf_counter() - t0
                merged = _merge_layer(own, grams, weights, alpha, prefix, device=device, seed=seed)
                dtypes = {out.name: out.out_dtype for job in jobs for out in job.outputs}
                for name in names:
                    writer.add(name, merged[name].to(dtypes[name]))
                for job in jobs:
                    if on_tensor is not None:
                        on_tensor(job)
                if index + 1 < count:
                    merged_layer = _layer(layer_class, config, index, merged, prefix, device)
                    inputs = [[_advance(merged_layer, batch) for batch in batches] for batches in inputs]
                seconds = time.perf_counter() - t0
                timings.append({"layer": index, "seconds": seconds, "measure_seconds": measured})
                if on_layer is not None:
                    on_layer(index, count, seconds)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        files += finish_output(directory, recipe, plan, config_dir, tokenizer_dir, method=recipe.merge_method,
                               base=recipe.base_model, models=sorted(set(models) - {recipe.base_model}),
                               notes=_card(timings, data), seed=seed, device=device, allow_nonfinite=False)
    return MergeSummary(recipe.merge_method, models, len(outputs), summary.bytes_read, writer.bytes_written,
                        time.perf_counter() - started, peak_rss_bytes(), output=str(output), files=files,
                        layers=timings)


def _skeleton(directory: Path, task: str, stack: str, count: int, sources: dict[str, Any], models: list[str],
              weights: list[float], device: str) -> tuple[nn.Module, type, Any]:
    """The architecture with no layers (its layer stack one capturing module), every tensor outside the stack
    that all models share set to their weighted average; the layers' class; the config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from mergesmith.methods.curvature import weighted_average

    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}[task]
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    config.use_cache = False
    with torch.device("meta"):  # only to learn the layers' class
        one = auto.from_config(_with_layers(config, 1))
    layer_class = type(_stack_of(one, stack)[0])
    network = auto.from_config(_with_layers(config, 0)).to(device).eval()
    parent, _, attribute = stack.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, attribute, nn.ModuleList([_Capture()]))
    network.config.num_hidden_layers = count  # forwards slice the stack by it
    # layers are built from the network's config: it names the attention implementation the network chose
    # (sdpa), whose masks it prepares — an eager layer would ignore causality where the mask is left to sdpa
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            tensors = [sources[m].get(name) if name in sources[m].keys() else None for m in models]
            if all(t is not None and tuple(t.shape) == tuple(parameter.shape) for t in tensors):
                parameter.copy_(weighted_average([t.float() for t in tensors], weights))
    return network, layer_class, network.config


def _with_layers(config: Any, layers: int) -> Any:
    import copy

    changed = copy.deepcopy(config)
    changed.num_hidden_layers = layers
    return changed


def _stack_of(network: nn.Module, stack: str) -> nn.ModuleList:
    try:
        found = network.get_submodule(stack)
    except AttributeError:
        found = None
    if not isinstance(found, nn.ModuleList):
        raise UsageError(f"regmean_plusplus: {type(network).__name__} has no layer stack at {stack}, where the "
                         f"checkpoint's numbered layers are")
    return found


def _first_inputs(network: nn.Module, batch: dict[str, Tensor]) -> _Inputs:
    """What the merged model's stack receives for ``batch``: the input of its first layer."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        try:
            network(**inputs)
        except _Captured as captured:
            args, kwargs = captured.args_, dict(captured.kwargs)
        else:
            raise UsageError(f"regmean_plusplus: {type(network).__name__}'s forward never called its layers")
    hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
    return _Inputs(hidden, rest, kwargs, batch.get("attention_mask"))


def _layer(layer_class: type, config: Any, index: int, tensors: dict[str, Tensor], prefix: str,
           device: str) -> nn.Module:
    """Layer ``index`` of the stack, built from its class and given ``tensors`` (full names under ``prefix``)."""
    takes_index = "layer_idx" in inspect.signature(layer_class.__init__).parameters
    layer = (layer_class(config, layer_idx=index) if takes_index else layer_class(config)).to(device).float().eval()
    own = {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
    result = layer.load_state_dict(own, strict=False)
    missing = [k for k in result.missing_keys if k in dict(layer.named_parameters())]
    if result.unexpected_keys or missing:
        wrong = (result.unexpected_keys or missing)[0]
        raise UsageError(f"regmean_plusplus: layer {index}'s tensor {prefix}{wrong} does not fit "
                         f"{layer_class.__name__} built from config.json")
    return layer


def _call(layer: nn.Module, batch: _Inputs) -> Tensor:
    out = layer(batch.hidden, *batch.args, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _advance(layer: nn.Module, batch: _Inputs) -> _Inputs:
    with torch.no_grad():
        return dataclasses.replace(batch, hidden=_call(layer, batch))


def _grams(layer: nn.Module, batches: list[_Inputs], prefix: str) -> Any:
    """Every Linear module's input Gram when ``layer`` runs on ``batches`` (padding rows left out), keyed by the
    full module name, as ``mergesmith measure`` computes it."""
    from mergesmith.measure import measure

    def run(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        _call(module, batches[int(batch["index"][0])])
        return batch["index"].float()

    keyed = [{"index": torch.full((b.hidden.shape[0],), k), **({"attention_mask": b.mask} if b.mask is not None
                                                                else {})} for k, b in enumerate(batches)]
    stats = measure(layer, keyed, log_likelihood=run, kinds=["gram"], max_factor_size=None)
    if stats.transposed:
        raise UsageError("regmean_plusplus: layers of GPT-2's Conv1D kind are not supported yet (use regmean with a "
                         "sidecar)")
    stats.tensors = {f"gram/{prefix}{k.removeprefix('gram/')}": v for k, v in stats.tensors.items()}
    stats.counts = {f"gram/{prefix}{k.removeprefix('gram/')}": v for k, v in stats.counts.items()}
    return stats


def _merge_layer(own: dict[str, dict[str, Tensor]], grams: dict[str, Any], weights: list[float], alpha: float,
                 prefix: str, *, device: str, seed: int) -> dict[str, Tensor]:
    """One layer's tensors merged by the engine's RegMean with the Grams measured for it. The layer's tensors
    go in under unnumbered names (``layer.…``): a plan numbers a stack's layers from 0."""
    from mergesmith.api import merge_state_dicts

    def plain(name: str) -> str:
        return "layer." + name.removeprefix(prefix)

    for stats in grams.values():
        stats.tensors = {f"gram/{plain(k.removeprefix('gram/'))}": v for k, v in stats.tensors.items()}
        stats.counts = {f"gram/{plain(k.removeprefix('gram/'))}": v for k, v in stats.counts.items()}
    recipe = {"merge_method": "regmean", "dtype": "float32", "parameters": {"alpha": alpha},
              "models": [{"model": m, "stats": m, "parameters": {"weight": w}} for m, w in zip(own, weights)]}
    merged = merge_state_dicts(recipe, {m: {plain(k): t for k, t in d.items()} for m, d in own.items()},
                               statistics=grams, device=device, seed=seed)
    return {prefix + name.removeprefix("layer."): t for name, t in merged.items()}


def _card(timings: list[dict[str, float]], data: list[Any]) -> list[str]:
    seconds = [t["seconds"] for t in timings]
    examples = ", ".join(f"`{d.model}` {d.examples}" for d in data)
    return ["## Layer by layer", "",
            f"Merged with RegMean++: each layer's Gram matrices measured on each model's calibration data run "
            f"through the merged layers below it ({examples} examples), from the lowest layer up. "
            f"{len(timings)} layers, {sum(seconds):.1f} s in all ({min(seconds):.2f}–{max(seconds):.2f} s per "
            f"layer).", "", "| layer | seconds | of which measuring |", "|---|---|---|",
            *[f"| {t['layer']} | {t['seconds']:.2f} | {t['measure_seconds']:.2f} |" for t in timings], ""]
