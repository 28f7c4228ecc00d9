"""One exception type for every problem a user can fix, and the helpers that word its message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MergeError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits non-zero."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, else the list of valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid: {', '.join(valid)})" if valid else ""
