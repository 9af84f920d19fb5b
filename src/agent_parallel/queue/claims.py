"""Moving a queue item's status: the one place that renames item files.

Status lives only in the file name (``007-pending-x.md`` → ``007-in_progress-x.md``). A move is
exclusive: it renames with ``renameat2(RENAME_NOREPLACE)`` (``link`` + ``unlink`` where the file
system lacks it), so a rename never overwrites a file, and the source name vanishing under us
means another claimant won. Moves also hold an ``flock`` on ``.agent/runs/queue.lock``, so a run
can make "compute the ready set + claim" one step across agents and server processes.

Every move is appended to ``.agent/runs/history.jsonl`` (who, when, why), which is also where a
loser learns who won. A move is all-or-nothing: when its history line cannot be written (a full
disk), the rename is undone. The history is bounded: past `HISTORY_ROTATE_BYTES` it becomes
``history.1.jsonl`` (one old file is kept), and the lookups made under the lock read it from the
end, only as far as they need.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import QueueError
from ..paths import IS_DIRECTORY, open_regular, take_flock
from .names import MAX_ID_DIGITS, ItemName, format_id, parse_item_ref, parse_name
from ..text import short_repr
from ..tasks.processes import process_start_time, same_process

TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"in_progress"}),
    "in_progress": frozenset({"completed", "failed", "blocked"}),
    "blocked": frozenset({"pending"}),
    "failed": frozenset({"pending"}),
    "completed": frozenset(),
}
"""Allowed status moves. Never ``in_progress → pending``: the item may be running, and a pending
item can be started again (twice at once). A run gives back a claim that never ran with
`release_claim`."""

HISTORY_FILE = "history.jsonl"
OLD_HISTORY_FILE = "history.1.jsonl"
HISTORY_ROTATE_BYTES = 1024 * 1024
"""Past this size `history.jsonl` becomes `history.1.jsonl` (replacing the older one)."""
MAX_REASON_CHARS = 2000
"""A move's reason is cut to this length in the history, so one line stays small."""
_READ_BACK_BYTES = 2 * HISTORY_ROTATE_BYTES
LOCK_FILE = "queue.lock"
LOCK_TIMEOUT_S = 10.0
"""Longest `queue_lock` waits; a move takes milliseconds, so a longer wait means a stuck holder."""
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


class ClaimLost(QueueError):
    """Raised when another agent or server claimed (or moved) the item first."""


class BadTransition(QueueError):
    """Raised for a status move the item's current status does not allow."""


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
"""The queue lock file is ours: never a symlink followed, never an open that waits."""

_holding = threading.local()
"""Per thread: the runs directories whose queue lock this thread holds (``queue_lock_now``), so
that the moves made under it do not take it again (a second ``flock`` would wait for the first)."""


def _held_here() -> set[Path]:
    held: set[Path] | None = getattr(_holding, "dirs", None)
    if held is None:
        held = _holding.dirs = set()
    return held


@contextmanager
def queue_lock(runs_dir: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the queue's exclusive lock: across threads, processes and servers.

    Gives up with a `QueueError` naming the lock file once `timeout_s` (default `LOCK_TIMEOUT_S`)
    pass with the lock held and no item moved meanwhile: a holder that never lets go (a stopped
    process, a hung file system) must not hang every caller with it. Busy is not stuck: while
    other claimants keep moving items (the history grows), the wait goes on, so fifty agents
    sharing one queue never time out each other. Inside ``queue_lock_now`` (this thread holds the
    lock already) it is held as it is.
    """
    if runs_dir in _held_here():
        yield
        return
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    path = runs_dir / LOCK_FILE
    try:
        fd = os.open(path, _LOCK_FLAGS, 0o644)
    except OSError as exc:
        raise QueueError(f"cannot open the queue lock {path}: {exc.strerror}; check that {runs_dir} "
                         "exists and is writable") from exc
    try:
        deadline = time.monotonic() + timeout_s
        progress: tuple[int, int] | None | bool = False  # the history's mark, taken at the first refusal

        def still_waiting() -> None:
            nonlocal progress, deadline
            if progress is False:
                progress = _history_mark(runs_dir)
            now, mark = time.monotonic(), _history_mark(runs_dir)
            if mark != progress:  # someone moved an item: contention, not a stuck holder
                progress, deadline = mark, now + timeout_s
            elif now >= deadline:
                raise QueueError(
                    f"the queue lock {path} has been held by another process for over {timeout_s:g} s with "
                    f"no item moved meanwhile; nothing was moved. Try again; if it persists, find the holder "
                    f"with `fuser {path}` (another agent-parallel server or run) and stop it") from None

        take_flock(fd, still_waiting, max_pause=0.01)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def queue_lock_now(runs_dir: Path) -> Iterator[bool]:
    """The queue's lock if it can be had without waiting: True, held until the block ends (the moves
    made inside in this thread use it as it is); False when someone else holds it (nothing held: the
    caller moves another way, e.g. in a worker thread that may wait) or the lock file cannot be opened.
    On an event loop the block must not await: another coroutine of the thread would find the lock
    "held" too."""
    try:
        fd = os.open(runs_dir / LOCK_FILE, _LOCK_FLAGS, 0o644)
    except OSError:
        yield False
        return
    held = _held_here()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        held.add(runs_dir)
        try:
            yield True
        finally:
            held.discard(runs_dir)
    finally:
        os.close(fd)  # closing releases the lock


def _history_mark(runs_dir: Path) -> tuple[int, int] | None:
    """Size and change time of the history: it grows with every move, so a change means progress."""
    try:
        st = os.stat(runs_dir / HISTORY_FILE)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def find_item(queue_dir: Path, item_id: int) -> tuple[Path, ItemName]:
    """The one file holding item ``item_id``; a clear error if there is none or more than one."""
    found: list[tuple[Path, ItemName]] = []
    try:
        with os.scandir(queue_dir) as listing:
            for entry in listing:
                # only a name whose leading ASCII digits are the id is parsed (parsing all 10,000 names of a
                # queue cost 30 ms, three times per update_item)
                digits = entry.name.partition("-")[0]
                if entry.name.endswith(".md") and digits.isascii() and digits.isdigit() and int(digits) == item_id:
                    name = parse_name(entry.name)
                    if isinstance(name, ItemName):
                        found.append((Path(entry.path), name))
    except OSError as exc:
        raise QueueError(f"queue directory {queue_dir} cannot be listed ({exc.strerror}); create it, or set "
                         "queue.dir in .agent/config.yaml") from None
    if not found:
        raise QueueError(f"no queue item has id {format_id(item_id)} in {queue_dir}; call queue_plan to see the items")
    if len(found) > 1:
        names = ", ".join(sorted(p.name for p, _ in found))
        raise QueueError(f"item {format_id(item_id)} has several files ({names}); remove the duplicates first")
    if found[0][0].is_dir():
        raise QueueError(f"item {format_id(item_id)}'s {found[0][0].name} {IS_DIRECTORY}; it was not moved")
    return found[0]


def _known_file(known: Path | None, item_id: int) -> tuple[Path, ItemName] | None:
    if known is None:
        return None
    try:
        if stat.S_ISDIR(os.stat(known).st_mode):
            return None
    except (OSError, ValueError):  # gone (or a name the OS refuses): the directory is listed instead
        return None
    name = parse_name(known.name)
    return (known, name) if isinstance(name, ItemName) and name.id == item_id else None


def parse_item_id(text: str) -> int:
    """``"007"``, ``"7"``, ``"#7"`` and ``"007-add-login"`` all mean item 7: what `blocked_by` accepts
    (`queue.parse_item_ref`, ASCII digits only)."""
    try:
        return parse_item_ref(text)
    except ValueError as exc:
        if "digits" in str(exc):
            raise QueueError(f"item {short_repr(text)} has more than {MAX_ID_DIGITS} digits; item ids have at most "
                             f"{MAX_ID_DIGITS} (give the number from the file name, e.g. \"007\")") from None
        raise QueueError(f"item {short_repr(text)} is not an item id; give the number from the file name, "
                         f"e.g. \"007\"") from None


def move_item(queue_dir: Path, runs_dir: Path, item_id: int, to_status: str, *, by: str,
              reason: str | None = None, expect: str | None = None, owned: bool = False,
              known: Path | None = None) -> Path:
    """Move item ``item_id`` to ``to_status``; return its new path.

    ``expect`` (default: any status the transition table allows) is the status the caller
    believes the item has. ``owned``: this process carries the item out (a run or launch_task),
    so if the process dies the claim is stale (see ``release_stale_claims``). Raises
    ``ClaimLost`` when another claimant moved it first and ``BadTransition`` when the move is not
    allowed from the current status. ``known``: where the caller last saw the file; used
    without listing the directory when it is still there (a run moves each item twice, and
    listing is O(queue size) under the lock).
    """
    with queue_lock(runs_dir):
        path, name = _known_file(known, item_id) or find_item(queue_dir, item_id)
        _check_transition(runs_dir, name, to_status, expect)
        return _move(runs_dir, path, name, to_status, by=by, reason=reason, owned=owned)


def release_claim(queue_dir: Path, runs_dir: Path, item_id: int, *, by: str, reason: str,
                  known: Path | None = None) -> Path:
    """Give back a claim that never ran: in_progress -> pending, for a run that claimed the item
    but could not start it (or was cancelled before it did). Not for anything that may be running;
    the public transitions (`move_item`) never allow it. Raises `ClaimLost` when the item is no
    longer in_progress."""
    with queue_lock(runs_dir):
        path, name = _known_file(known, item_id) or find_item(queue_dir, item_id)
        if name.status != "in_progress":
            raise ClaimLost(f"item {name.id_str} is {name.status}, not in_progress: it was moved by "
                            f"{last_mover(runs_dir, name.id_str)}")
        return _move(runs_dir, path, name, "pending", by=by, reason=reason)


def _move(runs_dir: Path, path: Path, name: ItemName, to_status: str, *, by: str, reason: str | None,
          owned: bool = False) -> Path:
    """Rename the item file and record the move, all or nothing (the caller holds the lock)."""
    target = path.with_name(f"{name.id_str}-{to_status}-{name.slug}.md")
    try:
        rename_noreplace(path, target)
    except FileNotFoundError:  # another process without our lock moved it first
        raise ClaimLost(f"item {name.id_str} was just moved by someone else; call queue_plan to see its status") from None
    except FileExistsError:
        raise QueueError(f"cannot move item {name.id_str}: {target.name} already exists; "
                         "remove the duplicate file first") from None
    except OSError as exc:
        raise QueueError(f"cannot move item {name.id_str} ({path.name} -> {target.name}): {exc.strerror}; "
                         "nothing was changed") from None
    try:
        record_move(runs_dir, name.id_str, name.status, to_status, by=by, reason=reason, owned=owned)
    except OSError as exc:
        cause = f"the run history {runs_dir / HISTORY_FILE} cannot be written ({exc.strerror or exc})"
        fix = ("free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
               else f"check that {runs_dir} exists and is writable")
        try:
            rename_noreplace(target, path)
        except OSError as undo:
            raise QueueError(f"item {name.id_str} was moved to {to_status} ({target.name}) but {cause}, and "
                             f"moving it back failed too ({undo.strerror}); {fix}, then check the item") from None
        raise QueueError(f"cannot move item {name.id_str} to {to_status}: {cause}; nothing was changed. "
                         f"{fix[0].upper() + fix[1:]} and try again") from None
    return target


def _check_transition(runs_dir: Path, name: ItemName, to_status: str, expect: str | None) -> None:
    if to_status not in TRANSITIONS:
        raise QueueError(f"unknown status {to_status!r}; use one of {', '.join(TRANSITIONS)}")
    if name.status == "in_progress" and to_status == "in_progress":
        raise ClaimLost(f"item {name.id_str} is already claimed by {claimant(runs_dir, name.id_str)}")
    if expect is not None and name.status != expect:
        raise ClaimLost(f"item {name.id_str} is {name.status}, not {expect}: "
                        f"it was moved by {last_mover(runs_dir, name.id_str)}")
    if to_status not in TRANSITIONS[name.status]:
        allowed = ", ".join(sorted(TRANSITIONS[name.status])) or "nothing (it is final)"
        raise BadTransition(f"item {name.id_str} is {name.status}; it can move to {allowed}, not {to_status}")


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with ``FileExistsError`` if ``dst`` exists."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    os.link(src, dst)  # fails with EEXIST instead of replacing
    os.unlink(src)


def _load_renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


_HISTORY_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
"""Moves are made on the event loop too (``queue_lock_now``): a FIFO planted at the history's name
fails the open (ENXIO) instead of blocking it, and a symlink is refused instead of followed."""


@functools.lru_cache(maxsize=64)
def _history_path(runs_dir: Path) -> Path:
    return runs_dir / HISTORY_FILE


def record_move(runs_dir: Path, item: str, old: str | None, new: str, *, by: str, reason: str | None,
                owned: bool = False) -> None:
    """Append one line to the run history (a single small O_APPEND write: lines never interleave).

    An ``owned`` claim also records this process (pid and start time), to tell later whether
    the claimant still exists.
    """
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 25] + f" … ({len(reason)} characters)"
    move = {"time": time.time(), "item": item, "from": old, "to": new, "by": by, "reason": reason}
    if owned:
        move["pid"], move["pid_start"] = _me()
    line = (json.dumps(move) + "\n").encode()
    path = _history_path(runs_dir)
    fd = os.open(path, _HISTORY_FLAGS, 0o644)
    if os.fstat(fd).st_size + len(line) > HISTORY_ROTATE_BYTES:
        os.close(fd)  # callers hold the queue lock: no writer races the rotation
        os.replace(path, runs_dir / OLD_HISTORY_FILE)
        fd = os.open(path, _HISTORY_FLAGS, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):  # a short write: the disk filled up mid-line; take it back
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    finally:
        os.close(fd)


_ME: tuple[int, int | None] | None = None


def _me() -> tuple[int, int | None]:
    """This process's pid and start time (read once per process: a fork gets its own)."""
    global _ME
    if _ME is None or _ME[0] != os.getpid():
        _ME = (os.getpid(), process_start_time(os.getpid()))
    return _ME


def _moves_newest_first(runs_dir: Path) -> Iterator[dict[str, Any]]:
    """The recorded moves from the newest back, reading the files from their end in blocks, so a
    lookup that finds its answer near the end reads only that far. At most `_READ_BACK_BYTES` of
    each file are read: rotation keeps them smaller, but a file written before rotation existed
    (or by hand) may be of any size."""
    for name in (HISTORY_FILE, OLD_HISTORY_FILE):
        if (stream := _open_history(runs_dir / name)) is None:
            continue
        with stream:
            position = stream.seek(0, os.SEEK_END)
            stop = max(0, position - _READ_BACK_BYTES)
            rest = b""
            while position > stop:
                step = min(65536, position - stop)
                position -= step
                stream.seek(position)
                lines = (stream.read(step) + rest).split(b"\n")
                rest = lines[0]
                for line in reversed(lines[1:]):
                    if move := _parse_move(line):
                        yield move
            if stop == 0 and (move := _parse_move(rest)):
                yield move  # the first line (a cut line at `stop` is not a whole move)


def _open_history(path: Path) -> BinaryIO | None:
    """The history file for reading, or None when there is none we can read: never a symlink
    followed, never an open that waits (a FIFO planted there, on the event loop), only a regular file."""
    try:
        return os.fdopen(open_regular(path), "rb")
    except OSError:
        return None


def _parse_move(line: bytes) -> dict[str, Any] | None:
    try:
        move = json.loads(line)
    except (ValueError, RecursionError):  # not a line of ours (a planted history may nest without end)
        return None
    return move if isinstance(move, dict) else None


def history(runs_dir: Path, item: str | None = None) -> list[dict[str, Any]]:
    """The recorded moves still kept (both files), oldest first (of one item if given)."""
    moves = [move for move in _moves_newest_first(runs_dir) if item is None or move.get("item") == item]
    moves.reverse()
    return moves


def last_moves(runs_dir: Path, items: set[str], *, to: str | None = None) -> dict[str, dict[str, Any]]:
    """Item -> its latest recorded move (only moves to `to` if given), reading from the end and
    stopping once every item of `items` is found."""
    found: dict[str, dict[str, Any]] = {}
    if not items:
        return found
    for move in _moves_newest_first(runs_dir):
        item = move.get("item")
        if item in items and item not in found and (to is None or move.get("to") == to):
            found[item] = move
            if len(found) == len(items):
                break
    return found


def last_move_and_claim(runs_dir: Path, item: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The item's latest recorded move and its latest move to in_progress (its claim), in one
    pass over the history from its end (what ``last_moves`` gives for each, read once)."""
    last = claim = None
    for move in _moves_newest_first(runs_dir):
        if move.get("item") != item:
            continue
        if last is None:
            last = move
        if move.get("to") == "in_progress":
            claim = move
            break
    return last, claim


def release_stale_claims(queue_dir: Path, runs_dir: Path) -> list[tuple[str, str, str]]:
    """Move items whose claiming process no longer exists from in_progress to blocked.

    At-most-once: such an item may have run partly or fully, so it is never re-run
    automatically; the reason (recorded in the history) says what to do. Claims made with
    ``update_item`` (an agent doing the work itself) are never stale by this rule.
    Returns (item, file, message) for each item moved.
    """
    if not queue_dir.is_dir():
        return []
    with os.scandir(queue_dir) as listing:  # (only names that can hold an in_progress item are parsed)
        in_progress = [name for entry in listing
                       if entry.name.endswith(".md") and "-in_progress-" in entry.name
                       and isinstance(name := parse_name(entry.name), ItemName) and name.status == "in_progress"]
    released = []
    for name, claim in stale_claims(runs_dir, in_progress):
        reason = (f"claimed by {claim.get('by', 'an unknown claimant')} of a server (pid {claim['pid']}) that no longer runs; not re-run "
                  "automatically (at-most-once): check whether its work was done, then move it with update_item "
                  "(blocked -> pending to run it again)")
        try:
            target = move_item(queue_dir, runs_dir, name.id, "blocked", by="agent-parallel (stale claim)",
                               reason=reason, expect="in_progress")
        except QueueError:
            continue  # moved meanwhile by someone else: not ours to fix
        released.append((name.id_str, target.name, reason))
    return released


def stale_claims(runs_dir: Path, in_progress: list[ItemName]) -> list[tuple[ItemName, dict[str, Any]]]:
    """The in-progress items whose recorded claim was made by a process that no longer runs, with
    that claim. Read-only (the plan reports them; `release_stale_claims` moves them). Claims made
    with ``update_item`` (an agent doing the work itself) record no process and are never stale."""
    claims = last_moves(runs_dir, {name.id_str for name in in_progress}, to="in_progress")
    stale = []
    for name in in_progress:
        claim = claims.get(name.id_str)
        if claim and isinstance(claim.get("pid"), int) and not same_process(claim["pid"], claim.get("pid_start")):
            stale.append((name, claim))
    return stale


def claimant(runs_dir: Path, item: str) -> str:
    claim = last_moves(runs_dir, {item}, to="in_progress").get(item)
    return str(claim.get("by")) if claim else "another agent (no claim was recorded; it was moved by hand)"


def last_mover(runs_dir: Path, item: str) -> str:
    move = last_moves(runs_dir, {item}).get(item)
    return str(move.get("by")) if move else "another agent or by hand"


