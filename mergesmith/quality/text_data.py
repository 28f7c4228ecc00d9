"""Text-classification tasks for the quality benchmark, made offline from English text that Debian packages install:
the GCIDE, FOLDOC and Jargon dictionaries, the King James Bible and the Linux man-pages.

Every example is ``{"text": str, "label": int}`` of ``MIN_WORDS`` to ``MAX_WORDS`` words, with the giveaway of its
label taken out: a definition's headword and part-of-speech tag or subject label, a man page's section numbers;
Bible verses that name someone or somewhere telling of their book (Jesus, Moses, Egypt) are left out. Classes are
balanced in every split. The splits share no text and no "group": no headword, man page or Bible chapter has
examples in two splits, so a test example never comes from something the model was trained on. ``seed`` picks the
split and the sample; the same seed gives the same tasks on any machine with the same package versions.

``n_train``, ``n_val`` and ``n_test`` count a task's examples over all its classes. Each is rounded down to a
multiple of the number of classes, and lowered further, for every class alike, where a class has too few examples.
"""

from __future__ import annotations

import functools
import gzip
import random
import re
import shutil
import subprocess
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from mergesmith.quality.tasks import Task

TASK_NAMES: tuple[str, ...] = (
    "gcide_pos",
    "gcide_field",
    "computing_term",
    "kjv_testament",
    "kjv_book_group",
    "foldoc_topic",
)
# Made the same way but left out of the default suite. man_section: a MiniLM fine-tune (120 steps at 1e-4)
# beat its linear probe by only 3 points (44 % against 41 %, 240 test paragraphs, while fitting its 480
# training paragraphs perfectly) and not at all at 2e-4: a man page's section is too weakly written into
# one paragraph for there to be a skill worth merging. foldoc_topic gained 7 points under the same fine-tune.
EXTRA_TASK_NAMES: tuple[str, ...] = ("man_section",)

DEBIAN_PACKAGES: tuple[str, ...] = (
    "dict-gcide",
    "dict-foldoc",
    "dict-jargon",
    "bible-kjv",
    "bible-kjv-text",
    "manpages",
    "manpages-dev",
)

MIN_WORDS = 8
# The text suite's encoder reads 32 to 48 tokens of a text: about 30 words fill them, and the tokenizer would only cut
# what is longer.
MAX_WORDS = 30

DICTD = Path("/usr/share/dictd")
GCIDE = DICTD / "gcide.dict.dz"
FOLDOC = DICTD / "foldoc.dict.dz"
JARGON = DICTD / "jargon.dict.dz"
BIBLE_DATA = Path("/usr/lib/bible.data")
BIBLE_PROGRAM = Path("/usr/bin/bible")
DPKG_INFO = Path("/var/lib/dpkg/info")
MAN_PACKAGES = ("manpages", "manpages-dev")

Pool = tuple[tuple[str, ...], list[tuple[str, int, str]]]  # class names, (text, label, group) examples


def _missing(path: Path | str, package: str, why: str = "") -> RuntimeError:
    return RuntimeError(
        f"the quality benchmark's text suite reads {path} from the Debian package {package}{why}; "
        f"install it with: apt-get install {package}"
    )


def _require(path: Path, package: str) -> Path:
    if not path.is_file():
        raise _missing(path, package)
    return path


# --------------------------------------------------------------------------------------------------- text helpers

_WS = re.compile(r"\s+")
_SPACE_BEFORE = re.compile(r"\s+([,.;:)])")
_WORD = re.compile(r"[A-Za-z0-9][\w'-]*")
_LETTERS = re.compile(r"[A-Za-z0-9]+")
_INNER_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LEADING_INITIALISM = re.compile(r"^\s*\([A-Z][A-Za-z0-9/&.-]*\)\s*")
_ORPHANS = (
    # What taking a word out leaves behind: "One who, or that which, ." or "a plant; the ." or "( )".
    (re.compile(r"(?i)\b(?:an?|the|of|to|or|and|one of the|of the)\s*(?=[.;,:]|$)"), ""),
    (re.compile(r"\(\s*\)"), ""),
    (_SPACE_BEFORE, r"\1"),
    (re.compile(r"[,;:]+(?=[.;,:])|^[\s,;:.]+"), ""),
)
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def _squash(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _unspace(text: str) -> str:
    return _squash(_SPACE_BEFORE.sub(r"\1", text))


def _shorten(text: str) -> str:
    """At most MAX_WORDS words, ending at a sentence end where that leaves at least MIN_WORDS."""
    words = text.split()
    if len(words) <= MAX_WORDS:
        return " ".join(words)
    cut = words[:MAX_WORDS]
    for i in range(len(cut) - 1, MIN_WORDS - 2, -1):
        if cut[i].endswith((".", ";", "?", "!")):
            return " ".join(cut[: i + 1])
    return " ".join(cut)


def _fits(text: str) -> bool:
    return len(text.split()) >= MIN_WORDS


def _strip_brackets(text: str) -> str:
    """Drops every balanced [...] span, nested ones included (GCIDE nests accent codes inside etymologies)."""
    while "[" in text:
        text, n = _INNER_BRACKETS.subn("", text)
        if not n:
            return text.replace("[", "")
    return text.replace("]", "")


def _tidy(text: str) -> str:
    for pattern, repl in _ORPHANS:
        text = pattern.sub(repl, text)
    return _squash(text)


def _headword_key(headword: str) -> str:
    return _NOT_ALNUM.sub("", headword.lower())


def _drop_headword(text: str, headword: str) -> str:
    """The text without its headword, so that a definition cannot name itself. A one-word headword goes with its
    inflections (the stem abalienat- takes abalienate, abalienating, abalienation); a several-word one as a phrase,
    with its initialism, since its words alone are ordinary words ("web" of "web server")."""
    parts = _LETTERS.findall(headword)
    stems: tuple[str, ...] = ()
    before = text
    if len(parts) == 1 and len(parts[0]) >= 3:
        low = parts[0].lower()
        stems = (low if len(low) < 6 else low[: max(5, len(low) - 3)],)
    elif len(parts) > 1:
        stems = ("".join(parts).lower(),)
        if parts[0].lower() in text.lower():
            phrase = r"[\s-]*".join(re.escape(p) for p in parts)
            text = re.sub(r"(?i)\b" + phrase + r"\w*", "", text)
        text = _LEADING_INITIALISM.sub("", text)
    if stems and stems[0] in text.lower():
        text = _WORD.sub(lambda m: "" if m.group().lower().startswith(stems) else m.group(), text)
    return _tidy(text) if text != before else _unspace(text)


# --------------------------------------------------------------------------------------------------- dictd files

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(number: str) -> int:
    value = 0
    for ch in number:
        value = value * 64 + _B64[ch]
    return value


def _dictd_entries(path: Path, package: str, rewrite: Callable[[bytes], bytes] | None = None) -> list[str]:
    """The entries of a dictd database in file order, each once (the .index lists an entry under every alias).
    ``rewrite`` edits all of them in one pass, much faster than entry by entry; it must not write NUL bytes."""
    data = gzip.decompress(_require(path, package).read_bytes())
    index = _require(path.with_suffix("").with_suffix(".index"), package)
    spans = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith(("00-database", "00database")):
            spans.add((_b64(parts[1]), _b64(parts[2])))
    joined = b"\0".join(data[start : start + size] for start, size in sorted(spans))
    if rewrite is not None:
        joined = rewrite(joined)
    return joined.decode("utf-8", errors="replace").split("\0")


# ---------------------------------------------------------------------------------------------------------- GCIDE

# GCIDE writes accented letters as ["o], ['e], [=a], [a^], [ae]: keep the letter, lose the accent. So Zo["o]l.,
# the label of zoology, reads Zool. like its unaccented spelling.
_GCIDE_ACCENTS = (
    re.compile(rb"\[[\"'`^~=.\-]([A-Za-z])\]"),
    re.compile(rb"\[([a-z])[\"'`^~=.\-]\]"),
    re.compile(rb"\[(ae|oe|AE|OE)\]"),
)
_GCIDE_SOURCE = re.compile(r"\s*\[(?:1913 Webster|Webster 1913 Suppl\.|WordNet[^\]]*|PJC|Century Dict\.|[^\]]*\d{4})\]")
_GCIDE_POS = {"n.": "noun", "v. t.": "verb", "v. i.": "verb", "v.": "verb", "a.": "adjective", "adj.": "adjective",
              "adv.": "adverb"}  # fmt: skip
# A part of speech followed by "&" or "or" ("a. & n.") is two of them, and the entry stays out of the POS task.
_GCIDE_POS_RE = re.compile(r"\s*,?\s*(v\. [ti]\.|adv\.|adj\.|n\.|a\.|v\.)(?=$|[\s;,\[(])(\s*(?:&|or)\s)?")
_PRONUNCIATION = re.compile(r"^\s*\([^)]*\)")
_LABEL = re.compile(r"\(([A-Z][^()]{1,30})\)")
_LEADING_LABEL = re.compile(r"\s*\(([A-Z][^()]{1,30})\)\s*")
_SENSE_NUMBER = re.compile(r"^(?:\d+\.\s*)+(?:\d+\s+)?")
_HEADER_GOES_ON = re.compile(r"[a-z\[{;&]|\([A-Z][^)]*\)\s*$")
_SENSE_START = re.compile(r"\s{0,6}(?:\d+\.|\{)")
_NOT_A_SENSE = re.compile(r"\{|Note|Syn|Usage")
# Citations (--Milton.), usage examples (; as, to go abaft) and synonym notes come after the definition proper.
_GCIDE_CUT = re.compile(r"\s--|;\s*as,\s|,\s*as,\s|\s*Syn(?:onyms)?\.\s*--|Note:")
_QUOTED = re.compile(r"\"[^\"]*\"")
_SUBSENSE = re.compile(r"\((?:[a-z]|[ivx]+)\)\s*")
_TRAILING = re.compile(r"[;,:\s]+$")
_ALPHA_WORD = re.compile(r"[A-Za-z]{3,}")


def _gcide_accents(data: bytes) -> bytes:
    for pattern in _GCIDE_ACCENTS:
        data = pattern.sub(rb"\1", data)
    return data


def _depth(line: str) -> int:
    return line.count("[") + line.count("(") - line.count("]") - line.count(")")


def _gcide_clean(text: str) -> str:
    """A GCIDE sense as plain prose: no citations, quoted examples, usage notes, brackets or cross-reference braces."""
    text = _GCIDE_CUT.split(text, maxsplit=1)[0]
    text = _strip_brackets(_QUOTED.sub("", text))
    text = _SUBSENSE.sub("", text.replace("{", "").replace("}", "").replace("\\", ""))
    text = _TRAILING.sub("", _unspace(text))
    return text if not text or text.endswith((".", "?", "!")) else text + "."


def _gcide_sense(chunk: list[str]) -> tuple[tuple[str, ...], str] | None:
    """(subject labels, raw text) of the lines of one sense, or None where they are a quotation, a sub-entry
    ({Abacus harmonicus}) or a note."""
    first, body = chunk[0], " ".join(line.strip() for line in chunk)
    if len(first) - len(first.lstrip()) > 6 or _NOT_A_SENSE.match(body):
        return None
    body = _SENSE_NUMBER.sub("", body)
    labels = []
    while m := _LEADING_LABEL.match(body):
        labels.append(_squash(m.group(1)))
        body = body[m.end() :]
    return tuple(labels), body


GcideEntry = tuple[str, str, "str | None", tuple[str, ...], tuple[tuple[tuple[str, ...], str], ...]]


@functools.lru_cache(maxsize=1)
def _gcide() -> tuple[GcideEntry, ...]:
    """Every GCIDE entry as (headword, its key, part of speech or None, subject labels of the header, senses), a
    sense being (its own subject labels, its raw text). Senses are _gcide_clean'ed when used: most never are."""
    entries = []
    for block in _dictd_entries(GCIDE, "dict-gcide", _gcide_accents):
        lines = block.strip("\n").split("\n")
        if "\\" not in lines[0]:
            continue
        # The header (headword, pronunciation, part of speech, etymology) wraps onto indented lines; a definition
        # starts on a line of its own, with a capital, a sense number or a quotation.
        header, depth, i = lines[0], _depth(lines[0]), 1
        while i < len(lines):
            stripped = lines[i].strip()
            if not stripped or _GCIDE_SOURCE.match(stripped) or (depth <= 0 and not _HEADER_GOES_ON.match(stripped)):
                break
            header += " " + stripped
            depth += _depth(stripped)
            i += 1
        headword = header.split("\\")[0].strip().strip('"')
        tail = _strip_brackets(_PRONUNCIATION.sub("", header.rsplit("\\", 1)[-1]))
        match = _GCIDE_POS_RE.match(tail)
        pos = _GCIDE_POS[match.group(1)] if match and not match.group(2) else None
        header_labels = tuple(_squash(label) for label in _LABEL.findall(tail))
        senses: list[tuple[tuple[str, ...], str]] = []
        chunk: list[str] = []
        for line in [*lines[i:], ""]:
            # A sense ends at its source tag ([1913 Webster]), at the next sense number or sub-entry, or at the end.
            if not line or _GCIDE_SOURCE.match(line) or (chunk and _SENSE_START.match(line)):
                if chunk and (sense := _gcide_sense(chunk)) is not None:
                    senses.append(sense)
                chunk = [line] if line and not _GCIDE_SOURCE.match(line) else []
            elif line.strip():
                chunk.append(line)
        entries.append((headword, _headword_key(headword), pos, header_labels, tuple(senses)))
    return tuple(entries)


def _labelled_senses(fields: Iterable[str]) -> Iterable[tuple[str, str, str]]:
    """(label, headword key, cleaned text) of the first sense of each headword that has exactly one subject label,
    one of ``fields``; the label is taken out of the text, and so is the headword."""
    fields = frozenset(fields)
    seen = set()
    for headword, key, _, header_labels, senses in _gcide():
        if len(key) < 3 or key in seen:  # "F", the note, would take every "f" out of its definition
            continue
        for own, raw in senses:
            labels = own or header_labels
            if len(labels) == 1 and labels[0] in fields:
                text = _shorten(_drop_headword(_LABEL.sub("", _gcide_clean(raw)), headword))
                if _fits(text):
                    seen.add(key)
                    yield labels[0], key, text
                    break


_POS_LABELS = ("noun", "verb", "adjective", "adverb")
_POS_TAG = re.compile(r"(?<![A-Za-z])(?:v\. ?[ti]\.|adv\.|adj\.|n\.|a\.|v\.|p\. ?p\.|p\. ?a\.|pl\.)(?=[\s,;:)]|$)")
# Webster opens nearly every verb sense with "To", adverb senses with "In a ... manner", noun senses with "A" or
# "One who": one word would decide the class. These openers go, and the model has to read the rest.
_POS_OPENERS = re.compile(
    r"(?i)(?:^|(?<=[;.] ))(?:to|in a|in an|in|of or|of|the|a|an|one who|that which|having|being)\s+|\b(?:manner|wise)\b"
)
# Nouns outnumber adverbs sixty to one; a fixed, seed-independent share of the commoner classes is plenty to sample
# from, and it saves most of the cleaning time.
_POS_THINNING = {"noun": 8, "verb": 1, "adjective": 2, "adverb": 1}


def _keep(key: str, one_in: int) -> bool:
    return zlib.crc32(key.encode()) % one_in == 0


@functools.lru_cache(maxsize=1)
def _pool_gcide_pos() -> Pool:
    seen, pool = set(), []
    for headword, key, pos, _, senses in _gcide():
        # The first entry of a headword decides: "abaft" the preposition and "abaft" the adverb are one headword.
        if key in seen or not _ALPHA_WORD.fullmatch(headword):
            continue
        seen.add(key)
        if pos is None or not senses or not _keep(key, _POS_THINNING[pos]):
            continue
        parts: list[str] = []
        for _, raw in senses[:3]:
            parts.append(_gcide_clean(raw))
            if sum(len(p.split()) for p in parts) >= MAX_WORDS:
                break
        text = _drop_headword(" ".join(parts), headword)
        # Twice: "In a manner to show" loses "In a" and "manner", and then "to".
        text = _shorten(_tidy(_POS_TAG.sub("", _POS_OPENERS.sub("", _tidy(_POS_OPENERS.sub("", text))))))
        if _fits(text):
            pool.append((text, _POS_LABELS.index(pos), key))
    return _POS_LABELS, pool


_FIELDS = {"Bot.": "botany", "Zool.": "zoology", "Chem.": "chemistry", "Med.": "medicine", "Anat.": "anatomy",
           "Naut.": "nautical", "Law": "law", "Mus.": "music"}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _pool_gcide_field() -> Pool:
    labels = tuple(_FIELDS.values())
    pool = [(text, labels.index(_FIELDS[field]), key) for field, key, text in _labelled_senses(_FIELDS)]
    return labels, pool


# ---------------------------------------------------------------------------------------------- FOLDOC and Jargon

# FOLDOC's subject tags that mean computing proper. Mathematics, people, companies and humour stay out, and so do
# FOLDOC's copies of Jargon File entries: the Jargon File itself is read.
_COMPUTING_TAGS = frozenset({
    "programming", "language", "networking", "operating system", "hardware", "storage", "database", "processor",
    "tool", "web", "architecture", "protocol", "security", "software", "algorithm", "library", "application",
    "data", "file format", "file system", "compiler", "communications", "messaging", "graphics", "computer",
})  # fmt: skip
_DATE = re.compile(r"\(\d{4}-\d\d-\d\d\)")
_FOLDOC_TAG = re.compile(r"\s*(?:\d+\.\s*)?<([^>]+)>\s*")
_USAGE_NOTES = re.compile(r"^\s*(?:\d+\.\s*)?(?:\[[^\]]*\]\s*)*")  # the Jargon File's [techspeak], [IBM]
_LINK = re.compile(r"\{([^}|]*)\|[^}]*\}")
_URL = re.compile(r"\(https?://[^)]*\)|https?://\S+|<[^>]*@[^>]*>")
_BRACKETED = re.compile(r"\[[^\]]*\]")
_QUOTES = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'"})


def _dict_body(entry: str) -> tuple[str, str, list[str]]:
    """(headword, first paragraph of the definition, subject tags) of a FOLDOC or Jargon File entry."""
    lines = entry.split("\n")
    paragraphs, current = [], []
    for line in lines[1:]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    # The Jargon File's first line under the headword is pronunciation and part of speech ("/bler'gl/, n.").
    paragraphs = [p for p in paragraphs if len(p.split()) >= 5 and not _DATE.fullmatch(p)]
    if not paragraphs:
        return lines[0].strip(), "", []
    body, tags = paragraphs[0], []
    while m := _FOLDOC_TAG.match(body):
        tags += [t.strip() for t in m.group(1).split(",")]
        body = body[m.end() :]
    return lines[0].strip(), _USAGE_NOTES.sub("", body), tags


def _dict_clean(text: str, headword: str) -> str:
    text = _LINK.sub(r"\1", text).replace("{", "").replace("}", "")
    text = _BRACKETED.sub("", _URL.sub("", text)).translate(_QUOTES)
    return _shorten(_drop_headword(text, headword))


@functools.lru_cache(maxsize=1)
def _computing_definitions() -> tuple[tuple[str, str, str], ...]:
    """(text, headword key, first FOLDOC tag or "jargon") of every usable FOLDOC and Jargon File definition."""
    out, seen = [], set()
    for path, package in ((FOLDOC, "dict-foldoc"), (JARGON, "dict-jargon")):
        for entry in _dictd_entries(path, package):
            headword, body, tags = _dict_body(entry)
            key = _headword_key(headword)
            if path == FOLDOC and ("Jargon File" in entry or not tags):
                continue
            if len(key) >= 3 and key not in seen:
                seen.add(key)
                text = _dict_clean(body, headword)
                if _fits(text):
                    out.append((text, key, tags[0] if path == FOLDOC else "jargon"))
    return tuple(out)


# The other class is GCIDE's definitions in fields close to computing in vocabulary (numbers, circuits, machines,
# printing), so that it is not told apart by being about plants or ships.
_TECHNICAL_FIELDS = (
    "Math.", "Elec.", "Mach.", "Mech.", "Physics", "Geom.", "Astron.", "Opt.", "Print.", "Engin.", "Arith.", "Alg.",
    "Teleg.", "Photog.", "Steam Engine", "Railroad", "Mining", "Metal.", "Logic",
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _pool_computing_term() -> Pool:
    pool = [(text, 1, key) for text, key, tag in _computing_definitions() if tag in _COMPUTING_TAGS or tag == "jargon"]
    computing = {key for _, _, key in pool}
    pool += [(text, 0, key) for _, key, text in _labelled_senses(_TECHNICAL_FIELDS) if key not in computing]
    return ("general technical", "computing"), pool


_FOLDOC_TOPICS = {
    "language": "programming language", "networking": "networking", "hardware": "hardware",
    "operating system": "operating system", "programming": "programming", "storage": "storage",
}  # fmt: skip
# A topic's own word ("language", "network") gives it away as a subject label does in GCIDE.
_FOLDOC_TOPIC_WORDS = re.compile(r"(?i)\b(?:languages?|network(?:s|ing)?|hardware|operating systems?|storage)\b")


@functools.lru_cache(maxsize=1)
def _pool_foldoc_topic() -> Pool:
    labels = tuple(_FOLDOC_TOPICS.values())
    pool = []
    for text, key, tag in _computing_definitions():
        if tag in _FOLDOC_TOPICS:
            cleaned = _tidy(_FOLDOC_TOPIC_WORDS.sub("", text))
            if _fits(cleaned):
                pool.append((cleaned, labels.index(_FOLDOC_TOPICS[tag]), key))
    return labels, pool


# ------------------------------------------------------------------------------------------------------------ KJV

_BOOK_GROUPS = (
    ("law", "Genesis Exodus Leviticus Numbers Deuteronomy"),
    ("history", "Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther"),
    ("poetry and wisdom", "Job Psalms Proverbs Ecclesiastes Song_of_Solomon"),
    ("prophets", "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk "
                 "Zephaniah Haggai Zechariah Malachi"),
    ("gospels and acts", "Matthew Mark Luke John Acts"),
    ("epistles and revelation", "Romans 1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians "
                                "1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James "
                                "1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation"),
)  # fmt: skip
_BOOK_GROUP = {book.replace("_", " "): g for g, (_, books) in enumerate(_BOOK_GROUPS) for book in books.split()}
_OLD_TESTAMENT_GROUPS = 4
# Names that tell at once which testament or book a verse is from. Verses that have one are left out (taking the
# name out would leave "every man of  went up"): the wording of the rest has to tell.
_KJV_NAMES = re.compile(
    r"\b(?:Jesus|Christ|Moses|Israel|Jerusalem|Judah|David|Paul|Peter|Simon|Pharisees?|Apostles?|Gentiles?|Egypt|"
    r"Jacob|Abraham|Aaron|Saul|Solomon|Zion|Babylon|Philistines?|Levites?)(?:'s)?\b"
)
_CHAPTER = re.compile(r"(\S.*?) (\d+)")
_VERSE = re.compile(r"\s+(\d+) (.*)")


@functools.lru_cache(maxsize=1)
def _kjv() -> tuple[tuple[str, str, int], ...]:
    """Every usable verse as (text, "Book chapter", book group), dumped by bible-kjv's bible program (bible.data is
    in the program's own compressed format)."""
    _require(BIBLE_DATA, "bible-kjv-text")
    program = shutil.which("bible") or (str(BIBLE_PROGRAM) if BIBLE_PROGRAM.is_file() else None)
    if program is None:
        raise _missing(BIBLE_PROGRAM, "bible-kjv")
    dump = subprocess.run(
        [program, "-m", "8192", "-l", "100000", "Ge1:1-Re22:21"],
        check=True,
        capture_output=True,
        text=True,
        errors="replace",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    ).stdout
    verses, chapter, seen_books = [], None, set()
    for line in dump.splitlines():
        if m := _CHAPTER.fullmatch(line):
            chapter = m.group(1), m.group(2)
            seen_books.add(m.group(1))
        elif (m := _VERSE.fullmatch(line)) and chapter is not None and chapter[0] in _BOOK_GROUP:
            text = _shorten(m.group(2).strip())
            if _fits(text) and not _KJV_NAMES.search(m.group(2)):
                verses.append((text, " ".join(chapter), _BOOK_GROUP[chapter[0]]))
    if set(_BOOK_GROUP) - seen_books or len(verses) < 15000:
        raise RuntimeError(f"the quality benchmark's text suite: {program} did not dump the whole KJV Bible "
                           f"({len(verses)} verses)")
    return tuple(verses)


@functools.lru_cache(maxsize=1)
def _pool_kjv_testament() -> Pool:
    return ("old testament", "new testament"), [(t, int(g >= _OLD_TESTAMENT_GROUPS), c) for t, c, g in _kjv()]


@functools.lru_cache(maxsize=1)
def _pool_kjv_book_group() -> Pool:
    return tuple(name for name, _ in _BOOK_GROUPS), [(t, g, c) for t, c, g in _kjv()]


# ------------------------------------------------------------------------------------------------------- man pages

_MAN_SECTIONS = (
    ("system calls", ("2",)),
    ("library functions", ("3",)),
    ("special files", ("4",)),
    ("file formats", ("5",)),
    ("overviews and conventions", ("7",)),
    ("commands", ("1", "8")),
)
# Sections of a page that are lists, code or boilerplate rather than prose.
_MAN_SKIP = frozenset({"NAME", "SYNOPSIS", "LIBRARY", "SEE ALSO", "COLOPHON", "ATTRIBUTES", "AUTHORS", "AUTHOR",
                       "COPYRIGHT", "REPORTING BUGS", "STANDARDS", "CONFORMING TO", "HISTORY", "VERSIONS"})  # fmt: skip
_GROFF_CHARS = {
    "em": " - ", "en": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "bu": "", "co": "(c)",
    "mu": "x", "<=": "<=", ">=": ">=", "->": "->", "ti": "~", "ha": "^", "rs": "\\", "ga": "`", "hy": "-",
    "pl": "+", "mi": "-", "eq": "=", "or": "|", "sl": "/", "tm": "(tm)", "de": " degrees",
}  # fmt: skip
_GROFF_DROP = re.compile(
    r"\\f(?:\(..|\[[^\]]*\]|.)|\\\*(?:\(..|\[[^\]]*\]|.)|\\[sn][+-]?(?:\(..|\[[^\]]*\]|\d)|\\[hvwlLoxbDNRSXZ]'[^']*'"
    r"|\\[&|^%:c)/,!]"
)
_GROFF_CHAR = re.compile(r"\\\((..)|\\\[([^\]]*)\]")
_GROFF_COMMENT = re.compile(r"\\\".*")
_MACRO_ARG = re.compile(r'"[^"]*"?|\S+')
_SECTION_REF = re.compile(r"(?<=[\w)])\(\d[a-z]*\)")
_MAN_FILE = re.compile(r"/usr/share/man/man\d/[^/]+\.(\d)\w*\.gz")


def _groff_inline(text: str) -> str:
    text = _GROFF_DROP.sub("", text)
    text = _GROFF_CHAR.sub(lambda m: _GROFF_CHARS.get(m.group(1) or m.group(2), ""), text)
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ").replace("\\0", " ")
    return text.replace("\\", "")


def _macro_args(args: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in _MACRO_ARG.findall(args)]


def _man_paragraphs(source: str) -> list[str]:
    """The prose paragraphs of a man page's groff source, as plain text."""
    paragraphs: list[str] = []
    current: list[str] = []
    heading, skip_block, skip_next = "", False, False

    def flush() -> None:
        if current and heading not in _MAN_SKIP:
            paragraphs.append(_squash(_groff_inline(" ".join(current))))
        current.clear()

    for line in source.replace("\\\n", "").split("\n"):
        if '\\"' in line:
            line = _GROFF_COMMENT.sub("", line)
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro in ("SH", "SS"):
                flush()
                if macro == "SH":
                    heading = _squash(_groff_inline(" ".join(_macro_args(args)))).upper()
            elif macro in ("PP", "P", "LP", "IP", "HP", "sp", "TP", "TQ", "RS", "RE", "in"):
                flush()
                skip_next = macro in ("TP", "TQ")  # the next line is an item's tag: an option, a constant, an errno
            elif macro in ("nf", "EX", "TS", "EQ"):
                flush()
                skip_block = True
            elif macro in ("fi", "EE", "TE", "EN"):
                skip_block = False
            elif macro in ("B", "I", "SM", "SB", "BR", "IR", "RB", "BI", "IB", "RI") and not skip_block:
                if skip_next:
                    skip_next = False
                else:
                    # .BR read (2) alternates fonts with no space between: read(2).
                    current.append((" " if macro in ("B", "I", "SM", "SB") else "").join(_macro_args(args)))
            elif skip_next and macro:
                skip_next = False
        elif skip_block:
            continue
        elif not line.strip():
            flush()
        elif skip_next:
            skip_next = False
        else:
            current.append(line)
    flush()
    return paragraphs


def _man_files() -> list[tuple[str, Path]]:
    """(section, file) of every page the two man-pages packages install, from dpkg's lists of their files: other
    packages put pages in the same directories, and which they are differs from machine to machine."""
    files = []
    for package in MAN_PACKAGES:
        listing = DPKG_INFO / f"{package}.list"
        if not listing.is_file():
            raise _missing(listing, package)
        for line in sorted(listing.read_text().splitlines()):
            if m := _MAN_FILE.fullmatch(line.strip()):
                files.append((m.group(1), Path(line.strip())))
    present = [(section, path) for section, path in files if path.is_file()]
    if len(present) < len(files) // 2:
        raise _missing(
            "/usr/share/man/man2/*.2.gz",
            "manpages-dev",
            " (dpkg lists its pages but they are not on disk: does /etc/dpkg/dpkg.cfg.d path-exclude /usr/share/man?)",
        )
    return present


@functools.lru_cache(maxsize=1)
def _pool_man_section() -> Pool:
    section_label = {s: i for i, (_, sections) in enumerate(_MAN_SECTIONS) for s in sections}
    pool, seen = [], set()
    for section, path in _man_files():
        # An alias is a symbolic link to the page it shares (prlimit64.2 -> getrlimit.2): read that page once.
        real = path.resolve()
        if section not in section_label or real in seen:
            continue
        seen.add(real)
        source = gzip.decompress(real.read_bytes()).decode("utf-8", errors="replace")
        if source.lstrip().startswith(".so "):
            continue  # an alias written as an include of the page it shares
        page = f"{real.name.split('.')[0]}.{section}"
        for paragraph in _man_paragraphs(source):
            # "read(2)" names the section outright; "read" is an ordinary reference.
            text = _shorten(_squash(_SECTION_REF.sub("", paragraph)))
            if _fits(text) and sum(c.isalpha() for c in text) > 0.6 * len(text):
                pool.append((text, section_label[section], page))
    return tuple(name for name, _ in _MAN_SECTIONS), pool


# ----------------------------------------------------------------------------------------------------- splitting

_POOLS: dict[str, Callable[[], Pool]] = {
    "gcide_pos": _pool_gcide_pos,
    "gcide_field": _pool_gcide_field,
    "computing_term": _pool_computing_term,
    "kjv_testament": _pool_kjv_testament,
    "kjv_book_group": _pool_kjv_book_group,
    "man_section": _pool_man_section,
    "foldoc_topic": _pool_foldoc_topic,
}
_GCIDE_SOURCE_LINE = "dict-gcide: /usr/share/dictd/gcide.dict.dz (GCIDE 0.48, Webster 1913 + WordNet 1.5); GPL-2+"
_KJV_SOURCE_LINE = "bible-kjv-text: /usr/lib/bible.data via bible-kjv's bible (King James Version, 1611); public domain"
_SOURCES = {
    "gcide_pos": _GCIDE_SOURCE_LINE,
    "gcide_field": _GCIDE_SOURCE_LINE,
    "computing_term": "dict-foldoc, dict-jargon, dict-gcide: /usr/share/dictd/{foldoc,jargon,gcide}.dict.dz; FOLDOC "
    "GFDL-1.1+, Jargon File 4.4.7 public domain, GCIDE GPL-2+",
    "kjv_testament": _KJV_SOURCE_LINE,
    "kjv_book_group": _KJV_SOURCE_LINE,
    "man_section": "manpages, manpages-dev: /usr/share/man/man{1,2,3,4,5,7,8}/*.gz (Linux man-pages 6.03); mostly "
    "Linux-man-pages-copyleft, some pages GPL-2+, BSD or MIT",
    "foldoc_topic": "dict-foldoc: /usr/share/dictd/foldoc.dict.dz (FOLDOC 2023-01-19); GFDL-1.1+",
}
# The most examples one group gives a split, so that a split is not a few chapters or man pages read end to end.
# A class with few groups (29 pages of special files) may take more, as many as fill its quota.
_PER_GROUP = {"kjv_testament": 2, "kjv_book_group": 2, "man_section": 4}

Example = tuple[str, int, str]


@functools.cache
def _grouped(name: str) -> tuple[tuple[str, ...], tuple[dict[str, list[Example]], ...]]:
    """The pool of a task by class and group, without the texts found twice (whatever their labels: their copies
    could land in two splits) and the groups that span two classes. It does not depend on the seed."""
    labels, items = _POOLS[name]()
    normal = [_NOT_ALNUM.sub(" ", text.lower()).strip() for text, _, _ in items]
    counts = Counter(normal)
    group_labels: dict[str, set[int]] = defaultdict(set)
    for _, label, group in items:
        group_labels[group].add(label)
    by_label: tuple[dict[str, list[Example]], ...] = tuple({} for _ in labels)
    for item, key in zip(items, normal):
        if counts[key] == 1 and len(group_labels[item[2]]) == 1:
            by_label[item[1]].setdefault(item[2], []).append(item)
    for groups in by_label:
        for members in groups.values():
            members.sort()
    return labels, by_label


def _split(name: str, seed: int, sizes: tuple[int, ...]) -> tuple[list[list[Example]], dict[str, int]]:
    labels, by_label = _grouped(name)
    rng = random.Random(f"{name}:{seed}")
    available = {labels[k]: sum(map(len, groups.values())) for k, groups in enumerate(by_label)}
    quota = [size // len(labels) for size in sizes]
    chosen: list[list[list[Example]]] = []  # [label][split]
    for groups in by_label:
        per_group = max(_PER_GROUP.get(name, 1), -(-3 * sum(quota) // max(1, 2 * len(groups))))
        keys = sorted(groups)
        rng.shuffle(keys)
        splits: list[list[Example]] = [[] for _ in sizes]
        for key in keys:
            behind = [s for s in range(len(sizes)) if len(splits[s]) < quota[s]]
            if not behind:
                break
            # The split furthest behind its quota takes the next group, so that every split draws on many groups.
            s = min(behind, key=lambda s: (len(splits[s]) / quota[s], s))
            members = groups[key]
            take = min(per_group, quota[s] - len(splits[s]), len(members))
            splits[s] += [members[j] for j in sorted(rng.sample(range(len(members)), take))]
        chosen.append(splits)
    out = []
    for s in range(len(sizes)):
        n = min(len(chosen[label][s]) for label in range(len(labels)))  # the scarcest class sets the count
        split = [item for label in range(len(labels)) for item in chosen[label][s][:n]]
        rng.shuffle(split)
        out.append(split)
    return out, available


def make_text_tasks(
    seed: int, *, n_train: int, n_val: int, n_test: int, names: tuple[str, ...] = TASK_NAMES
) -> list[Task]:
    """The named text tasks (TASK_NAMES, or any of those and EXTRA_TASK_NAMES), split and sampled by ``seed``.

    ``Task.extra`` holds each split's groups ("groups": headword keys, "Book chapter" or "page.section", parallel to
    the examples) and how many examples each class had to draw on ("available_per_class"). Raises RuntimeError,
    naming the Debian package to install, when a source is missing."""
    unknown = [name for name in names if name not in _POOLS]
    if unknown:
        raise ValueError(f"unknown text task(s) {', '.join(unknown)}; known: {', '.join(_POOLS)}")
    tasks = []
    for name in names:
        (train, val, test), available = _split(name, seed, (n_train, n_val, n_test))
        splits = {"train": train, "val": val, "test": test}
        examples = {split: [{"text": t, "label": label} for t, label, _ in items] for split, items in splits.items()}
        tasks.append(
            Task(
                name=name,
                labels=_grouped(name)[0],
                train=examples["train"],
                val=examples["val"],
                test=examples["test"],
                source=_SOURCES[name],
                extra={
                    "groups": {split: [group for *_, group in items] for split, items in splits.items()},
                    "available_per_class": available,
                },
            )
        )
    return tasks
