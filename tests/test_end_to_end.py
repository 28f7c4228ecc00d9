"""End to end: recipes on tiny local Hugging Face checkpoints, merged by the CLI and the library, checked
tensor by tensor against values computed here from the input tensors.

Linear, task arithmetic, SLERP (filters and gradients) and passthrough are checked against formulas written
in this file. TIES, DARE, Model Breadcrumbs, Model Stock and NuSLERP are checked against
``mergesmith.merge_tensors`` (oracle-tested on its own) with the per-tensor parameters resolved *here*, so
what is tested is the recipe → tensor plumbing: filters, gradients, precedence, base handling and I/O.

Parameter resolution as specified for mergesmith recipes:
- a filter matches when it is a substring of the tensor name; the first matching condition wins;
- a gradient [v_0, …, v_m] at depth t is the linear interpolation at position t·m;
- a layer tensor's depth is t = offset/(length − 1) within its output slice (i/(n_layers − 1) for ``models:``);
- tensors outside the layer stack (embeddings, final norm, lm_head) use t = 0.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergesmith
from mergesmith import merge, merge_state_dicts, merge_tensors

ATOL = 1e-6
# Depth of the tensors before and after the layer stack, as in mergekit 0.1.5 (older mergekit releases used
# t = 1 for the final norm and lm_head).
PRE_T = POST_T = 0.0
LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


# ---------------------------------------------------------------------------------------------------------
# Helpers: reading checkpoints and the formulas of the spec


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (a directory, sharded or not, or one file)."""
    if path.is_file():
        return load_file(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors |= load_file(path / name)
    return tensors


def layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match[1]) if match else None


def is_post(name: str) -> bool:
    return layer_of(name) is None and not any(h in name for h in ("embed", "wte", "wpe"))


def depth(name: str, n_layers: int) -> float:
    """t of a tensor in a ``models:`` recipe: i/(n_layers − 1) in the layer stack; PRE_T/POST_T outside."""
    i = layer_of(name)
    if i is None:
        return POST_T if is_post(name) else PRE_T
    return i / (n_layers - 1)


def gradient(values, t: float) -> float:
    if not isinstance(values, list):
        return values
    if len(values) == 1:
        return values[0]
    x = t * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    return (1 - (x - i)) * values[i] + (x - i) * values[i + 1]


def setting(value, name: str, t: float):
    """A recipe parameter for one tensor: scalar, gradient, or [{filter, value}] with the first match winning."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for condition in value:
            pattern = condition.get("filter")
            if pattern in (None, "*") or pattern in name:
                return setting(condition["value"], name, t)
        return None
    return gradient(value, t)


def assert_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, atol: float = ATOL,
                   dtype: torch.dtype = torch.float32) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == dtype, name
        assert actual[name].shape == value.shape, name
        torch.testing.assert_close(actual[name].double(), value.double(), atol=atol, rtol=0, msg=name)


def assert_reloads(out: Path, n_layers: int | None = None) -> torch.nn.Module:
    """The merged directory loads with transformers, with exactly the tensors in its safetensors files."""
    from transformers import AutoModelForCausalLM

    written = read_model(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    for name in set(state) - set(written):  # only a tied output projection may be absent from the files
        assert name == "lm_head.weight" and model.config.tie_word_embeddings, name
        assert torch.equal(state[name], model.get_input_embeddings().weight)
    if n_layers is not None:
        assert model.config.num_hidden_layers == n_layers
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()
    return model


def run_merge(write_recipe, recipe: dict, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    """Write ``recipe`` as YAML, merge it with the library, and read back what was written."""
    merge(write_recipe(recipe), out, **kwargs)
    return read_model(out)


@pytest.fixture
def inputs(llama) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(llama[name] / "model.safetensors") for name in ("base", "ft1", "ft2", "ft3")}


# ---------------------------------------------------------------------------------------------------------
# Linear and task arithmetic: formulas


def test_linear_weighted_mean_via_cli(llama, inputs, write_recipe, run_cli, tmp_path):
    recipe = {"merge_method": "linear",
              "models": [{"model": str(llama["ft1"]), "parameters": {"weight": 1.0}},
                         {"model": str(llama["ft2"]), "parameters": {"weight": 2.0}},
                         {"model": str(llama["ft3"]), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(recipe), out, "--quiet")
    assert result.code == 0, result.stderr

    w = {"ft1": 1.0, "ft2": 2.0, "ft3": 0.5}
    expected = {k: sum(w[m] * inputs[m][k].double() for m in w) / sum(w.values()) for k in inputs["base"]}
    assert_tensors(read_model(out), expected)
    assert_reloads(out, n_layers=2)


def test_linear_filters_and_gradients_without_normalize(llama, inputs, write_recipe, tmp_path):
    w1 = [{"filter": "mlp", "value": 2.0}, {"filter": "self_attn", "value": [0.5, -0.5]}, {"value": 1.0}]
    w2 = [0.5, 1.5]
    recipe = {"merge_method": "linear", "parameters": {"normalize": False},
              "models": [{"model": str(llama["ft1"]), "parameters": {"weight": w1}},
                         {"model": str(llama["ft2"]), "parameters": {"weight": w2}}]}
    written = run_merge(write_recipe, recipe, tmp_path / "out")

    expected = {}
    for k in inputs["base"]:
        t = depth(k, 2)
        expected[k] = setting(w1, k, t) * inputs["ft1"][k].double() + setting(w2, k, t) * inputs["ft2"][k].double()
    assert_tensors(written, expected)
    # spot-check the resolution itself on three tensors
    assert setting(w1, "model.layers.1.self_attn.q_proj.weight", 1.0) == -0.5
    assert setting(w1, "model.layers.0.mlp.up_proj.weight", 0.0) == 2.0
    assert gradient(w2, depth("lm_head.weight", 2)) == 0.5


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(llama, inputs, write_recipe, tmp_path, normalize):
    lam, w = 0.8, {"ft1": 1.0, "ft2": 0.5}
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama["base"]),
              "parameters": {"lambda": lam, "normalize": normalize},
              "models": [{"model": str(llama[m]), "parameters": {"weight": w[m]}} for m in w]}
    written = run_merge(write_recipe, recipe, tmp_path / "out")

    divisor = sum(w.values()) if normalize else 1.0
    expected = {}
    for k, base in inputs["base"].items():
        tau = sum(w[m] * (inputs[m][k].double() - base.double()) for m in w) / divisor
        expected[k] = base.double() + lam * tau
    assert_tensors(written, expected)
    assert_reloads(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# SLERP with filters and gradients over slices: formula


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Shoemake's SLERP on the flattened tensors, linear when |cos| > 0.9995 (mergekit's rule)."""
    a, b = v0.double(), v1.double()
    cos = float((a.flatten() / a.norm()) @ (b.flatten() / b.norm()))
    assert abs(abs(cos) - 0.9995) > 1e-5, "test data too close to the colinear cut-off"
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": [0.2, 0.6]}]


@pytest.mark.parametrize("ranges", [[(0, 4)], [(0, 2), (2, 4)]], ids=["one-slice", "two-slices"])
def test_slerp_filters_and_gradients_over_slices(deep_llama, write_recipe, tmp_path, ranges):
    base, ft = (str(deep_llama[m]) for m in ("base", "ft"))
    recipe = {"merge_method": "slerp", "base_model": base, "parameters": {"t": SLERP_T},
              "slices": [{"sources": [{"model": base, "layer_range": list(r)}, {"model": ft, "layer_range": list(r)}]}
                         for r in ranges]}
    out = tmp_path / "out"
    written = run_merge(write_recipe, recipe, out)

    theta0, theta1 = (load_file(deep_llama[m] / "model.safetensors") for m in ("base", "ft"))
    expected, used_t = {}, set()
    for k in theta0:
        i = layer_of(k)
        if i is None:
            t = POST_T if is_post(k) else PRE_T
        else:
            start, end = next(r for r in ranges if r[0] <= i < r[1])
            t = (i - start) / (end - start - 1)
        value = setting(SLERP_T, k, t)
        used_t.add(round(value, 6))
        expected[k] = slerp(value, theta0[k], theta1[k])
    assert_tensors(written, expected)
    assert len(used_t) >= 4  # interpolated gradient values, not just the list entries
    assert_reloads(out, n_layers=4)


# ---------------------------------------------------------------------------------------------------------
# Passthrough: layer stacking


def test_passthrough_stacks_layers(llama, inputs, write_recipe, tmp_path):
    a, b = str(llama["ft1"]), str(llama["ft2"])
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                         {"sources": [{"model": b, "layer_range": [1, 2]}]}]}
    out = tmp_path / "out"
    written = run_merge(write_recipe, recipe, out)

    # output layers 0, 1 ← A's 0, 1; output layer 2 ← B's 1; embeddings from the first slice, the final
    # norm and lm_head from the last one
    A, B = inputs["ft1"], inputs["ft2"]
    expected = {}
    for k in A:
        i = layer_of(k)
        if i is None:
            expected[k] = (B if is_post(k) else A)[k]
            continue
        for out_i, (src, src_i) in enumerate([(A, 0), (A, 1), (B, 1)]):
            expected[k.replace(f".layers.{i}.", f".layers.{out_i}.")] = src[k.replace(f".layers.{i}.",
                                                                                   f".layers.{src_i}.")]
    assert sorted(written) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(written[k], v), k
    assert not torch.equal(written["lm_head.weight"], A["lm_head.weight"])

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    base_config = json.loads((llama["ft1"] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in base_config.items() if k != "num_hidden_layers"}
    assert_reloads(out, n_layers=3)


def test_passthrough_stacks_gpt2_layers(gpt2, write_recipe, tmp_path):
    """GPT-2 names its layer count n_layer, and its stack transformer.h."""
    a, b = (load_file(gpt2[m] / "model.safetensors") for m in ("ft1", "ft2"))
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(gpt2["ft1"]), "layer_range": [1, 2]}]},
                         {"sources": [{"model": str(gpt2["ft2"]), "layer_range": [0, 2]}]}]}
    out = tmp_path / "out"
    written = run_merge(write_recipe, recipe, out)
    sources = [(a, 1), (b, 0), (b, 1)]
    expected = {}
    for k in a:
        i = layer_of(k)
        if i is None:
            expected[k] = (b if is_post(k) else a)[k]
        elif i == 0:
            for out_i, (src, src_i) in enumerate(sources):
                expected[k.replace(".h.0.", f".h.{out_i}.")] = src[k.replace(".h.0.", f".h.{src_i}.")]
    assert sorted(written) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(written[k], v), k
    assert json.loads((out / "config.json").read_text())["n_layer"] == 3
    assert_reloads(out, n_layers=3)


# ---------------------------------------------------------------------------------------------------------
# The sparsifying and geometric methods: merge_tensors with parameters resolved here


def expected_by_merge_tensors(method: str, base: dict | None, models: list[dict], n_layers: int,
                              global_params: dict, model_params: list[dict], generator=None) -> dict:
    """Per tensor: resolve every parameter (filters, gradients, precedence) and call merge_tensors."""
    expected = {}
    for k in models[0]:
        t = depth(k, n_layers)
        shared = {p: setting(v, k, t) for p, v in global_params.items()}
        per_model = [{p: setting(v, k, t) for p, v in params.items()} for params in model_params]
        expected[k] = merge_tensors(method, None if base is None else base[k], [m[k] for m in models],
                                    model_parameters=per_model, generator=generator, **shared)
    return expected


TIES_GLOBAL = {"density": 0.6, "lambda": 0.9}
TIES_MODELS = [{"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]},
               {"weight": [0.2, 1.0]},
               {"weight": 0.5, "density": 0.3}]


def ties_recipe(names: dict[str, str]) -> dict:
    return {"merge_method": "ties", "base_model": names["base"], "parameters": TIES_GLOBAL,
            "models": [{"model": names["base"]},  # listed as mergekit recipes often do; it is the base
                       *({"model": names[m], "parameters": p} for m, p in zip(("ft1", "ft2", "ft3"), TIES_MODELS))]}


def test_ties_with_per_model_filters_and_gradients(llama, inputs, write_recipe, tmp_path):
    written = run_merge(write_recipe, ties_recipe({m: str(llama[m]) for m in inputs}), tmp_path / "out")
    expected = expected_by_merge_tensors("ties", inputs["base"], [inputs[m] for m in ("ft1", "ft2", "ft3")], 2,
                                         TIES_GLOBAL, TIES_MODELS)
    assert_tensors(written, expected)
    # the trim really happened: for ft3 (density 0.3) most entries of the merged task vector come from
    # fewer models, so the result differs from the untrimmed TIES merge
    untrimmed = expected_by_merge_tensors("ties", inputs["base"], [inputs[m] for m in ("ft1", "ft2", "ft3")], 2,
                                          {"lambda": 0.9}, [{"weight": p["weight"]} for p in TIES_MODELS])
    assert not torch.allclose(written["model.layers.0.mlp.up_proj.weight"],
                              untrimmed["model.layers.0.mlp.up_proj.weight"])
    assert_reloads(tmp_path / "out")


@pytest.mark.parametrize("method,global_params,model_params,models", [
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}, [{"weight": 1.0}, {"weight": [0.5, 1.0]}], ["ft1", "ft2"]),
    ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.1, "lambda": 1.2}, [{}, {"gamma": 0.02}], ["ft1", "ft2"]),
    ("model_stock", {}, [{}, {}, {}], ["ft1", "ft2", "ft3"]),
    ("model_stock", {"filter_wise": True}, [{}, {}], ["ft1", "ft2"]),
    ("nuslerp", {}, [{"weight": 0.3}, {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.7}]}],
     ["ft1", "ft2"]),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 1.0}, {"weight": 2.0}],
     ["ft1", "ft2"]),
])
def test_methods_against_merge_tensors(llama, inputs, write_recipe, tmp_path, method, global_params,
                                       model_params, models):
    recipe = {"merge_method": method, "base_model": str(llama["base"]), "parameters": global_params,
              "models": [{"model": str(llama[m]), "parameters": p} for m, p in zip(models, model_params)]}
    written = run_merge(write_recipe, recipe, tmp_path / "out")
    expected = expected_by_merge_tensors(method, inputs["base"], [inputs[m] for m in models], 2, global_params,
                                         model_params)
    assert_tensors(written, expected)
    for k in expected:  # a real merge: neither the base nor any input is returned unchanged
        if inputs["base"][k].numel() > 100:
            assert not any(torch.equal(written[k], inputs[m][k]) for m in ["base", *models]), k


def test_nuslerp_without_base_interpolates_the_models(llama, inputs, write_recipe, tmp_path):
    recipe = {"merge_method": "nuslerp",
              "models": [{"model": str(llama["ft1"]), "parameters": {"weight": 1.0}},
                         {"model": str(llama["ft2"]), "parameters": {"weight": 3.0}}]}
    written = run_merge(write_recipe, recipe, tmp_path / "out")
    expected = {k: merge_tensors("nuslerp", None, [inputs["ft1"][k], inputs["ft2"][k]],
                                 model_parameters=[{"weight": 1.0}, {"weight": 3.0}]) for k in inputs["base"]}
    assert_tensors(written, expected)


# ---------------------------------------------------------------------------------------------------------
# DARE: seeds


def dare_recipe(names: dict[str, str]) -> dict:
    return {"merge_method": "dare_ties", "base_model": names["base"], "parameters": {"density": 0.5},
            "models": [{"model": names["ft1"], "parameters": {"weight": 0.6}},
                       {"model": names["ft2"], "parameters": {"weight": 0.4, "density": 0.7}}]}


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """(parsed JSON header, tensor bytes) of a safetensors file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_dare_ties_seed_reproducible(llama, write_recipe, tmp_path):
    recipe = write_recipe(dare_recipe({m: str(llama[m]) for m in ("base", "ft1", "ft2")}))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        merge(recipe, tmp_path / name, seed=seed)
    a, b, c = (read_model(tmp_path / n) for n in "abc")
    # identical files up to the order of the JSON header's keys (safetensors serialises its metadata map in
    # an arbitrary order, so the raw bytes of two runs may differ there)
    (header_a, data_a), (header_b, data_b) = (split_safetensors(tmp_path / n / "model.safetensors") for n in "ab")
    assert header_a == header_b and data_a == data_b
    assert all(torch.equal(a[k], b[k]) for k in a)
    big = [k for k in a if a[k].numel() > 100]
    assert all(not torch.equal(a[k], c[k]) for k in big)


def test_dare_drop_and_rescale_structure(llama, inputs, write_recipe, tmp_path):
    """One fine-tune, density p = 0.5, default rescale: every entry is θ_0 (dropped) or θ_0 + τ/p (kept),
    and about half are kept."""
    recipe = {"merge_method": "dare_ties", "base_model": str(llama["base"]), "parameters": {"density": 0.5},
              "models": [{"model": str(llama["ft1"])}]}
    written = run_merge(write_recipe, recipe, tmp_path / "out", seed=5)
    kept = total = 0
    for k, base in inputs["base"].items():
        rescaled = base + (inputs["ft1"][k] - base) / 0.5
        is_base = torch.isclose(written[k], base, atol=ATOL, rtol=0)
        is_kept = torch.isclose(written[k], rescaled, atol=ATOL, rtol=0)
        assert (is_base | is_kept).all(), k  # both only where τ is below the tolerance
        kept, total = kept + int((is_kept & ~is_base).sum()), total + base.numel()
    assert abs(kept / total - 0.5) < 0.02


def test_cli_subprocess_seed_matches_library(llama, write_recipe, cli_subprocess, tmp_path):
    """The installed entry point, as a user runs it: --seed, --max-shard-size and --quiet."""
    recipe = write_recipe(dare_recipe({m: str(llama[m]) for m in ("base", "ft1", "ft2")}))
    result = cli_subprocess("merge", recipe, tmp_path / "cli", "--seed", "7", "--max-shard-size", "20KB", "--quiet")
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
    merge(recipe, tmp_path / "api", seed=7)
    cli, api = read_model(tmp_path / "cli"), read_model(tmp_path / "api")
    assert (tmp_path / "cli" / "model.safetensors.index.json").exists()
    assert sorted(cli) == sorted(api) and all(torch.equal(cli[k], api[k]) for k in api)


# ---------------------------------------------------------------------------------------------------------
# merge_state_dicts equals the file-based merge


@pytest.mark.parametrize("which", ["ties", "dare_ties", "passthrough"])
def test_merge_state_dicts_matches_files(llama, inputs, write_recipe, tmp_path, which):
    def recipe(names):
        if which == "ties":
            return ties_recipe(names)
        if which == "dare_ties":
            return dare_recipe(names)
        return {"merge_method": "passthrough",
                "slices": [{"sources": [{"model": names["ft3"], "layer_range": [1, 2]}]},
                           {"sources": [{"model": names["ft1"], "layer_range": [0, 2]}]}]}

    written = run_merge(write_recipe, recipe({m: str(llama[m]) for m in inputs}), tmp_path / "out", seed=3)
    in_memory = merge_state_dicts(recipe({m: m for m in inputs}), inputs, seed=3)
    assert sorted(in_memory) == sorted(written)
    for k in written:
        assert torch.equal(in_memory[k], written[k]), k


# ---------------------------------------------------------------------------------------------------------
# The output directory


@pytest.mark.parametrize("limit,limit_bytes", [("20KB", 20_000), ("5KB", 5_000)])
def test_sharded_output(llama, inputs, write_recipe, run_cli, tmp_path, limit, limit_bytes):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama["base"]),
              "models": [{"model": str(llama["ft1"])}]}
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(recipe), out, "--max-shard-size", limit)
    assert result.code == 0, result.stderr
    assert "task_arithmetic" in result.stderr  # the summary table

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert not (out / "model.safetensors").exists()
    assert len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    assert sorted(index["weight_map"]) == sorted(inputs["base"])
    total = 0
    for shard in shards:
        tensors = load_file(out / shard)
        assert all(index["weight_map"][k] == shard for k in tensors)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit_bytes or len(tensors) == 1, (shard, size)
        total += size
    assert index["metadata"]["total_size"] == total
    expected = {k: b.double() + (inputs["ft1"][k].double() - b.double()) for k, b in inputs["base"].items()}
    assert_tensors(read_model(out), expected)
    assert_reloads(out)


def test_config_tokenizer_and_model_card(llama, write_recipe, tmp_path):
    from transformers import AutoTokenizer

    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama["base"]),
              "parameters": {"lambda": 0.5},
              "models": [{"model": str(llama["ft1"]), "parameters": {"weight": [0.2, 1.0]}},
                         {"model": str(llama["ft2"])}]}
    out = tmp_path / "out"
    merge(write_recipe(recipe), out)

    assert json.loads((out / "config.json").read_text()) == json.loads((llama["base"] / "config.json").read_text())
    copied = [p.name for p in llama["base"].iterdir()
              if p.name.startswith(("tokenizer", "special_tokens", "generation_config"))]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(copied)
    for name in copied:
        assert (out / name).read_bytes() == (llama["base"] / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2 w3")["input_ids"][-3:] == [5, 6, 7]

    card = (out / "README.md").read_text()
    front, body = re.fullmatch(r"---\n(.*?)\n---\n(.*)", card, re.S).groups()
    meta = yaml.safe_load(front)
    assert meta["base_model"] == sorted(str(llama[m]) for m in ("base", "ft1", "ft2"))
    assert meta["tags"] == ["merge", "mergesmith"]
    assert meta["library_name"] == "transformers"
    assert "task_arithmetic" in body
    assert f"Base model: `{llama['base']}`" in body
    merged_list = re.findall(r"^- `(.*)`$", body.split("## Recipe")[0], re.M)
    assert merged_list == [str(llama["ft1"]), str(llama["ft2"])]
    card_recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", body, re.S)[1])
    assert card_recipe["merge_method"] == "task_arithmetic"
    assert card_recipe["base_model"] == str(llama["base"])
    assert card_recipe["parameters"] == {"lambda": 0.5}
    assert card_recipe["models"][0] == {"model": str(llama["ft1"]), "parameters": {"weight": [0.2, 1.0]}}
    assert card_recipe["models"][1]["model"] == str(llama["ft2"])
    assert mergesmith.plan_merge(card_recipe).method.name == "task_arithmetic"  # the card's recipe is runnable


def test_bfloat16_output(llama, inputs, write_recipe, tmp_path):
    recipe = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": str(llama["base"])}, {"model": str(llama["ft1"])}]}
    out = tmp_path / "out"
    written = run_merge(write_recipe, recipe, out)
    expected = {k: (inputs["base"][k].double() + inputs["ft1"][k].double()) / 2 for k in inputs["base"]}
    assert sorted(written) == sorted(expected)
    for k, v in expected.items():
        assert written[k].dtype == torch.bfloat16, k
        # within one bfloat16 rounding step (8 significant bits) of the exact mean
        torch.testing.assert_close(written[k].double(), v, rtol=2**-7, atol=0, msg=k)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert assert_reloads(out).dtype == torch.bfloat16


@pytest.mark.parametrize("copies", [1, 2, 3, 4])
def test_linear_of_identical_models_is_identity(llama, inputs, write_recipe, tmp_path, copies):
    recipe = {"merge_method": "linear", "models": [{"model": str(llama["ft1"])}] * copies}
    written = run_merge(write_recipe, recipe, tmp_path / "out")
    assert sorted(written) == sorted(inputs["ft1"])
    for k, v in inputs["ft1"].items():
        if copies in (1, 2, 4):  # sums of powers of two are exact in floating point
            assert torch.equal(written[k], v), k
        else:  # (x + x + x)/3 may be one rounding step away from x
            torch.testing.assert_close(written[k], v, rtol=2.4e-7, atol=0, msg=k)


@pytest.mark.parametrize("fmt,same_as", [("sharded", "ft1"), ("bin", "ft2"), ("single_file", "ft3")])
def test_input_formats(llama, inputs, write_recipe, tmp_path, fmt, same_as):
    """Each format as the first (reference) model: read lazily, merged, and (with a config) reloadable."""
    recipe = {"merge_method": "linear", "models": [{"model": str(llama[fmt])}, {"model": str(llama["base"])}]}
    out = tmp_path / "out"
    written = run_merge(write_recipe, recipe, out)
    expected = {k: (inputs[same_as][k].double() + b.double()) / 2 for k, b in inputs["base"].items()}
    assert_tensors(written, expected)
    # a lone .safetensors has no config beside it: the next model's config is used
    config_from = llama["base"] if fmt == "single_file" else llama[fmt]
    assert json.loads((out / "config.json").read_text()) == json.loads((config_from / "config.json").read_text())
    assert_reloads(out)


def test_all_input_formats_in_one_merge(llama, inputs, write_recipe, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama["base"]),
              "models": [{"model": str(llama[m])} for m in ("sharded", "bin", "single_file")]}
    written = run_merge(write_recipe, recipe, tmp_path / "out")
    expected = {k: b.double() + sum(inputs[m][k].double() - b.double() for m in ("ft1", "ft2", "ft3"))
                for k, b in inputs["base"].items()}
    assert_tensors(written, expected)
    assert_reloads(tmp_path / "out")


def test_tied_embeddings(tied_llama, write_recipe, tmp_path):
    base, ft = (load_file(tied_llama[m] / "model.safetensors") for m in ("base", "ft"))
    assert "lm_head.weight" not in base
    recipe = {"merge_method": "linear",
              "models": [{"model": str(tied_llama["base"]), "parameters": {"weight": 0.25}},
                         {"model": str(tied_llama["ft"]), "parameters": {"weight": 0.75}}]}
    out = tmp_path / "out"
    written = run_merge(write_recipe, recipe, out)
    assert_tensors(written, {k: 0.25 * base[k].double() + 0.75 * ft[k].double() for k in base})
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = assert_reloads(out)
    assert torch.equal(model.lm_head.weight, written["model.embed_tokens.weight"])


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_gpt2_small_tensors(gpt2, write_recipe, tmp_path, method):
    tensors = {m: load_file(gpt2[m] / "model.safetensors") for m in ("base", "ft1", "ft2")}
    assert any(t.numel() < 100 for t in tensors["base"].values())
    if method == "linear":
        recipe = {"merge_method": "linear", "models": [
            {"model": str(gpt2["ft1"]), "parameters": {"weight": [{"filter": "ln_", "value": 3.0}, {"value": 1.0}]}},
            {"model": str(gpt2["ft2"])}]}
        expected = {}
        for k in tensors["base"]:
            w1 = 3.0 if "ln_" in k else 1.0
            expected[k] = (w1 * tensors["ft1"][k].double() + tensors["ft2"][k].double()) / (w1 + 1)
    else:
        recipe = {"merge_method": "ties", "base_model": str(gpt2["base"]), "parameters": {"density": 0.3},
                  "models": [{"model": str(gpt2["ft1"])}, {"model": str(gpt2["ft2"]), "parameters": {"weight": 2.0}}]}
        expected = expected_by_merge_tensors("ties", tensors["base"], [tensors["ft1"], tensors["ft2"]], 2,
                                             {"density": 0.3}, [{}, {"weight": 2.0}])
    out = tmp_path / "out"
    written = run_merge(write_recipe, recipe, out)
    assert_tensors(written, expected)
    assert_reloads(out, n_layers=2)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "breadcrumbs"])
def test_bfloat16_inputs_are_combined_in_float32(method):
    """Stored bfloat16 inputs must be widened before any arithmetic: a product formed in bfloat16 (for
    instance a scalar times a bfloat16 tensor) loses ~3 significant digits. Compared with a float64
    computation of the same formula on the same (exactly representable) inputs."""
    g = torch.Generator().manual_seed(0)
    shape = (64, 48)
    states = {name: {"w": torch.randn(shape, generator=g).to(torch.bfloat16)} for name in ("base", "a", "b")}
    weights = {"a": 0.37, "b": 0.61}
    recipe = {"merge_method": method, "base_model": "base", "out_dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": w}} for m, w in weights.items()]}
    merged = mergesmith.merge_state_dicts(recipe, states)["w"]
    x = {name: state["w"].double() for name, state in states.items()}
    if method == "linear":
        expected = (weights["a"] * x["a"] + weights["b"] * x["b"]) / sum(weights.values())
    else:  # density defaults to 1: no entry is dropped, every method is task arithmetic here
        expected = x["base"] + weights["a"] * (x["a"] - x["base"]) + weights["b"] * (x["b"] - x["base"])
        if method == "ties":  # TIES normalises by the summed weights of the agreeing models
            expected = None
    if expected is None:
        tv = torch.stack([x["a"] - x["base"], x["b"] - x["base"]])
        w = torch.tensor([weights["a"], weights["b"]], dtype=torch.float64).reshape(2, 1, 1)
        u = w * tv
        elected = torch.where(u.sum(0) >= 0, 1.0, -1.0)
        agree = (u * elected) > 0
        divisor = (w * agree).sum(0)
        expected = x["base"] + (u * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    torch.testing.assert_close(merged.double(), expected, rtol=2e-6, atol=2e-6)


def test_verbose_says_where_the_time_went(llama, write_recipe, run_cli, tmp_path):
    recipe = {"merge_method": "ties", "base_model": str(llama["base"]), "parameters": {"density": 0.5},
              "models": [{"model": str(llama[m])} for m in ("ft1", "ft2")]}
    result = run_cli("merge", write_recipe(recipe), tmp_path / "out", "--verbose")
    assert result.code == 0, result.stderr
    stages = next(line for line in result.stderr.splitlines() if line.strip().startswith("stages"))
    for stage in ("read", "merge", "damage", "write", "waited for reads", "waited for the writer", "finish"):
        assert f"{stage} " in stages, stages


def test_the_stages_account_for_the_computing_threads_time(llama, tmp_path):
    """The computing thread's stages are consecutive laps of one clock, so they add up to at most its wall
    time; a sink that sleeps shows up as waiting for the writer (sleep's lower bound is the OS's promise)."""
    import time

    from mergesmith.api import _plan
    from mergesmith.config import parse_recipe
    from mergesmith.execute import execute

    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(llama["base"]),
                           "models": [{"model": str(llama[m])} for m in ("ft1", "ft2")]})
    plan = _plan(recipe, "")
    summary = execute(plan, lambda name, tensor: time.sleep(0.01))
    stages = summary.stages
    computing = stages.waiting_for_reads + stages.compute + stages.damage + stages.waiting_for_writer
    assert computing <= summary.seconds
    assert stages.waiting_for_writer >= 0.01 * summary.tensors
    assert stages.read > 0 and stages.compute > 0 and stages.write == 0  # no writer thread here
