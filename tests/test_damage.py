"""Predicted damage: each model's ½ (θ − θ_i)ᵀ F_i (θ − θ_i), computed while merging, against the quadratic
formed in the test from the sidecar's statistics with an explicit Kronecker product (K-FAC) or an elementwise
product (Fisher), on a tiny GPT-2 (Conv1D weights stored (in, out), biases in K-FAC's augmented block)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from mergesmith.api import merge, predict_damage
from mergesmith.errors import UsageError
from mergesmith.io.sidecar import StatsReader
from mergesmith.measure import measure
from mergesmith.measure.hf import causal_lm_log_likelihood

EXAMPLES, TOKENS = 6, 9


def token_batches(seed: int) -> list[dict[str, torch.Tensor]]:
    """Two batches of random tokens, the second with padding (which K-FAC's rows leave out)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (EXAMPLES, TOKENS), generator=generator)
    mask = torch.ones_like(ids)
    mask[4:, 6:] = 0
    return [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]


ROWS = int(sum(b["attention_mask"].sum() for b in token_batches(0)))  # the same mask for every seed


@pytest.fixture(scope="module")
def measured(gpt2, tmp_path_factory) -> dict[str, Path]:
    """Fisher + K-FAC and Gram-only sidecars of the two GPT-2 fine-tunes."""
    root = tmp_path_factory.mktemp("damage")
    paths = dict(gpt2)
    for seed, name in enumerate(("ft1", "ft2")):
        model = GPT2LMHeadModel.from_pretrained(gpt2[name], dtype=torch.float32)
        for kinds, label in ((["fisher", "kfac"], "stats"), (["gram"], "gram")):
            stats = measure(model, token_batches(seed), kinds=kinds, log_likelihood=causal_lm_log_likelihood)
            stats.save(root / f"{label}-{name}")
            paths[f"{label}-{name}"] = root / f"{label}-{name}"
    return paths


def recipe(paths: dict[str, Path], method: str, kind: str = "stats", **extra) -> dict:
    return {"merge_method": method, "base_model": str(paths["base"]), "dtype": "float32",
            "models": [{"model": str(paths[m]), "stats": str(paths[f"{kind}-{m}"])} for m in ("ft1", "ft2")],
            **extra}


def oracle(merged: dict[str, torch.Tensor], own: dict[str, torch.Tensor], stats_dir: Path) -> dict[str, float]:
    """½ δᵀ F δ per tensor, in float64: F = (rows/examples)·A ⊗ G over vec([Wᵀ | b]) (column-major, so that
    (A ⊗ G) vec(X) = vec(G X A)) for every Conv1D with K-FAC factors, its bias in the same block, and the
    diagonal Fisher for every other tensor."""
    reader = StatsReader(stats_dir)
    stats = {k: reader.get(k).double() for k in reader.keys()}
    damage: dict[str, float] = {}
    for name, theta in merged.items():
        module, _, leaf = name.rpartition(".")
        delta = theta.double() - own[name].double()
        if f"kfac_a/{module}" in stats:
            if leaf == "bias":
                continue  # in its weight's block
            block = torch.cat([delta.T, (merged[f"{module}.bias"].double() - own[f"{module}.bias"].double())[:, None]],
                              dim=1)  # (out, in + 1)
            fisher = ROWS / EXAMPLES * torch.kron(stats[f"kfac_a/{module}"], stats[f"kfac_g/{module}"])
            vec = block.T.reshape(-1)  # column-major vec
            damage[name] = 0.5 * float(vec @ fisher @ vec)
        elif f"fisher/{name}" in stats:
            damage[name] = 0.5 * float((stats[f"fisher/{name}"] * delta.square()).sum())
    return damage


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_damage_is_the_kfac_and_fisher_quadratic_of_each_model(measured, tmp_path, method):
    """TIES reads the base, linear does not (the base is opened for forgetting alone): both report each model's
    ½ δᵀ F δ at the merge and at the base, matching the dense quadratic to float32 precision."""
    extra = {"parameters": {"density": 0.5, "weight": 1.0}} if method == "ties" else {}
    summary = merge(recipe(measured, method, **extra), tmp_path / "out")
    merged = weights(tmp_path / "out")
    base = weights(measured["base"])
    reported = {d.model: d for d in summary.damage}
    assert sorted(reported) == sorted(str(measured[m]) for m in ("ft1", "ft2"))
    for name in ("ft1", "ft2"):
        own = weights(measured[name])
        expected = oracle(merged, own, measured[f"stats-{name}"])
        forgetting = oracle({k: base[k] for k in merged}, own, measured[f"stats-{name}"])
        got = reported[str(measured[name])]
        assert got.unit == "nats/example"
        for tensor, value in expected.items():  # a K-FAC block's weight and bias (with their cross term) as one
            bias = tensor.removesuffix(".weight") + ".bias"
            block = got.tensors[tensor] + (got.tensors.get(bias, 0.0) if bias not in expected else 0.0)
            assert block == pytest.approx(value, rel=1e-4, abs=1e-9), tensor
        assert got.total == pytest.approx(sum(expected.values()), rel=1e-5)
        assert got.forgetting == pytest.approx(sum(forgetting.values()), rel=1e-5)
        assert got.kinds["kfac"] > 0 and got.kinds["fisher"] > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Predicted damage" in card and str(measured["ft1"]) in card.split("## Predicted damage")[1]
    merged_list = card.split("Models merged:")[1].split("##")[0]
    assert f"`{measured['base']}`" not in merged_list  # forgetting's reference is no input of the merge


def test_a_merge_equal_to_one_fine_tune_does_it_no_damage(measured):
    """linear with weights 1 and 0 is ft1 itself: its damage is 0 and ft2's is ½ (θ_1 − θ_2)ᵀ F_2 (θ_1 − θ_2)."""
    spec = recipe(measured, "linear")
    spec["models"][1]["parameters"] = {"weight": 0.0}
    summary = predict_damage(spec)
    by_model = {d.model: d for d in summary.damage}
    assert by_model[str(measured["ft1"])].total == 0.0
    expected = oracle(weights(measured["ft1"]), weights(measured["ft2"]), measured["stats-ft2"])
    assert by_model[str(measured["ft2"])].total == pytest.approx(sum(expected.values()), rel=1e-5)


def test_gram_only_sidecars_report_half_the_mean_squared_output_change(measured, tmp_path):
    """A sidecar with Gram matrices alone holds no loss curvature: its ½ tr(D G Dᵀ) is reported in its own unit."""
    summary = merge(recipe(measured, "regmean", kind="gram"), tmp_path / "out")
    merged = weights(tmp_path / "out")
    for name in ("ft1", "ft2"):
        own = weights(measured[name])
        reader = StatsReader(measured[f"gram-{name}"])
        expected = 0.0
        for key in reader.keys():
            module = key.split("/", 1)[1]
            if f"{module}.weight" not in merged:
                continue  # GPT-2's lm_head is the tied embedding, saved (and merged) as transformer.wte.weight
            delta = (merged[f"{module}.weight"].double() - own[f"{module}.weight"].double()).T  # (out, in)
            expected += 0.5 * float(torch.trace(delta @ reader.get(key).double() @ delta.T))
        got = next(d for d in summary.damage if d.model == str(measured[name]))
        assert got.unit == "output MSE" and set(got.kinds) == {"gram"}
        assert got.total == pytest.approx(expected, rel=1e-5)


def test_no_sidecar_no_damage_and_a_clear_line_for_a_dry_run(measured, tmp_path):
    spec = {"merge_method": "linear", "models": [{"model": str(measured["ft1"])}, {"model": str(measured["ft2"])}]}
    assert merge(spec, tmp_path / "out").damage == []
    with pytest.raises(UsageError, match="predicted damage needs statistics"):
        predict_damage(spec)
    assert merge(recipe(measured, "linear"), tmp_path / "off", damage=False).damage == []


def test_cli_reports_damage_and_dry_run_predicts_it_without_writing(measured, tmp_path, write_recipe, run_cli):
    path = write_recipe(recipe(measured, "ties", parameters={"density": 0.5, "weight": 1.0}))
    dry = run_cli("merge", path, tmp_path / "out", "--dry-run", "--damage")
    assert dry.code == 0, dry.stderr
    assert "predicted damage" in dry.stdout and "of forgetting" in dry.stdout
    assert not (tmp_path / "out").exists()
    done = run_cli("merge", path, tmp_path / "out")
    assert done.code == 0, done.stderr
    assert "predicted damage" in done.stderr  # the summary's place
    rows = [line for line in done.stderr.splitlines() if str(measured["ft1"]) in line and "nats" in line]
    assert rows, done.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt2"
