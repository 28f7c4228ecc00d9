"""``mergesmith demo``: the vision suite of the quality benchmark at smoke-test size (--quick), run once;
what it prints, writes and leaves behind."""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from mergesmith.demo import run_demo
from mergesmith.errors import OutputError
from mergesmith.methods import get_method
from mergesmith.quality import MARKER, protocol

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "results"
    before = set(Path(tempfile.gettempdir()).glob("mergesmith-demo-*"))
    printed = io.StringIO()
    results = run_demo(suite="vision", out=out, quick=True, console=Console(file=printed, width=200))
    left = set(Path(tempfile.gettempdir()).glob("mergesmith-demo-*")) - before
    return out, results, printed.getvalue(), left


def test_the_demo_prints_every_row_with_its_time(demo):
    _, results, printed, _ = demo
    rows = [r.label for r in protocol.variants(protocol.QUICK_TASKS, quick=True)
            if not get_method(r.method).layerwise]  # the demo's images: no layer-wise merge of text
    for row in ("start", "individual", "multitask", *rows):
        assert re.search(rf"(?<![\w\[]){re.escape(row)}(?![\w\[]).*%", printed), row
    assert re.search(r"fine-tuning on \w+ \(\d+ steps\): [\d.]+ s", printed)  # every long step says how long it took


def test_the_demo_writes_its_charts_and_removes_its_models(demo):
    out, results, printed, left = demo
    assert {p.name for p in out.iterdir()} == {MARKER, "vision.json", "vision.md", "vision.png", "vision-time.png"}
    assert left == set()  # no models left in /tmp ...
    assert "now removed (--keep keeps them)" in printed  # ... and it says so


def test_the_demo_refuses_a_results_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files mergesmith did not write"):
        run_demo(suite="vision", out=tmp_path, quick=True, console=Console(file=io.StringIO()))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
