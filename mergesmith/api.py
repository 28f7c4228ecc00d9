"""The library's front door: merge a recipe into a Hugging Face directory, or state dicts in memory."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergesmith.architecture import split_layer_name
from mergesmith.checks import check_device
from mergesmith.config import Recipe, load_recipe, parse_recipe
from mergesmith.damage import ModelDamage
from mergesmith.errors import MergeWarning, OutputError, RecipeError, UsageError, human_size
from mergesmith.execute import MergeSummary, execute
from mergesmith.io.adapter import AdapterSource, adapter_files, open_model, split_adapter_reference
from mergesmith.io.adapter_writer import CONV1D_MODEL_TYPES, AdapterWriter
from mergesmith.io.card import TOKENIZER_FILES, copy_tokenizer, write_config, write_model_card
from mergesmith.io.checkpoint import CheckpointReader, StateDictReader, TensorSource, contained_file, read_json
from mergesmith.io.sidecar import StatsReader
from mergesmith.io.writer import (
    OutputTensor,
    ShardedWriter,
    atomic_output_dir,
    check_output,
    parse_size,
)
from mergesmith.measure import Statistics
from mergesmith.measure.hf import adapter_head
from mergesmith.methods import get_method
from mergesmith.methods.registry import REQUIRED
from mergesmith.plan import Job, Plan, build_plan
from mergesmith.statistics import MemoryStats
from mergesmith.tune import tune


def _as_recipe(recipe: Recipe | Mapping[str, Any] | str | Path) -> tuple[Recipe, str]:
    """The validated recipe, and how to name it in messages (its file, or "recipe")."""
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe), str(recipe)
    return parse_recipe(dict(recipe) if isinstance(recipe, Mapping) else recipe), ""


def _plan(recipe: Recipe, label: str, damage: bool = True) -> Plan:
    if get_method(recipe.merge_method).layerwise:  # checked as the weighted average that plans its outputs
        from mergesmith.layerwise import planning_recipe

        return _plan(planning_recipe(recipe), label, damage=False)
    try:
        return build_plan(recipe, lambda model: open_model(model, recipe.base_model),
                          lambda stats: StatsReader(Path(stats)), damage=damage)
    except RecipeError as e:
        if not label:
            raise
        raise RecipeError(f"{label}: {e}") from None  # the same error, told which file it is about


def plan_merge(recipe: Recipe | Mapping[str, Any] | str | Path) -> Plan:
    """Validate a recipe against its checkpoints (names, shapes, dtypes, parameters, statistics) from
    headers and sidecar metadata alone, without reading a tensor or merging; ``plan.size()`` says what the
    merge would read, write and hold in memory."""
    return _plan(*_as_recipe(recipe))


def input_paths(recipe: Recipe) -> list[Path]:
    """Every path a recipe reads: models, statistics, the tokenizer source (an output must be none of them)."""
    names = {m.model for m in recipe.models or []} | {m.stats for m in recipe.models or [] if m.stats}
    for out_slice in recipe.slices or []:
        names |= {src.model for src in out_slice.sources} | {src.stats for src in out_slice.sources if src.stats}
    names |= {n for n in (recipe.base_model, recipe.base_stats, recipe.tokenizer_source) if n and n != "base"}
    split = {part for name in names if (found := adapter_files(name)) for part in found if part is not None}
    return [Path(name) for name in sorted((names - {n for n in names if split_adapter_reference(n)}) | split)]


def _protected(recipe: Recipe, label: str) -> list[Path]:
    """What no output may replace: the recipe's inputs and, when it came from a file, that file."""
    return [*input_paths(recipe), *([Path(label)] if label else [])]


def check_merge(recipe: Recipe | Mapping[str, Any] | str | Path, output: str | Path, *,
                overwrite: bool = False, adapter_rank: int | None = None, damage: bool = True) -> Plan:
    """Every check ``merge`` makes before it reads a tensor — the output path, the recipe, the inputs'
    headers and statistics, the config and tokenizer it would copy, an output adapter's base — and the plan
    (``--dry-run``)."""
    recipe, label = _as_recipe(recipe)
    plan = _checked(recipe, label, Path(output), overwrite, damage)[0]
    if adapter_rank is not None:
        _adapter_base(recipe, plan, adapter_rank)
    return plan


def _checked(recipe: Recipe, label: str, output: Path, overwrite: bool, damage: bool = True
             ) -> tuple[Plan, Path | None, Path | None]:
    check_output(output, overwrite, _protected(recipe, label))  # fail fast
    plan = _plan(recipe, label, damage)
    _check_space(output, plan.size().bytes_written)
    return (plan, *_companion_files(recipe, plan))


def _check_space(output: Path, needed: int) -> None:
    """A full disk is found before the merge, not after an hour of it (the writer still reports one that
    fills up meanwhile)."""
    existing = next(p for p in [output.absolute(), *output.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise OutputError(f"output {output}: the merge writes {human_size(needed)} but {existing} has only "
                          f"{human_size(free)} free; free some space or choose another output")


def merge(recipe: Recipe | Mapping[str, Any] | str | Path, output: str | Path, *, device: str = "cpu",
          max_shard_size: str | int = "5GB", overwrite: bool = False, seed: int = 0,
          allow_nonfinite: bool = False, on_tensor: Callable[[Job], None] | None = None,
          on_plan: Callable[[Plan], None] | None = None, on_notice: Callable[[str], None] | None = None,
          adapter_rank: int | None = None, damage: bool = True,
          on_tune: Callable[[int, int, str], None] | None = None) -> MergeSummary:
    """Merge the checkpoints a recipe names into a Hugging Face directory at ``output``.

    ``recipe`` is a path to a YAML file, a dict, or a Recipe. Model paths are local (relative paths are
    taken from the current directory, as in mergekit). Everything that can be checked from the recipe,
    the headers and the sidecars' metadata is checked before the first tensor is read. The directory is
    assembled beside ``output`` and renamed into place only once complete; ``overwrite`` replaces only an
    output a previous merge wrote (docs/recipes.md, "Outputs"). ``on_notice`` hears what the run did on
    the side (leftovers of a killed run removed). ``adapter_rank`` R writes, instead of a full model, a PEFT LoRA
    adapter of rank ≤ R holding the merge's difference from the recipe's base_model (``AdapterWriter``). Where
    models have sidecars, ``damage`` predicts each one's loss increase while merging (``MergeSummary.damage``,
    and a section of the model card; ``mergesmith.damage``). A recipe with a ``tune:`` block is tuned first
    (``mergesmith.tune``; ``on_tune(done, total, text)`` hears the search) and the tuned plain recipe merged.
    """
    recipe, label = _as_recipe(recipe)
    shard_bytes = parse_size(max_shard_size)
    check_device(device)
    output = Path(output)
    if get_method(recipe.merge_method).layerwise:
        if adapter_rank is not None or recipe.tune is not None:
            raise UsageError(f"{recipe.merge_method} merges layer by layer: an adapter output and tune: are not "
                             f"supported with it yet")
        from mergesmith.layerwise import merge_layerwise

        return merge_layerwise(recipe, label, output, device=device, seed=seed, overwrite=overwrite,
                               shard_bytes=shard_bytes, on_plan=on_plan, on_tensor=on_tensor, on_notice=on_notice)
    tuning = None
    if recipe.tune is not None:
        check_output(output, overwrite, _protected(recipe, label))  # before the search, not after it
        spec = recipe.tune.model_dump(exclude_none=True)
        tuning = tune(recipe, device=device, seed=seed, on_progress=on_tune)
        recipe, notes = tuning.recipe, tuning.card(spec)
    else:
        notes = []
    plan, config_dir, tokenizer_dir = _checked(recipe, label, output, overwrite, damage)
    base = _adapter_base(recipe, plan, adapter_rank) if adapter_rank is not None else None
    if on_plan is not None:
        on_plan(plan)
    if base is not None:
        return _merge_to_adapter(recipe, label, plan, base, output, adapter_rank, overwrite=overwrite, device=device,
                                 seed=seed, allow_nonfinite=allow_nonfinite, on_tensor=on_tensor,
                                 on_notice=on_notice, tokenizer_dir=tokenizer_dir, notes=notes, tuning=tuning)
    with atomic_output_dir(output, overwrite, inputs=_protected(recipe, label), log=on_notice) as directory:
        outputs = [OutputTensor(out.name, out.shape, out.out_dtype) for job in plan.jobs for out in job.outputs]
        writer = ShardedWriter(directory, outputs, shard_bytes, metadata={"mergesmith_method": plan.method.name})
        try:
            summary = execute(plan, writer.add, device=device, seed=seed, allow_nonfinite=allow_nonfinite,
                              on_tensor=on_tensor)
            finishing = time.perf_counter()
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        base = recipe.base_model if plan.method.base != "ignored" else None  # an unused base is no base
        files += finish_output(directory, recipe, plan, config_dir, tokenizer_dir, method=plan.method.name,
                               base=base, models=sorted({s.name for s in plan.sources} - {base}),
                               notes=notes + damage_card(summary.damage), seed=seed, device=device,
                               allow_nonfinite=allow_nonfinite)
    summary.output, summary.files, summary.tuning = str(output), files, tuning
    summary.stages.write, summary.stages.finish = writer.write_seconds, time.perf_counter() - finishing
    return summary


def _adapter_base(recipe: Recipe, plan: Plan, rank: int) -> TensorSource:
    """The base an output adapter is the difference from: the recipe's base_model, checked at plan time."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"--rank {rank}: an adapter's rank is a whole number of at least 1")
    if recipe.base_model is None:
        raise UsageError("--output-adapter: the recipe has no base_model, and an adapter is the merge's difference "
                         "from one; add base_model: BASE to the recipe")
    if plan.kept_heads:
        raise UsageError("--output-adapter with heads: each: an adapter holds one model, not a head per model; use "
                         "heads: base or merge")
    return next((s for s in plan.sources if s.name == recipe.base_model), None) or open_model(recipe.base_model)


def _merge_to_adapter(recipe: Recipe, label: str, plan: Plan, base: TensorSource, output: Path, rank: int, *,
                      overwrite: bool, device: str, seed: int, allow_nonfinite: bool,
                      on_tensor: Callable[[Job], None] | None, on_notice: Callable[[str], None] | None,
                      tokenizer_dir: Path | None, notes: list[str], tuning: Any) -> MergeSummary:
    """``merge`` with ``adapter_rank``: every output tensor is computed in float32 and handed to an
    ``AdapterWriter``, which keeps the factors of its difference from ``base``."""
    for job in plan.jobs:  # the delta is taken from the float32 result, before any rounding to the output dtype
        for out in job.outputs:
            if out.out_dtype.is_floating_point:
                out.out_dtype = torch.float32
    config = base.config() if hasattr(base, "config") else None
    architectures = (config or {}).get("architectures") or []
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    task_type = "CAUSAL_LM" if causal else None
    base_path = Path(recipe.base_model).expanduser().absolute()
    with atomic_output_dir(output, overwrite, inputs=_protected(recipe, label), log=on_notice) as directory:
        writer = AdapterWriter(directory, base, rank, str(base_path), recipe.output_dtype, task_type,
                               conv1d=(config or {}).get("model_type") in CONV1D_MODEL_TYPES)
        summary = execute(plan, writer.add, device=device, seed=seed, allow_nonfinite=allow_nonfinite,
                          on_tensor=on_tensor)
        files = writer.close()
        copy_tokenizer(tokenizer_dir, directory)
        models = sorted({s.name for s in plan.sources} - {recipe.base_model})
        options = {"output_adapter": True, "rank": rank}
        write_model_card(directory, recipe_yaml=recipe.to_yaml(), method=plan.method.name,
                         base_model=recipe.base_model, models=models, library_name="peft",
                         reproduce=reproduction(recipe, plan, seed=seed, device=device,
                                                allow_nonfinite=allow_nonfinite, extra=options),
                         notes=notes + adapter_card(writer) + damage_card(summary.damage))
    summary.output, summary.files, summary.tuning = str(output), files, tuning
    summary.bytes_written = (output / files[0]).stat().st_size
    summary.adapter = {"rank": rank, "modules": len(writer.errors), "overall_error": writer.overall_error(),
                       "worst": writer.summary()}
    return summary


def predict_damage(recipe: Recipe | Mapping[str, Any] | str | Path, *, device: str = "cpu", seed: int = 0,
                   allow_nonfinite: bool = False, on_tensor: Callable[[Job], None] | None = None,
                   on_plan: Callable[[Plan], None] | None = None) -> MergeSummary:
    """Every model's predicted damage for a recipe, computed by running the merge without writing anything
    (``merge --dry-run --damage``); the recipe's models need sidecars."""
    recipe, label = _as_recipe(recipe)
    check_device(device)
    plan = _plan(recipe, label)
    if not any(out.damage is not None for job in plan.jobs for out in job.outputs):
        raise UsageError("predicted damage needs statistics: give each model a sidecar in the recipe (models: "
                         "[{model: DIR, stats: STATS_DIR}]; measure one with mergesmith measure)")
    if on_plan is not None:
        on_plan(plan)
    return execute(plan, lambda name, tensor: None, device=device, seed=seed, allow_nonfinite=allow_nonfinite,
                   on_tensor=on_tensor)


def damage_card(damage: list[ModelDamage], worst: int = 5) -> list[str]:
    """The model card's table of predicted damage per model, with each one's worst layers."""
    if not damage:
        return []
    lines = ["## Predicted damage", "",
             "Each model's loss increase predicted from its statistics sidecar, ½ (θ − θ_i)ᵀ F_i (θ − θ_i) summed "
             "over the tensors it has curvature for, and as a share of its *forgetting* ½ τ_iᵀ F_i τ_i (the same "
             "quadratic at the base): 0 keeps the fine-tune, 1 is as bad as the base. A quadratic model of the "
             "loss around each fine-tune, measured on that model's data: a guide to rank merges, not a measured "
             "loss (docs/damage.md).", "",
             "| model | predicted increase | of forgetting | from | worst layers |", "|---|---|---|---|---|"]
    for d in damage:
        share = f"{d.normalised:.3f}" if d.normalised is not None else "—"
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(d.kinds.items()))
        layers = ", ".join(f"`{name}` {value:.3g}" for name, value in d.worst(worst))
        lines.append(f"| `{d.model}` | {d.total:.4g} {d.unit} | {share} | {kinds or 'nothing'} | {layers} |")
    return lines + [""]


def adapter_card(writer: AdapterWriter) -> list[str]:
    """The model card's account of what the rank cut: the error overall and of the worst modules."""
    lines = ["## Adapter", "", f"A PEFT LoRA adapter of rank ≤ {writer.rank} over the base, one module per changed "
             f"matrix ({len(writer.errors)} modules). Load it with `peft.PeftModel.from_pretrained(base, "
             f"directory)`.", "", f"Relative Frobenius error of the merged delta, ‖D − B A‖ / ‖D‖: "
             f"{writer.overall_error():.3e} overall; the worst modules:", "", "| module | rank | error |",
             "|---|---|---|"]
    lines += [f"| `{module}` | {r} | {error:.3e} |" for module, r, error in writer.summary()]
    return lines + [""]


def extract_lora(finetune: str | Path, base: str | Path, output: str | Path, *, rank: int, overwrite: bool = False,
                 dtype: str | None = None, device: str = "cpu",
                 on_tensor: Callable[[Job], None] | None = None) -> MergeSummary:
    """A PEFT LoRA adapter of rank ≤ ``rank`` holding one full fine-tune's difference from its base (what
    mergekit-extract-lora does): the merge θ_0 + 1·(θ − θ_0), written with ``adapter_rank``."""
    recipe: dict[str, Any] = {"merge_method": "task_arithmetic", "base_model": str(base),
                              "models": [{"model": str(finetune), "parameters": {"weight": 1.0}}],
                              "parameters": {"lambda": 1.0}}
    if dtype is not None:
        recipe["dtype"] = dtype
    return merge(recipe, output, overwrite=overwrite, device=device, adapter_rank=rank, on_tensor=on_tensor)


def _head_owner_dir(recipe: Recipe, plan: Plan) -> Path | None:
    """The directory of the model whose head the main checkpoint copies, when a heads policy copies one."""
    owner = recipe.base_model if recipe.heads in ("each", "base") else None if recipe.heads == "merge" else recipe.heads
    if owner is None:
        return None
    source = next((s for s in plan.sources if s.name == owner), None)
    copied = {i.source.name for job in plan.jobs if job.method.name == "passthrough" for i in job.reads}
    if source is None or owner not in copied:
        return None
    return getattr(source, "directory", None)


def _companion_files(recipe: Recipe, plan: Plan) -> tuple[Path | None, Path | None]:
    """Where the output's config.json and tokenizer come from, decided (and any surprise said) at plan time:
    the reference model's (the base, else the first model), else the first input that has one, with a
    warning; ``tokenizer_source`` names a model whose tokenizer must exist."""
    directories = [getattr(source, "directory", None) for source in [plan.reference, *plan.sources]]
    # contained_file: a config or tokenizer linked out of its model's directory is refused here, at plan time
    with_config = [d for d in directories if d is not None and contained_file(d, "config.json")]
    config_dir = with_config[0] if with_config else None
    reference_dir = directories[0]
    head_dir = _head_owner_dir(recipe, plan)
    if head_dir is not None and contained_file(head_dir, "config.json"):
        # the config states the head's label space: it comes with the head the main checkpoint holds (heads: each
        # or base copy the base's even where the method ignores the base, heads: MODEL that model's)
        config_dir = reference_dir = head_dir
    if config_dir is not None and config_dir != reference_dir:
        warnings.warn(MergeWarning(f"'{plan.reference.name}' has no config.json; the output takes "
                                   f"{config_dir / 'config.json'}"), stacklevel=2)
    elif config_dir is None and reference_dir is not None:
        warnings.warn(MergeWarning(f"no model has a config.json; the output holds weights only (add a config.json "
                                   f"to '{plan.reference.name}' to make it loadable by transformers)"), stacklevel=2)
    if recipe.tokenizer_source is None:
        tokenizer_dir = reference_dir
    elif recipe.tokenizer_source == "base":
        base = next((s for s in plan.sources if s.name == recipe.base_model), None)
        tokenizer_dir = getattr(base, "directory", None)
    else:
        tokenizer_dir = CheckpointReader(Path(recipe.tokenizer_source)).directory
    has_tokenizer = tokenizer_dir is not None and any([contained_file(tokenizer_dir, n) for n in TOKENIZER_FILES])
    if recipe.tokenizer_source is not None and not has_tokenizer:
        where = "the base model" if recipe.tokenizer_source == "base" else f"'{recipe.tokenizer_source}'"
        raise RecipeError(f"recipe: tokenizer_source: {recipe.tokenizer_source}, but {where} has no tokenizer files "
                          f"({', '.join(TOKENIZER_FILES[:3])}, ...); name a model that has one, or remove the key")
    if recipe.tokenizer_source is None and not has_tokenizer and reference_dir is not None \
            and not _reads_images(config_dir):
        warnings.warn(MergeWarning(f"'{plan.reference.name}' has no tokenizer files; the output has none (set "
                                   f"tokenizer_source: MODEL to copy another model's)"), stacklevel=2)
    return config_dir, tokenizer_dir


def _reads_images(config_dir: Path | None) -> bool:
    """An image model (an *ForImageClassification architecture) has no tokenizer to miss."""
    config = contained_file(config_dir, "config.json") if config_dir is not None else None
    if config is None:
        return False
    architectures = read_json(config, advice="fix or remove it").get("architectures") or []
    return any(str(a).endswith("ForImageClassification") for a in architectures)


def _output_dtype(plan: Plan) -> Any:
    return next((job.out_dtype for job in plan.jobs if job.out_dtype.is_floating_point), None)


def reproduction(recipe: Recipe, plan: Plan, *, seed: int, device: str, allow_nonfinite: bool,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the model card records to redo this merge bit for bit: the command's options, the versions
    that compute it, and the defaults of every method parameter the recipe leaves unset."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    written = {name for _, params in recipe.parameter_scopes() for name in params}
    defaults = {p.name: p.default for p in plan.method.params if p.name not in written and p.default is not REQUIRED}
    options = {"seed": seed, "device": device, **({"allow_nonfinite": True} if allow_nonfinite else {}),
               **(extra or {})}
    return {"options": options, "defaults": defaults,
            "versions": {p: installed(p) for p in ("mergesmith", "torch", "safetensors")}}


def finish_output(directory: Path, recipe: Recipe, plan: Plan, config_dir: Path | None, tokenizer_dir: Path | None,
                  *, method: str, base: str | None, models: list[str], notes: list[str], seed: int, device: str,
                  allow_nonfinite: bool) -> list[str]:
    """What a full-model output holds besides its shards: the config, the tokenizer, the model card and the
    kept heads (their files are returned)."""
    write_config(config_dir, directory, layers=_layer_change(plan), dtype=_output_dtype(plan))
    copy_tokenizer(tokenizer_dir, directory)
    write_model_card(directory, recipe_yaml=recipe.to_yaml(), method=method, base_model=base, models=models,
                     notes=notes, reproduce=reproduction(recipe, plan, seed=seed, device=device,
                                                         allow_nonfinite=allow_nonfinite))
    return _write_kept_heads(plan, directory)


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
        config = contained_file(config, "config.json") if config is not None else None
        if config is not None and isinstance(sources[model], AdapterSource):
            # an adapter's head (modules_to_save) may have another size than the base's config says
            data = read_json(config, advice="fix or remove it")
            data = {**data, **adapter_head(sources[model], data)} if isinstance(data, dict) else data
            (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        elif config is not None:
            shutil.copyfile(config, folder / "config.json")
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
    recipe, _ = _as_recipe(recipe)
    statistics = statistics or {}

    def open_stats(name: str) -> MemoryStats:
        if name not in statistics:
            raise RecipeError(f"recipe names statistics '{name}' but none were given for it (have: "
                              f"{', '.join(sorted(statistics)) or 'none'})")
        given = statistics[name]
        if isinstance(given, Statistics):
            return MemoryStats(name, given.tensors, given.counts)
        return MemoryStats(name, given)

    def open_source(model: str) -> StateDictReader:
        if model not in state_dicts:
            raise RecipeError(f"recipe names model '{model}' but no state dict was given for it "
                              f"(have: {', '.join(sorted(state_dicts))})")
        return StateDictReader(model, state_dicts[model])

    plan = build_plan(recipe, open_source, open_stats)
    merged: dict[str, torch.Tensor] = {}
    execute(plan, merged.__setitem__, device=device, seed=seed, compute_dtype=compute_dtype, prefetch=1)
    return merged
