"""Moving a queue item's status: the one place that renames item files.

Status lives only in the file name (``007-pending-x.md`` → ``007-in_progress-x.md``). A move is
exclusive: it renames with ``renameat2(RENAME_NOREPLACE)`` (``link`` + ``unlink`` where the file
system lacks it), so a rename never overwrites a file, and the source name vanishing under us
means another claimant won. Moves also hold an ``flock`` on ``.agent/runs/queue.lock``, so a run
can make "compute the ready set + claim" one step across agents and server processes.

Every move is appended to ``.agent/runs/history.jsonl`` (who, when, why), which is also where a
loser learns who won.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import QueueError
from .queue import ItemName, format_id, parse_file_name
from .runner.executor import process_start_time

TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"in_progress"}),
    "in_progress": frozenset({"completed", "failed", "blocked", "pending"}),
    "blocked": frozenset({"pending"}),
    "failed": frozenset({"pending"}),
    "completed": frozenset(),
}
"""Allowed status moves. ``in_progress → pending`` only releases a claim that never ran (used by runs)."""

HISTORY_FILE = "history.jsonl"
LOCK_FILE = "queue.lock"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


class ClaimLost(QueueError):
    """Raised when another agent or server claimed (or moved) the item first."""


class BadTransition(QueueError):
    """Raised for a status move the item's current status does not allow."""


@contextmanager
def queue_lock(runs_dir: Path) -> Iterator[None]:
    """Hold the queue's exclusive lock (blocking): across threads, processes and servers."""
    fd = os.open(runs_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def find_item(queue_dir: Path, item_id: int) -> tuple[Path, ItemName]:
    """The one file holding item ``item_id``; a clear error if there is none or more than one."""
    found: list[tuple[Path, ItemName]] = []
    for entry in os.scandir(queue_dir):
        if entry.name.endswith(".md"):
            name = parse_file_name(entry.name)
            if isinstance(name, ItemName) and name.id == item_id:
                found.append((Path(entry.path), name))
    if not found:
        raise QueueError(f"no queue item has id {format_id(item_id)} in {queue_dir}; call queue_plan to see the items")
    if len(found) > 1:
        names = ", ".join(sorted(p.name for p, _ in found))
        raise QueueError(f"item {format_id(item_id)} has several files ({names}); remove the duplicates first")
    return found[0]


def _known_file(known: Path | None, item_id: int) -> tuple[Path, ItemName] | None:
    if known is None or not known.exists():
        return None
    name = parse_file_name(known.name)
    return (known, name) if isinstance(name, ItemName) and name.id == item_id else None


def parse_item_id(text: str) -> int:
    """``"007"``, ``"7"`` and ``"#7"`` all mean item 7."""
    cleaned = text.strip().lstrip("#")
    if not cleaned.isdigit() or len(cleaned) > 9:
        raise QueueError(f"item {text!r} is not an item id; give the number from the file name, e.g. \"007\"")
    return int(cleaned)


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
        target = path.with_name(f"{name.id_str}-{to_status}-{name.slug}.md")
        try:
            rename_noreplace(path, target)
        except FileNotFoundError:  # another process without our lock moved it first
            raise ClaimLost(f"item {name.id_str} was just moved by someone else; call queue_plan to see its status") from None
        except FileExistsError:
            raise QueueError(f"cannot move item {name.id_str}: {target.name} already exists; "
                             "remove the duplicate file first") from None
        record_move(runs_dir, name.id_str, name.status, to_status, by=by, reason=reason, owned=owned)
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


def _load_renameat2():  # type: ignore[no-untyped-def]
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def record_move(runs_dir: Path, item: str, old: str | None, new: str, *, by: str, reason: str | None,
                owned: bool = False) -> None:
    """Append one line to the run history (a single small O_APPEND write: lines never interleave).

    An ``owned`` claim also records this process (pid and start time), to tell later whether
    the claimant still exists.
    """
    move = {"time": time.time(), "item": item, "from": old, "to": new, "by": by, "reason": reason}
    if owned:
        move["pid"], move["pid_start"] = os.getpid(), process_start_time(os.getpid())
    line = json.dumps(move) + "\n"
    fd = os.open(runs_dir / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def history(runs_dir: Path, item: str | None = None) -> list[dict]:
    """The recorded moves, oldest first (of one item if given)."""
    try:
        lines = (runs_dir / HISTORY_FILE).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    moves = []
    for line in lines:
        try:
            move = json.loads(line)
        except ValueError:
            continue
        if item is None or move.get("item") == item:
            moves.append(move)
    return moves


def release_stale_claims(queue_dir: Path, runs_dir: Path) -> list[tuple[str, str, str]]:
    """Move items whose claiming process no longer exists from in_progress to blocked.

    At-most-once: such an item may have run partly or fully, so it is never re-run
    automatically; the reason (recorded in the history) says what to do. Claims made with
    ``update_item`` (an agent doing the work itself) are never stale by this rule.
    Returns (item, file, message) for each item moved.
    """
    if not queue_dir.is_dir():
        return []
    in_progress = [name for entry in os.scandir(queue_dir)
                   if entry.name.endswith(".md") and isinstance(name := parse_file_name(entry.name), ItemName)
                   and name.status == "in_progress"]
    if not in_progress:
        return []
    last_claim: dict[str, dict] = {}
    for move in history(runs_dir):
        if move.get("to") == "in_progress":
            last_claim[move.get("item")] = move
    released = []
    for name in in_progress:
        claim = last_claim.get(name.id_str)
        if not claim or "pid" not in claim or _alive(claim["pid"], claim.get("pid_start")):
            continue
        reason = (f"claimed by {claim['by']} of a server (pid {claim['pid']}) that no longer runs; not re-run "
                  "automatically (at-most-once): check whether its work was done, then move it with update_item "
                  "(blocked -> pending to run it again)")
        try:
            target = move_item(queue_dir, runs_dir, name.id, "blocked", by="agent-parallel (stale claim)",
                               reason=reason, expect="in_progress")
        except QueueError:
            continue  # moved meanwhile by someone else: not ours to fix
        released.append((name.id_str, target.name, reason))
    return released


def _alive(pid: int, start: int | None) -> bool:
    """Whether the claiming process still runs (unknown start time: assume it does)."""
    return start is None or process_start_time(pid) == start


def claimant(runs_dir: Path, item: str) -> str:
    claims = [m for m in history(runs_dir, item) if m.get("to") == "in_progress"]
    return claims[-1]["by"] if claims else "another agent (no claim was recorded; it was moved by hand)"


def last_mover(runs_dir: Path, item: str) -> str:
    moves = history(runs_dir, item)
    return moves[-1]["by"] if moves else "another agent or by hand"
