"""The parser and planner as they were before the speed work of issue 11, kept as a reference.

A verbatim copy of ``queue/items.py``, ``queue/conflicts.py``, ``queue/planner.py`` and
``queue/plan.py`` at commit b51dbad (relative imports of each other removed, the rest pointed at
the package). `tests/test_plan_speed_equivalence.py` plans random queues with both and requires
every field of the results to be equal; `bench/bench_plan.py` times it as the baseline.
Do not edit it to follow later changes of the planner: it is the "before".
"""

from __future__ import annotations

import bisect
import heapq
import os
import posixpath
import re
import stat
import threading
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field

from agent_parallel.config import alias_problem, load_config, max_parallel_for, parse_duration, unknown_key_warning
from agent_parallel.errors import InternalError, QueueError, UsageError
from agent_parallel.paths import CONFIG_FILE, RUNS_DIR, resolve_inside
from agent_parallel.queue.claims import stale_claims
from agent_parallel.text import describe, short_repr


# ====================================================================================================
# queue/items.py
# ====================================================================================================
Status = Literal["pending", "in_progress", "completed", "blocked", "failed"]
Priority = Literal["critical", "high", "medium", "low"]
STATUSES: tuple[str, ...] = ("pending", "in_progress", "completed", "blocked", "failed")
PRIORITIES: tuple[str, ...] = ("critical", "high", "medium", "low")

MAX_ITEM_BYTES = 1024 * 1024
"""Item files above this size are refused: an item is a page of markdown, not a data file."""
MAX_ID_DIGITS = 9
"""Ids longer than this are refused, so every id stays an exact integer in JSON clients too."""

WARNING_KINDS = frozenset({"status_mismatch", "unknown_field", "no_files", "config", "stale_claim"})
"""Diagnostic kinds that are warnings; every other kind is an error that stops the item."""


class Diagnostic(BaseModel):
    """One problem found in the queue: what kind, which item and file, and what to do about it."""

    model_config = ConfigDict(frozen=True)

    kind: str
    item: str | None = None
    file: str | None = None
    message: str
    path: list[str] | None = None

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
    body: str = ""


def format_id(item_id: int) -> str:
    """The zero-padded spelling used in file names and results: 7 -> ``007``."""
    return f"{item_id:03d}"


# --- file names ----------------------------------------------------------------------------------

_NAME = re.compile(r"(?P<id>[0-9]+)-(?P<status>[A-Za-z_]+)-(?P<slug>.*)\.md")
"""ASCII digits only: ``١٢٣`` is not an id (Python's ``\\d`` and ``int`` would read it as 123)."""
_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_NAME_HELP = "NNN-STATUS-slug.md"


@dataclass(frozen=True)
class ItemName:
    """What a valid file name says: id, its zero-padded spelling, status and slug."""

    id: int
    id_str: str
    status: Status
    slug: str


def parse_file_name(file_name: str) -> ItemName | Diagnostic:
    """Split ``007-pending-add-login.md`` into its parts, or say exactly what is wrong with it."""
    match = _NAME.fullmatch(file_name)
    if not match:
        return _bad_name(file_name, None, f"file name does not match {_NAME_HELP} "
                         f"(NNN: 3 or more digits; STATUS: {_status_list()}; slug: lower-case words joined by -)")
    id_str, status, slug = match.group("id", "status", "slug")
    if len(id_str) < 3:
        return _bad_name(file_name, id_str, f"file name does not match {_NAME_HELP}: the id must have "
                         f"at least 3 digits ({int(id_str):03d}, not {id_str})")
    if len(id_str) > MAX_ID_DIGITS:
        return _bad_name(file_name, id_str, f"file name does not match {_NAME_HELP}: the id has "
                         f"{len(id_str)} digits, more than the {MAX_ID_DIGITS} allowed")
    if status == "in" and slug.startswith("progress"):
        return _bad_name(file_name, id_str, "file name has status in-progress; write it in_progress")
    if status not in STATUSES:
        return _bad_name(file_name, id_str, f"file name has unknown status {status!r}; use one of {_status_list()}")
    if not _SLUG.fullmatch(slug):
        return _bad_name(file_name, id_str, f"file name slug {slug!r} must be lower-case words joined by - "
                         f"(letters and digits only)")
    return ItemName(int(id_str), id_str, cast(Status, status), slug)  # checked against STATUSES above


def _bad_name(file_name: str, id_str: str | None, message: str) -> Diagnostic:
    return Diagnostic(kind="bad_name", item=id_str, file=file_name, message=message)


def _status_list() -> str:
    return ", ".join(STATUSES[:-1]) + " or " + STATUSES[-1]


# --- fields --------------------------------------------------------------------------------------

FIELDS: tuple[str, ...] = ("title", "status", "blocked_by", "blocks", "files", "components",
                           "priority", "estimate", "command", "timeout")
_ALIASES = {
    "title": "title", "status": "status",
    "blockedby": "blocked_by", "dependson": "blocked_by", "dependencies": "blocked_by",
    "blocks": "blocks", "files": "files", "components": "components", "priority": "priority",
    "estimate": "estimate", "command": "command", "timeout": "timeout",
}


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
    """Safe YAML that reads ``010`` as ten (not YAML 1.1 octal eight) and ``1:30`` as text."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    text = str(loader.construct_scalar(node)).replace("_", "")
    if _DECIMAL.fullmatch(text):
        return int(text, 10)
    if ":" in text:
        return text
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_DECIMAL = re.compile(r"[-+]?[0-9]+")
_ItemLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

_FRONT_START = re.compile(r"---[ \t]*\n")
_FRONT_END = re.compile(r"^(?:---|\.\.\.)[ \t]*$", re.MULTILINE)


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


_NONE_WORDS = frozenset({"", "none", "-", "n/a", "na", "nothing", "[]"})
_ASIDE = re.compile(r"(?:^|(?<=\s))\([^)]*\)")
_ID_TOKEN = re.compile(r"#?([0-9]+)(?:-[\w.\-]*)?")
_ID_SEPARATORS = re.compile(r"[,;\s&]+|\band\b")
ID_HELP = "write ids like 007, 7 or #7"


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


def _ids(field: str, value: object, problems: list[str]) -> list[int]:
    """Item references: a YAML list, or text split on commas and spaces; ``(asides)`` ignored."""
    if value is None or value is False:
        return []
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        parts: list[object] = [value]
    elif isinstance(value, list):
        parts = value
    else:
        problems.append(f"{field} must be a list of item ids or a comma-separated string, not {describe(value)}")
        return []
    ids: list[int] = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            problems.append(f"{field}: {short_repr(part)} is not an item id ({ID_HELP})")
            continue
        if isinstance(part, int):
            tokens = [str(part)]
        else:
            cleaned = re.sub(r"\([^)]*\)", " ", part).strip()
            tokens = [] if cleaned.lower() in _NONE_WORDS else [t for t in _ID_SEPARATORS.split(cleaned) if t]
        for token in tokens:
            try:
                item_id = parse_item_ref(token)
            except ValueError as exc:
                problems.append(f"{field}: {exc}")
                continue
            if item_id not in ids:
                ids.append(item_id)
    return ids


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
        pattern = r"[,;\s]+" if split_spaces else r"[,;]+"
        parts = [part.strip().strip("`'\"") for part in re.split(pattern, text)]
    else:
        problems.append(f"{field} must be a list of strings or a comma-separated string, not {describe(value)}")
        return []
    names: list[str] = []
    for part in parts:
        if "\x00" in part:
            problems.append(f"{field}: {short_repr(part)} contains a NUL character (\\0); remove it")
        elif part and part not in names:
            names.append(part)
    return names


def normalize_file_entry(entry: str) -> str | None:
    """A `files` entry as a clean workspace-relative path or glob, or None if it points outside."""
    if entry.startswith("/") or re.match(r"[A-Za-z]:[\\/]", entry):
        return None
    clean = posixpath.normpath(entry.replace("\\", "/"))
    if clean == ".." or clean.startswith("../"):
        return None
    return clean


def _files(value: object, problems: list[str]) -> list[str]:
    files: list[str] = []
    for entry in _names("files", value, problems, split_spaces=True):
        clean = normalize_file_entry(entry)
        if clean is None:
            problems.append(f"files: {short_repr(entry)} is outside the workspace; "
                            f"give paths relative to the workspace root")
        elif clean not in files:
            files.append(clean)
    return files


def _text(field: str, value: object, problems: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        problems.append(f"{field} must be a string, not {describe(value)}")
        return None
    text = str(value).strip()
    if "\x00" in text:
        problems.append(_nul_problem(field))
        return None
    return text or None


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


def _seconds(field: str, value: object, problems: list[str], *, allow_zero: bool) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        problems.append(f"{field}: {exc}")
        return None
    if seconds == 0 and not allow_zero:
        problems.append(f"{field} must be longer than 0")
        return None
    return seconds


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
    return re.sub(r"[\s\-]+", "_", str(value).strip().lower())


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
    diagnostics: list[Diagnostic] = []

    def report(kind: str, message: str) -> None:
        diagnostics.append(Diagnostic(kind=kind, item=name.id_str, file=file_name, message=message))

    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    front, body, problem = _front_matter(text)
    if problem:
        report("bad_front_matter", problem)
    body_fields, heading = _body_fields(body)
    fields = {field: value for field, (_, value) in body_fields.items()}
    labels = {field: f"**{label}** line" for field, (label, _) in body_fields.items()}
    from_front: dict[str, str] = {}
    for key, value in (front or {}).items():
        field = field_name(str(key))
        if field is None:
            report("unknown_field", unknown_key_warning("front matter field ", key, list(FIELDS)))
        elif field in from_front:
            report("bad_field", f"{field} is given twice in the front matter (as {from_front[field]} and {key}); "
                                f"keep one")
        else:
            from_front[field] = str(key)
            fields[field] = value
            labels[field] = f"front matter field {key}"

    problems: list[str] = []
    title = _text("title", fields.get("title"), problems) or heading or name.slug
    item = WorkItem(
        id=name.id, id_str=name.id_str, file=file_name, path=path or file_name, slug=name.slug,
        status=name.status, title=title,
        blocked_by=_ids("blocked_by", fields.get("blocked_by"), problems),
        blocks=_ids("blocks", fields.get("blocks"), problems),
        files=_files(fields.get("files"), problems),
        components=_names("components", fields.get("components"), problems, split_spaces=False),
        priority=_priority(fields.get("priority"), problems),
        estimate_s=_seconds("estimate", fields.get("estimate"), problems, allow_zero=True),
        command=_command(fields.get("command"), problems),
        timeout_s=_seconds("timeout", fields.get("timeout"), problems, allow_zero=False),
        body=body,
    )
    for message in problems:
        report("bad_field", message)
    if "status" in fields and _status_word(fields["status"]) != name.status:
        report("status_mismatch",
               f"the {labels['status']} says {short_repr(fields['status'])} but the file name says "
               f"{name.status!r}; the file name is what counts (rename the file to change the status)")
    return item, diagnostics


# --- reading a directory -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    """A cache entry: the file's identity when parsed, and what parsing gave."""

    identity: object
    item: WorkItem | None
    diagnostics: tuple[Diagnostic, ...]


@dataclass(frozen=True, eq=False)
class QueueSnapshot:
    """A queue directory as parsed at one moment.

    The reader hands out the same snapshot for as long as no file in the directory changes, so
    what is computed from it can be kept in `memo` and reused (a re-plan of an unchanged queue).
    """

    directory: Path
    items: tuple[WorkItem, ...]
    diagnostics: tuple[Diagnostic, ...]
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


class QueueReader:
    """Reads queue directories, re-parsing only files whose name, size or mtime changed.

    One reader per server: it keeps one cache per queue directory it has read, holding only the
    files seen on the latest read. `parse_count` counts files actually parsed, for tests and
    benchmarks. Reads are serialized by a lock, so the reader can be shared between threads.
    """

    def __init__(self, max_item_bytes: int = MAX_ITEM_BYTES) -> None:
        self.max_item_bytes = max_item_bytes
        self.parse_count = 0
        self._cache: dict[Path, tuple[dict[str, _Parsed], QueueSnapshot]] = {}
        self._lock = threading.Lock()

    def read(self, root: Path, queue_dir: Path | str) -> tuple[list[WorkItem], list[Diagnostic]]:
        """All items of `queue_dir` and the diagnostics of its files, in file-name order.

        See `snapshot` for the arguments and errors.
        """
        snapshot = self.snapshot(root, queue_dir)
        return list(snapshot.items), list(snapshot.diagnostics)

    def snapshot(self, root: Path, queue_dir: Path | str) -> QueueSnapshot:
        """The parsed queue in `queue_dir` (relative to `root`, or absolute inside it).

        Raises `PathOutsideWorkspace` when the directory resolves outside `root`, and
        `QueueError` when it does not exist or is not a directory. Per-file problems are
        diagnostics, never exceptions. Returns the previous snapshot object if nothing changed.
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
            previous, last_snapshot = self._cache.get(directory, ({}, None))
            current: dict[str, _Parsed] = {}
            try:
                with os.scandir(directory) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError as exc:
                raise QueueError(f"queue directory {str(queue_dir)!r} cannot be listed: {exc.strerror}") from exc
            changed = last_snapshot is None
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(".md"):
                    continue
                cached = previous.get(entry.name)
                parsed = self._read_one(root, entry, relative_dir, cached)
                if parsed is not None:
                    current[entry.name] = parsed
                    changed = changed or parsed is not cached
            if not changed and len(current) == len(previous) and last_snapshot is not None:
                return last_snapshot
            snapshot = QueueSnapshot(
                directory=directory,
                items=tuple(parsed.item for parsed in current.values() if parsed.item is not None),
                diagnostics=tuple(diagnostic for parsed in current.values() for diagnostic in parsed.diagnostics),
            )
            self._cache[directory] = (current, snapshot)
            return snapshot

    def _read_one(self, root: Path, entry: os.DirEntry[str], relative_dir: str, cached: _Parsed | None
                  ) -> _Parsed | None:
        """Parse one entry, or reuse the cached result if the file is unchanged; None skips it.

        The cache is checked first, on a single stat, so an unchanged queue costs one stat per file.
        """
        file_name = entry.name
        target = entry.path
        problem: tuple[str, str] | None = None
        try:
            if entry.is_symlink():
                resolved = Path(entry.path).resolve(strict=True)
                target = str(resolved)
                if not resolved.is_relative_to(root):
                    problem = ("outside_workspace", f"symlink points outside the workspace root (to {resolved}); refused")
            info = None if problem else os.stat(target)
        except (OSError, RuntimeError) as exc:
            info, problem = None, ("unreadable", f"cannot be read: {getattr(exc, 'strerror', None) or exc}")
        if info is not None and stat.S_ISDIR(info.st_mode):
            return None
        identity = problem if info is None else (info.st_size, info.st_mtime_ns, info.st_ino, target)
        if cached is not None and cached.identity == identity:
            return cached
        name = parse_file_name(file_name)
        if isinstance(name, Diagnostic):
            return _Parsed(identity, None, (name,))
        if info is not None and not stat.S_ISREG(info.st_mode):
            problem = ("unreadable", "is not a regular file (a device, socket or pipe); refused")
        elif info is not None and info.st_size > self.max_item_bytes:
            problem = ("too_large", self._too_large(info.st_size))
        relative = f"{relative_dir}/{file_name}"
        if problem is None:
            text, problem = self._read_text(target)
        if problem is not None:
            diagnostic = Diagnostic(kind=problem[0], item=name.id_str, file=file_name, message=problem[1])
            return _Parsed(identity, stub_item(name, file_name, relative), (diagnostic,))
        self.parse_count += 1
        item, diagnostics = parse_item(file_name, text, path=relative)
        return _Parsed(identity, item, tuple(diagnostics))

    def _read_text(self, target: str) -> tuple[str, tuple[str, str] | None]:
        """The file's text, or (kind, message) saying why it cannot be used."""
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return "", ("unreadable", f"cannot be read: {exc.strerror}")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "", ("unreadable", "is not a regular file (a device, socket or pipe); refused")
            with os.fdopen(fd, "rb", closefd=False) as stream:
                raw = stream.read(self.max_item_bytes + 1)
        except OSError as exc:
            return "", ("unreadable", f"cannot be read: {exc.strerror}")
        finally:
            os.close(fd)
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


# ====================================================================================================
# queue/conflicts.py
# ====================================================================================================
ConflictMap = dict[tuple[int, int], tuple[set[str], set[str]]]
"""(lower id, higher id) -> (the files entries involved, the shared components)."""

_GLOB_CHARS = frozenset("*?[")


def is_glob(entry: str) -> bool:
    """Whether a `files` entry is a pattern rather than a plain path."""
    return not _GLOB_CHARS.isdisjoint(entry)


def glob_tokens(pattern: str) -> tuple[str, ...]:
    """Split a glob into tokens: ``*``, ``?``, a ``[...]`` class, or one literal character."""
    pattern = pattern.replace("**/", "*").replace("**", "*")
    tokens: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "[":
            end = index + 1
            if end < len(pattern) and pattern[end] == "!":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                end += 1
            while end < len(pattern) and pattern[end] != "]":
                end += 1
            if end < len(pattern):
                tokens.append(pattern[index:end + 1])
                index = end + 1
                continue
            tokens.append("[")  # an unclosed bracket is a literal, as in fnmatch
        elif not (char == "*" and tokens and tokens[-1] == "*"):
            tokens.append(char)
        index += 1
    return tuple(tokens)


def _chars_meet(a: str, b: str) -> bool:
    """Whether two single-character tokens (literal, ``?`` or class) can match the same character."""
    if a == "?" or b == "?":
        return True
    if len(a) == 1 and len(b) == 1:
        return a == b
    if len(a) == 1:
        return fnmatchcase(a, b)
    if len(b) == 1:
        return fnmatchcase(b, a)
    return True


def tokens_meet(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether some string matches both token sequences (a walk over the product of the two automata)."""
    seen: set[tuple[int, int]] = set()
    stack = [(0, 0)]
    end_a, end_b = len(a), len(b)
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j = state
        if i == end_a and j == end_b:
            return True
        token_a = a[i] if i < end_a else None
        token_b = b[j] if j < end_b else None
        if token_a == "*":
            stack.append((i + 1, j))
        if token_b == "*":
            stack.append((i, j + 1))
        if token_a is None or token_b is None or (token_a == "*" and token_b == "*"):
            continue
        if token_a == "*":
            stack.append((i, j + 1))
        elif token_b == "*":
            stack.append((i + 1, j))
        elif _chars_meet(token_a, token_b):
            stack.append((i + 1, j + 1))
    return False


def _plain_meets_glob(plain: str, glob: Sequence[str]) -> bool:
    """A plain path (itself, or anything under it) against a glob's tokens."""
    return tokens_meet(tuple(plain), glob) or tokens_meet(tuple(plain) + ("/", "*"), glob)


def files_overlap(a: str, b: str) -> bool:
    """Whether two normalized `files` entries could name a common file (see the module docstring)."""
    if a == "." or b == ".":
        return True
    glob_a, glob_b = is_glob(a), is_glob(b)
    if not glob_a and not glob_b:
        return a == b or b.startswith(a + "/") or a.startswith(b + "/")
    if glob_a and glob_b:
        return tokens_meet(glob_tokens(a), glob_tokens(b))
    plain, glob = (b, a) if glob_a else (a, b)
    return _plain_meets_glob(plain, glob_tokens(glob))


def _literal_suffix(glob: str) -> str:
    """The part of a glob after its last wildcard or character class."""
    cut = max(glob.rfind("*"), glob.rfind("?"), glob.rfind("]") if "[" in glob else -1)
    return glob[cut + 1:]


def _literal_prefix(glob: str) -> str:
    """The part of a glob before its first wildcard."""
    cut = min((glob.index(char) for char in _GLOB_CHARS if char in glob), default=len(glob))
    return glob[:cut]


Key = tuple[str, str]
"""What an item declares, as the index knows it: ``("file", entry)`` or ``("component", casefolded name)``."""
Mark = tuple[str, Key]
"""A scheduler's counter: ``("near", key)`` or ``("held", key)`` (see `ConflictIndex.checks`)."""
_SPREAD_LIMIT = 16
"""Keys overlapping more entries than this are checked by whoever might start beside them, not spread."""


def entry_overlaps(entries: Iterable[str]) -> dict[str, set[str]]:
    """For distinct `files` entries: entry -> the other entries it overlaps (see `files_overlap`).

    An entry always overlaps itself; that is not listed. Plain paths meet through an index (the
    path and each parent directory); only globs are compared pattern by pattern.
    """
    entries = sorted(set(entries))
    adjacent: dict[str, set[str]] = defaultdict(set)

    def link(first: str, second: str) -> None:
        if first != second:
            adjacent[first].add(second)
            adjacent[second].add(first)

    plain = [entry for entry in entries if entry != "." and not is_glob(entry)]
    plain_set = set(plain)
    globs = [entry for entry in entries if entry != "." and is_glob(entry)]
    for path in plain:
        parent = path.rfind("/")
        while parent > 0:
            if path[:parent] in plain_set:
                link(path[:parent], path)
            parent = path.rfind("/", 0, parent)
    tokens = {glob: glob_tokens(glob) for glob in globs}
    ends = {glob: (_literal_prefix(glob), _literal_suffix(glob)) for glob in globs}
    for index, glob in enumerate(globs):
        prefix = _literal_prefix(glob)
        candidates = set()
        start = bisect.bisect_left(plain, prefix)
        while start < len(plain) and plain[start].startswith(prefix):
            candidates.add(plain[start])
            start += 1
        cut = prefix.find("/")
        while cut > 0:
            if prefix[:cut] in plain_set:
                candidates.add(prefix[:cut])
            cut = prefix.find("/", cut + 1)
        if prefix in plain_set:
            candidates.add(prefix)
        for path in candidates:
            if _plain_meets_glob(path, tokens[glob]):
                link(glob, path)
        head, tail = ends[glob]
        for other in globs[index + 1:]:
            # a cheap filter first: literal starts and ends must agree (src/*1 and src/*2 never meet)
            other_head, other_tail = ends[other]
            if ((head.startswith(other_head) or other_head.startswith(head))
                    and (tail.endswith(other_tail) or other_tail.endswith(tail))
                    and tokens_meet(tokens[glob], tokens[other])):
                link(glob, other)
    if "." in entries:
        for entry in entries:
            link(".", entry)
    return adjacent


class ConflictIndex:
    """Which items must not run at the same time, kept by what they declare rather than by pair.

    Every `files` entry and component is a key held by the items declaring it; two items conflict
    when they hold the same key or two keys that overlap (``src`` and ``src/a.py``). So 1,000 items
    sharing one component cost 1,000 entries here, not 500,000 pairs; pairs are derived on demand.
    """

    def __init__(self, items: Iterable[WorkItem]) -> None:
        self.holders: dict[Key, list[int]] = {}
        """Key -> the ids holding it, in the order given (ascending when items are sorted by id)."""
        self.names: dict[Key, str] = {}
        """Key -> how to show it: the entry, or the component as first written."""
        self.keys: dict[int, tuple[Key, ...]] = {}
        for item in items:
            own: dict[Key, str] = {}
            for entry in item.files:
                own.setdefault(("file", entry), entry)
            for component in item.components:
                own.setdefault(("component", component.casefold()), component)
            for key, name in own.items():
                self.holders.setdefault(key, []).append(item.id)
                self.names.setdefault(key, name)
            if own:
                self.keys[item.id] = tuple(own)
        overlaps = entry_overlaps(name for kind, name in self.holders if kind == "file")
        self.adjacent: dict[Key, tuple[Key, ...]] = {
            ("file", entry): tuple(("file", other) for other in sorted(others)) for entry, others in overlaps.items()}
        """Key -> the other keys overlapping it (files only; components meet only when equal)."""
        self._neighbours: dict[int, frozenset[int]] = {}
        self._pair_count: int | None = None
        self._marks: dict[int, tuple[Mark, ...]] = {}
        self._checks: dict[int, tuple[Mark, ...]] = {}
        self._heavy_near: dict[Key, tuple[Mark, ...]] = {}
        self._contested = {key for key, holders in self.holders.items() if len(holders) > 1 or key in self.adjacent}
        """Keys another item could conflict on; the rest (one holder, no overlap) need no counter."""

    def _heavy(self, key: Key) -> bool:
        return len(self.adjacent.get(key, ())) > _SPREAD_LIMIT

    def marks(self, item_id: int) -> tuple[Mark, ...]:
        """Counters a scheduler raises while `item_id` runs (see `checks`)."""
        found = self._marks.get(item_id)
        if found is None:
            marks: list[Mark] = []
            for key in self.keys.get(item_id, ()):
                if key not in self._contested:
                    continue
                marks.append(("near", key))
                if self._heavy(key):
                    marks.append(("held", key))
                else:
                    marks.extend(("near", other) for other in self.adjacent.get(key, ()))
            found = self._marks[item_id] = tuple(marks)
        return found

    def checks(self, item_id: int) -> tuple[Mark, ...]:
        """Counters that must all be zero for `item_id` to start beside what runs.

        ``("near", key)`` counts running items holding `key` or a lightly connected key overlapping
        it; ``("held", key)`` counts running items holding a heavily connected `key` (a directory
        or glob overlapping more than a few entries, or ``.``). Splitting them keeps both starting
        and checking cheap: an item holding ``.`` raises one counter, not one per entry.
        """
        found = self._checks.get(item_id)
        if found is None:
            checks: list[Mark] = []
            for key in self.keys.get(item_id, ()):
                if key not in self._contested:
                    continue
                checks.append(("near", key))
                heavy = self._heavy_near.get(key)
                if heavy is None:
                    heavy = self._heavy_near[key] = tuple(
                        ("held", other) for other in self.adjacent.get(key, ()) if self._heavy(other))
                checks.extend(heavy)
            found = self._checks[item_id] = tuple(checks)
        return found

    def reach(self, item_id: int) -> Iterator[Key]:
        """Every key a running `item_id` makes unavailable: its own and those overlapping them."""
        for key in self.keys.get(item_id, ()):
            yield key
            yield from self.adjacent.get(key, ())

    def neighbours(self, item_id: int) -> frozenset[int]:
        """The items `item_id` must not run beside (computed on demand, then kept)."""
        found = self._neighbours.get(item_id)
        if found is None:
            collected: set[int] = set()
            for key in self.reach(item_id):
                collected.update(self.holders[key])
            collected.discard(item_id)
            found = self._neighbours[item_id] = frozenset(collected)
        return found

    def has_conflict(self, item_id: int) -> bool:
        """Whether `item_id` conflicts with any other item (without building its neighbour set)."""
        return any(holder != item_id for key in self.reach(item_id) for holder in self.holders[key])

    def conflict(self, first: int, second: int) -> bool:
        return first != second and second in self.neighbours(first)

    def pair_count(self) -> int:
        """How many pairs conflict, counted without keeping every pair (once, then kept)."""
        if self._pair_count is None:
            self._pair_count = self._count_pairs()
        return self._pair_count

    def _count_pairs(self) -> int:
        if all(len(keys) == 1 for keys in self.keys.values()):  # then no pair is met through two keys
            total = sum(len(holders) * (len(holders) - 1) // 2 for holders in self.holders.values())
            total += sum(len(self.holders[key]) * len(self.holders[other])
                         for key, others in self.adjacent.items() for other in others if key < other)
            return total
        # Otherwise each item's neighbours, as a bitset over the items: one OR per key it holds.
        bit = {item_id: index for index, item_id in enumerate(self.keys)}
        key_bits = {key: _bitset([bit[holder] for holder in holders], len(bit)) for key, holders in self.holders.items()}
        near: dict[Key, int] = {}
        total = 0
        for keys in self.keys.values():
            mask = 0
            for key in keys:
                if key not in near:
                    near[key] = key_bits[key]
                    for other in self.adjacent.get(key, ()):
                        near[key] |= key_bits[other]
                mask |= near[key]
            total += mask.bit_count() - 1  # less the item itself
        return total // 2

    def pairs(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Conflicting pairs ``(lower id, higher id)`` in order, at most `limit` of them."""
        found: list[tuple[int, int]] = []
        for first in sorted(self.keys):
            if limit is not None and len(found) >= limit:
                break
            if self.has_conflict(first):
                found.extend((first, second) for second in sorted(self.neighbours(first)) if second > first)
        return found if limit is None else found[:limit]

    def shared(self, first: int, second: int) -> tuple[list[str], list[str]]:
        """What makes two items conflict: (the files entries involved, the shared components), sorted."""
        files: set[str] = set()
        components: set[str] = set()
        theirs = set(self.keys.get(second, ()))
        for key in self.keys.get(first, ()):
            met = [key] if key in theirs else []
            met += [other for other in self.adjacent.get(key, ()) if other in theirs]
            for other in met:
                if key[0] == "component":
                    components.add(self.names[key])
                else:
                    files.update((key[1], other[1]))
        return sorted(files), sorted(components)

    def groups(self) -> list[tuple[Key, list[int], list[Key]]]:
        """Each key that causes a conflict: (key, its holders, the keys overlapping it), in key order."""
        found = []
        for key in sorted(self.holders):
            holders, adjacent = self.holders[key], list(self.adjacent.get(key, ()))
            if len(holders) > 1 or any(holder != holders[0] for other in adjacent for holder in self.holders[other]):
                found.append((key, holders, adjacent))
        return found


def _bitset(indices: list[int], size: int) -> int:
    """An int with the bits at `indices` set, built in linear time."""
    data = bytearray((size + 7) // 8)
    for index in indices:
        data[index >> 3] |= 1 << (index & 7)
    return int.from_bytes(data, "little")


def find_conflicts(items: Iterable[WorkItem]) -> ConflictMap:
    """Every pair of items whose files or components overlap, with what they share.

    `items` must have distinct ids. This lists every pair (quadratic for items sharing one key);
    the planner keeps a `ConflictIndex` instead and lists pairs only up to a cap.
    """
    index = ConflictIndex(items)
    found: ConflictMap = {}
    for pair in index.pairs():
        files, components = index.shared(*pair)
        found[pair] = (set(files), set(components))
    return found


# ====================================================================================================
# queue/planner.py
# ====================================================================================================
DEFAULT_ESTIMATE_S = 60.0
"""What an item without an `estimate` counts as, for ranking and for the predicted schedule."""

MAX_CONFLICTS_SHOWN = 200
"""Conflicting pairs listed in a plan; `conflicts_total` counts them all, `conflict_groups` explains them."""
MAX_OVERLAPS_SHOWN = 20
"""Overlapping entries listed per conflict group; `overlaps_total` counts them all."""
MAX_PATH_SHOWN = 10
"""Ids of a cycle printed in a message; the rest are counted (``… 4990 more``). `path` has them all."""

PRIORITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}

_STATUS_REASONS = {
    "completed": "completed",
    "in_progress": "in progress",
    "failed": "failed; move it back to pending to retry",
    "blocked": "blocked; move it back to pending once the problem is solved",
}
_CAUSES = {"error": "has an error", "cycle": "is in a dependency cycle", "failed": "failed", "blocked": "is blocked"}


# --- results ---------------------------------------------------------------------------------------


class PlanItem(BaseModel):
    """One item as the plan sees it. `blocked_by`/`blocks` hold every edge, from either side."""

    id: str
    file: str
    title: str
    status: str
    blocked_by: list[str]
    blocks: list[str]
    files: list[str]
    components: list[str]
    priority: str
    estimate: float | None
    """Seconds, as written in the item; None when it has no `estimate`."""
    ready: bool
    waiting_on: list[str]
    reason: str | None


class Conflict(BaseModel):
    """Two items that must not run together, and the files or components they share."""

    a: str
    b: str
    files: list[str]
    components: list[str]


class ConflictGroup(BaseModel):
    """One `files` entry or component that keeps items apart, listed once with the items declaring it."""

    kind: Literal["file", "component"]
    name: str = Field(description="the files entry (a path, directory or glob) or the component, as written")
    items: list[str] = Field(description="the pending or in-progress items declaring it: no two of them run "
                                         "together")
    overlaps: list[str] = Field(description="other files entries that overlap this one (a directory and a path "
                                            "under it, globs that can match a common path, '.'): no item here runs "
                                            f"beside an item of those groups; at most {MAX_OVERLAPS_SHOWN}")
    overlaps_total: int = Field(description="how many entries overlap this one in all")


class ForkJoin(BaseModel):
    """Items that fan out from `fork` and meet again at `join`."""

    fork: str
    branches: list[str]
    join: str


class Patterns(BaseModel):
    fork_join: list[ForkJoin]
    pipelines: list[list[str]]


class QueuePlan(BaseModel):
    """The `queue_plan` result (field names are the contract in TOOLS.md)."""

    items: list[PlanItem]
    run_now: list[str]
    waves: list[list[str]]
    critical_path: list[str]
    conflicts: list[Conflict] = Field(description=f"pairs of items that never run together, in id order; at most "
                                                  f"{MAX_CONFLICTS_SHOWN} (see conflicts_total and conflict_groups)")
    conflicts_total: int = Field(description="how many pairs of items conflict in all")
    conflict_groups: list[ConflictGroup] = Field(description="every files entry or component that makes items "
                                                             "conflict, once, with the items declaring it")
    patterns: Patterns
    errors: list[Diagnostic]
    warnings: list[Diagnostic]
    max_parallel: int
    predicted_makespan: float
    lower_bound: float
    mermaid: str


# --- the graph ---------------------------------------------------------------------------------------


@dataclass
class QueueGraph:
    """Everything the planner and the run engine need to know about a queue, computed once."""

    items: list[WorkItem]
    """Every item, sorted by id and file (duplicates included)."""
    by_id: dict[int, WorkItem]
    """Items with a unique id: the nodes of the graph."""
    labels: dict[int, str]
    """Id -> its spelling in the file name (``007``), for every id seen in a file name."""
    waits_on: dict[int, list[int]]
    """Node -> nodes it waits for (from its `blocked_by` and their `blocks`), sorted."""
    unblocks: dict[int, list[int]]
    """Node -> nodes waiting for it, sorted."""
    errors: list[Diagnostic]
    warnings: list[Diagnostic]
    cycles: list[list[int]]
    """Strongly connected components of two or more items: each one holds at least one cycle."""
    reasons: dict[str, str] = field(default_factory=dict)
    """File name -> why the item cannot run now (absent for ready items)."""
    waiting_on: dict[str, list[int]] = field(default_factory=dict)
    """File name of a pending item -> ids it still waits for (not completed), broken ones included."""
    schedulable: list[int] = field(default_factory=list)
    """Pending items that will run once what they wait on completes, in rank order."""
    in_progress: list[int] = field(default_factory=list)
    estimate_ms: dict[int, int] = field(default_factory=dict)
    """Estimate of every schedulable and in-progress item, defaults applied."""
    remaining_ms: dict[int, int] = field(default_factory=dict)
    """Longest estimate-weighted path from the item to the end, its own estimate included."""
    unblocks_count: dict[int, int] = field(default_factory=dict)
    """How many schedulable items transitively wait on the item."""
    rank: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    """Priority key of every schedulable item; smaller runs first."""
    position: dict[int, int] = field(default_factory=dict)
    """Schedulable and in-progress items -> index in one topological order (their bit in `reach`)."""
    reach: dict[int, int] = field(default_factory=dict, repr=False)
    """Schedulable and in-progress items -> bitset of the item itself and every item waiting on it."""
    conflict_index: ConflictIndex = field(default_factory=lambda: ConflictIndex(()))
    """Which pending or in-progress nodes must not run together, by the files and components they hold."""
    conflicts: Mapping[int, frozenset[int]] = field(default_factory=dict)
    """Pending or in-progress node with a conflict -> the nodes it must not run beside (built on demand)."""

    def label(self, item_id: int) -> str:
        """How results spell an id: as in its file name, else zero-padded to three digits."""
        return self.labels.get(item_id) or format_id(item_id)


def build_graph(items: Sequence[WorkItem], diagnostics: Sequence[Diagnostic] = ()) -> QueueGraph:
    """Validate the queue and compute readiness, ranks and conflicts. Never raises for bad input."""
    items = sorted(items, key=lambda item: (item.id, item.file))
    errors = [d for d in diagnostics if d.is_error]
    warnings = [d for d in diagnostics if not d.is_error]
    by_id, labels, broken_ids = _index_ids(items, errors)
    waits_on, waits_on_broken = _edges(items, by_id, broken_ids, errors)
    unblocks: dict[int, list[int]] = {item_id: [] for item_id in by_id}
    for item_id, preds in waits_on.items():
        for pred in preds:
            unblocks[pred].append(item_id)
    graph = QueueGraph(items=items, by_id=by_id, labels=labels, waits_on=waits_on, unblocks=unblocks,
                       errors=errors, warnings=warnings,
                       cycles=strongly_connected_components(list(by_id), waits_on))
    _readiness(graph, waits_on_broken)
    _weigh(graph)
    graph.conflict_index = ConflictIndex(
        item for item in by_id.values() if item.status in ("pending", "in_progress"))
    graph.conflicts = _Neighbours(graph.conflict_index)
    graph.errors.sort(key=_diagnostic_order)
    graph.warnings.sort(key=_diagnostic_order)
    return graph


class _Neighbours(Mapping[int, frozenset[int]]):
    """`QueueGraph.conflicts`: each node's neighbour set, built only when asked for."""

    def __init__(self, index: ConflictIndex) -> None:
        self._index = index

    def __getitem__(self, item_id: int) -> frozenset[int]:
        if item_id not in self._index.keys or not self._index.has_conflict(item_id):
            raise KeyError(item_id)
        return self._index.neighbours(item_id)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, int) and item_id in self._index.keys and self._index.has_conflict(item_id)

    def __iter__(self) -> Iterator[int]:
        return (item_id for item_id in self._index.keys if self._index.has_conflict(item_id))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _error(errors: list[Diagnostic], kind: str, item: WorkItem, message: str, path: list[str] | None = None) -> None:
    errors.append(Diagnostic(kind=kind, item=item.id_str, file=item.file, message=message, path=path))


def _diagnostic_order(diagnostic: Diagnostic) -> tuple[Any, ...]:
    return (diagnostic.file is None, diagnostic.file or "", diagnostic.kind, diagnostic.message)


def _index_ids(items: list[WorkItem], errors: list[Diagnostic]
               ) -> tuple[dict[int, WorkItem], dict[int, str], set[int]]:
    """Nodes (items with a unique id), id spellings, and broken ids: duplicates, and ids known
    only from an error (a file whose name is wrong but starts with an id)."""
    files_by_id: dict[int, list[WorkItem]] = {}
    labels: dict[int, str] = {}
    for item in items:
        files_by_id.setdefault(item.id, []).append(item)
        labels.setdefault(item.id, item.id_str)
    by_id = {item_id: same[0] for item_id, same in files_by_id.items() if len(same) == 1}
    broken_ids = set()
    for item_id, same in files_by_id.items():
        if len(same) > 1:
            names = ", ".join(item.file for item in same)
            for item in same:
                _error(errors, "duplicate_id", item, f"id {item.id_str} is used by {len(same)} files: {names}")
            broken_ids.add(item_id)
    for diagnostic in list(errors):
        if diagnostic.item and diagnostic.item.isdigit() and int(diagnostic.item) not in files_by_id:
            broken_ids.add(int(diagnostic.item))
            labels.setdefault(int(diagnostic.item), diagnostic.item)
    return by_id, labels, broken_ids


def _edges(items: list[WorkItem], by_id: dict[int, WorkItem], broken_ids: set[int], errors: list[Diagnostic]
           ) -> tuple[dict[int, list[int]], dict[int, set[int]]]:
    """Who waits on whom, from both `blocked_by` and `blocks`; self and dangling references are
    errors. Also: node -> broken ids it waits on (a duplicate's `blocks` counts too)."""
    waits: dict[int, set[int]] = {item_id: set() for item_id in by_id}
    waits_on_broken: dict[int, set[int]] = {}
    for item in items:
        if item.id not in by_id:
            for target in item.blocks:
                if target in by_id:
                    waits_on_broken.setdefault(target, set()).add(item.id)
            continue
        for field_name, refs in (("blocked_by", item.blocked_by), ("blocks", item.blocks)):
            for ref in refs:
                if ref == item.id:
                    _error(errors, "self_reference", item, f"{field_name} refers to the item itself ({item.id_str})")
                elif ref in by_id:
                    if field_name == "blocked_by":
                        waits[item.id].add(ref)
                    else:
                        waits[ref].add(item.id)
                elif ref in broken_ids:
                    if field_name == "blocked_by":
                        waits_on_broken.setdefault(item.id, set()).add(ref)
                else:
                    _error(errors, "dangling_ref", item,
                           f"{field_name} refers to {format_id(ref)}, which does not exist")
    return {item_id: sorted(preds) for item_id, preds in waits.items()}, waits_on_broken


def _readiness(graph: QueueGraph, waits_on_broken: dict[int, set[int]]) -> None:
    """Cycle errors, then why each item is not ready, and which pending items can be scheduled."""
    by_id, label, reasons = graph.by_id, graph.label, graph.reasons
    cycle_members: set[int] = set()
    for component in graph.cycles:
        path = cycle_path(component, graph.waits_on)
        start = label(path[0])
        _error(graph.errors, "cycle", by_id[path[0]],
               f"dependency cycle: {show_path([label(node) for node in path])} (each item waits on the next)",
               [label(node) for node in path])
        on_path = set(path)
        if len(path) - 1 <= MAX_PATH_SHOWN:
            shown = show_path([label(node) for node in path])
            member = f"in a dependency cycle: {shown}"
            other = f"in a group of items that wait on each other (see the cycle {shown})"
        else:  # a long cycle is printed once, in its error
            member = f"in a dependency cycle of {len(path) - 1} items (see the cycle error for {start})"
            other = (f"in a group of {len(component)} items that wait on each other "
                     f"(see the cycle error for {start})")
        for node in component:
            cycle_members.add(node)
            reasons[by_id[node].file] = member if node in on_path else other

    first_error: dict[str, str] = {}
    for diagnostic in graph.errors:
        if diagnostic.file is not None and diagnostic.kind != "cycle":
            first_error.setdefault(diagnostic.file, diagnostic.message)
    for item in graph.items:
        if item.status != "pending":
            reasons[item.file] = _STATUS_REASONS[item.status]
        elif item.file in first_error and item.file not in reasons:
            reasons[item.file] = f"has an error: {first_error[item.file]}"

    causes: dict[int, str] = {}
    for item_id, item in by_id.items():
        if item.status != "completed" and (item.file in first_error or item_id in cycle_members):
            causes[item_id] = "error" if item.file in first_error else "cycle"
    stuck = _spread_trouble(by_id, graph.unblocks, causes, waits_on_broken)
    for item_id, item in by_id.items():
        if item.status in ("failed", "blocked") and item_id not in causes:
            causes[item_id] = item.status
    stuck.update(_spread_trouble(by_id, graph.unblocks, causes, {}, skip=set(stuck)))

    for item_id, item in by_id.items():
        if item.status != "pending":
            if item.status == "in_progress":
                graph.in_progress.append(item_id)
            continue
        open_preds = [pred for pred in graph.waits_on[item_id] if by_id[pred].status != "completed"]
        broken = waits_on_broken.get(item_id)
        graph.waiting_on[item.file] = sorted(open_preds + list(broken)) if broken else open_preds
        if item.file in reasons:
            continue
        if item_id in stuck:
            via, root = stuck[item_id]
            cause = _CAUSES[causes.get(root, "error")]
            reasons[item.file] = (f"waits on {label(via)}, which {cause}" if via == root
                                  else f"waits on {label(via)}, which cannot run: {label(root)} {cause}")
            continue
        graph.schedulable.append(item_id)
        if open_preds:
            reasons[item.file] = "waits on " + ", ".join(label(pred) for pred in open_preds)
    for item_id in graph.schedulable + graph.in_progress:
        item = by_id[item_id]
        if not item.files and not item.components:
            graph.warnings.append(Diagnostic(
                kind="no_files", item=item.id_str, file=item.file,
                message="declares neither files nor components, so it is treated as independent of every other item"))


def show_path(labels: Sequence[str], limit: int = MAX_PATH_SHOWN) -> str:
    """``001 -> 002 -> 001``; a longer path keeps its first `limit` ids, a count, and its last id."""
    if len(labels) <= limit + 1:
        return " -> ".join(labels)
    return " -> ".join(labels[:limit]) + f" -> … {len(labels) - limit - 1} more -> {labels[-1]}"


def _spread_trouble(by_id: dict[int, WorkItem], unblocks: dict[int, list[int]], causes: dict[int, str],
                    waits_on_broken: dict[int, set[int]], skip: AbstractSet[int] = frozenset()
                    ) -> dict[int, tuple[int, int]]:
    """Pending items behind a troubled item: item -> (the item it directly waits on, the root cause).

    Breadth first from every cause in id order, so each item names its nearest trouble. Trouble
    passes only through pending items: a completed item is done whatever its history.
    """
    stuck: dict[int, tuple[int, int]] = {}
    queue: deque[tuple[int, int, int]] = deque()
    for root in sorted(causes):
        for successor in unblocks[root]:
            queue.append((successor, root, root))
    for item_id in sorted(waits_on_broken):
        broken = min(waits_on_broken[item_id])
        queue.append((item_id, broken, broken))
    while queue:
        node, via, root = queue.popleft()
        if node in stuck or node in skip or node in causes or by_id[node].status != "pending":
            continue
        stuck[node] = (via, root)
        for successor in unblocks[node]:
            queue.append((successor, node, root))
    return stuck


def _weigh(graph: QueueGraph) -> None:
    """Estimates, remaining critical path, transitive unblock counts and ranks of runnable items.

    In-progress items count as started at time 0 and wait on nothing; what they wait on is moot.
    """
    active = graph.schedulable + graph.in_progress
    pending = set(graph.schedulable)
    by_id = graph.by_id
    estimate = graph.estimate_ms = {item_id: round(1000 * _estimate_s(by_id[item_id])) for item_id in active}
    successors = {item_id: [s for s in graph.unblocks[item_id] if s in pending] for item_id in active}
    order = topological_order(active, successors)
    position = graph.position = {item_id: index for index, item_id in enumerate(order)}
    reach = graph.reach
    remaining = graph.remaining_ms
    for item_id in reversed(order):
        mask = 1 << position[item_id]
        longest = 0
        for successor in successors[item_id]:
            mask |= reach[successor]
            if remaining[successor] > longest:
                longest = remaining[successor]
        reach[item_id] = mask
        remaining[item_id] = estimate[item_id] + longest
    graph.unblocks_count = {item_id: mask.bit_count() - 1 for item_id, mask in reach.items()}
    graph.rank = {
        item_id: (-remaining[item_id], -graph.unblocks_count[item_id],
                  PRIORITY_ORDER[by_id[item_id].priority], len(graph.waits_on[item_id]), item_id)
        for item_id in graph.schedulable
    }
    graph.schedulable.sort(key=graph.rank.__getitem__)


def _estimate_s(item: WorkItem) -> float:
    return DEFAULT_ESTIMATE_S if item.estimate_s is None else item.estimate_s


def topological_order(nodes: Iterable[int], successors: Mapping[int, Sequence[int]]) -> list[int]:
    """Kahn's algorithm, smallest id first among the available; `successors` must be acyclic."""
    nodes = list(nodes)
    indegree = dict.fromkeys(nodes, 0)
    for node in nodes:
        for successor in successors[node]:
            indegree[successor] += 1
    available = [node for node in nodes if indegree[node] == 0]
    heapq.heapify(available)
    order = []
    while available:
        node = heapq.heappop(available)
        order.append(node)
        for successor in successors[node]:
            indegree[successor] -= 1
            if indegree[successor] == 0:
                heapq.heappush(available, successor)
    if len(order) != len(nodes):
        raise InternalError("topological_order was given a graph with a cycle")
    return order


def strongly_connected_components(nodes: Sequence[int], edges: Mapping[int, Sequence[int]]) -> list[list[int]]:
    """Tarjan's algorithm with an explicit stack: components of two or more nodes, each sorted.

    No recursion, so a 10,000-deep chain needs no raised recursion limit.
    """
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    components: list[list[int]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(edges[root]))]
        while work:
            node, successors = work[-1]
            descended = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(edges[successor])))
                    descended = True
                    break
                if successor in on_stack and index[successor] < low[node]:
                    low[node] = index[successor]
            if descended:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                if low[node] < low[parent]:
                    low[parent] = low[node]
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    components.sort()
    return components


def cycle_path(component: Sequence[int], edges: Mapping[int, Sequence[int]]) -> list[int]:
    """A shortest closed path through the smallest id of a strongly connected component.

    Returns ``[start, ..., start]``; each step follows an edge of `edges` inside the component.
    """
    members = set(component)
    start = min(component)
    parent: dict[int, int] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in edges[node]:
            if successor == start:
                path = [start]
                while node != start:
                    path.append(node)
                    node = parent[node]
                path.append(start)
                path[1:-1] = reversed(path[1:-1])
                return path
            if successor in members and successor not in parent:
                parent[successor] = node
                queue.append(successor)
    raise InternalError(f"no cycle through {start} in a strongly connected component")


# --- scheduling ----------------------------------------------------------------------------------------


class Scheduler:
    """Hands out the next items to start; the simulation and the live run engine both drive it.

    Create it when the run starts, call `start_next(free_slots)` whenever slots are free and
    `finished(item_id, ok)` when an item ends. It never starts an item before everything it waits
    on has completed, nor beside a running item it conflicts with, and it starts the best-ranked
    candidates first. Items in progress when it is created count as running.

    `only` restricts the run to those ids and the pending items they need; `rank` replaces the
    priority key (benchmarks use it to compare rules).
    """

    def __init__(self, graph: QueueGraph, *, only: Iterable[int] | None = None,
                 rank: Mapping[int, Any] | None = None, running: Iterable[int] = ()) -> None:
        self._graph = graph
        members = set(graph.schedulable)
        if only is not None:
            members = _needed(set(only), graph.waits_on) & members
        self._members = members
        key = rank.__getitem__ if rank is not None else graph.rank.__getitem__
        self._order = sorted(members, key=key)
        self._position = {item_id: index for index, item_id in enumerate(self._order)}
        self.running: set[int] = set(graph.in_progress) | set(running)
        self.done: set[int] = set()
        self.failed: set[int] = set()
        self.skipped: dict[int, int] = {}
        """Item -> the failed item it (transitively) waits on."""
        self._missing = {
            item_id: sum(1 for pred in graph.waits_on[item_id] if pred in members or pred in self.running)
            for item_id in members
        }
        self._ready = [self._position[item_id] for item_id, missing in self._missing.items() if missing == 0]
        heapq.heapify(self._ready)
        # Conflicts are checked by counters over what running items hold (`ConflictIndex.marks` and
        # `checks`), not pair by pair. A ready item blocked by a conflict waits in `_parked` under
        # the counter that blocks it; when that counter falls to zero, only its best parked item
        # returns to `_ready` (the next one when that one is blocked elsewhere). So 1,000 items
        # sharing a component cost O(n log n) to schedule, not a scan of every waiting item per start.
        self._taken: dict[Mark, int] = {}
        """Counter -> how many running items raise it."""
        self._holding: set[int] = set()
        """The running items counted in `_taken` (`running` may also be changed from outside)."""
        self._parked: dict[Mark, list[int]] = {}
        """Counter above zero -> heap of positions of ready items it blocks."""
        self._promoted: dict[int, Mark] = {}
        """Position in `_ready` -> the counter whose parked heap it came from."""

    def _sync_taken(self) -> None:
        """Count the keys of items that started running, uncount those that stopped, unpark what frees."""
        if self._holding == self.running:
            return
        marks, taken = self._graph.conflict_index.marks, self._taken
        freed = []
        for item_id in self._holding - self.running:
            for mark in marks(item_id):
                taken[mark] -= 1
                if not taken[mark]:
                    freed.append(mark)
        for item_id in self.running - self._holding:
            for mark in marks(item_id):
                taken[mark] = taken.get(mark, 0) + 1
        self._holding = set(self.running)
        for mark in freed:
            if not taken.get(mark):
                self._unpark(mark)

    def _unpark(self, mark: Mark) -> None:
        """Return the best item parked under a counter that fell to zero to the ready heap."""
        parked = self._parked.get(mark)
        if parked:
            position = heapq.heappop(parked)
            self._promoted[position] = mark
            heapq.heappush(self._ready, position)
            if not parked:
                del self._parked[mark]

    def ready(self) -> list[int]:
        """Items that could start now if nothing conflicted, best first."""
        positions = self._ready + [position for parked in self._parked.values() for position in parked]
        return [self._order[position] for position in sorted(positions)]

    def start_next(self, free_slots: int) -> list[int]:
        """Start up to `free_slots` ready items that conflict with nothing running; best first."""
        started: list[int] = []
        checks, taken = self._graph.conflict_index.checks, self._taken
        self._sync_taken()
        while len(started) < free_slots and self._ready:
            position = heapq.heappop(self._ready)
            item_id = self._order[position]
            source = self._promoted.pop(position, None)
            blocker = next((mark for mark in checks(item_id) if taken.get(mark)), None)
            if blocker is not None:
                heapq.heappush(self._parked.setdefault(blocker, []), position)
                if source is not None and not taken.get(source):
                    self._unpark(source)  # its key is still free: the next item parked there may start
                continue
            self.running.add(item_id)
            started.append(item_id)
            self._sync_taken()
            if source is not None and not taken.get(source):
                self._unpark(source)  # it did not raise that counter: the next one parked there may start too
        return started

    def finished(self, item_id: int, ok: bool) -> list[int]:
        """Record that a running item ended; on failure return the items now skipped because of it.

        An id that is not running is ignored, so reporting an end twice changes nothing.
        """
        if item_id not in self.running:
            return []
        self.running.remove(item_id)
        if ok:
            self.done.add(item_id)
            for successor in self._graph.unblocks.get(item_id, ()):
                if successor in self._members and successor not in self.skipped:
                    self._missing[successor] -= 1
                    if self._missing[successor] == 0:
                        heapq.heappush(self._ready, self._position[successor])
            return []
        self.failed.add(item_id)
        newly: list[int] = []
        queue = deque(self._graph.unblocks.get(item_id, ()))
        while queue:  # none of these can be ready, running or done: each waits on the failure
            node = queue.popleft()
            if node in self._members and node not in self.skipped:
                self.skipped[node] = item_id
                newly.append(node)
                queue.extend(self._graph.unblocks[node])
        return newly

    def not_started(self) -> list[int]:
        """Members neither started nor skipped yet, in rank order."""
        return [item_id for item_id in self._order
                if item_id not in self.done and item_id not in self.running
                and item_id not in self.skipped and item_id not in self.failed]

    @property
    def idle(self) -> bool:
        """Nothing running and nothing ready: the run is over (or stuck on conflicts with nothing)."""
        return not self.running and not self._ready and not self._parked


def _needed(targets: set[int], waits_on: Mapping[int, Sequence[int]]) -> set[int]:
    """`targets` and everything they wait on, transitively."""
    needed = set()
    queue = deque(target for target in targets if target in waits_on)
    while queue:
        node = queue.popleft()
        if node in needed:
            continue
        needed.add(node)
        queue.extend(waits_on[node])
    return needed


@dataclass(frozen=True)
class Schedule:
    """A predicted run: when each item starts and ends (ms), and the batches started together.

    Each wave is what one free-slot event starts; two waves can share a start time only when
    zero-length items end at the instant they start.
    """

    start_ms: dict[int, int]
    end_ms: dict[int, int]
    waves: list[list[int]]
    wave_start_ms: list[int]
    makespan_ms: int


def simulate(graph: QueueGraph, max_parallel: int, *, rank: Mapping[int, object] | None = None) -> Schedule:
    """List scheduling driven by estimates: whenever a slot frees, start the best ready items.

    In-progress items are taken to run from time 0 for their whole estimate.
    """
    scheduler = Scheduler(graph, rank=rank)
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    events: list[tuple[int, int]] = []
    for item_id in graph.in_progress:
        start[item_id] = 0
        end[item_id] = graph.estimate_ms[item_id]
        heapq.heappush(events, (end[item_id], item_id))
    waves: list[list[int]] = []
    wave_start: list[int] = []

    def launch(now: int) -> None:
        started = scheduler.start_next(max_parallel - len(scheduler.running))
        if not started:
            return
        waves.append(started)
        wave_start.append(now)
        for item_id in started:
            start[item_id] = now
            end[item_id] = now + graph.estimate_ms[item_id]
            heapq.heappush(events, (end[item_id], item_id))

    launch(0)
    now = 0
    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            scheduler.finished(heapq.heappop(events)[1], ok=True)
        launch(now)
    if scheduler.not_started():
        raise InternalError(f"the simulation left items unstarted: {scheduler.not_started()[:10]}")
    return Schedule(start, end, waves, wave_start, max(end.values(), default=0))


# --- bounds and patterns ----------------------------------------------------------------------------------


def lower_bound_ms(graph: QueueGraph, max_parallel: int) -> float:
    """``max(critical path, total work / slots, longest serial set)``: no schedule can beat it.

    The serial set is a greedy clique of items that pairwise conflict or wait on one another
    (with at most one in-progress item, since those already overlap): they can only run one after
    another. Slots are `max_parallel`, or more if more items are already in progress.
    """
    active = graph.schedulable + graph.in_progress
    if not active:
        return 0.0
    estimate = graph.estimate_ms
    critical = max(graph.remaining_ms.values())
    work = sum(estimate[item_id] for item_id in active) / max(max_parallel, len(graph.in_progress))
    return max(critical, work, _serial_bound(graph, active))


_SERIAL_SEEDS = 16
_EXACT_WEIGHT_PAIRS = 100_000
"""Up to this many conflicting pairs, seeds are weighed pair by pair (exactly)."""
_SERIAL_BUDGET = 20_000
"""Candidate checks the serial bound may spend in all; it stays a valid bound when cut short."""


def _serial_bound(graph: QueueGraph, active: list[int]) -> int:
    """Sum of estimates of the heaviest greedy clique of mutually serial items (see lower_bound_ms).

    Bitsets over `graph.position`: an item is serial with everything it waits on, everything that
    waits on it and everything it conflicts with. Seeds: the critical path and the items with the
    heaviest conflicts; each clique grows by estimate, heaviest first, within `_SERIAL_BUDGET`
    candidate checks. Without any conflict every such clique is a chain, which the critical
    path already bounds, so nothing is computed.
    """
    position, estimate, index = graph.position, graph.estimate_ms, graph.conflict_index
    with_conflicts = [item_id for item_id in active if item_id in index.keys and index.has_conflict(item_id)]
    if not with_conflicts:
        return 0
    by_position = sorted(position, key=position.__getitem__)
    upward: dict[int, int] = {}
    for item_id in by_position:
        mask = 1 << position[item_id]
        if graph.by_id[item_id].status == "pending":
            for pred in graph.waits_on[item_id]:
                if pred in position:
                    mask |= upward[pred]
        upward[item_id] = mask
    running_mask = sum(1 << position[item_id] for item_id in graph.in_progress)

    key_mask: dict[tuple[str, str], int] = {}
    key_weight: dict[tuple[str, str], int] = {}
    for key, holders in index.holders.items():
        placed = [holder for holder in holders if holder in position]
        key_mask[key] = sum(1 << position[holder] for holder in placed)
        key_weight[key] = sum(estimate[holder] for holder in placed)
    near: dict[tuple[str, str], tuple[int, int]] = {}

    def near_key(key: tuple[str, str]) -> tuple[int, int]:
        """(mask, weight) of the holders of `key` and of every key overlapping it."""
        found = near.get(key)
        if found is None:
            mask, weight = key_mask[key], key_weight[key]
            for other in index.adjacent.get(key, ()):
                mask |= key_mask[other]
                weight += key_weight[other]
            found = near[key] = (mask, weight)
        return found

    def serial(item_id: int) -> int:
        mask = upward[item_id] | graph.reach[item_id]
        for key in index.keys.get(item_id, ()):  # by key, not by pair: items sharing one key share its mask
            mask |= near_key(key)[0]
        return mask & ~(1 << position[item_id])

    # Seeds first: the items with the heaviest conflicts, their own estimate plus their neighbours'
    # (when there are many pairs, weighed by key instead: an estimate, it only orders the seeds).
    if index.pair_count() <= _EXACT_WEIGHT_PAIRS:
        with_conflicts.sort(key=lambda item_id: (-(estimate[item_id] + sum(
            estimate.get(other, 0) for other in index.neighbours(item_id))), item_id))
    else:
        with_conflicts.sort(key=lambda item_id: (-sum(near_key(key)[1] for key in index.keys[item_id]), item_id))
    seeds = [critical_path(graph)] + [[item_id] for item_id in with_conflicts[:_SERIAL_SEEDS]]
    budget = _SERIAL_BUDGET
    best = 0
    for seed in seeds:
        allowed, members = -1, 0
        for member in seed:
            allowed &= serial(member)
            members |= 1 << position[member]
        if members & running_mask:
            allowed &= ~running_mask
        allowed &= ~members
        total = sum(estimate[member] for member in seed)
        candidates = [by_position[bit] for bit in _set_bits(allowed)]
        candidates.sort(key=lambda item_id: (-estimate[item_id], item_id))
        for candidate in candidates[:budget]:
            bit = 1 << position[candidate]
            if allowed & bit:
                total += estimate[candidate]
                allowed &= serial(candidate)
                if bit & running_mask:
                    allowed &= ~running_mask
                if not allowed:
                    break
        budget -= min(budget, len(candidates))
        best = max(best, total)
        if budget == 0:
            break
    return best


def _set_bits(mask: int) -> list[int]:
    """Positions of the 1 bits of a non-negative int, lowest first."""
    text = bin(mask)[:1:-1]
    positions = []
    index = text.find("1")
    while index >= 0:
        positions.append(index)
        index = text.find("1", index + 1)
    return positions


def critical_path(graph: QueueGraph) -> list[int]:
    """The chain of runnable items with the longest total estimate, from its first item on."""
    remaining = graph.remaining_ms
    if not remaining:
        return []
    pending = set(graph.schedulable)
    node = min(remaining, key=lambda item_id: (-remaining[item_id], item_id))
    path = [node]
    while True:
        successors = [s for s in graph.unblocks[node] if s in pending]
        if not successors:
            return path
        node = min(successors, key=lambda item_id: (-remaining[item_id], item_id))
        path.append(node)


def find_patterns(graph: QueueGraph) -> Patterns:
    """Fork-join groups (a fork whose only-child branches meet at one join) and pipelines
    (maximal chains where each item waits on exactly the one before, which unblocks only it)."""
    waits_on, unblocks = graph.waits_on, graph.unblocks
    fork_joins: list[ForkJoin] = []
    for fork in sorted(unblocks):
        if len(unblocks[fork]) < 2:
            continue
        joins: dict[int, list[int]] = {}
        for branch in unblocks[fork]:
            if waits_on[branch] == [fork]:
                for join in unblocks[branch]:
                    joins.setdefault(join, []).append(branch)
        for join, branches in sorted(joins.items()):
            if len(branches) >= 2:
                fork_joins.append(ForkJoin(fork=graph.label(fork), branches=[graph.label(b) for b in branches],
                                           join=graph.label(join)))
    in_cycle = {node for component in graph.cycles for node in component}
    link = {node: unblocks[node][0] for node in unblocks
            if len(unblocks[node]) == 1 and len(waits_on[unblocks[node][0]]) == 1 and node not in in_cycle}
    linked_to = set(link.values())
    pipelines = []
    for head in sorted(link):
        if head in linked_to:
            continue
        chain = [head]
        while chain[-1] in link:
            chain.append(link[chain[-1]])
        pipelines.append([graph.label(node) for node in chain])
    return Patterns(fork_join=fork_joins, pipelines=pipelines)


# --- Mermaid ---------------------------------------------------------------------------------------------

_MERMAID_CLASSES = (
    "classDef pending fill:#f3f4f6,stroke:#6b7280,color:#111827",
    "classDef in_progress fill:#dbeafe,stroke:#2563eb,color:#1e3a8a",
    "classDef completed fill:#dcfce7,stroke:#16a34a,color:#14532d",
    "classDef blocked fill:#fef3c7,stroke:#d97706,color:#78350f",
    "classDef failed fill:#fee2e2,stroke:#dc2626,color:#7f1d1d",
    "classDef error fill:#fee2e2,stroke:#dc2626,stroke-width:3px,stroke-dasharray:5 3,color:#7f1d1d",
)


def _mermaid_label(text: str) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= 60 else text[:57] + "..."
    for char, entity in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, entity)
    return text


MERMAID_MAX_NODES = 200
MERMAID_MAX_EDGES = 500
"""Mermaid refuses to render more than 500 edges by default; larger queues are drawn in part."""


def to_mermaid(graph: QueueGraph) -> str:
    """A flowchart: arrows from an item to what waits on it, dashed links between conflicting
    items, nodes coloured by status (items with an error get the `error` class).

    A queue larger than `MERMAID_MAX_NODES` items or `MERMAID_MAX_EDGES` links is drawn in part
    (unfinished items first, by id) with a comment saying so; the plan's other fields are complete.
    """
    error_files = {d.file for d in graph.errors if d.file}
    in_cycle = {node for component in graph.cycles for node in component}
    nodes = list(graph.by_id)
    if len(nodes) > MERMAID_MAX_NODES:
        nodes.sort(key=lambda item_id: (graph.by_id[item_id].status == "completed", item_id))
        nodes = sorted(nodes[:MERMAID_MAX_NODES])
    shown = set(nodes)
    names = {item_id: "n" + graph.by_id[item_id].id_str for item_id in nodes}
    lines = ["flowchart LR", *("    " + line for line in _MERMAID_CLASSES)]
    for item_id in nodes:
        item = graph.by_id[item_id]
        css = "error" if item.file in error_files or item_id in in_cycle else item.status
        lines.append(f'    {names[item_id]}["{_mermaid_label(f"{item.id_str}: {item.title}")}"]:::{css}')
    links = [f"    {names[item_id]} --> {names[successor]}"
             for item_id in nodes for successor in graph.unblocks[item_id] if successor in shown]
    index = graph.conflict_index
    links += [f"    {names[first]} -.- {names[second]}"
              for first in nodes if first in index.keys and index.has_conflict(first)
              for second in sorted(index.neighbours(first) & shown) if second > first]
    lines += links[:MERMAID_MAX_EDGES]
    if len(nodes) < len(graph.by_id) or len(links) > MERMAID_MAX_EDGES:
        lines.append(f"    %% drawn in part: {len(nodes)} of {len(graph.by_id)} items, "
                     f"{min(len(links), MERMAID_MAX_EDGES)} of {len(links)} links among them "
                     f"(Mermaid renders at most about {MERMAID_MAX_EDGES} links)")
    return "\n".join(lines) + "\n"


# --- the plan ------------------------------------------------------------------------------------------


def make_plan(items: Sequence[WorkItem], diagnostics: Sequence[Diagnostic], max_parallel: int,
              running: int = 0) -> QueuePlan:
    """The `queue_plan` result for these items.

    `running` counts slots already taken by work that is not an in-progress item of this queue
    (in-progress items take their slots themselves); it shrinks `run_now` only: `waves` plan the
    whole `max_parallel` budget from now on.
    """
    if max_parallel < 1:
        raise UsageError(f"max_parallel must be at least 1, not {max_parallel}")
    if running < 0:
        raise UsageError(f"running must not be negative, not {running}")
    return _make_plan(items, diagnostics, max_parallel, running)


def _make_plan(items: Sequence[WorkItem], diagnostics: Sequence[Diagnostic], max_parallel: int,
               running: int) -> QueuePlan:
    graph = build_graph(items, diagnostics)
    schedule = simulate(graph, max_parallel)
    run_now = Scheduler(graph).start_next(max_parallel - running - len(graph.in_progress))
    labels, index = graph.labels, graph.conflict_index
    # Built as plain data and validated in one call: per-row model construction costs more than
    # the whole warm re-plan budget at 10,000 items.
    return QueuePlan.model_validate({
        "items": [_plan_item(graph, item) for item in graph.items],
        "run_now": [labels[item_id] for item_id in run_now],
        "waves": [[labels[item_id] for item_id in wave] for wave in schedule.waves],
        "critical_path": [labels[item_id] for item_id in critical_path(graph)],
        "conflicts": [{"a": labels[a], "b": labels[b], "files": files, "components": components}
                      for a, b in index.pairs(MAX_CONFLICTS_SHOWN) for files, components in [index.shared(a, b)]],
        "conflicts_total": index.pair_count(),
        "conflict_groups": [{"kind": kind, "name": index.names[(kind, name)],
                             "items": [labels[holder] for holder in holders],
                             "overlaps": [index.names[other] for other in overlaps[:MAX_OVERLAPS_SHOWN]],
                             "overlaps_total": len(overlaps)}
                            for (kind, name), holders, overlaps in index.groups()],
        "patterns": find_patterns(graph),
        "errors": graph.errors,
        "warnings": graph.warnings,
        "max_parallel": max_parallel,
        "predicted_makespan": schedule.makespan_ms / 1000,
        "lower_bound": lower_bound_ms(graph, max_parallel) / 1000,
        "mermaid": to_mermaid(graph),
    })


def _plan_item(graph: QueueGraph, item: WorkItem) -> dict[str, Any]:
    """One `PlanItem` as plain data."""
    labels = graph.labels
    node = item.id in graph.by_id
    blocked_by = graph.waits_on[item.id] if node else item.blocked_by
    blocks = graph.unblocks[item.id] if node else item.blocks
    reason = graph.reasons.get(item.file)
    return {
        "id": item.id_str, "file": item.file, "title": item.title, "status": item.status,
        "blocked_by": [labels.get(i) or format_id(i) for i in blocked_by],
        "blocks": [labels.get(i) or format_id(i) for i in blocks],
        "files": item.files, "components": item.components, "priority": item.priority,
        "estimate": item.estimate_s, "ready": item.status == "pending" and reason is None,
        "waiting_on": [labels[i] for i in graph.waiting_on.get(item.file, ())],
        "reason": reason,
    }


# ====================================================================================================
# queue/plan.py
# ====================================================================================================
_PLANS_KEPT = 8
"""Plans kept per unchanged queue snapshot (one per max_parallel/running/config combination)."""


def plan_workspace(root: Path, queue_dir: str | None, max_parallel: int | None, reader: QueueReader,
                   *, running: int = 0) -> QueuePlan:
    """Plan the queue of the workspace at `root`; arguments left None come from the config.

    Raises `PathOutsideWorkspace` for a queue_dir that resolves outside `root`, `QueueError`
    for a missing queue directory or an unusable config, `UsageError` for a bad `max_parallel`.
    Problems inside the queue are in the plan's `errors` and `warnings`, never raised.

    While no queue file changes, the reader returns the same snapshot and the plan computed for it
    is returned again (the same object: treat it as read-only).

    Planning never changes a file. An in-progress item whose claiming server no longer runs is
    reported as a ``stale_claim`` warning and left as it is; ``run_queue``, ``update_item`` and
    ``agent-parallel run`` move such items to blocked (``claims.release_stale_claims``).
    """
    root = root.resolve()
    config, config_warnings = load_config(root)
    slots = max_parallel_for(max_parallel, config)
    snapshot = reader.snapshot(root, queue_dir or config.queue_dir)
    key = ("plan", slots, running, tuple(config_warnings))
    plan = snapshot.memo.get(key)
    if plan is None:
        diagnostics = list(snapshot.diagnostics)
        diagnostics += [Diagnostic(kind="config", file=CONFIG_FILE, message=text) for text in config_warnings]
        plan = make_plan(snapshot.items, diagnostics, slots, running=running)
        if len(snapshot.memo) >= _PLANS_KEPT:
            snapshot.memo.clear()
        snapshot.memo[key] = plan
    stale = _stale_claim_warnings(root, [item for item in snapshot.items if item.status == "in_progress"])
    if stale:
        plan = plan.model_copy(update={"warnings": stale + plan.warnings})
    return plan


def _stale_claim_warnings(root: Path, in_progress: list[WorkItem]) -> list[Diagnostic]:
    """A warning per in-progress item claimed by a server that no longer runs (read-only)."""
    if not in_progress:
        return []
    try:
        runs = resolve_inside(root, RUNS_DIR, "the runs directory")
    except UsageError:
        return []  # a runs directory outside the workspace is not read (see paths.runs_dir)
    names = {item.id_str: item for item in in_progress}
    found = stale_claims(runs, [ItemName(item.id, item.id_str, item.status, item.slug) for item in in_progress])
    return [Diagnostic(
        kind="stale_claim", item=name.id_str, file=names[name.id_str].file,
        message=(f"claimed by {claim.get('by', 'an unknown claimant')} of a server (pid {claim.get('pid')}) that "
                 "no longer runs; planning leaves it in_progress. run_queue or update_item will move it to blocked; "
                 "it is not re-run automatically (at-most-once): check whether its work was done"))
        for name, claim in found]
