"""Putting values from outside (YAML, arguments, commands) into messages without flooding them.

One home for the rules every message follows: a value is named by its type when it may be huge,
shown as a cut ``repr`` when it is a scalar, and long text says how much of it was cut.
"""

from __future__ import annotations


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


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and a note saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [cut: {len(text) - limit:,} more characters]"
