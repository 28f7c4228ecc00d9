"""Bad input through the command line: a non-zero exit, ONE line on stderr starting with "error:" that names
the problem, no traceback, and nothing at the output path (nor a leftover temporary directory beside it).

Most cases run ``mergesmith.cli.main`` in-process (the ``run_cli`` fixture: a fresh interpreter costs
seconds to import torch); an exception escaping ``main`` — a traceback for the user — fails the test.
``test_entry_point_subprocess`` checks the same contract on the real ``python -m mergesmith.cli``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mergesmith import MergeError, merge


@pytest.fixture
def out(tmp_path) -> Path:
    """The output path; its parent does not exist yet, so the writer has to create it."""
    return tmp_path / "outputs" / "merged"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == [], leftovers


def assert_one_line_error(result, *patterns: str) -> str:
    assert result.code != 0
    assert "Traceback" not in result.stderr
    line = result.error_line  # asserts exactly one line
    assert line.startswith("error:"), line
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    return line


def fails(run_cli, write_recipe, recipe, out: Path, *patterns: str, args: tuple = ()) -> str:
    """Run the CLI on ``recipe`` (a dict or YAML text) and check the whole bad-input contract."""
    result = run_cli("merge", write_recipe(recipe), out, *args)
    assert result.code == 2, result.stderr
    line = assert_one_line_error(result, *patterns)
    assert_nothing_written(out)
    return line


def linear(*models) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models]}


# ---------------------------------------------------------------------------------------------------------
# The recipe


def test_unknown_top_level_key(llama, write_recipe, run_cli, out):
    recipe = {"merge_mehtod": "linear", "models": [{"model": str(llama["ft1"])}]}
    fails(run_cli, write_recipe, recipe, out, r"merge_method", r"recipe\.yaml")


MISSPELT_REQUIRED_KEYS = [
    ({"merge_mehtod": "linear", "models": [{"model": "x"}]},
     r"unknown key 'merge_mehtod'.*did you mean 'merge_method'"),
    ({"merge_method": "linear", "models": [{"modle": "x"}]}, r"unknown key 'models\.0\.modle'.*did you mean 'model'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_rnage": [0, 1]}]}]},
     r"unknown key 'slices\.0\.sources\.0\.layer_rnage'.*did you mean 'layer_range'"),
]


@pytest.mark.parametrize("recipe,pattern", MISSPELT_REQUIRED_KEYS, ids=["merge_method", "model", "layer_range"])
def test_misspelt_required_key_is_named(write_recipe, run_cli, out, recipe, pattern):
    fails(run_cli, write_recipe, recipe, out, pattern)


@pytest.mark.parametrize("recipe,pattern", [
    ({"merge_method": "linear", "paramters": {}, "models": [{"model": "x"}]},
     r"unknown key 'paramters'.*did you mean 'parameters'"),
    ({"merge_method": "linear", "models": [{"model": "x", "paramters": {"weight": 1}}]},
     r"unknown key 'models\.0\.paramters'.*did you mean 'parameters'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_range": [0, 1], "scale": 2}]}]},
     r"unknown key 'slices\.0\.sources\.0\.scale'"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "dtype": "bfloat61"},
     r"bfloat61.*did you mean 'bfloat16'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_range": [2, 1]}]}]},
     r"layer_range"),
    ({"merge_method": "linear"}, r"'models' or 'slices'"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": {"filtre": "mlp", "value": 1}}}]},
     r"unknown key 'filtre'.*did you mean 'filter'"),
], ids=["top-level", "model-entry", "slice-source", "dtype", "layer-range", "no-models", "condition-key"])
def test_recipe_schema_errors(write_recipe, run_cli, out, recipe, pattern):
    fails(run_cli, write_recipe, recipe, out, pattern)


def test_unknown_merge_method(llama, write_recipe, run_cli, out):
    recipe = {"merge_method": "tiess", "base_model": str(llama["base"]), "models": [{"model": str(llama["ft1"])}]}
    fails(run_cli, write_recipe, recipe, out, r"unknown merge_method 'tiess'.*did you mean 'ties'")


@pytest.mark.parametrize("where", ["global", "model"])
def test_unknown_parameter(llama, write_recipe, run_cli, out, where):
    recipe = {"merge_method": "ties", "base_model": str(llama["base"]), "models": [{"model": str(llama["ft1"])}]}
    if where == "global":
        recipe["parameters"] = {"densty": 0.5}
    else:
        recipe["models"][0]["parameters"] = {"densty": 0.5}
    fails(run_cli, write_recipe, recipe, out, r"unknown parameter 'densty'.*'ties'.*did you mean 'density'")


def test_global_parameter_set_on_a_model(llama, write_recipe, run_cli, out):
    recipe = {"merge_method": "ties", "base_model": str(llama["base"]),
              "models": [{"model": str(llama["ft1"]), "parameters": {"lambda": 0.5}}]}
    fails(run_cli, write_recipe, recipe, out, r"'lambda' is a global parameter")


@pytest.mark.parametrize("density", [1.5, -0.1])
def test_density_out_of_range(llama, write_recipe, run_cli, out, density):
    recipe = {"merge_method": "ties", "base_model": str(llama["base"]),
              "models": [{"model": str(llama["ft1"]), "parameters": {"density": density}}]}
    fails(run_cli, write_recipe, recipe, out, r"'density' must lie in \[0(\.0)?, 1(\.0)?\]", re.escape(str(density)))


def test_missing_base_model(llama, write_recipe, run_cli, out):
    recipe = {"merge_method": "ties", "models": [{"model": str(llama["ft1"])}, {"model": str(llama["ft2"])}]}
    fails(run_cli, write_recipe, recipe, out, r"'ties' needs a base_model")


def test_too_many_models_for_slerp(llama, write_recipe, run_cli, out):
    recipe = {"merge_method": "slerp", "base_model": str(llama["base"]), "parameters": {"t": 0.5},
              "models": [{"model": str(llama["ft1"])}, {"model": str(llama["ft2"])}]}
    fails(run_cli, write_recipe, recipe, out, r"'slerp' takes at most 1 model")


def test_missing_required_parameter(llama, write_recipe, run_cli, out):
    recipe = {"merge_method": "slerp", "base_model": str(llama["base"]), "models": [{"model": str(llama["ft1"])}]}
    fails(run_cli, write_recipe, recipe, out, r"needs parameter 't'")


@pytest.mark.parametrize("recipe,pattern", [
    ({"merge_method": "linear", "tokenizer": {"source": "union"}, "models": [{"model": "x"}]},
     r"tokenizer.*not supported"),
    ({"merge_method": "linear", "modules": {"text": {"models": [{"model": "x"}]}}}, r"modules.*not supported"),
    ({"merge_method": "linear", "tokenizer_source": "union", "models": [{"model": "x"}]}, r"union.*not supported"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}],
                                                 "residual_weight": 0.5}]}, r"residual_weight.*not supported"),
], ids=["tokenizer", "modules", "tokenizer-union", "residual-weight"])
def test_unsupported_mergekit_features(write_recipe, run_cli, out, recipe, pattern):
    fails(run_cli, write_recipe, recipe, out, pattern)


def test_invalid_yaml(write_recipe, run_cli, out):
    text = "merge_method: linear\nmodels:\n  - model: [unclosed\n  - model: x\n"
    fails(run_cli, write_recipe, text, out, r"recipe\.yaml", r"line \d+", r"invalid YAML")


def test_recipe_not_a_mapping(write_recipe, run_cli, out):
    fails(run_cli, write_recipe, "- merge_method: linear\n", out, r"expected a mapping")


def test_recipe_file_missing(run_cli, out, tmp_path):
    result = run_cli("merge", tmp_path / "nope.yaml", out)
    assert result.code == 2
    assert_one_line_error(result, r"nope\.yaml.*not found")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------------------
# The checkpoints


def test_missing_model_path(llama, write_recipe, run_cli, out, tmp_path):
    missing = tmp_path / "no-such-model"
    fails(run_cli, write_recipe, linear(llama["ft1"], missing), out, re.escape(str(missing)), r"not found")


def test_directory_without_weights(llama, bad_models, write_recipe, run_cli, out):
    fails(run_cli, write_recipe, linear(llama["ft1"], bad_models["no_weights"]), out, r"no model weights found",
          re.escape(str(bad_models["no_weights"])))


def test_shape_mismatch(llama, bad_models, write_recipe, run_cli, out):
    line = fails(run_cli, write_recipe, linear(llama["base"], bad_models["wide"]), out,
                 r"[Ss]hape mismatch for 'model\.layers\.\d+\.mlp\.\w+\.weight'", r"\b64\b", r"\b48\b")
    assert str(bad_models["wide"]) in line


def test_tensor_names_differ(llama, bad_models, write_recipe, run_cli, out):
    fails(run_cli, write_recipe, linear(llama["ft1"], bad_models["renamed"]), out, r"tensor names differ",
          r"lacks 'model\.layers\.1\.mlp\.up_proj\.weight'",
          r"unexpected 'model\.layers\.1\.mlp\.up_proj\.weight_renamed'")


def test_truncated_safetensors_header(llama, bad_models, write_recipe, run_cli, out):
    fails(run_cli, write_recipe, linear(llama["ft1"], bad_models["truncated_header"]), out,
          r"not a readable safetensors file", re.escape(str(bad_models["truncated_header"] / "model.safetensors")))


def test_truncated_safetensors_data(llama, bad_models, write_recipe, run_cli, out):
    fails(run_cli, write_recipe, linear(llama["ft1"], bad_models["truncated_data"]), out,
          re.escape(str(bad_models["truncated_data"] / "model.safetensors")), r"end of the file|incomplete")


def test_pickle_with_code_is_refused(llama, bad_models, write_recipe, run_cli, out):
    marker = bad_models["pickle_code_marker"]
    fails(run_cli, write_recipe, linear(llama["ft1"], bad_models["pickle_code"]), out, r"weights_only",
          r"pytorch_model\.bin")
    assert not marker.exists(), "the checkpoint's pickle ran code"
    # the payload is real: an unsafe load would have run it
    torch.load(bad_models["pickle_code"] / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()


# ---------------------------------------------------------------------------------------------------------
# The output path


def test_output_exists_and_overwrite(llama, write_recipe, run_cli, out):
    recipe = write_recipe(linear(llama["ft1"], llama["ft2"]))
    assert run_cli("merge", recipe, out, "--quiet").code == 0
    first = sorted(p.name for p in out.iterdir())

    result = run_cli("merge", recipe, out)
    assert result.code == 2
    assert_one_line_error(result, r"already exists", r"--overwrite")
    assert sorted(p.name for p in out.iterdir()) == first

    result = run_cli("merge", recipe, out, "--overwrite", "--quiet")
    assert result.code == 0, result.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # no .merged.old-* or .tmp-* left


def test_overwrite_never_deletes_a_directory_mergesmith_did_not_write(llama, write_recipe, run_cli, out):
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    result = run_cli("merge", write_recipe(linear(llama["ft1"], llama["ft2"])), out, "--overwrite")
    assert_one_line_error(result, r"not written by mergesmith")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_failed_overwrite_keeps_the_old_output(llama, bad_models, write_recipe, run_cli, out):
    assert run_cli("merge", write_recipe(linear(llama["ft1"], llama["ft2"])), out, "--quiet").code == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama["base"]),
              "models": [{"model": str(bad_models["with_inf"])}]}
    result = run_cli("merge", write_recipe(recipe, name="bad.yaml"), out, "--overwrite", "--max-shard-size", "5KB")
    assert result.code == 2
    assert_one_line_error(result, r"NaN or infinite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert [p.name for p in out.parent.iterdir()] == ["merged"]


def test_output_is_a_file(llama, write_recipe, run_cli, out):
    out.parent.mkdir(parents=True)
    out.write_text("not a directory")
    result = run_cli("merge", write_recipe(linear(llama["ft1"])), out, "--overwrite")
    assert result.code == 2
    assert_one_line_error(result, r"exists and is not a directory")
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize("size,pattern", [("abc", r"cannot read size 'abc'"), ("0", r"size '0' must be positive")])
def test_bad_shard_size(llama, write_recipe, run_cli, out, size, pattern):
    fails(run_cli, write_recipe, linear(llama["ft1"]), out, pattern, args=("--max-shard-size", size))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(llama, write_recipe, run_cli, out):
    fails(run_cli, write_recipe, linear(llama["ft1"]), out, r"no CUDA device", args=("--device", "cuda"))


# ---------------------------------------------------------------------------------------------------------
# Failures in the middle of a merge


def test_non_finite_result_midway(llama, bad_models, write_recipe, run_cli, out):
    """The infinite entry sits in the final norm, merged after every layer: shards were already flushed."""
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama["base"]),
              "models": [{"model": str(llama["ft2"])}, {"model": str(bad_models["with_inf"])}]}
    fails(run_cli, write_recipe, recipe, out, r"'model\.norm\.weight'", r"NaN or infinite",
          args=("--max-shard-size", "5KB"))


def test_zero_weight_sum(llama, write_recipe, run_cli, out):
    recipe = {"merge_method": "linear", "models": [{"model": str(llama["ft1"]), "parameters": {"weight": 1.0}},
                                                   {"model": str(llama["ft2"]), "parameters": {"weight": -1.0}}]}
    fails(run_cli, write_recipe, recipe, out, r"weights sum to zero")


def test_library_failure_after_shards_were_written(llama, write_recipe, out):
    """An exception from a callback after 15 of 21 tensors: shards exist in the temporary directory at that
    moment, and afterwards neither the output nor the temporary directory does."""
    seen: list[str] = []
    parts: list[list[str]] = []

    def on_tensor(job):
        seen.append(job.name)
        if len(seen) == 15:
            parts.append([p.name for p in out.parent.glob(f".{out.name}.tmp-*/*")])
            raise RuntimeError("simulated crash")

    recipe = write_recipe(linear(llama["ft1"], llama["ft2"]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge(recipe, out, max_shard_size="5KB", on_tensor=on_tensor)
    assert any(name.endswith(".safetensors") for name in parts[0]), parts
    assert_nothing_written(out)


def test_library_raises_merge_error_for_bad_input(llama, tmp_path, out):
    with pytest.raises(MergeError, match=r"unknown merge_method 'tiess'.*did you mean 'ties'"):
        merge({"merge_method": "tiess", "models": [{"model": str(llama["ft1"])}]}, out)
    with pytest.raises(MergeError, match=r"not found"):
        merge(linear(llama["ft1"], tmp_path / "missing"), out)
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------------------
# Messages are printed as text


@pytest.mark.parametrize("name", ["[/oops]", "model[bold]x"])
def test_brackets_in_a_path_are_printed_verbatim(write_recipe, run_cli, out, tmp_path, name):
    missing = tmp_path / name
    fails(run_cli, write_recipe, linear(missing), out, re.escape(str(missing)))


# ---------------------------------------------------------------------------------------------------------
# The real entry point


def test_entry_point_subprocess(llama, write_recipe, cli_subprocess, tmp_path):
    recipe = {"merge_method": "tiess", "base_model": str(llama["base"]), "models": [{"model": str(llama["ft1"])}]}
    target = tmp_path / "merged"
    result = cli_subprocess("merge", write_recipe(recipe), target)
    assert result.code == 2
    assert_one_line_error(result, r"unknown merge_method 'tiess'.*did you mean 'ties'")
    assert result.stdout == ""
    assert_nothing_written(target)
