"""The quality benchmark's protocol: fine-tune one start per task, merge the fine-tunes with every
registered method, score the merged body with each task's own head.

A suite (``mergesmith.quality.text``, ``mergesmith.quality.vision``) supplies a pretrained start, tasks with
train/validation/test splits and the model inputs of a batch. Per seed (= the data split and the
fine-tuning seed):

1. every task's head is a linear probe of the frozen start's features (the input of ``model.classifier``),
   or, where the suite says ``HEADS = "random"``, a fixed random head on them;
2. every fine-tune trains the body for a fixed number of AdamW steps with that head frozen (so the
   start, the fine-tunes and every merge are scored with the same heads), and is saved as a Hugging Face
   directory; the multitask reference trains one body on all tasks in turn, with the same total steps;
3. each fine-tune's statistics (Fisher, Gram, K-FAC) are measured once, with ``measure_checkpoint``, on its
   own training examples, and every data-aware method reuses the sidecar;
4. every method variant with a tuning grid in the registry is merged at each grid point with
   ``mergesmith.merge`` (``heads: each``), the point with the best mean normalised validation accuracy is
   kept, and its test accuracy is reported. Normalised accuracy is accuracy ÷ the task's own fine-tune's.
   The ``DAMAGE_ROWS`` have one point whose recipe carries a ``tune:`` block: the merge chooses its
   coefficients on predicted damage (``mergesmith.tune``), with no validation data; the ``VALIDATION_ROWS``
   choose them on each task's validation split instead (``tune:`` with ``data:``);
5. the chosen point's predicted damage (``mergesmith.predict_damage``, every model's sidecar and the start
   in the recipe, whatever the method reads) is recorded per task, to set against the measured loss.

A suite with ``LORA = {...}`` (``peft.LoraConfig`` options) fine-tunes PEFT LoRA adapters instead of whole
bodies: each task's head is saved inside its adapter (``modules_to_save``, frozen), the multitask reference is
one adapter of the same settings, statistics are measured on the adapter directories, and the recipes merge the
adapter directories over the start (``base_model``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mergesmith
from mergesmith.io.card import copy_tokenizer
from mergesmith.methods.registry import TUNING_POINTS, get_method, method_names
from mergesmith.quality.tasks import Task

Progress = Callable[[str], Any]  # a context manager factory: with progress("fine-tuning ..."): ...
KINDS = ("fisher", "gram", "kfac")
QUICK_TASKS = 3  # --quick merges the first three tasks only: a smoke test of the pipeline, not a measurement


@dataclass
class Head:
    weight: Tensor  # (classes, features)
    bias: Tensor

    def tensors(self) -> dict[str, Tensor]:
        return {"classifier.weight": self.weight, "classifier.bias": self.bias}


@dataclass
class Variant:
    """One row of the benchmark: a method with fixed settings, tuned over ``grid`` on validation, or, with
    ``tune`` (a recipe's ``tune:`` block), one point whose coefficients the merge chooses on predicted damage."""

    label: str
    method: str
    grid: list[dict[str, Any]]
    data_aware: bool
    tune: dict[str, Any] | None = None


# Rows tuned on the damage surrogate: (label, method, the one point's fixed parameters, its tune: block). TIES's
# search starts at the centre of its box; Fisher merging keeps the committed fisher row's choice (global
# normalisation on all eight seeds of the three suites, the floor 1e-10 on six) and tunes the weights λ_i.
DAMAGE_ROWS = (
    ("task_arithmetic[damage]", "task_arithmetic", {"lambda": 1.0}, {"parameters": ["weight"], "objective": "sum"}),
    ("ties[damage]", "ties", {"density": 0.55, "lambda": 0.8},
     {"parameters": ["density", "lambda"], "objective": "sum", "shared": ["density"],
      "bounds": {"density": [0.1, 1.0], "lambda": [0.1, 1.5]}, "trials": 24}),
    ("fisher[damage]", "fisher", {"fisher_normalize": "global", "fisher_floor": 1e-10},
     {"parameters": ["weight"], "objective": "sum", "bounds": {"weight": [0.05, 3.0]}, "trials": 24}),
)
# Rows tuned on validation data: each task's validation split, in measure's JSONL format, is its model's
# tune.data (VALIDATION_DATA stands in the results for the files a seed writes). Task arithmetic's per-model
# weights are the coefficients a user would tune (mergekit-evolve's, AdaMerging's), scored by log-likelihood:
# smoother than accuracy on 120 examples a task, so the search sees small steps.
VALIDATION_DATA = "each task's validation split"
VALIDATION_ROWS = (
    ("task_arithmetic[validation]", "task_arithmetic", {"lambda": 1.0},
     {"parameters": ["weight"], "objective": "loglik", "bounds": {"weight": [0.0, 1.5]}, "trials": 48,
      "data": VALIDATION_DATA}),
)
QUICK_TRIALS = 4  # --quick: a search of a few merge passes, enough to run every step of it


def damage_variants(*, quick: bool = False) -> list[Variant]:
    """The ``DAMAGE_ROWS`` and ``VALIDATION_ROWS`` (``quick``: at most ``QUICK_TRIALS`` merge passes per
    search)."""
    rows = []
    for label, method, point, spec in (*DAMAGE_ROWS, *VALIDATION_ROWS):
        tune = {**spec, "trials": min(spec["trials"], QUICK_TRIALS)} if quick and "trials" in spec else dict(spec)
        rows.append(Variant(label, method, [dict(point)], True, tune))
    return rows


def on_validation(row: Variant) -> bool:
    return row.tune is not None and "data" in row.tune


def variants(n_models: int, *, quick: bool = False) -> list[Variant]:
    """Every registered method that can merge ``n_models`` fine-tunes and declares a tuning grid, one row per
    variant (``quick``: only each grid's middle point, and no variant the method calls heavy), then the rows
    tuned on predicted damage."""
    rows = []
    for name in method_names():
        method = get_method(name)
        for label, grid in method.grid(n_models).items():
            if quick and label in method.heavy:
                continue
            if not 1 <= len(grid) <= TUNING_POINTS:
                raise ValueError(f"method '{name}' declares {len(grid)} tuning points for '{label}'; give 1 to "
                                 f"{TUNING_POINTS}")
            rows.append(Variant(label, name, [grid[len(grid) // 2]] if quick else list(grid),
                                method.needs is not None))
    return rows + [row for row in damage_variants(quick=quick) if _fits(row.method, n_models)]


def _fits(method: str, n_models: int) -> bool:
    declared = get_method(method)
    return declared.min_models <= n_models <= (declared.max_models or n_models)


def suite_tasks(suite: ModuleType, seed: int, *, quick: bool) -> list[Task]:
    tasks = suite.make_tasks(seed, quick=quick)
    return tasks[:QUICK_TASKS] if quick else tasks


# ---- models -----------------------------------------------------------------------------------------------

def auto_class(directory: Path) -> Any:
    """The Auto class that loads the classifier in ``directory`` (sequence or image classification)."""
    import transformers

    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or [""]
    if architectures[0].endswith("ForImageClassification"):
        return transformers.AutoModelForImageClassification
    return transformers.AutoModelForSequenceClassification


def load(directory: Path, **options: Any) -> nn.Module:
    return auto_class(directory).from_pretrained(directory, local_files_only=True, **options)


@contextmanager
def head_on(model: nn.Module, head: Head) -> Iterator[nn.Module]:
    """``model`` with ``head`` in place of its classifier's output (the classifier's input is the feature)."""
    handle = model.classifier.register_forward_hook(lambda _m, inputs, _out: F.linear(inputs[0], head.weight,
                                                                                    head.bias))
    try:
        yield model
    finally:
        handle.remove()


def features(model: nn.Module, suite: ModuleType, examples: list[dict[str, Any]], batch_size: int = 64) -> Tensor:
    """The classifier's inputs for ``examples`` (the start's frozen features for a linear probe)."""
    captured: list[Tensor] = []
    handle = model.classifier.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    try:
        model.eval()
        with torch.inference_mode():
            for i in range(0, len(examples), batch_size):
                model(**suite.inputs(examples[i:i + batch_size]))
    finally:
        handle.remove()
    return torch.cat(captured)


def linear_probe(x: Tensor, labels: Tensor, classes: int, *, steps: int = 100,
                 weight_decay: float = 1e-3) -> Head:
    """Multinomial logistic regression on fixed features with an L2 penalty, solved by full-batch L-BFGS
    (the objective is convex, so this is its optimum, whatever the seed)."""
    x = x.double()
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return Head(weight.detach().float(), bias.detach().float())


RANDOM_HEAD_SPREAD = 2.0  # the standard deviation of a random head's logits on the start's features


def random_head(x: Tensor, classes: int, generator: torch.Generator) -> Head:
    """A fixed random head (Hoffer et al., "Fix your classifier", 2018): unit-norm Gaussian directions,
    centred on the start's mean feature and scaled so that the start's logits have a standard deviation of
    ``RANDOM_HEAD_SPREAD``. The start is then at chance, and a fine-tune has to put all of its task into the
    body, as a CLIP fine-tune must put into it whatever its zero-shot head does not already know."""
    x = x.double()
    directions = torch.randn(classes, x.shape[1], generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    mean = x.mean(0)
    weight = directions * (RANDOM_HEAD_SPREAD / ((x - mean) @ directions.T).std())
    return Head(weight.float(), (-(weight @ mean)).float())


def make_heads(suite: ModuleType, start: nn.Module, tasks: list[Task], seed: int) -> dict[str, Head]:
    """Every task's frozen head, as the suite asks: a linear probe of the start (``HEADS = "probe"``, the
    default) or a fixed random head (``HEADS = "random"``, for a start whose features already carry the tasks)."""
    kind = getattr(suite, "HEADS", "probe")
    if kind not in ("probe", "random"):
        raise ValueError(f"suite {suite.NAME}: HEADS is {kind!r}; use 'probe' or 'random'")
    generator = torch.Generator().manual_seed(seed)
    heads = {}
    for task in tasks:
        x = features(start, suite, task.train)
        heads[task.name] = (linear_probe(x, labels_of(task.train), task.num_labels) if kind == "probe"
                            else random_head(x, task.num_labels, generator))
    return heads


def labels_of(examples: list[dict[str, Any]]) -> Tensor:
    return torch.tensor([e["label"] for e in examples])


def accuracy(model: nn.Module, head: Head, suite: ModuleType, examples: list[dict[str, Any]],
             batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode(), head_on(model, head):
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            predicted = model(**suite.inputs(batch)).logits.argmax(-1)
            correct += int((predicted == labels_of(batch)).sum())
    return correct / len(examples)


def _batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of indices into n examples: reshuffled epochs, so every example is seen."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.sample(range(n), n)
        yield order[:batch_size]
        order = order[batch_size:]


def train_body(model: nn.Module, suite: ModuleType, tasks: list[Task], heads: dict[str, Head], *, steps: int,
               lr: float, batch_size: int, weight_decay: float, seed: int) -> None:
    """AdamW on the body for ``steps`` steps, cycling through ``tasks`` (one task: a fine-tune; all: the
    multitask reference); every head stays frozen."""
    torch.manual_seed(seed)  # dropout masks
    if getattr(suite, "LORA", None) is None:  # a LoRA model trains what lora_model left trainable
        frozen = set(getattr(suite, "FROZEN", ()))
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in frozen and not name.startswith("classifier."))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    rng = random.Random(seed)
    streams = [_batches(len(task.train), batch_size, rng) for task in tasks]
    model.train()
    with torch.enable_grad():
        for step in range(steps):
            task, stream = tasks[step % len(tasks)], streams[step % len(tasks)]
            batch = [task.train[i] for i in next(stream)]
            with head_on(model, heads[task.name]):
                logits = model(**suite.inputs(batch)).logits
            F.cross_entropy(logits, labels_of(batch)).backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()


def save_with_head(model: nn.Module, task: Task, head: Head, base: Path, out: Path) -> None:
    """Save ``model`` as a classifier for ``task`` (its label space and head) with the base's tokenizer, as a
    user's fine-tune would be."""
    model.config.num_labels = task.num_labels
    model.config.id2label = dict(enumerate(task.labels))
    model.config.label2id = {label: i for i, label in enumerate(task.labels)}
    model.classifier = nn.Linear(head.weight.shape[1], head.weight.shape[0])
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
    model.save_pretrained(out)
    copy_tokenizer(base, out)


# ---- LoRA fine-tunes (a suite's LORA) ----------------------------------------------------------------------

def lora_model(suite: ModuleType, model: nn.Module, head: Head | None, seed: int) -> nn.Module:
    """``model`` wrapped in a fresh PEFT LoRA adapter with the suite's ``LORA`` settings; with ``head``, the
    classifier is set to it and saved inside the adapter (``modules_to_save``) but stays frozen. Only the LoRA
    factors train."""
    from peft import LoraConfig, get_peft_model

    if head is not None:
        with torch.no_grad():
            model.classifier.weight.copy_(head.weight)
            model.classifier.bias.copy_(head.bias)
    torch.manual_seed(seed)  # the A factors' initialisation
    config = LoraConfig(**suite.LORA, **({"modules_to_save": ["classifier"]} if head is not None else {}))
    wrapped = get_peft_model(model, config)
    for name, parameter in wrapped.named_parameters():
        if ".lora_" not in name:
            parameter.requires_grad_(False)
    return wrapped


def save_adapter(model: nn.Module, base: Path, out: Path) -> None:
    """Save a LoRA fine-tune as a PEFT adapter directory over ``base`` (recorded as its base_model_name_or_path;
    the head's shape, in the adapter, is the task's label space). The tokenizer is the base's and is not copied:
    ``measure_checkpoint`` takes an adapter directory holding tokenizer files for a full model and asks it for
    a config.json."""
    model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    model.save_pretrained(out)


def load_fine_tune(suite: ModuleType, directory: Path, base: Path, num_labels: int | None = None) -> nn.Module:
    """A fine-tune (or the multitask model) for scoring: the saved model, or for a LoRA suite base + adapter
    merged into one model (the adapter's classifier, when it saved one, replaces the base's)."""
    if getattr(suite, "LORA", None) is None:
        return load(directory)
    from peft import PeftModel

    options = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels is not None else {}
    return PeftModel.from_pretrained(load(base, **options), directory).merge_and_unload().eval()


# ---- one seed ---------------------------------------------------------------------------------------------

@dataclass
class SeedResult:
    """Test accuracies per row and task for one seed, and what each merge row chose and cost."""

    test: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> task -> accuracy
    val: dict[str, float] = field(default_factory=dict)  # merge row -> best mean normalised validation accuracy
    val_grid: dict[str, list[float]] = field(default_factory=dict)  # merge row -> every grid point's, in order
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)  # a tuned row: its point with the tuned values
    merge_seconds: dict[str, float] = field(default_factory=dict)  # merge row -> mean over its grid points
    # merge row -> task -> the chosen point's predicted damage: normalised (÷ forgetting), and in nats/example
    damage: dict[str, dict[str, float | None]] = field(default_factory=dict)
    damage_total: dict[str, dict[str, float]] = field(default_factory=dict)
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)  # a tuned row: the search and its objective
    measure_seconds: float = 0.0
    fine_tune_seconds: float = 0.0
    multitask_seconds: float = 0.0
    solver: dict[str, Any] = field(default_factory=dict)
    warnings: dict[str, dict[str, int]] = field(default_factory=dict)  # merge row -> warning text -> times
    no_gain: list[str] = field(default_factory=list)  # tasks whose fine-tune did not beat the start


def _stamped(directory: Path, settings: dict[str, Any]) -> bool:
    stamp = directory / "quality-settings.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == settings


def _stamp(directory: Path, settings: dict[str, Any]) -> None:
    (directory / "quality-settings.json").write_text(json.dumps(settings, sort_keys=True))


def _fresh(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)


def run_seed(suite: ModuleType, base: Path, work: Path, seed: int, *, quick: bool, rows: list[Variant],
             progress: Progress = lambda text: nullcontext(), say: Callable[[str], None] = lambda text: None
             ) -> SeedResult:
    """The protocol for one seed in ``work`` (fine-tunes and sidecars are reused when their settings match)."""
    result = SeedResult()
    tasks = suite_tasks(suite, seed, quick=quick)
    train = suite.QUICK_FINE_TUNE if quick else suite.FINE_TUNE
    measure_options = dict(getattr(suite, "QUICK_MEASURE", suite.MEASURE) if quick else suite.MEASURE)
    stats_examples = measure_options.pop("examples")
    settings = {"seed": seed, "quick": quick, "train": train, "measure": measure_options,
                "stats_examples": stats_examples, "suite": suite.NAME}
    lora = getattr(suite, "LORA", None)
    if lora is not None:  # only then: the stamps of whole-body suites stay as they were
        settings["lora"] = lora

    start = load(base)
    kind = "linear probes" if getattr(suite, "HEADS", "probe") == "probe" else "random heads"
    with progress(f"seed {seed}: {kind} on the start's features for {len(tasks)} tasks"):
        heads = make_heads(suite, start, tasks, seed)
        result.test["start"] = {t.name: accuracy(start, heads[t.name], suite, t.test) for t in tasks}
    del start

    # a fine-tune is reused only if it was trained on the same examples with the same head as now
    settings["heads"] = {name: _head_digest(head) for name, head in heads.items()}
    settings["data"] = {t.name: _digest(json.dumps(t.train, sort_keys=True).encode()) for t in tasks}
    finetunes: dict[str, Path] = {}
    own_val: dict[str, float] = {}
    t0 = time.perf_counter()
    for task in tasks:
        out = work / f"ft-{task.name}"
        if not _stamped(out, settings):
            with progress(f"seed {seed}: fine-tuning on {task.name} ({train['steps']} steps)"):
                _fresh(out)
                model = load(base, num_labels=task.num_labels, ignore_mismatched_sizes=True)
                if lora is not None:
                    model = lora_model(suite, model, heads[task.name], seed)
                train_body(model, suite, [task], heads, seed=seed, **train)
                if lora is not None:
                    save_adapter(model, base, out)
                else:
                    save_with_head(model, task, heads[task.name], base, out)
                _stamp(out, settings)
        finetunes[task.name] = out
    result.fine_tune_seconds = time.perf_counter() - t0
    result.test["individual"] = {}
    for task in tasks:
        model = load_fine_tune(suite, finetunes[task.name], base, task.num_labels)
        result.test["individual"][task.name] = accuracy(model, heads[task.name], suite, task.test)
        own_val[task.name] = accuracy(model, heads[task.name], suite, task.val)
    # a fine-tune that does not beat its start stops a smoke test; a full run goes on and says so in its report
    result.no_gain = no_gains(result.test["start"], result.test["individual"])
    if result.no_gain:
        problem = (f"{suite.NAME}, seed {seed}: the fine-tune on {', '.join(result.no_gain)} does not beat the "
                   f"start on its own task; there is nothing of it to merge")
        if quick:
            raise RuntimeError(problem)
        say(f"warning: {problem}")

    multitask = work / "multitask"
    # a full run gives the reference as many steps as all fine-tunes together; --quick only checks that it
    # trains and scores, and one fine-tune's steps do that at a third of the cost
    steps = train["steps"] * (1 if quick else len(tasks))
    t0 = time.perf_counter()
    if not _stamped(multitask, settings):
        with progress(f"seed {seed}: multitask reference ({steps} steps over all tasks)"):
            _fresh(multitask)
            model = load(base)
            if lora is not None:  # one adapter for every task; the heads stay outside it
                model = lora_model(suite, model, None, seed)
            train_body(model, suite, tasks, heads, seed=seed, **{**train, "steps": steps})
            if lora is not None:
                save_adapter(model, base, multitask)
            else:
                model.save_pretrained(multitask)
            _stamp(multitask, settings)
    result.multitask_seconds = time.perf_counter() - t0
    model = load_fine_tune(suite, multitask, base)
    result.test["multitask"] = {t.name: accuracy(model, heads[t.name], suite, t.test) for t in tasks}

    sidecars: dict[str, Path] = {}
    t0 = time.perf_counter()
    for task in tasks:
        out = work / f"stats-{task.name}"
        if not _stamped(out, settings):
            with progress(f"seed {seed}: measuring {', '.join(KINDS)} of ft-{task.name} on {stats_examples} "
                          f"examples"):
                _fresh(out)
                run = mergesmith.measure_checkpoint(finetunes[task.name], task.train[:stats_examples], kinds=KINDS,
                                                    **measure_options, **({"base": base} if lora else {}))
                run.statistics.save(out)
                _stamp(out, settings)
        sidecars[task.name] = out
    result.measure_seconds = time.perf_counter() - t0
    # a layer-wise merge (regmean_plusplus) reads calibration text at merge time: the sidecars' examples
    calibration: dict[str, Any] = {}
    if any(get_method(row.method).layerwise for row in rows):
        for task in tasks:
            calibration[task.name] = work / f"calibration-{task.name}.jsonl"
            calibration[task.name].write_text("".join(json.dumps({"text": e["text"]}) + "\n"
                                                      for e in task.train[:stats_examples]))
        calibration["settings"] = {"examples": stats_examples, **{k: measure_options[k] for k in
                                                                  ("max_length", "batch_size") if k in measure_options}}
    # a row tuned on validation data reads each task's validation split, whole, in measure's format
    validation: dict[str, Any] = {}
    if any(on_validation(row) for row in rows):
        for task in tasks:
            validation[task.name] = work / f"validation-{task.name}.jsonl"
            validation[task.name].write_text("".join(json.dumps({k: e[k] for k in ("text", "pixel_values", "label")
                                                                 if k in e}) + "\n" for e in task.val))
        lengths = {k: measure_options[k] for k in ("max_length", "batch_size") if k in measure_options}
        validation["settings"] = {"examples": max(len(t.val) for t in tasks), **lengths}

    for row in rows:
        scores, seconds = [], []
        with progress(f"seed {seed}: {row.label}, {len(row.grid)} grid point{'s' * (len(row.grid) > 1)}"):
            # the best point's model so far stays loaded, so that only it is scored on test at the end
            best, best_model, tuned = 0, None, None
            for i, point in enumerate(row.grid):
                recipe = _recipe(row, point, base, finetunes, sidecars if row.data_aware else None, calibration,
                                 validation)
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    # a tuned Fisher row names the start only for the forgetting its objective divides by
                    warnings.filterwarnings("ignore", message=".*does not use a base model")
                    # damage is predicted once, for the chosen point, below: not in any merge's time
                    summary = mergesmith.merge(recipe, work / f"merged-{i}", overwrite=True, seed=seed, damage=False)
                seconds.append(time.perf_counter() - t0)
                _count_warnings(result.warnings.setdefault(row.label, {}), caught)
                if summary.solver:
                    result.solver.setdefault(row.label, []).append(_solver_digest(summary.solver))
                model = _merged_model(work / f"merged-{i}", finetunes, heads)
                scores.append(sum(accuracy(model, heads[t.name], suite, t.val) / own_val[t.name] for t in tasks)
                              / len(tasks))
                if best_model is None or scores[i] > scores[best]:  # ties: the earlier point
                    superseded, best, best_model, tuned = best, i, model, summary.tuning
                    if i > 0:
                        _fresh(work / f"merged-{superseded}")
                else:
                    _fresh(work / f"merged-{i}")
                del model
            result.test[row.label] = {t.name: accuracy(best_model, heads[t.name], suite, t.test) for t in tasks}
            del best_model
            judged = None
            if get_method(row.method).layerwise:  # its damage is judged on the merged checkpoint itself
                judged = _judge_recipe(work / f"merged-{best}", base, finetunes, sidecars)
                result.damage[row.label], result.damage_total[row.label] = predicted_damage(judged, finetunes, seed)
            _fresh(work / f"merged-{best}")
        result.val[row.label], result.chosen[row.label] = scores[best], dict(row.grid[best])
        result.val_grid[row.label] = scores
        result.merge_seconds[row.label] = sum(seconds) / len(seconds)
        if tuned is not None:
            result.chosen[row.label].update(tuned.values)
            result.tuning[row.label] = {"before": tuned.before, "after": tuned.after, "search": tuned.search,
                                        "evaluations": tuned.evaluations}
        with progress(f"seed {seed}: {row.label}, predicted damage of the chosen point"):
            if judged is None:
                chosen = tuned.recipe if tuned is not None else _damage_recipe(row, row.grid[best], base, finetunes,
                                                                                sidecars)
                result.damage[row.label], result.damage_total[row.label] = predicted_damage(chosen, finetunes, seed)
        say(f"seed {seed}: {row.label:<18} {_mean(result.test[row.label]):6.1%} test accuracy "
            f"(validation {scores[best]:.1%} of the fine-tunes; {result.merge_seconds[row.label]:.1f} s per merge; "
            f"predicted damage {_mean_known(result.damage[row.label]):.3g} of the forgetting)")
    return result


def no_gains(start: dict[str, float], individual: dict[str, float]) -> list[str]:
    """The tasks whose fine-tune does not beat the start on that task's test split."""
    return [task for task, own in individual.items() if own <= start[task]]


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def _head_digest(head: Head) -> str:
    return _digest(b"".join(t.numpy().tobytes() for t in (head.weight, head.bias)))


def _recipe(row: Variant, point: dict[str, Any], base: Path, finetunes: dict[str, Path],
            sidecars: dict[str, Path] | None, calibration: dict[str, Any] | None = None,
            validation: dict[str, Any] | None = None) -> dict[str, Any]:
    """A grid point's merge recipe; a tuned row's carries its ``tune:`` block, and the start even where the
    method ignores it (the objective divides each model's damage by its forgetting, measured from the start);
    a layer-wise row's models their calibration text; a row tuned on validation data each task's split."""
    layerwise = get_method(row.method).layerwise
    models = [{"model": str(path), **({"stats": str(sidecars[task])} if sidecars and not layerwise else {}),
               **({"data": str(calibration[task])} if layerwise else {})}
              for task, path in finetunes.items()]
    recipe: dict[str, Any] = {"merge_method": row.method, "models": models, "parameters": dict(point),
                              "heads": "each", "dtype": "float32"}
    if get_method(row.method).base != "ignored" or row.tune is not None:
        recipe["base_model"] = str(base)
    if row.tune is not None:
        recipe["tune"] = dict(row.tune)
    if on_validation(row):
        assert validation, "a row tuned on validation data needs the seed's validation files"
        recipe["tune"].update(validation["settings"],
                              data={str(path): str(validation[task]) for task, path in finetunes.items()})
    if layerwise:
        recipe["calibration"] = dict(calibration["settings"])
    return recipe


def _judge_recipe(merged: Path, base: Path, finetunes: dict[str, Path], sidecars: dict[str, Path]) -> dict[str, Any]:
    """A recipe whose output is the checkpoint ``merged`` itself (weight 1 beside weight-0 fine-tunes), so that
    predicting its damage judges a merge no recipe of tensor-wise arithmetic reproduces (a layer-wise one)."""
    models = [{"model": str(merged), "parameters": {"weight": 1.0}},
              *({"model": str(path), "stats": str(sidecars[task]), "parameters": {"weight": 0.0}}
                for task, path in finetunes.items())]
    return {"merge_method": "linear", "base_model": str(base), "models": models, "heads": "each",
            "dtype": "float32"}


def _damage_recipe(row: Variant, point: dict[str, Any], base: Path, finetunes: dict[str, Path],
                   sidecars: dict[str, Path]) -> dict[str, Any]:
    """The point's recipe with every model's sidecar and the start, so that any method's merge is judged."""
    return {**_recipe(row, point, base, finetunes, sidecars), "base_model": str(base)}


def predicted_damage(recipe: Any, finetunes: dict[str, Path], seed: int
                     ) -> tuple[dict[str, float | None], dict[str, float]]:
    """Each task's predicted damage under ``recipe`` (a merge pass that writes nothing): normalised by its
    forgetting (None where the forgetting is 0), and the total in nats/example."""
    task_of = {str(path): task for task, path in finetunes.items()}
    with warnings.catch_warnings():  # the start is named for the forgetting, also where the method ignores it
        warnings.filterwarnings("ignore", message=".*does not use a base model")
        summary = mergesmith.predict_damage(recipe, seed=seed)
    normalised = {task_of[d.model]: d.normalised for d in summary.damage}
    totals = {task_of[d.model]: d.total for d in summary.damage}
    return normalised, totals


def _merged_model(merged: Path, finetunes: dict[str, Path], heads: dict[str, Head]) -> nn.Module:
    """The merged body; each task's head, which ``heads: each`` wrote under heads/<fine-tune>/, must be the
    head the fine-tune was trained with."""
    from safetensors.torch import load_file

    for task, path in finetunes.items():
        kept = load_file(str(merged / "heads" / path.name / "model.safetensors"))
        if not all(torch.equal(kept[k], v) for k, v in heads[task].tensors().items()):
            raise RuntimeError(f"{merged}/heads/{path.name}: the merge's kept head differs from {path}'s")
    return load(merged)


def _count_warnings(counts: dict[str, int], caught: list[warnings.WarningMessage]) -> None:
    """Warnings by kind, with the tensor's name taken out: "the Gram sum is singular ..." × 37."""
    for warning in caught:
        text = str(warning.message)
        text = text.split("': ", 1)[1] if text.startswith("'") and "': " in text else text
        counts[text] = counts.get(text, 0) + 1


def _solver_digest(solver: dict[str, dict[str, Any]]) -> dict[str, Any]:
    iterations = [block.get("iterations", 0) for block in solver.values()]
    residuals = [block.get("final_residual", 0.0) for block in solver.values()]
    return {"blocks": len(iterations), "max_iterations": max(iterations, default=0),
            "max_final_residual": max(residuals, default=0.0)}


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else math.nan


def _mean_known(values: dict[str, float | None]) -> float:
    return _mean({k: v for k, v in values.items() if v is not None})
