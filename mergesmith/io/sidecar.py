"""The statistics sidecar: measured curvature statistics of one model, shared as a safetensors file.

A directory holding ``stats.safetensors``: float32 tensors keyed ``fisher/<parameter>``, ``gram/<module>``,
``kfac_a/<module>``, ``kfac_g/<module>``, each a *mean*, and string metadata (see docs/statistics.md):
``format`` (``mergesmith-stats/1``), ``kinds``, ``counts`` (JSON: examples for Fisher, rows per module for
Gram and K-FAC), ``fisher_variant`` and ``model`` (an identity: a hash of parameter names and shapes).
Because every statistic is a mean with its count, two sidecars of one model combine exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergesmith.errors import MergeError

FORMAT = "mergesmith-stats/1"
FILENAME = "stats.safetensors"
KINDS = ("fisher", "gram", "kfac_a", "kfac_g")


def model_identity(named_shapes: dict[str, tuple[int, ...]]) -> str:
    """A short identity of a model's architecture: a hash of its parameter names and shapes."""
    import hashlib

    text = json.dumps(sorted((name, list(shape)) for name, shape in named_shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_stats(directory: str | Path, tensors: dict[str, torch.Tensor], counts: dict[str, int], *,
               model: str, fisher_variant: str | None = None) -> Path:
    """Write a sidecar; ``counts`` maps each tensor key to the number of examples (or rows) in its mean.
    Written to a temporary file and renamed, so a failure leaves no partial sidecar."""
    directory = Path(directory)
    missing = sorted(set(tensors) - set(counts))
    if missing:
        raise ValueError(f"no count for {missing[0]}")
    kinds = sorted({key.split("/", 1)[0] for key in tensors})
    metadata = {"format": FORMAT, "kinds": ",".join(kinds), "counts": json.dumps(counts), "model": model}
    if fisher_variant:
        metadata["fisher_variant"] = fisher_variant
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".{FILENAME}.partial"
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
                  str(partial), metadata=metadata)
        partial.rename(directory / FILENAME)
    except OSError as e:
        raise MergeError(f"cannot write statistics to {directory}: {e.strerror or e}") from None
    return directory / FILENAME


class StatsReader:
    """Lazy reader of a sidecar directory (or a stats.safetensors file)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path / FILENAME if path.is_dir() else path
        if not self.path.exists():
            raise MergeError(f"statistics not found at {path} (expected {FILENAME})")
        try:
            self._file = safe_open(str(self.path), framework="pt")
            metadata = self._file.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise MergeError(f"{self.path}: not a readable statistics file ({e})") from None
        if metadata.get("format") != FORMAT:
            raise MergeError(f"{self.path}: not a mergesmith statistics sidecar (format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
        self.metadata = metadata
        self.counts: dict[str, int] = json.loads(metadata["counts"])
        self.model: str = metadata["model"]
        self.fisher_variant: str | None = metadata.get("fisher_variant")

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


def combine_stats(sources: list[str | Path], output: str | Path) -> Path:
    """Combine sidecars of one model measured on disjoint data: each statistic becomes the count-weighted
    mean, exactly what measuring all the data at once gives."""
    readers = [StatsReader(s) for s in sources]
    first = readers[0]
    for other in readers[1:]:
        if other.model != first.model:
            raise MergeError(f"{other.path} was measured on another model ({other.model}) than "
                             f"{first.path} ({first.model}); statistics of different models do not combine")
        if other.fisher_variant != first.fisher_variant:
            raise MergeError(f"{other.path} holds the '{other.fisher_variant}' Fisher and {first.path} the "
                             f"'{first.fisher_variant}' one; they do not combine")
        if set(other.keys()) != set(first.keys()):
            extra = sorted(set(other.keys()) ^ set(first.keys()))
            raise MergeError(f"{other.path} and {first.path} hold different statistics (e.g. '{extra[0]}')")
    tensors, counts = {}, {}
    for key in first.keys():
        total = sum(r.counts[key] for r in readers)
        mean = sum(r.get(key).double() * r.counts[key] for r in readers) / max(total, 1)
        tensors[key], counts[key] = mean.float(), total
    return save_stats(output, tensors, counts, model=first.model, fisher_variant=first.fisher_variant)
