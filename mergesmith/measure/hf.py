"""Hugging Face models for ``mergesmith measure``: loading, tokenising, and the per-example log-likelihood.

causal-lm: an example is a sequence; its log-likelihood is the sum over its non-padding target tokens of
log p(token | previous tokens). seq-cls: log p(label | text) under the classifier.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergesmith.errors import MergeError

TASKS = ("causal-lm", "seq-cls")


def infer_task(model_dir: Path) -> str:
    import json

    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    for name in architectures:
        if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
            return "causal-lm"
        if name.endswith("ForSequenceClassification"):
            return "seq-cls"
    raise MergeError(f"{model_dir}: cannot tell the task from config.json (architectures: "
                     f"{architectures or 'none'}); pass --task causal-lm or --task seq-cls")


def load_model(model_dir: Path, task: str, *, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """The model (float32, eval mode) and its tokenizer, from local files only."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # the CLI's own progress bar and one-line errors are the interface: keep transformers quiet
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if not (model_dir / "config.json").exists():
        raise MergeError(f"model {model_dir} not found or has no config.json (local directories only)")
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code,
                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer


def batches(examples: list[dict[str, Any]], tokenizer: Any, *, batch_size: int, max_length: int,
            device: torch.device) -> Iterator[dict[str, Tensor]]:
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        encoded = tokenizer([e["text"] for e in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}
        if "label" in chunk[0]:
            batch["labels"] = torch.tensor([e["label"] for e in chunk], device=device)
        yield batch


def causal_lm_log_likelihood(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token * batch["attention_mask"][:, 1:]).sum(dim=-1)


def class_log_probs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """log p(c | x_n) of a sequence classifier, shape (batch, classes)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits.float(), dim=-1)


def seq_cls_log_likelihood(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return class_log_probs(model, batch).gather(-1, batch["labels"][:, None]).squeeze(-1)


def check_labels(examples: list[dict[str, Any]], model: nn.Module, task: str, data: Path) -> None:
    if task != "seq-cls":
        return
    if not examples or "label" not in examples[0]:
        raise MergeError("seq-cls needs labels: pass --label-field")
    classes = model.config.num_labels
    for number, example in enumerate(examples, 1):
        if not 0 <= example["label"] < classes:
            raise MergeError(f"{data}: example {number} has label {example['label']}, outside the model's "
                             f"{classes} classes [0, {classes - 1}]")
