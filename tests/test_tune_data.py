"""``tune:`` with ``data:``: the validation scores a trial sees are those of the merged checkpoint loaded by
transformers and scored in the test one example at a time (no padding, float64 log-softmax), for a causal LM
and for sequence classifiers with heads of different label spaces (``heads: each``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import _save_tokenizer, llama_config
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

from mergesmith.api import merge
from mergesmith.config import parse_recipe
from mergesmith.errors import RecipeError
from mergesmith.validation import load_validation


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentences(seed: int, n: int, labels: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = {"text": " ".join(f"w{rng.randrange(90)}" for _ in range(rng.randrange(4, 11)))}
        if labels:
            row["label"] = rng.randrange(labels)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def lm_data(llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-data")
    return {**llama, **{f"data-{m}": write_jsonl(root / f"{m}.jsonl", sentences(i, 10)) for i, m in
                        enumerate(("ft1", "ft2"))}}


def lm_scores(model_dir: Path, tokenizer_dir: Path, data: Path) -> tuple[float, float]:
    """(log-likelihood per predicted token, next-token accuracy) of ``data`` under the checkpoint."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    total = correct = count = 0.0
    with torch.no_grad():
        for line in data.read_text().splitlines():
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids
            logits = model(ids).logits[0, :-1].double()
            targets = ids[0, 1:]
            total += float(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum())
            correct += float((logits.argmax(-1) == targets).sum())
            count += len(targets)
    return total / count, correct / count


def lm_recipe(paths: dict[str, Path], weights: tuple[float, float]) -> dict:
    return {"merge_method": "linear", "base_model": str(paths["base"]), "dtype": "float32",
            "models": [{"model": str(paths[m]), "parameters": {"weight": w}} for m, w in zip(("ft1", "ft2"), weights)]}


def test_a_trials_scores_are_the_merged_checkpoints(lm_data, tmp_path):
    spec = lm_recipe(lm_data, (0.7, 0.3))
    data = {str(lm_data[m]): str(lm_data[f"data-{m}"]) for m in ("ft1", "ft2")}
    validation = load_validation(parse_recipe(spec), data, batch_size=4)
    loglik = validation.score(parse_recipe(spec), "loglik")
    accuracy = validation.score(parse_recipe(spec), "accuracy")
    merge(spec, tmp_path / "merged")
    for m in ("ft1", "ft2"):
        expected = lm_scores(tmp_path / "merged", lm_data["base"], lm_data[f"data-{m}"])
        assert loglik[str(lm_data[m])] == pytest.approx(expected[0], rel=1e-5)
        assert accuracy[str(lm_data[m])] == pytest.approx(expected[1], abs=1e-12)


def test_tuning_on_validation_data_improves_it_and_the_card_keeps_the_tuned_recipe(lm_data, tmp_path):
    data = {str(lm_data[m]): str(lm_data[f"data-{m}"]) for m in ("ft1", "ft2")}
    spec = {**lm_recipe(lm_data, (0.9, 0.1)), "tune": {"parameters": ["weight"], "data": data, "trials": 8,
                                                        "bounds": {"weight": [0.05, 1.0]}, "batch_size": 4}}
    progress = []
    summary = merge(spec, tmp_path / "tuned", on_tune=lambda done, total, text: progress.append((done, total)))
    result = summary.tuning
    assert result.objective == "loglik" and result.after >= result.before
    assert 1 < result.evaluations <= 8 and progress[-1] == (result.evaluations, 8)
    assert all(0.05 <= w <= 1.0 for w in result.values["weight"])
    measured = [lm_scores(tmp_path / "tuned", lm_data["base"], lm_data[f"data-{m}"])[0] for m in ("ft1", "ft2")]
    assert result.after == pytest.approx(sum(measured) / 2, rel=1e-5)
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert "## Tuned on validation data" in card and "mean validation log-likelihood" in card


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """A Llama sequence classifier (2 labels) and two fine-tunes, the second with a 3-label head."""
    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(5)
    config = llama_config()
    config.pad_token_id = 3
    base = LlamaForSequenceClassification(config)
    base.save_pretrained(root / "base")
    _save_tokenizer(root / "base")
    paths = {"base": root / "base"}
    for name, labels, seed in (("ft1", 2, 1), ("ft2", 3, 2)):
        config.num_labels = labels
        model = LlamaForSequenceClassification(config)
        body = {k: v for k, v in base.state_dict().items() if not k.startswith("score.")}
        model.load_state_dict(body, strict=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        model.save_pretrained(root / name)
        paths[name] = root / name
        paths[f"data-{name}"] = write_jsonl(root / f"{name}.jsonl", sentences(seed, 9, labels))
    return paths


def test_each_classifier_is_scored_with_its_own_head(classifiers, tmp_path):
    """heads: each: model i's data is scored through its own (here 2- and 3-way) head on the merged body."""
    spec = {"merge_method": "task_arithmetic", "base_model": str(classifiers["base"]), "heads": "each",
            "dtype": "float32", "parameters": {"lambda": 0.6},
            "models": [{"model": str(classifiers[m])} for m in ("ft1", "ft2")]}
    data = {str(classifiers[m]): str(classifiers[f"data-{m}"]) for m in ("ft1", "ft2")}
    validation = load_validation(parse_recipe(spec), data, batch_size=4)
    validation.score(parse_recipe(spec), "loglik")
    # a second trial: the network's head is now ft2's (3-way), where the merge's own head is the base's 2-way one
    got = validation.score(parse_recipe(spec), "loglik")
    merge(spec, tmp_path / "merged")
    body = {k: v for k, v in load_file(str(tmp_path / "merged" / "model.safetensors")).items()
            if not k.startswith("score.")}  # the base's head, which no task uses
    tokenizer = AutoTokenizer.from_pretrained(classifiers["base"])
    for m in ("ft1", "ft2"):
        model = LlamaForSequenceClassification.from_pretrained(classifiers[m], dtype=torch.float32).eval()
        missing = model.load_state_dict(body, strict=False).missing_keys
        assert missing == ["score.weight"]  # the head stays the fine-tune's own
        rows = [json.loads(line) for line in classifiers[f"data-{m}"].read_text().splitlines()]
        with torch.no_grad():
            expected = sum(float(torch.log_softmax(model(tokenizer(r["text"], return_tensors="pt").input_ids)
                                                   .logits[0].double(), -1)[r["label"]]) for r in rows) / len(rows)
        assert got[str(classifiers[m])] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("tune_block", "message"), [
    ({"parameters": ["weight"], "data": {}}, "no validation file for"),
    ({"parameters": ["weight"], "objective": "sum", "data": "DATA"}, "must be loglik or accuracy"),
    ({"parameters": ["weight"], "objective": "accuracy"}, "is an objective \\(with data:\\)"),
])
def test_a_wrong_data_block_is_one_line(lm_data, tune_block, message):
    data = {str(lm_data[m]): str(lm_data[f"data-{m}"]) for m in ("ft1", "ft2")}
    block = {**tune_block, **({"data": data} if tune_block.get("data") == "DATA" else {})}
    with pytest.raises(RecipeError, match=message):
        parse_recipe({**lm_recipe(lm_data, (1, 1)), "tune": block})


def test_data_for_a_model_the_recipe_lacks_names_the_closest(lm_data):
    data = {str(lm_data[m]): str(lm_data[f"data-{m}"]) for m in ("ft1", "ft2")}
    data[str(lm_data["ft1"]) + "x"] = data.pop(str(lm_data["ft1"]))
    with pytest.raises(RecipeError, match="is not one of the recipe's models.*did you mean"):
        parse_recipe({**lm_recipe(lm_data, (1, 1)), "tune": {"parameters": ["weight"], "data": data}})


def test_dry_run_tunes_on_data_and_says_there_is_no_damage_to_predict(lm_data, tmp_path, write_recipe, run_cli):
    data = {str(lm_data[m]): str(lm_data[f"data-{m}"]) for m in ("ft1", "ft2")}
    path = write_recipe({**lm_recipe(lm_data, (0.5, 0.5)), "tune": {"parameters": ["weight"], "data": data,
                                                                     "trials": 3, "objective": "accuracy"}})
    plain = run_cli("merge", path, tmp_path / "out", "--dry-run")
    assert plain.code == 0 and "on their validation data" in plain.stdout, plain.stderr
    tuned = run_cli("merge", path, tmp_path / "out", "--dry-run", "--damage")
    assert tuned.code == 0, tuned.stderr
    assert "mean validation accuracy" in tuned.stdout and "nothing to predict" in tuned.stdout
    assert not (tmp_path / "out").exists()


def test_heads_each_with_a_base_the_method_ignores_writes_a_loadable_model(classifiers, tmp_path):
    """linear ignores the base, but heads: each copies the base's head into the main checkpoint: the config
    must be the base's too (it was the first model's, whose 3 labels did not fit the 2-way head)."""
    spec = {"merge_method": "linear", "base_model": str(classifiers["base"]), "heads": "each", "dtype": "float32",
            "models": [{"model": str(classifiers[m])} for m in ("ft2", "ft1")]}
    with pytest.warns(Warning):
        merge(spec, tmp_path / "out")
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_labels == 2 and model.score.weight.shape == (2, 32)


def test_an_image_classifiers_validation_data_is_scored_on_the_merged_checkpoint(tmp_path):
    """pixel_values rows in measure's image format: each trial's log-likelihood and accuracy are those of the
    merged checkpoint loaded by transformers, scored one image at a time in float64."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    # the vision suite's architecture (a ViT's in-memory names differ from its checkpoint's in transformers 5)
    config = ConvNextConfig(num_channels=1, patch_size=2, image_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            num_stages=2, num_labels=3, layer_scale_init_value=0.0)
    torch.manual_seed(3)
    paths = {}
    for name in ("base", "ft1", "ft2"):
        model = ConvNextForImageClassification(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    generator = torch.Generator().manual_seed(4)
    for name in ("ft1", "ft2"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"pixel_values": torch.randn(1, 8, 8, generator=generator).tolist(),
                                                  "label": i % 3} for i in range(5)])
    spec = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]), "dtype": "float32",
            "parameters": {"lambda": 0.7}, "models": [{"model": str(paths[m])} for m in ("ft1", "ft2")]}
    data = {str(paths[m]): str(tmp_path / f"{m}.jsonl") for m in ("ft1", "ft2")}
    validation = load_validation(parse_recipe(spec), data, batch_size=2)
    loglik = validation.score(parse_recipe(spec), "loglik")
    accuracy = validation.score(parse_recipe(spec), "accuracy")
    merge(spec, tmp_path / "merged")
    merged = ConvNextForImageClassification.from_pretrained(tmp_path / "merged").double().eval()
    for m in ("ft1", "ft2"):
        rows = [json.loads(line) for line in (tmp_path / f"{m}.jsonl").read_text().splitlines()]
        with torch.no_grad():
            logits = [merged(pixel_values=torch.tensor(r["pixel_values"], dtype=torch.float64)[None]).logits[0]
                      for r in rows]
        expected = sum(float(torch.log_softmax(z, -1)[r["label"]]) for z, r in zip(logits, rows)) / len(rows)
        assert loglik[str(paths[m])] == pytest.approx(expected, rel=1e-5)
        assert accuracy[str(paths[m])] == sum(int(z.argmax()) == r["label"] for z, r in zip(logits, rows)) / len(rows)
