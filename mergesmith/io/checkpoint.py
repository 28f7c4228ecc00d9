"""Lazy, one-tensor-at-a-time reading of Hugging Face checkpoints and single safetensors files.

Checkpoints come from strangers, so nothing in them is trusted: a safetensors header is checked whole
(``safetensors_header``) before any tensor is allocated or mapped, an index may name only files inside the
model's directory (``contained_file``), and ``.bin`` files load only with ``torch.load(weights_only=True)``.
Every problem is a one-line ``CheckpointError`` (``StatisticsError`` for a statistics sidecar, which reuses
these checks) naming the file and the tensor or entry.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol

import torch

from mergesmith.errors import CheckpointError, MergeError, StatisticsError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_INDEX_BYTES = 100_000_000  # an index of a 1T-parameter model is a few MB
_MAX_NUMEL = 2**63 - 1  # what torch can index
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HUB_REPO = re.compile(r"(models|datasets|spaces)--.+")


class TensorSource(Protocol):
    """Anything the engine can merge from: names, shapes, dtypes and one tensor at a time."""

    name: str

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> torch.Tensor: ...


class StateDictReader:
    """A TensorSource over an in-memory state dict (the research API)."""

    def __init__(self, name: str, state_dict: Mapping[str, torch.Tensor]):
        self.name = name
        self._tensors = dict(state_dict)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


# ---------------------------------------------------------------------------------------------------------
# The safetensors header, checked whole before anything else is read


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checked safetensors header."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: every tensor's entry, and the string metadata."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _wording(error: type[MergeError]) -> tuple[str, str]:
    """(what the file is not, what to do) for a broken model file or a broken statistics file."""
    if issubclass(error, StatisticsError):
        return "not a readable statistics file", "restore it from where the sidecar came from, or measure again"
    return "not a readable safetensors file", "re-download or re-convert it (is the download complete?)"


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: a JSON object that names a key twice is ambiguous (readers differ on which
    one wins), so it is refused."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, not float


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 60) -> str:
    """A JSON value for a one-line message: at most ``limit`` characters."""
    try:
        text = json.dumps(value)
    except ValueError:  # nested too deeply for json.dumps
        text = f"a deeply nested {_json_type(value)}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def quote_name(name: str, limit: int = 120) -> str:
    """A tensor or key name for a one-line message: quoted, control characters escaped, at most ``limit``."""
    if _CONTROL.search(name):
        name = name.encode("unicode_escape").decode("ascii")
    return f"'{name}'" if len(name) <= limit else f"'{name[:limit - 3]}...'"


def _numel(shape: list[int]) -> int | None:
    """prod(shape), or None when the tensor could not be indexed (the product of its non-zero sizes exceeds
    2⁶³ − 1: torch computes strides from them even for an empty tensor)."""
    numel, strides = 1, 1
    for size in shape:
        numel *= size
        strides *= max(size, 1)
        if strides > _MAX_NUMEL:
            return None
    return numel


def safetensors_header(path: str | Path, *, error: type[MergeError] = CheckpointError) -> SafetensorsHeader:
    """Read and check the header of a safetensors file, reading nothing but its first 8 bytes and the header.

    Before the header is read (or anything allocated for it): the path is a regular file, and its 8-byte
    header length is > 0, at most 100 MB (the safetensors library's limit) and within the file. Then: the
    header is UTF-8 JSON, an object naming no key twice; ``__metadata__``, if present, maps strings to
    strings; every other entry maps a tensor name (no control characters) to ``dtype`` (a known name),
    ``shape`` (non-negative integers) and ``data_offsets`` ([begin, end] integers, 0 <= begin <= end), with
    end − begin = prod(shape) × itemsize and end within the data that follows the header; and no two tensors'
    bytes overlap (checked on the spans sorted by begin: O(n log n) for n tensors). Gaps are allowed.

    Any problem is one ``error`` (CheckpointError for a model, StatisticsError for a sidecar) naming ``path``
    and the tensor. The checked entries hold absolute offsets, so a reader maps each tensor without
    re-reading the header.
    """
    path = Path(path)
    what, advice = _wording(error)

    def bad(detail: str) -> MergeError:
        return error(f"{path}: {what} ({detail}); {advice}")

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block open(), a device never ends
            raise bad("not a regular file")
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{file_size} bytes, shorter than the 8-byte header length: the file is empty or "
                          f"truncated")
            length = int.from_bytes(prefix, "little")
            if length == 0:
                raise bad("its header length is 0")
            if length > MAX_HEADER_BYTES:
                raise bad(f"its header length, {length} bytes, exceeds the safetensors limit of "
                          f"{MAX_HEADER_BYTES // 1_000_000} MB: the file is corrupt or not safetensors")
            if length > file_size - 8:
                raise bad(f"its header length, {length} bytes, exceeds the {file_size - 8} bytes that follow it: "
                          f"the file is truncated, or not safetensors")
            raw = f.read(length)
    except OSError as e:
        raise bad(f"cannot read it: {e.strerror or e}") from None
    if len(raw) < length:
        raise bad("the file ended inside its header (it shrank while being read)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise bad(f"its header is not UTF-8 text (byte {e.start + 8})") from None
    except json.JSONDecodeError as e:
        raise bad(f"its header is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except _DuplicateKey as e:
        raise bad(f"its header names {quote_name(e.key)} twice") from None
    except RecursionError:
        raise bad("its header JSON is nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise bad(f"its header is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {_json_type(header)}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"its __metadata__ must map strings to strings, found {_short(metadata)}")
    data_start, data_size = 8 + length, file_size - 8 - length
    tensors: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        label = quote_name(name)
        if not name or _CONTROL.search(name):
            raise bad(f"tensor name {label} is empty or holds control characters")
        if not isinstance(entry, dict):
            raise bad(f"tensor {label} is a JSON {_json_type(entry)}; expected an object with dtype, shape and "
                      f"data_offsets")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise bad(f"tensor {label} has dtype {_short(dtype_name)}, not one of {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(size) and size >= 0 for size in shape):
            raise bad(f"tensor {label} has shape {_short(shape)}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {label} has data_offsets {_short(offsets)}; expected [begin, end] with "
                      f"0 <= begin <= end")
        begin, end = offsets
        numel = _numel(shape)
        if numel is None:
            raise bad(f"tensor {label} has shape {_short(shape)}, too large to index")
        nbytes = numel * _DTYPES[dtype_name].itemsize
        if end - begin != nbytes:
            raise bad(f"tensor {label} of shape {_short(shape)} and dtype {dtype_name} holds {nbytes} bytes, but "
                      f"its data_offsets [{begin}, {end}] span {end - begin}")
        if end > data_size:
            raise bad(f"tensor {label} ends at byte {data_start + end}, past the end of the file "
                      f"({file_size} bytes): the file is incomplete")
        tensors[name] = TensorEntry(_DTYPES[dtype_name], tuple(shape), data_start + begin, nbytes)
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    # sorted by begin, two spans overlap only if some two neighbours do
    for (_, end, first), (begin, second_end, second) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"tensors {quote_name(first)} and {quote_name(second)} overlap (bytes {begin} to "
                      f"{min(end, second_end)} of the data)")
    return SafetensorsHeader(tensors, metadata)


# ---------------------------------------------------------------------------------------------------------
# Files named by an index or found in a directory: inside the directory, or refused


def _exists(path: Path) -> bool:
    """Whether anything (a broken symlink too) is at ``path``."""
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return False


def _in_hub_blobs(real: Path, home: Path) -> bool:
    """Whether ``real`` is a file in the ``blobs/`` of the Hugging Face hub cache repository whose snapshot
    holds ``home`` (``…/models--org--name/snapshots/<revision>/``, where every file is a symlink to
    ``../../blobs/<hash>``, made by the hub client)."""
    for ancestor in (home, *home.parents):
        snapshots = ancestor.parent
        if snapshots.name == "snapshots" and _HUB_REPO.fullmatch(snapshots.parent.name):
            try:
                return real.parent == (snapshots.parent / "blobs").resolve(strict=True)
            except (OSError, RuntimeError):
                return False
    return False


def contained_file(directory: Path, name: object, *, source: str | None = None,
                   error: type[MergeError] = CheckpointError) -> Path | None:
    """``directory / name`` when it is a regular file inside ``directory``; None when nothing is there (or a
    broken symlink); else an ``error`` naming ``source`` (who named the file: "<index>: entry 'x'").

    Untrusted names stay inside the model's directory: an absolute name, a '..' component, a backslash or a
    control character is refused without touching the file system, and the name is then resolved with its
    symlinks, which must not lead out of the directory. The one exception is the Hugging Face hub cache:
    in ``…/models--org--name/snapshots/<revision>/`` every file is a symlink to ``../../blobs/<hash>``, so a
    target in that same repository's ``blobs/`` folder is allowed.
    """
    who = f"{source} names" if source else f"{directory}: the entry"
    if not isinstance(name, str) or not name or _CONTROL.search(name):
        raise error(f"{who} {_short(name)}, which is not a file name; expected a file in {directory}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or PureWindowsPath(name).anchor or "\\" in name or ".." in pure.parts:
        raise error(f"{who} {quote_name(name)}, outside the model's directory {directory}; only files inside "
                    f"it are read (absolute paths and '..' are refused)")
    path = directory / name
    if not _exists(path):
        return None
    try:
        real = path.resolve(strict=True)
        home = directory.resolve(strict=True)
        mode = os.stat(real).st_mode
    except FileNotFoundError:  # a broken symlink: nothing to read
        return None
    except (OSError, RuntimeError) as e:  # a symlink loop, a permission error
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise error(f"{path}: cannot resolve it ({reason})") from None
    if not (real.is_relative_to(home) or _in_hub_blobs(real, home)):
        named = f" (named by {source})" if source else ""
        raise error(f"{path}{named} is a symlink to {real}, outside the model's directory {home}; mergesmith reads "
                    f"nothing outside it: copy the file into the directory instead of linking it")
    if not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file")
    return path


def read_json(path: Path, *, error: type[MergeError] = CheckpointError, advice: str,
              invalid: str = "invalid JSON", limit: int = MAX_INDEX_BYTES) -> object:
    """A JSON file (an index, a config) of at most ``limit`` bytes, or one ``error`` line ending in ``advice``."""
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise error(f"{path}: {size} bytes, more than such a file ever needs ({limit // 1_000_000} MB); "
                        f"{advice}")
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise error(f"{path}: {invalid} ({e.msg} at line {e.lineno} column {e.colno}); {advice}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: {invalid} (not UTF-8 text); {advice}") from None
    except _DuplicateKey as e:
        raise error(f"{path}: {invalid} (it names {quote_name(e.key)} twice); {advice}") from None
    except RecursionError:
        raise error(f"{path}: {invalid} (nested too deeply); {advice}") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise error(f"{path}: {invalid} ({str(e).splitlines()[0]}); {advice}") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e}); {advice}") from None


# ---------------------------------------------------------------------------------------------------------
# Reading tensors


def _map_tensor(fd: int, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over a private, copy-on-write mapping of its bytes: no copy and no fresh zeroed pages, just
    the page cache. The mapping lives exactly as long as the tensor, so resident memory stays bounded by
    the tensors in use, not by the model's size."""
    skip = offset % mmap.ALLOCATIONGRANULARITY
    if nbytes == 0 or skip % dtype.itemsize:  # empty, or misaligned for its dtype: copy instead
        return _read_tensor(fd, offset, nbytes, dtype, shape)
    mapping = mmap.mmap(fd, skip + nbytes, access=mmap.ACCESS_COPY, offset=offset - skip)
    return torch.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize, offset=skip).reshape(shape)


def _read_tensor(fd: int, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Read one tensor with pread straight into its own storage: one copy from the page cache, the GIL
    released during the read, and nothing mapped that would make resident memory grow with model size."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise EOFError(f"unexpected end of file at byte {offset + done}")
        done += got
    return buffer.view(dtype).reshape(shape)


_ADVICE = "re-download the model, or convert it again"


def _not_found(name: str, path: Path) -> str:
    where = f"{path.absolute()}" + ("" if path.is_absolute() else " (relative paths are taken from the current "
                                                                  "directory, as in mergekit)")
    # 'org/name' with nothing local by that name: most likely a hub id, which mergesmith never fetches
    looks_like_hub = not path.is_absolute() and not name.startswith((".", "~")) and name.count("/") == 1
    hint = ("; mergesmith reads local paths only and never downloads: download it first (huggingface-cli "
            "download) and give its directory") if looks_like_hub else ""
    return f"model '{name}' not found at {where}{hint}"


class CheckpointReader:
    """Reads a Hugging Face model directory (``model.safetensors``, sharded safetensors with an index,
    or ``pytorch_model*.bin`` loaded with ``torch.load(weights_only=True, mmap=True)``) or a single
    ``.safetensors`` file. Tensors are read lazily from memory-mapped files, one at a time.

    Everything about the files is checked when the reader is made, before any tensor is read: each
    safetensors header whole (``safetensors_header``), an index's names (inside the directory, see
    ``contained_file``), and that the index and its shards list the same tensors."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path).expanduser()
        self.name = name or str(path)
        if not _exists(self.path):
            raise CheckpointError(_not_found(self.name, self.path))
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._span: dict[str, tuple[int, int]] = {}  # safetensors: (absolute offset, byte count)
        self._fds: dict[Path, int] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        files, index = self._weight_files()
        for file in files:
            if file.suffix == ".safetensors":
                for key, entry in safetensors_header(file).tensors.items():
                    self._add(key, file, entry.dtype, entry.shape)
                    self._span[key] = (entry.offset, entry.nbytes)
            else:
                for key, tensor in self._load_bin(file).items():
                    self._add(key, file, tensor.dtype, tuple(tensor.shape))
        if index is not None:
            self._check_index(*index)

    def _add(self, key: str, file: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if key in self._file_of:
            raise CheckpointError(f"{self.path}: tensor {quote_name(key)} appears in both "
                                  f"{self._file_of[key].name} and {file.name}")
        self._file_of[key] = file
        self._meta[key] = (dtype, shape)

    def _weight_files(self) -> tuple[list[Path], tuple[Path, dict[str, Path]] | None]:
        """The files to read, and (index, {tensor: file}) when an index names them."""
        if self.path.is_file():  # named by the user: a symlink is theirs to make
            if self.path.suffix not in (".safetensors", ".bin"):
                raise CheckpointError(f"{self.path}: a single-file model must be a .safetensors (or weights-only "
                                      f".bin) file")
            return [self.path], None
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: neither a model directory nor a .safetensors file")
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if _exists(self.path / index_name):
                return self._read_index(self.path / index_name)
        for single in ("model.safetensors", "pytorch_model.bin"):
            file = contained_file(self.path, single)
            if file is not None:
                return [file], None
        try:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot list the directory ({e.strerror or e})") from None
        loose = []
        for name in names:
            file = contained_file(self.path, name)
            if file is None:
                raise CheckpointError(f"{self.path / name} is a broken symlink; {_ADVICE}")
            loose.append(file)
        if loose:
            return loose, None
        raise CheckpointError(f"{self.path}: no model weights found (expected model.safetensors, "
                              f"{SAFETENSORS_INDEX}, or pytorch_model.bin)")

    def _read_index(self, index: Path) -> tuple[list[Path], tuple[Path, dict[str, Path]]]:
        """Check an index whole before any shard is opened: JSON, a ``weight_map`` of tensor names to file
        names, every file inside the directory and present."""
        if contained_file(self.path, index.name) is None:
            raise CheckpointError(f"{index} is a broken symlink; {_ADVICE}")
        data = read_json(index, advice=_ADVICE)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            if not isinstance(data, dict) or "weight_map" not in data:
                found = "none"
            else:
                found = "an empty one" if weight_map == {} else f"a JSON {_json_type(weight_map)}"
            raise CheckpointError(f"{index}: expected a 'weight_map' object mapping tensor names to shard files, "
                                  f"found {found}; {_ADVICE}")
        named_by: dict[str, str] = {}  # each file name, with the first tensor that names it
        for key, file in weight_map.items():
            if not key or _CONTROL.search(key):
                raise CheckpointError(f"{index}: weight_map entry {quote_name(key)} is not a tensor name; {_ADVICE}")
            if not isinstance(file, str):
                raise CheckpointError(f"{index}: weight_map entry {quote_name(key)} names {_short(file)}, not a "
                                      f"file name; {_ADVICE}")
            named_by.setdefault(file, key)
        paths: dict[str, Path] = {}
        missing = []
        for file, key in named_by.items():
            found = contained_file(self.path, file, source=f"{index}: weight_map entry {quote_name(key)}")
            if found is None:
                missing.append(file)
            else:
                paths[file] = found
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{index}: lists shard {quote_name(missing[0])}, which is missing from "
                                  f"{self.path}{more}; download the whole model directory")
        shard_of = {key: paths[file] for key, file in weight_map.items()}
        return sorted(set(paths.values())), (index, shard_of)

    def _check_index(self, index: Path, shard_of: dict[str, Path]) -> None:
        """The index and the shards' own headers list the same tensors, each in the same file."""
        for key, file in shard_of.items():
            held = self._file_of.get(key)
            if held != file:
                where = f"it is in {held.name}" if held else f"{file.name} does not hold it"
                raise CheckpointError(f"{index}: lists tensor {quote_name(key)} in {file.name}, but {where}; the "
                                      f"index and its shards do not match: {_ADVICE}")
        for key, file in self._file_of.items():
            if key not in shard_of:
                raise CheckpointError(f"{file}: holds tensor {quote_name(key)}, which {index.name} does not list; "
                                      f"the index and its shards do not match: {_ADVICE}")

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin:
            try:
                # weights_only: never unpickle code from a checkpoint; mmap keeps it lazy.
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad or unsafe pickle
                raise CheckpointError(f"{file}: cannot load safely with weights_only=True ({type(e).__name__}); "
                                      f"convert it to safetensors") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: expected a state dict, found {type(state).__name__}")
            for key, value in state.items():
                if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{file}: expected a flat state dict of tensors, but entry "
                                          f"{quote_name(str(key))} is a {type(value).__name__}; convert it to "
                                          f"safetensors")
            self._bin[file] = state
        return self._bin[file]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][0]

    def get(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        if file.suffix != ".safetensors":
            return self._load_bin(file)[key]
        offset, nbytes = self._span[key]
        dtype, shape = self._meta[key]
        try:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
            if offset + nbytes > os.fstat(fd).st_size:  # checked when opened: the file changed since
                raise EOFError("the file is shorter than when it was opened")
            return _map_tensor(fd, offset, nbytes, dtype, shape)
        except (OSError, EOFError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOMEM:  # the machine's limit, not the file's fault
                raise MemoryError(f"no memory left to map tensor {quote_name(key)} of {file} "
                                  f"({nbytes / 1e6:.1f} MB)") from None
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CheckpointError(f"{file}: cannot read tensor {quote_name(key)} ({reason}); was the file changed "
                                  f"during the merge?") from None

    def close(self) -> None:
        if not hasattr(self, "_fds"):  # __init__ failed before opening anything
            return
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        self.close()

    @property
    def directory(self) -> Path:
        """Where config and tokenizer files live."""
        return self.path if self.path.is_dir() else self.path.parent

    def config(self) -> dict | None:
        """config.json, if there is one inside the model's directory (a symlink out of it is refused: its
        contents would be copied into the merged model)."""
        config = contained_file(self.directory, "config.json")
        if config is None:
            return None
        data = read_json(config, invalid="invalid JSON", advice="fix or re-download config.json")
        if not isinstance(data, dict):
            raise CheckpointError(f"{config}: expected a JSON object, found a JSON {_json_type(data)}")
        return data
