"""The library's front door: merge a recipe into a Hugging Face directory, or state dicts in memory."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergesmith.architecture import split_layer_name
from mergesmith.config import Recipe, load_recipe, parse_recipe
from mergesmith.errors import MergeError
from mergesmith.execute import MergeSummary, execute
from mergesmith.io.card import copy_tokenizer, write_config, write_model_card
from mergesmith.io.checkpoint import CheckpointReader, StateDictReader
from mergesmith.io.sidecar import StatsReader
from mergesmith.io.writer import OutputTensor, ShardedWriter, atomic_output_dir, check_output, parse_size
from mergesmith.measure import Statistics
from mergesmith.plan import Job, Plan, build_plan
from mergesmith.statistics import MemoryStats


def _as_recipe(recipe: Recipe | Mapping[str, Any] | str | Path) -> Recipe:
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    return parse_recipe(dict(recipe) if isinstance(recipe, Mapping) else recipe)


def plan_merge(recipe: Recipe | Mapping[str, Any] | str | Path) -> Plan:
    """Validate a recipe against its checkpoints (names, shapes, parameters) without merging."""
    recipe = _as_recipe(recipe)
    return build_plan(recipe, lambda model: CheckpointReader(Path(model), name=model),
                      lambda stats: StatsReader(Path(stats)))


def merge(recipe: Recipe | Mapping[str, Any] | str | Path, output: str | Path, *, device: str = "cpu",
          max_shard_size: str | int = "5GB", overwrite: bool = False, seed: int = 0,
          on_tensor: Callable[[Job], None] | None = None, on_plan: Callable[[Plan], None] | None = None
          ) -> MergeSummary:
    """Merge the checkpoints a recipe names into a Hugging Face directory at ``output``.

    ``recipe`` is a path to a YAML file, a dict, or a Recipe. Model paths are local (relative paths are
    taken from the current directory, as in mergekit). The directory is assembled beside ``output`` and
    renamed into place only once complete.
    """
    recipe = _as_recipe(recipe)
    shard_bytes = parse_size(max_shard_size)
    output = Path(output)
    check_output(output, overwrite)  # before planning: fail fast
    plan = plan_merge(recipe)
    if on_plan is not None:
        on_plan(plan)
    with atomic_output_dir(output, overwrite) as directory:
        outputs = [OutputTensor(out.name, out.shape, out.out_dtype) for job in plan.jobs for out in job.outputs]
        writer = ShardedWriter(directory, outputs, shard_bytes, metadata={"mergesmith_method": plan.method.name})
        try:
            summary = execute(plan, writer.add, device=device, seed=seed, on_tensor=on_tensor)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        _write_sidecar_files(recipe, plan, directory)
        files += _write_kept_heads(plan, directory)
    summary.output, summary.files = str(output), files
    return summary


def _write_sidecar_files(recipe: Recipe, plan: Plan, directory: Path) -> None:
    # config from the reference model, else from the first input that has one (a lone .safetensors has none)
    directories = [getattr(source, "directory", None) for source in [plan.reference, *plan.sources]]
    with_config = [d for d in directories if d is not None and (d / "config.json").exists()]
    reference_dir = with_config[0] if with_config else None
    tokenizer_dir = reference_dir
    if recipe.tokenizer_source not in (None, "base"):
        tokenizer_dir = CheckpointReader(Path(recipe.tokenizer_source)).directory
    stack_layers = _layer_change(plan)
    out_dtype = next((job.out_dtype for job in plan.jobs if job.out_dtype.is_floating_point), None)
    write_config(reference_dir, directory, layers=stack_layers, dtype=out_dtype)
    copy_tokenizer(tokenizer_dir, directory)
    models = sorted({s.name for s in plan.sources} - {recipe.base_model})
    write_model_card(directory, recipe_yaml=recipe.to_yaml(), method=plan.method.name,
                     base_model=recipe.base_model, models=models)


def _write_kept_heads(plan: Plan, directory: Path) -> list[str]:
    """``heads: each``: every model's own head under heads/<model>/ (its tensors, and its config.json so
    the head's label space can be loaded with it; docs/recipes.md shows how)."""
    from safetensors.torch import save_file

    sources = {s.name: s for s in plan.sources}
    written, labels = [], set()
    for model, names in plan.kept_heads.items():
        label = Path(model).name or "model"
        while label in labels:
            label += "_"
        labels.add(label)
        folder = directory / "heads" / label
        folder.mkdir(parents=True)
        save_file({k: sources[model].get(k).contiguous() for k in names}, str(folder / "model.safetensors"),
                  metadata={"format": "pt", "mergesmith_head_of": model})
        config = getattr(sources[model], "directory", None)
        if config is not None and (config / "config.json").exists():
            shutil.copyfile(config / "config.json", folder / "config.json")
        written.append(str(Path("heads") / label / "model.safetensors"))
    return written


def _layer_change(plan: Plan) -> tuple[int, int] | None:
    """(layers in the reference, layers written) for the single layer stack, if there is one."""
    if len(plan.layer_counts) != 1:
        return None
    stack, written = next(iter(plan.layer_counts.items()))
    indices = {p[1] for k in plan.reference.keys() if (p := split_layer_name(k)) and p[0] == stack}
    return (max(indices) + 1, written) if indices else None


def merge_state_dicts(recipe: Recipe | Mapping[str, Any], state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
                      *, statistics: Mapping[str, Mapping[str, torch.Tensor] | Statistics] | None = None,
                      device: str = "cpu", seed: int = 0, compute_dtype: torch.dtype = torch.float32
                      ) -> dict[str, torch.Tensor]:
    """Merge in memory: the recipe's model names are keys of ``state_dicts``, and its ``stats:`` names keys
    of ``statistics`` (each a dict keyed like a sidecar, ``fisher/<param>``, ``gram/<module>``, ..., or the
    ``Statistics`` that ``measure`` returns). For research and tests; ``compute_dtype=torch.float64``
    gives exact references."""
    recipe = _as_recipe(recipe)
    statistics = statistics or {}

    def open_stats(name: str) -> MemoryStats:
        if name not in statistics:
            raise MergeError(f"recipe names statistics '{name}' but none were given for it (have: "
                             f"{', '.join(sorted(statistics)) or 'none'})")
        given = statistics[name]
        if isinstance(given, Statistics):
            return MemoryStats(name, given.tensors, given.counts)
        return MemoryStats(name, given)

    def open_source(model: str) -> StateDictReader:
        if model not in state_dicts:
            raise MergeError(f"recipe names model '{model}' but no state dict was given for it "
                             f"(have: {', '.join(sorted(state_dicts))})")
        return StateDictReader(model, state_dicts[model])

    plan = build_plan(recipe, open_source, open_stats)
    merged: dict[str, torch.Tensor] = {}
    execute(plan, merged.__setitem__, device=device, seed=seed, compute_dtype=compute_dtype, prefetch=1)
    return merged
