"""Item file names and id references: the one grammar for ``007-pending-add-login.md`` and ``#7``.

Kept apart from ``items`` (which parses item files into pydantic models) and free of pydantic, so
that a process that only claims items (``claims``) imports in milliseconds rather than a third of a
second: fifty claimants racing over a queue start fifty interpreters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

from ..text import short_repr

Status = Literal["pending", "in_progress", "completed", "blocked", "failed"]
STATUSES: tuple[str, ...] = ("pending", "in_progress", "completed", "blocked", "failed")
MAX_ID_DIGITS = 9
"""Ids longer than this are refused, so every id stays an exact integer in JSON clients too."""
ID_HELP = "write ids like 007, 7 or #7"


def format_id(item_id: int) -> str:
    """The zero-padded spelling used in file names and results: 7 -> ``007``."""
    return f"{item_id:03d}"


_NAME = re.compile(r"(?P<id>[0-9]+)-(?P<status>[A-Za-z_]+)-(?P<slug>.*)\.md")
"""ASCII digits only: ``١٢٣`` is not an id (Python's ``\\d`` and ``int`` would read it as 123)."""
_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_VALID_NAME = re.compile(rf"([0-9]{{3,{MAX_ID_DIGITS}}})-({'|'.join(STATUSES)})-([a-z0-9]+(?:-[a-z0-9]+)*)\.md")
"""A valid name, all of it checked in one match (a queue of 10,000 files has 10,000 names to read); `parse_name`
says what is wrong with any other."""
_STATUS_OF: dict[str, Status] = {status: cast(Status, status) for status in STATUSES}
_new_name = object.__new__
_NAME_HELP = "NNN-STATUS-slug.md"


@dataclass(frozen=True)
class ItemName:
    """What a valid file name says: id, its zero-padded spelling, status and slug.

    `parse_name` fills a valid name's fields into its ``__dict__`` without calling ``__init__`` (which,
    frozen, sets each through ``object.__setattr__``): keep it a plain frozen dataclass, with no
    ``__post_init__`` and no ``__slots__``."""

    id: int
    id_str: str
    status: Status
    slug: str


class BadName(NamedTuple):
    """What is wrong with a file name (``items.parse_file_name`` makes it a ``bad_name`` diagnostic)."""

    id_str: str | None
    message: str


def parse_name(file_name: str) -> ItemName | BadName:
    """Split ``007-pending-add-login.md`` into its parts, or say exactly what is wrong with it."""
    valid = _VALID_NAME.fullmatch(file_name)
    if valid is not None:
        id_str, status, slug = valid.groups()
        name = _new_name(ItemName)  # (see ItemName: its fields set in their order, as __init__ sets them)
        fields = name.__dict__
        fields["id"], fields["id_str"], fields["status"], fields["slug"] = int(id_str), id_str, _STATUS_OF[status], slug
        return name
    match = _NAME.fullmatch(file_name)
    if not match:
        return BadName(None, f"file name does not match {_NAME_HELP} (NNN: 3 or more digits; STATUS: "
                             f"{status_list()}; slug: lower-case words joined by -)")
    id_str, status, slug = match.group("id", "status", "slug")
    if len(id_str) < 3:
        return BadName(id_str, f"file name does not match {_NAME_HELP}: the id must have "
                               f"at least 3 digits ({int(id_str):03d}, not {id_str})")
    if len(id_str) > MAX_ID_DIGITS:
        return BadName(id_str, f"file name does not match {_NAME_HELP}: the id has "
                               f"{len(id_str)} digits, more than the {MAX_ID_DIGITS} allowed")
    if status == "in" and slug.startswith("progress"):
        return BadName(id_str, "file name has status in-progress; write it in_progress")
    if status not in STATUSES:
        return BadName(id_str, f"file name has unknown status {status!r}; use one of {status_list()}")
    if not _SLUG.fullmatch(slug):
        return BadName(id_str, f"file name slug {slug!r} must be lower-case words joined by - "
                               f"(letters and digits only)")
    return ItemName(int(id_str), id_str, cast(Status, status), slug)  # checked against STATUSES above


def status_list() -> str:
    return ", ".join(STATUSES[:-1]) + " or " + STATUSES[-1]


_ID_TOKEN = re.compile(r"#?([0-9]+)(?:-[\w.\-]*)?")
"""One id as people write it."""


def parse_item_ref(text: str) -> int:
    """One item reference: ``007``, ``7``, ``#7`` or a file-name stem ``007-add-login``.

    The one grammar for ids written by people: `blocked_by`/`blocks`, and the `item` argument of
    the tools. ASCII digits only; at most `MAX_ID_DIGITS` digits (leading zeros aside). Raises
    ``ValueError`` saying which rule is broken.
    """
    match = _ID_TOKEN.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{short_repr(text)} is not an item id ({ID_HELP})")
    if len(match.group(1).lstrip("0") or "0") > MAX_ID_DIGITS:
        raise ValueError(f"{short_repr(text)} has more than {MAX_ID_DIGITS} digits, so it cannot be an item id")
    return int(match.group(1))
