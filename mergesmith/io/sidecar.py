"""The statistics sidecar: measured curvature statistics of one model, shared as safetensors files.

A directory holding ``stats.safetensors`` or, above ``max_shard_size``, shards
``stats-00001-of-0000N.safetensors`` and an index ``stats.safetensors.index.json`` (``{"metadata": {...},
"weight_map": {key: shard file}}``, as Hugging Face shards checkpoints). Tensors are float32, keyed
``fisher/<parameter>``, ``gram/<module>``, ``kfac_a/<module>``, ``kfac_g/<module>``, each a *mean*. The
string metadata (see docs/statistics.md) — ``format`` (``mergesmith-stats/1``), ``kinds``, ``counts`` (JSON:
examples for Fisher, rows per module for Gram and K-FAC), ``fisher_variant`` and ``model`` (an identity: a
hash of parameter names and shapes) — is in every file, and in the index, so each shard describes itself.
Because every statistic is a mean with its count, two sidecars of one model combine exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergesmith.errors import MergeWarning, OutputError, StatisticsError, UsageError, did_you_mean
from mergesmith.io.checkpoint import SafetensorsHeader, contained_file, quote_name, read_json, safetensors_header
from mergesmith.io.writer import (
    PARTIAL,
    OutputTensor,
    clean_leftovers,
    mark_partial,
    parse_size,
    remove_ours,
    shard_layout,
)

FORMAT = "mergesmith-stats/1"
FILENAME = "stats.safetensors"
INDEX = "stats.safetensors.index.json"
SHARD = "stats-{:05d}-of-{:05d}.safetensors"
SHARD_PATTERN = re.compile(r"stats-\d{5}-of-\d{5}\.safetensors")
DEFAULT_MAX_SHARD_SIZE = "5GB"
KINDS = ("fisher", "gram", "kfac_a", "kfac_g")


def weights_fingerprint(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's values: its first and last 8 entries as float32. Cheap on a
    memory-mapped checkpoint (two pages), the same for a bfloat16 tensor and its float32 copy, and
    different for another fine-tune of the same model."""
    import hashlib

    flat = tensor.detach().reshape(-1)
    ends = torch.cat([flat[:8], flat[-8:]]).to("cpu", torch.float32).contiguous()
    return hashlib.sha256(ends.numpy().tobytes()).hexdigest()[:12]


def model_identity(named_shapes: dict[str, tuple[int, ...]]) -> str:
    """A short identity of a model's architecture: a hash of its parameter names and shapes, the task head's
    left out — fine-tunes of one body for tasks with different label counts are one architecture to merge
    (``heads: each``)."""
    import hashlib

    from mergesmith.architecture import HEAD_PREFIXES, is_head

    body = [(name, list(shape)) for name, shape in named_shapes.items() if not is_head(name, HEAD_PREFIXES)]
    text = json.dumps(sorted(body))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_writable(directory: str | Path, overwrite: bool = False, inputs: tuple[str | Path, ...] = ()) -> None:
    """Refuse, before any work, an output that cannot or may not become a sidecar directory: a file, a path
    under a file or an unwritable directory, a directory that already holds a sidecar (unless
    ``overwrite``: hours of measuring are not replaced by accident), or one of the ``inputs``."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"cannot write statistics to {directory}: it exists and is not a directory")
    for given in inputs:
        if directory.resolve() == Path(given).absolute().resolve():
            raise OutputError(f"cannot write statistics to {directory}: it is an input ({given}); name another "
                              f"directory")
    ancestor = directory
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write statistics to {directory}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise OutputError(f"cannot write statistics to {directory}: {ancestor} is not writable")
    existing = sorted(_sidecar_files(directory)) if directory.is_dir() else []
    if existing and not overwrite:
        raise OutputError(f"{directory} already holds a sidecar ({existing[0]}); pass --overwrite to replace it "
                          f"(only its statistics files are replaced), or name another directory")


def save_stats(directory: str | Path, tensors: dict[str, torch.Tensor], counts: dict[str, int], *,
               model: str, fisher_variant: str | None = None, transposed: list[str] | None = None,
               fingerprints: dict[str, str] | None = None, skipped: dict[str, dict] | None = None,
               examples: int = 0, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a sidecar; ``counts`` maps each tensor key to the number of examples (or rows) in its mean.
    ``skipped`` records the modules ``measure`` left out on purpose, {module: {"kinds": [key prefixes],
    "reason": "..."}} (``--exclude``, the factor budget), so that a merge can say why a statistic is absent.
    ``examples`` is how many examples the statistics were measured on (0: not recorded): it turns K-FAC's
    per-row factors into a per-example curvature (``mergesmith.damage``).

    One ``stats.safetensors`` when the tensors fit in ``max_shard_size`` bytes (5GB, 200MB, ...), else
    shards and an index. Everything is written to a temporary folder first (see ``_write_atomically``), so
    a failure leaves no partial sidecar. Returns the file a reader opens first: the single file or the index.
    """
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    missing = sorted(set(tensors) - set(counts))
    if missing:
        raise ValueError(f"no count for {missing[0]}")
    kinds = sorted({key.split("/", 1)[0] for key in tensors})
    metadata = {"format": FORMAT, "kinds": ",".join(kinds), "counts": json.dumps(counts), "model": model}
    if fisher_variant:
        metadata["fisher_variant"] = fisher_variant
    if examples:
        metadata["examples"] = str(int(examples))
    if transposed:  # modules whose weight is stored (in, out), GPT-2's Conv1D: a reader must know the layout
        metadata["transposed"] = json.dumps(sorted(transposed))
    if fingerprints:  # which weights were measured: a merge checks them against the checkpoint it reads
        metadata["fingerprints"] = json.dumps(fingerprints, sort_keys=True)
    if skipped:  # left out on purpose (--exclude, --max-factor-size): a merge falls back knowingly
        metadata["skipped"] = json.dumps({module: {"kinds": sorted(entry["kinds"]), "reason": entry["reason"]}
                                          for module, entry in skipped.items()}, sort_keys=True)
    prepared = {key: tensors[key].detach().to("cpu", torch.float32).contiguous() for key in sorted(tensors)}
    shards = shard_layout([OutputTensor(key, tuple(t.shape), torch.float32) for key, t in prepared.items()], limit)
    names = [FILENAME] if len(shards) == 1 else [SHARD.format(i + 1, len(shards)) for i in range(len(shards))]

    def write(folder: Path) -> None:
        for name, shard in zip(names, shards):
            save_file({t.name: prepared[t.name] for t in shard}, str(folder / name), metadata=metadata)
        if len(shards) > 1:
            index = {"metadata": {**metadata, "total_size": sum(t.nbytes for shard in shards for t in shard)},
                     "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
            (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    try:
        _write_atomically(directory, write)
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise OutputError(f"cannot write statistics to {directory}: {reason}") from None
    return directory / names[0] if len(shards) == 1 else directory / INDEX


def _sidecar_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()
            if p.name in (FILENAME, INDEX) or SHARD_PATTERN.fullmatch(p.name)}


def _write_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(folder)`` on a fresh temporary folder, then put what it wrote in place as ``directory``.

    A new ``directory`` is the temporary folder renamed, so it appears whole or not at all. An existing one
    (a sidecar may sit in the checkpoint's own directory, beside other files) receives the shards first and
    the file a reader opens first (the index, or the single file) last; then the files of the sidecar it
    replaces go. The temporary folder is removed whatever happens.
    """
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(20, "it exists and is not a directory")
    existing = directory.is_dir()
    # what a killed run left: .<name>.tmp-<pid> beside a new sidecar, .stats.tmp-<pid> inside an existing one
    clean_leftovers(directory / "stats" if existing else directory.absolute(), _say_removed)
    if existing:
        staging = directory / f".stats.tmp-{os.getpid()}"
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    mark_partial(staging)
    try:
        write(staging)
        if not existing:
            staging.rename(directory)
            (directory / PARTIAL).unlink()
            return
        written = {p.name for p in staging.iterdir()} - {PARTIAL}
        stale = _sidecar_files(directory) - written
        entry = INDEX if INDEX in written else FILENAME
        for name in sorted(written - {entry}) + [entry]:
            (staging / name).replace(directory / name)
        for name in stale:
            (directory / name).unlink(missing_ok=True)
    finally:
        remove_ours(staging)


def _say_removed(line: str) -> None:
    warnings.warn(MergeWarning(line), stacklevel=3)


def _entry_file(path: Path) -> Path:
    """The file to open first for a sidecar at ``path`` (a directory, a statistics file, or an index)."""
    if not path.is_dir():
        if not path.exists():
            raise StatisticsError(f"statistics not found at {path} (expected a directory holding {FILENAME} or "
                                  f"{INDEX})")
        return path
    single, index = path / FILENAME, path / INDEX
    if _lexists(single) and _lexists(index):
        raise StatisticsError(f"{path} holds both {FILENAME} and {INDEX}, two sidecars in one place; delete the "
                              f"stale one or measure again into an empty directory")
    entry = index if _lexists(index) else single
    if contained_file(path, entry.name, error=StatisticsError) is None:
        raise StatisticsError(f"statistics not found at {path} (expected {FILENAME} or {INDEX})")
    return entry


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


_RESTORE = "restore it from where the sidecar came from, or measure again"


class StatsReader:
    """Lazy reader of a sidecar: a directory, a ``stats.safetensors`` file, or a shard index.

    Only the single file or the index is read up front (metadata and which shard holds which key); a shard
    is opened on the first ``get`` of a key it holds, so reading one statistic of a large sidecar reads one
    shard's header and that tensor. Nothing is trusted: every file's safetensors header is checked whole
    before safetensors opens it (``mergesmith.io.checkpoint.safetensors_header``), an index may name only
    files in its own directory, and every problem is a one-line ``StatisticsError``.
    """

    def __init__(self, path: str | Path):
        self.path = _entry_file(Path(path))
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, SafetensorsHeader] = {}
        if self.path.name.endswith(".index.json"):
            metadata, self._weight_map = self._read_index()
        else:
            header = self._header(self.path.name)
            metadata = dict(header.metadata)
            self._weight_map = dict.fromkeys(header.tensors, self.path.name)
        self.metadata: dict[str, Any] = metadata
        self.counts, self.model, self.fisher_variant = _parse_metadata(metadata, self.path)
        uncounted = sorted(set(self._weight_map) - set(self.counts))
        if uncounted:
            raise StatisticsError(f"{self.path}: no count for {quote_name(uncounted[0])} in the metadata's counts; "
                                  f"the sidecar is damaged: measure again")
        self.files = [self.path.parent / name for name in dict.fromkeys(self._weight_map.values())]

    def _read_index(self) -> tuple[dict[str, Any], dict[str, str]]:
        index = read_json(self.path, error=StatisticsError, advice=_RESTORE, invalid="broken index JSON")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        metadata = index.get("metadata") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
            raise StatisticsError(f"{self.path}: not a statistics index (expected a JSON object with 'metadata' and "
                                  f"'weight_map'); {_RESTORE}")
        named_by: dict[str, str] = {}
        for key, file in weight_map.items():
            # plain names only: an index must not point outside its own directory
            if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                raise StatisticsError(f"{self.path}: weight_map gives {quote_name(key)} the file {file!r}, expected "
                                      f"a file name in the same directory; {_RESTORE}")
            named_by.setdefault(file, key)
        missing = [file for file, key in named_by.items()
                   if contained_file(self.path.parent, file, source=f"{self.path}: weight_map entry {quote_name(key)}",
                                     error=StatisticsError) is None]
        if missing:
            missing.sort()
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise StatisticsError(f"{self.path.parent / missing[0]}: shard named in {self.path.name} is missing"
                                  f"{more}; copy the whole sidecar directory, or measure again")
        return metadata, weight_map

    def _header(self, file: str) -> SafetensorsHeader:
        """A statistics file's checked header: safetensors (see ``safetensors_header``), float32 tensors."""
        header = self._headers.get(file)
        if header is None:
            path = self.path.parent / file
            header = safetensors_header(path, error=StatisticsError)
            for key, entry in header.tensors.items():
                if entry.dtype != torch.float32:
                    raise StatisticsError(f"{path}: statistic {quote_name(key)} is {entry.dtype}, but sidecars hold "
                                          f"float32; {_RESTORE}")
            self._headers[file] = header
        return header

    def _open(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is not None:
            return handle
        path = self.path.parent / file
        header = self._header(file)
        if path != self.path:  # a shard: of this sidecar, holding what the index says
            metadata = header.metadata
            if metadata.get("format") != FORMAT or metadata.get("model") != self.model:
                raise StatisticsError(f"{path}: not a shard of the sidecar {self.path} (format "
                                      f"{metadata.get('format')!r}, model {metadata.get('model')!r}, expected "
                                      f"{self.model!r}); copy the whole sidecar directory, or measure again")
            for key in header.tensors:
                if self._weight_map.get(key) != file:
                    raise StatisticsError(f"{path}: holds {quote_name(key)}, which {self.path.name} does not list "
                                          f"in this shard; the index and its shards do not match: {_RESTORE}")
            listed = next((key for key, f in self._weight_map.items() if f == file and key not in header.tensors),
                          None)
            if listed is not None:
                raise StatisticsError(f"{self.path}: lists {quote_name(listed)} in {file}, which does not hold it; "
                                      f"the index and its shards do not match: {_RESTORE}")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StatisticsError(f"{path}: not a readable statistics file ({reason}); {_RESTORE}") from None
        self._handles[file] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def get(self, key: str) -> torch.Tensor:
        file = self._file_of(key)
        handle = self._open(file)
        try:
            return handle.get_tensor(key)
        except SafetensorError as e:
            raise StatisticsError(f"{self.path.parent / file}: cannot read {quote_name(key)} ({e}); the sidecar is "
                                  f"damaged or inconsistent with {self.path.name}: measure again") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """A statistic's shape, from its shard's checked header (the tensor itself is not read)."""
        file = self._file_of(key)
        self._open(file)
        return self._header(file).tensors[key].shape

    def _file_of(self, key: str) -> str:
        file = self._weight_map.get(key)
        if file is None:
            raise StatisticsError(f"{self.path}: no statistic {quote_name(key)}{did_you_mean(key, self._weight_map)}")
        return file


def _json_metadata(metadata: dict[str, Any], name: str, path: Path, default: str, expected: type,
                   item: type) -> Any:
    """A metadata entry that holds JSON (a string), parsed and checked: a list or dict of ``item``."""
    text = metadata.get(name, default)
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        value = None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not isinstance(value, expected) or not all(isinstance(v, item) for v in items):
        kind = "object" if expected is dict else "array"
        raise StatisticsError(f"{path}: the metadata's {name!r} must be a JSON {kind} of {item.__name__}s as a "
                              f"string; the sidecar is damaged: measure again")
    return value


def _parse_metadata(metadata: dict[str, Any], path: Path) -> tuple[dict[str, int], str, str | None]:
    """(counts, model, fisher_variant) from a sidecar's metadata, or a one-line error saying what is wrong.
    The other entries a merge reads (``transposed``, ``fingerprints``) are checked too."""
    if metadata.get("format") != FORMAT:
        raise StatisticsError(f"{path}: not a mergesmith statistics sidecar (format "
                              f"{_short_repr(metadata.get('format'))}, expected {FORMAT!r})")
    try:
        counts = json.loads(metadata["counts"])
        model = metadata["model"]
    except (KeyError, TypeError, ValueError, RecursionError):
        raise StatisticsError(f"{path}: the metadata's 'counts' (a JSON object as a string) or 'model' is missing "
                              f"or unreadable; the sidecar is damaged: measure again") from None
    if not isinstance(counts, dict) or not isinstance(model, str):
        raise StatisticsError(f"{path}: the metadata's 'counts' must be a JSON object and 'model' a string")
    bad = next((key for key, n in counts.items() if type(n) is not int or n < 0), None)
    if bad is not None:
        raise StatisticsError(f"{path}: the metadata's count for {quote_name(bad)} is {_short_repr(counts[bad])}, "
                              f"not a number of examples; the sidecar is damaged: measure again")
    variant = metadata.get("fisher_variant")
    if variant is not None and not isinstance(variant, str):
        raise StatisticsError(f"{path}: the metadata's 'fisher_variant' must be a string")
    _json_metadata(metadata, "transposed", path, "[]", list, str)
    _json_metadata(metadata, "fingerprints", path, "{}", dict, str)
    return counts, model, variant


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def combine_stats(sources: list[str | Path], output: str | Path, *,
                  max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Combine sidecars of one model measured on disjoint data: each statistic becomes the count-weighted
    mean, exactly what measuring all the data at once gives. Inputs may be single files or sharded; the
    output is sharded when it exceeds ``max_shard_size`` (one source alone reshards a sidecar)."""
    if not sources:
        raise UsageError("nothing to combine: name at least one sidecar")
    limit = parse_size(max_shard_size)
    readers = [StatsReader(s) for s in sources]
    first = readers[0]
    for other in readers[1:]:
        if other.model != first.model:
            raise StatisticsError(f"{other.path} was measured on another model ({other.model}) than "
                                  f"{first.path} ({first.model}); statistics of different models do not combine")
        if other.metadata.get("fingerprints", "{}") != first.metadata.get("fingerprints", "{}"):
            raise StatisticsError(f"{other.path} and {first.path} were measured on different weights (their "
                                  f"fingerprints differ); statistics of different models do not combine")
        if other.fisher_variant != first.fisher_variant:
            raise StatisticsError(f"{other.path} holds the '{other.fisher_variant}' Fisher and {first.path} the "
                                  f"'{first.fisher_variant}' one; they do not combine")
        if set(other.keys()) != set(first.keys()):
            extra = sorted(set(other.keys()) ^ set(first.keys()))
            raise StatisticsError(f"{other.path} and {first.path} hold different statistics (e.g. '{extra[0]}')")
        if other.metadata.get("skipped", "{}") != first.metadata.get("skipped", "{}"):
            raise StatisticsError(f"{other.path} and {first.path} skipped different modules at measure time; "
                                  f"measure both with the same --exclude and --max-factor-size")
    tensors, counts = {}, {}
    for key in first.keys():
        total = sum(r.counts[key] for r in readers)
        mean = sum(r.get(key).double() * r.counts[key] for r in readers) / max(total, 1)
        tensors[key], counts[key] = mean.float(), total
    return save_stats(output, tensors, counts, model=first.model, fisher_variant=first.fisher_variant,
                      transposed=json.loads(first.metadata.get("transposed", "[]")),
                      fingerprints=json.loads(first.metadata.get("fingerprints", "{}")),
                      skipped=json.loads(first.metadata.get("skipped", "{}")), max_shard_size=limit,
                      examples=sum(recorded_examples(r.metadata) for r in readers))


def recorded_examples(metadata: dict[str, Any]) -> int:
    """The examples a sidecar's statistics were measured on, 0 when its metadata does not say (older sidecars)."""
    try:
        return max(int(metadata.get("examples", 0)), 0)
    except (TypeError, ValueError):
        return 0
