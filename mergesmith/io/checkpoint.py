"""Lazy, one-tensor-at-a-time reading of Hugging Face checkpoints and single safetensors files."""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from mergesmith.errors import MergeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


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


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets) and where its data starts."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ValueError("implausible header size")
            header = json.loads(f.read(size))
        file_size = path.stat().st_size
        header.pop("__metadata__", None)
        for key, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"tensor '{key}' has unsupported dtype {info['dtype']}")
            if 8 + size + info["data_offsets"][1] > file_size:
                raise ValueError(f"tensor '{key}' runs past the end of the file")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MergeError(f"{path}: not a readable safetensors file ({e}); is the download complete?") from None
    return header, 8 + size


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
            raise MergeError(f"unexpected end of file while reading a tensor at byte {offset + done}")
        done += got
    return buffer.view(dtype).reshape(shape)


class CheckpointReader:
    """Reads a Hugging Face model directory (``model.safetensors``, sharded safetensors with an index,
    or ``pytorch_model*.bin`` loaded with ``torch.load(weights_only=True, mmap=True)``) or a single
    ``.safetensors`` file. Tensors are read lazily from memory-mapped files, one at a time."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        if not self.path.exists():
            raise MergeError(f"model '{self.name}' not found at {self.path}: mergesmith reads local paths only "
                             f"and never downloads; pass a local directory or .safetensors file")
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._span: dict[str, tuple[int, int]] = {}  # safetensors: (absolute offset, byte count)
        self._fds: dict[Path, int] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        files = self._weight_files()
        for file in files:
            if file.suffix == ".safetensors":
                header, data_start = _safetensors_header(file)
                for key, info in header.items():
                    self._add(key, file, _DTYPES[info["dtype"]], tuple(info["shape"]))
                    begin, end = info["data_offsets"]
                    self._span[key] = (data_start + begin, end - begin)
            else:
                for key, tensor in self._load_bin(file).items():
                    self._add(key, file, tensor.dtype, tuple(tensor.shape))

    def _add(self, key: str, file: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if key in self._file_of:
            raise MergeError(f"{self.path}: tensor '{key}' appears in both {self._file_of[key].name} and {file.name}")
        self._file_of[key] = file
        self._meta[key] = (dtype, shape)

    def _weight_files(self) -> list[Path]:
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise MergeError(f"{self.path}: a single-file model must be a .safetensors file")
            return [self.path]
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.path / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise MergeError(f"{index}: unreadable index ({e}); it needs a 'weight_map'") from None
                files = sorted({self.path / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.exists()]
                if missing:
                    raise MergeError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).exists():
                return [self.path / single]
        loose = sorted(self.path.glob("*.safetensors"))
        if loose:
            return loose
        raise MergeError(f"{self.path}: no model weights found (expected model.safetensors, "
                         f"{SAFETENSORS_INDEX}, or pytorch_model.bin)")

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin:
            try:
                # weights_only: never unpickle code from a checkpoint; mmap keeps it lazy.
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad or unsafe pickle
                raise MergeError(f"{file}: cannot load safely with weights_only=True ({type(e).__name__}); "
                                 f"convert it to safetensors") from None
            if not isinstance(state, dict):
                raise MergeError(f"{file}: expected a state dict, found {type(state).__name__}")
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
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
        offset, nbytes = self._span[key]
        dtype, shape = self._meta[key]
        return _map_tensor(fd, offset, nbytes, dtype, shape)

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
        config = self.directory / "config.json"
        if not config.exists():
            return None
        try:
            return json.loads(config.read_text())
        except ValueError as e:
            raise MergeError(f"{config}: invalid JSON ({e})") from None
