"""Sharded safetensors output written beside the target and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesmith.errors import OutputError, UsageError

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
        raise UsageError(f"cannot read size '{text}': write it like 5GB, 200MB or 1000000") from None
    if size <= 0:
        raise UsageError(f"size '{text}' must be positive")
    return size


MARKER = ".mergesmith"  # in every finished output: what wrote it and which files are its own (JSON)
PARTIAL = ".mergesmith-partial"  # in every unfinished one: who is writing it (JSON: host, pid, start time)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def check_output(target: Path, overwrite: bool, inputs: Collection[Path] = ()) -> None:
    """Refuse, before any work, an output that mergesmith may not write: one that exists (unless
    ``overwrite``, and then only a directory a previous mergesmith run wrote and nothing else has been put
    in since), the current directory or one above it, and any of the ``inputs`` or a directory above one."""
    target = Path(target)
    resolved = target.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputError(f"output {target} is the current directory or one above it; name a new directory")
    for given in inputs:
        path = Path(given).resolve()
        if resolved == path or resolved in path.parents:
            raise OutputError(f"output {target} would replace the input {given}; name a new directory")
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"output {target} exists and is not a directory; name a new directory")
    if not any(target.iterdir()):
        return  # an empty directory someone made for the output
    foreign = foreign_files(target)
    if foreign is None:
        raise OutputError(f"output {target} already exists and was not written by mergesmith (it has no {MARKER} "
                          f"marker); name a new directory (--overwrite replaces only mergesmith's own outputs)")
    if foreign:
        raise OutputError(f"output {target} holds {_listed(foreign)}, which is not part of the merge mergesmith "
                          f"wrote there, so it will not be replaced; move it away or name a new directory")
    if not overwrite:
        raise OutputError(f"output {target} already exists (an earlier merge); pass --overwrite to replace it")


def foreign_files(directory: Path) -> list[str] | None:
    """The files in ``directory`` that its mergesmith marker does not list (None: there is no marker)."""
    try:
        owned = set(json.loads((directory / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir()}
    return sorted(present - owned - {MARKER})


def _listed(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def remove_ours(folder: Path) -> None:
    """Delete a folder mergesmith wrote, its markers last: a run killed halfway through leaves a folder that
    still says whose it is, so the next run can finish the job (``shutil.rmtree`` goes in directory order)."""
    markers = [folder / MARKER, folder / PARTIAL]
    for child in folder.iterdir() if folder.is_dir() else []:
        if child in markers:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    for marker in markers:
        marker.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), to tell it from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _writer_alive(folder: Path) -> bool:
    """Whether the run that made an unfinished output is still running (on this host)."""
    try:
        owner = json.loads((folder / PARTIAL).read_text())
    except (OSError, ValueError):
        return False
    if owner.get("host") != socket.gethostname():
        return True  # a shared filesystem: another machine's run, which we cannot see; leave it alone
    return _process_start(int(owner.get("pid", -1))) == owner.get("start")


def clean_leftovers(target: Path, log: Callable[[str], None] | None = None) -> None:
    """Remove what killed runs left beside ``target``: unfinished outputs ``.<name>.tmp-<pid>`` (only those
    holding our PARTIAL marker, and whose run is gone) and, from a run killed between its two renames, the
    previous output ``.<name>.old-<pid>``, which is put back when ``target`` is missing."""
    parent = target.parent
    if not parent.is_dir():
        return
    for folder in sorted(parent.iterdir()):
        match = _LEFTOVER.match(folder.name)
        if match is None or match["name"] != target.name or not folder.is_dir() or folder.is_symlink():
            continue
        if not any(folder.iterdir()):  # emptied by a run killed just before its last rmdir: nothing to lose
            folder.rmdir()
            continue
        if match["kind"] == "tmp":
            partial = (folder / PARTIAL).exists()
            if not (partial or (folder / MARKER).exists()) or (partial and _writer_alive(folder)):
                continue  # not ours, or its run is still writing it
            remove_ours(folder)
            if log is not None:
                log(f"removed {folder}, the unfinished output of an interrupted run")
        elif (folder / MARKER).exists():
            if not target.exists():
                folder.rename(target)
                if log is not None:
                    log(f"restored {target} from {folder.name}, where an interrupted --overwrite had left it")
            elif foreign_files(folder) == []:
                remove_ours(folder)
                if log is not None:
                    log(f"removed {folder}, an output an interrupted --overwrite had replaced")


def mark_partial(folder: Path) -> None:
    """Say in ``folder`` that this process is writing it, so that a later run can tell our leftover from a
    live run's folder and from anything that is not ours (``clean_leftovers``)."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}
    (folder / PARTIAL).write_text(json.dumps(owner))


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False, *, inputs: Collection[Path] = (),
                      log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success, mark it as ours (MARKER, with the
    list of files in it) and rename it to ``target``; delete it on any failure or interrupt, so that
    ``target`` is never half-written. What killed runs left here before is cleaned up first."""
    target = Path(target).absolute()
    clean_leftovers(target, log)
    check_output(target, overwrite, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {target.parent}: {e.strerror}") from None
    if not os.access(target.parent, os.W_OK):
        raise OutputError(f"cannot write to {target.parent}: permission denied")
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:  # root passes os.access everywhere: a read-only filesystem shows itself only here
        temporary.mkdir()
        mark_partial(temporary)
    except OSError as e:
        remove_ours(temporary)
        raise OutputError(f"cannot write to {target.parent}: {e.strerror or e}") from None
    try:
        yield temporary
        files = sorted(str(p.relative_to(temporary)) for p in temporary.rglob("*")
                       if not p.is_dir() and p.name != PARTIAL)
        (temporary / MARKER).write_text(json.dumps({"written_by": "mergesmith", "files": files}, indent=1) + "\n")
        (temporary / PARTIAL).unlink()  # after the marker: a leftover always holds one of the two
        if target.exists():  # checked again: it may have changed while we merged
            check_output(target, overwrite, inputs)
            if any(target.iterdir()):
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                target.rename(old)
                temporary.rename(target)
                remove_ours(old)
                return
            target.rmdir()
        temporary.rename(target)
    except BaseException:
        remove_ours(temporary)
        raise


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
        try:
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
        except OSError as e:
            for fd in self._fds:
                os.close(fd)
            raise self._failure(e) from None
        self.bytes_written = 0
        self.write_seconds = 0.0  # the writer thread's busy time
        self._written: set[str] = set()
        self._queue: queue.Queue = queue.Queue(maxsize=pending)
        self._error: BaseException | None = None
        # started by the first add(), inside the caller's try that aborts it: a thread started here could
        # outlive an interrupt landing before that try, and abort the interpreter at exit
        self._thread: threading.Thread | None = None

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            name, tensor = item
            started = time.perf_counter()
            try:
                fd, offset = self._where[name]
                data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], offset + done)
            except BaseException as e:  # surfaced on the main thread by add() or close()
                self._error = e
            self.write_seconds += time.perf_counter() - started

    def _failure(self, error: BaseException) -> BaseException:
        """What the user is told: a full disk or a vanished directory is theirs to fix, anything else ours."""
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
            return OutputError(f"writing the merged model to {self.directory.parent} failed: {reason}; free some "
                               f"space or choose another output (nothing was left at the target)")
        return RuntimeError(f"the writer thread failed: {error!r}")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._failure(self._error)
        expected = self._expected[name]
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(f"'{name}' came out as {tuple(tensor.shape)} {tensor.dtype}, planned "
                               f"{expected.shape} {expected.dtype}")
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="mergesmith-writer", daemon=True)
            self._thread.start()
        self._queue.put((name, tensor.contiguous()))
        self._written.add(name)
        self.bytes_written += expected.nbytes

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> list[str]:
        """Wait for the last writes; returns the shard file names."""
        self._stop()
        if self._error is not None:
            raise self._failure(self._error)
        missing = set(self._expected) - self._written
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written")
        return self.files

    def abort(self) -> None:
        """Stop after a failure (the caller removes the temporary directory)."""
        self._error = self._error or RuntimeError("aborted")
        self._stop()
