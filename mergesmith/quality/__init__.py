"""The quality benchmark (benchmarks/quality/run.py) and the demo built on it: real fine-tunes merged by every
registered method, scored per task with each task's own head (``protocol`` says how)."""

from __future__ import annotations

import copy
import importlib
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

from mergesmith.quality.protocol import Progress, Variant, run_seed, suite_tasks, variants

SUITES = ("vision", "text", "text-lora")  # every bundled suite (module: the name with "_" for "-")
DEFAULT_SUITES = ("vision", "text")  # what a run of "all" runs, vision first: it is over in minutes


MARKER = ".mergesmith-quality"  # names a directory the benchmark or the demo wrote; only such ones are reused


def check_claimable(directory: Path, option: str) -> None:
    """``directory`` may become ours: it is new, empty, or one an earlier run marked; anything else is refused
    rather than written into."""
    from mergesmith.errors import OutputError

    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{option} {directory} exists and is not a directory; name a new directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MARKER).is_file():
        raise OutputError(f"{option} {directory} holds files mergesmith did not write; name a new or empty "
                          f"directory")


def claim(directory: Path, option: str) -> None:
    """Make ``directory`` ours to write (and later to replace parts of), after ``check_claimable``."""
    check_claimable(directory, option)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("written by mergesmith's quality benchmark; safe to delete\n")


def suite_module(name: str) -> ModuleType:
    """A bundled suite by name, or any importable module that provides a suite's names (for new suites)."""
    return importlib.import_module(f"mergesmith.quality.{name.replace('-', '_')}" if name in SUITES else name)


def threads() -> int:
    """2 torch threads on an idle machine, 1 on a busy one: two OpenMP threads that spin-wait on cores other
    processes hold run several times slower than one (a MiniLM step measured 3.4 s against 1.2 s)."""
    cpus = os.cpu_count() or 1
    return 1 if cpus < 2 or os.getloadavg()[0] > cpus - 1 else min(cpus, 2)


def machine() -> str:
    import torch

    cpus, used = os.cpu_count() or 1, torch.get_num_threads()
    return (f"{cpus} CPU core{'s' * (cpus > 1)} ({platform.machine()}), {used} torch thread{'s' * (used > 1)}, "
            f"torch {torch.__version__}")


def run_suite(name: str, work: Path, *, seeds: Sequence[int] = (0, 1, 2), quick: bool = False,
              command: str = "", progress: Progress = lambda text: nullcontext(),
              say: Callable[[str], None] = lambda text: None,
              on_seed: Callable[[dict[str, Any]], None] | None = None,
              only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one suite for ``seeds`` in ``work`` and return its results (the JSON the report is built from);
    ``on_seed`` hears the results so far after every seed. ``only`` keeps the rows whose label or method is
    named (to add rows to earlier results with ``combine``)."""
    import torch
    import transformers

    suite = suite_module(name)
    started = time.perf_counter()
    claim(work, "--workdir")
    transformers.logging.set_verbosity_error()  # "newly initialised head" is expected: every task gets one
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    base = work / "start"
    marker = base / "quality-start.json"
    settings = f'{{"quick": {str(quick).lower()}}}'
    if not (marker.is_file() and marker.read_text() == settings):
        with progress(f"{name}: making the pretrained start"):
            if base.exists():
                shutil.rmtree(base)
            suite.make_base(base, seed=0, quick=quick)
            marker.write_text(settings)
    per_seed, tasks, classes, sources = [], [], {}, {}
    rows = None
    for seed in seeds:
        seed_tasks = suite_tasks(suite, seed, quick=quick)
        tasks = [t.name for t in seed_tasks]
        classes = {t.name: t.num_labels for t in seed_tasks}
        sources = {t.name: t.source for t in seed_tasks}
        rows = rows or select(_for_inputs(variants(len(tasks), quick=quick), seed_tasks), only)
        result = run_seed(suite, base, work / f"seed-{seed}", seed, quick=quick, rows=rows, progress=progress,
                          say=say)
        per_seed.append(asdict(result))
        if on_seed is not None:  # what is done so far, so that a run stopped later keeps it
            on_seed(_results(name, suite, quick, list(seeds)[:len(per_seed)], tasks, classes, sources, command,
                             time.perf_counter() - started, rows, per_seed, planned=list(seeds)))
    assert rows is not None
    return _results(name, suite, quick, list(seeds), tasks, classes, sources, command,
                    time.perf_counter() - started, rows, per_seed, planned=list(seeds))


def _for_inputs(rows: list[Variant], tasks: list) -> list[Variant]:
    """The rows that can merge the suite's models: a layer-wise merge (regmean_plusplus) reads text only."""
    from mergesmith.methods import get_method

    text = bool(tasks) and "text" in tasks[0].train[0]
    return [r for r in rows if text or not get_method(r.method).layerwise]


def select(rows: list[Variant], only: Sequence[str] | None) -> list[Variant]:
    """The rows whose label (``mats[kfac]``) or method (``mats``) is in ``only``; all of them for None. A row
    tuned on predicted damage (``ties[damage]``) is named by its label only: it is another protocol, not one
    of the method's grid variants, so ``ties`` does not bring it in."""
    from mergesmith.errors import UsageError

    if only is None:
        return rows
    known = {r.label for r in rows} | {r.method for r in rows}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise UsageError(f"no benchmark row or method is called {', '.join(map(repr, unknown))}; the rows are "
                         f"{', '.join(r.label for r in rows)}")
    return [r for r in rows if r.label in only or (r.method in only and r.tune is None)]


# a seed's per-row records besides "test" (damage, damage_total and tuning came with issue 12)
ROW_KEYS = ("val", "val_grid", "chosen", "merge_seconds", "solver", "warnings", "damage", "damage_total", "tuning")


def combine(earlier: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """``earlier`` results with the rows of ``added`` (a run of some methods only) put in, replacing rows of
    the same label. The two must have merged the same fine-tunes: the same suite, tasks, settings and seeds,
    and the same start, fine-tune and multitask accuracies on every seed."""
    from mergesmith.errors import UsageError

    for key in ("suite", "quick", "tasks", "settings"):
        if earlier[key] != added[key]:
            raise UsageError(f"the earlier results differ in '{key}' ({earlier[key]!r} against {added[key]!r}); "
                             f"rerun the whole suite instead of adding rows")
    if sorted(added["seeds"]) != sorted(earlier["seeds"]):  # a row's table cell is a mean over every seed
        raise UsageError(f"the earlier results are for seeds {earlier['seeds']}, the added rows for "
                         f"{added['seeds']}; add rows for the same seeds (--seeds)")
    combined = copy.deepcopy(earlier)
    for seed, new in zip(added["seeds"], added["per_seed"]):
        old = combined["per_seed"][earlier["seeds"].index(seed)]
        for reference in ("start", "individual", "multitask"):
            if old["test"][reference] != new["test"][reference]:
                raise UsageError(f"seed {seed}: the {reference} accuracies differ from the earlier results, so "
                                 f"the models differ; rerun the whole suite")
        for row in added["rows"]:
            for key in ROW_KEYS:  # results written before a key existed lack it
                old.get(key, {}).pop(row["label"], None)
                if row["label"] in new.get(key, {}):
                    old.setdefault(key, {})[row["label"]] = new[key][row["label"]]
            old["test"][row["label"]] = new["test"][row["label"]]
    labels = {row["label"] for row in added["rows"]}
    combined["rows"] = [row for row in combined["rows"] if row["label"] not in labels] + added["rows"]
    merging = added["seconds"]["merge_and_score"]
    combined["seconds"]["merge_and_score"] += merging
    combined["wall_seconds"] += merging
    combined.setdefault("additions", []).append(
        {"command": added["command"], "rows": [row["label"] for row in added["rows"]], "seeds": added["seeds"],
         "merge_and_score_seconds": merging, "machine": added["machine"]})
    return combined


def combine_seeds(earlier: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """``earlier`` results with the seeds of ``added`` appended: a run of more seeds of the same suite, settings
    and rows (each seed's fine-tunes are its own, so nothing else must agree)."""
    from mergesmith.errors import UsageError

    for key in ("suite", "quick", "tasks", "settings"):
        if earlier[key] != added[key]:
            raise UsageError(f"the earlier results differ in '{key}' ({earlier[key]!r} against {added[key]!r}); "
                             f"rerun the whole suite instead of adding seeds")
    if [row["label"] for row in earlier["rows"]] != [row["label"] for row in added["rows"]]:
        raise UsageError("the earlier results have other rows than the added seeds; add seeds with the same "
                         "--methods as the earlier run")
    repeated = sorted(set(earlier["seeds"]) & set(added["seeds"]))
    if repeated:
        raise UsageError(f"seed(s) {repeated} are in the earlier results already; add other seeds")
    combined = copy.deepcopy(earlier)
    combined["per_seed"] += copy.deepcopy(added["per_seed"])
    combined["seeds"] = earlier["seeds"] + added["seeds"]
    combined["planned_seeds"] = combined["seeds"]
    combined["wall_seconds"] += added["wall_seconds"]
    for key, value in added["seconds"].items():
        combined["seconds"][key] += value
    combined.setdefault("additions", []).append(
        {"command": added["command"], "seeds": added["seeds"], "seconds": added["wall_seconds"],
         "machine": added["machine"]})
    return combined


def _results(name: str, suite: ModuleType, quick: bool, seeds: list[int], tasks: list[str], classes: dict,
             sources: dict, command: str, wall: float, rows: list, per_seed: list[dict], *,
             planned: list[int]) -> dict[str, Any]:
    total = {key: sum(s[f"{key}_seconds"] for s in per_seed) for key in ("fine_tune", "multitask", "measure")}
    return {"suite": name, "quick": quick, "seeds": seeds, "tasks": tasks, "classes": classes,
            "model": suite.SOURCE, "sources": {"model": suite.SOURCE, **sources}, "command": command,
            "machine": machine(), "wall_seconds": wall, "planned_seeds": planned,
            "seconds": {**total, "merge_and_score": wall - sum(total.values())},
            "settings": {"heads": getattr(suite, "HEADS", "probe"),
                         "fine_tune": suite.QUICK_FINE_TUNE if quick else suite.FINE_TUNE,
                         "measure": getattr(suite, "QUICK_MEASURE", suite.MEASURE) if quick else suite.MEASURE,
                         **({"lora": suite.LORA} if getattr(suite, "LORA", None) is not None else {})},
            "rows": [{"label": r.label, "method": r.method, "grid": r.grid, "data_aware": r.data_aware,
                      **({"tune": r.tune} if r.tune is not None else {})} for r in rows],
            "per_seed": per_seed}
