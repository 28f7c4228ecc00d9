"""A merge written as a PEFT LoRA adapter over its base: each changed matrix's delta truncated to rank R.

Every merged matrix W (a linear or embedding weight) whose delta D = W − W_base is nonzero becomes one LoRA
module of rank r = min(R, out, in): the truncated SVD D ≈ U_r S_r V_rᵀ split evenly, B = U_r S_r^½ and
A = S_r^½ V_rᵀ (the transpose for an embedding, as peft stores them), with lora_alpha = r so that peft's
scaling is 1. Every other changed tensor (biases, norms) is stored whole under the name peft's wrapped model
loads it by. The relative Frobenius error ‖D − B A‖ / ‖D‖ of each module is kept for the summary and the
model card. Loads with ``peft.PeftModel.from_pretrained(base, directory)``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergesmith.architecture import EMBEDDING_HINTS
from mergesmith.errors import OutputError
from mergesmith.io.adapter import ADAPTER_CONFIG, PEFT_PREFIX
from mergesmith.io.checkpoint import TensorSource
from mergesmith.methods.subspace import gram_svd

ADAPTER_FILE = "adapter_model.safetensors"
# transformers' Conv1D models, and the leaf names of their Conv1D layers (peft needs fan_in_fan_out for them)
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")
CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc", "q_attn")


@dataclass
class AdapterWriter:
    """Takes merged tensors one at a time (``add``) and writes the adapter at ``close``; holds only the factors
    and the whole small tensors, never a full model."""

    directory: Path
    base: TensorSource
    rank: int
    base_model: str  # recorded as base_model_name_or_path
    dtype: torch.dtype | None = None  # the factors' dtype (None: each base tensor's)
    task_type: str | None = None
    conv1d: bool = False  # GPT-2's family: its c_* projections are Conv1D, weights stored (in, out)
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative Frobenius error
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _whole: dict[str, torch.Tensor] = field(default_factory=dict)
    _ranks: dict[str, int] = field(default_factory=dict)
    _squares: dict[str, float] = field(default_factory=dict)  # module -> ‖D‖²

    def add(self, name: str, merged: torch.Tensor) -> None:
        if name not in self.base.keys():
            raise OutputError(f"--output-adapter: the merge has '{name}', which the base does not: an adapter over "
                              f"the base cannot hold it; write a full model instead")
        base = self.base.get(name)
        if tuple(base.shape) != tuple(merged.shape):
            raise OutputError(f"--output-adapter: '{name}' has shape {tuple(merged.shape)} in the merge and "
                              f"{tuple(base.shape)} in the base: an adapter cannot hold it; write a full model instead")
        if not merged.is_floating_point():
            return
        delta = merged.float() - base.float()
        if not bool(delta.any()):
            return
        dtype = self.dtype or base.dtype
        if merged.dim() == 2 and name.endswith(".weight"):
            self._add_module(name[:-len(".weight")], delta, dtype)
        else:
            self._whole[name] = merged.to(dtype)

    def _add_module(self, module: str, delta: torch.Tensor, dtype: torch.dtype) -> None:
        rank = min(self.rank, *delta.shape)
        u, s, vt = gram_svd(delta, rank)
        root = s.sqrt()
        left, right = u * root, root[:, None] * vt  # delta ≈ left @ right
        self._squares[module] = float(delta.double().pow(2).sum())
        self.errors[module] = float((delta - left @ right).norm() / delta.norm())
        self._ranks[module] = rank
        key = PEFT_PREFIX + module
        # peft: an embedding's A is (r, num_embeddings) and B (dim, r), a Conv1D's A (r, in) and B (out, r) for a
        # weight stored (in, out); both deltas are (B A)ᵀ
        if any(hint in module for hint in EMBEDDING_HINTS):
            self._tensors[key + ".lora_embedding_A"] = left.T.contiguous().to(dtype)
            self._tensors[key + ".lora_embedding_B"] = right.T.contiguous().to(dtype)
        elif self._is_conv1d(module):
            self._tensors[key + ".lora_A.weight"] = left.T.contiguous().to(dtype)
            self._tensors[key + ".lora_B.weight"] = right.T.contiguous().to(dtype)
        else:
            self._tensors[key + ".lora_A.weight"] = right.contiguous().to(dtype)
            self._tensors[key + ".lora_B.weight"] = left.contiguous().to(dtype)

    def _is_conv1d(self, module: str) -> bool:
        return self.conv1d and module.rsplit(".", 1)[-1] in CONV1D_LEAVES

    def close(self) -> list[str]:
        """Write adapter_model.safetensors and adapter_config.json; returns the files written."""
        from safetensors.torch import save_file

        tensors = dict(self._tensors)
        for name, tensor in self._whole.items():
            module, _, leaf = name.rpartition(".")
            # inside a LoRA-wrapped module, peft keeps the original parameters under base_layer
            inner = f"{module}.base_layer.{leaf}" if module in self._ranks else name
            tensors[PEFT_PREFIX + inner] = tensor.contiguous()
        save_file(tensors, str(self.directory / ADAPTER_FILE), metadata={"format": "pt"})
        (self.directory / ADAPTER_CONFIG).write_text(json.dumps(self.config(), indent=2, sort_keys=True) + "\n")
        return [ADAPTER_FILE, ADAPTER_CONFIG]

    def config(self) -> dict:
        """peft's LoraConfig for these factors: scaling 1 everywhere (alpha = r per module)."""
        modules = sorted(self._ranks)
        top = max(self._ranks.values(), default=self.rank)
        smaller = {re.escape(m): r for m, r in self._ranks.items() if r != top}
        return {"peft_type": "LORA", "task_type": self.task_type, "base_model_name_or_path": self.base_model,
                "r": top, "lora_alpha": top, "rank_pattern": smaller, "alpha_pattern": dict(smaller),
                "target_modules": modules, "lora_dropout": 0.0, "bias": "all" if self._whole else "none",
                "fan_in_fan_out": any(self._is_conv1d(m) for m in modules), "use_rslora": False, "use_dora": False,
                "modules_to_save": None,
                "init_lora_weights": True, "inference_mode": True, "revision": None}

    def summary(self, shown: int = 10) -> list[tuple[str, int, float]]:
        """(module, rank, relative error) of the worst ``shown`` modules, worst first."""
        worst = sorted(self.errors.items(), key=lambda item: -item[1])[:shown]
        return [(module, self._ranks[module], error) for module, error in worst]

    def overall_error(self) -> float:
        """‖D − B A‖ / ‖D‖ over all modules together (0 when no matrix changed)."""
        total = sum(self._squares.values())
        return math.sqrt(sum(e * e * self._squares[m] for m, e in self.errors.items()) / total) if total else 0.0
