"""`mergesmith measure` on bad input and large vocabularies: every mistake is one typed line (exit 2) with no
sidecar left behind, a checkpoint's code never runs, and the statistics stay O(model size) — what the factor
budget and --exclude leave out is recorded in the sidecar, and a merge gives it the method's fallback."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergesmith.errors import MergeWarning, UsageError
from mergesmith.io.sidecar import StatsReader, save_stats
from mergesmith.measure import measure
from mergesmith.measure.select import FactorBudget, parse_factor_budget

TEXTS = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11 w12", "w3 w3 w3", "w20 w21 w22 w5", "w9 w8 w7"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _word_tokenizer(directory: Path, size: int) -> None:
    """A word-level tokenizer of ``size`` tokens (<unk> <s> </s> <pad> w0 w1 ...), like conftest's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(size - 4)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(directory)


def _copy_model(source: Path, target: Path, *, tokenizer_from: Path | None = None) -> Path:
    shutil.copytree(source, target)
    if tokenizer_from is not None:
        for file in tokenizer_from.glob("tokenizer*"):
            shutil.copy(file, target / file.name)
    return target


def _jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def cases(llama, bad_models, tmp_path_factory) -> dict[str, Path]:
    """Model directories and data files, each broken in one way (next to good ones)."""
    root = tmp_path_factory.mktemp("measure-safety")
    base = llama["base"]
    paths = {"base": base, "missing_model": root / "nowhere"}
    paths["no_tokenizer"] = _copy_model(llama["ft1"], root / "no_tokenizer")
    paths["big_tokenizer"] = _copy_model(llama["ft1"], root / "big_tokenizer")
    _word_tokenizer(paths["big_tokenizer"], 200)  # ids up to 199, the embedding has 100 rows
    paths["no_config"] = _copy_model(base, root / "no_config")
    (paths["no_config"] / "config.json").unlink()
    paths["bad_config"] = _copy_model(base, root / "bad_config")
    (paths["bad_config"] / "config.json").write_text('{"model_type": "llama",')
    paths["pickle"] = _copy_model(bad_models["pickle_code"], root / "pickle", tokenizer_from=base)
    paths["no_weights"] = _copy_model(bad_models["no_weights"], root / "no_weights", tokenizer_from=base)
    paths["truncated"] = _copy_model(bad_models["truncated_data"], root / "truncated", tokenizer_from=base)
    paths["missing_tensor"] = _copy_model(base, root / "missing_tensor")
    state = load_file(base / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, paths["missing_tensor"] / "model.safetensors")
    paths["wide"] = _copy_model(bad_models["wide"], root / "wide", tokenizer_from=base)
    config = json.loads((paths["wide"] / "config.json").read_text())
    (paths["wide"] / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))  # weights: 48

    data = root / "data"
    data.mkdir()
    paths["good"] = _jsonl(data / "good.jsonl", TEXTS)
    paths["empty_jsonl"] = data / "empty.jsonl"
    paths["empty_jsonl"].write_text("\n\n")
    paths["header_csv"] = data / "header.csv"
    paths["header_csv"].write_text("text,label\n")
    paths["blank_txt"] = data / "blank.txt"
    paths["blank_txt"].write_text("\n  \n")
    paths["other_field"] = _jsonl(data / "other.jsonl", TEXTS, field="content")
    paths["null_text"] = data / "null.jsonl"
    paths["null_text"].write_text('{"text": "w1 w2"}\n{"text": null}\n')
    paths["list_line"] = data / "list.jsonl"
    paths["list_line"].write_text('{"text": "w1 w2"}\n["w1", "w2"]\n')
    paths["empty_text"] = _jsonl(data / "empty_text.jsonl", ["w1 w2", "w3", ""])
    paths["binary"] = data / "weights.bin"
    paths["binary"].write_bytes(b"\x80\x81\xfe\xff" * 16)
    paths["not_a_dataset"] = data / "folder"
    paths["not_a_dataset"].mkdir()
    (paths["not_a_dataset"] / "notes.txt").write_text("w1 w2\n")
    paths["labelled"] = data / "labelled.csv"
    paths["labelled"].write_text("text,label\n" + "".join(f'"{t}",{i % 2}\n' for i, t in enumerate(TEXTS)))
    paths["bad_label"] = data / "bad_label.csv"
    paths["bad_label"].write_text("text,label\nw1 w2,0\nw3 w4,positive\n")
    paths["big_ids"] = _jsonl(data / "big_ids.jsonl", ["w1 w2", "w150 w3"])
    return paths


# (case, model, data, options, the error line's pattern)
REFUSED = [
    ("empty jsonl", "base", "empty_jsonl", [], r"empty\.jsonl holds no examples"),
    ("csv with only a header", "base", "header_csv", [], r"header\.csv holds no examples"),
    ("blank text file", "base", "blank_txt", [], r"blank\.txt holds no examples"),
    ("missing text field", "base", "other_field", [], r"example 1 has no field 'text' \(fields: content\); choose one "
                                                      r"with --text-field"),
    ("null text", "base", "null_text", [], r"example 2 has no value for 'text'"),
    ("a JSON list line", "base", "list_line", [], r"list\.jsonl line 2: a JSON list, expected one object per line"),
    ("an empty text", "base", "empty_text", [], r"example 3 has no tokens \(its text is empty\); remove it"),
    ("not text", "base", "binary", [], r"weights\.bin is not UTF-8 text"),
    ("a directory without a dataset", "base", "not_a_dataset", [],
     r"folder is a directory but not a saved `datasets` dataset .*give a data file"),
    ("missing data", "base", "nowhere.jsonl", [], r"data .*nowhere\.jsonl not found"),
    ("missing label field", "base", "good", ["--task", "seq-cls", "--label-field", "label"],
     r"good\.jsonl: example 1 has no field 'label' \(fields: text\); choose one with --label-field"),
    ("label not an integer", "base", "bad_label", ["--task", "seq-cls", "--label-field", "label"],
     r"example 2: label 'positive' is not an integer class index"),
    ("seq-cls without labels", "base", "good", ["--task", "seq-cls"], r"seq-cls needs labels: pass --label-field"),
    ("missing model", "missing_model", "good", [], r"model .*nowhere not found: .*never downloads"),
    ("no config.json", "no_config", "good", [], r"no_config has no config\.json"),
    ("broken config.json", "bad_config", "good", [], r"bad_config/config\.json: invalid JSON"),
    ("no tokenizer", "no_tokenizer", "good", [],
     r"no_tokenizer has no tokenizer .*copy the tokenizer files of the model it was fine-tuned from"),
    ("tokenizer larger than the embedding", "big_tokenizer", "big_ids", [],
     r"big_tokenizer: the tokenizer gives token id 154 \(example 2\), but the model's embedding has 100 rows .*"
     r"the tokenizer \(200 tokens\) is not this model's"),
    ("no weights", "no_weights", "good", [], r"no model weights found"),
    ("truncated weights", "truncated", "good", [],
     r"truncated(/model\.safetensors: not a readable safetensors file|: cannot read its weights)"),
    ("weights of other shapes", "wide", "good", [],
     r"'model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape .*the config and the weights are of different models"),
    ("a tensor missing", "missing_tensor", "good", [], r"the weights lack 'lm_head\.weight', which the causal-lm model "
                                                       r"needs; measuring would use random values"),
    ("a causal LM measured as a classifier", "base", "labelled", ["--task", "seq-cls", "--label-field", "label"],
     r"the weights lack 'score\.weight'.* pass --task causal-lm"),
    ("--batch-size 0", "base", "good", ["--batch-size", "0"], r"--batch-size 0: at least 1 example per batch"),
    ("--max-length 0", "base", "good", ["--max-length", "0"], r"--max-length 0: keep at least 1 token"),
    ("--max-length 1 for a causal LM", "base", "good", ["--max-length", "1"], r"--max-length 1: a causal LM predicts"),
    ("--max-examples 0", "base", "good", ["--max-examples", "0"], r"--max-examples 0: measure at least 1 example"),
    ("--samples 0", "base", "good", ["--fisher", "sampled", "--samples", "0"], r"--samples 0: draw at least 1"),
    ("--kind typo", "base", "good", ["--kind", "fishr"], r"unknown statistic kind 'fishr' \(did you mean 'fisher'\?\)"),
    ("--kind unknown", "base", "good", ["--kind", "hessian"], r"unknown statistic kind 'hessian' \(valid: fisher, "
                                                              r"gram, kfac\)"),
    ("--task typo", "base", "good", ["--task", "causal_lm"], r"--task causal_lm: not a task \(did you mean "
                                                             r"'causal-lm'\?\)"),
    ("--fisher typo", "base", "good", ["--fisher", "sampeld"],
     r"--fisher sampeld: expected empirical, sampled or exact \(did you mean 'sampled'\?\)"),
    ("--device typo", "base", "good", ["--device", "gpu"], r"--device gpu: not a device"),
    ("--exclude not a regex", "base", "good", ["--kind", "gram", "--exclude", "lm_head("],
     r"--exclude 'lm_head\(': not a regular expression"),
    ("--exclude matching nothing", "base", "good", ["--kind", "gram", "--exclude", "lm_haed"],
     r"--exclude 'lm_haed' matches no module with statistics to measure \(did you mean 'lm_head'\?\) \(modules are "
     r"named like 'model\.layers"),
    ("--exclude everything", "base", "good", ["--kind", "gram", "--exclude", "."],
     r"every Linear layer's gram statistics are excluded or over the factor budget"),
    ("--exclude every parameter", "base", "good", ["--exclude", "."], r"every parameter is excluded"),
    ("--max-factor-size unreadable", "base", "good", ["--max-factor-size", "lots"],
     r"--max-factor-size lots: write a size like 1GB"),
    ("--max-factor-size 0x", "base", "good", ["--max-factor-size", "0x"], r"--max-factor-size 0x: a multiple of the "
                                                                          r"model's size is a positive number"),
    ("a budget no factor fits", "base", "good", ["--kind", "kfac", "--max-factor-size", "100"],
     r"every Linear layer's kfac statistics are excluded or over the factor budget"),
]


@pytest.mark.parametrize("case,model,data,options,pattern", REFUSED, ids=[case[0] for case in REFUSED])
def test_measure_refuses_bad_input_in_one_line(cases, tmp_path, run_cli, case, model, data, options, pattern):
    data_path = cases.get(data, tmp_path / data)
    out = tmp_path / "out" / "stats"
    result = run_cli("measure", cases[model], "--data", data_path, *options, "-o", out)
    assert result.code == 2, result.stderr
    line = result.error_line
    assert line.startswith("error: ") and re.search(pattern, line), line
    assert not (tmp_path / "out").exists()  # nothing written, not even a temporary folder


def test_measure_refuses_cuda_where_there_is_none(cases, tmp_path, run_cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("measure", cases["base"], "--data", cases["good"], "--device", "cuda", "-o", tmp_path / "s")
    assert result.code == 2 and "--device cuda: no CUDA device is available here" in result.error_line


def test_a_checkpoint_s_code_never_runs(cases, bad_models, tmp_path, run_cli):
    """A config.json whose auto_map points at code that would leave a marker file, and a pickle that would:
    both are refused (the first with the flag that would allow it), and neither marker appears."""
    marker = tmp_path / "remote_code_ran"
    remote = _copy_model(cases["base"], tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    f"from transformers import LlamaConfig as EvilConfig\n"
                                    f"from transformers import LlamaForCausalLM as EvilModel\n")
    result = run_cli("measure", remote, "--data", cases["good"], "-o", tmp_path / "s1")
    assert result.code == 2
    assert "config.json asks to run code shipped with the model (auto_map: AutoConfig, AutoModelForCausalLM)" \
        in result.error_line and "--trust-remote-code" in result.error_line
    tokenizer_side = _copy_model(cases["base"], tmp_path / "remote_tokenizer")
    settings = json.loads((tokenizer_side / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (tokenizer_side / "tokenizer_config.json").write_text(json.dumps(settings))
    shutil.copy(remote / "evil.py", tokenizer_side / "evil.py")
    result = run_cli("measure", tokenizer_side, "--data", cases["good"], "-o", tmp_path / "s2")
    assert result.code == 2 and "tokenizer_config.json asks to run code" in result.error_line

    result = run_cli("measure", cases["pickle"], "--data", cases["good"], "-o", tmp_path / "s3")
    assert result.code == 2 and "weights_only" in result.error_line
    assert not marker.exists() and not bad_models["pickle_code_marker"].exists()
    assert not any((tmp_path / name).exists() for name in ("s1", "s2", "s3"))


def test_sequences_longer_than_the_model_are_truncated_to_its_maximum_once(cases, tmp_path, run_cli):
    """The tiny Llama takes 64 positions (max_position_embeddings): with the default --max-length 512 its
    examples are cut to 64 tokens, and one warning says so; a --max-length below the model's is the user's
    choice and cuts silently."""
    lengths = [100, 70, 5]
    data = _jsonl(tmp_path / "long.jsonl", [" ".join(f"w{i % 90}" for i in range(n)) for n in lengths])
    result = run_cli("measure", cases["base"], "--data", data, "--kind", "gram", "--batch-size", "2",
                     "-o", tmp_path / "s")
    assert result.code == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "longer than the model's maximum" in line]
    assert len(warned) == 1, result.stderr
    assert "2 of 3 examples (e.g. example 1 of" in warned[0] and \
        "maximum of 64 tokens (max_position_embeddings in config.json): they are truncated to 64 tokens" in warned[0]
    rows = StatsReader(tmp_path / "s").counts["gram/model.layers.0.mlp.down_proj"]
    assert rows == sum(min(n, 64) for n in lengths)

    chosen = run_cli("measure", cases["base"], "--data", data, "--kind", "gram", "--max-length", "32",
                     "-o", tmp_path / "t")
    assert chosen.code == 0 and "longer than" not in chosen.stderr
    assert StatsReader(tmp_path / "t").counts["gram/model.layers.0.mlp.down_proj"] == sum(min(n, 32) for n in lengths)


# ---------------------------------------------------------------------------------------------------------
# Bounded statistics


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def large_vocabulary(request, tmp_path_factory) -> Path:
    """A 1-layer Llama whose vocabulary (4000) is large against its width (32), with its own LM head or one
    tied to the embedding: the head's K-FAC output factor, 4000 × 4000 floats (64 MB), is 60 times the whole
    model (1.1 MB as float32, untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("large-vocabulary") / "model"
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=4000, num_hidden_layers=1, max_position_embeddings=64,
                         tie_word_embeddings=request.param)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    _word_tokenizer(directory, 4000)
    return directory


def test_the_default_budget_keeps_the_sidecar_o_model_size(large_vocabulary, tmp_path, run_cli):
    data = _jsonl(tmp_path / "data.jsonl", [f"w1 w{i} w3999 w{2 * i}" for i in range(1, 7)])
    result = run_cli("measure", large_vocabulary, "--data", data, "--kind", "fisher", "--kind", "gram",
                     "--kind", "kfac", "-o", tmp_path / "stats")
    assert result.code == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "not measured" in line]  # one `warning:` line
    assert len(warned) == 1 and "'lm_head' kfac not measured: kfac_g would be 4000×4000 float32 = 64.0 MB, over " \
        "--max-factor-size 1x" in warned[0], result.stderr
    sidecar_bytes = sum(f.stat().st_size for f in (tmp_path / "stats").iterdir())
    checkpoint_bytes = (large_vocabulary / "model.safetensors").stat().st_size
    assert sidecar_bytes <= 2.5 * checkpoint_bytes, (sidecar_bytes, checkpoint_bytes)
    stats = StatsReader(tmp_path / "stats")
    skipped = json.loads(stats.metadata["skipped"])
    assert list(skipped) == ["lm_head"] and skipped["lm_head"]["kinds"] == ["kfac_a", "kfac_g"]
    assert "kfac_g would be 4000×4000 float32 = 64.0 MB, over --max-factor-size 1x" in skipped["lm_head"]["reason"]
    keys = set(stats.keys())
    assert "kfac_g/lm_head" not in keys and "kfac_a/lm_head" not in keys and "gram/lm_head" in keys
    assert {"kfac_a/model.layers.0.mlp.down_proj", "kfac_g/model.layers.0.mlp.up_proj"} <= keys  # hidden layers kept
    assert "fisher/model.embed_tokens.weight" in keys


def _factor_stats(model: nn.Module, **options) -> dict:
    batch = {"x": torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0)),
             "mask": torch.ones(6, 3, dtype=torch.long)}

    def log_likelihood(m, b):
        return torch.log_softmax(m(b["x"]), -1)[..., 0].sum(-1)

    return measure(model, [batch], log_likelihood=log_likelihood, kinds=["fisher", "gram", "kfac"],
                   accumulate_dtype=torch.float64, **options)


def _wide_head_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 40))


def test_the_python_api_skips_exactly_what_it_records_and_nothing_else():
    """Excluding a layer and skipping another by the budget only removes their statistics: every other one is
    what the unrestricted measurement gives, and the model is left as it was (no parameter frozen)."""
    model = _wide_head_model()  # 352 parameters (1408 bytes); the head's K-FAC output factor is 40 × 40
    full = _factor_stats(model, max_factor_size=None)
    with pytest.warns(MergeWarning, match=r"'4' kfac not measured: kfac_g would be 40×40 float32 = 6.4 KB, over "
                                          r"--max-factor-size 1x \(1.4 KB, the model's size\)"):
        part = _factor_stats(model, exclude=[r"^2$"])
    assert all(p.requires_grad for p in model.parameters())
    assert part.skipped == {
        "2": {"kinds": ["fisher", "gram", "kfac_a", "kfac_g"], "reason": "excluded by --exclude '^2$'"},
        "4": {"kinds": ["kfac_a", "kfac_g"], "reason": "kfac: kfac_g would be 40×40 float32 = 6.4 KB, over "
                                                       "--max-factor-size 1x (1.4 KB, the model's size)"}}
    gone = {"fisher/2.weight", "fisher/2.bias", "gram/2", "kfac_a/2", "kfac_g/2", "kfac_a/4", "kfac_g/4"}
    assert set(part.tensors) == set(full.tensors) - gone
    for key, value in part.tensors.items():
        torch.testing.assert_close(value, full.tensors[key], rtol=1e-12, atol=1e-15, msg=key)
        assert part.counts[key] == full.counts[key]
    budget = _factor_stats(model, max_factor_size="7KB")  # a byte budget: 6.4 KB fits
    assert budget.skipped == {} and set(budget.tensors) == set(full.tensors)


@pytest.mark.parametrize("value,expected", [
    ("1GB", FactorBudget("1GB", size=10 ** 9)), ("500MiB", FactorBudget("500MiB", size=500 * 2 ** 20)),
    (4096, FactorBudget("4096", size=4096)), ("1x", FactorBudget("1x", multiple=1.0)),
    (" 0.5X ", FactorBudget("0.5X", multiple=0.5)), ("none", None), (None, None),
])
def test_factor_budget_values(value, expected):
    assert parse_factor_budget(value) == expected


@pytest.mark.parametrize("value", ["lots", "0x", "-1x", "x", "infx", "0", -5, "1 GB per layer"])
def test_factor_budget_refuses_what_it_cannot_read(value):
    with pytest.raises(UsageError, match=r"--max-factor-size"):
        parse_factor_budget(value)


@pytest.fixture(scope="module")
def bounded(llama, tmp_path_factory) -> dict[str, Path]:
    """Two Llama fine-tunes (with the base's tokenizer) measured with a 20KB factor budget, which skips the LM
    head's K-FAC (its output factor is 100 × 100 floats, 40 KB; every other factor is at most 64 × 64, 16 KB),
    and with the second layer's down projection excluded."""
    from typer.testing import CliRunner

    from mergesmith.cli import app

    root = tmp_path_factory.mktemp("bounded")
    data = _jsonl(root / "data.jsonl", TEXTS)
    paths = {"data": data}
    for name in ("ft1", "ft2"):
        paths[name] = _copy_model(llama[name], root / name, tokenizer_from=llama["base"])
        result = CliRunner().invoke(app, ["measure", str(paths[name]), "--data", str(data), "--kind", "fisher",
                                          "--kind", "gram", "--kind", "kfac", "--max-factor-size", "20KB",
                                          "--exclude", r"layers\.1\.mlp\.down_proj", "-o", str(root / f"s-{name}")])
        assert result.exit_code == 0, result.output
        paths[f"s-{name}"] = root / f"s-{name}"
    return paths


def test_a_sidecar_records_what_was_skipped_and_why(bounded):
    stats = StatsReader(bounded["s-ft1"])
    assert json.loads(stats.metadata["skipped"]) == {
        "lm_head": {"kinds": ["kfac_a", "kfac_g"],
                    "reason": "kfac: kfac_g would be 100×100 float32 = 40.0 KB, over --max-factor-size 20KB"},
        "model.layers.1.mlp.down_proj": {"kinds": ["fisher", "gram", "kfac_a", "kfac_g"],
                                         "reason": r"excluded by --exclude 'layers\.1\.mlp\.down_proj'"}}
    keys = set(stats.keys())
    assert not {"kfac_a/lm_head", "kfac_g/lm_head", "gram/model.layers.1.mlp.down_proj",
                "fisher/model.layers.1.mlp.down_proj.weight"} & keys
    assert {"gram/lm_head", "fisher/lm_head.weight", "kfac_g/model.layers.0.mlp.down_proj"} <= keys


def test_stats_inspect_lists_what_was_skipped(bounded, run_cli):
    result = run_cli("stats", "inspect", bounded["s-ft1"])
    assert result.code == 0, result.stderr
    assert ("skipped at measure time: lm_head (kfac_a, kfac_g): kfac: kfac_g would be 100×100 float32 = 40.0 KB, "
            "over --max-factor-size 20KB") in result.stdout
    assert "skipped at measure time: model.layers.1.mlp.down_proj (fisher, gram, kfac_a, kfac_g)" in result.stdout


@pytest.mark.parametrize("method,parameters,fallback", [
    ("mats", {"precision": "kfac", "init": "average", "tol": 1e-7, "damping": 1e-2},
     ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"]),
    ("regmean", {"alpha": 0.95}, ["model.layers.1.mlp.down_proj.weight"]),
])
def test_a_merge_gives_skipped_modules_the_method_s_fallback(bounded, tmp_path, run_cli, write_recipe, method,
                                                             parameters, fallback):
    recipe = {"merge_method": method, "parameters": parameters,
              "models": [{"model": str(bounded[m]), "stats": str(bounded[f"s-{m}"])} for m in ("ft1", "ft2")]}
    from mergesmith.api import merge

    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 0, result.stderr
    assert "took the method's fallback" in result.stdout + result.stderr
    summary = merge(recipe, tmp_path / "again")  # the same merge from Python, for the whole fallback list
    assert set(fallback) <= set(summary.fallback)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    tunes = [load_file(bounded[m] / "model.safetensors") for m in ("ft1", "ft2")]
    for name in fallback:  # the fallback of both: the (equally weighted) average
        torch.testing.assert_close(merged[name], (tunes[0][name] + tunes[1][name]) / 2, rtol=1e-6, atol=1e-7)
    moved = [name for name in merged if ".mlp.up_proj" in name and not torch.allclose(
        merged[name], (tunes[0][name] + tunes[1][name]) / 2, rtol=1e-4, atol=1e-6)]
    assert moved  # the layers that were measured did use their statistics


def test_a_module_skipped_in_one_sidecar_only_is_explained(bounded, tmp_path, run_cli, write_recipe):
    """ft1's sidecar skipped the LM head's K-FAC, ft2's (default budget) has it: the merge cannot combine
    them, and says that the statistic was skipped at measure time, by which rule."""
    result = run_cli("measure", bounded["ft2"], "--data", bounded["data"], "--kind", "kfac", "--exclude",
                     r"layers\.1\.mlp\.down_proj", "-o", tmp_path / "full")
    assert result.code == 0, result.stderr
    recipe = {"merge_method": "mats", "parameters": {"precision": "kfac", "init": "average"},
              "models": [{"model": str(bounded["ft1"]), "stats": str(bounded["s-ft1"])},
                         {"model": str(bounded["ft2"]), "stats": str(tmp_path / "full")}]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 2
    line = result.error_line
    assert re.search(r"model '.*ft1' has no 'kfac_[ag]' statistic for 'lm_head\.weight' while other models do: its "
                     r"sidecar .*s-ft1\S* records", line), line
    assert "records module 'lm_head' as skipped at measure time (kfac: kfac_g would be 100×100 float32 = 40.0 KB, " \
           "over --max-factor-size 20KB)" in line
    assert "measure every model with the same --exclude and --max-factor-size" in line
    assert not (tmp_path / "out").exists()


def test_a_damaged_skipped_record_is_one_line(bounded, tmp_path, run_cli, write_recipe):
    broken = tmp_path / "broken"
    shutil.copytree(bounded["s-ft2"], broken)
    file = broken / "stats.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(file), metadata={**metadata, "skipped": '["lm_head"]'})
    recipe = {"merge_method": "regmean", "models": [{"model": str(bounded["ft1"]), "stats": str(bounded["s-ft1"])},
                                                    {"model": str(bounded["ft2"]), "stats": str(broken)}]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out")
    assert result.code == 2 and "the metadata's 'skipped' is not a JSON object" in result.error_line


def test_fisher_exclusion_follows_the_parameter_s_module(tied_llama, tmp_path, run_cli):
    """A tied LM head shares the embedding's parameter, named after the embedding: excluding 'lm_head' leaves
    out its Gram and K-FAC factors but not the embedding's Fisher; excluding the embedding leaves that out."""
    model = _copy_model(tied_llama["base"], tmp_path / "tied")
    _word_tokenizer(model, 100)
    data = _jsonl(tmp_path / "data.jsonl", TEXTS)
    common = ["measure", model, "--data", data, "--kind", "fisher", "--kind", "gram"]
    result = run_cli(*common, "--exclude", "lm_head", "-o", tmp_path / "a")
    assert result.code == 0, result.stderr
    a = StatsReader(tmp_path / "a")
    assert "gram/lm_head" not in a.keys() and "fisher/model.embed_tokens.weight" in a.keys()
    assert json.loads(a.metadata["skipped"])["lm_head"]["kinds"] == ["gram"]
    result = run_cli(*common, "--exclude", "embed_tokens", "-o", tmp_path / "b")
    assert result.code == 0, result.stderr
    b = StatsReader(tmp_path / "b")
    assert "fisher/model.embed_tokens.weight" not in b.keys() and "gram/lm_head" in b.keys()
    for key in set(a.keys()) & set(b.keys()):  # the other statistics do not change
        torch.testing.assert_close(b.get(key), a.get(key), rtol=1e-5, atol=1e-8, msg=key)
    assert b.counts["fisher/model.norm.weight"] == len(TEXTS)


def test_stats_combine_keeps_what_was_skipped_and_refuses_to_mix_rules(bounded, tmp_path, run_cli):
    both = tmp_path / "both"
    result = run_cli("stats", "combine", bounded["s-ft1"], bounded["s-ft1"], "-o", both)
    assert result.code == 0, result.stderr
    assert StatsReader(both).metadata["skipped"] == StatsReader(bounded["s-ft1"]).metadata["skipped"]
    unbounded, same = tmp_path / "unbounded", StatsReader(bounded["s-ft1"])  # the same, minus its skip record
    save_stats(unbounded, {k: same.get(k) for k in same.keys()}, same.counts, model=same.model,
               fisher_variant=same.fisher_variant, fingerprints=json.loads(same.metadata["fingerprints"]),
               transposed=json.loads(same.metadata.get("transposed", "[]")))
    result = run_cli("stats", "combine", bounded["s-ft1"], unbounded, "-o", tmp_path / "mixed")
    assert result.code == 2 and "skipped different modules" in result.error_line
    assert not (tmp_path / "mixed").exists()
