"""The workspace root and the one rule for paths: everything resolves inside it.

Checks use ``Path.resolve()`` and ``is_relative_to``, never string prefixes, so ``..``,
absolute paths and symlinks pointing out are all caught the same way. That includes the
server's own run directory: a cloned repository can ship ``.agent`` or ``.agent/runs`` as a
symlink to somewhere else, and nothing is ever written through it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from .errors import PathOutsideWorkspace, UsageError

AGENT_DIR = ".agent"
RUNS_DIR = ".agent/runs"
QUEUE_DIR = ".agent/queue"
CONFIG_FILE = ".agent/config.yaml"


def resolve_inside(root: Path, given: str | Path, what: str) -> Path:
    """Resolve ``given`` (relative to ``root``) and refuse it if it lands outside ``root``.

    ``root`` must already be resolved. ``what`` names the argument in the error message.
    """
    path = (root / given).resolve()
    if not path.is_relative_to(root):
        raise PathOutsideWorkspace(what, str(given), str(root))
    return path


def ensure_runs_dir(root: Path, runs: Path) -> None:
    """Make ``runs`` again if it vanished while the server runs (``git clean -fdX`` removes it): the
    workspace's own runs directory (``runs_dir``, with its ``.gitignore``), or another one given."""
    if runs.is_dir():
        return
    if runs == root.resolve() / RUNS_DIR:
        runs_dir(root)
    else:
        runs.mkdir(parents=True, exist_ok=True)


def runs_dir(root: Path) -> Path:
    """Where task records and logs live; created with a ``.gitignore`` so run data is never committed.

    Refused (``UsageError``) when it resolves outside ``root``, e.g. through a symlinked
    ``.agent`` or ``.agent/runs``; the ``.gitignore`` is never written through a symlink.
    """
    root = root.resolve()
    path = root / RUNS_DIR
    _check_inside(root, path)
    path.mkdir(parents=True, exist_ok=True)
    _check_inside(root, path)  # created through a link that appeared meanwhile: still refused
    try:
        fd = os.open(path / ".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return path  # there already (a file, or a link we leave alone)
    try:
        os.write(fd, b"*\n")
    finally:
        os.close(fd)
    return path


def write_atomic(path: Path, data: bytes, *, durable: bool = False, sync_dir: bool = True) -> None:
    """THE atomic write: ``data`` into ``.NAME.tmp`` next to ``path``, then renamed over it, so a
    reader sees the old file or the new one, never half of one.

    ``durable`` also fsyncs the file before the rename and the directory after it, so the new file
    survives a crash (final states); without it the write may be lost, never torn. ``sync_dir=False``
    leaves the directory's fsync to the caller (``GroupCommit`` does it once for a batch). The temporary
    file is removed when the write fails (a full disk).

    The temporary file is created new (``O_EXCL | O_NOFOLLOW``); whatever already has its name (a
    leftover of a crash, or a symlink a cloned repository planted there to have us write through it)
    is removed and the file created again: a write never goes anywhere but into this directory.
    """
    tmp = atomic_temporary(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileExistsError:  # (O_EXCL: a symlink there counts as existing; it is never followed)
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o644)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable and sync_dir:
        fsync_dir(path.parent)


def atomic_temporary(path: Path) -> Path:
    """The temporary file ``write_atomic`` writes ``path`` through (a crash may leave it behind)."""
    return path.with_name(f".{path.name}.tmp")


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


NOT_REGULAR = "is not a regular file (a device, socket or pipe); refused"
"""What a reader says of a queue item or config file that ``open_regular`` refused."""
IS_DIRECTORY = ("is a directory, not an item file; refused (an item is one file: move what it holds elsewhere "
                "and give the item a file of its own)")
"""What the queue reader says of a directory named like an item (``update_item`` and runs refuse to move it)."""


def open_regular(path: Path) -> int:
    """Open ``path`` for reading only if it is a regular file (no symlink followed, no FIFO whose
    open would wait, no device): an fd. Raises ``OSError`` (EINVAL when it is not a regular file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes, opened as ``open_regular``
    does: a symlink or FIFO planted at its name (``-> /dev/zero`` would be read until memory runs
    out) is refused, never read. Raises ``OSError``: EINVAL when it is not a regular file, EFBIG
    when it holds more than ``limit`` bytes."""
    fd = open_regular(path)
    try:
        if os.fstat(fd).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > limit:  # it grew while being read
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
    return b"".join(chunks)


def fsync_dir(directory: Path) -> None:
    """Make ``directory``'s entries (a file created, renamed or removed in it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_inside(root: Path, path: Path) -> None:
    real = path.resolve()
    if not real.is_relative_to(root):
        raise UsageError(
            f"{RUNS_DIR} resolves to {real}, outside the workspace root {root} (a symbolic link in {AGENT_DIR}?); "
            "task records and logs are only written inside the workspace: remove the link "
            f"(or point it inside {root}) and start again")


def take_flock(fd: int, still_waiting: Callable[[], None], *, max_pause: float) -> None:
    """Take an exclusive ``flock`` on ``fd`` (shared with every thread, process and server on this
    machine), trying again after 1 ms, then twice as long each time up to ``max_pause``.

    ``still_waiting`` is called after each refusal; it raises to give up (the caller's timeout and
    message: a queue lock waits as long as items move, a worktree lock for a fixed time)."""
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            still_waiting()
            time.sleep(pause)
            pause = min(pause * 2, max_pause)
