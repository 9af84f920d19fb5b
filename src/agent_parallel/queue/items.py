"""Work items: parsing `.agent/queue/NNN-STATUS-slug.md` files into validated `WorkItem`s.

`parse_item` is pure (a file name and its text in, an item and diagnostics out); `QueueReader`
does the I/O, refuses what must not be read (symlinks out of the workspace, huge, binary or
non-UTF-8 files) and caches parsed items by file name, size, timestamps and inode (comparing
the bytes of a file changed within a clock tick), so re-planning an unchanged queue of
thousands of items reads no file twice and never serves a stale parse.

Front matter of the usual shape (``key: value`` lines, ``[a, b]`` lists) is read by hand, exactly
as PyYAML would read it; anything else goes to PyYAML (see `_simple_front_matter`).

Both syntaxes are read: YAML front matter, and the origin project's bold label lines in the body
(``**BlockedBy**: 001, 002 (after the UI)``). Field names are matched ignoring case, ``_``, ``-``
and spaces, so ``BlockedBy``, ``blockedBy``, ``blocked_by`` and ``Blocked By`` are one field.
Where both syntaxes give a field, the front matter wins. Nothing here raises for a bad file:
every problem becomes a `Diagnostic` naming the file and the field.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import threading
import time
from bisect import bisect_left
from functools import cache, lru_cache
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, cast

import yaml
from pydantic import BaseModel, ConfigDict

from ..config import alias_problem, parse_duration, parse_size, unknown_key_warning, yaml_int
from ..errors import QueueError
from ..fields import omitted_if_none
from ..text import HugeNumber, cut, describe, short_repr
from ..paths import IS_DIRECTORY, NOT_REGULAR, resolve_inside
from .names import ID_HELP, MAX_ID_DIGITS, ItemName, Status, parse_item_ref, parse_name
from .names import format_id as format_id  # (what the planner, the run and the tools import from here)
from .watch import DirectoryWatch

Priority = Literal["critical", "high", "medium", "low"]
PRIORITIES: tuple[str, ...] = ("critical", "high", "medium", "low")

MAX_ITEM_BYTES = 1024 * 1024
"""Item files above this size are refused: an item is a page of markdown, not a data file."""

WARNING_KINDS = frozenset({"status_mismatch", "unknown_field", "no_files", "config", "stale_claim", "overlap_assumed",
                           "long_title"})
"""Diagnostic kinds that are warnings; every other kind is an error that stops the item."""

MAX_TITLE_CHARS = 300
"""A longer title (its front matter, or the body's first heading) is cut to this, with a ``long_title``
warning: the title goes into every plan row, run report line and ``AGENT_ITEM_TITLE``, and an item file
may be a megabyte (a cloned repository's queue made a plan answer of 2.8 MB of titles)."""


class Diagnostic(BaseModel):
    """One problem found in the queue: what kind, which item and file, and what to do about it."""

    model_config = ConfigDict(frozen=True)

    kind: str
    item: str | None = None
    file: str | None = None
    message: str
    path: list[str] | None = omitted_if_none("a cycle's items, in order (cycles only)")

    @property
    def is_error(self) -> bool:
        """Errors make the item (and what waits on it) not ready; warnings only inform."""
        return self.kind not in WARNING_KINDS


class WorkItem(BaseModel):
    """One queue item as parsed from its file; the file name alone decides id and status."""

    model_config = ConfigDict(frozen=True)

    id: int
    id_str: str
    file: str
    path: str
    slug: str
    status: Status
    title: str
    blocked_by: list[int] = []
    blocks: list[int] = []
    files: list[str] = []
    components: list[str] = []
    priority: Priority = "medium"
    estimate_s: float | None = None
    command: str | None = None
    timeout_s: float | None = None
    isolation: Literal["none", "worktree"] | None = None
    """The item's own ``isolation`` (None: ``runner.isolation`` in the config decides)."""
    resources: dict[str, float] = {}
    """What it needs of a cluster node, in Ray's names (``CPU``, ``GPU``, ``memory`` in bytes, custom
    ones): used by ``--executor ray`` only."""
    retries: int | None = None
    """How often to run the item again after a failure (None: ``runner.retries`` decides)."""
    body: str = ""

    def runs_isolated(self, default: str) -> bool:
        """THE isolation rule: its own ``isolation`` if it has one, else ``default`` (``runner.isolation``)."""
        return (self.isolation or default) == "worktree"


_Model = TypeVar("_Model", bound=BaseModel)


@cache
def _all_fields(model: type[BaseModel]) -> set[str]:
    """Every field name of ``model``: one set per model, shared by its `trusted` rows."""
    return set(model.model_fields)


def trusted(model: type[_Model], values: dict[str, Any]) -> _Model:
    """``model(**values)`` for `values` that hold every field, each of its declared type, built
    without validating them again: what `BaseModel.model_construct` does, without its Python loop
    over the fields. For the rows the planner makes by the ten thousand (items, plan rows), whose
    values are typed by construction; `tests/test_plan_speed_equivalence.py` checks them against
    validated twins. Not for a model with private attributes or a post-init hook.

    Its ``model_fields_set`` is every field, one set shared by all rows of ``model`` (a set of twenty
    names per row was 1-2 KB of each item a server keeps)."""
    row = model.__new__(model)
    object.__setattr__(row, "__dict__", values)
    object.__setattr__(row, "__pydantic_fields_set__", _all_fields(model))
    object.__setattr__(row, "__pydantic_extra__", None)
    object.__setattr__(row, "__pydantic_private__", None)
    return row


def parse_file_name(file_name: str) -> ItemName | Diagnostic:
    """Split ``007-pending-add-login.md`` into its parts (`names.parse_name`), or a ``bad_name``
    diagnostic saying exactly what is wrong with it."""
    name = parse_name(file_name)
    if isinstance(name, ItemName):
        return name
    return Diagnostic(kind="bad_name", item=name.id_str, file=file_name, message=name.message)


# --- fields --------------------------------------------------------------------------------------

FIELDS: tuple[str, ...] = ("title", "status", "blocked_by", "blocks", "files", "components",
                           "priority", "estimate", "command", "timeout", "isolation", "resources", "retries")
_ALIASES = {
    "title": "title", "status": "status",
    "blockedby": "blocked_by", "dependson": "blocked_by", "dependencies": "blocked_by",
    "blocks": "blocks", "files": "files", "components": "components", "priority": "priority",
    "estimate": "estimate", "command": "command", "timeout": "timeout", "isolation": "isolation",
    "resources": "resources",
    "retries": "retries",
}


@lru_cache(maxsize=1024)
def field_name(key: str) -> str | None:
    """The canonical field a front-matter key or bold label means, or None for an unknown one."""
    return _ALIASES.get(re.sub(r"[\s_\-]", "", key).lower())


_LABEL = re.compile(r"[ \t]*(?:[-*+][ \t]+)?\*\*[ \t]*([A-Za-z][A-Za-z _\-]*?)[ \t]*(?::[ \t]*\*\*|\*\*[ \t]*:)[ \t]*(.*)")
_BULLET = re.compile(r"[ \t]*[-*+][ \t]+(.+)")
_HEADING = re.compile(r"#[ \t]+(.+?)[ \t#]*")
_FENCE = re.compile(r"[ \t]*(```|~~~)")


def _body_fields(body: str) -> tuple[dict[str, tuple[str, object]], str | None]:
    """Bold label lines (``**Files**: a.py, b.py``) and the first ``# `` heading, outside code fences.

    Returns {field: (label as written, value)} and the heading. A label with nothing after the
    colon takes the bullet lines right below it as a list.
    """
    fields: dict[str, tuple[str, object]] = {}
    heading: str | None = None
    if "**" not in body and "#" not in body:  # no label and no heading: nothing to find
        return fields, heading
    lines = body.split("\n")
    in_fence = False
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if heading is None and line.startswith("#"):
            match = _HEADING.fullmatch(line)
            if match:
                heading = match.group(1)
                continue
        if "**" not in line:
            continue
        match = _LABEL.fullmatch(line)
        if not match:
            continue
        name = field_name(match.group(1))
        if name is None or name in fields:
            continue
        value: object = match.group(2).strip()
        if value == "":
            bullets = []
            while index < len(lines) and (bullet := _BULLET.fullmatch(lines[index])):
                bullets.append(bullet.group(1).strip())
                index += 1
            value = bullets
        fields[name] = (match.group(1), value)
    return fields, heading


class _ItemLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # the C loader where libyaml is built in: a base chosen at import time
    """Safe YAML that reads ``010`` as ten (not YAML 1.1 octal eight), ``1:30`` as text and a number
    of more than 4,300 digits as a `HugeNumber` (see `config.yaml_int`)."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    return yaml_int(str(loader.construct_scalar(node)).replace("_", ""), octal=False)


_DECIMAL = re.compile(r"[-+]?[0-9]+")
_ItemLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

_FRONT_START = re.compile(r"---[ \t]*\n")
_FRONT_END = re.compile(r"^(?:---|\.\.\.)[ \t]*$", re.MULTILINE)
_FRONT_CLOSE = re.compile(r"\n(?:---|\.\.\.)[ \t]*$", re.MULTILINE)
"""`_FRONT_END` with the line break before it, searched for from the one ending the ``---`` line: the same
line found (its start one past the match's), by a search that skips to each line break instead of trying
every character."""


def _front_matter(text: str) -> tuple[dict[str, Any] | None, str, str | None]:
    """Split ``---`` front matter from the body: (mapping or None, body, problem or None)."""
    start = _FRONT_START.match(text)
    if not start:
        return None, text, None
    end = _FRONT_END.search(text, start.end())
    if not end:
        return None, text, "front matter starts with --- on line 1 but has no closing --- line"
    source = text[start.end():end.start()]
    body = text[end.end() + 1:]
    fast = _simple_front_matter(source)
    if fast is not None:
        return fast, body, None
    problem = alias_problem(source, _ItemLoader)
    if problem:
        return None, body, f"front matter {problem}"
    try:
        data = yaml.load(source, Loader=_ItemLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 2}, column {mark.column + 1})" if mark else ""
        return None, body, f"front matter is not valid YAML: {exc.problem}{where}"
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        return None, body, f"front matter is not valid YAML: {short_repr(str(exc), 200)}"
    if data is None:
        return None, body, None
    if not isinstance(data, dict):
        return None, body, f"front matter must be a mapping of fields (key: value lines), not {describe(data)}"
    return data, body, None


# The front matter agents write is a few ``key: value`` lines: plain words, quoted text, numbers and
# ``[a, b]`` lists. `_simple_front_matter` reads exactly that subset by hand, giving the mapping
# PyYAML (with `_ItemLoader`) gives, at a fraction of the cost: the C parser is fast, but PyYAML
# resolves and constructs every node in Python. Whatever it is not sure of (block or nested
# collections, comments after a value, anchors, tags, escapes, floats, dates, tabs, control or
# line-break characters, ...) goes to the full loader, so results and error messages are the
# loader's. `tests/test_plan_speed_equivalence.py` compares both on generated front matter.

_SIMPLE_TEXT = re.compile("[\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]*")
"""Characters every YAML reader takes literally: printable, no tab, no line break (U+0085, U+2028,
U+2029), no byte-order mark."""
_PLAIN_START_BAD = frozenset("-?:,[]{}#&*!|>'\"%@` ")
"""Indicators that may not (or not always) start a plain scalar."""
_FLOW_PLAIN_BAD = re.compile(r"[,\[\]{}:#'\"]")
_FLOW_INNER_BAD = re.compile(r"[\[\]{}:#]")
"""`_FLOW_PLAIN_BAD` less what a list of plain items, split on its commas and free of quotes, cannot hold."""
_PLAIN_INT = r"(?:[1-9][0-9]{0,99}|0[0-7]{0,99})"
"""ASCII digits YAML 1.1 resolves to an int (``08`` is text: not octal), read by `_ItemLoader` as
`int` does (``010`` is ten), and not a `HugeNumber` (the loader says why a huge one fails)."""
_PLAIN_INT_TEXT = re.compile(_PLAIN_INT)
_FLOW_INTS = re.compile(f" *{_PLAIN_INT} *(?:, *{_PLAIN_INT} *)*")
_SINGLE_QUOTED = re.compile(r"'((?:[^']|'')*)'")
_DOUBLE_QUOTED = re.compile(r'"([^"\\]*)"')
_FLOW_ITEM = re.compile(r""" *(?:'((?:[^']|'')*)'|"([^"\\]*)"|([^,\[\]{}:#'" ](?:[^,\[\]{}:#'"]*[^,\[\]{}:#'" ])?)) *(,|$)""")
_STR_TAG = "tag:yaml.org,2002:str"
_NOT_SIMPLE = object()
"""A value `_simple_scalar` leaves to the full loader."""


def _simple_front_matter(source: str) -> dict[Any, Any] | None:
    """The mapping of ``key: value`` lines as `_ItemLoader` reads it, or None to use the loader."""
    data: dict[Any, Any] = {}
    memo = _LINE_MEMO
    for line in source.split("\n"):
        entry = memo.get(line)
        if entry is None:
            entry = _line_entry(line)
        if entry is _NOT_SIMPLE:
            return None
        if entry is not _BLANK:
            value = entry[3]  # (a `_LineEntry`: indexed, not unpacked through `cast`, a call per line)
            data[entry[2]] = list(value) if type(value) is tuple else value
    return data or None


_BLANK = object()
"""A line that holds no entry: empty, spaces only, or a comment."""
_LineEntry = tuple[str | None, Any, str, Any]
"""A ``key: value`` line read: (attribute, converted, key, value). ``value`` is the YAML value (a list
kept as a tuple); ``attribute`` and ``converted`` are what `_usual_item` makes of it (see `_usual_field`)."""
_LINE_MEMO: dict[str, Any] = {}
"""Line -> its `_LineEntry`, `_BLANK` or `_NOT_SIMPLE` (immutable: a list is kept as a tuple): the same
lines (``priority: high``, ``estimate: 30m``, a shared file) come back item after item."""
_MEMO_CHARS = 200
"""Longer lines and scalars are not memoized."""
_MEMO_ENTRIES = 50_000
"""Entries a memo holds before it starts afresh (a 10,000-item queue fits: its ids, paths and titles)."""


def _remember(memo: dict[str, object], text: str, value: object) -> object:
    """``value``, kept in ``memo`` for ``text`` when the text is short (the memo starts afresh once full)."""
    if len(text) <= _MEMO_CHARS:
        if len(memo) >= _MEMO_ENTRIES:
            memo.clear()
        memo[text] = value
    return value


def _line_entry(line: str) -> Any:  # (a `_LineEntry` or a marker: indexed once the markers are ruled out)
    """`_simple_line` with the field the line gives read too (`_usual_field`), kept in `_LINE_MEMO`."""
    parsed = _simple_line(line)
    if type(parsed) is tuple:  # not a marker: a (key, value) pair
        key, value = parsed
        parsed = (*_usual_field(key, value), key, value)
    if len(line) <= _MEMO_CHARS:  # (`_remember`, inline: a call per new line of the queue)
        if len(_LINE_MEMO) >= _MEMO_ENTRIES:
            _LINE_MEMO.clear()
            _SCALAR_MEMO.clear()  # (the lists' items of these lines: started afresh with them)
        _LINE_MEMO[line] = parsed
    return parsed


def _simple_line(line: str) -> object:
    """One line of simple front matter: (key, value), `_BLANK`, or `_NOT_SIMPLE`."""
    if not line.strip(" "):
        return _BLANK
    if line[0] == "#":  # a comment: blank, unless it holds what YAML refuses anywhere (the loader says so)
        return _BLANK if _SIMPLE_TEXT.fullmatch(line) else _NOT_SIMPLE
    key, colon, rest = line.partition(":")
    if not colon or (rest and rest[0] != " ") or not _simple_key(key):
        return _NOT_SIMPLE
    value = rest.strip(" ")
    if not value:
        return key, None
    first = value[0]
    if first == "[":
        parsed = _simple_flow_list(value[1:-1]) if value[-1] == "]" else None
        return _NOT_SIMPLE if parsed is None else (key, tuple(parsed))
    if first == "'":
        quoted = _SINGLE_QUOTED.fullmatch(value)
        if not quoted or not _SIMPLE_TEXT.fullmatch(value):
            return _NOT_SIMPLE
        return key, quoted.group(1).replace("''", "'")
    if first == '"':
        quoted = _DOUBLE_QUOTED.fullmatch(value)
        if not quoted or not _SIMPLE_TEXT.fullmatch(value):
            return _NOT_SIMPLE
        return key, quoted.group(1)
    if (first in _PLAIN_START_BAD or " #" in value or ": " in value or value[-1] == ":"
            or not _SIMPLE_TEXT.fullmatch(value)):
        return _NOT_SIMPLE
    scalar = _simple_scalar_uncached(value)  # (the line is memoized: its value rarely comes again apart from it)
    return _NOT_SIMPLE if scalar is _NOT_SIMPLE else (key, scalar)


@lru_cache(maxsize=256)
def _simple_key(key: str) -> bool:
    """Whether `key` is a plain scalar YAML reads as this very text (not a bool, null, number, ...)."""
    return bool(key and key[0] not in _PLAIN_START_BAD and key[-1] != " " and "#" not in key and len(key) <= 128
                and _SIMPLE_TEXT.fullmatch(key) and _resolve(key) == _STR_TAG)


def _simple_flow_list(inner: str) -> list[Any] | None:
    """The items of ``[a, 'b', 3]`` (without its brackets), or None to use the loader."""
    if not inner.strip(" "):
        return []
    if _FLOW_INTS.fullmatch(inner):  # ``[7, 12, 013]``: item ids, read by `int` without a look at each
        return list(map(int, inner.split(",")))
    if not _SIMPLE_TEXT.fullmatch(inner):
        return None
    values: list[Any] = []
    if "'" not in inner and '"' not in inner:  # plain items only: split on the commas
        if _FLOW_INNER_BAD.search(inner):
            return None  # an item the loader must read (the same characters `_FLOW_PLAIN_BAD` finds in one)
        for part in inner.split(","):
            plain = part.strip(" ")
            if not plain or plain[0] in _PLAIN_START_BAD:
                return None  # an empty item (a trailing comma), or one the loader must read
            scalar = _simple_scalar(plain)
            if scalar is _NOT_SIMPLE:
                return None
            values.append(scalar)
        return values
    position = 0
    while position < len(inner):
        match = _FLOW_ITEM.match(inner, position)
        if not match or match.end() == position:
            return None
        single, double, plain, comma = match.groups()
        if single is not None:
            values.append(single.replace("''", "'"))
        elif double is not None:
            values.append(double)
        else:
            if plain[0] in _PLAIN_START_BAD or _FLOW_PLAIN_BAD.search(plain):
                return None
            scalar = _simple_scalar(plain)
            if scalar is _NOT_SIMPLE:
                return None
            values.append(scalar)
        position = match.end()
        if not comma:
            break
        if position == len(inner):
            return None  # a trailing comma: the loader decides
    return values if position == len(inner) else None


def _resolve(text: str) -> str:
    """The tag YAML gives a plain scalar: `_ItemLoader`'s own implicit resolvers, in their order."""
    for tag, pattern in _IMPLICIT.get(text[:1], ()):
        if pattern.match(text):
            return str(tag)
    return _STR_TAG


_IMPLICIT: dict[str, list[tuple[str, re.Pattern[str]]]] = {
    first: list(resolvers) for first, resolvers in _ItemLoader.yaml_implicit_resolvers.items() if first is not None}
if None in _ItemLoader.yaml_implicit_resolvers:  # pragma: no cover - PyYAML has no wildcard resolver
    raise ImportError("PyYAML with a wildcard implicit resolver: update items._resolve")


def _simple_scalar(text: str) -> object:
    """A plain scalar's value as `_ItemLoader` constructs it, or `_NOT_SIMPLE` for the loader."""
    found = _SCALAR_MEMO.get(text, _SCALAR_MEMO)
    if found is _SCALAR_MEMO:
        found = _remember(_SCALAR_MEMO, text, _simple_scalar_uncached(text))
    return found


_SCALAR_MEMO: dict[str, object] = {}
"""Plain scalar -> its value (immutable: text, int, bool or None): ids and paths repeat across items."""


def _simple_scalar_uncached(text: str) -> object:
    if text[:1] not in _IMPLICIT:
        return text  # no implicit resolver for its first character: text (what `_resolve` finds)
    if _PLAIN_INT_TEXT.fullmatch(text):
        return int(text)  # (what the int resolver and `_construct_int` make of it, in one step)
    tag = _resolve(text)
    if tag == _STR_TAG:
        return text
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        return yaml.SafeLoader.bool_values[text.lower()]
    if tag == "tag:yaml.org,2002:int":
        digits = text.replace("_", "")
        if _DECIMAL.fullmatch(digits):
            return int(digits, 10) if len(digits) <= 100 else _NOT_SIMPLE  # the loader says why a huge one fails
        if ":" in digits:
            return digits
    return _NOT_SIMPLE


_NONE_WORDS = frozenset({"", "none", "-", "n/a", "na", "nothing", "[]"})
_ASIDE = re.compile(r"(?:^|(?<=\s))\([^)]*\)")
_ID_SEPARATORS = re.compile(r"[,;\s&]+|\band\b")
_MAX_ID = 10 ** MAX_ID_DIGITS
_PARENTHESES = re.compile(r"\([^)]*\)")
_SEPARATORS = re.compile(r"[,;]+")
_SPACES_AND_SEPARATORS = re.compile(r"[,;\s]+")
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
_STATUS_SEPARATORS = re.compile(r"[\s\-]+")
"""(Compiled once: ``re.sub`` and the like look each pattern up in a cache on every call.)"""


def _ids(field: str, value: object, problems: list[str]) -> list[int]:
    """Item references: a YAML list, or text split on commas and spaces; ``(asides)`` ignored."""
    if value is None or value is False:
        return []
    if isinstance(value, (str, int, HugeNumber)) and not isinstance(value, bool):
        parts: list[object] = [value]
    elif isinstance(value, list):
        parts = value
    else:
        problems.append(f"{field} must be a list of item ids or a comma-separated string, not {describe(value)}")
        return []
    ids: dict[int, None] = {}  # (in order, each once)
    for part in parts:
        if type(part) is int and 0 <= part < _MAX_ID:  # what parse_item_ref(str(part)) gives, without the text
            ids[part] = None
            continue
        if isinstance(part, HugeNumber):
            problems.append(f"{field}: {part!r} cannot be an item id (an id has at most {MAX_ID_DIGITS} digits)")
            continue
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            problems.append(f"{field}: {short_repr(part)} is not an item id ({ID_HELP})")
            continue
        if isinstance(part, int):
            tokens = [str(part)]
        else:
            cleaned = _PARENTHESES.sub(" ", part).strip()
            tokens = [] if cleaned.lower() in _NONE_WORDS else [t for t in _ID_SEPARATORS.split(cleaned) if t]
        for token in tokens:
            try:
                item_id = parse_item_ref(token)
            except ValueError as exc:
                problems.append(f"{field}: {exc}")
                continue
            ids[item_id] = None
    return list(ids)


def _names(field: str, value: object, problems: list[str], *, split_spaces: bool) -> list[str]:
    """A list of names or paths: a YAML list, or text split on commas (and spaces for paths)."""
    if value is None:
        return []
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, (str, int, float)) and not isinstance(part, bool):
                parts.append(str(part).strip().strip("`'\""))
            else:
                problems.append(f"{field}: each entry must be a string, not {describe(part)}")
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = _ASIDE.sub(" ", str(value)).strip()
        if text.lower() in _NONE_WORDS:
            return []
        pattern = _SPACES_AND_SEPARATORS if split_spaces else _SEPARATORS
        parts = [part.strip().strip("`'\"") for part in pattern.split(text)]
    else:
        problems.append(f"{field} must be a list of strings or a comma-separated string, not {describe(value)}")
        return []
    names: dict[str, None] = {}  # (in order, each once: `in` on a list made 60,000 entries take 17 s)
    for part in parts:
        if "\x00" in part:
            problems.append(f"{field}: {short_repr(part)} contains a NUL character (\\0); remove it")
        elif part:
            names[part] = None
    return list(names)


@lru_cache(maxsize=4096)
def normalize_file_entry(entry: str) -> str | None:
    """A `files` entry as a clean workspace-relative path or glob, or None if it points outside."""
    if entry.startswith("/") or _DRIVE.match(entry):
        return None
    clean = posixpath.normpath(entry.replace("\\", "/"))
    if clean == ".." or clean.startswith("../"):
        return None
    return clean


def _files(value: object, problems: list[str]) -> list[str]:
    files: dict[str, None] = {}  # (in order, each once)
    for entry in _names("files", value, problems, split_spaces=True):
        clean = normalize_file_entry(entry)
        if clean is None:
            problems.append(f"files: {short_repr(entry)} is outside the workspace; "
                            f"give paths relative to the workspace root")
        else:
            files[clean] = None
    return list(files)


def _text(field: str, value: object, problems: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list, HugeNumber)):
        problems.append(f"{field} must be a string, not {describe(value)}")
        return None
    text = str(value).strip()
    if "\x00" in text:
        problems.append(_nul_problem(field))
        return None
    return text or None


def _short_title(title: str, report: Callable[[str, str], None]) -> str:
    if len(title) <= MAX_TITLE_CHARS:
        return title
    report("long_title", f"the title is {len(title):,} characters; it is cut to {MAX_TITLE_CHARS} wherever it is shown "
                         "(the plan, the run's report, AGENT_ITEM_TITLE): give a short title and put the rest in the body")
    return cut(title, MAX_TITLE_CHARS)


def _nul_problem(field: str) -> str:
    """A NUL cannot reach a process (an argument or environment value ends at it): refuse it here."""
    return (f"{field} contains a NUL character (\\0), which cannot be passed to a process "
            f"(the item's title and command are); remove it")


def _priority(value: object, problems: list[str]) -> Priority:
    if value is None:
        return "medium"
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text not in PRIORITIES:
        problems.append(f"priority: {short_repr(value)} is not one of {', '.join(PRIORITIES)}")
        return "medium"
    return cast(Priority, text)  # checked against PRIORITIES above


def _isolation(value: object, problems: list[str]) -> Literal["none", "worktree"] | None:
    if value is None:
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in ("none", "worktree"):
        problems.append(f"isolation: {short_repr(value)} is not none or worktree")
        return None
    return "worktree" if text == "worktree" else "none"


_RESOURCE_NAMES = {"cpu": "CPU", "cpus": "CPU", "numcpus": "CPU", "gpu": "GPU", "gpus": "GPU", "numgpus": "GPU",
                   "memory": "memory", "mem": "memory"}
_CUSTOM_RESOURCE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,63}", re.ASCII)
MAX_RESOURCE_AMOUNT = 1e6


def _resources(value: object, problems: list[str]) -> dict[str, float]:
    """``{num_cpus: 2, GPU: 1, memory: 4GiB, my_res: 1}`` (a bold label line may write it as
    ``num_cpus: 2, GPU: 1``), in Ray's names: CPU, GPU, memory (bytes) and custom resources."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        try:  # (the item loader: ``1:59:59:...`` or 0x and 5,000 digits must not be built here either)
            value = yaml.load(text if text.startswith("{") else "{" + text + "}", Loader=_ItemLoader)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
            value = text
    if not isinstance(value, dict):
        problems.append(f"resources must be a mapping such as {{num_cpus: 2, GPU: 1}}, not {describe(value)}")
        return {}
    found: dict[str, float] = {}
    for key, amount in value.items():
        spelled = re.sub(r"[\s_\-]", "", str(key)).lower()
        name = _RESOURCE_NAMES.get(spelled, str(key))
        if name not in _RESOURCE_NAMES.values() and (not _CUSTOM_RESOURCE.fullmatch(name) or spelled == "agentslot"
                                                    or name.startswith("node:")):
            problems.append(f"resources: {short_repr(key)} is not a resource name (num_cpus, GPU, memory, or a custom "
                            f"resource of the cluster; agent_slot is set by agent-parallel)")
            continue
        if name == "memory" and isinstance(amount, str):
            try:
                amount = parse_size(amount)
            except ValueError as exc:
                problems.append(f"resources: memory: {exc}")
                continue
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0 <= amount <= (
                MAX_RESOURCE_AMOUNT if name != "memory" else 1 << 50):
            problems.append(f"resources: {name} must be a number from 0 to {MAX_RESOURCE_AMOUNT:g}"
                            f"{' (or a size such as 4GiB)' if name == 'memory' else ''}, not {short_repr(amount)}")
            continue
        found[name] = float(amount)
    return found


MAX_RETRIES = 100


def _retries(value: object, problems: list[str]) -> int | None:
    """``retries: N``, 0..``MAX_RETRIES`` (a bare number in a bold line arrives as text)."""
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else None
    number = value if isinstance(value, int) and not isinstance(value, bool) else (
        int(text) if text is not None and text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 9 else None)
    if number is None or not 0 <= number <= MAX_RETRIES:
        problems.append(f"retries: {short_repr(value)} is not a whole number from 0 to {MAX_RETRIES}")
        return None
    return number


def _seconds(field: str, value: object, problems: list[str], *, allow_zero: bool) -> float | None:
    if value is None:
        return None
    seconds = _duration(value) if type(value) is str else _duration_uncached(value)
    if isinstance(seconds, str):
        problems.append(f"{field}: {seconds}")
        return None
    if seconds == 0 and not allow_zero:
        problems.append(f"{field} must be longer than 0")
        return None
    return seconds


def _duration_uncached(value: object) -> float | str:
    """`parse_duration`'s seconds, or the text of its ValueError."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        return str(exc)


_duration = lru_cache(maxsize=1024)(_duration_uncached)
"""`_duration_uncached` for text, kept: a queue spells its estimates a few ways (``5m``, ``1h``, ...)."""


def _command(value: object, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"command must be a string (one shell command line), not {describe(value)}")
        return None
    command = value.strip()
    if "\x00" in command:
        problems.append(_nul_problem("command"))
        return None
    if len(command) >= 2 and command[0] == command[-1] == "`" and "`" not in command[1:-1]:
        command = command[1:-1].strip()
    return command or None


def _status_word(value: object) -> str:
    return _STATUS_SEPARATORS.sub("_", str(value).strip().lower())


# --- one item ------------------------------------------------------------------------------------


def stub_item(name: ItemName, file_name: str, path: str | None = None) -> WorkItem:
    """An item known only from its file name, for files whose content could not be used."""
    return WorkItem(id=name.id, id_str=name.id_str, file=file_name, path=path or file_name,
                    slug=name.slug, status=name.status, title=name.slug)


def parse_item(file_name: str, text: str, *, path: str | None = None) -> tuple[WorkItem | None, list[Diagnostic]]:
    """Parse one item file. Returns no item only when the file name itself is invalid.

    Problems in the content come back as diagnostics on a still-returned item, so the planner can
    show the item and keep everything that waits on it from running.
    """
    name = parse_file_name(file_name)
    if isinstance(name, Diagnostic):
        return None, [name]
    return _parse_named(name, file_name, text, path)


def _parse_named(name: ItemName, file_name: str, text: str, path: str | None) -> tuple[WorkItem, list[Diagnostic]]:
    """`parse_item` for a file name already parsed."""
    if "\r\n" in text or text.startswith("\ufeff"):
        text = text.lstrip("\ufeff").replace("\r\n", "\n")
    usual = _usual_item(name, file_name, text, path)
    if usual is not None:
        return usual
    diagnostics: list[Diagnostic] = []

    def report(kind: str, message: str) -> None:
        diagnostics.append(Diagnostic(kind=kind, item=name.id_str, file=file_name, message=message))

    front, body, problem = _front_matter(text)
    if problem:
        report("bad_front_matter", problem)
    body_fields, heading = _body_fields(body)
    fields = {field: value for field, (_, value) in body_fields.items()}
    from_front: dict[str, str] = {}
    if front:
        for key, value in front.items():
            field = field_name(key if type(key) is str else str(key))
            if field is None:
                report("unknown_field", unknown_key_warning("front matter field ", key, list(FIELDS)))
            elif field in from_front:
                report("bad_field", f"{field} is given twice in the front matter (as {from_front[field]} and {key}); "
                                    f"keep one")
            else:
                from_front[field] = str(key)
                fields[field] = value

    problems: list[str] = []
    get = fields.get
    # Every value below has its field's declared type by construction (each converter returns
    # exactly that, or reports a problem and returns the default), so the row is not validated again.
    values: dict[str, object] = {"id": name.id, "id_str": name.id_str, "file": file_name, "path": path or file_name,
                                 "slug": name.slug, "status": name.status}
    for field, (attribute, convert) in _CONVERTERS.items():
        values[attribute] = convert(get(field), problems)
    values["title"] = _short_title(cast(str | None, values["title"]) or heading or name.slug, report)
    values["body"] = body
    item = trusted(WorkItem, values)
    for message in problems:
        report("bad_field", message)
    if "status" in fields and _status_word(fields["status"]) != name.status:
        label = (f"front matter field {from_front['status']}" if "status" in from_front
                 else f"**{body_fields['status'][0]}** line")
        report("status_mismatch",
               f"the {label} says {short_repr(fields['status'])} but the file name says "
               f"{name.status!r}; the file name is what counts (rename the file to change the status)")
    return item, diagnostics


# The usual item file: simple front matter whose every line gives a field without a problem (or an
# unknown one, a warning), no field given twice, no bold label lines. `_usual_item` reads it with each
# distinct line's field already converted (kept in `_LINE_MEMO`: ``priority: high`` is read once per
# queue, not once per item), skipping the field dictionaries and the converters of absent fields. It
# gives what the full path below gives: `tests/test_queue_parse_fast.py` compares the two.

_CONVERTERS: dict[str, tuple[str, Callable[[object, list[str]], object]]] = {
    "title": ("title", lambda value, problems: _text("title", value, problems)),
    "blocked_by": ("blocked_by", lambda value, problems: _ids("blocked_by", value, problems)),
    "blocks": ("blocks", lambda value, problems: _ids("blocks", value, problems)),
    "files": ("files", _files),
    "components": ("components", lambda value, problems: _names("components", value, problems, split_spaces=False)),
    "priority": ("priority", _priority),
    "estimate": ("estimate_s", lambda value, problems: _seconds("estimate", value, problems, allow_zero=True)),
    "command": ("command", _command),
    "timeout": ("timeout_s", lambda value, problems: _seconds("timeout", value, problems, allow_zero=False)),
    "isolation": ("isolation", _isolation),
    "resources": ("resources", _resources),
    "retries": ("retries", _retries),
}
"""Field -> the `WorkItem` attribute it sets and what converts its value (reporting problems), in the order
`_parse_named` converts them (the order of their problems). `_usual_item` takes every one but ``resources``,
whose value is a mutable mapping (``status`` is no attribute: the file name says it)."""


def _usual_field(key: str, value: object) -> tuple[str | None, object]:
    """What `_usual_item` does with a front-matter line: (attribute, converted value; a list kept as a
    tuple) for a field read without a problem, (``"status"``, the status word), (None, the
    ``unknown_field`` warning) for an unknown key, or (``""``, None): the item takes the full path."""
    if type(value) is tuple:
        value = list(value)  # what the full path converts
    field = field_name(key)
    if field is None:
        return None, unknown_key_warning("front matter field ", key, list(FIELDS))
    if field == "status":
        return "status", _status_word(value)
    conversion = _CONVERTERS.get(field)
    if conversion is None or field == "resources":
        return "", None
    attribute, convert = conversion
    problems: list[str] = []
    converted = convert(value, problems)
    if problems:
        return "", None
    return attribute, tuple(converted) if type(converted) is list else converted


def _usual_item(name: ItemName, file_name: str, text: str, path: str | None,
                ) -> tuple[WorkItem, list[Diagnostic]] | None:
    """`_parse_named` for the usual item file, or None for any other (the full path reads it)."""
    start = _FRONT_START.match(text)
    if start is None:
        return None
    end = _FRONT_CLOSE.search(text, start.end() - 1)
    if end is None:
        return None
    body = text[end.end() + 1:]
    heading = None
    if "**" in body or "#" in body:
        body_fields, heading = _body_fields(body)
        if body_fields:
            return None
    found: dict[str, Any] = {}
    unknown: list[_LineEntry] | None = None
    memo = _LINE_MEMO
    for line in text[start.end():end.start()].split("\n"):  # (to the closing line's break: no blank last line)
        entry = memo.get(line)
        if entry is None:
            entry = _line_entry(line)
        if entry is _BLANK:
            continue
        if entry is _NOT_SIMPLE:
            return None
        attribute, converted = entry[0], entry[1]  # (a `_LineEntry`, not a marker)
        if attribute:
            if attribute in found:
                return None  # a field given twice: the full path says so (or, one key twice, takes the last)
            found[attribute] = list(converted) if type(converted) is tuple else converted  # (each item its own list)
        elif attribute is None:
            if unknown is None:
                unknown = []
            unknown.append(entry)
        else:
            return None
    if not found and unknown is None:
        return None  # only blank lines and comments: the loader decides
    if found.pop("status", name.status) != name.status:
        return None  # the status_mismatch warning
    diagnostics: list[Diagnostic] = []
    if unknown is not None:
        if len({entry[2] for entry in unknown}) != len(unknown):
            return None  # one unknown key twice: one warning
        diagnostics = [Diagnostic(kind="unknown_field", item=name.id_str, file=file_name, message=entry[1])
                       for entry in unknown]
    values = {
        "id": name.id, "id_str": name.id_str, "file": file_name, "path": path or file_name, "slug": name.slug,
        "status": name.status, "title": None, "blocked_by": [], "blocks": [], "files": [], "components": [],
        "priority": "medium", "estimate_s": None, "command": None, "timeout_s": None, "isolation": None,
        "resources": {}, "retries": None, "body": body,
    }
    values.update(found)
    if values["title"] is None:
        values["title"] = heading or name.slug
    if len(cast(str, values["title"])) > MAX_TITLE_CHARS:
        return None  # the long_title warning
    return trusted(WorkItem, values), diagnostics


# --- reading a directory -------------------------------------------------------------------------

RACY_NS = 2_000_000_000
"""A file changed this recently (ns, before a read started) may change again without its size or
timestamps showing it: file timestamps come from a coarse clock (a kernel tick; a second or two on
some file systems), so two writes within one tick leave the same mtime and ctime. Such a file's
bytes are kept and compared on the next read instead of trusting its stat (as git does for
"racily clean" files)."""


class _Parsed(NamedTuple):
    """A cache entry: the file's identity when parsed, and what parsing gave (a tuple: one per file).

    `raw` holds the file's bytes when its identity could not be trusted yet (see `RACY_NS`).
    """

    identity: object
    item: WorkItem | None
    diagnostics: tuple[Diagnostic, ...]
    raw: bytes | None = None


@dataclass(frozen=True, eq=False)
class QueueSnapshot:
    """A queue directory as parsed at one moment.

    The reader hands out the same snapshot for as long as no file in the directory changes, so
    what is computed from it can be kept in `memo` and reused (a re-plan of an unchanged queue).
    A new snapshot names the snapshot it follows (`base`, its own `base` dropped) and the files
    whose parse changed since (`changes`: file name -> (before, after), None where the file was
    not there), so a planner can redo only what those changes touch.
    """

    directory: Path
    items: tuple[WorkItem, ...]
    diagnostics: tuple[Diagnostic, ...]
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    base: QueueSnapshot | None = field(default=None, repr=False, compare=False)
    changes: dict[str, tuple[tuple[WorkItem | None, tuple[Diagnostic, ...]] | None,
                             tuple[WorkItem | None, tuple[Diagnostic, ...]] | None]] | None = field(
        default=None, repr=False, compare=False)


class _NamedEntry:
    """What `QueueReader._read_one` needs of an `os.DirEntry`, for a name a watch reported changed."""

    __slots__ = ("name", "path", "_mode")

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path
        try:
            self._mode: int | None = os.lstat(path).st_mode
        except OSError:
            self._mode = None

    @property
    def missing(self) -> bool:
        return self._mode is None

    def is_symlink(self) -> bool:
        return self._mode is not None and stat.S_ISLNK(self._mode)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._mode is not None and stat.S_ISREG(self._mode)  # (lstat: never followed)


class _Order:
    """A snapshot's items and diagnosed files in file-name order, kept so that a few changed files are
    spliced in (a bisection each) instead of sorting and walking every name: a status change in a queue
    of 10,000 files makes its snapshot in well under a millisecond, not some 12 ms."""

    __slots__ = ("item_names", "items", "diagnosed")

    def __init__(self, current: dict[str, _Parsed]) -> None:
        ordered = sorted(current)
        self.item_names = [name for name in ordered if current[name].item is not None]
        self.items = [cast(WorkItem, current[name].item) for name in self.item_names]
        self.diagnosed = [name for name in ordered if current[name].diagnostics]

    def splice(self, names: list[str], current: dict[str, _Parsed]) -> None:
        """Bring the order up to date with `current` for these names (changed, added or gone)."""
        for name in names:
            parsed = current.get(name)
            item = parsed.item if parsed is not None else None
            at = bisect_left(self.item_names, name)
            present = at < len(self.item_names) and self.item_names[at] == name
            if item is not None and present:
                self.items[at] = item
            elif item is not None:
                self.item_names.insert(at, name)
                self.items.insert(at, item)
            elif present:
                del self.item_names[at], self.items[at]
            at = bisect_left(self.diagnosed, name)
            present = at < len(self.diagnosed) and self.diagnosed[at] == name
            if parsed is not None and parsed.diagnostics and not present:
                self.diagnosed.insert(at, name)
            elif (parsed is None or not parsed.diagnostics) and present:
                del self.diagnosed[at]


_SPLICE_AT_MOST = 64
"""Changed files spliced into the kept order; more than this and it is built again."""


_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK
"""How an item file is opened: a FIFO put in its place cannot make the open wait."""


class ReadStopped(QueueError):
    """A `QueueReader.snapshot` given a ``stop`` that said True: nothing of the read was kept."""


_STOP_EVERY = 256
"""Files read between two looks at a snapshot's ``stop`` (some 30 ms of parsing)."""


class QueueReader:
    """Reads queue directories, re-parsing only files whose name, size, timestamps or inode changed.

    One reader per server: it keeps one cache per queue directory it has read, holding only the
    files seen on the latest read. A file is known by its name (a status change is a rename) and
    its ``(size, mtime_ns, ctime_ns, inode, target)``; one changed within `RACY_NS` of a read is
    also compared byte for byte on the next, so the cache never serves a stale parse. Where the
    kernel can say which files changed (`watch.DirectoryWatch`), only those are looked at: an
    unchanged queue costs no stat at all. ``close`` stops the watches.
    `parse_count` counts files actually parsed, for tests and benchmarks. Reads are serialized by
    a lock, so the reader can be shared between threads.
    """

    def __init__(self, max_item_bytes: int = MAX_ITEM_BYTES, *, watch: bool = True) -> None:
        self.max_item_bytes = max_item_bytes
        self.watch = watch  # False: never watch a directory (a reader used once, like the CLI's plan)
        self.parse_count = 0
        self._cache: dict[Path, tuple[dict[str, _Parsed], QueueSnapshot]] = {}
        self._orders: dict[Path, _Order] = {}  # the cached snapshot's order, per directory (see _Order)
        self._watches: dict[Path, DirectoryWatch] = {}  # directories whose changes the kernel reports
        self._links: dict[Path, set[str]] = {}  # names reached through a symlink, per directory: always looked at
        self._lock = threading.Lock()

    def read(self, root: Path, queue_dir: Path | str) -> tuple[list[WorkItem], list[Diagnostic]]:
        """All items of `queue_dir` and the diagnostics of its files, in file-name order.

        See `snapshot` for the arguments and errors.
        """
        snapshot = self.snapshot(root, queue_dir)
        return list(snapshot.items), list(snapshot.diagnostics)

    def snapshot(self, root: Path, queue_dir: Path | str, *,
                 stop: Callable[[], bool] | None = None) -> QueueSnapshot:
        """The parsed queue in `queue_dir` (relative to `root`, or absolute inside it).

        Raises `PathOutsideWorkspace` when the directory resolves outside `root`, and
        `QueueError` when it does not exist or is not a directory. Per-file problems are
        diagnostics, never exceptions. Returns the previous snapshot object if nothing changed.
        `stop` (for work nobody waits on, like `plan.prepare_plan`): checked before anything starts
        and every `_STOP_EVERY` files; once it says True the read ends with `ReadStopped`, keeping
        nothing it read.
        """
        root = root.resolve()
        directory = resolve_inside(root, queue_dir, "queue_dir")
        if not directory.exists():
            raise QueueError(f"queue directory {str(queue_dir)!r} does not exist ({directory}); create it "
                             f"and add one NNN-STATUS-slug.md file per work item, or pass another queue_dir")
        if not directory.is_dir():
            raise QueueError(f"queue_dir {str(queue_dir)!r} is not a directory ({directory})")
        relative_dir = directory.relative_to(root).as_posix()
        with self._lock:
            if stop is not None and stop():
                raise ReadStopped("the queue read was stopped before it began")
            previous, last_snapshot = self._cache.get(directory, ({}, None))
            watch = self._watches.get(directory)
            names = watch.changed() if watch is not None and last_snapshot is not None else None
            if watch is not None and names is not None and last_snapshot is not None:
                snapshot = self._update(root, directory, relative_dir, names, previous, last_snapshot)
                watch.settle(names)
                return snapshot
            if watch is not None:  # it can no longer tell: read everything, under a new watch
                watch.close()
                del self._watches[directory]
            if self.watch and (watch := DirectoryWatch.start(directory)) is not None:  # before the read: it sees every later change
                self._watches[directory] = watch
            current: dict[str, _Parsed] = {}
            racy_after = time.time_ns() - RACY_NS
            try:
                with os.scandir(directory) as listing:
                    entries = [entry for entry in listing if entry.name.endswith(".md") and entry.name[0] != "."]
            except OSError as exc:
                raise QueueError(f"queue directory {str(queue_dir)!r} cannot be listed: {exc.strerror}") from exc
            changed = last_snapshot is None
            changed_names: list[str] = []
            links: set[str] = set()
            for index, entry in enumerate(entries):
                if stop is not None and index % _STOP_EVERY == 0 and stop():
                    raise ReadStopped(f"the queue read was stopped after {index} of {len(entries)} files")
                name = entry.name
                cached = previous.get(name)
                if entry.is_symlink():
                    links.add(name)
                elif cached is not None and cached.raw is None:
                    # the usual case, inline: a file known and trusted, unchanged if its stat says so
                    try:
                        info = os.stat(entry.path)
                    except OSError:
                        info = None
                    if (info is not None and not stat.S_ISDIR(info.st_mode) and cached.identity == (
                            info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, entry.path)):
                        current[name] = cached
                        continue
                parsed = self._read_one(root, entry, relative_dir, cached, racy_after)
                if parsed is not None:
                    current[name] = parsed
                    if not _same_parse(parsed, cached):
                        changed = True
                        changed_names.append(name)
            self._links[directory] = links
            if not changed and len(current) == len(previous) and last_snapshot is not None:
                self._cache[directory] = (current, last_snapshot)  # entries no longer racy are kept as such
                return last_snapshot
            return self._new_snapshot(directory, current, previous, last_snapshot, changed_names)

    def _update(self, root: Path, directory: Path, relative_dir: str, names: set[str],
                previous: dict[str, _Parsed], last_snapshot: QueueSnapshot) -> QueueSnapshot:
        """The snapshot after the changes a watch reported: only ``names`` (and the files reached through
        a symlink, whose edits a watch does not see) are looked at; the rest is known unchanged."""
        links = self._links.setdefault(directory, set())
        current: dict[str, _Parsed] | None = None
        changed_names: list[str] = []
        replaced: list[str] = []  # every name whose entry in `current` is new (or gone)
        racy_after = time.time_ns() - RACY_NS
        for name in sorted(names | links):
            if not name.endswith(".md") or name[0] == ".":
                continue
            cached = previous.get(name)
            entry = _NamedEntry(name, os.path.join(directory, name))
            parsed = None if entry.missing else self._read_one(root, entry, relative_dir, cached, racy_after)
            if entry.is_symlink():
                links.add(name)
            else:
                links.discard(name)
            if parsed is cached:
                continue
            if current is None:
                current = dict(previous)
            replaced.append(name)
            if parsed is None:
                del current[name]  # (it was there: parsed is not cached)
            else:
                current[name] = parsed
            if not _same_parse(parsed, cached):
                changed_names.append(name)
        if current is None:
            return last_snapshot
        if not changed_names and len(current) == len(previous):
            self._cache[directory] = (current, last_snapshot)  # the same parses (e.g. a file touched)
            return last_snapshot
        return self._new_snapshot(directory, current, previous, last_snapshot, changed_names, replaced)

    def _new_snapshot(self, directory: Path, current: dict[str, _Parsed], previous: dict[str, _Parsed],
                      last_snapshot: QueueSnapshot | None, changed_names: list[str],
                      replaced: list[str] | None = None) -> QueueSnapshot:
        """The snapshot of `current`. `replaced` (else unknown): every name whose entry differs from the
        cached snapshot's (changed, new or gone), spliced into its kept order."""
        changes = None
        if last_snapshot is not None:
            gone = ([name for name in replaced if name not in current] if replaced is not None
                    else list(previous.keys() - current.keys()))
            changes = {name: (_parse_of(previous.get(name)), _parse_of(current.get(name)))
                       for name in [*changed_names, *gone]}
            object.__setattr__(last_snapshot, "base", None)  # keep one step of history, not a chain
        order = self._orders.pop(directory, None)
        if order is not None and replaced is not None and len(replaced) <= _SPLICE_AT_MOST:
            order.splice(replaced, current)
        else:
            order = _Order(current)
        snapshot = QueueSnapshot(
            directory=directory, items=tuple(order.items),
            diagnostics=tuple(diagnostic for name in order.diagnosed for diagnostic in current[name].diagnostics),
            base=last_snapshot, changes=changes,
        )
        self._cache[directory] = (current, snapshot)
        self._orders[directory] = order
        return snapshot

    def close(self) -> None:
        """Stop the directory watches (their inotify descriptors); the reader still works, stat'ing every file."""
        with self._lock:
            for watch in self._watches.values():
                watch.close()
            self._watches.clear()

    def _read_one(self, root: Path, entry: os.DirEntry[str] | _NamedEntry, relative_dir: str, cached: _Parsed | None,
                  racy_after: int) -> _Parsed | None:
        """Parse one entry, or reuse the cached result if the file is unchanged; None skips it.

        The cache is checked first, on a single stat, so an unchanged queue costs one stat per file
        (and one read for a file changed within `RACY_NS`).
        """
        target = entry.path
        problem: tuple[str, str] | None = None
        fd = -1
        try:
            if entry.is_symlink():
                resolved = Path(entry.path).resolve(strict=True)
                target = str(resolved)
                if not resolved.is_relative_to(root):
                    problem = ("outside_workspace", f"symlink points outside the workspace root (to {resolved}); refused")
                info = None if problem else os.stat(target)
            elif cached is None and entry.is_file(follow_symlinks=False):
                # A regular file not seen before: opened at once and its stat taken from the open file,
                # one path lookup instead of two (a cold read of a 10,000-item queue: some 30 ms).
                fd = os.open(target, _READ_FLAGS)
                info = os.fstat(fd)
            else:
                info = os.stat(target)
        except (OSError, RuntimeError) as exc:
            info, problem = None, ("unreadable", f"cannot be read: {getattr(exc, 'strerror', None) or exc}")
        try:
            return self._read_known(entry, target, fd, info, problem, relative_dir, cached, racy_after)
        finally:
            if fd >= 0:
                os.close(fd)

    def _read_known(self, entry: os.DirEntry[str] | _NamedEntry, target: str, fd: int, info: os.stat_result | None,
                    problem: tuple[str, str] | None, relative_dir: str, cached: _Parsed | None,
                    racy_after: int) -> _Parsed | None:
        """`_read_one` once the file's stat is known: ``fd`` is the file opened (or -1 to open ``target``)."""
        file_name = entry.name
        identity = problem if info is None else (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino,
                                                 target)
        racy = info is not None and max(info.st_mtime_ns, info.st_ctime_ns) >= racy_after
        if cached is not None and cached.identity == identity and cached.raw is None:
            return cached
        name = parse_file_name(file_name)
        if isinstance(name, Diagnostic):
            return _Parsed(identity, None, (name,))
        if info is not None and stat.S_ISDIR(info.st_mode):
            problem = ("unreadable", IS_DIRECTORY)
        elif info is not None and not stat.S_ISREG(info.st_mode):
            problem = ("unreadable", NOT_REGULAR)
        elif info is not None and info.st_size > self.max_item_bytes:
            problem = ("too_large", self._too_large(info.st_size))
        relative = f"{relative_dir}/{file_name}"
        raw = b""
        if problem is None:
            raw, problem = self._read_bytes(target, fd, info)
        if problem is None and cached is not None and cached.raw == raw and cached.identity == identity:
            return cached if racy else _Parsed(identity, cached.item, cached.diagnostics)  # the same bytes
        text = ""
        if problem is None:
            text, problem = self._decode(raw)
        if problem is not None:
            diagnostic = Diagnostic(kind=problem[0], item=name.id_str, file=file_name, message=problem[1])
            return _Parsed(identity, stub_item(name, file_name, relative), (diagnostic,))
        self.parse_count += 1
        item, diagnostics = _parse_named(name, file_name, text, relative)
        return _Parsed(identity, item, tuple(diagnostics), raw if racy else None)

    def _read_bytes(self, target: str, fd: int = -1, info: os.stat_result | None = None,
                    ) -> tuple[bytes, tuple[str, str] | None]:
        """At most `max_item_bytes` + 1 bytes of the file, or (kind, message) saying why it cannot be read.
        ``fd``: the file already open, with ``info`` its stat (the caller closes it); otherwise it is
        opened (and closed) here."""
        opened = fd < 0
        if opened:
            try:
                fd = os.open(target, _READ_FLAGS)
            except OSError as exc:
                return b"", ("unreadable", f"cannot be read: {exc.strerror}")
        try:
            if opened or info is None:
                info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return b"", ("unreadable", NOT_REGULAR)
            # Read what the file holds, not a buffer of the whole limit (allocating a megabyte per
            # file cost more than parsing it); it may grow meanwhile, so read on to the end or the limit.
            chunks, total, limit = [], 0, self.max_item_bytes + 1
            while total < limit:
                wanted = min(limit - total, max(info.st_size + 1 - total, 65536))
                chunk = os.read(fd, wanted)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total == info.st_size and len(chunk) < wanted:
                    break  # the end, where fstat put it (had the file grown since, its stat shows it next time)
        except OSError as exc:
            return b"", ("unreadable", f"cannot be read: {exc.strerror}")
        finally:
            if opened:
                os.close(fd)
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), None

    def _decode(self, raw: bytes) -> tuple[str, tuple[str, str] | None]:
        """The file's text, or (kind, message) saying why it cannot be used."""
        if len(raw) > self.max_item_bytes:
            return "", ("too_large", self._too_large(len(raw)))
        if b"\x00" in raw:
            return "", ("binary", "file looks binary (it contains NUL bytes); a queue item must be UTF-8 markdown")
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return "", ("not_utf8", f"file is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                                    f"{exc.start}); save it as UTF-8")

    def _too_large(self, size: int) -> str:
        return (f"file is {size} bytes, over the {self.max_item_bytes}-byte limit for a queue item; "
                f"keep long material in another file and link to it")


def _same_parse(first: _Parsed | None, second: _Parsed | None) -> bool:
    """Whether two cache entries hold the same parse (the same objects: a reused entry)."""
    if first is None or second is None:
        return first is second
    return first.item is second.item and first.diagnostics is second.diagnostics


def _parse_of(parsed: _Parsed | None) -> tuple[WorkItem | None, tuple[Diagnostic, ...]] | None:
    return None if parsed is None else (parsed.item, parsed.diagnostics)
