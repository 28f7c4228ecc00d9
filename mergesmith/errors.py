"""The exceptions a user can fix, and the helpers that word their messages.

Every problem with the user's input is a ``MergeError`` (the CLI prints it as one line and exits 2); the
subclasses say which input is at fault, so that a caller can tell a bad recipe from a broken checkpoint.
Anything else that escapes is a bug in mergesmith (the CLI exits 1). Never turn a ``ValueError`` or
``RuntimeError`` from library code into a ``MergeError`` wholesale: that would hide our own bugs as the
user's mistakes.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from typing import Any


class MergeError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits 2."""


class RecipeError(MergeError):
    """The recipe: YAML syntax, unknown keys or methods, parameter types, ranges and combinations."""


class CheckpointError(MergeError):
    """A model's files: missing, not safetensors, truncated, a header that lies, an index leaving the directory."""


class StatisticsError(MergeError):
    """A statistics sidecar: missing, of another model, of the wrong kind, or holding impossible values."""


class DataError(MergeError):
    """``measure``'s data: unreadable, empty, missing fields, labels outside the model's classes."""


class OutputError(MergeError):
    """The output path: exists, unwritable, the disk is full, or it is not ours to replace."""


class UsageError(MergeError):
    """A command-line option: misspelt, missing, or out of range."""


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 40, 40, 6, 4, 3


def short(value: Any) -> str:
    """A bounded repr for error messages (a value may be a huge or aliased YAML structure)."""
    return _short.repr(value)


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, else the list of valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid: {', '.join(valid)})" if valid else ""


def human_size(n: int | float) -> str:
    """1.23 GB, 45.6 MB, 7.8 KB or 12 bytes (decimal units, as --max-shard-size reads them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= 0.1 * size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


class MergeWarning(UserWarning):
    """Something the user should know that does not stop the run (a singular Gram sum, a skipped factor);
    the CLI prints each as one ``warning:`` line."""
