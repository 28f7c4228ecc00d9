"""``tune:``: choose a merge's coefficients by minimising the models' predicted damage (docs/damage.md).

The objective combines each model's normalised predicted damage q_i = ΔL_i / forgetting_i (``sum`` or
``max``; the raw ΔL_i where a model has no forgetting, a recipe without a base). Two ways to minimise it:

- **Exact**, for merges linear in task vectors: task arithmetic (θ = θ_0 + λ Σ_j w_j τ_j) and a normalised
  linear merge (θ = Σ_j ŵ_j θ_j, Σ_j ŵ_j = 1). With c the effective coefficients each ΔL_i is the quadratic
  (c − e_i)ᵀ M_i (c − e_i), M_i[j, k] = ½ τ_jᵀ F_i τ_k (``damage.MomentMeter``, one pass over the inputs). The
  ``sum`` objective's minimiser solves one n × n linear system (with Σ c = 1 for linear: its KKT system); a
  ``max`` objective, or bounds the solution leaves, are minimised by CMA-ES on the quadratics themselves,
  which costs no further pass.
- **Search** for every other method (TIES's density, DARE's, a Fisher merge's λ, ...): CMA-ES (the ``cma``
  package) over the box of the parameters' bounds, each evaluation one merge pass without writing
  (``predict_damage``); ``trials`` caps the evaluations and the best one seen is kept.

The result is a plain recipe with the chosen values written in (``TuneResult.recipe``), which the model card
shows, so the merge reproduces without tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mergesmith.config import Recipe
from mergesmith.errors import UsageError

Progress = Callable[[int, int, str], None]  # (done, total, what is happening)

DEFAULT_BOUNDS = (0.0, 2.0)  # for a parameter whose own interval is unbounded (weight, lambda)
SURROGATE_EVALUATIONS = 4000  # CMA-ES on the closed-form quadratics: microseconds each


OBJECTIVES = {"sum": "sum of the models' normalised predicted damage", "max": "largest normalised predicted damage",
              "loglik": "mean validation log-likelihood", "accuracy": "mean validation accuracy"}


@dataclass
class TuneResult:
    recipe: Recipe  # the plain recipe with the chosen values
    values: dict[str, Any]  # parameter -> one value, or a list with one per model
    objective: str  # sum, max (minimised), loglik, accuracy (maximised)
    before: float | None  # the objective at the recipe's own values (None where they are no plain numbers)
    after: float
    search: str  # how it was found
    evaluations: int  # merge passes made to find it
    per_model: dict[str, float] = field(default_factory=dict)  # each model's damage or score, tuned

    @property
    def on_data(self) -> bool:
        return self.objective in ("loglik", "accuracy")

    def line(self) -> str:
        """One line: the values, the objective before → after, how."""
        before = f"{self.before:.4g} → " if self.before is not None else ""
        return (f"{', '.join(f'{k} = {_rounded(v)}' for k, v in self.values.items())}; {OBJECTIVES[self.objective]} "
                f"{before}{self.after:.4g}, {self.search}")

    def card(self, spec: dict[str, Any]) -> list[str]:
        """The model card's account: what was tuned, how, and the objective before and after."""
        shown = ", ".join(f"`{k}` = {_rounded(v)}" for k, v in self.values.items())
        before = f"{self.before:.4g} at the recipe's own values, " if self.before is not None else ""
        verb = "maximising" if self.on_data else "minimising"
        title = "validation data" if self.on_data else "predicted damage"
        column = "validation " + ("log-likelihood" if self.objective == "loglik" else "accuracy") if self.on_data \
            else "normalised damage"
        lines = [f"## Tuned on {title}", "",
                 f"The recipe below is the tuned one: {shown}. It was chosen by {verb} the "
                 f"{OBJECTIVES[self.objective]} ({before}{self.after:.4g} tuned), {self.search} "
                 f"(docs/damage.md, \"Tuning\"). The `tune:` block it came from:", "", "```yaml",
                 *_yaml(spec).rstrip().splitlines(), "```", "", f"| model | {column}, tuned |", "|---|---|"]
        lines += [f"| `{m}` | {q:.4g} |" for m, q in self.per_model.items()]
        return lines + [""]


def _rounded(value: Any) -> str:
    return f"[{', '.join(f'{v:.4g}' for v in value)}]" if isinstance(value, list) else f"{value:.4g}"


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump({"tune": data}, sort_keys=False)


def objective_value(damages: Sequence[float], objective: str) -> float:
    return max(damages) if objective == "max" else sum(damages)


def normalised_damages(summary_damage: Sequence[Any]) -> dict[str, float]:
    """Each model's damage as a share of its forgetting (its raw damage where it has none)."""
    return {d.model: d.normalised if d.normalised is not None else d.total for d in summary_damage}


def tune(recipe: Recipe, *, device: str = "cpu", seed: int = 0, on_progress: Progress | None = None) -> TuneResult:
    """Choose the values ``recipe.tune`` names (the recipe's ``tune:`` block) and return the plain recipe."""
    spec = recipe.tune
    if spec is None:
        raise UsageError("tune: the recipe has no tune: block")
    plain = recipe.without_tune()
    if spec.data is not None:
        return _tune_search(plain, spec, _on_data(plain, spec, device=device, seed=seed), on_progress=on_progress,
                            what="validation trials (a merge into memory each)")
    form = None if "weight" in (spec.shared or []) else _linear_form(plain, spec.parameters)
    if form is not None:
        return _tune_exact(plain, spec, form, device=device, seed=seed, on_progress=on_progress)
    return _tune_search(plain, spec, _on_damage(spec, device=device, seed=seed), on_progress=on_progress,
                        what="trials (a merge pass without writing each)")


Evaluator = Callable[[Recipe], tuple[float, dict[str, float]]]  # a plain recipe -> (objective, per model)


def _on_damage(spec: Any, *, device: str, seed: int) -> Evaluator:
    """The objective on predicted damage: one merge pass without writing per evaluation."""
    from mergesmith.api import predict_damage

    def evaluate(recipe: Recipe) -> tuple[float, dict[str, float]]:
        damages = normalised_damages(predict_damage(recipe, device=device, seed=seed).damage)
        return objective_value(list(damages.values()), spec.goal), damages

    return evaluate


def _on_data(recipe: Recipe, spec: Any, *, device: str, seed: int) -> Evaluator:
    """The objective on each model's validation data, read and batched once: one merge streamed into a network
    in memory and every model's data scored on it per evaluation."""
    from mergesmith.validation import load_validation

    validation = load_validation(recipe, spec.data, text_field=spec.text_field, label_field=spec.label_field,
                                 examples=spec.examples, batch_size=spec.batch_size, max_length=spec.max_length,
                                 seed=spec.seed, device=device)

    def evaluate(candidate: Recipe) -> tuple[float, dict[str, float]]:
        scores = validation.score(candidate, spec.goal, device=device, seed=seed)
        return sum(scores.values()) / len(scores), scores

    return evaluate


# ---------------------------------------------------------------------------------------------------------
# The exact case: a merge linear in the task vectors


@dataclass(frozen=True)
class _LinearForm:
    constrained: bool  # Σ c = 1 (a normalised linear merge) rather than free coefficients
    scale: float  # task arithmetic's λ when it is kept: weight_j = c_j / λ
    tune_scale: bool  # λ is tuned too: written as 1, the weights carry c


def _scalar(recipe: Recipe, name: str, default: Any) -> Any:
    return (recipe.parameters or {}).get(name, default)


def _linear_form(recipe: Recipe, parameters: Sequence[str]) -> _LinearForm | None:
    """How a recipe's merge is linear in its task vectors with the tuned parameters, or None when it is not."""
    method = recipe.merge_method
    names = set(parameters)
    normalize = _scalar(recipe, "normalize", method == "linear")
    if method == "linear" and names == {"weight"} and normalize is True:
        return _LinearForm(True, 1.0, False)
    if method == "task_arithmetic" and "weight" in names and names <= {"weight", "lambda"} and normalize is False:
        scale = _scalar(recipe, "lambda", 1.0)
        if "lambda" in names or (isinstance(scale, (int, float)) and scale != 0):
            return _LinearForm(False, float(scale) if "lambda" not in names else 1.0, "lambda" in names)
    return None


def _tune_exact(recipe: Recipe, spec: Any, form: _LinearForm, *, device: str, seed: int,
                on_progress: Progress | None) -> TuneResult:
    from mergesmith.api import _plan  # the planner the merge itself uses
    from mergesmith.damage import MomentMeter
    from mergesmith.execute import execute

    plan = _plan(recipe, "")
    models = _merged_models(plan)
    total = len(plan.jobs)
    done = [0]

    def step(job: Any) -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(done[0], total, "the damage quadratics (one pass)")

    summary = execute(plan, lambda name, tensor: None, device=device, seed=seed, on_tensor=step,
                      meter=MomentMeter(models))
    return _solve(recipe, spec, summary.damage, form)


def _merged_models(plan: Any) -> list[str]:
    """The merged models in the order of each job's inputs (the same in every job of a models: recipe)."""
    for job in plan.jobs:
        for out in job.outputs:
            if out.damage is not None:
                order = sorted(zip(out.damage.inputs, out.damage.models))
                return [m for _, m in order]
    raise UsageError("tune: no tensor of the merge has statistics in the models' sidecars; measure them with "
                     "mergesmith measure")


def _quadratics(moments: Sequence[Any]) -> list[tuple[Tensor, int, float]]:
    """(M_i, i, normaliser) per model: q_i(c) = (c − e_i)ᵀ M_i (c − e_i) / normaliser."""
    out = []
    for m in moments:
        if m.total is None:
            raise UsageError(f"tune: {m.model}'s sidecar has curvature for no tensor of the merge; measure "
                             f"fisher or kfac for it")
        forgetting = m.forgetting
        out.append((m.total, m.index, forgetting if forgetting > 0 else 1.0))
    return out


def surrogate(quadratics: Sequence[tuple[Tensor, int, float]], c: Tensor) -> list[float]:
    """Each model's normalised damage at coefficients c."""
    values = []
    for matrix, index, norm in quadratics:
        offset = c.double().clone()
        offset[index] -= 1.0
        values.append(float(offset @ matrix @ offset) / norm)
    return values


def sum_minimiser(quadratics: Sequence[tuple[Tensor, int, float]], constrained: bool) -> Tensor:
    """argmin_c Σ_i q_i(c): H c = b with H = Σ M_i / n_i and b = Σ M_i e_i / n_i (∇ = 2(Hc − b)), or with Σ c = 1
    the KKT system [[2H, 1], [1ᵀ, 0]] [c; μ] = [2b; 1]. Least squares, so that a task vector no model's
    curvature sees (H singular) gets the smallest coefficient that serves."""
    n = quadratics[0][0].shape[0]
    h = sum(matrix / norm for matrix, _, norm in quadratics)
    b = sum(matrix[:, index] / norm for matrix, index, norm in quadratics)
    if not constrained:
        return torch.linalg.lstsq(h, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = 2 * h, 1.0, 1.0
    rhs = torch.cat([2 * b, torch.ones(1, dtype=torch.float64)])
    return torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)[:n]


def _solve(recipe: Recipe, spec: Any, moments: Sequence[Any], form: _LinearForm) -> TuneResult:
    quadratics = _quadratics(moments)
    n = len(quadratics)
    given = (spec.bounds or {}).get("weight")
    bounds = (float(given[0]), float(given[1])) if given is not None else None
    c = sum_minimiser(quadratics, form.constrained) if spec.goal == "sum" else None
    search = "exactly: the minimiser of the sum of the models' quadratics (one pass over the inputs)"

    def to_weights(coefficients: Tensor) -> Tensor:
        return coefficients if form.constrained else coefficients / form.scale

    if c is None or not _within(to_weights(c), bounds):
        start = to_weights(c) if c is not None else torch.full((n,), 1.0 / n if form.constrained else 1.0 / form.scale)

        def coefficients(w: Tensor) -> Tensor:
            return w / w.sum() if form.constrained else w * form.scale

        def value(w: Sequence[float]) -> float:
            weights = torch.tensor(list(w), dtype=torch.float64)
            if form.constrained and abs(float(weights.sum())) < 1e-12:
                return float("inf")
            return objective_value(surrogate(quadratics, coefficients(weights)), spec.goal)

        box = bounds or ((0.0, 1.0) if form.constrained else DEFAULT_BOUNDS)
        weights = _cma_minimise(value, start.clamp(*box), [box] * n, SURROGATE_EVALUATIONS, spec.seed)
        c = coefficients(weights)
        search = (f"by CMA-ES on the models' quadratics ({'max' if spec.goal == 'max' else 'sum within bounds'}; "
                  f"one pass over the inputs)")
    chosen = dict(zip((m.model for m in moments), to_weights(c).tolist()))
    # one value per recipe entry: a base listed among the models (mergekit's habit) keeps its own
    values: dict[str, Any] = {"weight": [chosen.get(m.model, _own_weight(recipe, m)) for m in recipe.models]}
    if form.tune_scale:
        values["lambda"] = 1.0
    before = _recipe_coefficients(recipe, form, [m.model for m in moments])
    damages = surrogate(quadratics, c)
    return TuneResult(recipe.without_tune(values), values, spec.goal,
                      None if before is None else objective_value(surrogate(quadratics, before), spec.goal),
                      objective_value(damages, spec.goal), search, 1,
                      {m.model: q for m, q in zip(moments, damages)})


def _own_weight(recipe: Recipe, entry: Any) -> Any:
    return (entry.parameters or {}).get("weight", (recipe.parameters or {}).get("weight", 1.0))


def _recipe_coefficients(recipe: Recipe, form: _LinearForm, models: Sequence[str]) -> Tensor | None:
    """The coefficients of the recipe's own weights for ``models`` (in that order), where they are plain numbers."""
    entries = {m.model: m for m in recipe.models}
    weights = [_own_weight(recipe, entries[name]) for name in models]
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        return None
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if form.constrained:
        return w / w.sum() if abs(float(w.sum())) > 1e-12 else None
    scale = _scalar(recipe, "lambda", 1.0)
    return w * float(scale) if isinstance(scale, (int, float)) else None


def _within(values: Tensor, bounds: tuple[float, float] | None) -> bool:
    return bounds is None or bool(((values >= bounds[0]) & (values <= bounds[1])).all())


# ---------------------------------------------------------------------------------------------------------
# The search: any other method


def _search_bounds(recipe: Recipe, name: str, spec: Any) -> tuple[float, float]:
    from mergesmith.methods import get_method

    given = (spec.bounds or {}).get(name)
    if given is not None:
        return float(given[0]), float(given[1])
    low, high = get_method(recipe.merge_method).param(name).interval or DEFAULT_BOUNDS
    finite = abs(low) < float("inf") and abs(high) < float("inf")
    return (float(low), float(high)) if finite else DEFAULT_BOUNDS


def _tune_search(recipe: Recipe, spec: Any, evaluator: Evaluator, *, on_progress: Progress | None, what: str
                 ) -> TuneResult:
    """CMA-ES over the box of the tuned parameters' bounds, from the recipe's own values; ``trials`` evaluations
    at most (the start among them), the best one kept. Scores (``loglik``, ``accuracy``) are maximised."""
    from mergesmith.methods import get_method

    method = get_method(recipe.merge_method)
    n = len(recipe.models)
    sign = -1.0 if spec.goal in ("loglik", "accuracy") else 1.0
    layout = [(name, method.param(name).per_model and name not in (spec.shared or [])) for name in spec.parameters]
    box: list[tuple[float, float]] = []
    start: list[float] = []
    for name, per_model in layout:
        low, high = _search_bounds(recipe, name, spec)
        for v in _own_values(recipe, name, method.param(name).default, n if per_model else 1):
            box.append((low, high))
            start.append(min(max(v, low), high) if v is not None else (low + high) / 2)

    def values_of(x: Sequence[float]) -> dict[str, Any]:
        values, at = {}, 0
        for name, per_model in layout:
            kind = method.param(name).kind
            chunk = [kind(round(v)) if kind is int else float(v) for v in x[at:at + (n if per_model else 1)]]
            values[name] = chunk if per_model else chunk[0]
            at += n if per_model else 1
        return values

    def key_of(values: dict[str, Any]) -> tuple:
        return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))

    seen: dict[tuple, tuple[float, dict[str, float]]] = {}
    best: list[Any] = [float("inf"), None]

    def evaluate(x: Sequence[float]) -> float:
        values = values_of(x)
        key = key_of(values)
        if key not in seen:
            objective, per_model = evaluator(recipe.without_tune(values))
            seen[key] = (sign * objective, per_model)
            if seen[key][0] < best[0]:
                best[0], best[1] = seen[key][0], values
            if on_progress is not None:
                on_progress(len(seen), spec.trials, f"best {sign * best[0]:.4g}")
        return seen[key][0]

    before = sign * evaluate(start)
    if spec.trials > 1:
        _cma_minimise(evaluate, torch.tensor(start, dtype=torch.float64), box, spec.trials - 1, spec.seed)
    values = best[1]
    return TuneResult(recipe.without_tune(values), values, spec.goal, before, sign * best[0],
                      f"by CMA-ES over {len(box)} coordinate{'s' * (len(box) > 1)} in {len(seen)} {what}",
                      len(seen), seen[key_of(values)][1])


def _own_values(recipe: Recipe, name: str, default: Any, count: int) -> list[float | None]:
    """The recipe's own plain-number values of a parameter (per model, or one), None where there is none."""
    top = (recipe.parameters or {}).get(name, default)
    if count == 1:
        return [float(top) if isinstance(top, (int, float)) and not isinstance(top, bool) else None]
    out = []
    for m in recipe.models:
        v = (m.parameters or {}).get(name, top)
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
    return out


def _cma_minimise(function: Callable[[Sequence[float]], float], start: Tensor, box: Sequence[tuple[float, float]],
                  evaluations: int, seed: int) -> Tensor:
    """CMA-ES (``cma``) in the unit cube mapped onto ``box``; the best point seen."""
    try:
        import cma
    except ImportError:
        raise UsageError("tune: this search needs the cma package: pip install 'mergesmith[tune]'") from None
    low = torch.tensor([b[0] for b in box], dtype=torch.float64)
    width = torch.tensor([b[1] - b[0] for b in box], dtype=torch.float64)

    def mapped(u: Sequence[float]) -> Tensor:
        return low + width * torch.tensor(list(u), dtype=torch.float64)

    x0 = ((start.double() - low) / width).clamp(0.0, 1.0).tolist()
    options = {"bounds": [[0.0] * len(box), [1.0] * len(box)], "maxfevals": evaluations, "verbose": -9,
               "seed": seed + 1}  # cma reads a seed of 0 as "from the clock"
    strategy = cma.CMAEvolutionStrategy(x0, 0.3, options)
    best, best_value = list(x0), float("inf")
    used = 0
    while not strategy.stop() and used < evaluations:
        candidates = strategy.ask()[: evaluations - used]
        scores = [function(mapped(u).tolist()) for u in candidates]
        used += len(candidates)
        for u, score in zip(candidates, scores):
            if score < best_value:
                best, best_value = list(u), score
        if len(candidates) < strategy.popsize:
            break
        strategy.tell(candidates, scores)
    return mapped(best)
