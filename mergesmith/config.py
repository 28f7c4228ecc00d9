"""The recipe: a YAML merge description, compatible with mergekit's format for the methods both share.

Parameters may be a scalar, a *gradient* (a list of numbers interpolated over layer depth) or a list of
``{filter, value}`` conditions (the first whose ``filter`` is a substring of the tensor name wins; a
missing filter or ``"*"`` matches everything). Values set on a model (or slice source) take precedence over
the slice's, which take precedence over the recipe's global ``parameters``.

Numbers are read as mergekit ends up reading them (docs/recipes.md, "How numbers are read"): YAML 1.1 as
PyYAML reads it, plus the YAML 1.2 floats that YAML 1.1 leaves as strings (``1e-3``, ``5e2``, ``-.5``),
and a quoted number where the method declares a number. Every parameter value is checked against the
method's declaration when the recipe is read, so a wrong type or an out-of-range value is reported with the
recipe's line, before any checkpoint is opened.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from mergesmith.errors import RecipeError, did_you_mean, short
from mergesmith.lazy import lazy_import

torch = lazy_import("torch")

# a recipe's dtype names -> torch's (names, so that reading a recipe does not load torch)
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
          "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# mergekit features we recognise but do not implement: an error beats a silently different merge.
UNSUPPORTED = {
    "modules": "multi-module ('modules:') recipes",
    "tokenizer": "tokenizer merging ('tokenizer:')",
    "chat_template": "'chat_template'",
    "residual_weight": "'residual_weight' on slices",
}


# ---------------------------------------------------------------------------------------------------------
# Numbers

_DIGITS = r"[0-9]+(?:_[0-9]+)*"
_DECIMAL = re.compile(rf"[-+]?(?:{_DIGITS}(?P<point>\.(?:{_DIGITS})?)?|(?P<lead>\.){_DIGITS})"
                      rf"(?P<exponent>[eE][-+]?[0-9]+)?", re.ASCII)


def parse_number(text: str) -> int | float | None:
    """The number a quoted string spells, or None: decimal digits with an optional sign, point, exponent
    and ``_`` between digits (``"0.5"``, ``" 1e-3 "``, ``"1_000"``, ``"-.5"``), surrounding spaces allowed.
    An integer when there is neither a point nor an exponent. This is what mergekit's pydantic validation
    accepts for a float parameter, minus its odd cases (``"1._5"``); ``"inf"`` and ``"nan"`` are not numbers
    here, since no parameter accepts them."""
    text = text.strip()
    match = _DECIMAL.fullmatch(text)
    if match is None:
        return None
    if match["point"] or match["lead"] or match["exponent"]:
        return float(text.replace("_", ""))  # a huge exponent gives inf, which every range refuses
    digits = text.replace("_", "")
    return int(digits) if len(digits) < 400 else float(digits)  # int() refuses > 4300 digits


# YAML 1.2 core-schema floats that YAML 1.1, and so PyYAML, reads as strings: an exponent without a point or
# without a sign (1e-3, 5e2, 1E3, 1.0e3, .5e1) and a signed leading point (-.5, +.5). Every other scalar
# resolves as yaml.safe_load resolves it, mergekit's reader: `1_000` and `+1` are ints, `yes`/`no`/`on`/`off`
# are booleans, `010` is octal 8, `0x10` is 16 and `1:30` is 90 (sexagesimal).
_YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+
                               |[-+]\.[0-9][0-9_]*)$""", re.X)

MAX_DEPTH = 40  # nesting of collections, aliases expanded; a real recipe uses fewer than 10 levels
MAX_VALUES = 100_000  # scalars and collections, aliases expanded (an alias "bomb" stops here)


class _DuplicateKey(ConstructorError):
    pass


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (YAML 1.1, no code execution) with YAML 1.2's exponent floats, duplicate keys as
    errors (PyYAML keeps the last silently), bounded nesting and alias expansion, and every construction
    failure reported as a YAML error with its position. ``positions`` maps the id of each mapping and list
    it builds to the positions of its keys or items, for errors found later (see ``locate``)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: set[str] = set()
        self.positions: dict[int, tuple[Any, dict[Any, Any] | list[Any]]] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise ComposerError(None, None, f"alias *{event.anchor} is used inside its own anchor "
                                    f"(a recursive value)", event.start_mark)
            return super().compose_node(parent, index)
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ComposerError(None, None, f"values nested more than {MAX_DEPTH} levels deep", event.start_mark)
        anchor = event.anchor
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)

    def compose_document(self) -> Any:
        node = super().compose_document()
        values, depth = _expanded_size(node)
        if values > MAX_VALUES:
            raise ComposerError(None, None, f"the document expands to more than {MAX_VALUES} values (through "
                                f"aliases)", node.start_mark)
        if depth > MAX_DEPTH:
            raise ComposerError(None, None, f"values nested more than {MAX_DEPTH} levels deep (through "
                                f"aliases)", node.start_mark)
        return node

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node in self.constructed_objects:
            return super().construct_object(node, deep)
        try:  # a scalar that its (explicit or implicit) tag cannot build: `!!int x`, `2001-13-45`
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise ConstructorError(None, None, f"cannot read {short(node.value)} as {tag} ({e})",
                                   node.start_mark) from None

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: later keys override, rightly
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader reports the unhashable key
                if key in first:
                    raise _DuplicateKey(None, None, f"duplicate key {short(key)} (first on line "
                                        f"{first[key].line + 1}); YAML would keep only the last, remove one",
                                        key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)

    def construct_recipe_map(self, node: Any) -> Iterator[dict]:
        data: dict = {}
        yield data
        data.update(self.construct_mapping(node))
        keys = {}
        for key_node, _ in node.value:
            key = self.constructed_objects.get(key_node)
            try:
                keys[key] = key_node.start_mark  # merged (<<) keys come first, explicit ones override them
            except TypeError:
                pass
        self.positions[id(data)] = (node.start_mark, keys)

    def construct_recipe_seq(self, node: Any) -> Iterator[list]:
        data: list = []
        yield data
        data.extend(self.construct_sequence(node))
        self.positions[id(data)] = (node.start_mark, [item.start_mark for item in node.value])


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
RecipeLoader.add_constructor("tag:yaml.org,2002:map", RecipeLoader.construct_recipe_map)
RecipeLoader.add_constructor("tag:yaml.org,2002:seq", RecipeLoader.construct_recipe_seq)


def _expanded_size(root: Any) -> tuple[int, int]:
    """(values, depth) of a node graph with every alias expanded, without expanding it: post-order over
    the (acyclic) graph, memoised by node, iterative so that chained aliases cannot exhaust the stack."""
    def children(node: Any) -> list[Any]:
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        return []

    memo: dict[int, tuple[int, int]] = {}
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in memo:
            continue
        if ready:
            sizes = [memo[id(c)] for c in children(node)]
            memo[id(node)] = (1 + sum(s[0] for s in sizes), 1 + max((s[1] for s in sizes), default=0))
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children(node) if id(c) not in memo)
    return memo[id(root)]


def _position(mark: Any) -> str:
    return f" line {mark.line + 1}, column {mark.column + 1}"


def load_yaml(text: str, source: str = "<string>") -> tuple[Any, dict[int, Any]]:
    """Parse recipe text with ``RecipeLoader``: the data and the positions of its mappings and lists. A
    syntax error is a RecipeError naming ``source``, the line and the column."""
    loader = None
    try:
        loader = RecipeLoader(text)
        return loader.get_single_data(), loader.positions
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "unreadable"
        if isinstance(e, _DuplicateKey):
            raise RecipeError(f"recipe {source}{_position(mark)}: {problem}") from None
        context = f" ({e.context})" if e.context and e.problem else ""
        hint = "; indent with spaces, YAML does not allow tabs" if "'\\t'" in problem else ""
        raise RecipeError(f"recipe {source}{_position(mark) if mark else ''}: invalid YAML: {problem}{context}"
                          f"{hint}") from None
    except yaml.reader.ReaderError as e:  # a control character
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        character = e.character if isinstance(e.character, int) else ord(e.character)
        raise RecipeError(f"recipe {source} line {line}, column {column}: invalid YAML: character "
                          f"#x{character:04x} is not allowed ({e.reason})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {source}: invalid YAML: {str(e).splitlines()[0]}") from None
    finally:
        if loader is not None:
            loader.dispose()


def locate(data: Any, marks: dict[int, Any], loc: tuple) -> Any:
    """The position of the value at ``loc`` (keys and indices from the top), or of the deepest part of it
    that exists; None when unknown (data built in Python)."""
    found = None
    node = data
    if id(node) in marks:
        found = marks[id(node)][0]
    for part in loc:
        entry = marks.get(id(node))
        if isinstance(node, dict) and isinstance(entry, tuple) and isinstance(entry[1], dict):
            try:
                if part not in node:
                    break
                found = entry[1].get(part, found)
            except TypeError:
                break
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            if isinstance(entry, tuple) and isinstance(entry[1], list):
                found = entry[1][part]
            node = node[part]
        else:
            break
    return found


# ---------------------------------------------------------------------------------------------------------
# The recipe's structure


class _Located(RecipeError):
    """A recipe problem with the keys and indices of where it is, so that the reader can add the line."""

    def __init__(self, message: str, loc: tuple = ()) -> None:
        super().__init__(message)
        self.loc = loc


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _bracketed(loc: tuple) -> str:
    """("slices", 0, "sources", 1) → "slices[0].sources[1]." (empty for the top level)."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return f"{text}." if text else ""


def _reject_unsupported(data: Any, where: str) -> Any:
    if isinstance(data, dict):
        for key, what in UNSUPPORTED.items():
            if data.get(key) is not None:
                place = f" at {where}'{key}'" if where else ""
                message = f"{what}{place} is not supported by mergesmith; remove the key"
                if where:  # inside a section: pydantic adds the section's position
                    raise ValueError(message)
                raise _Located(f"recipe: {message}", (key,))
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] | None = None
    stats: str | None = None  # the model's statistics sidecar (curvature merges)
    data: str | None = None  # calibration data measured at merge time (layer-wise methods: regmean_plusplus)


class CalibrationSpec(_Strict):
    """``calibration:``: how a layer-wise method reads each model's ``data:`` (as ``mergesmith measure``)."""

    examples: int = 128  # per model: a seeded sample of its file
    batch_size: int = 8
    max_length: int = 512
    text_field: str = "text"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> CalibrationSpec:
        for key in ("examples", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise _Located(f"recipe: calibration.{key} must be at least 1, got {getattr(self, key)}",
                               ("calibration", key))
        return self


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


TUNE_OBJECTIVES = ("sum", "max")  # of the models' normalised predicted damage
VALIDATION_OBJECTIVES = ("loglik", "accuracy")  # the mean over models of each one's score on its data


class TuneSpec(_Strict):
    """``tune:``: coefficients the engine chooses by minimising the models' predicted damage (docs/damage.md,
    "Tuning"). ``parameters`` are the method's numeric parameters to choose (one value per model for a
    per-model one such as ``weight``, one for the merge otherwise); ``objective`` combines the models'
    normalised predicted damages; ``bounds`` limit each parameter; ``shared`` names per-model parameters
    to choose as one value for all models; ``trials`` caps a search's evaluations
    (each one merge pass without writing) where the damage is not quadratic in the parameters. With ``data``
    (each model's validation file) the objective is instead each model's mean log-likelihood or accuracy on
    its data, averaged over the models, and every method is searched."""

    @property
    def goal(self) -> str:
        return self.objective or ("loglik" if self.data is not None else "sum")

    parameters: list[str]
    objective: str | None = None  # sum (default) or max of damages; loglik (default) or accuracy with data
    bounds: dict[str, tuple[float, float]] | None = None
    shared: list[str] | None = None  # per-model parameters chosen as one value for every model
    trials: int = 32
    seed: int = 0
    # validation data instead of predicted damage: model (as in models:) -> a data file in measure's format
    data: dict[str, str] | None = None
    text_field: str = "text"
    label_field: str = "label"
    examples: int = 64  # per model: a seeded sample of its file
    batch_size: int = 8
    max_length: int = 512

    @model_validator(mode="after")
    def _check(self) -> TuneSpec:
        if not self.parameters:
            raise _Located("recipe: tune.parameters must name at least one parameter to choose",
                           ("tune", "parameters"))
        if len(set(self.parameters)) != len(self.parameters):
            raise _Located("recipe: tune.parameters names a parameter twice", ("tune", "parameters"))
        allowed = VALIDATION_OBJECTIVES if self.data is not None else TUNE_OBJECTIVES
        if self.objective is not None and self.objective not in allowed:
            other = "" if self.objective not in (*TUNE_OBJECTIVES, *VALIDATION_OBJECTIVES) else (
                " (with data:)" if self.data is None else " (without data:, on predicted damage)")
            raise _Located(f"recipe: tune.objective {short(self.objective)} must be {' or '.join(allowed)}"
                           + (f"; {self.objective} is an objective{other}" if other else
                              did_you_mean(self.objective, allowed)), ("tune", "objective"))
        for key in ("trials", "examples", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise _Located(f"recipe: tune.{key} must be at least 1, got {getattr(self, key)}", ("tune", key))
        for name in self.shared or []:
            if name not in self.parameters:
                raise _Located(f"recipe: tune.shared: {short(name)} is not among tune.parameters {self.parameters}",
                               ("tune", "shared"))
        for name, (low, high) in (self.bounds or {}).items():
            if name not in self.parameters:
                raise _Located(f"recipe: tune.bounds.{short(name)} is not among tune.parameters "
                               f"{self.parameters}", ("tune", "bounds", name))
            if not low < high or not all(abs(v) < float("inf") for v in (low, high)):
                raise _Located(f"recipe: tune.bounds.{name} must be [low, high] with low < high, got "
                               f"[{low}, {high}]", ("tune", "bounds", name))
        return self


class Recipe(_Strict):
    """A validated merge recipe (see the module docstring for parameter settings).

    Every parameter value has been checked against the method's declaration (type, range) and numbers
    given as strings are numbers here: ``density: "0.5"`` reads as 0.5.
    """

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
    tune: TuneSpec | None = None
    calibration: CalibrationSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        data = _reject_unsupported(data, "")
        if isinstance(data, dict):
            if isinstance(data.get("models"), list):  # a bare string for a model entry (mergekit 0.1.5 refuses it)
                data = {**data, "models": [{"model": m} if isinstance(m, str) else m for m in data["models"]]}
            base = data.get("base_model")
            if isinstance(base, dict):
                unknown = sorted((k for k in base if k not in ("model", "stats")), key=str)
                if unknown or not isinstance(base.get("model"), str):
                    raise _Located("recipe: base_model must be a path or {model: DIR, stats: DIR}"
                                   + (f"; unknown key {short(unknown[0])}" if unknown else ""), ("base_model",))
                data = {**data, "base_model": base["model"], "base_stats": base.get("stats")}
        return data

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if (self.models is None) == (self.slices is None) or (self.models == [] or self.slices == []):
            raise _Located("recipe: exactly one of 'models' or 'slices' must be given, and it must not be empty")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise _Located(f"recipe: '{key}: {value[:40]}' is not a dtype{did_you_mean(value, DTYPES)}", (key,))
        models = {m.model for m in self.models or []} | {src.model for s in self.slices or [] for src in s.sources}
        if self.heads not in ("merge", "base", "each") and self.heads not in models:
            raise _Located(f"recipe: heads: {short(self.heads)} must be merge, base, each, or one of the recipe's "
                           f"models", ("heads",))
        if self.heads == "base" and self.base_model is None:
            raise _Located("recipe: heads: base needs a base_model", ("heads",))
        if self.tokenizer_source == "union":
            raise _Located("recipe: tokenizer_source: union (vocabulary merging) is not supported; use 'base' or "
                           "a model", ("tokenizer_source",))
        self._check_parameters()
        if self.tune is not None:
            self._check_tune()
        self._check_calibration()
        return self

    def _check_calibration(self) -> None:
        """Calibration data is for the layer-wise methods, which need it for every model."""
        from mergesmith.methods import get_method

        layerwise = get_method(self.merge_method).layerwise
        entries = self.models or []
        for i, m in enumerate(entries):
            if m.data is not None and not layerwise:
                raise _Located(f"recipe: models[{i}].data is calibration data for a layer-wise merge "
                               f"(regmean_plusplus); {self.merge_method} does not read it (a sidecar goes under "
                               f"stats:, validation data under tune.data)", ("models", i, "data"))
            if m.data is None and layerwise:
                raise _Located(f"recipe: {self.merge_method} measures each model's statistics on the merged "
                               f"model at merge time: models[{i}] ({short(m.model)}) needs data: FILE (its "
                               f"calibration examples, in mergesmith measure's format)", ("models", i))
        if layerwise and self.slices is not None:
            raise _Located(f"recipe: {self.merge_method} works on a models: recipe, not on slices", ("slices",))
        if self.calibration is not None and not layerwise:
            raise _Located(f"recipe: calibration: is for layer-wise merges (regmean_plusplus), not "
                           f"{self.merge_method}", ("calibration",))

    def _check_tune(self) -> None:
        """What tuning needs from the rest of the recipe: numeric parameters of the method, and every model's
        statistics (the objective is their predicted damage)."""
        from mergesmith.methods import get_method

        method = get_method(self.merge_method)
        names = [p.name for p in method.params if p.kind in (float, int)]
        for i, name in enumerate(self.tune.parameters):
            if name not in names:
                raise _Located(f"recipe: tune.parameters: {short(name)} is not a numeric parameter of "
                               f"{self.merge_method} ({', '.join(names) or 'it has none'})"
                               f"{did_you_mean(str(name), names)}", ("tune", "parameters", i))
        if self.slices is not None:
            raise _Located("recipe: tune: works on a models: recipe, not on slices", ("tune",))
        if self.tune.data is not None:
            models = [m.model for m in self.models]
            for given in self.tune.data:
                if given not in models:
                    raise _Located(f"recipe: tune.data: {short(given)} is not one of the recipe's models"
                                   f"{did_you_mean(str(given), models)}", ("tune", "data", given))
            missing = [m for m in models if m not in self.tune.data]
            if missing:
                raise _Located(f"recipe: tune.data has no validation file for {short(missing[0])}; give every model "
                               f"one (model: FILE)", ("tune", "data"))
            return
        for i, m in enumerate(self.models):
            if m.stats is None and m.model != self.base_model:  # a base listed among the models is not merged
                raise _Located(f"recipe: tune: models[{i}] ({short(m.model)}) has no stats; tuning minimises each "
                               f"model's predicted damage, which needs every model's sidecar (mergesmith "
                               f"measure)", ("models", i))

    def without_tune(self, values: dict[str, Any] | None = None) -> Recipe:
        """The plain recipe: no ``tune:`` block, and ``values`` (parameter -> one value, or a list with one per
        model) written into it, per model where the value is a list."""
        data = self.model_dump(exclude_none=True)
        data.pop("tune", None)
        for name, value in (values or {}).items():
            if isinstance(value, list):
                for entry, v in zip(data["models"], value):
                    entry["parameters"] = {**entry.get("parameters", {}), name: v}
                if name in data.get("parameters", {}):
                    del data["parameters"][name]  # the per-model values are the chosen ones
            else:
                data["parameters"] = {**data.get("parameters", {}), name: value}
                for entry in data["models"]:
                    entry.get("parameters", {}).pop(name, None)
        if "base_stats" in data:  # written back the way a recipe states it
            data["base_model"] = {"model": data.pop("base_model"), "stats": data.pop("base_stats")}
        return parse_recipe(data)

    def _check_parameters(self) -> None:
        """Check every parameter setting against the method's declaration, and store each value as the
        method will use it (a quoted number becomes the number, an int for a float parameter a float)."""
        from mergesmith.methods import get_method, method_names

        if self.merge_method not in method_names():
            raise _Located(f"recipe: unknown merge_method {short(self.merge_method)}"
                           f"{did_you_mean(self.merge_method, method_names())}", ("merge_method",))
        method = get_method(self.merge_method)
        for loc, params, per_model in self._parameter_dicts():
            where = f"recipe: {_dotted(loc)}"
            for name in list(params):
                try:
                    method.check_keys([name], where, per_model=per_model)
                except RecipeError as e:
                    raise _Located(str(e), (*loc, name)) from None
                check_setting(params[name], f"{where}.{name}", (*loc, name))
                params[name] = _checked_setting(params[name], method.param(name), where, (*loc, name))

    def parameter_scopes(self) -> list[tuple[str, dict[str, Any]]]:
        """(where, parameters) for every ``parameters`` mapping, global first: where is "", "models[0].",
        "slices[0].", "slices[0].sources[1]."."""
        return [(_bracketed(loc[:-1]), params) for loc, params, _ in self._parameter_dicts()]

    def _parameter_dicts(self) -> list[tuple[tuple, dict[str, Any], bool]]:
        """(position, parameters, per model) for every ``parameters`` mapping, global first."""
        scopes = [(("parameters",), self.parameters or {}, False)]
        for i, m in enumerate(self.models or []):
            scopes.append((("models", i, "parameters"), m.parameters or {}, True))
        for i, s in enumerate(self.slices or []):
            scopes.append((("slices", i, "parameters"), s.parameters or {}, False))
            for j, src in enumerate(s.sources):
                scopes.append((("slices", i, "sources", j, "parameters"), src.parameters or {}, True))
        return scopes

    @property
    def output_dtype(self) -> torch.dtype | None:
        name = self.out_dtype or self.dtype
        return getattr(torch, DTYPES[name]) if name else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


_SCALARS = (bool, int, float, str)


def check_setting(setting: Any, where: str, loc: tuple = ()) -> None:
    """Reject a parameter setting that is not a scalar, a gradient list or a list of {filter, value}."""
    if isinstance(setting, _SCALARS):
        return
    if setting is None:
        raise _Located(f"{where}: has no value", loc)
    if isinstance(setting, dict):
        _check_condition(setting, where, loc)
        return
    if isinstance(setting, list) and setting:
        if all(isinstance(v, _SCALARS) for v in setting):
            return
        for i, condition in enumerate(setting):
            if not isinstance(condition, dict):
                raise _Located(f"{where}: expected {{filter, value}} conditions, got {short(condition)}", (*loc, i))
            _check_condition(condition, where, (*loc, i))
        return
    raise _Located(f"{where}: expected a number, true/false, a string, a list of numbers (a gradient over "
                   f"layers) or a list of {{filter, value}}, got {short(setting)}", loc)


def _check_condition(condition: dict, where: str, loc: tuple) -> None:
    unknown = sorted((k for k in condition if k not in ("filter", "value")), key=str)
    if unknown:
        raise _Located(f"{where}: unknown key {short(unknown[0])} in a condition"
                       f"{did_you_mean(str(unknown[0]), ['filter', 'value'])}", (*loc, unknown[0]))
    if "value" not in condition:
        raise _Located(f"{where}: each condition needs a 'value' (and optionally a 'filter')", loc)
    if condition.get("filter") is not None and not isinstance(condition["filter"], str):
        raise _Located(f"{where}: 'filter' must be a string, got {short(condition['filter'])}", (*loc, "filter"))
    check_setting(condition["value"], where, (*loc, "value"))


def _checked_setting(setting: Any, param: Any, where: str, loc: tuple) -> Any:
    """``setting`` (already shaped by ``check_setting``) with every scalar validated by ``param``. Every value
    a gradient interpolates lies between two of its entries, so checking the entries checks the range."""
    if isinstance(setting, _SCALARS):
        if isinstance(setting, str) and param.numeric and setting not in param.words:
            number = parse_number(setting)  # a quoted number, as mergekit's float() of it
            setting = setting if number is None else number
        try:
            return param.validate(setting, where)
        except RecipeError as e:
            raise _Located(str(e), loc) from None
    if isinstance(setting, dict):
        return {**setting, "value": _checked_setting(setting["value"], param, where, (*loc, "value"))}
    return [_checked_setting(v, param, where, (*loc, i)) for i, v in enumerate(setting)]


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


def _describe(error: ValidationError) -> tuple[str, tuple]:
    errors = error.errors()
    # a misspelt required key shows up twice: as "missing" and as "extra"; the extra one names the typo
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    location = _dotted(loc)
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        owner = _owner_fields(loc[:-1])
        return f"recipe: unknown key '{location}'{did_you_mean(key, owner)}", loc
    if first["type"] == "missing":
        return f"recipe: missing required key '{location}'", loc[:-1]
    message = first["msg"].removeprefix("Value error, ")
    return f"recipe: {location + ': ' if location else ''}{message}", loc


_SECTION_MODELS: dict[str, type[BaseModel]] = {"models": ModelEntry, "slices": OutputSlice,
                                              "sources": SliceSource, "tune": TuneSpec,
                                              "calibration": CalibrationSpec}


def _owner_fields(path: tuple) -> list[str]:
    """The valid keys of the recipe section at ``path`` (for suggestions)."""
    owner: type[BaseModel] = Recipe
    for part in path:
        owner = _SECTION_MODELS.get(part, owner) if isinstance(part, str) else owner
    return list(owner.model_fields)


def _parse(data: Any) -> Recipe:
    """parse_recipe, raising ``_Located`` errors (with the position of the problem in ``data``)."""
    if isinstance(data, Recipe):
        return data
    if data is None:
        raise _Located("recipe: the recipe is empty; it needs at least merge_method and models (or slices)")
    if not isinstance(data, dict):
        raise _Located("recipe: expected a mapping at the top level (merge_method, models, ...), got "
                       f"{short(data)}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        cause = e.errors()[0].get("ctx", {}).get("error")
        if isinstance(cause, _Located):
            raise cause from None
        message, loc = _describe(e)
        raise _Located(message, loc) from None


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe given as a dict (or a Recipe); every problem is one RecipeError line."""
    try:
        return _parse(data)
    except _Located as e:  # a plain RecipeError for the caller (no positions in a dict)
        raise RecipeError(str(e)) from None


def loads_recipe(text: str, source: str = "<string>") -> Recipe:
    """Read a recipe from YAML text; errors name ``source`` and, where known, the line and column."""
    data, marks = load_yaml(text, source)
    try:
        return _parse(data)
    except RecipeError as e:
        mark = locate(data, marks, getattr(e, "loc", ()))
        message = str(e).removeprefix("recipe: ")
        raise RecipeError(f"recipe {source}{_position(mark) if mark else ''}: {message}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (UTF-8 YAML); every problem is one RecipeError line naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        folder = path.parent if path.parent.is_dir() else None
        nearby = {p.stem: p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml")} if folder else {}
        close = difflib.get_close_matches(path.stem, nearby, n=1, cutoff=0.75)  # names, not their common suffix
        raise RecipeError(f"recipe {path} not found" + (f" (did you mean '{nearby[close[0]]}'?)" if close else "")
                          ) from None
    except OSError as e:
        raise RecipeError(f"recipe {path} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); save it as "
                          f"UTF-8") from None
    return loads_recipe(text, str(path))
