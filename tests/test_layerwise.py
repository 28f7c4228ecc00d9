"""regmean_plusplus against the paper's algorithm written here in float64 on whole models in memory: for layer
l and model i, a copy of the merged model with model i's own layer l put in is run on model i's examples one
at a time (no padding), its layer l's Linear inputs give the Grams, RegMean merges layer l, and the next layer
starts from there."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import _save_tokenizer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from mergesmith.api import merge
from mergesmith.config import parse_recipe
from mergesmith.errors import RecipeError

WEIGHTS, ALPHA = (1.0, 0.5), 0.9


def texts(seed: int, n: int = 14) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(90)}" for _ in range(rng.randrange(5, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def calibrated(llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibration")
    paths = dict(llama)
    for i, m in enumerate(("ft1", "ft2")):
        paths[f"data-{m}"] = root / f"{m}.jsonl"
        paths[f"data-{m}"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(10 + i)))
    return paths


def recipe(paths: dict[str, Path], **extra) -> dict:
    return {"merge_method": "regmean_plusplus", "base_model": str(paths["base"]), "dtype": "float32",
            "parameters": {"alpha": ALPHA},
            "models": [{"model": str(paths[m]), "data": str(paths[f"data-{m}"]), "parameters": {"weight": w}}
                       for m, w in zip(("ft1", "ft2"), WEIGHTS)],
            "calibration": {"batch_size": 4}, **extra}


STACKS = {"llama": "model.layers", "bert": "bert.encoder.layer"}


def reference(paths: dict[str, Path], *, plus_plus: bool = True, kind: str = "llama") -> dict[str, torch.Tensor]:
    """RegMean++ (or, with ``plus_plus`` False, RegMean on each model's own activations) in float64."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSequenceClassification
    stack = STACKS[kind]
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    models = [auto.from_pretrained(paths[m]).double().eval() for m in ("ft1", "ft2")]
    data = [[tokenizer(t, return_tensors="pt").input_ids for t in texts(10 + i)] for i in range(2)]
    total = sum(WEIGHTS)
    merged = copy.deepcopy(models[0])
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if not name.startswith(stack + "."):
                p.copy_(sum(w * dict(m.named_parameters())[name] for w, m in zip(WEIGHTS, models)) / total)
        for index in range(len(merged.get_submodule(stack))):
            grams = []
            for model, examples in zip(models, data):
                probe = copy.deepcopy(merged if plus_plus else model)
                probe.get_submodule(stack)[index].load_state_dict(model.get_submodule(stack)[index].state_dict())
                sums, rows, hooks = {}, {}, []
                for name, module in probe.get_submodule(stack)[index].named_modules():
                    if isinstance(module, nn.Linear):
                        def hook(_m, inputs, _out, name=name, sums=sums, rows=rows):
                            x = inputs[0].reshape(-1, inputs[0].shape[-1])
                            sums[name] = sums.get(name, 0) + x.T @ x
                            rows[name] = rows.get(name, 0) + x.shape[0]
                        hooks.append(module.register_forward_hook(hook))
                for ids in examples:
                    probe(ids)
                for h in hooks:
                    h.remove()
                grams.append({k: sums[k] / rows[k] for k in sums})
            layer = {}
            for name, _ in merged.get_submodule(stack)[index].named_parameters():
                own = [dict(m.get_submodule(stack)[index].named_parameters())[name] for m in models]
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and module in grams[0]:
                    tilde = [ALPHA * g[module] + (1 - ALPHA) * torch.diag(torch.diag(g[module])) for g in grams]
                    lhs = sum(w * g for w, g in zip(WEIGHTS, tilde))
                    rhs = sum(w * g @ t.T for w, g, t in zip(WEIGHTS, tilde, own))
                    layer[name] = torch.linalg.solve(lhs, rhs).T
                else:
                    layer[name] = sum(w * t for w, t in zip(WEIGHTS, own)) / total
            merged.get_submodule(stack)[index].load_state_dict(layer, strict=False)
    return {k: v.float() for k, v in merged.state_dict().items()}


def test_regmean_plusplus_is_the_papers_algorithm(calibrated, tmp_path):
    summary = merge(recipe(calibrated), tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = reference(calibrated)
    assert sorted(got) == sorted(k for k in expected if k != "lm_head.weight" or k in got)
    for name, tensor in got.items():
        assert torch.allclose(tensor, expected[name], rtol=1e-4, atol=1e-6), name
    # it is not RegMean on each model's own activations: the test tells the two apart
    plain = reference(calibrated, plus_plus=False)
    upper = "model.layers.1.mlp.down_proj.weight"
    assert (plain[upper] - expected[upper]).abs().max() > 100 * (got[upper] - expected[upper]).abs().max()
    assert [t["layer"] for t in summary.layers] == [0, 1] and all(t["seconds"] > 0 for t in summary.layers)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Layer by layer" in card and "merge_method: regmean_plusplus" in card
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.fixture(scope="module")
def bert(calibrated, tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT classifier (post-norm layers, called with positional masks) and two perturbed fine-tunes."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(3)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=3, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(root / "base")
    _save_tokenizer(root / "base")
    paths = {"base": root / "base", **{k: v for k, v in calibrated.items() if k.startswith("data-")}}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed, name in ((1, "ft1"), (2, "ft2")):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in sorted(model.named_parameters()):
                p.copy_(base[n] + 0.05 * torch.randn(p.shape, generator=generator))
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def test_regmean_plusplus_on_bert_is_the_papers_algorithm(bert, tmp_path):
    merge(recipe(bert), tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = reference(bert, kind="bert")
    plain = reference(bert, plus_plus=False, kind="bert")
    for name, tensor in got.items():
        assert torch.allclose(tensor, expected[name], rtol=1e-4, atol=1e-6), name
    upper = "bert.encoder.layer.1.output.dense.weight"
    assert (plain[upper] - expected[upper]).abs().max() > 100 * (got[upper] - expected[upper]).abs().max()


def test_every_model_needs_calibration_data_and_only_layer_wise_methods_take_it(calibrated):
    spec = recipe(calibrated)
    del spec["models"][1]["data"]
    with pytest.raises(RecipeError, match=r"models\[1\] .* needs data: FILE"):
        parse_recipe(spec)
    spec = recipe(calibrated, merge_method="regmean")
    spec.pop("calibration")
    with pytest.raises(RecipeError, match=r"models\[0\]\.data is calibration data"):
        parse_recipe(spec)


def test_dry_run_checks_a_layer_wise_recipe_without_writing(calibrated, tmp_path, write_recipe, run_cli):
    path = write_recipe(recipe(calibrated))
    result = run_cli("merge", path, tmp_path / "out", "--dry-run")
    assert result.code == 0, result.stderr
    assert "regmean_plusplus (layer by layer" in result.stdout
    assert not (tmp_path / "out").exists()
    done = run_cli("merge", path, tmp_path / "out")
    assert done.code == 0, done.stderr
    assert "2 layers" in done.stderr and "measuring Gram matrices" in done.stderr
