"""Fuzzing the readers of untrusted files: whatever bytes a checkpoint, a statistics sidecar or their index
JSON holds, reading it (the header, every tensor, every statistic's value checks) either works or raises the
one typed error of its kind — ``CheckpointError`` for a model, ``StatisticsError`` for a sidecar. Anything
else (KeyError, TypeError, OverflowError, MemoryError, RuntimeError from torch, ...) fails the test.

Inputs: (a) random bytes, bare or behind a plausible header length; (b) structured mutations of a valid
file: random JSON values in each header field, random dtypes, shapes and offsets, extra tensors, random
metadata, a rewritten header length, truncations; (c) random index JSON (names that leave the directory,
wrong types). 4,800 inputs a run, within a few seconds per test: files are written into one
temporary directory per module (hypothesis runs many examples per test function) and overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergesmith.errors import CheckpointError, StatisticsError
from mergesmith.io.checkpoint import SAFETENSORS_INDEX, CheckpointReader
from mergesmith.io.sidecar import FORMAT, INDEX, StatsReader, save_stats
from mergesmith.statistics import Sidecar

# database=None: nothing written into the working tree; deadline=None: file I/O times vary on shared machines
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U64", "f32", ""]
KEYS = ["gram/a", "kfac_a/a", "fisher/b.weight", "kfac_g/c"]
COUNTS = {"gram/a": 4, "kfac_a/a": 4, "fisher/b.weight": 2, "kfac_g/c": 7}
METADATA = {"format": FORMAT, "kinds": "fisher,gram,kfac_a,kfac_g", "counts": json.dumps(COUNTS), "model": "abc123",
            "transposed": "[]", "fingerprints": "{}"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _valid_file(workdir: Path) -> bytes:
    path = workdir / "valid.safetensors"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=generator)
    save_file({"gram/a": x.T @ x / 8, "kfac_a/a": x.T @ x / 8 + torch.eye(3), "fisher/b.weight": torch.rand(5),
               "kfac_g/c": torch.eye(2) * 0.5}, str(path), metadata=METADATA)
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid(workdir) -> bytes:
    return _valid_file(workdir)


def split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def assemble(header: object, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload


# ---------------------------------------------------------------------------------------------------------
# What is fed in


json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
sizes = st.integers(min_value=-3, max_value=12) | st.sampled_from([0, 2**31, 2**32 + 1, 2**62, 2**63, 2**64 + 3])
offsets = st.integers(min_value=-8, max_value=200) | st.sampled_from([2**32, 2**63 - 1, 2**63, 2**64])
names = st.sampled_from(KEYS) | st.text(max_size=16)


@st.composite
def entries(draw) -> object:
    """A tensor entry: mostly well-formed, each field sometimes any JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    entry = {"dtype": draw(st.sampled_from(DTYPE_NAMES) | json_values if draw(st.booleans())
                           else st.sampled_from(DTYPE_NAMES)),
             "shape": draw(st.lists(sizes, max_size=4) | json_values if draw(st.integers(0, 4)) == 0
                           else st.lists(sizes, max_size=4)),
             "data_offsets": draw(st.lists(offsets, min_size=2, max_size=2) | json_values
                                  if draw(st.integers(0, 4)) == 0 else st.lists(offsets, min_size=2, max_size=2))}
    for field in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
        del entry[field]
    return entry


@st.composite
def consistent_entries(draw) -> dict:
    """A tensor entry whose byte count matches its shape and dtype, at a random place: reaching the later
    checks (past the end, overlap) and the tensor reads."""
    dtype = draw(st.sampled_from(DTYPE_NAMES[:10]))
    itemsize = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    begin = draw(st.integers(0, 160))
    numel = 1
    for size in shape:
        numel *= size
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + numel * itemsize]}


metadata_values = st.dictionaries(st.sampled_from(["format", "counts", "model", "transposed", "fingerprints",
                                                   "fisher_variant", "kinds"]) | st.text(max_size=6),
                                  st.text(max_size=12) | json_values.map(json.dumps) | json_values, max_size=5)


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """The valid file with a few random changes to its header, and perhaps its length or end."""
    header, payload = split(valid)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["field", "entry", "consistent", "add", "drop", "rename", "metadata",
                                       "metadata field", "whole"]))
        tensors = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
        if action == "whole" and draw(st.integers(0, 3)) == 0:
            header = draw(json_values)
        if not isinstance(header, dict):
            break
        if action == "field" and tensors and isinstance(header[tensors[0]], dict):
            name = draw(st.sampled_from(tensors))
            if isinstance(header[name], dict):
                field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
                header[name][field] = draw({"dtype": st.sampled_from(DTYPE_NAMES), "shape": st.lists(sizes, max_size=4),
                                            "data_offsets": st.lists(offsets, max_size=3)}[field] | json_values)
        elif action == "entry" and tensors:
            header[draw(st.sampled_from(tensors))] = draw(entries())
        elif action == "consistent" and tensors:
            header[draw(st.sampled_from(tensors))] = draw(consistent_entries())
        elif action == "add":
            header[draw(names)] = draw(entries() | consistent_entries())
        elif action == "drop" and tensors:
            del header[draw(st.sampled_from(tensors))]
        elif action == "rename" and tensors:
            header[draw(names)] = header.pop(draw(st.sampled_from(tensors)))
        elif action == "metadata":
            header["__metadata__"] = draw(metadata_values | json_values)
        elif action == "metadata field":
            metadata = header.get("__metadata__")
            if isinstance(metadata, dict):
                metadata[draw(st.sampled_from(sorted(METADATA)))] = draw(st.text(max_size=12)
                                                                        | json_values.map(json.dumps))
    data = assemble(header, payload)
    ending = draw(st.sampled_from(["keep", "keep", "truncate", "length", "append"]))
    if ending == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif ending == "length":
        length = draw(st.integers(0, len(data) + 16) | st.sampled_from([2**63, 2**64 - 1, 100_000_001]))
        data = length.to_bytes(8, "little") + data[8:]
    elif ending == "append":
        data += draw(st.binary(max_size=64))
    return data


random_files = st.binary(max_size=300) | st.builds(  # bare, or behind a header length near the truth
    lambda body, lie: max(len(body) + lie, 0).to_bytes(8, "little") + body,
    st.binary(max_size=300), st.integers(min_value=-8, max_value=8))
json_files = st.builds(lambda value, payload: assemble(value, payload), json_values, st.binary(max_size=64))


# ---------------------------------------------------------------------------------------------------------
# How it is read: everything a merge would touch


def read_model(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        reader = CheckpointReader(path)
    except CheckpointError:
        return
    try:
        for key in reader.keys():
            assert len(reader.shape(key)) >= 0 and reader.dtype(key) is not None
            tensor = reader.get(key)
            assert tuple(tensor.shape) == reader.shape(key) and tensor.dtype == reader.dtype(key)
            tensor.to(torch.float64).sum()  # touch every byte of the mapping
    except CheckpointError:
        pass
    finally:
        reader.close()


def read_stats(directory: Path, files: dict[str, bytes | str]) -> None:
    """Write ``files`` as the whole sidecar directory, then read every statistic as a merge would."""
    directory.mkdir(exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    for name, content in files.items():
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        reader = StatsReader(directory)
        sidecar = Sidecar("fuzzed", reader)
        for key in reader.keys():
            shape = reader.shape(key)
            tensor = reader.get(key)
            assert tuple(tensor.shape) == shape
            kind = key.split("/", 1)[0]
            if kind in ("fisher", "gram", "kfac_a", "kfac_g"):
                sidecar.value(kind, key)
    except StatisticsError:
        pass


# ---------------------------------------------------------------------------------------------------------
# The properties


@fuzz(800)
@given(data=random_files)
def test_random_bytes_as_a_checkpoint(workdir, data):
    read_model(workdir / "random.safetensors", data)


@fuzz(400)
@given(data=json_files)
def test_random_json_headers_as_a_checkpoint(workdir, data):
    read_model(workdir / "json.safetensors", data)


@fuzz(1200)
@given(st.data())
def test_mutated_headers_as_a_checkpoint(workdir, valid, data):
    read_model(workdir / "mutated.safetensors", data.draw(mutated(valid)))


@fuzz(600)
@given(data=random_files | json_files)
def test_random_bytes_as_a_sidecar(workdir, data):
    read_stats(workdir / "random-stats", {"stats.safetensors": data})


@fuzz(1000)
@given(st.data())
def test_mutated_headers_as_a_sidecar(workdir, valid, data):
    read_stats(workdir / "mutated-stats", {"stats.safetensors": data.draw(mutated(valid))})


shard_names = (st.sampled_from(["shard.safetensors", "missing.safetensors", "../shard.safetensors", "/etc/passwd",
                                "sub/../shard.safetensors", "..", ".", "", "shard.safetensors/", "a\x00b",
                                "..\\shard.safetensors", "C:\\x"])
               | st.text(max_size=10))


@st.composite
def indexes(draw) -> str:
    """An index JSON: random JSON, or a weight_map of random names to random (often hostile) file names."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=40) | json_values.map(json.dumps))
    weight_map = draw(st.dictionaries(names, shard_names | json_values, max_size=4))
    if draw(st.booleans()):
        weight_map.update({key: "shard.safetensors" for key in draw(st.lists(st.sampled_from(KEYS), max_size=4))})
    metadata = draw(st.just(METADATA) | metadata_values | json_values)
    return json.dumps({"metadata": metadata, "weight_map": weight_map})


@fuzz(400)
@given(index=indexes(), shard=st.sampled_from(["valid", "mutated"]), data=st.data())
def test_random_indexes_of_a_checkpoint(workdir, valid, index, shard, data):
    directory = workdir / "indexed-model"
    directory.mkdir(exist_ok=True)
    (directory / "shard.safetensors").write_bytes(valid if shard == "valid" else data.draw(mutated(valid)))
    (directory / SAFETENSORS_INDEX).write_text(index)
    try:
        reader = CheckpointReader(directory)
    except CheckpointError:
        return
    try:
        for key in reader.keys():
            reader.get(key).to(torch.float64).sum()
    except CheckpointError:
        pass
    finally:
        reader.close()


@fuzz(400)
@given(index=indexes(), shard=st.sampled_from(["valid", "mutated"]), data=st.data())
def test_random_indexes_of_a_sidecar(workdir, valid, index, shard, data):
    shard_bytes = valid if shard == "valid" else data.draw(mutated(valid))
    read_stats(workdir / "indexed-stats", {INDEX: index, "shard.safetensors": shard_bytes})


def test_the_valid_inputs_are_read_whole(workdir, valid):
    """The fuzzed inputs start from files that read cleanly, so the properties above reach the deep checks."""
    path = workdir / "valid-model.safetensors"
    path.write_bytes(valid)
    assert sorted(CheckpointReader(path).keys()) == sorted(KEYS)
    tensors = {key: CheckpointReader(path).get(key).clone() for key in KEYS}
    save_stats(workdir / "valid-sidecar", tensors, COUNTS, model="abc123")
    reader = StatsReader(workdir / "valid-sidecar")
    sidecar = Sidecar("valid", reader)
    for key in KEYS:
        assert torch.equal(sidecar.value(key.split("/")[0], key), tensors[key])
    directory = workdir / "valid-indexed"
    directory.mkdir()
    (directory / "shard.safetensors").write_bytes(valid)
    (directory / INDEX).write_text(json.dumps({"metadata": METADATA, "weight_map": dict.fromkeys(KEYS,
                                                                                               "shard.safetensors")}))
    assert sorted(StatsReader(directory).keys()) == sorted(KEYS)
