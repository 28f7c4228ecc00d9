"""Sharded safetensors output written beside the target and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergesmith.errors import MergeError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' → 5·10⁹ bytes (decimal units as in Hugging Face; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    stripped = text.strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number):]
    try:
        size = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise MergeError(f"cannot read size '{text}': write it like 5GB, 200MB or 1000000") from None
    if size <= 0:
        raise MergeError(f"size '{text}' must be positive")
    return size


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; rename it to ``target`` on success and
    delete it on any failure, so that ``target`` is never half-written."""
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise MergeError(f"output {target} already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise MergeError(f"output {target} exists and is not a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergeError(f"cannot create {target.parent}: {e.strerror}") from None
    if not os.access(target.parent, os.W_OK):
        raise MergeError(f"cannot write to {target.parent}: permission denied")
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        temporary.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(target)


class ShardedWriter:
    """Collects tensors into shards of at most ``max_shard_size`` bytes and writes each full shard on a
    background thread, so computing the next tensors overlaps with writing. Holds at most one shard
    being filled and one being written."""

    def __init__(self, directory: Path, max_shard_size: int, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.max_shard_size = max_shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.bytes_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="mergesmith-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, tensors = item
            if self._error is None:
                try:
                    save_file(tensors, str(path), metadata=self.metadata)
                    path.chmod(0o644)  # safetensors creates files private to the owner
                except BaseException as e:  # surfaced on the main thread by close()
                    self._error = e

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._shard[name] = tensor.contiguous()
        self._shard_bytes += nbytes
        self.bytes_written += nbytes

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self._files):05d}.safetensors.part"
        self._files.append((path.name, list(self._shard)))
        self._queue.put((path, self._shard))
        self._shard, self._shard_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names, write the index; returns file names."""
        if self._shard or not self._files:
            self._flush()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise MergeError(f"writing shards to {self.directory} failed: {self._error}")
        count = len(self._files)
        names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (part, keys), final in zip(self._files, names):
            (self.directory / part).rename(self.directory / final)
            weight_map.update(dict.fromkeys(keys, final))
        if count > 1:
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names

    def abort(self) -> None:
        """Stop the writer thread after a failure (the temporary directory is removed by the caller)."""
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
