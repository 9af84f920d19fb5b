"""Putting values from outside (YAML, arguments, commands) into messages without flooding them.

One home for the rules every message follows: a value is named by its type when it may be huge,
shown as a cut ``repr`` when it is a scalar, long text says how much of it was cut, and a long
list of values shows its first few and counts the rest. No rule here raises, whatever the value:
an integer too long for Python to turn into text is named by its number of digits.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence

MAX_INT_DIGITS = sys.int_info.default_max_str_digits
"""Digits of the longest integer shown or built from YAML (4,300): Python refuses to turn a longer
one into text (``ValueError: Exceeds the limit``), and reading one from decimal text is quadratic."""
_SHOWN_BITS = int(MAX_INT_DIGITS * math.log2(10)) - 8
"""Integers of more bits than this may have more than `MAX_INT_DIGITS` digits: counted, not shown."""


class HugeNumber:
    """An integer written with more than `MAX_INT_DIGITS` digits, as the YAML loaders read it.

    Building it could take minutes and printing it raises, so the loaders keep only its length and
    sign; no setting or field accepts it, and every message names it "a number of N digits".
    """

    __slots__ = ("digits", "negative")

    def __init__(self, digits: int, negative: bool = False) -> None:
        self.digits = digits
        self.negative = negative

    def __repr__(self) -> str:
        return f"a {'negative ' if self.negative else ''}number of {self.digits:,} digits"

    __str__ = __repr__


def digit_count(value: int) -> int:
    """How many decimal digits ``value`` has, counted without turning it into text (which raises for
    more than `MAX_INT_DIGITS` digits and is quadratic)."""
    value = abs(value)
    if value.bit_length() <= _SHOWN_BITS:
        return len(str(value))
    logarithm = math.log10(value)  # a float: only a value next to a power of ten needs checking
    digits = int(logarithm) + 1
    if logarithm - int(logarithm) < 1e-6 and value < 10 ** (digits - 1):
        digits -= 1
    elif int(logarithm) + 1 - logarithm < 1e-6 and value >= 10 ** digits:
        digits += 1
    return digits


def huge_number(value: int) -> HugeNumber | None:
    """``value`` as a `HugeNumber` when it has more than `MAX_INT_DIGITS` digits, else None."""
    if value.bit_length() <= _SHOWN_BITS:
        return None
    digits = digit_count(value)
    return HugeNumber(digits, value < 0) if digits > MAX_INT_DIGITS else None


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
    if isinstance(value, HugeNumber):
        return repr(value)
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def short_repr(value: object, limit: int = 60) -> str:
    """A scalar's repr cut to `limit` characters; containers are only named (they may be enormous)."""
    if isinstance(value, (dict, list, tuple, set)):
        return describe(value)
    if isinstance(value, int) and (huge := huge_number(value)):
        return repr(huge)  # repr() would raise (ValueError: Exceeds the limit ...)
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


_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
"""Bidirectional controls: with U+202E (RLO) ``photo<RLO>gnp.exe`` reads ``photoexe.png`` on a terminal."""
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f" + "".join(map(chr, _BIDI)) + "]")
_ESCAPES = {code: "\\r" if code == 0x0D else f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
            for code in (*range(0x20), *range(0x7F, 0xA0), *_BIDI) if code not in (0x09, 0x0A)}
_ESCAPES_IN_DOT = {code: "\\" + escape for code, escape in _ESCAPES.items()}  # dot reads a backslash in a label


def visible(text: str, *, in_dot: bool = False) -> str:
    """``text`` with its control characters (C0, DEL, C1, and the bidirectional ones) written as Python
    escapes (ESC as ``\\x1b``, RLO as ``\\u202e``), newline and tab excepted: titles, file names, commands
    and output come from a queue, a task or git, and raw on a terminal ESC, BEL or CSI (``\\x9b``) hide
    a hyperlink, retitle the window or clear the screen, and RLO reverses what follows it. The CLI
    prints every such text through this (rich cells through ``render.shown``)."""
    if _CONTROL.search(text) is None:
        return text
    return text.translate(_ESCAPES_IN_DOT if in_dot else _ESCAPES)
