"""What ``measure`` leaves out, decided from the model's shapes before anything is allocated.

Two rules, both recorded in the sidecar's ``skipped`` metadata ({module: {"kinds": [...], "reason": "..."}})
so that a merge knows why a statistic is absent (docs/statistics.md, "Bounded statistics"):

- ``exclude``: regular expressions searched (``re.search``) in every module's name. A matching module gets
  no statistic at all: no Gram or K-FAC factors, and no Fisher for the parameters it owns (a parameter is
  owned by the module its name in ``named_parameters`` belongs to; a tied weight goes by its first name).
- the factor budget (``max_factor_size``): no Gram or K-FAC factor may be larger than the budget, in
  float32 bytes, computed from the layer's shape. A byte size (``1GB``), or a multiple of the model's own
  size (``1x``: its parameters as float32, the default), which keeps the sidecar O(model size) and skips
  the vocabulary × vocabulary K-FAC factor of a large-vocabulary LM head. K-FAC's two factors are one
  statistic: when either is over the budget, neither is measured. The Fisher is never over it (it has the
  parameter's own shape).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from mergesmith.errors import MergeError, UsageError, did_you_mean

FLOAT32 = 4
DEFAULT_MAX_FACTOR_SIZE = "1x"


@dataclass(frozen=True)
class FactorBudget:
    """The largest factor allowed: ``size`` bytes, or ``multiple`` × the model's size in float32 bytes."""

    text: str
    size: int | None = None
    multiple: float | None = None

    def limit(self, model_bytes: int) -> int:
        return self.size if self.size is not None else int(self.multiple * model_bytes)

    def describe(self, model_bytes: int) -> str:
        """'--max-factor-size 1x (1.1 MB, the model's size)' or '--max-factor-size 1GB'."""
        if self.multiple is None:
            return f"--max-factor-size {self.text}"
        whose = "the model's size" if self.multiple == 1 else f"{self.multiple:g} × the model's size"
        return f"--max-factor-size {self.text} ({human_bytes(self.limit(model_bytes))}, {whose})"


def parse_factor_budget(value: str | int | float | FactorBudget | None) -> FactorBudget | None:
    """``1GB``, ``500MB``, a number of bytes, ``1x`` / ``0.5x`` (a multiple of the model's size), or None
    (or ``none``) for no budget."""
    if value is None or isinstance(value, FactorBudget):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise UsageError(f"--max-factor-size {value}: give a positive size")
        return FactorBudget(str(value), size=int(value))
    text = str(value).strip()
    if text.lower() == "none":
        return None
    if text.lower().endswith("x"):
        try:
            multiple = float(text[:-1])
        except ValueError:
            multiple = -1.0
        if not multiple > 0 or multiple == float("inf"):
            raise UsageError(f"--max-factor-size {text}: a multiple of the model's size is a positive number "
                             f"followed by x, like 1x or 0.5x")
        return FactorBudget(text, multiple=multiple)
    from mergesmith.io.writer import parse_size

    try:
        return FactorBudget(text, size=parse_size(text))
    except MergeError:
        raise UsageError(f"--max-factor-size {text}: write a size like 1GB or 500MB, a multiple of the model's "
                         f"size like 1x, or none") from None


def compile_excludes(patterns: Iterable[str]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise UsageError(f"--exclude '{pattern}': not a regular expression ({e}); patterns are searched in "
                             f"module names like 'model.layers.0.mlp.down_proj'") from None
    return compiled


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def factor_shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    """The Gram and K-FAC factor shapes of a Linear layer (or GPT-2 Conv1D, weight stored (in, out))."""
    rows, columns = module.weight.shape
    out_features, in_features = (columns, rows) if type(module).__name__ == "Conv1D" else (rows, columns)
    augmented = in_features + (module.bias is not None)
    return {"gram": (in_features, in_features), "kfac_a": (augmented, augmented),
            "kfac_g": (out_features, out_features)}


@dataclass
class Selection:
    """Which layers get which factors, which parameters no Fisher, and what was skipped and why."""

    gram: dict[str, nn.Module] = field(default_factory=dict)
    kfac: dict[str, nn.Module] = field(default_factory=dict)
    no_fisher: set[str] = field(default_factory=set)  # parameter names
    skipped: dict[str, dict] = field(default_factory=dict)  # module -> {"kinds": [...], "reason": "..."}
    over_budget: list[tuple[str, str, str]] = field(default_factory=list)  # (module, kind, what), to warn
    budget: str = ""  # the budget, described

    def skip(self, module: str, kinds: list[str], reason: str) -> None:
        entry = self.skipped.setdefault(module, {"kinds": [], "reason": reason})
        entry["kinds"] = sorted(set(entry["kinds"]) | set(kinds))
        if reason not in entry["reason"]:
            entry["reason"] += f"; {reason}"


def select(model: nn.Module, kinds: tuple[str, ...], layers: dict[str, nn.Module], *,
           exclude: Iterable[str] = (), max_factor_size: str | int | float | FactorBudget | None = None
           ) -> Selection:
    """Apply ``exclude`` and the factor budget to ``model``'s statistics ``kinds`` (``layers``: its Linear
    layers). A pattern that leaves nothing out, or rules that leave a requested kind with nothing to measure,
    are usage errors."""
    patterns = compile_excludes(exclude)
    budget = parse_factor_budget(max_factor_size)
    unique = {id(p): p for p in model.parameters()}
    model_bytes = FLOAT32 * sum(p.numel() for p in unique.values())
    selection = Selection()
    used = [False] * len(patterns)

    def excluded_by(name: str) -> str | None:
        for i, pattern in enumerate(patterns):
            if name and pattern.search(name):
                used[i] = True
                return pattern.pattern
        return None

    if "fisher" in kinds:
        for name, p in model.named_parameters():
            owner = name.rpartition(".")[0]
            pattern = excluded_by(owner) if p.requires_grad else None
            if pattern is not None:
                selection.no_fisher.add(name)
                selection.skip(owner, ["fisher"], f"excluded by --exclude '{pattern}'")
    for name, module in layers.items():
        wanted = [kind for kind in ("gram", "kfac") if kind in kinds]
        if not wanted:
            break
        pattern = excluded_by(name)
        if pattern is not None:
            selection.skip(name, [k for kind in wanted for k in _stored(kind)], f"excluded by --exclude '{pattern}'")
            continue
        shapes = factor_shapes(module)
        for kind in wanted:
            over = [] if budget is None else [
                (factor, shapes[factor]) for factor in _stored(kind)
                if FLOAT32 * shapes[factor][0] * shapes[factor][1] > budget.limit(model_bytes)]
            if not over:
                (selection.gram if kind == "gram" else selection.kfac)[name] = module
                continue
            factor, (rows, columns) = max(over, key=lambda item: item[1][0] * item[1][1])
            what = f"{factor} would be {rows}×{columns} float32 = {human_bytes(FLOAT32 * rows * columns)}"
            selection.budget = budget.describe(model_bytes)
            selection.skip(name, _stored(kind), f"{kind}: {what}, over {selection.budget}")
            selection.over_budget.append((name, kind, what))
    unused = [p.pattern for p, hit in zip(patterns, used) if not hit]
    if unused:
        names = [n.rpartition(".")[0] for n, _ in model.named_parameters()] + list(layers)
        example = next(iter(layers), None) or next(iter(names), "")
        close = did_you_mean(unused[0], {part for name in names for part in (name, name.rpartition(".")[2])})
        raise UsageError(f"--exclude '{unused[0]}' matches no module with statistics to measure"
                         f"{close if 'did you mean' in close else ''} (modules are named like '{example}'; the "
                         f"pattern is searched in each name)")
    for kind in ("gram", "kfac"):
        if kind in kinds and layers and not (selection.gram if kind == "gram" else selection.kfac):
            raise UsageError(f"every Linear layer's {kind} statistics are excluded or over the factor budget: "
                             f"nothing to measure for --kind {kind}; drop it, or loosen --exclude / "
                             f"--max-factor-size")
    if "fisher" in kinds and not any(p.requires_grad and name not in selection.no_fisher
                                     for name, p in model.named_parameters()):
        raise UsageError("every parameter is excluded: nothing to measure for --kind fisher; loosen --exclude")
    return selection


def _stored(kind: str) -> list[str]:
    return ["kfac_a", "kfac_g"] if kind == "kfac" else [kind]


def budget_warning(selection: Selection) -> str | None:
    """One line on what the factor budget skipped, or None."""
    skipped = selection.over_budget
    if not skipped:
        return None
    after = ("the sidecar records it, and a merge gives those weights the method's fallback (raise --max-factor-size "
             "to keep them)")
    if len(skipped) == 1:
        (module, kind, what), = skipped
        return f"'{module}' {kind} not measured: {what}, over {selection.budget}; {after}"
    shown = "; ".join(f"'{module}' {kind} ({what})" for module, kind, what in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"{len(skipped)} statistics not measured, over {selection.budget}: {shown}{more}; {after}"
