"""Hugging Face models for ``mergesmith measure``: loading, tokenising, and the per-example log-likelihood.

causal-lm: an example is a sequence; its log-likelihood is the sum over its non-padding target tokens of
log p(token | previous tokens), the tokens being the data's (empirical Fisher) or drawn from the model
(sampled Fisher, ``causal_lm_fisher_labels``). seq-cls: log p(label | text) under the classifier.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mergesmith.errors import MergeError

if TYPE_CHECKING:
    from mergesmith.measure import FisherLabels

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


IGNORE = -100  # a label that is no target (Hugging Face's ignore index)


def causal_lm_log_likelihood(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Σ over the target positions t of log p(target_t | x_≤t), per sequence: shape (batch,).

    The target at position t is the token predicted from the prefix x_0..x_t, compared with ``logits[:, t]``:
    ``batch["labels"][:, t]`` when the batch carries labels (the sampled Fisher's drawn tokens; note that this
    is *not* Hugging Face's convention, whose ``labels`` the model shifts itself), else the next input token
    ``input_ids[:, t + 1]``. Position t counts when token t + 1 is not padding (``attention_mask[:, t + 1]``)
    and its label is not ``IGNORE``; the last position predicts past the sequence and never counts.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # at least float32 (half-precision models), but a float64 model stays float64
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = batch["labels"][:, :-1] if "labels" in batch else batch["input_ids"][:, 1:]
    counted = batch["attention_mask"][:, 1:].bool() & (targets != IGNORE)
    token = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (token * counted.to(token.dtype)).sum(dim=-1)


def causal_lm_fisher_labels(samples: int = 1, seed: int = 0) -> FisherLabels:
    """Labels for the *sampled* Fisher of a causal LM (``measure(..., fisher_labels=...)``).

    For every example and every target position t (``attention_mask[:, t + 1]`` set), a token ŷ_t is drawn
    from the model's own predictive distribution p(· | x_≤t), teacher-forced on the real prefix; the
    example's log-likelihood is then Σ_t log p(ŷ_t | x_≤t). ``samples`` such label sequences are drawn per
    example, each weighted 1/samples. Returns [(weights, batch with ``labels``), ...], one batch per draw;
    ``labels`` has the shape of ``input_ids`` and the alignment of ``causal_lm_log_likelihood`` (labels[:, t]
    is the token predicted at position t), with ``IGNORE`` where nothing is predicted.

    Draws come from one seeded generator, example by example and only at target positions, so the same
    seed and data give the same labels however the examples are batched or padded (up to rounding of the
    logits; under torchrun each rank draws its own share with its own generator).
    """
    if samples < 1:
        raise MergeError(f"--samples {samples}: draw at least 1 label sequence per example")
    generator = torch.Generator().manual_seed(seed)

    def choose(model: nn.Module, batch: dict[str, Tensor]) -> list[tuple[Tensor, dict[str, Tensor]]]:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["attention_mask"][:, 1:].bool().cpu()  # (batch, tokens - 1)
        size, width = batch["input_ids"].shape
        draws = torch.full((samples, size, width), IGNORE, dtype=torch.long)  # (samples, batch, tokens)
        for n in range(size):  # one example at a time: a (positions, vocab) slice of probabilities at most
            positions = targets[n].nonzero().squeeze(-1)
            if len(positions):
                probs = torch.softmax(logits[n, positions].detach().cpu().double(), dim=-1)  # (positions, vocab)
                draws[:, n, positions] = torch.multinomial(probs, samples, replacement=True, generator=generator).T
        weight = torch.full((size,), 1.0 / samples, dtype=torch.float64)
        device = batch["input_ids"].device
        return [(weight, {**batch, "labels": draws[k].to(device)}) for k in range(samples)]

    return choose


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
