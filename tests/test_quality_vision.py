"""The vision suite (mergesmith/quality/vision.py): its tasks are balanced, disjoint and seeded, every image is
what its task says, checked against the raw scikit-learn digits by index arithmetic rather than the suite's own
transforms, and its pretrained start is a Hugging Face ConvNext that loads and is mostly nn.Linear."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from mergesmith.quality import vision  # noqa: E402

SPLITS = ("train", "val", "test")
ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.images.astype(np.float64), raw.target


@pytest.fixture(scope="module")
def tasks():
    return vision.make_tasks(0)


def test_the_pretraining_half_and_the_pool_split_every_class_in_two(digits):
    _, target = digits
    pre, pool = vision.partition()
    assert not set(pre) & set(pool)
    assert sorted([*pre, *pool]) == list(range(len(target)))
    for c in range(10):
        n = int((target == c).sum())
        assert int((target[pre] == c).sum()) == n // 2 and int((target[pool] == c).sum()) == n - n // 2


def test_every_task_is_balanced_and_its_splits_are_disjoint_images_of_the_pool(digits, tasks):
    _, target = digits
    _, pool = vision.partition()
    assert tuple(t.name for t in tasks) == vision.TASK_NAMES and len(tasks) >= 5
    for task in tasks:
        index = task.extra["digit_index"]
        seen = [set(index[s]) for s in SPLITS]
        assert all(len(s) == len(index[name]) for s, name in zip(seen, SPLITS)), task.name  # no repeats
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), task.name
        assert set().union(*seen) <= set(pool.tolist()), task.name
        assert task.source and "digits" in task.source
        for split in SPLITS:
            examples = getattr(task, split)
            per_digit = Counter(target[index[split]].tolist())
            assert sorted(per_digit) == list(range(10)) and len(set(per_digit.values())) == 1, (task.name, split)
            per_label = Counter(e["label"] for e in examples)
            assert sorted(per_label) == list(range(task.num_labels)), (task.name, split)
            assert len(set(per_label.values())) == 1, (task.name, split)
    assert [len(tasks[0].train), len(tasks[0].val), len(tasks[0].test)] == [480, 130, 260]


def test_the_splits_depend_on_the_seed_and_nothing_else(tasks):
    again, other = vision.make_tasks(0), vision.make_tasks(1)
    for a, b, c in zip(tasks, again, other):
        assert (a.train, a.val, a.test, a.extra) == (b.train, b.val, b.test, b.extra)
        assert a.extra["digit_index"]["test"] != c.extra["digit_index"]["test"]
    quick = vision.make_tasks(0, quick=True)
    assert [t.name for t in quick] == [t.name for t in tasks]
    assert all(len(t.val) == 50 and len(t.test) == 100 and len(t.train) == 480 for t in quick)


def _expected(name: str, raw: np.ndarray, variant: int) -> np.ndarray:
    """What the task's image should be, from the raw 0..16 image, written out pixel by pixel."""
    x = raw / 8.0 - 1.0  # the model's scale: background -1, full ink +1
    n = x.shape[0]
    out = np.empty_like(x)
    for r in range(n):
        for c in range(n):
            if name == "rotate90":  # anticlockwise: the right column becomes the top row
                out[r, c] = x[c, n - 1 - r]
            elif name == "mirror" or (name == "is_mirrored" and variant == 1):
                out[r, c] = x[r, n - 1 - c]
            elif name == "invert":
                out[r, c] = (16.0 - raw[r, c]) / 8.0 - 1.0
            elif name == "shift":
                out[r, c] = x[r - 2, c - 2] if r >= 2 and c >= 2 else -1.0
            elif name == "scramble":
                k = int(vision.SCRAMBLE[r * n + c])
                out[r, c] = x[k // n, k % n]
            elif name == "is_mirrored":
                out[r, c] = x[r, c]
            else:
                raise AssertionError(f"no independent check for task {name}")
    return out


def test_every_image_is_its_digit_transformed_as_the_task_says(digits, tasks):
    images, target = digits
    assert sorted(vision.SCRAMBLE.tolist()) == list(range(64)) and (vision.SCRAMBLE != np.arange(64)).sum() > 50
    assert np.array_equal(_expected("rotate90", images[0], 0), np.rot90(images[0] / 8 - 1))
    for task in tasks:
        for split in SPLITS:
            index, variants = task.extra["digit_index"][split], task.extra["variant"][split]
            for example, i, variant in zip(getattr(task, split), index, variants):
                image = np.asarray(example["pixel_values"])
                assert image.shape == (1, 8, 8)
                np.testing.assert_allclose(image[0], _expected(task.name, images[i], variant), atol=1e-6,
                                           err_msg=f"{task.name} {split} digit {i}")
                label = variant if task.name == "is_mirrored" else int(target[i])
                assert example["label"] == label, (task.name, split, i)


def test_inputs_batch_the_pixels_as_the_model_takes_them(tasks):
    batch = vision.inputs(tasks[0].train[:5])
    assert set(batch) == {"pixel_values"}
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (5, 1, 8, 8)
    assert torch.equal(batch["pixel_values"][2, 0], torch.tensor(tasks[0].train[2]["pixel_values"][0]))


def test_the_quick_start_loads_reads_digits_and_is_mostly_linear(tmp_path, digits):
    from transformers import AutoModelForImageClassification, ConvNextForImageClassification

    vision.make_base(tmp_path / "start", seed=0, quick=True)
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "start", local_files_only=True)
    assert isinstance(model, ConvNextForImageClassification) and model.config.num_labels == 10
    assert all(layer.layer_scale_parameter is None for stage in model.convnext.encoder.stages
               for layer in stage.layers)
    body = [(name, m) for name, m in model.named_modules() if not name.startswith("classifier")]
    linear = sum(p.numel() for _, m in body if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False))
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("classifier"))
    assert linear / total > 0.75
    images, target = digits
    _, pool = vision.partition()
    with torch.no_grad():  # digits it never saw, upright: what pretraining was for
        logits = model(pixel_values=torch.tensor(images[pool] / 8 - 1, dtype=torch.float32).unsqueeze(1)).logits
    assert (logits.argmax(-1).numpy() == target[pool]).mean() > 0.9


def test_the_start_depends_on_the_seed_only(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setitem(vision.QUICK_PRETRAIN, "steps", 3)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        vision.make_base(tmp_path / name, seed=seed, quick=True)
    a, b, c = (load_file(str(tmp_path / name / "model.safetensors")) for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
