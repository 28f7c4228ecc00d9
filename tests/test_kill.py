"""Nothing half-written (issue 8, item 7): a merge killed at any moment leaves its target either absent or
complete, and the next run removes what the killed one left.

Real subprocesses (`python -m mergesmith.cli merge`) on a Llama big enough that the merge itself takes about
a second after start-up (hidden 512, 4 layers, vocabulary 8000: 70 MB per model in float32; 30-odd output
shards of at most 1 MB):

- SIGKILL at 20 seeded random moments spread from the start of the process (``import torch`` included) to a
  little after an uninterrupted run would have finished; after every kill the parent directory holds only the
  target and ``.<name>.tmp-<pid>`` leftovers, and a target that exists is loadable by transformers and equal
  bit for bit to an uninterrupted merge. Each later run that got past its clean-up (it made its own temporary
  directory, or finished) must have removed the leftovers it found and said so in a line; one more kill in the
  middle of the merge, then a run to completion, which removes the last ones;
- SIGTERM and SIGINT (Ctrl-C) in the middle of the merge: exit 143 / 130, one ``error:`` line saying
  "interrupted", no traceback, no temporary directory, no target;
- ``--overwrite`` killed right at the end, at the two renames (a wrapper SIGKILLs the process just after
  ``os.rename``): the target is the old or the new output, and the next run puts the old one back if it had
  been moved aside, or removes it if it had been replaced; and killed while the replaced output is being
  deleted (its markers go last, so what is left still says whose it is), early or at its very end.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ANSI, _randomize, _save_fine_tunes, _save_tokenizer
from safetensors.torch import load_file

from mergesmith.errors import MergeWarning
from mergesmith.io.writer import clean_leftovers

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 512, 1024, 4, 8000
KILLS = 12
SEED = 807
SPAN = 1.15  # kill moments spread over [0, SPAN × an uninterrupted run's wall time]
SHARD = "1MB"


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the models, one recipe, the reference merge (which also times an uninterrupted run)


@pytest.fixture(scope="session")
def kill_inputs(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("kill")
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=VOCAB, num_hidden_layers=LAYERS,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    _randomize(model, seed=80)
    model.save_pretrained(root / "base")
    _save_tokenizer(root / "base")  # so that stderr holds no warning about a missing one
    paths = {"base": root / "base", **_save_fine_tunes(model, root, [("ft1", 81), ("ft2", 82)])}
    ties = {"merge_method": "ties", "base_model": str(paths["base"]), "parameters": {"density": 0.5},
            "models": [{"model": str(paths["ft1"]), "parameters": {"weight": 0.6}},
                       {"model": str(paths["ft2"]), "parameters": {"weight": 0.4}}]}
    linear = {"merge_method": "linear",
              "models": [{"model": str(paths[m]), "parameters": {"weight": 0.5}} for m in ("ft1", "ft2")]}
    for name, recipe in (("ties", ties), ("linear", linear)):
        paths[name] = root / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump(recipe, sort_keys=False))
    return paths


def merge_command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mergesmith.cli", "merge", str(recipe), str(out), "--max-shard-size", SHARD,
            *extra]


def shards(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors |= load_file(directory / file)
    return tensors


@pytest.fixture(scope="session")
def reference(kill_inputs, tmp_path_factory) -> dict:
    """An uninterrupted merge: its tensors, and its wall time (start-up included) to spread the kills over."""
    out = tmp_path_factory.mktemp("reference") / "out"
    start = time.monotonic()
    proc = subprocess.run(merge_command(kill_inputs["ties"], out, "--quiet"), capture_output=True, text=True,
                          timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    tensors = shards(out)
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 10
    return {"dir": out, "seconds": seconds, "tensors": tensors}


# ---------------------------------------------------------------------------------------------------------
# Checks


def leftovers(out: Path, kind: str = "tmp|old") -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{kind})-\d+$")
    return sorted(p for p in out.parent.iterdir() if pattern.match(p.name))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_equal_model(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    got = shards(directory)
    assert sorted(got) == sorted(expected), f"{directory}: other tensor names than expected"
    differing = [name for name in expected if not same_bits(got[name], expected[name])]
    assert not differing, f"{directory}: {len(differing)} tensors differ from the expected merge: {differing[:3]}"


def assert_complete(out: Path, expected: dict[str, torch.Tensor]) -> None:
    """A finished output: our marker and no partial one, loadable by transformers, tensors as expected."""
    from transformers import AutoModelForCausalLM

    assert (out / ".mergesmith").is_file() and not (out / ".mergesmith-partial").exists(), sorted(os.listdir(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    del model
    assert_equal_model(out, expected)


def assert_only_target_and_leftovers(out: Path) -> None:
    names = {p.name for p in out.parent.iterdir()} - {out.name} - {p.name for p in leftovers(out, "tmp")}
    assert not names, f"a killed run left {sorted(names)} beside {out}"


def removal_lines(stderr: str, folder: Path) -> list[str]:
    return [line for line in ANSI.sub("", stderr).splitlines()
            if line.startswith("warning: removed ") and str(folder) in line]


def wait_until_writing(proc: subprocess.Popen, out: Path, limit: float = 60) -> Path:
    """Block until the run has created its temporary directory and its shard files (the merge is under way)."""
    tmp = out.parent / f".{out.name}.tmp-{proc.pid}"
    deadline = time.monotonic() + limit
    while not (tmp.is_dir() and any(tmp.glob("*.safetensors"))):
        assert proc.poll() is None, f"the merge ended (exit {proc.returncode}) before it was interrupted"
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.005)
    return tmp


# ---------------------------------------------------------------------------------------------------------
# SIGKILL at random moments


def test_sigkill_at_random_moments_leaves_nothing_half_written(kill_inputs, reference, tmp_path):
    out = tmp_path / "merge" / "out"  # its parent holds nothing else: what a killed run leaves is all there is
    out.parent.mkdir()
    rng = random.Random(SEED)
    span = SPAN * reference["seconds"]
    delays = [(k + rng.random()) * span / KILLS for k in range(KILLS)]  # one per stratum: the whole run is covered
    rng.shuffle(delays)
    outcomes = {"before the output existed": 0, "while writing": 0, "complete": 0}
    cleanups = 0
    for k, delay in enumerate(delays):
        found = leftovers(out, "tmp")
        log = tmp_path / f"kill-{k}.err"
        with open(log, "w") as err:
            proc = subprocess.Popen(merge_command(kill_inputs["ties"], out), stdout=subprocess.DEVNULL, stderr=err)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        stderr = log.read_text()
        context = f"kill {k} at {delay:.2f} s (exit {proc.returncode}):\n{stderr[-2000:]}"
        assert proc.returncode in (0, -signal.SIGKILL), context
        assert_only_target_and_leftovers(out)
        own = out.parent / f".{out.name}.tmp-{proc.pid}"
        if out.exists():
            assert_complete(out, reference["tensors"])
            outcomes["complete"] += 1
        else:
            outcomes["while writing" if own.exists() else "before the output existed"] += 1
        if own.exists() or out.exists():  # this run got past its clean-up: what it found must be gone, and said
            for folder in found:
                assert not folder.exists(), f"{folder} survived a later run; {context}"
                assert len(removal_lines(stderr, folder)) == 1, f"no line said {folder} was removed; {context}"
            cleanups += bool(found)
        shutil.rmtree(out, ignore_errors=True)  # a complete output would make the next run refuse
    # a kill while writing is the case that matters; about 5 of the 12 land there (the deterministic one below
    # makes sure the final run has leftovers to remove, whatever the load did to the timing)
    assert outcomes["while writing"] >= 2, (outcomes, cleanups, reference["seconds"])

    # one more kill certain to land in the middle of the merge, then a run to completion cleans up after all
    proc = subprocess.Popen(merge_command(kill_inputs["ties"], out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_until_writing(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = leftovers(out, "tmp")
    assert found and not out.exists()
    final = subprocess.run(merge_command(kill_inputs["ties"], out), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert leftovers(out) == [], f"left after a complete run: {leftovers(out)}"
    for folder in found:
        assert len(removal_lines(final.stderr, folder)) == 1, f"no line about removing {folder}:\n{final.stderr}"
    assert_complete(out, reference["tensors"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C


@pytest.mark.parametrize("signal_number, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_mid_merge_removes_the_temporary_directory(kill_inputs, tmp_path, signal_number, code):
    out = tmp_path / "out"
    # a child started from a shell's background job would inherit an ignored SIGINT: give it Ctrl-C back
    proc = subprocess.Popen(merge_command(kill_inputs["ties"], out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        tmp = wait_until_writing(proc, out)
        proc.send_signal(signal_number)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stderr = ANSI.sub("", stderr)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()  # the base has a tokenizer and the inputs are clean: no warning either
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), stderr
    assert not tmp.exists() and not out.exists(), sorted(os.listdir(tmp_path))
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------------
# --overwrite killed at the end

# Runs the CLI with os.rename / os.unlink wrapped: the process SIGKILLs itself just after the step named by
# its first argument — the old output moved aside, the new one renamed into place, or (during the removal of
# the old output) its marker unlinked.
DRIVER = """
import os, signal, sys
stage = sys.argv.pop(1)
real_rename, real_unlink = os.rename, os.unlink

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def rename(src, dst, *args, **kwargs):
    real_rename(src, dst, *args, **kwargs)
    if (stage == "moved-aside" and ".old-" in os.path.basename(dst)
            or stage == "renamed-in" and ".tmp-" in os.path.basename(src)):
        die()

def unlink(path, *args, **kwargs):
    real_unlink(path, *args, **kwargs)
    name, folder = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if ".old-" in folder and (stage == "removing-old" and name == ".mergesmith"
                              or stage == "removing-old-early" and name.endswith(".safetensors")):
        die()

os.rename, os.unlink = rename, unlink
sys.argv[0] = "mergesmith"
from mergesmith.cli import main
main()
"""


@pytest.fixture(scope="session")
def old_output(kill_inputs, tmp_path_factory) -> dict:
    """A finished output of another recipe (linear), for --overwrite to replace: merged in this process."""
    import mergesmith

    out = tmp_path_factory.mktemp("old") / "out"
    with warnings.catch_warnings():  # ft1, the reference of a recipe without a base, has no tokenizer
        warnings.simplefilter("ignore", MergeWarning)
        mergesmith.merge(kill_inputs["linear"], out, max_shard_size=SHARD)
    return {"dir": out, "tensors": shards(out)}


def killed_overwrite(stage: str, kill_inputs, old_output, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(old_output["dir"], out)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(driver), stage, *merge_command(kill_inputs["ties"], out)[3:],
                           "--overwrite", "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return out


def run_cli_keeping_handlers(run_cli, *args):
    """The CLI in this process (a fresh one costs seconds of import), restoring the handlers it installs."""
    saved = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return run_cli(*args)
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_overwrite_killed_after_moving_the_old_output_aside(kill_inputs, old_output, tmp_path, run_cli):
    out = killed_overwrite("moved-aside", kill_inputs, old_output, tmp_path)
    assert not out.exists()  # between the two renames: nothing at the target ...
    (aside,) = leftovers(out, "old")  # ... and the old output, complete, beside it
    assert_equal_model(aside, old_output["tensors"])
    # the next run puts it back, says so, and (without --overwrite) refuses to replace it
    result = run_cli_keeping_handlers(run_cli, "merge", kill_inputs["ties"], out, "--max-shard-size", SHARD)
    assert result.code == 2 and "already exists" in result.stderr.strip().splitlines()[-1], result.stderr
    assert f"restored {out}" in result.stderr.replace("\n", " ")
    assert leftovers(out) == []
    assert_complete(out, old_output["tensors"])


def test_overwrite_killed_after_renaming_the_new_output_in(kill_inputs, reference, old_output, tmp_path, run_cli):
    out = killed_overwrite("renamed-in", kill_inputs, old_output, tmp_path)
    assert_complete(out, reference["tensors"])  # the new output is in place; the old one waits beside it
    (aside,) = leftovers(out, "old")
    # the next run (the same command again) removes the old one and says so
    result = run_cli_keeping_handlers(run_cli, "merge", kill_inputs["ties"], out, "--max-shard-size", SHARD,
                                      "--overwrite", "--quiet")
    assert result.code == 0, result.stderr
    assert len(removal_lines(result.stderr, aside)) == 1, result.stderr
    assert leftovers(out) == []
    assert_complete(out, reference["tensors"])


class NotRemoved(AssertionError):
    """The known bug below, told apart from any other failure of its test."""


@pytest.mark.parametrize("stage", ["removing-old-early", "removing-old"])
def test_overwrite_killed_while_removing_the_old_output(kill_inputs, reference, old_output, tmp_path, stage):
    out = killed_overwrite(stage, kill_inputs, old_output, tmp_path)
    assert_complete(out, reference["tensors"])
    (aside,) = leftovers(out, "old")
    clean_leftovers(out)  # what the next run to this output does first
    assert_complete(out, reference["tensors"])
    if leftovers(out):
        raise NotRemoved(f"{aside} ({len(list(aside.iterdir()))} files of the old output) is never removed")
