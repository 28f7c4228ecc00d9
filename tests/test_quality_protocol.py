"""The quality benchmark's pieces, each against an independent computation: the method rows come from the
registry, every grid point is a valid recipe, the linear probe is optimal, a head is applied as x Wᵀ + b,
and the report's normalised averages and ordering verdicts are the formulas' numbers."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from mergesmith.methods import registry
from mergesmith.methods.registry import TUNING_POINTS, MergeMethod, Param, get_method, method_names
from mergesmith.quality import protocol, report


def test_every_method_that_can_merge_six_models_is_a_row():
    labels = [row.label for row in protocol.variants(6)]
    assert len(labels) == len(set(labels))
    for name in method_names():
        method = get_method(name)
        fits = method.min_models <= 6 <= (method.max_models or 6)
        assert fits == any(row.method == name for row in protocol.variants(6)), name
        if fits:  # a method that can take part declares its grid: no method is left out silently
            assert method.tuning is not None, f"{name} can merge 6 models but declares no tuning grid"
    for required in ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "model_stock", "fisher",
                     "regmean", "mats[fisher]", "mats[gram]", "mats[kfac]", "gradient_matching"):
        assert required in labels


def test_the_smoke_test_leaves_out_only_the_heavy_variants():
    full = {row.label for row in protocol.variants(6)}
    quick = {row.label for row in protocol.variants(6, quick=True)}
    heavy = {label for name in method_names() for label in get_method(name).heavy}
    assert heavy and heavy <= full  # a heavy label must name a real variant
    assert quick == full - heavy
    assert all(len(row.grid) == 1 for row in protocol.variants(6, quick=True))


def test_a_method_registered_later_gets_its_row(monkeypatch):
    def scaled_average(base, tensors, *, scale):
        return scale * sum(tensors) / len(tensors)

    method = MergeMethod("test_scaled_average", scaled_average, (Param("scale", float, 1.0),), "ignored",
                         tuning=registry.fixed({"test_scaled_average": registry.points(scale=[0.5, 1.0])}))
    monkeypatch.setitem(registry._METHODS, method.name, method)
    rows = {row.label: row for row in protocol.variants(4)}
    assert rows["test_scaled_average"].grid == [{"scale": 0.5}, {"scale": 1.0}]
    assert protocol.variants(4, quick=True)[[r.label for r in protocol.variants(4, quick=True)].index(
        "test_scaled_average")].grid == [{"scale": 1.0}]  # quick: the middle point


@pytest.mark.parametrize("n_models", [3, 6])
def test_every_grid_point_is_a_valid_recipe(n_models):
    for row in protocol.variants(n_models):
        method = get_method(row.method)
        assert 1 <= len(row.grid) <= TUNING_POINTS
        assert len({repr(sorted(p.items())) for p in row.grid}) == len(row.grid), f"{row.label}: repeated points"
        for point in row.grid:
            where = f"{row.label} {point}"
            kwargs = method.bind(point, [{} for _ in range(n_models)], where)
            method.check(kwargs, True, n_models, where)


def test_points_is_the_cartesian_product():
    grid = registry.points(a=[1, 2], b=["x", "y", "z"])
    assert grid == [{"a": a, "b": b} for a in (1, 2) for b in ("x", "y", "z")]


def test_linear_probe_reaches_the_optimum_of_its_objective():
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    labels = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    head = protocol.linear_probe(x, labels, 3, weight_decay=1e-3)
    head = protocol.Head(head.weight.double(), head.bias.double())
    x = x.double()
    weight = head.weight.clone().requires_grad_(True)
    bias = head.bias.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, labels) + 1e-3 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-5  # stationary: the convex optimum
    # and it classifies far above the majority class (about 60 %)
    accuracy = float(((x @ head.weight.T + head.bias).argmax(-1) == labels).float().mean())
    assert accuracy > 0.8


def test_a_head_replaces_the_classifier_output():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=50, num_labels=2)).eval()
    batch = {"input_ids": torch.randint(0, 50, (4, 7))}
    pooled = torch.tanh(model.bert.pooler.dense(model.bert(**batch).last_hidden_state[:, 0]))
    head = protocol.Head(torch.randn(5, 16), torch.randn(5))
    with torch.no_grad(), protocol.head_on(model, head):
        logits = model(**batch).logits
    torch.testing.assert_close(logits, pooled @ head.weight.T + head.bias)
    assert model(**batch).logits.shape == (4, 2)  # the hook is gone afterwards


def _results(scores: dict[str, list[dict[str, float]]], tasks=("a", "b")) -> dict:
    """A results dict with the given per-seed test accuracies."""
    seeds = len(scores["individual"])
    per_seed = [{"test": {row: values[s] for row, values in scores.items()},
                 "merge_seconds": {row: 1.0 for row in scores if row not in report.REFERENCES},
                 "chosen": {row: {} for row in scores}} for s in range(seeds)]
    rows = [{"label": row, "method": row, "grid": [{}], "data_aware": row in ("regmean", "fisher")}
            for row in scores if row not in report.REFERENCES]
    return {"suite": "t", "quick": False, "seeds": list(range(seeds)), "tasks": list(tasks), "per_seed": per_seed,
            "rows": rows,
            "classes": {t: 2 for t in tasks}, "model": "m", "command": "c", "machine": "x", "wall_seconds": 1.0,
            "seconds": {"fine_tune": 0, "multitask": 0, "measure": 0, "merge_and_score": 0}}


def test_normalised_accuracy_is_the_mean_of_ratios_to_each_own_fine_tune():
    individual = [{"a": 0.8, "b": 0.5}, {"a": 1.0, "b": 0.4}]
    merged = [{"a": 0.6, "b": 0.5}, {"a": 0.9, "b": 0.2}]
    results = _results({"start": merged, "individual": individual, "multitask": individual, "linear": merged})
    stats = report.row_stats(results, "linear")
    per_seed = [100 * ((0.6 / 0.8) + (0.5 / 0.5)) / 2, 100 * ((0.9 / 1.0) + (0.2 / 0.4)) / 2]
    assert math.isclose(stats["normalised"], sum(per_seed) / 2)
    assert math.isclose(stats["normalised_spread"], statistics.stdev(per_seed))
    assert math.isclose(stats["absolute"], 100 * (0.55 + 0.55) / 2)
    assert math.isclose(stats["per_task"]["b"], 100 * (1.0 + 0.5) / 2)


def test_the_reading_states_which_steps_of_the_literature_order_held():
    def row(value):
        return [{"a": value, "b": value}]

    results = _results({"start": row(0.3), "individual": row(0.9), "multitask": row(0.85), "linear": row(0.5),
                        "task_arithmetic": row(0.6), "fisher": row(0.55), "ties": row(0.7), "regmean": row(0.8)})
    lines = report.reading(results)
    assert "did not hold (1 of 6 steps)" in lines[0]  # Fisher 55 is below task arithmetic 60
    assert "task_arithmetic 60.0 > fisher 55.0" in lines[0]
    assert "best data-aware regmean" in lines[1] and "yes" in lines[1]
    # regmean is 0.8/0.9 normalised, ties 0.7/0.9, multitask 0.85/0.9: +11.1 above TIES, 5.6 below multitask
    assert "not met" in lines[2] and "+11.1 points from TIES and 5.6 below multitask" in lines[2]


def test_the_markdown_and_charts_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    individual = [{"a": 0.9, "b": 0.8}]
    results = _results({"start": [{"a": 0.5, "b": 0.5}], "individual": individual, "multitask": individual,
                        "linear": [{"a": 0.7, "b": 0.6}], "regmean": [{"a": 0.8, "b": 0.7}]})
    files = report.write(results, tmp_path)
    assert [f.name for f in files] == ["t.json", "t.md", "t.png", "t-time.png"]
    assert all(f.stat().st_size > 0 for f in files)
    text = (tmp_path / "t.md").read_text()
    assert f"| regmean | data-aware | 1 | {100 * (0.8 / 0.9 + 0.7 / 0.8) / 2:.1f} ± 0.0 |" in text


def test_a_random_head_is_centred_on_the_start_and_has_the_set_spread():
    torch.manual_seed(0)
    x = torch.randn(300, 7) * 3 + 5
    head = protocol.random_head(x, 4, torch.Generator().manual_seed(1))
    logits = x.double() @ head.weight.double().T + head.bias.double()
    assert logits.mean(0).abs().max() < 1e-4  # every class's logit averages zero over the start's features
    assert abs(float(logits.std()) - protocol.RANDOM_HEAD_SPREAD) < 1e-4
    directions = head.weight.double() / head.weight.double().norm(dim=1, keepdim=True)
    assert torch.allclose(head.weight.double().norm(dim=1), head.weight.double().norm(dim=1)[:1].expand(4))
    assert directions.shape == (4, 7)
    again = protocol.random_head(x, 4, torch.Generator().manual_seed(1))
    assert torch.equal(again.weight, head.weight)  # seeded: a kept fine-tune's head can be recreated


def test_a_suite_chooses_its_heads():
    import types

    bad = types.SimpleNamespace(NAME="toy", HEADS="zero-shot")
    with pytest.raises(ValueError, match="HEADS is 'zero-shot'"):
        protocol.make_heads(bad, None, [], 0)


def _with_protocol_fields(results: dict) -> dict:
    for seed in results["per_seed"]:
        for key in ("val", "val_grid", "solver", "warnings"):
            seed[key] = {row["label"]: ([0.5] if key == "val_grid" else 0.5 if key == "val" else {})
                         for row in results["rows"]}
    results["settings"] = {"heads": "random"}
    return results


def test_rows_added_later_replace_or_join_the_earlier_ones():
    from mergesmith.errors import UsageError
    from mergesmith.quality import combine

    reference = {"start": [{"a": 0.5, "b": 0.5}] * 2, "individual": [{"a": 0.9, "b": 0.8}] * 2,
                 "multitask": [{"a": 0.8, "b": 0.8}] * 2}
    earlier = _with_protocol_fields(_results({**reference, "linear": [{"a": 0.6, "b": 0.6}] * 2,
                                              "ties": [{"a": 0.7, "b": 0.6}] * 2}))
    added = _with_protocol_fields(_results({**reference, "ties": [{"a": 0.75, "b": 0.65}, {"a": 0.7, "b": 0.6}],
                                            "tsv": [{"a": 0.8, "b": 0.7}] * 2}))
    added["seconds"]["merge_and_score"], added["command"] = 60.0, "run --methods ties tsv"
    combined = combine(earlier, added)
    assert [r["label"] for r in combined["rows"]] == ["linear", "ties", "tsv"]
    assert combined["per_seed"][1]["test"]["tsv"] == {"a": 0.8, "b": 0.7}
    assert combined["per_seed"][0]["test"]["ties"] == {"a": 0.75, "b": 0.65}
    assert combined["per_seed"][1]["test"]["linear"] == {"a": 0.6, "b": 0.6}  # not rerun, kept
    assert combined["seconds"]["merge_and_score"] == 60.0 and combined["additions"][0]["rows"] == ["ties", "tsv"]
    assert earlier["per_seed"][0]["test"]["ties"] == {"a": 0.7, "b": 0.6}  # the earlier results are not changed
    assert "tsv" in report.markdown(combined)  # a complete table

    other_models = copy.deepcopy(added)
    other_models["per_seed"][1]["test"]["individual"] = {"a": 0.91, "b": 0.8}
    with pytest.raises(UsageError, match="seed 1: the individual accuracies differ"):
        combine(earlier, other_models)
    one_seed = copy.deepcopy(added)
    one_seed["seeds"], one_seed["per_seed"] = [1], one_seed["per_seed"][1:]
    with pytest.raises(UsageError, match="same seeds"):
        combine(earlier, one_seed)


def test_seeds_added_later_join_the_earlier_ones():
    """Seed 1 run on its own and appended: the table is the mean over both seeds, computed here by hand."""
    from mergesmith.errors import UsageError
    from mergesmith.quality import combine_seeds

    seed0 = {"start": [{"a": 0.5, "b": 0.5}], "individual": [{"a": 0.9, "b": 0.8}],
             "multitask": [{"a": 0.8, "b": 0.8}], "ties": [{"a": 0.6, "b": 0.4}]}
    seed1 = {"start": [{"a": 0.4, "b": 0.5}], "individual": [{"a": 0.8, "b": 1.0}],
             "multitask": [{"a": 0.8, "b": 0.9}], "ties": [{"a": 0.4, "b": 0.5}]}
    earlier, added = _with_protocol_fields(_results(seed0)), _with_protocol_fields(_results(seed1))
    added["seeds"], added["wall_seconds"] = [1], 5.0
    combined = combine_seeds(earlier, added)
    assert combined["seeds"] == [0, 1] and combined["wall_seconds"] == 6.0
    expected = 100 * ((0.6 / 0.9 + 0.4 / 0.8) / 2 + (0.4 / 0.8 + 0.5 / 1.0) / 2) / 2
    assert math.isclose(report.row_stats(combined, "ties")["normalised"], expected)
    assert len(earlier["per_seed"]) == 1  # the earlier results are not changed
    assert "Seed 1 was added by `c`" in report.markdown(combined)  # the report says which run added it
    with pytest.raises(UsageError, match=r"seed\(s\) \[1\] are in the earlier results"):
        combine_seeds(combined, added)
    other_rows = _with_protocol_fields(_results({**seed1, "tsv": seed1["ties"]}))
    other_rows["seeds"] = [2]
    with pytest.raises(UsageError, match="other rows"):
        combine_seeds(earlier, other_rows)


def test_only_the_named_methods_or_rows_are_run():
    from mergesmith.errors import UsageError
    from mergesmith.quality import select

    rows = protocol.variants(6)
    assert {r.label for r in select(rows, ["mats"])} == {"mats[fisher]", "mats[gram]", "mats[kfac]",
                                                        "mats[fisher-normalized]", "mats[kfac-normalized]"}
    assert [r.label for r in select(rows, ["mats[kfac]", "ties"])] == [
        r.label for r in rows if r.label in ("mats[kfac]", "ties")]
    with pytest.raises(UsageError, match="'tsvv'"):
        select(rows, ["tsvv"])


def test_a_lora_suite_trains_only_the_factors_and_keeps_its_frozen_head_in_the_adapter(tmp_path):
    """A suite's LORA: the fine-tune is a PEFT adapter whose LoRA factors alone train, its head frozen, equal to
    the task's head and saved in the adapter; scored as base + adapter; a merge of such adapters keeps each head."""
    import types

    pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification

    import mergesmith
    from mergesmith.quality.tasks import Task

    torch.manual_seed(0)
    base = tmp_path / "start"
    BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=32, vocab_size=50, num_labels=2)).save_pretrained(base)
    suite = types.SimpleNamespace(NAME="toy-lora", LORA={"r": 2, "lora_alpha": 4, "target_modules": [
        "query", "key", "value", "dense"]}, inputs=lambda batch: {"input_ids": torch.tensor([e["ids"] for e in batch])})
    examples = [{"ids": [int(i) for i in torch.randint(0, 50, (5,))], "label": i % 3} for i in range(12)]
    adapters, heads = {}, {}
    for seed, name in enumerate(("a", "b")):
        task = Task(name, ("x", "y", "z"), examples, examples, examples)
        heads[name] = protocol.Head(torch.randn(3, 16), torch.randn(3))
        model = protocol.lora_model(suite, protocol.load(base, num_labels=3, ignore_mismatched_sizes=True),
                                    heads[name], seed)
        protocol.train_body(model, suite, [task], heads, steps=3, lr=1e-2, batch_size=4, weight_decay=0.0, seed=seed)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
        assert any(".lora_B." in n and bool(p.detach().abs().sum() > 0) for n, p in model.named_parameters())
        adapters[name] = tmp_path / f"ft-{name}"
        protocol.save_adapter(model, base, adapters[name])
        saved = load_file(str(adapters[name] / "adapter_model.safetensors"))
        for key, value in heads[name].tensors().items():
            assert torch.equal(saved[f"base_model.model.{key}"], value)
        batch = suite.inputs(examples[:4])
        with torch.no_grad():
            expected = model.eval()(**batch).logits
            scored = protocol.load_fine_tune(suite, adapters[name], base, 3)
            torch.testing.assert_close(scored(**batch).logits, expected)
        assert torch.equal(scored.classifier.weight, heads[name].weight)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 0.5},
              "models": [{"model": str(path)} for path in adapters.values()], "heads": "each", "dtype": "float32"}
    mergesmith.merge(recipe, tmp_path / "merged")
    protocol._merged_model(tmp_path / "merged", adapters, heads)  # raises if a kept head is not the task's


# ---- predicted damage against measured loss, and the rows tuned on it ------------------------------------

def _brute_ranks(values):
    """Rank i = 1 + #{values below it} + (#{values equal to it, itself included} − 1) / 2."""
    return [1 + sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2 for x in values]


@pytest.mark.parametrize("seed", range(5))
def test_spearman_is_pearson_of_average_ranks(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 6, (25,), generator=generator).tolist()  # many ties
    y = (torch.randint(0, 4, (25,), generator=generator) + torch.tensor(x) // 2).tolist()
    assert report.ranks(x) == _brute_ranks(x)
    assert math.isclose(report.spearman(x, y), statistics.correlation(_brute_ranks(x), _brute_ranks(y)),
                        abs_tol=1e-12)


def test_spearman_edges():
    assert report.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert math.isclose(report.spearman([1, 2, 3, 4], [10, 20, 30, 1000]), 1.0)  # monotone, not linear
    assert math.isclose(report.spearman([1, 2, 3], [3, 2, 1]), -1.0)
    assert math.isnan(report.spearman([1, 2, 3], [5, 5, 5]))  # a constant side ranks nothing
    assert math.isnan(report.spearman([1], [2]))
    with pytest.raises(ValueError, match="3 x values against 2 y values"):
        report.spearman([1, 2, 3], [1, 2])


def _with_damage(results: dict, damage: dict[str, list[dict[str, float]]]) -> dict:
    for s, seed in enumerate(results["per_seed"]):
        seed["damage"] = {row: values[s] for row, values in damage.items()}
    return results


def test_the_damage_correlations_are_spearman_over_the_points_within_groups_and_over_rows():
    individual = [{"a": 0.8, "b": 0.5}, {"a": 1.0, "b": 0.4}]
    scores = {"start": individual, "individual": individual, "multitask": individual,
              "linear": [{"a": 0.6, "b": 0.5}, {"a": 0.9, "b": 0.2}],
              "ties": [{"a": 0.4, "b": 0.45}, {"a": 0.7, "b": 0.3}],
              "regmean": [{"a": 0.7, "b": 0.4}, {"a": 0.8, "b": 0.4}]}
    damage = {"linear": [{"a": 0.3, "b": 0.1}, {"a": 0.2, "b": 0.9}],
              "ties": [{"a": 0.9, "b": 0.2}, {"a": 0.5, "b": 0.5}],
              "regmean": [{"a": 0.4, "b": None}, {"a": 0.6, "b": 0.1}]}  # None: no forgetting, left out
    results = _with_damage(_results(scores), damage)
    c = report.damage_correlation(results)
    points = [(damage[r][s][t], 1 - scores[r][s][t] / individual[s][t]) for r in damage for s in (0, 1)
              for t in ("a", "b") if damage[r][s][t] is not None]
    assert c["points"] == len(points) == 11
    assert math.isclose(c["pooled"], statistics.correlation(_brute_ranks([d for d, _ in points]),
                                                            _brute_ranks([loss for _, loss in points])))
    # the groups with three rows: (a, 0), (a, 1), (b, 1); (b, 0) has two with damage and is left out
    groups = []
    for task, s in (("a", 0), ("a", 1), ("b", 1)):
        d = [damage[r][s][task] for r in damage]
        loss = [1 - scores[r][s][task] / individual[s][task] for r in damage]
        groups.append(statistics.correlation(_brute_ranks(d), _brute_ranks(loss)))
    assert c["groups"] == 3 and math.isclose(c["within"], sum(groups) / 3)
    assert math.isclose(c["per_task"]["a"], (groups[0] + groups[1]) / 2) and math.isclose(c["per_task"]["b"],
                                                                                          groups[2])
    text = "\n".join(report.damage_section(results))
    assert f"over all 11 (row, task, seed) points: ρ = {c['pooled']:.2f}" in text
    assert report.damage_section(_results(scores)) == []  # older results without damage: no section


def test_the_damage_chart_is_drawn_only_when_asked_and_when_there_is_damage(tmp_path):
    pytest.importorskip("matplotlib")
    individual = [{"a": 0.9, "b": 0.8}]
    scores = {"start": [{"a": 0.5, "b": 0.5}], "individual": individual, "multitask": individual,
              "linear": [{"a": 0.7, "b": 0.6}], "regmean": [{"a": 0.8, "b": 0.7}], "ties": [{"a": 0.6, "b": 0.5}]}
    results = _with_damage(_results(scores), {"linear": [{"a": 0.5, "b": 0.4}], "regmean": [{"a": 0.2, "b": 0.3}],
                                              "ties": [{"a": 0.8, "b": 0.9}]})
    assert [f.name for f in report.write(results, tmp_path)] == ["t.json", "t.md", "t.png", "t-time.png"]
    files = report.write(results, tmp_path, damage=True)
    assert files[-1].name == "t-damage.png" and files[-1].stat().st_size > 0
    assert "ρ = 1.00 (how well it orders the merges of one task)" in (tmp_path / "t.md").read_text()
    assert [f.name for f in report.write(_results(scores), tmp_path / "old", damage=True)][-1] == "t-time.png"


def test_rows_added_with_damage_join_results_written_before_damage_existed():
    from mergesmith.quality import combine

    reference = {"start": [{"a": 0.5, "b": 0.5}], "individual": [{"a": 0.9, "b": 0.8}],
                 "multitask": [{"a": 0.8, "b": 0.8}]}
    earlier = _with_protocol_fields(_results({**reference, "linear": [{"a": 0.6, "b": 0.6}],
                                              "ties": [{"a": 0.7, "b": 0.6}]}))  # no damage keys at all
    added = _with_damage(_with_protocol_fields(_results({**reference, "ties": [{"a": 0.7, "b": 0.6}]})),
                         {"ties": [{"a": 0.4, "b": 0.5}]})
    added["per_seed"][0]["damage_total"] = {"ties": {"a": 0.01, "b": 0.02}}
    combined = combine(earlier, added)
    assert combined["per_seed"][0]["damage"] == {"ties": {"a": 0.4, "b": 0.5}}
    assert combined["per_seed"][0]["damage_total"] == {"ties": {"a": 0.01, "b": 0.02}}
    assert "damage" not in earlier["per_seed"][0]
    # and again, with damage on both sides: the added row's replaces the earlier one's, the others stay
    again = _with_damage(copy.deepcopy(added), {"ties": [{"a": 0.3, "b": 0.3}]})
    both = combine(_with_damage(combined, {"linear": [{"a": 0.2, "b": 0.2}], "ties": [{"a": 0.9, "b": 0.9}]}), again)
    assert both["per_seed"][0]["damage"] == {"linear": {"a": 0.2, "b": 0.2}, "ties": {"a": 0.3, "b": 0.3}}
    assert report.damage_correlation(both)["points"] == 4
    # rows added without damage (an older run's) take the earlier damage of that row away with its scores
    bare = _with_protocol_fields(_results({**reference, "ties": [{"a": 0.7, "b": 0.6}]}))
    assert combine(both, bare)["per_seed"][0]["damage"] == {"linear": {"a": 0.2, "b": 0.2}}


def test_the_rows_tuned_on_damage_are_named_by_their_labels_only():
    from mergesmith.quality import select

    rows = protocol.variants(6)
    tuned = [r for r in rows if r.tune is not None]
    assert [r.label for r in tuned] == ["task_arithmetic[damage]", "ties[damage]", "fisher[damage]",
                                        "task_arithmetic[validation]"]
    assert all(r.data_aware and len(r.grid) == 1 for r in tuned)
    assert [r.label for r in select(rows, ["ties"])] == ["ties"]  # the grid row, not the tuned one
    assert [r.label for r in select(rows, ["ties[damage]", "fisher"])] == ["fisher", "ties[damage]"]
    quick = {r.label: r.tune for r in protocol.variants(6, quick=True) if r.tune is not None}
    assert quick["ties[damage]"]["trials"] <= protocol.QUICK_TRIALS and quick["fisher[damage]"]["trials"] <= 4
    assert {r.label: r.tune for r in tuned}["ties[damage]"]["trials"] == 24


def test_a_validation_tuned_rows_recipe_reads_each_tasks_split(tmp_path):
    """Its tune: block names every fine-tune's validation file (what the seed wrote), with the seed's examples
    and lengths, and parses as a recipe tuned on data."""
    from mergesmith.config import parse_recipe

    finetunes = {"a": tmp_path / "ft-a", "b": tmp_path / "ft-b"}
    sidecars = {"a": tmp_path / "stats-a", "b": tmp_path / "stats-b"}
    validation = {"a": tmp_path / "validation-a.jsonl", "b": tmp_path / "validation-b.jsonl",
                  "settings": {"examples": 120, "max_length": 32, "batch_size": 16}}
    row = {r.label: r for r in protocol.variants(2)}["task_arithmetic[validation]"]
    recipe = protocol._recipe(row, row.grid[0], tmp_path / "start", finetunes, sidecars, validation=validation)
    assert recipe["tune"]["data"] == {str(finetunes[t]): str(validation[t]) for t in ("a", "b")}
    parsed = parse_recipe(recipe)
    assert parsed.tune.goal == "loglik" and parsed.tune.examples == 120 and parsed.tune.max_length == 32
    assert row.tune["data"] == protocol.VALIDATION_DATA  # the row itself, as the results record it, is unchanged


def test_a_tuned_rows_recipe_names_the_start_and_its_tune_block(tmp_path):
    from mergesmith.config import parse_recipe

    finetunes = {"a": tmp_path / "ft-a", "b": tmp_path / "ft-b"}
    sidecars = {"a": tmp_path / "stats-a", "b": tmp_path / "stats-b"}
    fisher = {r.label: r for r in protocol.variants(2)}["fisher[damage]"]
    recipe = protocol._recipe(fisher, fisher.grid[0], tmp_path / "start", finetunes, sidecars)
    parsed = parse_recipe(recipe)  # a valid recipe, tune: block included
    assert parsed.base_model == str(tmp_path / "start")  # Fisher ignores it; the forgetting needs it
    assert parsed.tune.parameters == ["weight"] and parsed.tune.bounds == {"weight": (0.05, 3.0)}
    assert [m.stats for m in parsed.models] == [str(sidecars["a"]), str(sidecars["b"])]
    grid_fisher = {r.label: r for r in protocol.variants(2)}["fisher"]
    assert "base_model" not in protocol._recipe(grid_fisher, grid_fisher.grid[0], tmp_path / "start", finetunes,
                                                sidecars)  # the grid rows' merges are as they were
    judged = protocol._damage_recipe(grid_fisher, grid_fisher.grid[0], tmp_path / "start", finetunes, sidecars)
    assert judged["base_model"] == str(tmp_path / "start") and "tune" not in judged


def test_the_gap_from_ties_to_multitask_closed_is_the_share_of_the_distance():
    def row(value):
        return [{"a": value, "b": value}]

    results = _results({"start": row(0.3), "individual": row(0.9), "multitask": row(0.85), "ties": row(0.6),
                        "regmean": row(0.8), "linear": row(0.5)})
    results["rows"].append({"label": "ties[damage]", "method": "ties", "grid": [{}], "data_aware": True,
                            "tune": {"parameters": ["density"]}})
    for seed in results["per_seed"]:
        seed["test"]["ties[damage]"] = {"a": 0.7, "b": 0.7}
        seed["merge_seconds"]["ties[damage]"], seed["chosen"]["ties[damage]"] = 1.0, {"density": 0.5}
    line = report.reading(results)[-1]
    # normalised: TIES 66.7, multitask 94.4, regmean 88.9 → (88.9 − 66.7) / (94.4 − 66.7) = 80 %; ties[damage] 40 %
    assert line.startswith("Gap from TIES (66.7) to multitask (94.4): best row regmean 88.9 closes 80%")
    assert "best row tuned on damage ties[damage] 77.8 closes 40%" in line
    assert "| ties[damage] | tuned on damage |" in report.markdown(results)
