"""The recipe: a YAML merge description, compatible with mergekit's format for the methods both share.

Parameters may be a scalar, a *gradient* (a list of numbers interpolated over layer depth) or a list of
``{filter, value}`` conditions (the first whose ``filter`` is a substring of the tensor name wins; a
missing filter or ``"*"`` matches everything). Values set on a model (or slice source) take precedence over
the slice's, which take precedence over the recipe's global ``parameters``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from mergesmith.errors import MergeError, did_you_mean

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# mergekit features we recognise but do not implement: an error beats a silently different merge.
UNSUPPORTED = {
    "modules": "multi-module ('modules:') recipes",
    "tokenizer": "tokenizer merging ('tokenizer:')",
    "chat_template": "'chat_template'",
    "residual_weight": "'residual_weight' on slices",
}


def _reject_unsupported(data: Any, where: str) -> Any:
    if isinstance(data, dict):
        for key, what in UNSUPPORTED.items():
            if data.get(key) is not None:
                raise MergeError(f"recipe: {what} at {where}'{key}' is not supported by mergesmith; remove the key")
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] | None = None
    stats: str | None = None  # the model's statistics sidecar (curvature merges)


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None
    stats: str | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _reject_unsupported(data, "slices[].")


class Recipe(_Strict):
    """A validated merge recipe (see the module docstring for parameter settings)."""

    merge_method: str
    base_model: str | None = None
    base_stats: str | None = None  # written in a recipe as base_model: {model: DIR, stats: DIR}
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    heads: str = "merge"  # merge | base | each | a model's path: what happens to the task heads
    head_tensors: list[str] | None = None  # name prefixes of the head tensors (default: HEAD_PREFIXES)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        data = _reject_unsupported(data, "")
        if isinstance(data, dict):
            if isinstance(data.get("models"), list):  # mergekit accepts a bare string for a model entry
                data = {**data, "models": [{"model": m} if isinstance(m, str) else m for m in data["models"]]}
            base = data.get("base_model")
            if isinstance(base, dict):
                unknown = sorted(set(base) - {"model", "stats"})
                if unknown or not isinstance(base.get("model"), str):
                    raise MergeError("recipe: base_model must be a path or {model: DIR, stats: DIR}"
                                     + (f"; unknown key '{unknown[0]}'" if unknown else ""))
                data = {**data, "base_model": base["model"], "base_stats": base.get("stats")}
        return data

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if (self.models is None) == (self.slices is None) or (self.models == [] or self.slices == []):
            raise ValueError("exactly one of 'models' or 'slices' must be given, and it must not be empty")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"'{key}: {value}' is not a dtype{did_you_mean(value, DTYPES)}")
        models = {m.model for m in self.models or []} | {src.model for s in self.slices or [] for src in s.sources}
        if self.heads not in ("merge", "base", "each") and self.heads not in models:
            raise ValueError(f"heads: '{self.heads}' must be merge, base, each, or one of the recipe's models")
        if self.heads == "base" and self.base_model is None:
            raise ValueError("heads: base needs a base_model")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source: union (vocabulary merging) is not supported; use 'base' or a model")
        for where, params in self.parameter_scopes():
            for name, setting in params.items():
                check_setting(setting, f"{where}parameters.{name}")
        return self

    def parameter_scopes(self) -> list[tuple[str, dict[str, Any]]]:
        scopes = [("", self.parameters or {})]
        for i, m in enumerate(self.models or []):
            scopes.append((f"models[{i}].", m.parameters or {}))
        for i, s in enumerate(self.slices or []):
            scopes.append((f"slices[{i}].", s.parameters or {}))
            for j, src in enumerate(s.sources):
                scopes.append((f"slices[{i}].sources[{j}].", src.parameters or {}))
        return scopes

    @property
    def output_dtype(self) -> torch.dtype | None:
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


_SCALARS = (bool, int, float, str)


def check_setting(setting: Any, where: str) -> None:
    """Reject a parameter setting that is not a scalar, a gradient list or a list of {filter, value}."""
    if isinstance(setting, _SCALARS):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(v, _SCALARS) for v in setting):
            return
        for condition in setting:
            if not isinstance(condition, dict):
                raise MergeError(f"recipe: {where}: expected {{filter, value}} conditions, got {condition!r}")
            unknown = set(condition) - {"filter", "value"}
            if unknown:
                key = sorted(unknown)[0]
                raise MergeError(f"recipe: {where}: unknown key '{key}' in a condition"
                                 f"{did_you_mean(key, ['filter', 'value'])}")
            if "value" not in condition:
                raise MergeError(f"recipe: {where}: each condition needs a 'value' (and optionally a 'filter')")
            if condition.get("filter") is not None and not isinstance(condition["filter"], str):
                raise MergeError(f"recipe: {where}: 'filter' must be a string")
            check_setting(condition["value"], where)
        return
    raise MergeError(f"recipe: {where}: expected a number, true/false, a string, a list of numbers (a "
                     f"gradient over layers) or a list of {{filter, value}}, got {setting!r}")


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of a parameter setting for ``tensor_name`` at relative layer depth ``t`` ∈ [0, 1].

    Gradients interpolate linearly between neighbouring list entries at position t·(len−1) (mergekit's
    rule); a list of non-numbers picks entry ⌊t·(len−1)⌋. Returns None when no condition matches.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return setting
    if all(isinstance(v, _SCALARS) for v in setting):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        fraction = scaled - i0
        return (1 - fraction) * setting[i0] + fraction * setting[i1]
    for condition in setting:
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor_name:
            return evaluate_setting(condition["value"], tensor_name, t)
    return None


def resolve(scopes: list[dict[str, Any] | None], tensor_name: str, t: float) -> dict[str, Any]:
    """Resolve every parameter named in ``scopes`` (highest precedence first) for one tensor."""
    values: dict[str, Any] = {}
    for scope in scopes:
        for name, setting in (scope or {}).items():
            if name not in values:
                value = evaluate_setting(setting, tensor_name, t)
                if value is not None:
                    values[name] = value
    return values


def _describe(error: ValidationError, data: Any) -> str:
    errors = error.errors()
    # a misspelt required key shows up twice: as "missing" and as "extra"; the extra one names the typo
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    location = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        owner = _owner_fields(first["loc"][:-1])
        return f"recipe: unknown key '{location}'{did_you_mean(key, owner)}"
    if first["type"] == "missing":
        return f"recipe: missing required key '{location}'"
    message = first["msg"].removeprefix("Value error, ")
    return f"recipe: {location + ': ' if location else ''}{message}"


_SECTION_MODELS: dict[str, type[BaseModel]] = {"models": ModelEntry, "slices": OutputSlice,
                                              "sources": SliceSource}


def _owner_fields(path: tuple) -> list[str]:
    """The valid keys of the recipe section at ``path`` (for suggestions)."""
    owner: type[BaseModel] = Recipe
    for part in path:
        owner = _SECTION_MODELS.get(part, owner) if isinstance(part, str) else owner
    return list(owner.model_fields)


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe given as a dict (or a Recipe); every problem is one MergeError line."""
    if isinstance(data, Recipe):
        return data
    if not isinstance(data, dict):
        raise MergeError("recipe: expected a mapping at the top level (merge_method, models, ...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        cause = e.errors()[0].get("ctx", {}).get("error")
        if isinstance(cause, MergeError):
            raise cause from None
        raise MergeError(_describe(e, data)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MergeError(f"recipe {path} not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise MergeError(f"recipe {path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    try:
        return parse_recipe(data)
    except MergeError as e:
        raise MergeError(f"{path}: {e}") from None
