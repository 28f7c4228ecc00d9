"""Shared fixtures: tiny random Hugging Face checkpoints built locally (no network), and CLI runners.

Every model is float32 and seeded, so a test can recompute the merge it expects from the input tensors.
The "fine-tunes" are the base's weights plus small seeded perturbations (τ_i = θ_i − θ_0 ≈ 0.01·N(0, 1)),
saved with ``save_pretrained`` like a real fine-tune.

transformers is imported inside the fixtures, so test files that do not use them stay fast to collect.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB, LAYERS = 32, 64, 4, 2, 100, 2
BASE_SCALE = 0.1  # base weights ~ N(0, 0.1²); norm weights ~ 1 + N(0, 0.1²)
TUNE_SCALE = 0.01  # task vectors ~ N(0, 0.01²)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def llama_config(*, layers: int = LAYERS, intermediate: int = INTERMEDIATE, tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=intermediate, num_attention_heads=HEADS,
                       num_key_value_heads=KV_HEADS, vocab_size=VOCAB, num_hidden_layers=layers,
                       max_position_embeddings=64, tie_word_embeddings=tied)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values that do not depend on transformers' initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = BASE_SCALE * torch.randn(p.shape, generator=generator)
            p.copy_(1 + noise if "norm" in name or "ln_" in name else noise)


def _save_fine_tunes(model: torch.nn.Module, root: Path, names_and_seeds: list[tuple[str, int]],
                     scale: float = TUNE_SCALE) -> dict[str, Path]:
    """Save one perturbed copy of ``model`` (the base) per (name, seed), θ_i = θ_0 + scale·N(0, 1);
    the model is restored after."""
    base_values = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = {}
    for name, seed in names_and_seeds:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in sorted(model.named_parameters()):
                p.copy_(base_values[n] + scale * torch.randn(p.shape, generator=generator))
        paths[name] = root / name
        model.save_pretrained(paths[name])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base_values[n])
    return paths


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer Llama base (with a tokenizer) and three fine-tunes, plus copies of the fine-tunes in the
    other input formats: ``sharded`` (= ft1, 20KB shards), ``bin`` (= ft2, pytorch_model.bin) and
    ``single_file`` (= ft3, one loose .safetensors file with nothing beside it)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    model = LlamaForCausalLM(llama_config())
    _randomize(model, seed=0)
    model.save_pretrained(root / "base")
    _save_tokenizer(root / "base")
    paths = {"base": root / "base"}
    paths |= _save_fine_tunes(model, root, [("ft1", 1), ("ft2", 2), ("ft3", 3)])

    ft1 = LlamaForCausalLM.from_pretrained(paths["ft1"])
    ft1.save_pretrained(root / "sharded", max_shard_size="20KB")
    paths["sharded"] = root / "sharded"

    ft2 = LlamaForCausalLM.from_pretrained(paths["ft2"])
    bin_dir = root / "bin"
    try:
        ft2.save_pretrained(bin_dir, safe_serialization=False)
    except TypeError:  # the argument is gone in some transformers releases
        pass
    if not (bin_dir / "pytorch_model.bin").exists():  # transformers 5 writes safetensors regardless
        shutil.rmtree(bin_dir, ignore_errors=True)
        bin_dir.mkdir()
        ft2.config.save_pretrained(bin_dir)
        torch.save(_state_dict(ft2), bin_dir / "pytorch_model.bin")
    paths["bin"] = bin_dir

    ft3 = LlamaForCausalLM.from_pretrained(paths["ft3"])
    (root / "loose").mkdir()
    paths["single_file"] = root / "loose" / "ft3.safetensors"
    save_file(_state_dict(ft3), paths["single_file"])
    return paths


@pytest.fixture(scope="session")
def deep_llama(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer Llama base and one fine-tune with larger task vectors: gradients over 4 layers evaluate
    between their list entries, and SLERP's angles are far from its colinear fallback."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("deep")
    model = LlamaForCausalLM(llama_config(layers=4))
    _randomize(model, seed=10)
    model.save_pretrained(root / "base")
    # scale 0.05: cosines ≈ 0.9 for matrices and ≈ 0.9988 for norm weights, all clear of SLERP's 0.9995 cut-off
    return {"base": root / "base", **_save_fine_tunes(model, root, [("ft", 11)], scale=0.05)}


@pytest.fixture(scope="session")
def tied_llama(tmp_path_factory) -> dict[str, Path]:
    """A Llama with tie_word_embeddings=True (no lm_head.weight on disk) and one fine-tune."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tied")
    model = LlamaForCausalLM(llama_config(tied=True))
    _randomize(model, seed=20)
    model.save_pretrained(root / "base")
    return {"base": root / "base", **_save_fine_tunes(model, root, [("ft", 21)])}


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 (biases and layer norms of 32 elements: tensors under 100 elements) and two fine-tunes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    model = GPT2LMHeadModel(config)
    _randomize(model, seed=30)
    model.save_pretrained(root / "base")
    return {"base": root / "base", **_save_fine_tunes(model, root, [("ft1", 31), ("ft2", 32)])}


@pytest.fixture(scope="session")
def bad_models(tmp_path_factory, llama) -> dict[str, Path]:
    """Checkpoints that must be refused or fail a merge:

    - ``wide``: same architecture but intermediate_size 48 (MLP shapes differ from the base's);
    - ``renamed``: ft1 with one tensor renamed;
    - ``truncated_data``: ft1 with its safetensors file cut short inside the tensor data;
    - ``truncated_header``: ft1's safetensors file cut inside the JSON header;
    - ``with_inf``: ft1 with an infinite entry in the final norm (a tensor merged last);
    - ``pickle_code``: a pytorch_model.bin whose pickle would run code on an unsafe load;
    - ``no_weights``: a directory with only config.json.
    """
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad")
    paths = {}
    wide = LlamaForCausalLM(llama_config(intermediate=48))
    _randomize(wide, seed=40)
    paths["wide"] = root / "wide"
    wide.save_pretrained(paths["wide"])

    ft1 = load_file(llama["ft1"] / "model.safetensors")

    def variant(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        directory = root / name
        directory.mkdir()
        shutil.copy(llama["ft1"] / "config.json", directory / "config.json")
        save_file(tensors, directory / "model.safetensors")
        return directory

    renamed = dict(ft1)
    renamed["model.layers.1.mlp.up_proj.weight_renamed"] = renamed.pop("model.layers.1.mlp.up_proj.weight")
    paths["renamed"] = variant("renamed", renamed)

    with_inf = dict(ft1)
    with_inf["model.norm.weight"] = with_inf["model.norm.weight"].clone()
    with_inf["model.norm.weight"][3] = float("inf")
    paths["with_inf"] = variant("with_inf", with_inf)

    data = (llama["ft1"] / "model.safetensors").read_bytes()
    for name, cut in (("truncated_data", len(data) // 2), ("truncated_header", 40)):
        paths[name] = variant(name, ft1)
        (paths[name] / "model.safetensors").write_bytes(data[:cut])

    paths["pickle_code"] = root / "pickle_code"
    paths["pickle_code"].mkdir()
    shutil.copy(llama["ft1"] / "config.json", paths["pickle_code"] / "config.json")
    marker = root / "pickle_code_ran"
    torch.save({"model.norm.weight": _Payload(str(marker))}, paths["pickle_code"] / "pytorch_model.bin")
    paths["pickle_code_marker"] = marker

    paths["no_weights"] = root / "no_weights"
    paths["no_weights"].mkdir()
    shutil.copy(llama["ft1"] / "config.json", paths["no_weights"] / "config.json")
    return paths


class _Payload:
    """Unpickling this object creates a marker file: it must never happen (weights_only loading)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ---------------------------------------------------------------------------------------------------------
# Recipes and the command line


@pytest.fixture
def write_recipe(tmp_path) -> Callable[..., Path]:
    """write_recipe(dict_or_text, name="recipe.yaml") → path of the YAML file in the test's tmp dir."""

    def write(recipe: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        """stderr, which must be exactly one line for a failure."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.stderr}"
        return lines[0]


@pytest.fixture
def run_cli(capsys, monkeypatch) -> Callable[..., CliResult]:
    """Run ``mergesmith.cli.main`` in this process with the given arguments (importing torch in a fresh
    process costs seconds, so most CLI tests run in-process; ``run_cli_subprocess`` checks the real entry
    point). An exception escaping ``main`` (what a user would see as a traceback) propagates."""
    from mergesmith import cli

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["mergesmith", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(code, ANSI.sub("", out), ANSI.sub("", err))

    return run


def run_cli_subprocess(*args: str | Path, cwd: Path | None = None) -> CliResult:
    proc = subprocess.run([sys.executable, "-m", "mergesmith.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)
    return CliResult(proc.returncode, ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr))


@pytest.fixture
def cli_subprocess() -> Callable[..., CliResult]:
    """Run ``python -m mergesmith.cli`` in a fresh process."""
    return run_cli_subprocess
