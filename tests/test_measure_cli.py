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
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "file"]  # no temporary left behind


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


def _reference_sampled_fisher(model_dir, texts, *, batch_size, samples, seed):
    """The sampled Fisher by brute force: the labels the sampler draws for the CLI's batches (the same seeded
    draws from the same float32 logits), then one float64 backward pass per example and draw of
    Σ_t log p(ŷ_t | x_≤t), written here from the logits."""
    from mergesmith.measure.hf import causal_lm_fisher_labels

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model64 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    draw = causal_lm_fisher_labels(samples, seed=seed)
    params = dict(model64.named_parameters())
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for batch in batches([{"text": t} for t in texts], tokenizer, batch_size=batch_size, max_length=512,
                         device=torch.device("cpu")):
        for _weights, labelled in draw(model, batch):
            for n in range(batch["input_ids"].shape[0]):
                length = int(batch["attention_mask"][n].sum())
                logits = model64(input_ids=batch["input_ids"][n:n + 1, :length]).logits[0]
                logp = torch.log_softmax(logits[:-1], dim=-1)  # row t: p(· | x_0..x_t)
                targets = labelled["labels"][n, :length - 1]
                total = logp[torch.arange(length - 1), targets].sum()
                for (name, _), g in zip(params.items(), torch.autograd.grad(total, list(params.values()))):
                    expected[name] += g.square() / (len(texts) * samples)
    return expected


def test_cli_sampled_fisher_of_a_causal_lm(llama, jsonl, tmp_path, run_cli):
    common = ["measure", llama["base"], "--data", jsonl, "--text-field", "content", "--fisher", "sampled",
              "--samples", "2", "--batch-size", "2"]
    for name, seed in (("a", "3"), ("again", "3"), ("other", "4")):
        result = run_cli(*common, "--seed", seed, "-o", tmp_path / name)
        assert result.code == 0, result.stderr
    written = StatsReader(tmp_path / "a")
    assert written.fisher_variant == "sampled"
    assert written.counts["fisher/lm_head.weight"] == len(TEXTS)
    expected = _reference_sampled_fisher(llama["base"], TEXTS, batch_size=2, samples=2, seed=3)
    assert set(written.keys()) == {f"fisher/{name}" for name in expected}
    for name, value in expected.items():
        got = written.get(f"fisher/{name}").double()
        assert torch.linalg.norm(got - value) <= 1e-5 * torch.linalg.norm(value), name
    # the same seed gives the same sidecar, bit for bit; another seed other draws
    again, other = StatsReader(tmp_path / "again"), StatsReader(tmp_path / "other")
    assert all(torch.equal(written.get(key), again.get(key)) for key in written.keys())
    assert not torch.equal(written.get("fisher/lm_head.weight"), other.get("fisher/lm_head.weight"))


def test_cli_refuses_the_exact_fisher_of_a_causal_lm_and_zero_samples(llama, jsonl, tmp_path, run_cli):
    common = ["measure", llama["base"], "--data", jsonl, "--text-field", "content", "-o", tmp_path / "stats"]
    exact = run_cli(*common, "--fisher", "exact")
    assert exact.code == 2
    assert re.search(r"--fisher exact is intractable for causal-lm .*use --fisher sampled", exact.error_line)
    none = run_cli(*common, "--fisher", "sampled", "--samples", "0")
    assert none.code == 2 and "--samples 0: draw at least 1" in none.error_line
    bad_size = run_cli(*common, "--max-shard-size", "lots")
    assert bad_size.code == 2 and "cannot read size 'lots'" in bad_size.error_line
    assert not (tmp_path / "stats").exists()


def test_cli_sharded_sidecar_measure_inspect_combine(llama, jsonl, tmp_path, run_cli):
    common = ["measure", llama["base"], "--data", jsonl, "--text-field", "content", "--kind", "fisher", "--kind",
              "gram"]
    assert run_cli(*common, "-o", tmp_path / "single").code == 0
    result = run_cli(*common, "--max-shard-size", "30KB", "-o", tmp_path / "sharded")
    assert result.code == 0, result.stderr
    assert not (tmp_path / "sharded" / "stats.safetensors").exists()
    index = json.loads((tmp_path / "sharded" / "stats.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(re.fullmatch(rf"stats-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    single, sharded = StatsReader(tmp_path / "single"), StatsReader(tmp_path / "sharded")
    assert sharded.counts == single.counts and sharded.model == single.model
    assert sorted(sharded.keys()) == sorted(single.keys())
    assert all(torch.equal(sharded.get(key), single.get(key)) for key in single.keys())

    inspect = run_cli("stats", "inspect", tmp_path / "sharded")
    assert inspect.code == 0, inspect.stderr
    assert f"{len(shards)} shards" in inspect.stdout and "gram/model.layers.1.mlp.down_proj" in inspect.stdout

    # combine a sharded sidecar (first two texts) with a single-file one (the rest): count-weighted means
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS[:2]))
    rest = tmp_path / "rest.jsonl"
    rest.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS[2:]))
    common = ["measure", llama["base"], "--text-field", "content", "--kind", "fisher", "--kind", "gram"]
    assert run_cli(*common, "--data", half, "--max-shard-size", "30KB", "-o", tmp_path / "a").code == 0
    assert run_cli(*common, "--data", rest, "-o", tmp_path / "b").code == 0
    combined = run_cli("stats", "combine", tmp_path / "a", tmp_path / "b", "--max-shard-size", "50KB",
                       "-o", tmp_path / "ab")
    assert combined.code == 0, combined.stderr
    a, b, ab = StatsReader(tmp_path / "a"), StatsReader(tmp_path / "b"), StatsReader(tmp_path / "ab")
    assert len(a.files) > 1 and len(b.files) == 1 and len(ab.files) > 1
    for key in a.keys():
        n, m = a.counts[key], b.counts[key]
        expected = (a.get(key).double() * n + b.get(key).double() * m) / (n + m)
        assert ab.counts[key] == n + m
        torch.testing.assert_close(ab.get(key).double(), expected, rtol=1e-6, atol=1e-12, msg=key)
    assert ab.counts["fisher/lm_head.weight"] == len(TEXTS)

    ab.files[-1].unlink()
    damaged = run_cli("stats", "inspect", tmp_path / "ab")
    assert damaged.code == 2
    assert re.search(rf"{ab.files[-1].name}: shard named in stats.safetensors.index.json is missing; copy the whole "
                     rf"sidecar directory, or measure again", damaged.error_line)


def test_cli_model_without_linear_layers_is_one_line_for_gram(llama, jsonl, tmp_path, run_cli, monkeypatch):
    """No Hugging Face architecture lacks Linear (or GPT-2 Conv1D) layers, but a --trust-remote-code model may:
    this one stands in for it at load_model, the one place the CLI gets its model, and everything after
    (data, tokenizer, measuring, writing) is the real path."""
    from transformers.modeling_outputs import CausalLMOutput

    import mergesmith.measure.hf as hf

    class BagOfEmbeddingsLM(torch.nn.Module):
        """Logits from the running mean of the token embeddings, read out through the same (tied) table."""

        def __init__(self, vocab: int = 100, width: int = 8):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)

        def forward(self, input_ids, attention_mask):
            h = self.embed(input_ids) * attention_mask[..., None]
            h = h.cumsum(1) / attention_mask.cumsum(1).clamp(min=1)[..., None]
            return CausalLMOutput(logits=h @ self.embed.weight.T)

    tokenizer = AutoTokenizer.from_pretrained(llama["base"])
    monkeypatch.setattr(hf, "load_model", lambda *args, **kwargs: (BagOfEmbeddingsLM().eval(), tokenizer))
    for kinds in (["--kind", "gram"], ["--kind", "fisher", "--kind", "kfac"]):
        result = run_cli("measure", llama["base"], "--data", jsonl, "--text-field", "content", *kinds,
                         "-o", tmp_path / "out" / "stats")
        assert result.code == 2
        assert re.search(r"BagOfEmbeddingsLM has no Linear layers: gram and kfac statistics need them",
                         result.error_line)
        assert not (tmp_path / "out").exists()
    # the stand-in is a working model: its Fisher (which needs no Linear layer) is measured
    assert run_cli("measure", llama["base"], "--data", jsonl, "--text-field", "content",
                   "-o", tmp_path / "out" / "stats").code == 0
    assert StatsReader(tmp_path / "out" / "stats").counts["fisher/embed.weight"] == len(TEXTS)


def test_cli_write_failure_leaves_no_partial_sidecar(llama, jsonl, tmp_path, run_cli, monkeypatch):
    """The disk fills up after the first shard: one line, and nothing at (or beside) the output path."""
    import mergesmith.io.sidecar as sidecar

    real_save_file, calls = sidecar.save_file, []

    def disk_full_after_one_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(sidecar, "save_file", disk_full_after_one_shard)
    out = tmp_path / "out" / "stats"
    result = run_cli("measure", llama["base"], "--data", jsonl, "--text-field", "content", "--kind", "fisher",
                     "--max-shard-size", "30KB", "-o", out)
    assert result.code == 2
    assert re.search(r"cannot write statistics to .*out/stats: No space left on device", result.error_line)
    assert len(calls) == 2 and not out.exists() and list(out.parent.iterdir()) == []


def test_cli_output_that_is_a_file_is_refused_before_measuring(llama, jsonl, tmp_path, run_cli, monkeypatch):
    import mergesmith.measure.hf as hf

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the output cannot be written")

    monkeypatch.setattr(hf, "load_model", never)
    existing = tmp_path / "stats"
    existing.write_text("someone's file")
    result = run_cli("measure", llama["base"], "--data", jsonl, "--text-field", "content", "-o", existing)
    assert result.code == 2
    assert re.search(r"cannot write statistics to .*stats: it exists and is not a directory", result.error_line)
    combined = run_cli("stats", "combine", tmp_path / "nowhere", "-o", existing)
    assert combined.code == 2 and "it exists and is not a directory" in combined.error_line
    assert existing.read_text() == "someone's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "stats"]


def test_measure_checkpoint_is_what_the_cli_saves(llama, jsonl, tmp_path, run_cli):
    """The library entry point (mergesmith.measure_checkpoint) and the CLI are one path: same tensors, bit for
    bit, from a data file and from the same examples given as a list."""
    import mergesmith
    from mergesmith.io.sidecar import StatsReader

    result = run_cli("measure", llama["base"], "--data", jsonl, "--text-field", "content", "--kind", "fisher",
                     "--kind", "kfac", "--batch-size", "3", "-o", tmp_path / "cli")
    assert result.code == 0, result.stderr
    cli = StatsReader(tmp_path / "cli")
    from_file = mergesmith.measure_checkpoint(llama["base"], jsonl, text_field="content", kinds=["fisher", "kfac"],
                                              batch_size=3)
    from_list = mergesmith.measure_checkpoint(llama["base"], [{"text": t} for t in TEXTS], kinds=["fisher", "kfac"],
                                              batch_size=3)
    assert from_file.examples == from_list.examples == len(TEXTS) and from_file.kinds == ["fisher", "kfac"]
    for run in (from_file, from_list):
        assert set(run.statistics.tensors) == set(cli.keys())
        assert all(torch.equal(run.statistics.tensors[k], cli.get(k)) for k in cli.keys())
