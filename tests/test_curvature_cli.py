"""Curvature merges end to end: `mergesmith measure` each tiny Hugging Face fine-tune, `mergesmith merge` with
the sidecars, and compare with the same merge done in memory from statistics measured through the Python
API; plus the heads policies and the bad-input cases of statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesmith import merge_state_dicts
from mergesmith.measure import measure
from mergesmith.measure.hf import batches, causal_lm_log_likelihood

TEXTS = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11 w12", "w3 w3 w3", "w20 w21 w22 w5", "w9 w8 w7"]
KINDS = ("fisher", "gram", "kfac")


@pytest.fixture(scope="module")
def measured(llama, tmp_path_factory) -> dict[str, Path]:
    """The Llama base and two fine-tunes (with the base's tokenizer) and their sidecars from the CLI."""
    from typer.testing import CliRunner

    from mergesmith.cli import app

    root = tmp_path_factory.mktemp("curvature")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    paths = {}
    for name in ("base", "ft1", "ft2"):
        model = root / name
        shutil.copytree(llama[name], model)
        for file in llama["base"].glob("tokenizer*"):
            shutil.copy(file, model / file.name)
        kinds = [arg for kind in KINDS for arg in ("--kind", kind)]
        result = CliRunner().invoke(app, ["measure", str(model), "--data", str(data), *kinds, "--batch-size", "4",
                                          "-o", str(root / f"stats-{name}")])
        assert result.exit_code == 0, result.output
        paths[name], paths[f"stats-{name}"] = model, root / f"stats-{name}"
    return paths


def _in_memory_statistics(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [{"text": t} for t in TEXTS]
    return measure(model, batches(examples, tokenizer, batch_size=3, max_length=512, device=torch.device("cpu")),
                   log_likelihood=causal_lm_log_likelihood, kinds=list(KINDS))


RECIPES = {
    "fisher": {"parameters": {"fisher_floor": 1e-8}},
    "regmean": {"parameters": {"alpha": 0.95}},
    "mats": {"base": True, "parameters": {"precision": "kfac", "init": "average", "tol": 1e-7, "max_iters": 300,
                                          "damping": 1e-2}},
    "gradient_matching": {"base": True, "parameters": {"prior": "base"}},
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_measure_then_merge_from_the_cli_reproduces_the_in_memory_merge(method, measured, tmp_path, run_cli,
                                                                        write_recipe):
    settings = RECIPES[method]
    base = {"model": str(measured["base"]), "stats": str(measured["stats-base"])}
    recipe = {"merge_method": method, "models": [{"model": str(measured[m]), "stats": str(measured[f"stats-{m}"])}
                                                 for m in ("ft1", "ft2")], "parameters": settings["parameters"]}
    if settings.get("base"):
        recipe["base_model"] = base
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 0, result.stderr
    if method == "mats":
        assert "conjugate gradient" in result.stdout + result.stderr  # the per-block residual table
    merged = load_file(tmp_path / "out" / "model.safetensors")

    names = {"base": "base", "ft1": "ft1", "ft2": "ft2"}
    state_dicts = {n: load_file(measured[n] / "model.safetensors") for n in names}
    statistics = {f"s-{n}": _in_memory_statistics(measured[n]) for n in names}
    memory = {"merge_method": method, "parameters": settings["parameters"],
              "models": [{"model": m, "stats": f"s-{m}"} for m in ("ft1", "ft2")]}
    if settings.get("base"):
        memory["base_model"] = {"model": "base", "stats": "s-base"}
    expected = merge_state_dicts(memory, state_dicts, statistics=statistics)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        scale = torch.linalg.norm(value) + 1e-12
        assert torch.linalg.norm(merged[name] - value) <= 2e-4 * scale, name
    # the merge did use the statistics: it is not the plain average everywhere
    average = {k: (state_dicts["ft1"][k] + state_dicts["ft2"][k]) / 2 for k in expected}
    moved = [k for k in expected if not torch.allclose(merged[k], average[k], rtol=1e-4, atol=1e-6)]
    assert any(".mlp." in k or "self_attn" in k for k in moved)


def test_a_sidecar_of_another_model_is_refused(measured, tmp_path, run_cli, write_recipe):
    key = "fisher/model.norm.weight"
    wrong_shape = _broken_copy(measured["stats-ft2"], tmp_path / "shape", key, lambda t: torch.ones(t.shape[0] + 1))
    other_identity = _broken_copy(measured["stats-ft2"], tmp_path / "identity", key, lambda t: t,
                                  model="feedbeef00000000")
    for sidecar, pattern in [(wrong_shape, f"'{key}' has shape (33,), expected (32,)"),
                             (other_identity, "measured on different architectures")]:
        recipe = {"merge_method": "fisher", "models": [
            {"model": str(measured["ft1"]), "stats": str(measured["stats-ft1"])},
            {"model": str(measured["ft2"]), "stats": str(sidecar)}]}
        result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
        assert result.code == 2
        assert pattern in result.error_line and str(sidecar) in result.error_line
        assert not (tmp_path / "out").exists()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _broken_copy(source: Path, target: Path, key: str, change, model: str | None = None) -> Path:
    """A copy of a sidecar with one statistic changed (metadata kept, but for the model identity if given)."""
    from safetensors import safe_open

    with safe_open(str(source / "stats.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    tensors[key] = change(tensors[key])
    if model is not None:
        metadata["model"] = model
    _mkdir(target)
    save_file(tensors, str(target / "stats.safetensors"), metadata=metadata)
    return target


@pytest.mark.parametrize("value,pattern", [(float("nan"), "NaN"), (-1.0, "negative")])
def test_a_broken_fisher_is_an_error_naming_the_sidecar(measured, tmp_path, run_cli, write_recipe, value, pattern):
    key = "fisher/model.layers.0.mlp.up_proj.weight"

    def spoil(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[5] = value
        return t

    broken = _broken_copy(measured["stats-ft2"], tmp_path / "broken", key, spoil)
    recipe = {"merge_method": "fisher", "models": [
        {"model": str(measured["ft1"]), "stats": str(measured["stats-ft1"])},
        {"model": str(measured["ft2"]), "stats": str(broken)}]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 2
    assert pattern in result.error_line and key in result.error_line and str(broken) in result.error_line
    assert not (tmp_path / "out").exists()


def test_a_model_without_the_needed_statistics_is_named(measured, tmp_path, run_cli, write_recipe):
    recipe = {"merge_method": "regmean", "models": [
        {"model": str(measured["ft1"]), "stats": str(measured["stats-ft1"])}, {"model": str(measured["ft2"])}]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 2
    assert str(measured["ft2"]) in result.error_line and "'gram'" in result.error_line
    assert not (tmp_path / "out").exists()


def test_a_singular_gram_sum_warns_and_keeps_the_average_on_unseen_directions(measured, tmp_path):
    """Zero one input feature's row and column in every model's Gram: that direction is unseen, the Gram
    sum singular. The merge warns, and the weight's column for that feature is the plain average."""
    from mergesmith import merge
    from mergesmith.solve import SolveWarning

    key = "gram/model.layers.0.mlp.down_proj"

    def unseen(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[7, :] = 0
        t[:, 7] = 0
        return t

    models = []
    for m in ("ft1", "ft2"):
        models.append({"model": str(measured[m]),
                       "stats": str(_broken_copy(measured[f"stats-{m}"], tmp_path / f"s-{m}", key, unseen))})
    with pytest.warns(SolveWarning, match="singular"):
        merge({"merge_method": "regmean", "models": models}, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    weights = [load_file(measured[m] / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
               for m in ("ft1", "ft2")]
    torch.testing.assert_close(merged[:, 7], (weights[0][:, 7] + weights[1][:, 7]) / 2, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(merged).all()


def _classifier(root: Path, name: str, labels: int, seed: int) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_labels=labels)
    model = BertForSequenceClassification(config)
    if name != "base":  # fine-tunes share the base's body, plus a little noise
        base = BertForSequenceClassification.from_pretrained(root / "base", num_labels=labels,
                                                             ignore_mismatched_sizes=True)
        with torch.no_grad():
            for p, q in zip(model.bert.parameters(), base.bert.parameters()):
                p.copy_(q + 0.01 * torch.randn_like(q))
    model.save_pretrained(root / name)
    return root / name


def test_heads_each_keeps_every_task_head_beside_the_merged_body(tmp_path, run_cli, write_recipe):
    from transformers import AutoConfig, BertForSequenceClassification

    base = _classifier(tmp_path, "base", 2, 0)
    tasks = {"three": _classifier(tmp_path, "three", 3, 1), "five": _classifier(tmp_path, "five", 5, 2)}
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "heads": "each",
              "models": [{"model": str(p)} for p in tasks.values()]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 0, result.stderr
    body = load_file(tmp_path / "out" / "model.safetensors")
    base_tensors = load_file(base / "model.safetensors")
    torch.testing.assert_close(body["classifier.weight"], base_tensors["classifier.weight"])  # the base's head
    for name, path in tasks.items():
        head = load_file(tmp_path / "out" / "heads" / name / "model.safetensors")
        own = load_file(path / "model.safetensors")
        assert set(head) == {"classifier.weight", "classifier.bias"}
        torch.testing.assert_close(head["classifier.weight"], own["classifier.weight"], rtol=0, atol=0)
        # the documented way to load a task: its config, the merged body, its own head
        config = AutoConfig.from_pretrained(tmp_path / "out" / "heads" / name)
        model = BertForSequenceClassification.from_pretrained(tmp_path / "out", config=config,
                                                              ignore_mismatched_sizes=True)
        model.load_state_dict(head, strict=False)
        assert model.classifier.weight.shape[0] == config.num_labels
        torch.testing.assert_close(model.classifier.weight, own["classifier.weight"])
        expected = base_tensors["bert.encoder.layer.0.output.dense.weight"] + sum(
            load_file(p / "model.safetensors")["bert.encoder.layer.0.output.dense.weight"]
            - base_tensors["bert.encoder.layer.0.output.dense.weight"] for p in tasks.values())
        torch.testing.assert_close(model.bert.encoder.layer[0].output.dense.weight, expected, rtol=1e-5, atol=1e-6)


def test_heads_of_different_label_spaces_must_be_covered_by_a_policy(tmp_path, run_cli, write_recipe):
    base = _classifier(tmp_path, "base", 2, 0)
    three, five = _classifier(tmp_path, "three", 3, 1), _classifier(tmp_path, "five", 5, 2)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(three)}, {"model": str(five)}]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 2 and "classifier" in result.error_line
    recipe["heads"] = str(five)  # one model's head
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 0, result.stderr
    torch.testing.assert_close(load_file(tmp_path / "out" / "model.safetensors")["classifier.weight"],
                               load_file(five / "model.safetensors")["classifier.weight"], rtol=0, atol=0)


def test_conv1d_weights_are_merged_in_their_stored_layout(gpt2, tmp_path):
    """GPT-2 stores its Conv1D weights as (in, out). The sidecar lists them as transposed, and the merge must
    solve with the Gram on the input side all the same: W = (Σ G_i)⁻¹ Σ G_i W_i for W stored (in, out)."""
    from transformers import GPT2LMHeadModel

    from mergesmith import merge

    models = {}
    for name in ("ft1", "ft2"):
        model = GPT2LMHeadModel.from_pretrained(gpt2[name], dtype=torch.float32)
        ids = torch.randint(3, 100, (16, 8), generator=torch.Generator().manual_seed(0))  # 128 rows > in = 32
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        stats = measure(model, [batch], log_likelihood=causal_lm_log_likelihood, kinds=["gram", "kfac"])
        assert "h.0.attn.c_proj" in " ".join(stats.transposed)
        stats.save(tmp_path / f"stats-{name}")
        models[name] = (load_file(gpt2[name] / "model.safetensors"), stats)
    entries = [{"model": str(gpt2[n]), "stats": str(tmp_path / f"stats-{n}")} for n in models]
    merge({"merge_method": "regmean", "models": entries}, tmp_path / "regmean")
    merged = load_file(tmp_path / "regmean" / "model.safetensors")
    for module in ("transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_fc"):
        grams = [s.tensors[f"gram/{module}"].double() for _, s in models.values()]
        weights = [w[f"{module}.weight"].double() for w, _ in models.values()]  # (in, out)
        expected = torch.linalg.solve(sum(grams), sum(g @ w for g, w in zip(grams, weights)))
        assert _relative_error(merged[f"{module}.weight"], expected) < 1e-4, module

    merge({"merge_method": "mats", "models": entries, "parameters": {"precision": "kfac", "init": "average",
                                                                      "tol": 1e-9, "max_iters": 500}},
          tmp_path / "mats")
    merged = load_file(tmp_path / "mats" / "model.safetensors")
    module = "transformer.h.0.attn.c_proj"
    operators, targets = [], []
    for weights, stats in models.values():
        a, g = (stats.tensors[f"kfac_{k}/{module}"].double() for k in ("a", "g"))
        a = a + 1e-3 * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)  # the default damping
        g = g + 1e-3 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
        block = torch.cat([weights[f"{module}.weight"].double().T, weights[f"{module}.bias"].double()[:, None]], 1)
        operators.append(torch.kron(g, a))  # row-major vec(G X A) = (G ⊗ A) vec(X) for symmetric A
        targets.append(operators[-1] @ block.reshape(-1))
    solution = torch.linalg.solve(sum(operators), sum(targets)).reshape(block.shape)
    assert _relative_error(merged[f"{module}.weight"], solution[:, :-1].T) < 1e-4
    assert _relative_error(merged[f"{module}.bias"], solution[:, -1]) < 1e-4


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    # float32 statistics and outputs through a solve: compare in norm, not entry by entry
    return float(torch.linalg.norm(got.double() - expected) / torch.linalg.norm(expected))


def test_swapped_sidecars_of_the_same_architecture_are_refused(measured, tmp_path, run_cli, write_recipe):
    """Same shapes, same architecture identity, other weights: only the recorded weight fingerprints can
    tell that ft1's statistics were given to ft2 — a merge would otherwise be silently wrong."""
    recipe = {"merge_method": "fisher", "models": [
        {"model": str(measured["ft1"]), "stats": str(measured["stats-ft2"])},
        {"model": str(measured["ft2"]), "stats": str(measured["stats-ft1"])}]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 2
    assert "measured on other weights" in result.error_line and str(measured["stats-ft2"]) in result.error_line
    assert not (tmp_path / "out").exists()
    combined = run_cli("stats", "combine", measured["stats-ft1"], measured["stats-ft2"], "-o", tmp_path / "both")
    assert combined.code == 2 and "different weights" in combined.error_line
    assert not (tmp_path / "both").exists()


def test_the_summary_counts_a_bias_solved_with_its_weight_as_merged_with_statistics(tmp_path):
    from transformers import BertForSequenceClassification

    from mergesmith import plan_merge
    from mergesmith.measure.hf import seq_cls_log_likelihood

    _classifier(tmp_path, "base", 2, 0)
    entries = []
    for name, seed in (("a", 1), ("b", 2)):
        path = _classifier(tmp_path, name, 2, seed)
        model = BertForSequenceClassification.from_pretrained(path)
        ids = torch.randint(1, 30, (6, 5), generator=torch.Generator().manual_seed(seed))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * 3)}
        measure(model, [batch], log_likelihood=seq_cls_log_likelihood, kinds=["kfac"]).save(tmp_path / f"s-{name}")
        entries.append({"model": str(path), "stats": str(tmp_path / f"s-{name}")})
    plan = plan_merge({"merge_method": "mats", "models": entries, "parameters": {"init": "average"}})
    companions = {job.companion.name for job in plan.jobs if job.companion is not None}
    assert "bert.encoder.layer.0.attention.self.query.bias" in companions
    assert not set(plan.fallback) & companions
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in plan.fallback  # no K-FAC for a norm


def test_statistics_of_fine_tunes_with_different_label_spaces_merge_with_heads_each(tmp_path, run_cli,
                                                                                    write_recipe):
    """A sidecar's architecture identity leaves the head out: a 3-way and a 5-way fine-tune of one body are
    one architecture to RegMean, which then solves each body weight from the two Gram matrices."""
    from transformers import BertForSequenceClassification

    from mergesmith.io.sidecar import StatsReader
    from mergesmith.measure import measure
    from mergesmith.measure.hf import seq_cls_log_likelihood

    base = _classifier(tmp_path, "base", 2, 0)
    tasks = {"three": _classifier(tmp_path, "three", 3, 1), "five": _classifier(tmp_path, "five", 5, 2)}
    generator = torch.Generator().manual_seed(0)
    for name, path in tasks.items():
        model = BertForSequenceClassification.from_pretrained(path).eval()
        labels = 3 if name == "three" else 5
        batches = [{"input_ids": torch.randint(0, 30, (8, 6), generator=generator),
                    "attention_mask": torch.ones(8, 6, dtype=torch.long),
                    "labels": torch.randint(0, labels, (8,), generator=generator)} for _ in range(3)]
        measure(model, batches, log_likelihood=seq_cls_log_likelihood, kinds=["gram"]).save(tmp_path / f"s-{name}")
    recipe = {"merge_method": "regmean", "base_model": str(base), "heads": "each",
              "models": [{"model": str(p), "stats": str(tmp_path / f"s-{n}")} for n, p in tasks.items()]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 0, result.stderr
    key, module = "bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.0.output.dense"
    grams = [StatsReader(tmp_path / f"s-{n}").get(f"gram/{module}").double() for n in tasks]
    weights = [load_file(p / "model.safetensors")[key].double() for p in tasks.values()]
    expected = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights))).T  # RegMean, α = 1
    merged = load_file(tmp_path / "out" / "model.safetensors")[key].double()
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
