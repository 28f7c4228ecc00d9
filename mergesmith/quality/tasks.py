"""What a quality-benchmark suite is made of: tasks with train/validation/test splits of examples that
``mergesmith.measure_checkpoint`` accepts as they are ({"text": ..., "label": ...} for text,
{"pixel_values": [[[...]]], "label": ...} for images)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    name: str
    labels: tuple[str, ...]  # class names; a label is an index into them
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    source: str = ""  # provenance in one line (package, file, licence)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)
