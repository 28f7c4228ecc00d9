"""The method registry: each merge method is a pure tensor function plus a declaration of its parameters.

The registry validates names, types, ranges, required and unknown keys before any tensor is touched, so
method functions may assume valid input.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mergesmith.errors import RecipeError, did_you_mean, short

REQUIRED: Any = object()
# |Σ w_i| below this is a zero sum: a weighted average over it is undefined (one threshold for every method)
ZERO_SUM = 1e-12
# a method's check of a combination of bound parameters and inputs: (kwargs, has_base, n_models) → the
# problem in words, or None; run at plan time, before any tensor is read
Validator = Callable[[dict[str, Any], bool, int], "str | None"]
# a method's hyper-parameter grid for n models: {variant label: [recipe parameters, ...]}; every point is
# a complete ``parameters:`` block (per-model parameters given there apply to every model). The quality
# benchmark tunes each variant over its points on validation data (benchmarks/quality).
Tuning = Callable[[int], dict[str, list[dict[str, Any]]]]
TUNING_POINTS = 6  # the most points a variant's grid may have, so that no method is tuned harder than another


@dataclass(frozen=True)
class Param:
    """A method parameter. ``per_model`` parameters take one value per input model.

    A number (``kind`` int or float) lies in ``interval``, closed unless ``open_low``/``open_high`` say that
    a bound itself is refused; an infinite bound is always open, so every number must be finite, and NaN
    lies in no interval. Types are strict: a number is an int or float, never a bool or a string (the
    recipe reader turns a quoted number into the number before it gets here, see
    ``mergesmith.config.parse_number``), and a boolean is True or False, never 1 or "true".
    """

    name: str
    kind: type
    default: Any = REQUIRED
    per_model: bool = False
    interval: tuple[float, float] | None = None  # a number's bounds; closed unless open_low / open_high
    choices: tuple[Any, ...] | None = None
    help: str = ""
    arg: str = ""  # the Python keyword the function receives, when the recipe name is reserved ("lambda")
    words: tuple[str, ...] = ()  # strings a numeric parameter also accepts ("base" for a prior)
    open_low: bool = False  # the lower bound is excluded: tol in (0, 1)
    open_high: bool = False

    @property
    def argument(self) -> str:
        return self.arg or self.name

    @property
    def numeric(self) -> bool:
        return self.kind in (int, float) and self.choices is None

    @property
    def range_text(self) -> str:
        """The accepted values in words: "[0.0, 1.0]", "(0.0, inf)", "an integer in [1, inf)", "true or false"."""
        if self.choices is not None:
            return "one of " + ", ".join(_yaml_word(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        if not self.numeric:
            return "a string"
        low, high = self.interval or (-math.inf, math.inf)
        text = (f"{'(' if self.open_low or low == -math.inf else '['}{_bound(low)}, "
                f"{_bound(high)}{')' if self.open_high or high == math.inf else ']'}")
        text = f"an integer in {text}" if self.kind is int else text
        return text + "".join(f" or '{w}'" for w in self.words)

    def contains(self, number: float) -> bool:
        """Whether ``number`` lies in the interval (NaN never does, nor an infinity)."""
        if not math.isfinite(number):
            return False
        low, high = self.interval or (-math.inf, math.inf)
        above = low < number if self.open_low else low <= number
        below = number < high if self.open_high else number <= high
        return above and below

    def validate(self, value: Any, where: str) -> Any:
        """Coerce ``value`` to this parameter's type or raise a RecipeError naming ``where``."""
        if isinstance(value, str) and value in self.words:
            return value
        if self.choices is not None:
            # compare types too: 1 == True in Python, and a number must not pass as a boolean choice
            if not any(value == c and type(value) is type(c) for c in self.choices):
                options = ", ".join(repr(c) for c in self.choices)
                raise RecipeError(f"{where}: '{self.name}' must be one of {options}, got {short(value)}")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: '{self.name}' must be true or false, got {short(value)}")
            return value
        if self.kind in (int, float):
            number = value
            if isinstance(number, bool) or not isinstance(number, numbers.Real):
                also = "".join(f" or '{w}'" for w in self.words)
                raise RecipeError(f"{where}: '{self.name}' must be a number{also}, got {short(value)}")
            try:
                real = float(number)
            except OverflowError:  # an integer beyond float's range
                real = math.inf if number > 0 else -math.inf
            if not self.contains(real):
                raise RecipeError(f"{where}: '{self.name}' must lie in {self.range_text}, got {short(number)}")
            if self.kind is int:
                if not real.is_integer():
                    raise RecipeError(f"{where}: '{self.name}' must be a whole number, got {short(number)}")
                return int(number)
            return real
        if not isinstance(value, self.kind):
            raise RecipeError(f"{where}: '{self.name}' must be a {self.kind.__name__}, got {short(value)}")
        return value


def _bound(value: float) -> str:
    return "inf" if value == math.inf else "-inf" if value == -math.inf else str(value)


def _yaml_word(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


BasePolicy = Literal["ignored", "required", "optional"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: ``function(base, tensors, **params)`` returns the merged tensor.

    ``base`` is the base model's tensor (``None`` when the method ignores it or none is given) and
    ``tensors`` the other inputs' tensors, all in the compute dtype on one device. Per-model parameters
    arrive as tuples aligned with ``tensors``; random methods also get ``generator``.
    """

    name: str
    function: Callable[..., Any]
    params: tuple[Param, ...]
    base: BasePolicy
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    upcast_inputs: bool = True  # False: only the base (or first input) arrives in the compute dtype
    reference: str = ""
    summary: str = ""
    # statistics a curvature method uses, given its bound parameters: kinds of the sidecar (fisher, gram,
    # kfac_a, kfac_g) plus fisher_norm and fisher_count, supplied by the engine per tensor and model
    needs: Callable[[dict[str, Any]], tuple[str, ...]] | None = None
    validate: Validator | None = None
    reports: bool = False  # the function takes ``report``, a dict it fills with solver diagnostics
    # statistics the base model's sidecar must hold, given the bound parameters (a prior from the base)
    base_needs: Callable[[dict[str, Any]], tuple[str, ...]] | None = None
    tuning: Tuning | None = None  # None: the method takes no part in the quality benchmark
    # tuning variants whose merge takes minutes on a CPU: the benchmark's --quick smoke test leaves them out
    heavy: tuple[str, ...] = ()
    # float32 temporaries the size of the output while merging one tensor, beyond the inputs' float32 copies
    # (plan.py's memory bound): (per input model, fixed). Elementwise methods need about 3; a decomposition
    # holds task vectors, factors and their products.
    work_copies: tuple[int, int] = (0, 3)
    # the function takes ``factors``: per input, (left, right) with left @ right its task vector when every input
    # is an adapter over the base (else None), so that a decomposition can work on the factors
    low_rank: bool = False
    # merged layer by layer on statistics the merge measures itself (mergesmith.layerwise), not tensor by tensor
    layerwise: bool = False

    def grid(self, n_models: int) -> dict[str, list[dict[str, Any]]]:
        """The method's tuning grid for ``n_models`` inputs ({} when it declares none or cannot take that many)."""
        if self.tuning is None or n_models < self.min_models or (self.max_models or n_models) < n_models:
            return {}
        return self.tuning(n_models)

    def check(self, kwargs: dict[str, Any], has_base: bool, n_models: int, where: str) -> None:
        """The method's own check of a combination of parameters and inputs (see ``Validator``)."""
        problem = self.validate(kwargs, has_base, n_models) if self.validate is not None else None
        if problem is not None:
            raise RecipeError(f"{where}: {problem}")

    def call(self, base: Any, tensors: list[Any], kwargs: dict[str, Any], *, generator: Any = None,
             stats: list[dict[str, Any]] | None = None, base_stats: dict[str, Any] | None = None, name: str = "",
             report: dict[str, Any] | None = None, factors: list[Any] | None = None) -> Any:
        """The one way to run the method (the engine's and ``merge_tensors``'): its bound ``kwargs`` plus what
        it declares it takes — a generator when ``random``; the statistics, the tensor's name and, with
        ``reports``, a dict for solver diagnostics when it ``needs`` statistics."""
        kwargs = dict(kwargs)
        if self.low_rank:
            kwargs["factors"] = factors
        if self.random:
            kwargs["generator"] = generator
        if self.needs is not None:
            kwargs.update(stats=[dict(s) for s in stats] if stats is not None else [{} for _ in tensors],
                          base_stats=dict(base_stats or {}), name=name)
            if self.reports:
                kwargs["report"] = report if report is not None else {}
        return self.function(base if self.base != "ignored" else None, list(tensors), **kwargs)

    def statistics(self, kwargs: dict[str, Any]) -> tuple[str, ...]:
        return self.needs(kwargs) if self.needs is not None else ()

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def check_keys(self, keys: Any, where: str, per_model: bool) -> None:
        """Reject keys this method does not know (or knows only at the other scope)."""
        known = {p.name for p in self.params if p.per_model or not per_model}
        global_only = {p.name for p in self.params if not p.per_model}
        for key in keys:
            if per_model and key in global_only:
                raise RecipeError(f"{where}: '{key}' is a global parameter of '{self.name}'; set it under the "
                                  f"recipe's (or slice's) parameters, not a model's")
            if key not in known:
                hint = did_you_mean(str(key), known)
                if per_model and not hint.startswith(" (did you mean"):  # a misspelt global one, on a model?
                    closest = did_you_mean(str(key), global_only)
                    if closest.startswith(" (did you mean"):
                        hint = f"{closest[:-1]} It is a global parameter: set it under the recipe's parameters)"
                raise RecipeError(f"{where}: unknown parameter {short(key)} for method '{self.name}'{hint}")


    def check_inputs(self, has_base: bool, n_models: int, where: str) -> None:
        """Enforce the method's contract on the number of inputs and the presence of a base."""
        if self.base == "required" and not has_base:
            raise RecipeError(f"{where}: method '{self.name}' needs a base_model")
        if n_models < self.min_models:
            raise RecipeError(f"{where}: method '{self.name}' needs at least {self.min_models} model(s) besides "
                              f"the base, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise RecipeError(f"{where}: method '{self.name}' takes at most {self.max_models} model(s) besides "
                              f"the base, got {n_models}")

    def bind(self, shared: dict[str, Any], per_model: list[dict[str, Any]], where: str) -> dict[str, Any]:
        """Validate parameter values, fill defaults, and return the keyword arguments of ``function``.

        ``shared`` holds global values; ``per_model[i]`` the values set for input i (a per-model parameter
        set globally applies to every model, as in mergekit).
        """
        self.check_keys(shared, where, per_model=False)
        for values in per_model:
            self.check_keys(values, where, per_model=True)
        kwargs: dict[str, Any] = {}
        for p in self.params:
            if p.per_model:
                column = []
                for i, values in enumerate(per_model):
                    value = values.get(p.name, shared.get(p.name, p.default))
                    if value is REQUIRED:
                        raise RecipeError(f"{where}: model {i} has no value for required parameter '{p.name}'")
                    column.append(p.validate(value, where))
                kwargs[p.argument] = tuple(column)
            else:
                value = shared.get(p.name, p.default)
                if value is REQUIRED:
                    raise RecipeError(f"{where}: method '{self.name}' needs parameter '{p.name}'")
                kwargs[p.argument] = p.validate(value, where)
        return kwargs


def points(**axes: Any) -> list[dict[str, Any]]:
    """Every combination of the axes' values, as recipe parameter blocks: points(density=[.2, .5], **{"lambda":
    [1.0]}) → [{"density": .2, "lambda": 1.0}, {"density": .5, "lambda": 1.0}]."""
    blocks: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        blocks = [{**block, key: value} for block in blocks for value in values]
    return blocks


def fixed(grid: dict[str, list[dict[str, Any]]]) -> Tuning:
    """A Tuning whose grid does not depend on the number of models."""
    return lambda n_models: grid


_METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, params: list[Param] | tuple[Param, ...] = (), base: BasePolicy = "required",
             min_models: int = 1, max_models: int | None = None, random: bool = False,
             upcast_inputs: bool = True, reference: str = "",
             needs: Callable[[dict[str, Any]], tuple[str, ...]] | None = None,
             validate: Validator | None = None, reports: bool = False,
             base_needs: Callable[[dict[str, Any]], tuple[str, ...]] | None = None,
             tuning: Tuning | None = None, heavy: tuple[str, ...] = (),
             work_copies: tuple[int, int] = (0, 3), low_rank: bool = False, layerwise: bool = False
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that declares a merge method; the docstring's first paragraph is its summary.

    ``upcast_inputs=False`` is for methods that only combine the other inputs with the compute-dtype
    base (or first input) through promoting operations: the engine then skips a float32 copy of each
    input, which saves memory traffic on the elementwise methods. ``tuning`` is the method's grid for the
    quality benchmark (``Tuning``); ``heavy`` names its variants too slow for the benchmark's smoke test;
    ``work_copies`` states the method's temporaries for the engine's memory bound (``MergeMethod``).
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS:
            raise ValueError(f"merge method '{name}' is registered twice")
        # the docstring's first paragraph, on one line (it states the formula)
        summary = " ".join((function.__doc__ or "").strip().split("\n\n")[0].split())
        _METHODS[name] = MergeMethod(name, function, tuple(params), base, min_models, max_models, random,
                                     upcast_inputs, reference, summary, needs, validate, reports, base_needs,
                                     tuning, heavy, work_copies, low_rank, layerwise)
        return function

    return decorate


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; an unknown name is a MergeError suggesting the closest."""
    try:
        return _METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge_method '{name}'{did_you_mean(name, _METHODS)}") from None


def method_names() -> list[str]:
    return sorted(_METHODS)


def merge_tensors(method: str, base: Any, tensors: list[Any], *, model_parameters: list[dict[str, Any]] | None = None,
                  generator: Any = None, stats: list[dict[str, Any]] | None = None,
                  base_stats: dict[str, Any] | None = None, **parameters: Any) -> Any:
    """Merge one tensor in memory: ``merge_tensors("ties", base, [t1, t2], density=0.5, lambda_=...)``.

    Global parameters are keywords (``lambda`` may be passed as ``**{"lambda": 0.7}``); per-model values go
    in ``model_parameters`` (one dict per tensor) or as a global default. Tensors are used as given, so
    pass float32 or float64. Curvature methods take ``stats``, one dict per tensor of this tensor's
    statistics ({"fisher": F} with F its shape, {"gram": G}, {"kfac_a": A, "kfac_g": G}, "fisher_count":
    examples), and ``base_stats`` for the base.
    """
    spec = get_method(method)
    spec.check_inputs(base is not None, len(tensors), f"merge_tensors('{method}')")
    if model_parameters is not None and len(model_parameters) != len(tensors):
        raise RecipeError(f"merge_tensors('{method}'): {len(model_parameters)} model_parameters for "
                          f"{len(tensors)} model tensors; give one dict per tensor")
    kwargs = spec.bind(parameters, model_parameters or [{} for _ in tensors], f"merge_tensors('{method}')")
    spec.check(kwargs, base is not None, len(tensors), f"merge_tensors('{method}')")
    if spec.random and generator is None:
        raise RecipeError(f"method '{method}' is random: pass generator=torch.Generator().manual_seed(...)")
    if spec.needs is not None and stats is not None and len(stats) != len(tensors):
        raise RecipeError(f"merge_tensors('{method}'): {len(stats)} stats for {len(tensors)} tensors; give one "
                          f"dict per tensor")
    return spec.call(base, tensors, kwargs, generator=generator, stats=stats, base_stats=base_stats,
                     name="merge_tensors")


def weights_sum_to_zero(weights: Any) -> bool:
    return abs(sum(weights)) < ZERO_SUM


def nonzero_weight_sum(kwargs: dict[str, Any], has_base: bool, n_models: int) -> str | None:
    """A Validator for methods that divide by Σ w_i (a weighted average, or ``normalize: true``)."""
    if kwargs.get("normalize", True) and weights_sum_to_zero(kwargs["weight"]):
        weights = ", ".join(f"{w:g}" for w in kwargs["weight"])
        return (f"the model weights sum to zero ({weights}), and a weighted average divides by their sum; "
                f"change the weights" + (" or set normalize: false" if "normalize" in kwargs else ""))
    return None
