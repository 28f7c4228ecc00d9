"""Local data files for ``mergesmith measure``: JSONL, CSV, plain text (one example per line), parquet,
or a Hugging Face ``datasets`` directory saved with ``save_to_disk`` (the last two need ``datasets``)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise MergeError(f"{path}: reading a saved `datasets` directory needs `pip install datasets`") from None
        return [dict(row) for row in load_from_disk(str(path))]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MergeError(f"{path} line {number}: invalid JSON ({e.msg}); expected one object "
                                     f"per line") from None
        return rows
    if suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        try:
            from datasets import Dataset
        except ImportError:
            raise MergeError(f"{path}: reading parquet needs `pip install datasets`") from None
        return [dict(row) for row in Dataset.from_parquet(str(path))]
    return [{"text": line} for line in path.read_text().splitlines() if line.strip()]


def load_examples(path: str | Path, *, text_field: str = "text", label_field: str | None = None,
                  max_examples: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Examples as {"text": str[, "label": int]}: all of them, or ``max_examples`` drawn with ``seed``."""
    path = Path(path)
    if not path.exists():
        raise MergeError(f"data {path} not found")
    rows = _read_rows(path)
    if not rows:
        raise MergeError(f"data {path} holds no examples")
    if max_examples is not None and max_examples < len(rows):
        rows = random.Random(seed).sample(rows, max_examples)
    examples = []
    for number, row in enumerate(rows, 1):
        if text_field not in row:
            raise MergeError(f"{path}: example {number} has no field '{text_field}' (fields: "
                             f"{', '.join(sorted(row))}); choose one with --text-field")
        example: dict[str, Any] = {"text": str(row[text_field])}
        if label_field is not None:
            if label_field not in row:
                raise MergeError(f"{path}: example {number} has no field '{label_field}'; choose one with "
                                 f"--label-field")
            try:
                example["label"] = int(row[label_field])
            except (TypeError, ValueError):
                raise MergeError(f"{path}: example {number}: label {row[label_field]!r} is not an integer "
                                 f"class index") from None
        examples.append(example)
    return examples
