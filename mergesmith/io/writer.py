"""Sharded safetensors output written beside the target and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

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


def check_output(target: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite`` (checked before any work, and again at the start)."""
    if target.exists() and not overwrite:
        raise MergeError(f"output {target} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; rename it to ``target`` on success and
    delete it on any failure, so that ``target`` is never half-written."""
    target = Path(target).absolute()
    check_output(target, overwrite)
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


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_layout(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes (a larger tensor gets a
    shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header(shard: list[OutputTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header for ``shard`` and each tensor's byte offset in the file."""
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in shard:
        entries[tensor.name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned, as the safetensors writer does
    start = 8 + len(header)
    positions, offset = {}, start
    for tensor in shard:
        positions[tensor.name] = offset
        offset += tensor.nbytes
    return len(header).to_bytes(8, "little") + header, positions


class ShardedWriter:
    """Writes a known list of output tensors into safetensors shards as they are computed.

    The shard layout and headers are fixed up front (the plan knows every name, shape and dtype), so each
    tensor is written straight to its place in its file on a background thread: no shard is ever
    buffered in memory, and computing overlaps writing. At most ``pending`` tensors wait to be written.
    """

    def __init__(self, directory: Path, tensors: list[OutputTensor], max_shard_size: int,
                 metadata: dict[str, str] | None = None, pending: int = 2):
        self.directory = Path(directory)
        shards = shard_layout(tensors, max_shard_size)
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._expected = {t.name: t for t in tensors}
        self._where: dict[str, tuple[int, int]] = {}  # name -> (fd, offset)
        self._fds: list[int] = []
        weight_map = {}
        for file, shard in zip(self.files, shards):
            header, positions = _header(shard, {"format": "pt", **(metadata or {})})
            fd = os.open(self.directory / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(t.nbytes for t in shard))
            for tensor in shard:
                self._where[tensor.name] = (fd, positions[tensor.name])
                weight_map[tensor.name] = file
        if count > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        self.bytes_written = 0
        self._written: set[str] = set()
        self._queue: queue.Queue = queue.Queue(maxsize=pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="mergesmith-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            name, tensor = item
            try:
                fd, offset = self._where[name]
                data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], offset + done)
            except BaseException as e:  # surfaced on the main thread by add() or close()
                self._error = e

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise MergeError(f"writing to {self.directory} failed: {self._error}")
        expected = self._expected[name]
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise MergeError(f"internal: '{name}' came out as {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {expected.shape} {expected.dtype}")
        self._queue.put((name, tensor.contiguous()))
        self._written.add(name)
        self.bytes_written += expected.nbytes

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> list[str]:
        """Wait for the last writes; returns the shard file names."""
        self._stop()
        if self._error is not None:
            raise MergeError(f"writing to {self.directory} failed: {self._error}")
        missing = set(self._expected) - self._written
        if missing:
            raise MergeError(f"internal: {len(missing)} planned tensors were never written")
        return self.files

    def abort(self) -> None:
        """Stop after a failure (the caller removes the temporary directory)."""
        self._error = self._error or RuntimeError("aborted")
        self._stop()
