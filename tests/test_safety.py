"""The promises of the README's "Safety" section that the merge command and the engine keep:

- the CLI's error contract: a user error is one ``error:`` line and exit 2, a bug one line and exit 1
  (``--debug`` shows its traceback), Ctrl-C 130 and SIGTERM 143, usage errors one line, ``--version``;
- every recipe mistake is found before the first tensor is read (``--dry-run`` included);
- outputs: ``--overwrite`` replaces only what mergesmith wrote, never the current directory or an input,
  and leftovers of killed runs are cleaned up;
- NaN or Inf in a weight is an error unless ``--allow-nonfinite``;
- the model card holds what reproduces the merge bit for bit.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.errors import CheckpointError, MergeError, OutputError, RecipeError
from mergesmith.io.checkpoint import CheckpointReader
from mergesmith.io.writer import MARKER, PARTIAL


def one_error_line(result, code: int = 2) -> str:
    assert result.code == code, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    line = result.error_line
    assert line.startswith("error:"), line
    return line


def linear_recipe(*models: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models]}


def in_bytes(text: str) -> float:
    number, unit = re.match(r"([\d.]+) (bytes|KB|MB|GB)", text).groups()
    return float(number) * {"bytes": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for shard in sorted(directory.glob("*.safetensors")):
        merged |= load_file(shard)
    return merged


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any checkpoint tensor is read (headers and metadata only)."""

    def refuse(self, key):
        raise AssertionError(f"tensor '{key}' of {self.path} was read")

    monkeypatch.setattr(CheckpointReader, "get", refuse)


# ---------------------------------------------------------------------------------------------------------
# The command line's own contract


USAGE_ERRORS = [
    (["merge", "--bogus"], r"No such option: --bogus.*mergesmith merge --help"),
    (["merge"], r"Missing argument 'RECIPE'|Missing argument 'recipe'"),
    (["merge", "r.yml"], r"Missing argument 'OUTPUT'|Missing argument 'output'"),
    (["mrege"], r"No such command 'mrege'"),
    (["merge", "r.yml", "out", "--seed", "x"], r"Invalid value for '--seed'"),
    (["merge", "r.yml", "out", "--max-shard-size"], r"requires an argument"),
    (["measure", "model"], r"Missing option '--data'"),
    (["stats", "inspect"], r"Missing argument"),
]


@pytest.mark.parametrize("args,pattern", USAGE_ERRORS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_usage_errors_are_one_line_and_exit_2(run_cli, args, pattern):
    line = one_error_line(run_cli(*args))
    assert re.search(pattern, line), line


@pytest.mark.parametrize("args", [["--version"], ["-h"], ["--help"], [], ["merge", "-h"], ["stats"]],
                         ids=["version", "-h", "--help", "bare", "merge -h", "stats"])
def test_help_and_version_go_to_stdout_with_exit_0(run_cli, args):
    result = run_cli(*args)
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    if args == ["--version"]:
        assert result.stdout.strip() == f"mergesmith {mergesmith.__version__}"
    else:
        assert "Usage" in result.stdout


def test_an_internal_error_is_one_line_exit_1_and_debug_shows_the_traceback(llama, write_recipe, run_cli,
                                                                            tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("an internal bug")

    monkeypatch.setattr(importlib.import_module("mergesmith.api"), "merge", broken)
    recipe = write_recipe(linear_recipe(llama["ft1"], llama["ft2"]))
    line = one_error_line(run_cli("merge", recipe, tmp_path / "out"), code=1)
    assert "internal error (TypeError: an internal bug)" in line and "--debug" in line
    with pytest.raises(TypeError, match="an internal bug"):  # --debug: the traceback, anywhere on the line
        run_cli("merge", recipe, tmp_path / "out", "--debug")


def test_a_user_error_is_never_reported_as_internal(run_cli, write_recipe, tmp_path):
    line = one_error_line(run_cli("merge", write_recipe("merge_method: linear\nmodels: [{model: nowhere}]\n"),
                                  tmp_path / "out"))
    assert "internal" not in line and "nowhere" in line


@pytest.mark.parametrize("signal_name,code,name", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM"),
                                                   ("SIGHUP", 129, "SIGHUP")])
def test_interrupts_exit_with_the_signal_code(llama, write_recipe, run_cli, tmp_path, monkeypatch, signal_name,
                                              code, name):
    """A real signal to this process, in the middle of the command (tests/test_kill.py does it to a merge)."""
    import signal

    before = signal.getsignal(getattr(signal, signal_name))

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, signal_name))
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(importlib.import_module("mergesmith.api"), "merge", interrupted)
    line = one_error_line(run_cli("merge", write_recipe(linear_recipe(llama["ft1"])), tmp_path / "out"), code=code)
    assert f"interrupted ({name})" in line
    assert signal.getsignal(getattr(signal, signal_name)) is before  # main() gives the handler back


def test_warnings_are_one_line_each(llama, write_recipe, run_cli, tmp_path):
    """ft1 has no tokenizer: the merge says so on one 'warning:' line, and still succeeds."""
    result = run_cli("merge", write_recipe(linear_recipe(llama["ft1"], llama["ft2"])), tmp_path / "out", "--quiet")
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no tokenizer files" in warnings[0], result.stderr


# ---------------------------------------------------------------------------------------------------------
# Every recipe mistake before the first tensor is read


PLAN_TIME_ERRORS = [
    ({"merge_method": "mats", "parameters": {"precision": "kfac"}}, r"init 'task_arithmetic'.*needs a base_model"),
    ({"merge_method": "regmean", "parameters": {"fallback": "base"}}, r"fallback: base.*add a base_model"),
    ({"merge_method": "linear", "weights": [1.0, -1.0]}, r"weights sum to zero \(1, -1\)"),
    ({"merge_method": "fisher", "weights": [0.0, 0.0]}, r"weights sum to zero"),
    ({"merge_method": "regmean", "weights": [1.0, -2.0]}, r"'weight' must lie in \[0.0, inf\), got -2.0"),
    ({"merge_method": "task_arithmetic", "base": True, "weights": [1.0, -1.0], "parameters": {"normalize": True}},
     r"weights sum to zero"),
    ({"merge_method": "ties", "base": True, "density": [0.5, 1.5]}, r"models(\[1\]|\.1)\.parameters.*density.*1\.5"),
    ({"merge_method": "model_stock", "base": True, "models": 1}, r"needs at least 2 model"),
    ({"merge_method": "slerp", "base": True, "parameters": {"t": 0.5}, "models": 2}, r"at most 1 model"),
    ({"merge_method": "ties", "parameters": {"density": 0.5}}, r"needs a base_model"),
]


def _recipe(case: dict, llama: dict[str, Path]) -> dict:
    models = [llama["ft1"], llama["ft2"]][:case.get("models", 2)]
    entries = [{"model": str(m), "parameters": {}} for m in models]
    for i, w in enumerate(case.get("weights", [])):
        entries[i]["parameters"]["weight"] = w
    for i, d in enumerate(case.get("density", [])):
        entries[i]["parameters"]["density"] = d
    recipe = {"merge_method": case["merge_method"], "models": [e if e["parameters"] else {"model": e["model"]}
                                                               for e in entries]}
    if case.get("base"):
        recipe["base_model"] = str(llama["base"])
    if "parameters" in case:
        recipe["parameters"] = case["parameters"]
    return recipe


@pytest.mark.parametrize("case,pattern", PLAN_TIME_ERRORS, ids=lambda x: x["merge_method"] if isinstance(x, dict)
                         else "")
def test_recipe_mistakes_are_found_before_any_tensor_is_read(llama, write_recipe, run_cli, tmp_path,
                                                             no_tensor_reads, case, pattern):
    recipe = write_recipe(_recipe(case, llama))
    out = tmp_path / "out"
    line = one_error_line(run_cli("merge", recipe, out))
    assert re.search(pattern, line), line
    assert str(recipe) in line, f"the recipe file is not named: {line}"
    assert not out.exists()


def test_dry_run_prints_the_plan_and_reads_no_tensor(llama, write_recipe, run_cli, tmp_path, no_tensor_reads):
    recipe = write_recipe({"merge_method": "ties", "base_model": str(llama["base"]),
                           "models": [{"model": str(llama["ft1"])}, {"model": str(llama["ft2"])}],
                           "parameters": {"density": 0.5}})
    out = tmp_path / "out"
    result = run_cli("merge", recipe, out, "--dry-run", "--max-shard-size", "20KB")
    assert result.code == 0, result.stderr
    assert not out.exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())
    fields = dict(re.findall(r"^  ([a-z ]+):\s+(.*)$", result.stdout, flags=re.M))
    header = CheckpointReader(llama["base"])
    assert fields["tensors"].startswith(f"{len(header.keys())} (")
    tensor_bytes = sum(torch.Size(header.shape(k)).numel() * header.dtype(k).itemsize for k in header.keys())
    assert in_bytes(fields["to read"]) == pytest.approx(3 * tensor_bytes, rel=0.01)  # base and two fine-tunes
    assert in_bytes(fields["to write"]) == pytest.approx(tensor_bytes, rel=0.01)
    assert int(re.search(r"in (\d+) shard", fields["to write"])[1]) > 1
    assert fields["output"] == f"would create {out}"


def test_dry_run_fails_like_the_merge(llama, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(linear_recipe(llama["ft1"], llama["ft2"]))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    line = one_error_line(run_cli("merge", recipe, tmp_path / "taken", "--dry-run"))
    assert "already exists and was not written by mergesmith" in line


# ---------------------------------------------------------------------------------------------------------
# Outputs: never destroy what is not ours


@pytest.fixture
def recipe_of_two(llama, write_recipe) -> Path:
    """The base (which has a tokenizer, so no warning line comes before an error) and a fine-tune."""
    return write_recipe(linear_recipe(llama["base"], llama["ft2"]))


def test_overwrite_refuses_a_directory_mergesmith_did_not_write(recipe_of_two, run_cli, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("years of work")
    line = one_error_line(run_cli("merge", recipe_of_two, precious, "--overwrite"))
    assert "not written by mergesmith" in line
    assert (precious / "notes.txt").read_text() == "years of work"


def test_overwrite_refuses_a_mergesmith_output_with_a_file_put_in_it(recipe_of_two, run_cli, tmp_path):
    out = tmp_path / "out"
    assert run_cli("merge", recipe_of_two, out, "--quiet").code == 0
    (out / "eval" ).mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    line = one_error_line(run_cli("merge", recipe_of_two, out, "--overwrite"))
    assert "eval/scores.json, which is not part of the merge" in line
    assert (out / "eval" / "scores.json").exists()


def test_overwrite_replaces_a_mergesmith_output(llama, write_recipe, recipe_of_two, run_cli, tmp_path):
    out = tmp_path / "out"
    assert run_cli("merge", recipe_of_two, out, "--quiet").code == 0
    first = tensors_of(out)
    other = write_recipe(linear_recipe(llama["ft1"], llama["ft3"]), name="other.yaml")
    assert run_cli("merge", other, out, "--quiet", "--overwrite").code == 0
    second = tensors_of(out)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    marker = json.loads((out / MARKER).read_text())
    assert sorted(marker["files"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                             if p.is_file() and p.name != MARKER)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_an_empty_directory_is_a_fine_output(recipe_of_two, run_cli, tmp_path):
    out = tmp_path / "made-for-it"
    out.mkdir()
    assert run_cli("merge", recipe_of_two, out, "--quiet").code == 0
    assert (out / "model.safetensors").exists()


def test_the_current_directory_is_never_an_output(recipe_of_two, run_cli, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in (".", str(work), ".."):
        line = one_error_line(run_cli("merge", recipe_of_two, target, "--overwrite"))
        assert "current directory" in line
    assert (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["input", "parent of an input", "the recipe"])
def test_an_input_is_never_an_output(llama, write_recipe, run_cli, tmp_path, target):
    models = tmp_path / "models"
    shutil.copytree(llama["ft1"], models / "ft1")
    recipe = write_recipe(linear_recipe(models / "ft1", llama["ft2"]))
    path = {"input": models / "ft1", "parent of an input": models, "the recipe": recipe}[target]
    before = sorted(p.name for p in path.parent.rglob("*"))
    line = one_error_line(run_cli("merge", recipe, path, "--overwrite"))
    assert "would replace the input" in line or "not a directory" in line
    assert sorted(p.name for p in path.parent.rglob("*")) == before


def test_a_symlink_is_not_followed_as_an_output(recipe_of_two, run_cli, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    one_error_line(run_cli("merge", recipe_of_two, tmp_path / "link", "--overwrite"))
    assert list(elsewhere.iterdir()) == []


def _leftover(parent: Path, name: str, pid: int, marker: dict | None) -> Path:
    folder = parent / f".{name}.tmp-{pid}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"partial")
    if marker is not None:
        (folder / PARTIAL).write_text(json.dumps(marker))
    return folder


def test_leftovers_of_a_killed_run_are_removed_and_said(recipe_of_two, run_cli, tmp_path):
    import socket

    out = tmp_path / "out"
    dead = _leftover(tmp_path, "out", 999_999_999, {"host": socket.gethostname(), "pid": 999_999_999, "start": "1"})
    parent = os.getppid()  # a live process that is not this one (whose own pid the merge's folder takes)
    alive = _leftover(tmp_path, "out", parent, {"host": socket.gethostname(), "pid": parent,
                                                "start": Path(f"/proc/{parent}/stat").read_text()
                                                .rsplit(")", 1)[1].split()[19]})
    foreign = _leftover(tmp_path, "out", 12345, None)  # a look-alike without our marker: not ours to delete
    result = run_cli("merge", recipe_of_two, out)
    assert result.code == 0, result.stderr
    assert not dead.exists()
    assert f"removed {dead}" in result.stderr
    assert alive.exists() and foreign.exists()


def test_an_interrupted_overwrite_is_restored(recipe_of_two, run_cli, tmp_path):
    """Killed between its two renames, an --overwrite leaves the old output aside: the next run puts it back."""
    out = tmp_path / "out"
    assert run_cli("merge", recipe_of_two, out, "--quiet").code == 0
    aside = tmp_path / ".out.old-999999999"
    out.rename(aside)
    result = run_cli("merge", recipe_of_two, tmp_path / "out")
    assert result.code == 2 and "already exists" in result.stderr, result.stderr  # restored, so not replaced
    assert (out / MARKER).exists() and not aside.exists()


def test_library_errors_are_typed(llama, tmp_path):
    with pytest.raises(OutputError):
        mergesmith.merge(linear_recipe(llama["ft1"]), llama["ft1"], overwrite=True)
    with pytest.raises(RecipeError):
        mergesmith.plan_merge({"merge_method": "linear", "models": [{"model": str(llama["ft1"]),
                                                                      "parameters": {"weight": "heavy"}}]})
    with pytest.raises(CheckpointError):
        mergesmith.plan_merge(linear_recipe(tmp_path / "nothing-here"))
    assert issubclass(OutputError, MergeError) and issubclass(CheckpointError, MergeError)


# ---------------------------------------------------------------------------------------------------------
# Non-finite weights


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, llama) -> Path:
    folder = tmp_path_factory.mktemp("nan") / "ft-nan"
    shutil.copytree(llama["ft2"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nan_in_a_weight_is_an_error_naming_model_and_tensor(llama, nan_model, write_recipe, run_cli, tmp_path):
    # ties would trim the NaN away silently; the input check still refuses the broken checkpoint
    recipe = write_recipe({"merge_method": "ties", "base_model": str(llama["base"]),
                           "models": [{"model": str(llama["ft1"])}, {"model": str(nan_model)}],
                           "parameters": {"density": 0.1}})
    out = tmp_path / "out"
    line = one_error_line(run_cli("merge", recipe, out))
    assert "'model.layers.1.mlp.up_proj.weight'" in line and str(nan_model) in line and "--allow-nonfinite" in line
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_allow_nonfinite_merges_anyway(llama, nan_model, write_recipe, run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(linear_recipe(llama["ft1"], nan_model)), out, "--quiet",
                     "--allow-nonfinite")
    assert result.code == 0, result.stderr
    merged = tensors_of(out)["model.layers.1.mlp.up_proj.weight"]
    assert torch.isnan(merged[3, 5]) and int(torch.isnan(merged).sum()) == 1
    assert "allow_nonfinite: true" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# The model card reproduces the merge


def test_the_model_card_reproduces_a_random_merge_bit_for_bit(llama, write_recipe, run_cli, tmp_path):
    recipe = write_recipe({"merge_method": "dare_ties", "base_model": str(llama["base"]),
                           "models": [{"model": str(llama["ft1"])}, {"model": str(llama["ft2"])}],
                           "parameters": {"density": 0.3}})
    first = tmp_path / "first"
    assert run_cli("merge", recipe, first, "--seed", "7", "--quiet").code == 0
    card = (first / "README.md").read_text()
    recipe_text = re.search(r"## Recipe\n\n```yaml\n(.*?)```", card, flags=re.S)[1]
    command = re.search(r"```bash\n(mergesmith merge .*)\n```", card)[1].split()
    assert command[:4] == ["mergesmith", "merge", "recipe.yaml", "./merged"] and "--seed" in command
    again = write_recipe(recipe_text, name="from-card.yaml")
    second = tmp_path / "second"
    assert run_cli("merge", again, second, *command[4:], "--quiet").code == 0
    a, b = tensors_of(first), tensors_of(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    third = tmp_path / "third"
    assert run_cli("merge", again, third, "--seed", "8", "--quiet").code == 0
    assert any(not torch.equal(a[k], tensors_of(third)[k]) for k in a)
    assert re.search(r"^  torch: ", card, flags=re.M) and re.search(r"^  rescale: inverse_density", card, flags=re.M)


# ---------------------------------------------------------------------------------------------------------
# No silent fallbacks


def test_tokenizer_source_base_without_a_tokenizer_is_an_error(llama, write_recipe, run_cli, tmp_path):
    recipe = write_recipe({"merge_method": "task_arithmetic", "base_model": str(llama["ft1"]),
                           "models": [{"model": str(llama["ft2"])}], "tokenizer_source": "base"})
    line = one_error_line(run_cli("merge", recipe, tmp_path / "out"))
    assert "tokenizer_source: base" in line and "no tokenizer files" in line


def test_a_base_without_config_says_whose_config_the_output_takes(llama, write_recipe, run_cli, tmp_path):
    base = tmp_path / "bare-base"
    base.mkdir()
    shutil.copy(llama["base"] / "model.safetensors", base / "model.safetensors")
    recipe = write_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(llama["ft2"])}], "tokenizer_source": str(llama["base"])})
    result = run_cli("merge", recipe, tmp_path / "out", "--quiet")
    assert result.code == 0, result.stderr
    assert re.search(rf"warning: '{re.escape(str(base))}' has no config.json; the output takes "
                     rf"{re.escape(str(llama['ft2'] / 'config.json'))}", result.stderr), result.stderr


def test_a_sidecar_killed_mid_write_is_cleaned_up_by_the_next_measure(tmp_path):
    """The sidecar writer keeps the merge's rules: a dead run's staging folder goes, a live one's stays."""
    import socket
    import warnings

    from mergesmith.errors import MergeWarning
    from mergesmith.io.sidecar import StatsReader, save_stats

    stats = {"fisher/w": torch.ones(3)}
    dead = {"host": socket.gethostname(), "pid": 999_999_999, "start": "1"}
    beside = _leftover(tmp_path, "stats", 999_999_999, dead)  # a new sidecar's staging, beside it
    with pytest.warns(MergeWarning, match=re.escape(f"removed {beside}")):
        save_stats(tmp_path / "stats", stats, {"fisher/w": 4}, model="m")
    assert not beside.exists() and PARTIAL not in os.listdir(tmp_path / "stats")
    inside = _leftover(tmp_path / "stats", "stats", 999_999_998, {**dead, "pid": 999_999_998})  # an existing one's
    foreign = tmp_path / "stats" / ".stats.tmp-5"  # our name, but no marker: not ours
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_stats(tmp_path / "stats", stats, {"fisher/w": 4}, model="m")
    assert not inside.exists() and foreign.exists()
    assert [str(w.message) for w in caught] == [f"removed {inside}, the unfinished output of an interrupted run"]
    assert StatsReader(tmp_path / "stats").counts == {"fisher/w": 4}


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_a_companion_file_linked_out_of_its_model_is_refused_at_plan_time(llama, write_recipe, run_cli, tmp_path,
                                                                         name):
    """A tokenizer.json or config.json symlinked to a secret must not end up in a model someone uploads."""
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    model = tmp_path / "linked"
    shutil.copytree(llama["base"], model)
    (model / name).unlink()
    (model / name).symlink_to(secret)
    out = tmp_path / "out"
    line = one_error_line(run_cli("merge", write_recipe(linear_recipe(model, llama["ft1"])), out))
    assert name in line and "outside" in line, line
    assert not out.exists()


def test_a_disk_too_small_for_the_output_is_refused_before_the_merge(recipe_of_two, run_cli, tmp_path, monkeypatch,
                                                                     no_tensor_reads):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    full = usage(10**9, 10**9, 1000)
    monkeypatch.setattr(importlib.import_module("mergesmith.api").shutil, "disk_usage", lambda path: full)
    line = one_error_line(run_cli("merge", recipe_of_two, tmp_path / "out"))
    assert re.search(r"the merge writes [\d.]+ KB but .* has only 1.0 KB free", line), line


def test_the_disk_filling_up_during_the_write_is_one_line_and_leaves_nothing(recipe_of_two, run_cli, tmp_path,
                                                                            monkeypatch):
    from mergesmith.io import writer

    real, written = os.pwrite, []

    def filling(fd, data, offset):
        if offset > 0 and written:  # the first tensor goes through, then the disk is full
            raise OSError(28, "No space left on device")
        if offset > 0:
            written.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", filling)
    out = tmp_path / "out"
    line = one_error_line(run_cli("merge", recipe_of_two, out))
    assert "No space left on device" in line and written
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


@pytest.mark.parametrize("dtype,accepted", [(torch.bfloat16, True), (torch.int64, False)])
def test_dtypes_across_models(llama, write_recipe, run_cli, tmp_path, dtype, accepted, no_tensor_reads):
    """Floating dtypes may differ (each input is merged in float32); a weight that is an integer tensor in
    one model is refused at plan time, naming the tensor and every model's dtype."""
    folder = tmp_path / "other-dtype"
    shutil.copytree(llama["ft2"], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("merge", write_recipe(linear_recipe(llama["base"], folder)), tmp_path / "out", "--dry-run")
    if accepted:
        assert result.code == 0, result.stderr
    else:
        line = one_error_line(result)
        assert f"dtype mismatch for '{name}'" in line and "has float32" in line and "has int64" in line, line


def test_a_misspelt_recipe_file_is_suggested(recipe_of_two, run_cli, tmp_path):
    line = one_error_line(run_cli("merge", recipe_of_two.with_suffix(".yml"), tmp_path / "out"))
    assert line.endswith(f"not found (did you mean '{recipe_of_two.name}'?)"), line


def test_measure_never_replaces_a_sidecar_unasked(llama, run_cli, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(6)))
    stats = tmp_path / "stats"
    measure = ("measure", llama["base"], "--data", data, "--kind", "fisher", "-o", stats)
    assert run_cli(*measure).code == 0
    first = (stats / "stats.safetensors").read_bytes()
    line = one_error_line(run_cli(*measure))
    assert "already holds a sidecar (stats.safetensors); pass --overwrite" in line
    assert (stats / "stats.safetensors").read_bytes() == first
    assert run_cli(*measure, "--overwrite").code == 0
    line = one_error_line(run_cli("stats", "combine", stats, "-o", stats, "--overwrite"))
    assert "it is an input" in line


@pytest.mark.parametrize("name,pattern", [
    ("./base", r"not found at /.*/base \(relative paths are taken from the current directory"),
    ("meta-llama/Llama-3-8B", r"never downloads: download it first"),
    ("~/no-such-model-here", r"not found at /.*/no-such-model-here$"),
])
def test_a_missing_model_says_where_it_looked(run_cli, write_recipe, tmp_path, monkeypatch, name, pattern):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(run_cli("merge", write_recipe(f"merge_method: linear\nmodels: [{{model: '{name}'}}]\n"),
                                  tmp_path / "out"))
    assert re.search(pattern, line), line


def test_a_prior_from_the_base_needs_the_base_s_statistics_at_plan_time(llama, write_recipe, run_cli, tmp_path,
                                                                        no_tensor_reads):
    recipe = write_recipe({"merge_method": "gradient_matching", "base_model": str(llama["base"]),
                           "models": [{"model": str(llama["ft1"]), "stats": str(tmp_path / "unused")}],
                           "parameters": {"prior": "base"}})
    line = one_error_line(run_cli("merge", recipe, tmp_path / "out"))
    assert "needs the base model's 'fisher' statistics and it has none" in line
    assert f"base_model: {{model: {llama['base']}, stats: DIR}}" in line


def test_a_listing_cut_short_by_its_reader_exits_0(tmp_path):
    import subprocess

    proc = subprocess.run(f"set -o pipefail; {sys.executable} -m mergesmith methods | head -1", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    from mergesmith.methods import method_names

    assert proc.stdout.startswith(method_names()[0] + " ")


def test_methods_lists_each_parameter_s_default_range_and_meaning_on_stdout(run_cli):
    from mergesmith.methods import get_method

    result = run_cli("methods", "TIES")
    assert result.code == 0 and result.stderr == ""
    for p in get_method("ties").params:
        default = str(p.default).lower() if isinstance(p.default, bool) else str(p.default)
        scope = "per model" if p.per_model else "global"
        assert f"    {p.name} ({scope}): default {default}, {p.range_text}\n        {p.help}\n" in result.stdout
    assert "``" not in result.stdout


def test_a_base_model_the_method_does_not_use_is_said(llama, write_recipe, run_cli, tmp_path):
    recipe = {**linear_recipe(llama["base"], llama["ft1"]), "base_model": str(llama["ft2"])}
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(recipe), out, "--quiet")
    assert result.code == 0, result.stderr
    assert f"'linear' does not use a base model: base_model '{llama['ft2']}' is neither read nor merged" \
        in result.stderr
    assert "Base model:" not in (out / "README.md").read_text()


def test_an_unwritable_output_is_one_line(recipe_of_two, run_cli, tmp_path):
    """As root every permission check passes, so a read-only filesystem is the honest unwritable place."""
    import subprocess

    mount = tmp_path / "read-only"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a read-only tmpfs here (not root, or no mount permission)")
    try:
        line = one_error_line(run_cli("merge", recipe_of_two, mount / "out"))
        assert f"cannot write to {mount}" in line, line
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_measure_warns_when_the_tokenizer_knows_little_of_the_data(llama, run_cli, tmp_path):
    """The tiny Llama's word-level tokenizer knows w0…w95; English text is all <unk> to it."""
    data = tmp_path / "english.jsonl"
    data.write_text(json.dumps({"text": "hello world the cat w3"}) + "\n")  # 4 of 5 tokens unknown
    result = run_cli("measure", llama["base"], "--data", data, "--kind", "fisher", "-o", tmp_path / "stats")
    assert result.code == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: 80% of the tokens of {data} are the tokenizer's unknown token '<unk>': is this "
                      f"the data the model was tuned on, and its tokenizer?"], result.stderr
