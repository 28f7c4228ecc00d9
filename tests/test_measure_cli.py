"""`mergesmith measure` and `mergesmith stats` on a real (tiny) Hugging Face checkpoint and local data."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesmith.io.sidecar import StatsReader
from mergesmith.measure import measure
from mergesmith.measure.hf import batches, causal_lm_log_likelihood

TEXTS = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11 w12", "w3 w3 w3", "w20 w21 w22"]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS))
    return path


def test_cli_measure_reproduces_the_python_api(llama, jsonl, tmp_path, run_cli):
    result = run_cli("measure", llama["base"], "--data", jsonl, "--text-field", "content", "--kind", "fisher",
                     "--kind", "gram", "--batch-size", "2", "-o", tmp_path / "stats")
    assert result.code == 0, result.stderr
    written = StatsReader(tmp_path / "stats")
    model = AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llama["base"])
    examples = [{"text": t} for t in TEXTS]
    # a different batching of the same examples: the means must not depend on it
    expected = measure(model, batches(examples, tokenizer, batch_size=5, max_length=512, device=torch.device("cpu")),
                       log_likelihood=causal_lm_log_likelihood, kinds=["fisher", "gram"])
    assert set(written.keys()) == set(expected.tensors)
    assert written.counts == expected.counts
    assert written.counts["fisher/model.embed_tokens.weight"] == len(TEXTS)
    for key, value in expected.tensors.items():  # float32 sums in another order: compare in norm
        assert torch.linalg.norm(written.get(key) - value) <= 1e-5 * torch.linalg.norm(value), key
    inspect = run_cli("stats", "inspect", tmp_path / "stats")
    assert inspect.code == 0 and "gram/model.layers.0.mlp.up_proj" in inspect.stdout + inspect.stderr


@pytest.mark.parametrize("content,field,pattern", [
    ("", "text", r"holds no examples"),
    ('{"content": "w1 w2"}\n', "text", r"has no field 'text'.*--text-field"),
    ("not json\n", "text", r"line 1: invalid JSON"),
])
def test_cli_measure_bad_data_is_one_line(llama, tmp_path, run_cli, content, field, pattern):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    result = run_cli("measure", llama["base"], "--data", data, "--text-field", field, "-o", tmp_path / "stats")
    assert result.code == 2
    assert result.error_line.startswith("error:")
    assert re.search(pattern, result.error_line)
    assert not (tmp_path / "stats").exists()


def test_torchrun_two_processes_give_the_single_process_sidecar(llama, jsonl, tmp_path):
    """Data parallel: 2 CPU processes (gloo), each measuring its share, all-reduce to the same sidecar."""
    import subprocess
    import sys

    common = ["measure", str(llama["base"]), "--data", str(jsonl), "--text-field", "content", "--kind", "fisher",
              "--kind", "gram", "--kind", "kfac", "--batch-size", "2"]
    single = subprocess.run([sys.executable, "-m", "mergesmith.cli", *common, "-o", str(tmp_path / "one")],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    for _attempt in range(2):  # a second launch only if the first failed to start (e.g. a rendezvous port clash)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "mergesmith.cli", *common, "-o", str(tmp_path / "two")]
        launched = subprocess.run(command, capture_output=True, text=True)
        if launched.returncode == 0:
            break
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = StatsReader(tmp_path / "one"), StatsReader(tmp_path / "two")
    assert one.counts == two.counts and one.model == two.model
    for key in one.keys():
        expected = one.get(key)
        assert torch.linalg.norm(two.get(key) - expected) <= 1e-5 * torch.linalg.norm(expected), key


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, llama):
    """A 2-class BERT sharing the Llama fixture's word-level tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_labels=2, pad_token_id=3)
    BertForSequenceClassification(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(llama["base"]).save_pretrained(directory)
    return directory


def test_cli_measure_sequence_classifier_from_csv(tiny_classifier, tmp_path, run_cli):
    data = tmp_path / "data.csv"
    data.write_text("sentence,label\n" + "".join(f'"{t}",{i % 2}\n' for i, t in enumerate(TEXTS)))
    result = run_cli("measure", tiny_classifier, "--data", data, "--text-field", "sentence", "--label-field",
                     "label", "--kind", "fisher", "-o", tmp_path / "stats")
    assert result.code == 0, result.stderr
    stats = StatsReader(tmp_path / "stats")
    assert stats.fisher_variant == "empirical"
    assert stats.counts["fisher/classifier.weight"] == len(TEXTS)
    assert float(stats.get("fisher/classifier.weight").sum()) > 0


def test_cli_measure_rejects_labels_outside_the_classes(tiny_classifier, tmp_path, run_cli):
    data = tmp_path / "data.csv"
    data.write_text("text,label\nw1 w2,0\nw3 w4,2\n")
    result = run_cli("measure", tiny_classifier, "--data", data, "--label-field", "label", "-o", tmp_path / "s")
    assert result.code == 2
    assert re.search(r"example 2 has label 2, outside the model's 2 classes", result.error_line)
    assert not (tmp_path / "s").exists()


def test_cli_measure_unwritable_output_is_one_line(llama, jsonl, tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("measure", llama["base"], "--data", jsonl, "--text-field", "content", "--kind", "gram",
                     "-o", blocker / "stats")
    assert result.code == 2
    assert re.search(r"cannot write statistics to .*file/stats", result.error_line)


def test_cli_measure_exact_fisher_of_a_classifier(tiny_classifier, tmp_path, run_cli):
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{i % 2}\n' for i, t in enumerate(TEXTS)))
    result = run_cli("measure", tiny_classifier, "--data", data, "--label-field", "label", "--fisher", "exact",
                     "-o", tmp_path / "stats")
    assert result.code == 0, result.stderr
    assert StatsReader(tmp_path / "stats").fisher_variant == "exact"
    refused = run_cli("measure", tiny_classifier, "--data", data, "--label-field", "label", "--fisher", "typo",
                      "-o", tmp_path / "other")
    assert refused.code == 2 and "expected empirical, sampled or exact" in refused.error_line
