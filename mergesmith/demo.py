"""``mergesmith demo``: a small, honest run of the quality benchmark (mergesmith.quality) on one seed.

By default the vision suite: a small ConvNext pretrained on half of scikit-learn's digits, fine-tuned on
transformed digit tasks, merged by every registered method with its full tuning grid, scored with each
task's own head. ``--suite text`` runs MiniLM-L6 on the Debian text tasks instead (slower; needs the
Debian packages the README names). It prints the table, writes the charts, and removes its models unless
told to keep them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergesmith.quality import check_claimable, claim


def run_demo(*, suite: str = "vision", workdir: str | Path | None = None, out: str | Path = "mergesmith-demo",
             keep: bool = False, quick: bool = False, seed: int = 0, console: Console | None = None,
             threads: int | None = None) -> dict[str, Any]:
    """Run the benchmark's ``suite`` for one seed; print the table, write results and charts to ``out``.

    Models go to ``workdir`` (kept; what an earlier demo left there with the same settings is reused) or to
    a temporary directory that is removed at the end unless ``keep``. Returns the results dict."""
    import torch

    from mergesmith.quality import run_suite
    from mergesmith.quality import threads as default_threads
    from mergesmith.quality.report import write

    os.environ["HF_HUB_OFFLINE"] = "1"
    console = console or Console(stderr=True)
    out = Path(out)
    check_claimable(out, "--out")
    if workdir is not None:
        check_claimable(Path(workdir), "--workdir")
    claim(out, "--out")
    temporary = workdir is None
    work = Path(tempfile.mkdtemp(prefix="mergesmith-demo-")) if temporary else Path(workdir)
    claim(work, "--workdir")
    saved_threads = torch.get_num_threads()
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    console.print(f"[bold]mergesmith demo[/bold]: the {suite} suite of the quality benchmark, seed {seed}. Each task "
                  f"gets a linear-probe head on the pretrained start, the body is fine-tuned under that frozen "
                  f"head, every fine-tune's statistics are measured once, and every method merges the bodies at "
                  f"each point of its tuning grid; the point best on validation data is scored on test data.",
                  highlight=False)
    try:
        results = run_suite(suite, work / suite, seeds=[seed], quick=quick, command=f"mergesmith demo --suite {suite}",
                            progress=lambda text: _step(console, text),
                            say=lambda text: console.print(f"  {text}", highlight=False, markup=False))
        files = write(results, out)
    finally:
        torch.set_num_threads(saved_threads)
        if temporary and not keep:
            shutil.rmtree(work, ignore_errors=True)
    console.print(table(results))
    size = _size(work) if work.exists() else 0
    where = (f"The models and sidecars ({size / 1e6:.0f} MB) are in {work}." if work.exists() else
             "The models were in a temporary directory, now removed (--keep keeps them).")
    console.print(f"Wrote {', '.join(str(f) for f in files)}. {where} The demo took "
                  f"{time.perf_counter() - started:.0f} s on {threads} CPU thread{'s' * (threads > 1)}. The full "
                  f"benchmark (3 seeds, both suites): python benchmarks/quality/run.py", highlight=False)
    return results


@contextmanager
def _step(console: Console, text: str) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(escape(text)):
        yield
    console.print(f"{text}: {time.perf_counter() - start:.1f} s", highlight=False, markup=False)


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def table(results: dict[str, Any]) -> Table:
    """The demo's table: every row's normalised and absolute test accuracy, best merges first."""
    from mergesmith.quality.report import REFERENCES, merge_rows, row_stats

    tasks = results["tasks"]
    seed = results["per_seed"][0]
    aware = {row["label"] for row in results["rows"] if row["data_aware"]}
    view = Table(title=f"{results['suite']} suite, seed {results['seeds'][0]}: test accuracy (normalised = ÷ the "
                       f"task's own fine-tune)")
    for column in ("model", "kind", "normalised", "absolute", *tasks, "merge s"):
        view.add_column(column, justify="left" if column in ("model", "kind") else "right")
    rows = sorted(merge_rows(results), key=lambda r: -row_stats(results, r)["normalised"])
    for name in (*REFERENCES, *rows):
        stats = row_stats(results, name)
        kind = "reference" if name in REFERENCES else "data-aware" if name in aware else "data-free"
        seconds = seed["merge_seconds"].get(name)
        view.add_row(escape(name), kind, f"{stats['normalised']:.1f}%", f"{stats['absolute']:.1f}%",
                     *(f"{100 * seed['test'][name][t]:.1f}" for t in tasks),
                     f"{seconds:.1f}" if seconds is not None else "", end_section=name == REFERENCES[-1])
    return view
