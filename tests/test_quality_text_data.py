"""The text tasks of the quality benchmark (mergesmith/quality/text_data.py): balanced, disjoint, seeded splits of
short texts whose label's giveaway has been taken out."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mergesmith.quality import text_data as td

_SOURCES = {
    td.GCIDE: "dict-gcide",
    td.FOLDOC: "dict-foldoc",
    td.JARGON: "dict-jargon",
    td.BIBLE_DATA: "bible-kjv-text",
    td.BIBLE_PROGRAM: "bible-kjv",
    **{td.DPKG_INFO / f"{package}.list": package for package in td.MAN_PACKAGES},
    Path("/usr/share/man/man2/open.2.gz"): "manpages-dev",
}
_ABSENT = sorted({package for path, package in _SOURCES.items() if not path.is_file()})
pytestmark = pytest.mark.skipif(
    bool(_ABSENT), reason=f"the text tasks read Debian packages not installed here: {', '.join(_ABSENT)}"
)

ALL = td.TASK_NAMES + td.EXTRA_TASK_NAMES
SIZES = {"n_train": 480, "n_val": 120, "n_test": 240}
SPLITS = ("train", "val", "test")
DICTIONARY_TASKS = ("gcide_pos", "gcide_field", "computing_term", "foldoc_topic")


@pytest.fixture(scope="module")
def tasks() -> dict[str, td.Task]:
    return {task.name: task for task in td.make_text_tasks(0, names=ALL, **SIZES)}


@pytest.fixture(scope="module")
def other_seed() -> dict[str, td.Task]:
    return {task.name: task for task in td.make_text_tasks(1, names=ALL, **SIZES)}


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_the_api() -> None:
    assert len(set(td.TASK_NAMES)) == len(td.TASK_NAMES) >= 6
    assert not set(td.TASK_NAMES) & set(td.EXTRA_TASK_NAMES)
    assert all(isinstance(p, str) and p for p in td.DEBIAN_PACKAGES)
    assert set(_SOURCES.values()) <= set(td.DEBIAN_PACKAGES)
    assert [t.name for t in td.make_text_tasks(0, n_train=8, n_val=8, n_test=8)] == list(td.TASK_NAMES)
    with pytest.raises(ValueError, match="unknown text task"):
        td.make_text_tasks(0, n_train=8, n_val=8, n_test=8, names=("no_such_task",))


def test_every_task_is_whole_and_balanced(tasks: dict[str, td.Task]) -> None:
    for task in tasks.values():
        assert task.source and "\n" not in task.source
        assert len(task.labels) == len(set(task.labels)) >= 2
        k = task.num_labels
        for split, size in zip(SPLITS, SIZES.values()):
            examples = getattr(task, split)
            # Every class of every task has enough examples for these sizes, so none is cut short.
            assert len(examples) == size // k * k, (task.name, split)
            assert Counter(e["label"] for e in examples) == {label: size // k for label in range(k)}, task.name
            assert all(set(e) == {"text", "label"} and isinstance(e["text"], str) for e in examples)
            assert len(task.extra["groups"][split]) == len(examples)
        assert all(n >= sum(SIZES.values()) // k for n in task.extra["available_per_class"].values()), task.name


def test_sizes_round_down_to_a_multiple_of_the_classes() -> None:
    (task,) = td.make_text_tasks(0, n_train=100, n_val=9, n_test=0, names=("gcide_field",))
    assert (len(task.train), len(task.val), len(task.test)) == (96, 8, 0)


def test_splits_share_no_text_and_no_group(tasks: dict[str, td.Task]) -> None:
    for task in tasks.values():
        texts = [{_normal(e["text"]) for e in getattr(task, split)} for split in SPLITS]
        groups = [set(task.extra["groups"][split]) for split in SPLITS]
        assert sum(map(len, texts)) == sum(len(getattr(task, split)) for split in SPLITS), task.name
        for a in range(3):
            for b in range(a + 1, 3):
                assert not texts[a] & texts[b], (task.name, SPLITS[a], SPLITS[b])
                assert not groups[a] & groups[b], (task.name, SPLITS[a], SPLITS[b])
        if task.name in DICTIONARY_TASKS:  # a headword is a group of one example
            for split in SPLITS:
                assert len(set(task.extra["groups"][split])) == len(getattr(task, split)), task.name


def test_a_seed_decides_the_split(tasks: dict[str, td.Task], other_seed: dict[str, td.Task]) -> None:
    again = {task.name: task for task in td.make_text_tasks(0, names=ALL, **SIZES)}
    for name, task in tasks.items():
        assert (again[name].train, again[name].val, again[name].test) == (task.train, task.val, task.test), name
        assert other_seed[name].train != task.train, name
        overlap = {e["text"] for e in task.test} & {e["text"] for e in other_seed[name].test}
        assert len(overlap) < len(task.test) // 2, name


def test_texts_are_short_and_plain(tasks: dict[str, td.Task]) -> None:
    for task in tasks.values():
        for split in SPLITS:
            for e in getattr(task, split):
                assert td.MIN_WORDS <= len(e["text"].split()) <= td.MAX_WORDS, (task.name, e["text"])
                assert e["text"] == e["text"].strip() and "  " not in e["text"], (task.name, e["text"])
                if task.name != "man_section":  # man pages quote code: <stdio.h>, [0-9]
                    assert not re.search(r"[{}]|\[\d{4}|\[(?:1913 )?Webster", e["text"]), (task.name, e["text"])


def _all(task: td.Task) -> list[tuple[str, int, str]]:
    """(text, label, group) of every example of every split."""
    groups = task.extra["groups"]
    return [(e["text"], e["label"], g) for split in SPLITS for e, g in zip(getattr(task, split), groups[split])]


def test_a_definition_does_not_name_its_headword(tasks: dict[str, td.Task]) -> None:
    for name in DICTIONARY_TASKS:
        for text, _, key in _all(tasks[name]):
            assert not re.search(rf"\b{re.escape(key)}", _normal(text)), (name, key, text)
            if name == "gcide_pos" and len(key) >= 6:  # one-word headwords: their inflections go too (abalienat-)
                assert key[: max(5, len(key) - 3)] not in text.lower().split(), (name, key, text)


def test_the_label_giveaways_are_gone(tasks: dict[str, td.Task]) -> None:
    field_labels = re.compile(r"\((?:Bot|Zo[\"o]*l|Chem|Med|Anat|Naut|Law|Mus)\.?\)")
    for text, _, _ in _all(tasks["gcide_field"]):
        assert not field_labels.search(text), text
    pos_tags = re.compile(r"(?<![A-Za-z])(?:v\. ?[ti]\.|adv\.|adj\.|n\.|a\.)(?=[\s,;:)]|$)")
    for text, _, _ in _all(tasks["gcide_pos"]):
        assert not pos_tags.search(text), text
        assert not re.match(r"(?i)(?:to|in an?) ", text), text  # "To ..." was every verb, "In a ... manner" adverbs
    for name in ("kjv_testament", "kjv_book_group"):
        for text, _, _ in _all(tasks[name]):
            assert not re.search(r"\b(?:Jesus|Christ|Israel|Moses|Jerusalem|Paul)\b", text), text
    for text, _, _ in _all(tasks["man_section"]):
        assert not re.search(r"\w\(\d[a-z]*\)", text), text  # read(2) would name the section
    for text, _, _ in _all(tasks["foldoc_topic"]):
        assert not re.search(r"(?i)\b(?:language|network|hardware|storage)\b", text), text


def test_no_one_word_decides_a_class(tasks: dict[str, td.Task]) -> None:
    # The word most typical of a class is found in under two thirds of its examples and more often than that
    # elsewhere: a keyword alone does not solve a task.
    for task in tasks.values():
        for label in range(task.num_labels):
            mine = [set(_normal(e["text"]).split()) for e in task.train if e["label"] == label]
            others = [set(_normal(e["text"]).split()) for e in task.train if e["label"] != label]
            words = Counter(w for s in mine for w in s)
            for word, n in words.most_common(20):
                precision = n / (n + sum(word in s for s in others) / (task.num_labels - 1))
                assert not (n > 2 * len(mine) / 3 and precision > 0.95), (task.name, task.labels[label], word)


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(td, "GCIDE", tmp_path / "gcide.dict.dz")
    with pytest.raises(
        RuntimeError,
        match=r"reads .*gcide\.dict\.dz from the Debian package dict-gcide; "
        r"install it with: apt-get install dict-gcide",
    ):
        td._gcide.__wrapped__()
    monkeypatch.setattr(shutil, "which", lambda _: None)
    monkeypatch.setattr(td, "BIBLE_PROGRAM", tmp_path / "bible")
    with pytest.raises(RuntimeError, match="apt-get install bible-kjv$"):
        td._kjv.__wrapped__()
    monkeypatch.setattr(td, "DPKG_INFO", tmp_path)
    with pytest.raises(RuntimeError, match="apt-get install manpages$"):
        td._man_files()
