"""Untrusted checkpoints and statistics sidecars stay inert: every malformed file is one typed, one-line error
naming the file (and the tensor or entry), raised before any tensor is allocated; an index never makes the
reader open anything outside the model's directory (but the Hugging Face hub cache's symlinks into its
``blobs/`` are fine); broken statistics values are refused; a singular Gram sum warns, naming the tensor.

Bad files are built from a valid one (written by ``safetensors.torch.save_file``) by patching its header
bytes. The same table of lying headers runs through the checkpoint reader (``CheckpointError``) and the
sidecar reader (``StatisticsError``); a few representative cases run through the command line (exit 2, one
line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith import merge_state_dicts
from mergesmith.errors import CheckpointError, MergeError, MergeWarning, StatisticsError
from mergesmith.io import checkpoint
from mergesmith.io.checkpoint import SAFETENSORS_INDEX, CheckpointReader
from mergesmith.io.sidecar import FORMAT, INDEX, StatsReader, save_stats
from mergesmith.statistics import Sidecar

A, B = "gram/a", "gram/b"  # the valid file's two tensors: F32 [3, 3] at [0, 36], F32 [2, 2] at [36, 52]
COUNTS = {A: 4, B: 4}
METADATA = {"format": FORMAT, "kinds": "gram", "counts": json.dumps(COUNTS), "model": "abc123"}


def valid_bytes() -> bytes:
    """A small safetensors file that is both a valid model file and a valid statistics sidecar."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.safetensors"
        save_file({A: torch.eye(3) + 0.5, B: torch.eye(2) + 0.25}, str(path), metadata=METADATA)
        return path.read_bytes()


VALID = valid_bytes()


def split(data: bytes) -> tuple[bytes, bytes]:
    """(header text, tensor data) of a safetensors file."""
    length = int.from_bytes(data[:8], "little")
    return data[8:8 + length], data[8 + length:]


def assemble(header: bytes, payload: bytes, length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header + payload


def raw(change: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A mutation of the whole file's bytes."""
    return change


def text(change: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A mutation of the header's bytes (the length is rewritten to match)."""
    def mutate(data: bytes) -> bytes:
        header, payload = split(data)
        return assemble(change(header), payload)
    return mutate


def entries(change: Callable[[dict], object], *, replace: bool = False) -> Callable[[bytes], bytes]:
    """A mutation of the parsed header: a dict changed in place (or, with ``replace``, what ``change`` returns)."""
    def mutate(data: bytes) -> bytes:
        header, payload = split(data)
        parsed = json.loads(header)
        result = change(parsed)
        return assemble(json.dumps(result if replace else parsed).encode(), payload)
    return mutate


def set_field(name: str, field: str, value: object) -> Callable[[bytes], bytes]:
    return entries(lambda h: h[name].__setitem__(field, value))


# (id, mutation, what the message says): every one a lie a downloaded file could tell
HEADER_CASES = [
    ("empty file", raw(lambda d: b""), r"0 bytes, shorter than the 8-byte header length"),
    ("not safetensors", raw(lambda d: b"<html><body>404 Not Found</body></html>\n" * 3),
     r"header length, \d+ bytes, exceeds the safetensors limit of 100 MB: .*not safetensors"),
    ("truncated in the header", raw(lambda d: d[:40]), r"exceeds the 32 bytes that follow it: the file is truncated"),
    ("truncated in the data", raw(lambda d: d[:-4]),
     r"tensor 'gram/b' ends at byte \d+, past the end of the file \(\d+ bytes\): the file is incomplete"),
    ("absurd header size", raw(lambda d: (2**40).to_bytes(8, "little") + d[8:]), r"exceeds the safetensors limit"),
    ("header size past the end", raw(lambda d: (len(d)).to_bytes(8, "little") + d[8:]),
     r"exceeds the \d+ bytes that follow it"),
    ("header size 0", raw(lambda d: bytes(8) + d[8:]), r"its header length is 0"),
    ("invalid JSON", text(lambda h: h.replace(b'"dtype"', b"dtype", 1)), r"not valid JSON: .* line 1 column \d+"),
    ("not UTF-8", text(lambda h: h.replace(b"gram/a", b"gram/\xff", 1)), r"not UTF-8 text"),
    ("a JSON array", entries(lambda h: [h], replace=True), r"its header is a JSON array, not an object"),
    ("nested too deeply", text(lambda h: b"[" * 100_000 + b"]" * 100_000), r"nested too deeply"),
    ("a tensor named twice", text(lambda h: h.replace(b'"gram/b"', b'"gram/a"')), r"names 'gram/a' twice"),
    ("metadata not strings", entries(lambda h: h["__metadata__"].__setitem__("counts", COUNTS)),
     r"__metadata__ must map strings to strings"),
    ("metadata a list", entries(lambda h: h.__setitem__("__metadata__", ["format"])),
     r"__metadata__ must map strings to strings"),
    ("wrong dtype name", set_field(A, "dtype", "F33"), r"tensor 'gram/a' has dtype \"F33\", not one of F64, F32"),
    ("dtype not a string", set_field(A, "dtype", 32), r"tensor 'gram/a' has dtype 32"),
    ("dtype missing", entries(lambda h: h[A].pop("dtype")), r"tensor 'gram/a' has dtype null"),
    ("negative shape", set_field(A, "shape", [-3, 3]),
     r"tensor 'gram/a' has shape \[-3, 3\]; expected a list of non-negative integers"),
    ("float shape", set_field(A, "shape", [3.0, 3]), r"has shape \[3\.0, 3\]; expected"),
    ("boolean shape", set_field(A, "shape", [True, 9]), r"has shape \[true, 9\]; expected"),
    ("shape a string", set_field(A, "shape", "3x3"), r"has shape \"3x3\"; expected"),
    ("shape too large to index", entries(lambda h: h[A].update(shape=[0, 2**40, 2**40], data_offsets=[0, 0])),
     r"tensor 'gram/a' has shape \[0, 1099511627776, 1099511627776\], too large to index"),
    ("size and shape disagree", set_field(A, "shape", [3, 4]),
     r"tensor 'gram/a' of shape \[3, 4\] and dtype F32 holds 48 bytes, but its data_offsets \[0, 36\] span 36"),
    ("size and dtype disagree", set_field(A, "dtype", "F64"), r"dtype F64 holds 72 bytes, but .* span 36"),
    ("offsets past the end", set_field(B, "data_offsets", [1036, 1052]),
     r"tensor 'gram/b' ends at byte \d+, past the end of the file"),
    ("overlapping tensors", set_field(B, "data_offsets", [20, 36]),
     r"tensors 'gram/a' and 'gram/b' overlap \(bytes 20 to 36 of the data\)"),
    ("begin after end", set_field(A, "data_offsets", [36, 0]),
     r"data_offsets \[36, 0\]; expected \[begin, end\] with 0 <= begin <= end"),
    ("negative offset", set_field(A, "data_offsets", [-36, 0]), r"data_offsets \[-36, 0\]"),
    ("three offsets", set_field(A, "data_offsets", [0, 18, 36]), r"data_offsets \[0, 18, 36\]"),
    ("offsets missing", entries(lambda h: h[A].pop("data_offsets")), r"tensor 'gram/a' has data_offsets null"),
    ("entry not an object", entries(lambda h: h.__setitem__(A, 5)), r"tensor 'gram/a' is a JSON number"),
    ("control character in a name", entries(lambda h: h.__setitem__("gram/a\n", h.pop(A))),
     r"tensor name 'gram/a\\n' is empty or holds control characters"),
]
CASE_IDS = [case[0] for case in HEADER_CASES]


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("mutate,detail", [case[1:] for case in HEADER_CASES], ids=CASE_IDS)
def test_a_lying_model_header_is_a_checkpoint_error(tmp_path, mutate, detail):
    path = tmp_path / "model.safetensors"
    path.write_bytes(mutate(VALID))
    with pytest.raises(CheckpointError) as caught:
        CheckpointReader(tmp_path)
    message = one_line(caught.value)
    assert message.startswith(f"{path}: not a readable safetensors file ("), message
    assert re.search(detail, message), f"{detail!r} not in {message!r}"
    assert message.endswith("re-download or re-convert it (is the download complete?)")


@pytest.mark.parametrize("mutate,detail", [case[1:] for case in HEADER_CASES], ids=CASE_IDS)
def test_a_lying_sidecar_header_is_a_statistics_error(tmp_path, mutate, detail):
    path = tmp_path / "stats.safetensors"
    path.write_bytes(mutate(VALID))
    with pytest.raises(StatisticsError) as caught:
        StatsReader(tmp_path)
    message = one_line(caught.value)
    assert message.startswith(f"{path}: not a readable statistics file ("), message
    assert re.search(detail, message), f"{detail!r} not in {message!r}"
    assert message.endswith("measure again")


def test_the_valid_file_reads_as_a_model_and_as_a_sidecar(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(VALID)
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.keys()) == [A, B] and reader.shape(A) == (3, 3) and reader.dtype(B) == torch.float32
    assert torch.equal(reader.get(A), torch.eye(3) + 0.5)
    (tmp_path / "model.safetensors").rename(tmp_path / "stats.safetensors")
    stats = StatsReader(tmp_path)
    assert stats.counts == COUNTS and stats.shape(B) == (2, 2)
    assert torch.equal(stats.get(B), torch.eye(2) + 0.25)


def test_gaps_between_tensors_and_empty_tensors_are_allowed(tmp_path):
    header, payload = split(VALID)
    parsed = json.loads(header)
    parsed[B]["data_offsets"] = [40, 56]  # 4 unused bytes after 'gram/a'
    parsed["empty"] = {"dtype": "F32", "shape": [0, 5], "data_offsets": [10, 10]}  # inside 'gram/a': no bytes
    path = tmp_path / "model.safetensors"
    path.write_bytes(assemble(json.dumps(parsed).encode(), payload[:36] + bytes(4) + payload[36:]))
    reader = CheckpointReader(path)
    assert torch.equal(reader.get(B), torch.eye(2) + 0.25)
    assert reader.get("empty").shape == (0, 5)


def test_a_huge_header_length_is_refused_before_anything_is_allocated(tmp_path):
    """A header length just under the 100 MB limit, on a 200-byte file: refused from the file's size, without
    reading (a read of n bytes allocates n bytes first)."""
    path = tmp_path / "model.safetensors"
    path.write_bytes((99_999_999).to_bytes(8, "little") + VALID[8:])
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"exceeds the \d+ bytes that follow it"):
            CheckpointReader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak} bytes allocated to refuse a lying header length"


def test_a_file_changed_after_opening_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(VALID)
    reader = CheckpointReader(path)
    path.write_bytes(VALID[:-20])  # truncated under the reader's feet
    with pytest.raises(CheckpointError, match=r"cannot read tensor 'gram/b' \(the file is shorter than when"):
        reader.get(B)


# ---------------------------------------------------------------------------------------------------------
# Index files: every name inside the model's directory, checked before any shard is opened

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A model in two shards with an index, and a valid safetensors file outside it, at ../outside/x.safetensors."""
    directory = tmp_path / "model"
    directory.mkdir()
    save_file({"x.weight": torch.ones(2, 2)}, str(directory / SHARD1))
    save_file({"y.weight": torch.arange(3.0)}, str(directory / SHARD2))
    write_index(directory, {"x.weight": SHARD1, "y.weight": SHARD2})
    (tmp_path / "outside").mkdir()
    save_file({"x.weight": torch.zeros(2, 2)}, str(tmp_path / "outside" / "x.safetensors"))
    return directory


def write_index(directory: Path, weight_map: object, name: str = SAFETENSORS_INDEX) -> None:
    (directory / name).write_text(json.dumps({"metadata": {"total_size": 28}, "weight_map": weight_map}))


def index_says(**weight_map: object) -> Callable[[Path], None]:
    return lambda d: write_index(d, {"x.weight": SHARD1, "y.weight": SHARD2} | weight_map)


def outside(directory: Path) -> Path:
    return directory.parent / "outside" / "x.safetensors"


def symlink(link: Path, target: Path | str) -> None:
    link.unlink(missing_ok=True)
    os.symlink(target, link)


def extra_tensor_in_shard1(d: Path) -> None:
    save_file({"x.weight": torch.ones(2, 2), "w.weight": torch.ones(1)}, str(d / SHARD1))


def shard_is_a_directory(d: Path) -> None:
    (d / SHARD1).unlink()
    (d / SHARD1).mkdir()


INDEX_PATTERN = re.escape(SAFETENSORS_INDEX)
# (id, how to break the model, the message, whether it must fail before any shard's header is read)
INDEX_CASES = [
    ("invalid JSON", lambda d: (d / SAFETENSORS_INDEX).write_text('{"weight_map": {"x.weight": '),
     rf"{INDEX_PATTERN}: invalid JSON \(.* at line 1 column \d+\); re-download", True),
    ("no weight_map", lambda d: (d / SAFETENSORS_INDEX).write_text('{"metadata": {}}'),
     r"expected a 'weight_map' object mapping tensor names to shard files, found none", True),
    ("index not an object", lambda d: (d / SAFETENSORS_INDEX).write_text("[1, 2]"), r"found none", True),
    ("weight_map a list", lambda d: write_index(d, [SHARD1]), r"found a JSON array", True),
    ("weight_map empty", lambda d: write_index(d, {}), r"found an empty one", True),
    ("shard name not a string", index_says(**{"y.weight": 5}),
     r"weight_map entry 'y\.weight' names 5, not a file name", True),
    ("missing shard", index_says(**{"y.weight": "model-00003-of-00003.safetensors"}),
     r"lists shard 'model-00003-of-00003\.safetensors', which is missing from .*download the whole model", True),
    ("../ path", index_says(**{"x.weight": "../outside/x.safetensors"}),
     r"weight_map entry 'x\.weight' names '\.\./outside/x\.safetensors', outside the model's directory", True),
    ("absolute path", lambda d: write_index(d, {"x.weight": str(outside(d)), "y.weight": SHARD2}),
     r"weight_map entry 'x\.weight' names '/.*/outside/x\.safetensors', outside the model's directory", True),
    ("hidden ..", index_says(**{"x.weight": "sub/../../outside/x.safetensors"}), r"outside the model's directory",
     True),
    ("backslash path", index_says(**{"x.weight": "..\\outside\\x.safetensors"}), r"outside the model's directory",
     True),
    ("symlink leaving the directory", lambda d: symlink(d / SHARD1, outside(d)),
     rf"{re.escape(SHARD1)} \(named by .*{INDEX_PATTERN}: weight_map entry 'x\.weight'\) is a symlink to "
     rf".*outside/x\.safetensors, outside the model's directory", True),
    ("relative symlink leaving the directory", lambda d: symlink(d / SHARD1, "../outside/x.safetensors"),
     r"is a symlink to .*outside/x\.safetensors, outside the model's directory", True),
    ("index a symlink leaving the directory",
     lambda d: ((d.parent / "outside" / "index.json").write_text((d / SAFETENSORS_INDEX).read_text()),
                symlink(d / SAFETENSORS_INDEX, d.parent / "outside" / "index.json")),
     rf"{INDEX_PATTERN} is a symlink to .*outside/index\.json, outside the model's directory", True),
    ("broken symlink shard", lambda d: symlink(d / SHARD1, d / "gone.safetensors"),
     rf"lists shard '{re.escape(SHARD1)}', which is missing", True),
    ("shard a directory", shard_is_a_directory, rf"{re.escape(SHARD1)} is not a regular file", True),
    ("index lists a tensor no shard holds", index_says(**{"z.weight": SHARD1}),
     rf"lists tensor 'z\.weight' in {re.escape(SHARD1)}, but {re.escape(SHARD1)} does not hold it; the index and "
     rf"its shards do not match", False),
    ("index puts tensors in the wrong shards", index_says(**{"x.weight": SHARD2, "y.weight": SHARD1}),
     rf"lists tensor 'x\.weight' in {re.escape(SHARD2)}, but it is in {re.escape(SHARD1)}", False),
    ("shard holds a tensor the index does not list", extra_tensor_in_shard1,
     rf"{re.escape(SHARD1)}: holds tensor 'w\.weight', which {INDEX_PATTERN} does not list", False),
]


@pytest.mark.parametrize("damage,pattern,before_any_shard", [case[1:] for case in INDEX_CASES],
                         ids=[case[0] for case in INDEX_CASES])
def test_a_bad_index_is_a_checkpoint_error(sharded, monkeypatch, damage, pattern, before_any_shard):
    damage(sharded)
    opened: list[Path] = []
    real_header = checkpoint.safetensors_header

    def recording(path, **kwargs):
        opened.append(Path(path))
        return real_header(path, **kwargs)

    monkeypatch.setattr(checkpoint, "safetensors_header", recording)
    with pytest.raises(CheckpointError) as caught:
        CheckpointReader(sharded)
    message = one_line(caught.value)
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert all(p.parent == sharded and not p.is_symlink() for p in opened), opened  # nothing outside was read
    if before_any_shard:
        assert opened == []


def test_a_symlink_inside_the_directory_is_fine(sharded):
    (sharded / "real").mkdir()
    (sharded / SHARD1).rename(sharded / "real" / SHARD1)
    symlink(sharded / SHARD1, Path("real") / SHARD1)
    reader = CheckpointReader(sharded)
    assert torch.equal(reader.get("x.weight"), torch.ones(2, 2))


def test_a_bin_index_is_held_to_the_same_rules(sharded):
    (sharded / SAFETENSORS_INDEX).unlink()
    write_index(sharded, {"x.weight": "../outside/x.bin"}, name=checkpoint.BIN_INDEX)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: weight_map entry 'x\.weight' names "
                                              r"'\.\./outside/x\.bin', outside the model's directory"):
        CheckpointReader(sharded)


# ---------------------------------------------------------------------------------------------------------
# Files found in the directory


@pytest.fixture
def loose(tmp_path) -> Path:
    """An empty model directory beside ../outside/x.safetensors and ../outside/config.json."""
    (tmp_path / "outside").mkdir()
    save_file({"x.weight": torch.zeros(2, 2)}, str(tmp_path / "outside" / "x.safetensors"))
    (tmp_path / "outside" / "config.json").write_text('{"auths": {"registry": "secret"}}')
    (tmp_path / "model").mkdir()
    return tmp_path / "model"


def write_valid(d: Path) -> None:
    (d / "model.safetensors").write_bytes(VALID)


LOOSE_CASES = [
    ("model.safetensors a symlink leaving the directory", lambda d: symlink(d / "model.safetensors", outside(d)),
     r"model/model\.safetensors is a symlink to .*outside/x\.safetensors, outside the model's directory .*copy the "
     r"file into the directory"),
    ("a loose shard a symlink leaving the directory", lambda d: symlink(d / "other.safetensors", outside(d)),
     r"model/other\.safetensors is a symlink to .*, outside the model's directory"),
    ("a broken symlink", lambda d: symlink(d / "model.safetensors", d / "nothing"),
     r"model/model\.safetensors is a broken symlink"),
    ("model.safetensors a directory", lambda d: (d / "model.safetensors").mkdir(),
     r"model/model\.safetensors is not a regular file"),
    ("model.safetensors a FIFO", lambda d: os.mkfifo(d / "model.safetensors"),  # open() would block forever
     r"model/model\.safetensors is not a regular file"),
    ("a symlink loop", lambda d: symlink(d / "model.safetensors", "model.safetensors"),
     r"model/model\.safetensors: cannot resolve it"),
    ("no weights", lambda d: (d / "config.json").write_text("{}"),
     r"model: no model weights found \(expected model\.safetensors"),
    ("a .bin of more than tensors",
     lambda d: torch.save({"x.weight": torch.zeros(2), "step": 3}, d / "pytorch_model.bin"),
     r"pytorch_model\.bin: expected a flat state dict of tensors, but entry 'step' is a int"),
    ("a .bin that is not a pickle", lambda d: (d / "pytorch_model.bin").write_bytes(b"garbage" * 10),
     r"pytorch_model\.bin: cannot load safely with weights_only=True"),
]


@pytest.mark.parametrize("damage,pattern", [case[1:] for case in LOOSE_CASES], ids=[case[0] for case in LOOSE_CASES])
def test_bad_files_in_the_directory_are_checkpoint_errors(loose, damage, pattern):
    damage(loose)
    with pytest.raises(CheckpointError) as caught:
        CheckpointReader(loose)
    message = one_line(caught.value)
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_a_config_symlink_leaving_the_directory_is_refused(loose):
    """Its contents would be copied into the merged model, and perhaps uploaded."""
    write_valid(loose)
    symlink(loose / "config.json", loose.parent / "outside" / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json is a symlink to .*outside/config\.json, outside"):
        CheckpointReader(loose).config()


def test_missing_paths_and_wrong_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found at .*nowhere$"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError,
                       match=r"weights\.pt: a single-file model must be a \.safetensors \(or weights-only \.bin\)"):
        CheckpointReader(tmp_path / "weights.pt")


def test_a_single_file_named_by_the_user_may_be_a_symlink(loose):
    """The user named it: the containment rule is for names that come from the files themselves."""
    symlink(loose / "mine.safetensors", outside(loose))
    assert CheckpointReader(loose / "mine.safetensors").keys() == ["x.weight"]


# ---------------------------------------------------------------------------------------------------------
# The Hugging Face hub cache: snapshots are symlinks into the repository's blobs/


def hub_snapshot(root: Path, files: dict[str, bytes], repo: str = "models--org--tiny") -> Path:
    """A hub cache repository as huggingface_hub lays it out: blobs/<hash>, refs/main, and
    snapshots/<revision>/<file> → ../../blobs/<hash>."""
    import hashlib

    repo_dir = root / repo
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        os.symlink(Path("../..") / "blobs" / blob, snapshot / name)
    return snapshot


def test_a_hub_cache_snapshot_is_read(tmp_path):
    snapshot = hub_snapshot(tmp_path / "hub", {"model.safetensors": VALID, "config.json": b'{"model_type": "x"}'})
    reader = CheckpointReader(snapshot)
    assert torch.equal(reader.get(A), torch.eye(3) + 0.5)
    assert reader.config() == {"model_type": "x"}


def test_a_sharded_hub_cache_snapshot_is_read(tmp_path, sharded):
    files = {name: (sharded / name).read_bytes() for name in (SHARD1, SHARD2, SAFETENSORS_INDEX)}
    snapshot = hub_snapshot(tmp_path / "hub", files)
    reader = CheckpointReader(snapshot)
    assert sorted(reader.keys()) == ["x.weight", "y.weight"]
    assert torch.equal(reader.get("y.weight"), torch.arange(3.0))


def test_a_hub_snapshot_linking_into_another_repository_is_refused(tmp_path):
    hub = tmp_path / "hub"
    other = hub_snapshot(hub, {"model.safetensors": VALID}, repo="models--someone--else")
    snapshot = hub_snapshot(hub, {"config.json": b"{}"})
    target = (other / "model.safetensors").resolve()
    os.symlink(Path("../../../models--someone--else/blobs") / target.name, snapshot / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a symlink to .*models--someone--else/blobs/"):
        CheckpointReader(snapshot)


def test_a_snapshots_layout_outside_a_hub_repository_gets_no_exception(tmp_path):
    snapshot = hub_snapshot(tmp_path, {"model.safetensors": VALID}, repo="not-a-hub-repo")
    with pytest.raises(CheckpointError, match=r"is a symlink to .*not-a-hub-repo/blobs/.*outside the model's"):
        CheckpointReader(snapshot)


# ---------------------------------------------------------------------------------------------------------
# Sidecars: the same rules for their files, and values a measurement cannot produce


@pytest.fixture
def sidecar(tmp_path) -> Path:
    """A sidecar of three shards, and a copy of its first shard outside it."""
    tensors = {f"gram/layer{i}": torch.eye(32) * (i + 1) for i in range(3)}
    save_stats(tmp_path / "s", tensors, dict.fromkeys(tensors, 8), model="abc123", max_shard_size="5KB")
    (tmp_path / "outside").mkdir()
    shutil.copy(tmp_path / "s" / "stats-00001-of-00003.safetensors", tmp_path / "outside" / "shard.safetensors")
    return tmp_path / "s"


def shard_of(directory: Path, key: str) -> str:
    return json.loads((directory / INDEX).read_text())["weight_map"][key]


def edit_index(directory: Path, change: Callable[[dict], None]) -> None:
    index = json.loads((directory / INDEX).read_text())
    change(index)
    (directory / INDEX).write_text(json.dumps(index))


def test_a_sidecar_shard_symlink_leaving_the_directory_is_refused(sidecar):
    symlink(sidecar / "stats-00001-of-00003.safetensors", sidecar.parent / "outside" / "shard.safetensors")
    with pytest.raises(StatisticsError, match=r"stats-00001-of-00003\.safetensors \(named by .*weight_map entry "
                                              r"'gram/layer0'\) is a symlink to .*outside/shard\.safetensors"):
        StatsReader(sidecar)


def test_a_sidecar_entry_file_symlink_leaving_the_directory_is_refused(sidecar):
    (sidecar.parent / "outside" / "index.json").write_text((sidecar / INDEX).read_text())
    symlink(sidecar / INDEX, sidecar.parent / "outside" / "index.json")
    with pytest.raises(StatisticsError, match=r"stats\.safetensors\.index\.json is a symlink to .*outside"):
        StatsReader(sidecar)


def test_a_sidecar_in_the_hub_cache_is_read(tmp_path, sidecar):
    files = {p.name: p.read_bytes() for p in sidecar.iterdir()}
    snapshot = hub_snapshot(tmp_path / "hub", files)
    assert torch.equal(StatsReader(snapshot).get("gram/layer2"), torch.eye(32) * 3)


def test_a_lying_sidecar_shard_header_is_refused_when_read(sidecar):
    shard = shard_of(sidecar, "gram/layer1")
    (sidecar / shard).write_bytes(set_field("gram/layer1", "data_offsets", [8, 4104])((sidecar / shard).read_bytes()))
    reader = StatsReader(sidecar)  # lazy: the index is fine
    with pytest.raises(StatisticsError, match=rf"{re.escape(shard)}: not a readable statistics file \(tensor "
                                              r"'gram/layer1' ends at byte \d+, past the end of the file"):
        reader.get("gram/layer1")


def test_a_sidecar_index_and_shards_that_disagree_are_refused(sidecar):
    first, second = shard_of(sidecar, "gram/layer0"), shard_of(sidecar, "gram/layer1")

    def swap(index: dict) -> None:
        index["weight_map"].update({"gram/layer0": second, "gram/layer1": first})

    edit_index(sidecar, swap)
    with pytest.raises(StatisticsError, match=rf"{re.escape(first)}: holds 'gram/layer0', which "
                                              rf"stats\.safetensors\.index\.json does not list in this shard"):
        StatsReader(sidecar).get("gram/layer1")

    def extra(index: dict) -> None:
        index["weight_map"].update({"gram/layer0": first, "gram/layer1": second})  # back as it was
        index["weight_map"]["gram/layer9"] = first
        counts = json.loads(index["metadata"]["counts"])
        index["metadata"]["counts"] = json.dumps({**counts, "gram/layer9": 8})

    edit_index(sidecar, extra)
    reader = StatsReader(sidecar)
    assert "gram/layer9" in reader.keys()
    with pytest.raises(StatisticsError, match=rf"lists 'gram/layer9' in {re.escape(first)}, which does not hold "
                                              rf"it; the index and its shards do not match"):
        reader.get("gram/layer0")


def save_with_metadata(directory: Path, **changes: str | None) -> Path:
    metadata = {**METADATA, **changes}
    directory.mkdir(exist_ok=True)
    save_file({A: torch.eye(3), B: torch.eye(2)}, str(directory / "stats.safetensors"),
              metadata={k: v for k, v in metadata.items() if v is not None})
    return directory


@pytest.mark.parametrize("changes,pattern", [
    ({"format": None}, r"not a mergesmith statistics sidecar \(format None"),
    ({"counts": "[1, 2]"}, r"'counts' must be a JSON object"),
    ({"counts": "{not json"}, r"'counts' \(a JSON object as a string\) or 'model' is missing or unreadable"),
    ({"counts": json.dumps({A: "many", B: 4})}, r"count for 'gram/a' is 'many', not a number of examples"),
    ({"counts": json.dumps({A: -1, B: 4})}, r"count for 'gram/a' is -1"),
    ({"counts": json.dumps({A: 4})}, r"no count for 'gram/b'"),
    ({"model": None}, r"'model' is missing"),
    ({"transposed": "not json"}, r"'transposed' must be a JSON array of strs"),
    ({"transposed": "[1]"}, r"'transposed' must be a JSON array of strs"),
    ({"fingerprints": "[]"}, r"'fingerprints' must be a JSON object of strs"),
], ids=["no format", "counts a list", "counts not JSON", "a count not a number", "a negative count",
        "a count missing", "no model", "transposed not JSON", "transposed not names", "fingerprints a list"])
def test_bad_sidecar_metadata_is_a_statistics_error(tmp_path, changes, pattern):
    directory = save_with_metadata(tmp_path / "s", **changes)
    with pytest.raises(StatisticsError, match=rf"{re.escape(str(directory / 'stats.safetensors'))}: .*{pattern}"):
        StatsReader(directory)


def test_a_sidecar_of_float64_statistics_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    save_file({A: torch.eye(3, dtype=torch.float64)}, str(tmp_path / "s" / "stats.safetensors"),
              metadata={**METADATA, "counts": json.dumps({A: 1})})
    with pytest.raises(StatisticsError, match=r"statistic 'gram/a' is torch\.float64, but sidecars hold float32"):
        StatsReader(tmp_path / "s")


def broken(kind: str, problem: str, n: int = 4) -> torch.Tensor:
    value = torch.eye(n) + 0.1
    if problem == "NaN":
        value[1, 2] = float("nan")
    elif problem == "Inf":
        value[0, 0] = float("inf")
    elif problem == "-Inf":
        value[3, 1] = float("-inf")
    elif problem == "all zero":
        value = torch.zeros(n, n)
    elif problem == "negative diagonal":
        value[2, 2] = -0.5
    return value


VALUE_PROBLEMS = {"NaN": r"has NaN or infinite entries", "Inf": r"has NaN or infinite entries",
                  "-Inf": r"has NaN or infinite entries", "all zero": r"is all zeros, a sign of a broken measurement",
                  "negative diagonal": r"has a negative diagonal entry \(-0\.5\), but a covariance's diagonal"}


@pytest.mark.parametrize("problem", sorted(VALUE_PROBLEMS))
@pytest.mark.parametrize("kind", ["gram", "kfac_a", "kfac_g"])
def test_impossible_statistics_values_are_statistics_errors(tmp_path, kind, problem):
    key = f"{kind}/layer"
    save_stats(tmp_path / "s", {key: broken(kind, problem), f"{kind}/fine": torch.eye(4)}, {key: 3, f"{kind}/fine": 3},
               model="abc123")
    stats = Sidecar("ft1", StatsReader(tmp_path / "s"))
    assert torch.equal(stats.value(kind, f"{kind}/fine"), torch.eye(4))
    with pytest.raises(StatisticsError) as caught:
        stats.value(kind, key)
    message = one_line(caught.value)
    assert re.search(rf"^model 'ft1' \(statistics {re.escape(str(tmp_path / 's' / 'stats.safetensors'))}\): "
                     rf"'{kind}/layer' {VALUE_PROBLEMS[problem]}.*; measure it again$", message), message


def test_a_fisher_is_checked_and_an_all_zero_fisher_is_allowed(tmp_path):
    """A parameter no gradient reaches has an all-zero Fisher (measure writes zeros for it): that is a real
    measurement, and Fisher merging gives such entries the average."""
    nan = torch.ones(3)
    nan[1] = float("nan")
    tensors = {"fisher/w": nan, "fisher/unused": torch.zeros(3)}
    save_stats(tmp_path / "s", tensors, dict.fromkeys(tensors, 2), model="abc123")
    stats = Sidecar("ft1", StatsReader(tmp_path / "s"))
    assert torch.equal(stats.value("fisher", "fisher/unused"), torch.zeros(3))
    with pytest.raises(StatisticsError, match=r"'fisher/w' has NaN or infinite entries; measure it again"):
        stats.value("fisher", "fisher/w")


# ---------------------------------------------------------------------------------------------------------
# A singular Gram sum warns, naming the tensor


def test_a_singular_gram_sum_is_a_merge_warning_naming_the_tensor():
    generator = torch.Generator().manual_seed(0)
    models, statistics = {}, {}
    for name in ("a", "b"):
        inputs = torch.randn(16, 4, generator=generator)
        inputs[:, 3] = 0  # feature 3 never seen: the Gram sum is singular
        models[name] = {"layer.q.weight": torch.randn(2, 4, generator=generator)}
        statistics[f"s{name}"] = {"gram/layer.q": inputs.T @ inputs / 16}
    recipe = {"merge_method": "regmean", "models": [{"model": m, "stats": f"s{m}"} for m in models]}
    with pytest.warns(MergeWarning, match=r"'layer\.q\.weight': the Gram sum is singular"):
        merged = merge_state_dicts(recipe, models, statistics=statistics)
    average = (models["a"]["layer.q.weight"] + models["b"]["layer.q.weight"]) / 2
    torch.testing.assert_close(merged["layer.q.weight"][:, 3], average[:, 3])


# ---------------------------------------------------------------------------------------------------------
# The command line: one line, exit 2, nothing written


def refuses(run_cli, write_recipe, recipe: dict, out: Path, *patterns: str) -> str:
    result = run_cli("merge", write_recipe(recipe), out)
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    line = result.error_line  # exactly one line
    assert line.startswith("error:"), line
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert not out.exists()
    return line


def linear(*models: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models]}


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def patch_weights(directory: Path, mutate: Callable[[bytes], bytes]) -> Path:
    path = directory / "model.safetensors"
    path.write_bytes(mutate(path.read_bytes()))
    return directory


def first_two_tensors(data: bytes) -> tuple[str, str]:
    header = json.loads(split(data)[0])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def overlap(data: bytes) -> bytes:
    first, second = first_two_tensors(data)
    header = json.loads(split(data)[0])
    span = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    return set_field(second, "data_offsets", [0, span])(data)


CLI_CASES = {
    "missing path": (lambda root, llama: root / "no-such-model", r"not found at .*no-such-model"),
    "no checkpoint": (lambda root, llama: (root / "empty").mkdir() or root / "empty", r"no model weights found"),
    "not safetensors": (lambda root, llama: patch_weights(copy_model(llama["ft2"], root / "m"),
                                                          lambda d: b"version https://git-lfs.github.com/spec/v1\n"),
                        r"model\.safetensors: not a readable safetensors file"),
    "truncated": (lambda root, llama: patch_weights(copy_model(llama["ft2"], root / "m"), lambda d: d[:len(d) // 2]),
                  r"past the end of the file .*incomplete"),
    "overlapping tensors": (lambda root, llama: patch_weights(copy_model(llama["ft2"], root / "m"), overlap),
                            r"tensors '.*' and '.*' overlap"),
    "index ../": (lambda root, llama: _index_escaping(copy_model(llama["sharded"], root / "m")),
                  r"names '\.\./elsewhere\.safetensors', outside the model's directory"),
    "symlink leaving the directory": (lambda root, llama: _symlinked(copy_model(llama["ft2"], root / "m"), llama),
                                      r"is a symlink to .*ft1/model\.safetensors, outside the model's directory"),
}


def _index_escaping(directory: Path) -> Path:
    index = json.loads((directory / SAFETENSORS_INDEX).read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "../elsewhere.safetensors"
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index))
    return directory


def _symlinked(directory: Path, llama: dict[str, Path]) -> Path:
    symlink(directory / "model.safetensors", llama["ft1"] / "model.safetensors")
    return directory


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_cli_refuses_an_untrusted_model_in_one_line(case, llama, tmp_path, run_cli, write_recipe):
    make, pattern = CLI_CASES[case]
    bad = make(tmp_path, llama)
    refuses(run_cli, write_recipe, linear(llama["base"], bad), tmp_path / "out", pattern)  # base: has a tokenizer


def test_the_cli_merges_from_a_hub_cache_snapshot(llama, tmp_path, run_cli, write_recipe):
    files = {p.name: p.read_bytes() for p in llama["ft2"].iterdir() if p.is_file()}
    snapshot = hub_snapshot(tmp_path / "hub", files)
    result = run_cli("merge", write_recipe(linear(llama["ft1"], snapshot)), tmp_path / "out")
    assert result.code == 0, result.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    ft1, ft2 = (load_file(llama[m] / "model.safetensors") for m in ("ft1", "ft2"))
    torch.testing.assert_close(merged["model.norm.weight"], (ft1["model.norm.weight"] + ft2["model.norm.weight"]) / 2)


MODULE = "model.layers.0.mlp.down_proj"  # in_features = 64


@pytest.mark.parametrize("kind,problem", [("gram", "NaN"), ("gram", "all zero"), ("kfac_a", "Inf"),
                                          ("kfac_g", "all zero")])
def test_the_cli_refuses_impossible_statistics_in_one_line(kind, problem, llama, tmp_path, run_cli, write_recipe):
    generator = torch.Generator().manual_seed(1)
    models = []
    for name in ("base", "ft2"):  # the first has a tokenizer to copy
        inputs = torch.randn(128, 64, generator=generator)
        gradients = torch.randn(128, 32, generator=generator)
        tensors = {f"gram/{MODULE}": inputs.T @ inputs / 128, f"kfac_a/{MODULE}": inputs.T @ inputs / 128,
                   f"kfac_g/{MODULE}": gradients.T @ gradients / 128}
        if name == "ft2":
            tensors[f"{kind}/{MODULE}"] = broken(kind, problem, n=tensors[f"{kind}/{MODULE}"].shape[0])
        save_stats(tmp_path / f"stats-{name}", tensors, dict.fromkeys(tensors, 128), model="abc123")
        models.append({"model": str(llama[name]), "stats": str(tmp_path / f"stats-{name}")})
    method = {"gram": {"merge_method": "regmean"},
              "kfac_a": {"merge_method": "mats", "parameters": {"init": "average"}},
              "kfac_g": {"merge_method": "mats", "parameters": {"init": "average"}}}[kind]
    refuses(run_cli, write_recipe, {**method, "models": models}, tmp_path / "out",
            rf"statistics {re.escape(str(tmp_path / 'stats-ft2'))}", rf"'{kind}/{re.escape(MODULE)}'",
            VALUE_PROBLEMS[problem], r"measure it again")


def test_every_error_here_is_a_merge_error():
    """The CLI's contract (exit 2, one line) rests on the hierarchy."""
    assert issubclass(CheckpointError, MergeError) and issubclass(StatisticsError, MergeError)
