"""Local data files for ``mergesmith measure``: JSONL, CSV, plain text (one example per line), parquet,
or a Hugging Face ``datasets`` directory saved with ``save_to_disk`` (the last two need ``datasets``).

Every problem with the data is a one-line ``DataError`` naming the file (and the line or example)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from mergesmith.errors import DataError

# what ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` leave in their directory
DATASET_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data {path} is not UTF-8 text (byte {e.start}); give JSONL, CSV, plain text, parquet or "
                        f"a saved `datasets` directory") from None
    except OSError as e:
        raise DataError(f"cannot read data {path}: {e.strerror or e}") from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        if not any((path / marker).is_file() for marker in DATASET_MARKERS):
            raise DataError(f"data {path} is a directory but not a saved `datasets` dataset (no "
                            f"{' or '.join(DATASET_MARKERS)}); give a data file (JSONL, CSV, text, parquet) or a "
                            f"directory written by save_to_disk")
        try:
            from datasets import load_from_disk
        except ImportError:
            raise DataError(f"{path}: reading a saved `datasets` directory needs `pip install datasets`") from None
        return [dict(row) for row in load_from_disk(str(path))]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {number}: invalid JSON ({e.msg}); expected one object "
                                    f"per line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {number}: a JSON {type(row).__name__}, expected one object "
                                    f"per line (like {{\"text\": \"...\"}})")
                rows.append(row)
        return rows
    if suffix == ".csv":
        text = _read_text(path)
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".parquet":
        try:
            from datasets import Dataset
        except ImportError:
            raise DataError(f"{path}: reading parquet needs `pip install datasets`") from None
        return [dict(row) for row in Dataset.from_parquet(str(path))]
    return [{"text": line} for line in _read_text(path).splitlines() if line.strip()]


def load_examples(path: str | Path, *, text_field: str = "text", label_field: str | None = None,
                  max_examples: int | None = None, seed: int = 0, image_field: str | None = None
                  ) -> list[dict[str, Any]]:
    """Examples as {"text": str, "number": int[, "label": int]}: all of them, or ``max_examples`` drawn with
    ``seed``. ``number`` counts the data's examples from 1 in file order (blank lines skipped), for messages.
    With ``image_field`` the input is that field's value as read (nested lists of numbers), kept as
    {"pixel_values": ...} instead of the text; its shape is the image task's to check (``hf.check_images``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data {path} not found")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples {max_examples}: measure at least 1 example")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"data {path} holds no examples")
    numbered = list(enumerate(rows, 1))
    if max_examples is not None and max_examples < len(rows):
        numbered = random.Random(seed).sample(numbered, max_examples)
    field, key = (text_field, "text") if image_field is None else (image_field, "pixel_values")
    choose = "choose one with --text-field" if image_field is None else "image-cls reads each image from it"
    examples = []
    for number, row in numbered:
        if field not in row:
            raise DataError(f"{path}: example {number} has no field '{field}' (fields: "
                            f"{', '.join(sorted(map(str, row)))}); {choose}")
        if row[field] is None:
            raise DataError(f"{path}: example {number} has no value for '{field}'; fill it in or remove "
                            f"the example")
        example: dict[str, Any] = {key: str(row[field]) if image_field is None else row[field], "number": number}
        if label_field is not None:
            if label_field not in row:
                raise DataError(f"{path}: example {number} has no field '{label_field}' (fields: "
                                f"{', '.join(sorted(map(str, row)))}); choose one with --label-field")
            try:
                label = row[label_field]
                example["label"] = int(label)
                if isinstance(label, float) and label != example["label"] or isinstance(label, bool):
                    raise ValueError
            except (TypeError, ValueError):
                raise DataError(f"{path}: example {number}: label {row[label_field]!r} is not an integer "
                                f"class index") from None
        examples.append(example)
    return examples
