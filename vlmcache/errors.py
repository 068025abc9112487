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


def checked_params(what: str, given: dict, defaults: dict) -> dict:
    """`given` with every string value converted to the type of its default (pydantic's lax coercion: "1.5" to
    a float, "true" / "no" to a bool); an unknown key or a value that does not convert is an error.

    Values may be strings from the command line (`--loss-param gamma=1.5`); values that are not strings (from a
    pipeline's YAML) are kept as they are.
    """
    from pydantic import TypeAdapter, ValidationError

    out = {}
    for key, value in given.items():
        if key not in defaults:
            choices = ", ".join(defaults) if defaults else "(none)"
            raise VlmcacheError(f"The {what} has no parameter '{key}'; its parameters: {choices}.")
        default = defaults[key]
        if isinstance(value, str) and not isinstance(default, str) and default is not None:
            try:
                value = TypeAdapter(type(default)).validate_python(value)
            except ValidationError:
                raise VlmcacheError(
                    f"The {what} parameter {key}={value!r} is not a {type(default).__name__}."
                ) from None
        out[key] = value
    return out


def parse_key_values(values: list[str] | None, option: str) -> dict[str, str]:
    """`["gamma=2", "beta=0.99"]` -> `{"gamma": "2", "beta": "0.99"}`."""
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VlmcacheError(f"{option} takes KEY=VALUE (for example gamma=2), got '{item}'.")
        out[key.strip()] = value.strip()
    return out
