"""The CLI's quick paths do not load torch: `--help`, `methods` and a recipe's own error reach the user
without it (its import is most of a second; docs/benchmarks.md, "Start-up"). Checked by the modules loaded,
not by a clock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from mergesmith.__main__ import run
sys.argv = ["mergesmith", *sys.argv[1:]]
try:
    run()
except SystemExit as end:
    code = end.code
# torch._C is torch's compiled core: it is loaded exactly when torch itself is
print("torch loaded" if "torch._C" in sys.modules else "torch not loaded", code, file=sys.stderr)
"""


def probe(*args: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


@pytest.mark.parametrize("args", [("--help",), ("methods",), ("methods", "ties"), ("merge", "--help")])
def test_help_and_the_method_list_do_not_load_torch(args):
    stdout, stderr = probe(*args)
    assert stderr.strip().endswith("torch not loaded 0"), stderr
    assert stdout.strip()


def test_a_recipe_error_comes_before_torch_loads(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: ties\nmodels:\n  - model: a\nparameters: {densty: 0.5}\n")
    for extra in ((), ("--dry-run",)):
        _, stderr = probe("merge", str(recipe), str(tmp_path / "out"), *extra)
        assert "unknown parameter 'densty' for method 'ties' (did you mean 'density'?)" in stderr
        assert stderr.strip().endswith("torch not loaded 2"), stderr


def test_a_merge_loads_torch_where_it_is_needed(tmp_path: Path):
    """The lazily bound torch is the real module once used: a merge of two tiny checkpoints goes through."""
    import torch
    from safetensors.torch import save_file

    for name, value in (("a", 1.0), ("b", 3.0)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((2, 2), value)}, str(tmp_path / name / "model.safetensors"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n  - model: {tmp_path / 'b'}\n")
    _, stderr = probe("merge", str(recipe), str(tmp_path / "out"), "--quiet")
    assert stderr.strip().endswith("torch loaded 0"), stderr
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], torch.full((2, 2), 2.0))
