"""PEFT LoRA adapters as merge inputs: a base checkpoint plus an adapter, read as the full fine-tune it stands for.

A LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a weights-only
``adapter_model.bin``). Each target module M carries factors A (r, in) and B (out, r); merged into its base the
module's weight becomes W + scaling · B A, as PEFT's ``merge_and_unload`` computes it:

- scaling = lora_alpha / r, or lora_alpha / √r with ``use_rslora``; r and alpha per module from ``rank_pattern``
  and ``alpha_pattern`` (PEFT's rule: a pattern matches a module name it ends, at a dot);
- ``fan_in_fan_out`` (GPT-2's Conv1D, weights stored (in, out)) and embeddings (``lora_embedding_A``/``_B``)
  take the transpose, (B A)ᵀ;
- ``lora_bias``: the bias of B is added to the module's bias, times scaling;
- every other tensor in the file (trained biases under ``bias: all`` or ``lora_only``, ``modules_to_save``)
  replaces the base's tensor of that name.

``AdapterSource`` is a ``TensorSource`` over base + adapter: one tensor at a time, each delta formed only when
its tensor is read. It also gives a touched matrix's delta as factors (``low_rank``), which the subspace methods
decompose exactly and cheaply. Anything the reader cannot merge exactly — DoRA, another PEFT type, LoRA on
convolutions or on raw parameters — is refused with one line naming the file and what to do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import CheckpointError
from mergesmith.io.checkpoint import CheckpointReader, TensorSource, contained_file, quote_name, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# config fields that change what the adapter computes in ways a weight delta cannot hold
_UNMERGEABLE = {
    "use_dora": "DoRA (use_dora) rescales each weight column by a learned magnitude",
    "layer_replication": "layer_replication duplicates base layers",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) acts only after its invocation tokens",
    "use_qalora": "QA-LoRA (use_qalora)",
}
_ADVICE = ("merge it into its base with peft's merge_and_unload() and save_pretrained(), then give that "
           "directory as a full model")


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds adapter_config.json)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / ADAPTER_CONFIG).exists()


def split_adapter_reference(reference: str) -> tuple[str, str] | None:
    """mergekit's ``BASE+ADAPTER`` syntax: (base, adapter), or None when ``reference`` names one path (a path
    that exists is never split, so a '+' in a directory name is safe)."""
    if "+" not in reference or Path(reference).expanduser().exists():
        return None
    base, _, adapter = reference.rpartition("+")
    return (base, adapter) if base and adapter else None


@dataclass(frozen=True)
class LoraModule:
    """One target module: where its factors are, and how they make the delta of ``target``."""

    module: str  # the module's name in the base checkpoint
    target: str  # the weight it changes: module + ".weight"
    a_key: str
    b_key: str
    scaling: float
    transposed: bool  # delta = (B A)ᵀ: fan_in_fan_out, and embeddings
    bias_key: str | None = None  # lora_B.bias, added to module + ".bias" (lora_bias)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the module name's end, at a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter directory, checked whole when opened: the config, the weight file's header, and
    that every tensor is one the reader knows how to merge."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        config_path = contained_file(self.path, ADAPTER_CONFIG)
        if config_path is None:
            raise CheckpointError(f"{self.path}: no {ADAPTER_CONFIG}, so it is not a PEFT adapter directory")
        config = read_json(config_path, advice="restore the adapter's adapter_config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
        self.config_path, self.config = config_path, config
        kind = config.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(f"{config_path}: a PEFT {kind or 'untyped'} adapter; mergesmith merges LoRA adapters "
                                  f"(peft_type LORA) only: {_ADVICE}")
        for key, what in _UNMERGEABLE.items():
            if config.get(key):
                raise CheckpointError(f"{config_path}: {what}, which mergesmith does not merge; {_ADVICE}")
        self.r = self._number("r", int)
        self.alpha = self._number("lora_alpha", float)
        self.rslora = bool(config.get("use_rslora", False))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.rank_pattern = self._mapping("rank_pattern")
        self.alpha_pattern = self._mapping("alpha_pattern")
        base = config.get("base_model_name_or_path")
        self.base_model_name_or_path = base if isinstance(base, str) and base else None
        weights = [found for name in ADAPTER_WEIGHTS if (found := contained_file(self.path, name)) is not None]
        if not weights:
            raise CheckpointError(f"{self.path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); copy the "
                                  f"whole adapter directory")
        self.weights = CheckpointReader(weights[0], name=str(weights[0]))

    def _number(self, key: str, kind: type) -> Any:
        value = self.config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
                kind is int and value != int(value)):
            raise CheckpointError(f"{self.config_path}: '{key}' must be a positive number, found {value!r}")
        return kind(value)

    def _mapping(self, key: str) -> dict[str, Any]:
        value = self.config.get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.config_path}: '{key}' must map module patterns to numbers")
        return value

    def scaling(self, module: str, rank: int) -> float:
        """lora_alpha / r (rank-stabilised: / √r) for ``module``, checking r against the factor's rank."""
        r = int(_pattern_value(self.rank_pattern, module, self.r))
        if r != rank:
            raise CheckpointError(f"{self.config_path}: module {quote_name(module)} has rank {rank} in its factors, "
                                  f"but the config says r = {r}; the config and the weights do not match")
        alpha = float(_pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / (math.sqrt(r) if self.rslora else r)


class AdapterSource:
    """A ``TensorSource`` over a base checkpoint plus a LoRA adapter: the full fine-tune, one tensor at a time.

    A touched weight is base + delta in float32 (float64 for a float64 base), formed when it is read; its
    stated dtype stays the base's, so a merge writes the base's dtype."""

    def __init__(self, adapter: LoraAdapter, base: TensorSource, name: str):
        self.adapter, self.base, self.name = adapter, base, name
        self.modules: dict[str, LoraModule] = {}  # by the weight (or bias) each changes
        self.replaced: dict[str, str] = {}  # base tensor -> the adapter tensor that replaces it
        self._parse()

    # -- reading the adapter's tensor names against the base's ------------------------------------------------
    def _parse(self) -> None:
        weights = self.adapter.weights
        where = weights.path
        base_keys = set(self.base.keys())
        factors: dict[str, dict[str, str]] = {}
        plain: dict[str, str] = {}
        for key in weights.keys():
            if not key.startswith(PEFT_PREFIX):
                raise CheckpointError(f"{where}: tensor {quote_name(key)} does not start with '{PEFT_PREFIX}', so "
                                      f"it is not a PEFT adapter's; save the adapter with peft's save_pretrained()")
            name = key[len(PEFT_PREFIX):]
            match = re.fullmatch(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                                 r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector(?:\.weight)?)", name)
            if match is not None:
                if match["part"].startswith("lora_magnitude_vector"):
                    raise CheckpointError(f"{where}: tensor {quote_name(key)} is a DoRA magnitude vector, which "
                                          f"mergesmith does not merge; {_ADVICE}")
                factors.setdefault(match["module"], {})[match["part"]] = key
            elif ".lora_" in name:
                raise CheckpointError(f"{where}: tensor {quote_name(key)} is a kind of LoRA tensor mergesmith does "
                                      f"not know; {_ADVICE}")
            elif ".original_module." in name:
                continue  # the base's own copy of a modules_to_save module
            else:
                # trained biases sit at <module>.base_layer.bias inside a LoRA-wrapped module
                plain.setdefault(name.replace(".base_layer.", ".").replace(".modules_to_save.", "."), key)
        prefix = self._module_prefix(factors, plain, base_keys)
        for name, key in plain.items():
            self.replaced[self._rename(name, prefix, base_keys)] = key
        for module, parts in factors.items():
            self._add_module(self._rename(module + ".weight", prefix, base_keys)[:-len(".weight")], parts)
        self._new_keys = [k for k in self.replaced if k not in base_keys]

    @staticmethod
    def _module_prefix(factors: dict[str, dict[str, str]], plain: dict[str, str], base_keys: set[str]) -> str:
        """'' when the adapter's names are the base's; the first name component to drop when the base was saved
        without the task model's wrapper (``bert.encoder...`` in the adapter, ``encoder...`` in the base)."""
        names = [m + ".weight" for m in factors] or list(plain)
        if not names or any(n in base_keys for n in names):
            return ""
        first = names[0].split(".", 1)[0] + "."
        if all(n.startswith(first) for n in names) and any(n[len(first):] in base_keys for n in names):
            return first
        return ""

    @staticmethod
    def _rename(name: str, prefix: str, base_keys: set[str]) -> str:
        if prefix and name.startswith(prefix) and name not in base_keys:
            return name[len(prefix):]
        return name

    def _add_module(self, module: str, parts: dict[str, str]) -> None:
        weights, where = self.adapter.weights, self.adapter.weights.path
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            have = next(iter(parts.values()))
            raise CheckpointError(f"{where}: module {quote_name(module)} has {quote_name(have)} without its other "
                                  f"LoRA factor; the adapter file is incomplete")
        target = module + ".weight"
        if target not in self.base.keys():
            raise CheckpointError(f"{where}: LoRA module {quote_name(module)} changes {quote_name(target)}, which the "
                                  f"base model '{self.base.name}' does not have; is this adapter for another model?")
        a_shape, b_shape, w_shape = weights.shape(a_key), weights.shape(b_key), tuple(self.base.shape(target))
        if len(w_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(f"{where}: LoRA module {quote_name(module)} is not a linear or embedding layer "
                                  f"(its weight has shape {w_shape}); mergesmith merges LoRA on those only: {_ADVICE}")
        rank = a_shape[0]
        transposed = embedding or self.adapter.fan_in_fan_out
        # embeddings: A (r, num_embeddings), B (dim, r), delta (B A)ᵀ; linear: A (r, in), B (out, r), delta B A
        expected = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
        if b_shape[1] != rank or expected != w_shape:
            raise CheckpointError(f"{where}: LoRA module {quote_name(module)} has factors {b_shape} and {a_shape}, "
                                  f"which do not make the base's {quote_name(target)} of shape {w_shape}; is this "
                                  f"adapter for another model?")
        scaling = self.adapter.scaling(module, rank)
        bias_key = parts.get("lora_B.bias")
        lora = LoraModule(module, target, a_key, b_key, scaling, transposed, bias_key)
        self.modules[target] = lora
        if bias_key is not None:
            if module + ".bias" not in self.base.keys():
                raise CheckpointError(f"{where}: module {quote_name(module)} has a LoRA bias (lora_bias) but the base "
                                      f"has no {quote_name(module + '.bias')} to add it to")
            self.modules[module + ".bias"] = lora

    # -- TensorSource ---------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.base.keys()) + self._new_keys

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.replaced:
            return self.adapter.weights.shape(self.replaced[key])
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        if key in self.replaced:
            return self.adapter.weights.dtype(self.replaced[key])
        return self.base.dtype(key)

    def loaded_dtype(self, key: str) -> torch.dtype:
        """The dtype ``get`` returns: a touched tensor comes back in float32 (or float64), not the stored dtype."""
        return self._work_dtype(key) if key in self.modules else self.dtype(key)

    def _work_dtype(self, key: str) -> torch.dtype:
        return torch.float64 if self.dtype(key) == torch.float64 else torch.float32

    def get(self, key: str) -> torch.Tensor:
        # a saved base layer (peft's save_embedding_layers) replaces the base's tensor, and the delta goes on top
        tensor = self.adapter.weights.get(self.replaced[key]) if key in self.replaced else self.base.get(key)
        lora = self.modules.get(key)
        if lora is None:
            return tensor
        # in place, in peft's order of operations (bit for bit its merge): two tensor-sized float32 buffers, not four
        return tensor.to(self._work_dtype(key), copy=True).add_(self.delta(key))

    def delta(self, key: str) -> torch.Tensor:
        """The adapter's change to ``key``, in the order of operations PEFT's merge uses."""
        lora, dtype = self.modules[key], self._work_dtype(key)
        if key != lora.target:  # the bias of a lora_bias module
            return self.adapter.weights.get(lora.bias_key).to(dtype) * lora.scaling
        a, b = self._a_b(lora, dtype)
        product = (b @ a).mul_(lora.scaling)
        return product.T if lora.transposed else product

    def low_rank(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left, right) with left @ right the adapter's change to a matrix ``key`` (zero-width factors for a
        matrix it leaves alone); None for a tensor it replaces, and for any that is not a matrix."""
        if key in self.replaced or len(self.base.shape(key)) != 2:
            return None
        rows, cols = self.base.shape(key)
        dtype = self._work_dtype(key)
        lora = self.modules.get(key)
        if lora is None:
            return torch.zeros(rows, 0, dtype=dtype), torch.zeros(0, cols, dtype=dtype)
        return self._factors(lora, dtype)

    def _factors(self, lora: LoraModule, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._a_b(lora, dtype)
        return (a.T, b.T * lora.scaling) if lora.transposed else (b * lora.scaling, a)

    def _a_b(self, lora: LoraModule, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's factors A and B as stored, in ``dtype``."""
        return tuple(self.adapter.weights.get(k).to(dtype) for k in (lora.a_key, lora.b_key))

    @property
    def base_path(self) -> Path | None:
        path = getattr(self.base, "path", None)
        return Path(path).resolve() if path is not None else None

    @property
    def directory(self) -> Path | None:
        """Where the merged model's config and tokenizer come from: the base's directory."""
        return getattr(self.base, "directory", None)

    def config(self) -> dict | None:
        return self.base.config() if hasattr(self.base, "config") else None

    def close(self) -> None:
        self.adapter.weights.close()
        if hasattr(self.base, "close"):
            self.base.close()


def open_adapter(adapter: str | Path, base: str | Path | None, name: str) -> AdapterSource:
    """base + adapter as one source. ``base`` None: the adapter's own ``base_model_name_or_path`` when that is a
    local directory, else an error saying how to name the base."""
    lora = LoraAdapter(adapter)
    if base is None:
        recorded = lora.base_model_name_or_path
        if recorded is None or not Path(recorded).expanduser().is_dir():
            said = f"its base_model_name_or_path is '{recorded}', not a local directory" if recorded else \
                "its adapter_config.json names no base_model_name_or_path"
            raise CheckpointError(f"adapter '{name}': {said}; give its base as base_model in the recipe (--base for "
                                  f"measure), or write the model as BASE+{adapter}")
        base = recorded
    return AdapterSource(lora, CheckpointReader(Path(base), name=str(base)), name)


def adapter_files(reference: str) -> tuple[str, str | None] | None:
    """(adapter, base or None) when a recipe's model reference is an adapter — ``BASE+ADAPTER``, or an adapter
    directory alone — else None."""
    split = split_adapter_reference(reference)
    if split is not None:
        return split[1], split[0]
    path = Path(reference).expanduser()
    # a directory holding a full model beside an adapter's config is read as the full model
    full = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if is_adapter(path) and not any((path / name).exists() for name in full):
        return reference, None
    return None


def open_model(reference: str, base_model: str | None = None) -> TensorSource:
    """A recipe's model reference as a source: a checkpoint, ``BASE+ADAPTER``, or an adapter directory whose
    base is ``base_model`` (the recipe's) or else the one its config records."""
    found = adapter_files(reference)
    if found is None:
        return CheckpointReader(Path(reference), name=reference)
    adapter, base = found
    if base is None and base_model is not None and base_model != reference:
        base = base_model
    return open_adapter(adapter, base, reference)
