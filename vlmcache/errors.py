"""The one exception type for mistakes in what the user gave us."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VlmcacheError(Exception):
    """A user mistake or an unusable input. The CLI prints the message without a traceback."""


def unknown_choice(what: str, given: str, choices: Iterable[str]) -> VlmcacheError:
    """`The loss 'focall' is unknown; did you mean 'focal'? Choose one of: ce, focal, ...`."""
    choices = list(choices)
    close = difflib.get_close_matches(given, choices, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return VlmcacheError(f"The {what} '{given}' is unknown.{hint} Choose one of: {', '.join(choices)}.")
