"""The sidecar format on disk: one file or shards with an index, read back with the safetensors library and
the json module alone (as another tool would), rewritten in place, combined, and refused when damaged."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergesmith.errors import MergeError
from mergesmith.io import sidecar
from mergesmith.io.sidecar import FORMAT, StatsReader, combine_stats, save_stats


def example_stats(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Five float32 statistics of 4 KB each (1024 values) with their counts."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"fisher/layer{i}.weight": torch.rand(32, 32, generator=generator) for i in range(3)}
    tensors |= {f"gram/layer{i}": torch.rand(32, 32, generator=generator) for i in range(2)}
    counts = {key: (7 if key.startswith("fisher") else 40) + seed for key in tensors}
    return tensors, counts


def expected_metadata(counts: dict[str, int]) -> dict[str, str]:
    return {"format": FORMAT, "kinds": "fisher,gram", "counts": json.dumps(counts), "model": "abc123",
            "fisher_variant": "sampled"}


def test_small_sidecar_is_one_file(tmp_path):
    tensors, counts = example_stats()
    path = save_stats(tmp_path / "s", tensors, counts, model="abc123", fisher_variant="sampled")
    assert path == tmp_path / "s" / "stats.safetensors"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["stats.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == expected_metadata(counts)


def test_sharded_sidecar_is_readable_with_safetensors_and_json_alone(tmp_path):
    tensors, counts = example_stats()
    # 4096 bytes per tensor: two fit in 10KB, so 5 tensors make 3 shards
    path = save_stats(tmp_path / "s", tensors, counts, model="abc123", fisher_variant="sampled",
                      max_shard_size="10KB")
    assert path == tmp_path / "s" / "stats.safetensors.index.json"
    shards = [f"stats-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([*shards, "stats.safetensors.index.json"])

    index = json.loads(path.read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {**expected_metadata(counts), "total_size": 5 * 32 * 32 * 4}
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    read_back = {}
    for shard in shards:
        with safe_open(str(tmp_path / "s" / shard), framework="pt") as f:
            assert f.metadata() == expected_metadata(counts)  # every shard describes itself
            assert all(index["weight_map"][key] == shard for key in f.keys())
        read_back |= load_file(tmp_path / "s" / shard)
    assert set(read_back) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(read_back[key], value), key

    reader = StatsReader(tmp_path / "s")
    assert reader.path == path and reader.files == [tmp_path / "s" / s for s in shards]
    assert sorted(reader.keys()) == sorted(tensors)
    assert reader.counts == counts and reader.model == "abc123" and reader.fisher_variant == "sampled"
    for key, value in tensors.items():
        assert reader.shape(key) == (32, 32)
        assert torch.equal(reader.get(key), value), key
    assert torch.equal(StatsReader(path).get("gram/layer1"), tensors["gram/layer1"])  # the index itself


def test_reader_opens_a_shard_only_for_a_key_it_holds(tmp_path):
    tensors, counts = example_stats()
    save_stats(tmp_path / "s", tensors, counts, model="abc123", max_shard_size="10KB")
    index = json.loads((tmp_path / "s" / "stats.safetensors.index.json").read_text())
    damaged = "stats-00003-of-00003.safetensors"
    (tmp_path / "s" / damaged).write_bytes(b"\x00" * 10)
    reader = StatsReader(tmp_path / "s")
    intact = next(key for key, file in index["weight_map"].items() if file != damaged)
    assert torch.equal(reader.get(intact), tensors[intact])
    broken = next(key for key, file in index["weight_map"].items() if file == damaged)
    with pytest.raises(MergeError, match=rf"{damaged}: not a readable statistics file .*measure again"):
        reader.get(broken)


def test_rewriting_in_place_switches_layout_and_leaves_no_stale_files(tmp_path):
    """A sidecar may live in a directory that holds other files (the checkpoint's own): a rewrite replaces
    the sidecar's files and touches nothing else."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"weights")
    tensors, counts = example_stats()
    save_stats(directory, tensors, counts, model="abc123")
    save_stats(directory, tensors, counts, model="abc123", max_shard_size="10KB")
    assert sorted(p.name for p in directory.iterdir()) == [
        "model.safetensors", "stats-00001-of-00003.safetensors", "stats-00002-of-00003.safetensors",
        "stats-00003-of-00003.safetensors", "stats.safetensors.index.json"]
    smaller, smaller_counts = example_stats(seed=1)
    save_stats(directory, smaller, smaller_counts, model="abc123", max_shard_size="20KB")
    assert sorted(p.name for p in directory.iterdir()) == [
        "model.safetensors", "stats-00001-of-00002.safetensors", "stats-00002-of-00002.safetensors",
        "stats.safetensors.index.json"]
    save_stats(directory, tensors, counts, model="abc123")
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors", "stats.safetensors"]
    assert (directory / "model.safetensors").read_bytes() == b"weights"
    assert StatsReader(directory).counts == counts


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_while_writing_shards_leaves_no_partial_sidecar(tmp_path, monkeypatch, existing):
    tensors, counts = example_stats()
    target = tmp_path / "out" / "stats"
    if existing:  # the old sidecar must survive intact
        old, old_counts = example_stats(seed=2)
        save_stats(target, old, old_counts, model="abc123")
    written = []
    real_save_file = sidecar.save_file

    def disk_full_on_the_second_shard(data, filename, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(filename)
        real_save_file(data, filename, metadata=metadata)

    monkeypatch.setattr(sidecar, "save_file", disk_full_on_the_second_shard)
    with pytest.raises(MergeError, match=r"cannot write statistics to .*out/stats: No space left on device"):
        save_stats(target, tensors, counts, model="abc123", max_shard_size="10KB")
    assert written, "the first shard should have been written before the failure"
    if existing:
        assert sorted(p.name for p in target.iterdir()) == ["stats.safetensors"]
        assert StatsReader(target).counts == old_counts
    else:
        assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if p.name != "stats"] == []


def test_combining_sharded_sidecars_gives_count_weighted_means(tmp_path):
    first, first_counts = example_stats(seed=0)
    second, second_counts = example_stats(seed=3)
    save_stats(tmp_path / "a", first, first_counts, model="abc123", max_shard_size="10KB")
    save_stats(tmp_path / "b", second, second_counts, model="abc123")
    path = combine_stats([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", max_shard_size="13KB")
    assert path.name == "stats.safetensors.index.json"
    combined = StatsReader(tmp_path / "ab")
    assert len(combined.files) == 2  # three 4096-byte tensors per 13 KB shard
    for key in first:
        n, m = first_counts[key], second_counts[key]
        expected = (first[key].double() * n + second[key].double() * m) / (n + m)
        torch.testing.assert_close(combined.get(key), expected.float(), rtol=1e-6, atol=0, msg=key)
        assert combined.counts[key] == n + m
    resharded = combine_stats([tmp_path / "ab"], tmp_path / "one")  # one source: a plain copy, one file
    assert resharded.name == "stats.safetensors"
    assert all(torch.equal(StatsReader(resharded).get(k), combined.get(k)) for k in first)


@pytest.fixture
def sharded(tmp_path):
    tensors, counts = example_stats()
    save_stats(tmp_path / "s", tensors, counts, model="abc123", max_shard_size="10KB")
    return tmp_path / "s"


def refused(call, pattern: str) -> None:
    """``call()`` raises a one-line MergeError matching ``pattern``."""
    with pytest.raises(MergeError, match=pattern) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_damaged_sharded_sidecars_are_one_line_errors(sharded):
    index = sharded / "stats.safetensors.index.json"
    good = index.read_text()
    (sharded / "stats-00002-of-00003.safetensors").rename(sharded / "moved")
    refused(lambda: StatsReader(sharded), r"stats-00002-of-00003.safetensors: shard named in "
                                          r"stats.safetensors.index.json is missing; copy the whole sidecar")
    (sharded / "moved").rename(sharded / "stats-00002-of-00003.safetensors")
    index.write_text(good[:-20])
    refused(lambda: StatsReader(sharded), r"stats.safetensors.index.json: broken index JSON \(.* at line \d+ "
                                          r"column \d+\); restore it .* or measure again")
    for text in ('["a list"]', "{}", '{"metadata": {}, "weight_map": []}'):
        index.write_text(text)
        refused(lambda: StatsReader(sharded), r"not a statistics index \(expected a JSON object with 'metadata'")
    index.write_text(good.replace('"stats-00001-of-00003.safetensors"', '"../elsewhere.safetensors"', 1))
    refused(lambda: StatsReader(sharded), r"expected a file name in the same directory")
    index.write_text(good.replace(f'"format": "{FORMAT}"', '"format": "pt"'))
    refused(lambda: StatsReader(sharded), r"not a mergesmith statistics sidecar \(format 'pt'")
    index.write_text(good)
    assert StatsReader(sharded).model == "abc123"


def test_a_shard_of_another_sidecar_is_refused(sharded, tmp_path):
    tensors, counts = example_stats()
    save_stats(tmp_path / "other", tensors, counts, model="fff000", max_shard_size="10KB")
    name = "stats-00001-of-00003.safetensors"
    (sharded / name).write_bytes((tmp_path / "other" / name).read_bytes())
    reader = StatsReader(sharded)
    key = next(k for k, f in json.loads((sharded / "stats.safetensors.index.json").read_text())["weight_map"].items()
               if f == name)
    with pytest.raises(MergeError, match=rf"{name}: not a shard of the sidecar .*model 'fff000', expected 'abc123'"):
        reader.get(key)


def test_reader_errors_name_the_problem(sharded, tmp_path):
    save_stats(sharded, *example_stats(), model="abc123")  # now one file: the index is gone
    (sharded / "stats.safetensors.index.json").write_text("{}")
    with pytest.raises(MergeError, match=r"holds both stats.safetensors and stats.safetensors.index.json"):
        StatsReader(sharded)
    with pytest.raises(MergeError, match=r"statistics not found at .*nowhere"):
        StatsReader(tmp_path / "nowhere")
    (sharded / "stats.safetensors.index.json").unlink()
    with pytest.raises(MergeError, match=r"no statistic 'gram/layer7' \(did you mean 'gram/layer1'\?\)"):
        StatsReader(sharded).get("gram/layer7")
    with pytest.raises(MergeError, match=r"cannot read size '5 parsecs'"):
        save_stats(tmp_path / "x", *example_stats(), model="abc123", max_shard_size="5 parsecs")
    with pytest.raises(MergeError, match=r"nothing to combine"):
        combine_stats([], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for target, reason in ((blocker, "it exists and is not a directory"), (blocker / "stats", "is not a directory")):
        with pytest.raises(MergeError, match=rf"cannot write statistics to {re.escape(str(target))}: .*{reason}"):
            sidecar.check_writable(target)
        with pytest.raises(MergeError, match=rf"cannot write statistics to {re.escape(str(target))}"):
            save_stats(target, *example_stats(), model="abc123")
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
