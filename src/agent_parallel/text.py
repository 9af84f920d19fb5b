"""Putting values from outside (YAML, arguments, commands) into messages without flooding them.

One home for the rules every message follows: a value is named by its type when it may be huge,
shown as a cut ``repr`` when it is a scalar, long text says how much of it was cut, and a long
list of values shows its first few and counts the rest.
"""

from __future__ import annotations

from collections.abc import Sequence


def describe(value: object) -> str:
    """Name a YAML value's type for a message, without printing a possibly huge value."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def short_repr(value: object, limit: int = 60) -> str:
    """A scalar's repr cut to `limit` characters; containers are only named (they may be enormous)."""
    if isinstance(value, (dict, list, tuple, set)):
        return describe(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_few(values: Sequence[str], limit: int, *, sep: str = ", ", total: int | None = None) -> str:
    """The first ``limit`` of ``values`` joined by ``sep``, then how many more there are (``total``:
    all of them, when ``values`` holds only the first few): an error names a few of what was wrong,
    never all of it (a client may send thousands)."""
    total = len(values) if total is None else total
    shown = sep.join(values[:limit])
    return shown if total <= limit else f"{shown} (and {total - limit:,} more)"


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and a note saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [cut: {len(text) - limit:,} more characters]"
