"""``tune:`` on predicted damage. The exact solution for a task-arithmetic or linear merge is checked against a
quadratic fitted in the test to ``predict_damage`` at a grid of weights (the damage of the merged tensors, not
the moments the tuner gathers), the search against its own claims (the best point it reports reproduces as a
plain recipe and is no worse than where it started)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_damage import measured, recipe, weights  # noqa: F401  (measured is a fixture)

from mergesmith.api import merge, predict_damage
from mergesmith.config import parse_recipe
from mergesmith.errors import RecipeError
from mergesmith.tune import tune


def normalised(spec: dict) -> dict[str, float]:
    return {d.model: d.total / d.forgetting for d in predict_damage(spec).damage}


def with_weights(spec: dict, values: list[float], **parameters) -> dict:
    spec = {**spec, "models": [{**m, "parameters": {"weight": w}} for m, w in zip(spec["models"], values)]}
    if parameters:
        spec["parameters"] = parameters
    return spec


def fitted_quadratic(points: list[tuple[float, ...]], values: list[float]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H, g, k) with f(x) = xᵀ H x + gᵀ x + k, by least squares on monomials of degree ≤ 2."""
    x = torch.tensor(points, dtype=torch.float64)
    n = x.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    design = torch.cat([torch.stack([x[:, i] * x[:, j] for i, j in pairs], 1), x, torch.ones(len(x), 1,
                        dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, torch.tensor(values, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    h = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), c in zip(pairs, coef):
        h[i, j] += c / 2
        h[j, i] += c / 2
    return h, coef[len(pairs):len(pairs) + n], float(coef[-1])


def test_task_arithmetic_weights_are_the_minimiser_of_the_fitted_quadratic(measured, tmp_path):  # noqa: F811
    """The sum of normalised damages of θ_0 + λ Σ w_j τ_j is quadratic in w: fit it from nine merges, minimise it
    in closed form (w = −½ H⁻¹ g), and the tuner's one-pass weights must be that minimiser."""
    base = recipe(measured, "task_arithmetic", parameters={"lambda": 0.5})
    grid = list(itertools.product([0.0, 0.8, 1.6], repeat=2))
    sums = [sum(normalised(with_weights(base, list(w), **{"lambda": 0.5})).values()) for w in grid]
    h, g, _ = fitted_quadratic(grid, sums)
    expected = torch.linalg.solve(h, -0.5 * g)
    result = tune(parse_recipe({**base, "tune": {"parameters": ["weight"]}}))
    assert result.values["weight"] == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-4)
    assert "exactly" in result.search and result.evaluations == 1
    plain = result.recipe
    assert plain.tune is None and plain.parameters["lambda"] == 0.5
    reproduced = normalised(plain.model_dump(exclude_none=True))
    assert sum(reproduced.values()) == pytest.approx(result.after, rel=1e-4)
    assert result.per_model == pytest.approx(reproduced, rel=1e-4)
    assert result.before == pytest.approx(sum(normalised(with_weights(base, [1.0, 1.0], **{"lambda": 0.5})).values()),
                                          rel=1e-4)
    assert result.after <= min(sums) + 1e-9


def test_linear_weights_sum_to_one_and_minimise_the_fitted_parabola(measured):  # noqa: F811
    """A normalised linear merge moves along θ_2 + t (θ_1 − θ_2): the objective is a parabola in t."""
    base = recipe(measured, "linear")
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    sums = [sum(normalised(with_weights(base, [t, 1 - t])).values()) for t in ts]
    h, g, _ = fitted_quadratic([(t,) for t in ts], sums)
    t_best = float(-0.5 * g[0] / h[0, 0])
    result = tune(parse_recipe({**base, "tune": {"parameters": ["weight"]}}))
    w = result.values["weight"]
    assert sum(w) == pytest.approx(1.0, abs=1e-9)
    assert w[0] == pytest.approx(t_best, rel=1e-3, abs=1e-4)


def test_max_objective_is_the_minimax_of_the_fitted_quadratics(measured):  # noqa: F811
    """max_i q_i(w): fit each model's quadratic from the same nine merges and take the minimax on a fine grid."""
    base = recipe(measured, "task_arithmetic")
    grid = list(itertools.product([0.0, 0.8, 1.6], repeat=2))
    per_model = [normalised(with_weights(base, list(w))) for w in grid]
    fits = [fitted_quadratic(grid, [p[m] for p in per_model]) for m in per_model[0]]
    axis = torch.linspace(0, 1.6, 321, dtype=torch.float64)
    points = torch.cartesian_prod(axis, axis)
    values = torch.stack([((points @ h) * points).sum(1) + points @ g + k for h, g, k in fits]).amax(0)
    result = tune(parse_recipe({**base, "tune": {"parameters": ["weight"], "objective": "max",
                                                 "bounds": {"weight": [0.0, 1.6]}}}))
    assert result.after <= float(values.min()) + 1e-4
    assert result.after == pytest.approx(max(normalised(result.recipe.model_dump(exclude_none=True)).values()),
                                         rel=1e-4)


def test_search_tunes_ties_density_and_the_plain_recipe_reproduces_it(measured):  # noqa: F811
    """Per-model densities (one coordinate each), and a shared one written once into the global parameters."""
    base = recipe(measured, "ties", parameters={"weight": 1.0, "density": 0.9})
    progress = []
    result = tune(parse_recipe({**base, "tune": {"parameters": ["density"], "trials": 6,
                                                 "bounds": {"density": [0.1, 1.0]}}}),
                  on_progress=lambda done, total, text: progress.append((done, total)))
    densities = result.values["density"]
    assert len(densities) == 2 and all(0.1 <= d <= 1.0 for d in densities)
    assert result.after <= result.before
    assert 1 < result.evaluations <= 6 and progress[-1] == (result.evaluations, 6)
    assert sum(normalised(result.recipe.model_dump(exclude_none=True)).values()) == pytest.approx(result.after,
                                                                                                   rel=1e-6)
    shared = tune(parse_recipe({**base, "tune": {"parameters": ["density", "lambda"], "shared": ["density"],
                                                 "trials": 4}}))
    assert isinstance(shared.values["density"], float) and shared.evaluations <= 4
    plain = shared.recipe
    assert plain.parameters["density"] == shared.values["density"] and plain.parameters["lambda"] == shared.values[
        "lambda"]
    assert all("density" not in (m.parameters or {}) for m in plain.models)


def test_merge_with_tune_writes_the_tuned_recipe_into_the_card(measured, tmp_path):  # noqa: F811
    base = recipe(measured, "task_arithmetic")
    summary = merge({**base, "tune": {"parameters": ["weight"]}}, tmp_path / "tuned")
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert "## Tuned on predicted damage" in card and "tune:" in card
    chosen = summary.tuning.values["weight"]
    plain = with_weights(base, chosen)
    merge(plain, tmp_path / "plain")
    tuned, again = weights(tmp_path / "tuned"), weights(tmp_path / "plain")
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)
    recipe_block = next(b.split("```")[0] for b in card.split("```yaml")[1:] if "merge_method" in b)
    assert "tune:" not in recipe_block and f"{chosen[0]}" in recipe_block


@pytest.mark.parametrize(("tune_block", "message"), [
    ({"parameters": ["wieght"]}, "did you mean 'weight'"),
    ({"parameters": []}, "at least one parameter"),
    ({"parameters": ["weight"], "objective": "mean"}, "must be sum or max"),
    ({"parameters": ["weight"], "bounds": {"density": [0, 1]}}, "not among tune.parameters"),
    ({"parameters": ["weight"], "bounds": {"weight": [1, 0]}}, "low < high"),
    ({"parameters": ["weight"], "shared": ["density"]}, "not among tune.parameters"),
])
def test_a_wrong_tune_block_is_one_line(measured, tune_block, message):  # noqa: F811
    with pytest.raises(RecipeError, match=message):
        parse_recipe({**recipe(measured, "task_arithmetic"), "tune": tune_block})


def test_tune_needs_every_models_statistics(measured):  # noqa: F811
    spec = recipe(measured, "task_arithmetic")
    del spec["models"][1]["stats"]
    with pytest.raises(RecipeError, match=r"models\[1\] .* has no stats"):
        parse_recipe({**spec, "tune": {"parameters": ["weight"]}})


def test_cli_tunes_with_a_summary_line_and_a_dry_run_prints_the_tuned_recipe(measured, tmp_path, write_recipe,  # noqa: F811
                                                                             run_cli):
    path = write_recipe({**recipe(measured, "task_arithmetic"), "tune": {"parameters": ["weight"]}})
    dry = run_cli("merge", path, tmp_path / "out", "--dry-run")
    assert dry.code == 0 and "would choose weight" in dry.stdout, dry.stderr
    dry = run_cli("merge", path, tmp_path / "out", "--dry-run", "--damage")
    assert dry.code == 0, dry.stderr
    assert "tuned:" in dry.stdout and "merge_method: task_arithmetic" in dry.stdout and "predicted damage" in dry.stdout
    assert not (tmp_path / "out").exists()
    done = run_cli("merge", path, tmp_path / "out")
    assert done.code == 0, done.stderr
    assert "tuned" in done.stderr and "sum of the models' normalised predicted damage" in done.stderr


def test_a_misspelt_key_in_the_tune_block_names_the_closest():
    with pytest.raises(RecipeError, match=r"unknown key 'tune.trails' \(did you mean 'trials'"):
        parse_recipe({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a", "stats": "s"}],
                      "tune": {"parameters": ["weight"], "trails": 3}})


def test_a_base_listed_among_the_models_keeps_its_entry(measured):  # noqa: F811
    """mergekit recipes often list the base under models too: the tuned weights go to the fine-tunes by name."""
    spec = recipe(measured, "task_arithmetic")
    alone = tune(parse_recipe({**spec, "tune": {"parameters": ["weight"]}}))
    spec["models"] = [{"model": str(measured["base"])}, *spec["models"]]  # no sidecar needed: it is not merged
    listed = tune(parse_recipe({**spec, "tune": {"parameters": ["weight"]}}))
    assert listed.values["weight"][0] == 1.0  # the base's own (default) weight, untouched
    assert listed.values["weight"][1:] == pytest.approx(alone.values["weight"], rel=1e-9)
