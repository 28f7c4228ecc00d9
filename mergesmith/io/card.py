"""What goes beside the weights: config, generation config, tokenizer files and the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from mergesmith.errors import CheckpointError
from mergesmith.io.checkpoint import contained_file, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def write_config(source_dir: Path | None, output: Path, *, layers: tuple[int, int] | None,
                 dtype: torch.dtype | None) -> None:
    """Copy config.json (updating the layer count after layer stacking, and the dtype) and
    generation_config.json from ``source_dir``."""
    source = contained_file(source_dir, "config.json") if source_dir is not None else None
    if source is None:
        return
    config = read_json(source, advice="fix or remove it")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: expected a JSON object (a model's config)")
    if layers is not None and layers[0] != layers[1]:
        for key in LAYER_COUNT_KEYS:
            if config.get(key) == layers[0]:
                config[key] = layers[1]
    if dtype in _DTYPE_NAMES:
        dtype_key = "dtype" if "dtype" in config else "torch_dtype"
        config[dtype_key] = _DTYPE_NAMES[dtype]
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = contained_file(source_dir, "generation_config.json")
    if generation is not None:
        shutil.copyfile(generation, output / "generation_config.json")


def copy_tokenizer(source_dir: Path | None, output: Path) -> list[str]:
    """Copy the tokenizer files that exist in ``source_dir``; returns their names."""
    if source_dir is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        # a tokenizer file linked to a secret elsewhere must not end up in a model someone uploads
        source = contained_file(source_dir, name)
        if source is not None:
            shutil.copyfile(source, output / name)
            copied.append(name)
    return copied


def write_model_card(output: Path, *, recipe_yaml: str, method: str, base_model: str | None,
                     models: list[str], library_name: str | None = "transformers",
                     reproduce: dict | None = None, notes: list[str] | None = None) -> None:
    """README.md with Hugging Face front matter, the exact recipe and, in ``reproduce``, what else the merge
    depended on: the command's options (the seed of random methods), the defaults the recipe left unset,
    and the versions that computed it."""
    front = {"base_model": sorted({m for m in [base_model, *models] if m}),
             "tags": ["merge", "mergesmith"]}
    if library_name:
        front["library_name"] = library_name
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             "# Merged model", "",
             f"This model was merged with [mergesmith](https://pypi.org/project/mergesmith/) using the "
             f"`{method}` method.", ""]
    if base_model:
        lines += [f"Base model: `{base_model}`", ""]
    lines += ["Models merged:", "", *[f"- `{m}`" for m in models], "", *(notes or []), "## Recipe", "", "```yaml",
              recipe_yaml.rstrip(), "```", ""]
    if reproduce:
        options = reproduce.get("options", {})
        flags = " ".join(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
                         for k, v in options.items())
        lines += ["## Reproduce", "", "Save the recipe above as `recipe.yaml`, then", "", "```bash",
                  f"mergesmith merge recipe.yaml ./merged {flags}".rstrip(), "```", "",
                  "The same inputs, options and versions give the same tensors bit for bit.", "", "```yaml",
                  yaml.safe_dump({k: v for k, v in reproduce.items() if k != "options"} | {"options": options},
                                 sort_keys=False).rstrip(), "```", ""]
    (output / "README.md").write_text("\n".join(lines))
