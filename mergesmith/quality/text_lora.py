"""The text suite with LoRA fine-tunes: the same MiniLM-L6 start, tasks, splits, random heads and tokenizer as
``text``, but every fine-tune is a PEFT LoRA adapter (``protocol`` says how a suite's ``LORA`` is used), and the
merges take the adapter directories as their models, over the start."""

from __future__ import annotations

from mergesmith.quality.text import (  # noqa: F401  (the suite's names, as text defines them)
    HEADS,
    MAX_LENGTH,
    MEASURE,
    QUICK_MEASURE,
    QUICK_SPLITS,
    SPLITS,
    inputs,
    make_base,
    make_tasks,
)
from mergesmith.quality.text import SOURCE as _TEXT_SOURCE

NAME = "text-lora"
# The encoder's linear layers: query, key, value, the attention output, intermediate and output dense layers of
# every block (not the pooler, which stays as pretrained, nor the embeddings).
TARGET_MODULES = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                  r"intermediate\.dense|output\.dense)")
# Rank 16, alpha 2r: six tasks' adapters span at most 96 of a 384-wide layer's directions, so the merge
# is not forced to overlap them; no LoRA dropout (the model's own dropout stays on, as in text).
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGET_MODULES}
# text's steps and batch, a LoRA learning rate: on seed 0's gcide_pos and kjv_book_group (validation, start
# 22.5 and 18.3 %) 3e-4 reached 87.5 and 42.5 %, 1e-3 88.3 and 44.2 %, 3e-3 43.3 and 34.2 %
FINE_TUNE = {"steps": 120, "lr": 1e-3, "batch_size": 16, "weight_decay": 0.0}
QUICK_FINE_TUNE = {"steps": 25, "lr": 1e-3, "batch_size": 16, "weight_decay": 0.0}
SOURCE = f"{_TEXT_SOURCE}; fine-tuned as PEFT LoRA adapters (r {LORA['r']}, alpha {LORA['lora_alpha']})"
