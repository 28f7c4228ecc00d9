"""Same recipe, same tensors: mergesmith against mergekit 0.1.5 for every deterministic method both share.

mergekit is not a dependency; set MERGEKIT_YAML to a `mergekit-yaml` installed in a virtual environment of
its own (see docs/mergekit.md) to run these. Inputs are float32 so that both tools compute in float32.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergesmith

MERGEKIT_YAML = os.environ.get("MERGEKIT_YAML")
pytestmark = pytest.mark.skipif(not MERGEKIT_YAML, reason="set MERGEKIT_YAML to a mergekit-yaml executable")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("parity")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    for i in range(3):
        model = LlamaForCausalLM(config)
        generator = torch.Generator().manual_seed(i + 1)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()}
        model.load_state_dict(state)
        model.save_pretrained(root / f"ft{i}")
    return root


def _models(root: Path, n: int, parameters: list[dict]) -> list[dict]:
    return [{"model": str(root / f"ft{i}"), "parameters": parameters[i]} for i in range(n)]


def _recipes(root: Path) -> dict[str, dict]:
    base = str(root / "base")
    three = [{"weight": 0.5, "density": 0.6}, {"weight": 0.3, "density": 0.4}, {"weight": 0.2, "density": 0.9}]
    return {
        "linear": {"merge_method": "linear", "models": _models(root, 3, [{"weight": w} for w in (0.5, 0.3, 0.2)])},
        "linear_gradient_filter": {
            "merge_method": "linear", "models": _models(root, 2, [{"weight": [1.0, 0.2, 0.7]},
                                                                  {"weight": [{"filter": "mlp", "value": 0.4},
                                                                              {"value": 1.0}]}])},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "parameters": {"lambda": 0.8},
                            "models": _models(root, 3, [{"weight": w} for w in (0.5, 0.3, 0.2)])},
        "ties": {"merge_method": "ties", "base_model": base, "models": _models(root, 3, three)},
        "ties_unnormalized_rescaled": {"merge_method": "ties", "base_model": base,
                                       "parameters": {"normalize": False, "rescale": True, "lambda": 1.3},
                                       "models": _models(root, 3, three)},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base,
                        "parameters": {"gamma": 0.05}, "models": _models(root, 3, three)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base,
                             "parameters": {"gamma": 0.02}, "models": _models(root, 3, three)},
        "slerp": {"merge_method": "slerp", "base_model": base,
                  "slices": [{"sources": [{"model": base, "layer_range": [0, 4]},
                                          {"model": str(root / "ft0"), "layer_range": [0, 4]}]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                       {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                                       {"value": 0.5}]}},
        "nuslerp": {"merge_method": "nuslerp",
                    "models": _models(root, 2, [{"weight": 0.3}, {"weight": 0.7}])},
        "nuslerp_base_rowwise": {"merge_method": "nuslerp", "base_model": base,
                                 "parameters": {"nuslerp_row_wise": True, "nuslerp_flatten": False},
                                 "models": _models(root, 2, [{"weight": 0.6}, {"weight": 0.4}])},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": _models(root, 3, [{}] * 3)},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": base,
                                    "parameters": {"filter_wise": True}, "models": _models(root, 3, [{}] * 3)},
        "sce": {"merge_method": "sce", "base_model": base, "models": _models(root, 3, [{}] * 3)},
        "sce_select": {"merge_method": "sce", "base_model": base, "parameters": {"select_topk": 0.3},
                       "models": _models(root, 3, [{}] * 3)},
        "ram": {"merge_method": "ram", "base_model": base, "parameters": {"epsilon": 0.01},
                "models": _models(root, 3, [{}] * 3)},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base,
                       "parameters": {"epsilon": 0.015, "r": 0.4, "alpha": 0.5}, "models": _models(root, 3, [{}] * 3)},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": _models(root, 1, [{}])},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "parameters": {"t": 0.01},
                     "models": _models(root, 1, [{}])},
        "karcher": {"merge_method": "karcher", "models": _models(root, 3, [{}] * 3)},
        "karcher_base": {"merge_method": "karcher", "base_model": base, "parameters": {"max_iter": 20},
                         "models": _models(root, 2, [{}] * 2)},
        "multislerp": {"merge_method": "multislerp",
                       "models": _models(root, 3, [{"weight": w} for w in (0.5, 0.3, 0.2)])},
        "multislerp_base": {"merge_method": "multislerp", "base_model": base,
                            "parameters": {"normalize_weights": False},
                            "models": _models(root, 3, [{"weight": w} for w in (0.4, 0.3, 0.3)])},
        "passthrough_stack": {"merge_method": "passthrough",
                              "slices": [{"sources": [{"model": str(root / "ft0"), "layer_range": [0, 3]}]},
                                         {"sources": [{"model": str(root / "ft1"), "layer_range": [1, 4]}]}]},
    }


RECIPE_NAMES = list(_recipes(Path("/")).keys())


def _read_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_same_tensors_as_mergekit(llamas: Path, tmp_path: Path, name: str) -> None:
    recipe = _recipes(llamas)[name]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([MERGEKIT_YAML, str(recipe_file), str(tmp_path / "mergekit")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    mergesmith.merge(recipe_file, tmp_path / "mergesmith")
    theirs, ours = _read_dir(tmp_path / "mergekit"), _read_dir(tmp_path / "mergesmith")
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        assert ours[key].dtype == expected.dtype, key
        torch.testing.assert_close(ours[key], expected, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
