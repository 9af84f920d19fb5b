"""The record journal: one ``fdatasync`` makes a whole batch of final records durable.

A final task record must survive a crash. Made durable one file at a time, each costs an fsync
of the file, and each batch one of its directory: on this project's ext4 VMs about 0.6 ms of CPU
each (every one a journal commit of the file system), 1.8 ms of the server's CPU per trivial task.
``GroupCommit`` appends a batch's final records to this journal instead, in one write made durable
by one ``fdatasync``, then writes each record file as usual but without an fsync (the registry's a
second later, many at once: ``group_commit.py``; a checkpoint waits until they are written). The journal is
what makes them durable: after a crash, ``recover`` writes back (durably) every record the journal
holds whose file was lost, torn, or still shows the task running, before the records are loaded.

A second journal of each server holds the first records of tasks a client was just given the
id of (``FirstRecords``: a background ``launch_task``, a fan-out's members). Appended on the event
loop in one write and not synced, like the record file it stands for: it survives the server's
crash, and spares the file, which is written only if the task is still queued a while later
(``FIRST_RECORD_DELAY_S`` in the registry) or not at all when its next record comes first. It is
emptied once it has held ``CHECKPOINT_ENTRIES`` records, keeping those whose file is not written
yet. Recovery writes such a record back only where its file is missing or unreadable.

A checkpoint empties the journal once it holds ``CHECKPOINT_ENTRIES`` records: one ``syncfs``
(every record written since is then on disk; where there is no ``syncfs``, an fsync of each),
then the journal is truncated. A journal left by a server that stopped is recovered, then
removed, by the next server that opens the workspace.

Each server writes its own journal (``journal-<pid>-<random>.wal`` in the runs directory) and
holds an exclusive ``flock`` on it for its life, so a server starting beside it recovers only the
journals of servers that are gone. What a cloned repository may have planted there is never
trusted: journals are opened ``O_NOFOLLOW|O_NONBLOCK`` and read only when regular files, at most
their last ``MAX_JOURNAL_BYTES``; an entry names a record file by a bare ``<id>.json`` name in the
journal's own directory, anything else is skipped; and a record file that holds a finished task is
never replaced. A line cut short by a crash is skipped (its batch was never reported written).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from ..paths import fsync_dir, open_regular, write_all, write_atomic

log = logging.getLogger(__name__)

CHECKPOINT_ENTRIES = 1000
MAX_JOURNAL_BYTES = 64 << 20
"""The most of a journal read: its last 64 MB, some 30,000 final records, more than a server keeps by
default (``tasks.max_tasks``, 10,000; one set higher may lose its oldest in the case below). A journal
holds about a thousand records of a few KB between two checkpoints; it grows past that only while
record files cannot be made (no inodes left: the journal then holds the only copies, and is not
emptied), and its oldest records then belong to tasks pruned since. Reading only the end bounds what
a file planted there costs a start-up, and loses nothing kept."""
JOURNAL_GLOB = "journal-*.wal"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.json")
_JOURNAL_NAME = re.compile(r"journal-([0-9]{1,10})-[0-9a-f]+\.wal")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Journal:
    """This server's journal for durable writes into ``directory`` (see the module docstring).

    Used from one worker thread at a time (``GroupCommit`` writes one batch at a time)."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = directory
        self._durable = durable  # its own directory entry fsynced when made
        self._fd = -1
        self._path: Path | None = None
        self._entries = 0  # records in the journal since its last checkpoint
        self._pending: list[Path] = []  # their files (synced one by one where there is no syncfs)

    def takes(self, path: Path, data: bytes) -> bool:
        """Whether the write of ``data`` to ``path`` can go through this journal."""
        return path.parent == self.directory and _NAME.fullmatch(path.name) is not None and b"\n" not in data

    def commit(self, writes: list[tuple[Path, bytes]], *, sync: bool = True) -> None:
        """Append ``writes`` and make them durable (one write, one ``fdatasync``). Raises ``OSError``:
        the caller then makes each file durable itself. Without ``sync``: not synced, and a failed
        append is cut off again (none of ``writes`` is kept)."""
        if self._fd >= 0 and not self._still_there():
            self.close()  # its directory was removed (git clean) and made again: a journal there is needed
        if self._fd < 0:
            self._open()
        size = -1
        try:
            if not sync:
                size = os.fstat(self._fd).st_size
            write_all(self._fd, b"".join(path.name.encode() + b"\t" + data + b"\n" for path, data in writes))
            if sync:
                os.fdatasync(self._fd)
        except OSError:  # maybe a line cut short: the next batch starts a journal of its own
            if size >= 0:
                try:
                    os.ftruncate(self._fd, size)
                except OSError:
                    pass
            self.close()
            raise
        self._entries += len(writes)
        self._pending.extend(path for path, _ in writes)

    def written(self) -> None:
        """The files of the last ``commit`` are written: checkpoint when the journal is full."""
        if self._entries >= CHECKPOINT_ENTRIES:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make every file written since the last checkpoint durable, then empty the journal. A
        checkpoint that fails leaves the journal as it was (recovery still has every entry)."""
        if self._fd < 0 or not self._entries:
            return
        try:
            _sync_files(self.directory, self._pending)
            self.empty()
        except OSError as exc:
            log.warning("could not checkpoint the record journal %s: %s", self._path, exc)

    def empty(self) -> None:
        """Truncate the journal (open) to nothing. Raises ``OSError``, the journal then as it was."""
        os.ftruncate(self._fd, 0)
        self._entries = 0
        self._pending.clear()

    @property
    def entries(self) -> int:
        """Records appended to the open journal since it was last emptied (0 when none is open)."""
        return self._entries if self._fd >= 0 else 0

    def remove(self) -> None:
        """Remove the open journal's file (nothing in it is needed any more)."""
        if self._fd >= 0 and self._path is not None and self._still_there():
            try:
                self._path.unlink()
            except OSError as exc:
                log.warning("could not remove the record journal %s: %s", self._path, exc)

    def close(self) -> None:
        """Stop using the journal; what it holds stays for the next server to recover."""
        if self._fd >= 0:
            os.close(self._fd)  # (releases the flock)
            self._fd = -1

    def _still_there(self) -> bool:
        assert self._path is not None
        try:
            return os.stat(self._path, follow_symlinks=False).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            return False

    def _open(self) -> None:
        path = self.directory / f"journal-{os.getpid()}-{secrets.token_hex(4)}.wal"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self._durable:
                fsync_dir(self.directory)  # the journal itself must survive a crash
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd, self._path = fd, path
        self._entries = 0
        self._pending.clear()  # (those of a journal given up are in that journal, for recovery)


class FirstRecords:
    """This server's journal of first records (see the module docstring); used on the event loop."""

    def __init__(self, directory: Path) -> None:
        self._journal = Journal(directory, durable=False)  # (a record file would not be synced either)
        self._unfiled: dict[Path, bytes] = {}  # journaled records whose file is not written yet
        self._lost = False  # the journal was emptied but the unfiled records could not be written again

    def append(self, writes: list[tuple[Path, bytes]]) -> None:
        """Journal ``writes`` (one write, not synced); all or none of them: raises ``OSError`` with
        none kept (a partial write is cut off again)."""
        if self._journal.entries >= CHECKPOINT_ENTRIES + 2 * len(self._unfiled):
            self._rewrite()
        if self._lost:  # they go again with these
            self._journal.commit([*self._unfiled.items(), *writes], sync=False)
            self._lost = False
        else:
            self._journal.commit(writes, sync=False)
        self._unfiled.update(writes)

    def filed(self, path: Path) -> None:
        """The file ``path`` is written: its journaled record is no longer needed."""
        self._unfiled.pop(path, None)

    def _rewrite(self) -> None:
        """Empty the journal but for the records whose file is not written yet."""
        try:
            self._journal.empty()
        except OSError as exc:  # left as it is: emptied at the next append
            log.warning("could not empty the first-record journal in %s: %s", self._journal.directory, exc)
            return
        try:
            if self._unfiled:
                self._journal.commit(list(self._unfiled.items()), sync=False)
        except OSError:  # the next append writes them again, in a journal of its own
            self._lost = True

    def close(self) -> None:
        """Stop using the journal; removed when every record in it has its file (a clean stop: its
        tasks' final records are written), else left for the next server to recover."""
        if not self._unfiled and not self._lost:
            self._journal.remove()
        self._journal.close()


def recover(directory: Path, replaces: Callable[[Path, bytes], bool]) -> int:
    """Write back what the journals of gone servers in ``directory`` hold, then remove them.

    ``replaces(path, data)`` says whether the file at ``path`` (as it is now) is to be replaced by
    ``data`` (the registry: when it is missing, unreadable, or not a finished task's record).
    Returns the files written back. Never raises: a journal that cannot be read is left as it is."""
    restored = 0
    for journal in sorted(directory.glob(JOURNAL_GLOB)):
        try:
            fd = open_regular(journal)
        except OSError as exc:
            log.warning("skipped the record journal %s: %s", journal, exc)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live server's
            size = os.fstat(fd).st_size
            if size > MAX_JOURNAL_BYTES:
                log.warning("the record journal %s is %d bytes (record files could not be made for long?): only its "
                            "last %d MB were read", journal, size, MAX_JOURNAL_BYTES >> 20)
            restored += _replay(directory, journal, _read_journal(fd, size), replaces)
        except OSError as exc:
            log.warning("could not recover the record journal %s: %s", journal, exc)
        finally:
            os.close(fd)
    return restored


def journaled(directory: Path) -> list[tuple[str, bytes, bool]]:
    """Every entry of every journal in ``directory``, live servers' too (read only: never locked nor
    changed), in the order written: (record file name, data, whether its server is gone: no process has
    its pid, and nobody holds the journal's lock). For a reader that shows tasks whose record file is
    not written yet (``agent-parallel status``): what a gone server's journal holds is what the next
    server's ``recover`` will write back. A journal that cannot be read is skipped."""
    entries: list[tuple[str, bytes, bool]] = []
    locked: set[tuple[int, int, int]] | None = None  # read once, for the first journal whose pid is gone
    for journal in sorted(directory.glob(JOURNAL_GLOB)):
        try:
            fd = open_regular(journal)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            content = _read_journal(fd, info.st_size)
            gone = _server_gone(journal.name)
            if gone:
                if locked is None:
                    locked = _flock_held_files()
                gone = not _held(info, locked)
            entries += ((name, data, gone) for name, data in _entries(content).items())
        except OSError:
            continue
        finally:
            os.close(fd)
    return entries


def _flock_held_files() -> set[tuple[int, int, int]]:
    """The files someone holds a ``flock`` on, as (device major, minor, inode), from ``/proc/locks``: a
    journal's server holds one on it for its life (empty where that cannot be read)."""
    held: set[tuple[int, int, int]] = set()
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read()
    except OSError:
        return held
    for line in text.splitlines():  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (waiters: "1: -> FLOCK ...")
        fields = line.split()
        if len(fields) >= 6 and fields[1] == b"FLOCK":
            try:
                major, minor, inode = fields[5].split(b":")
                held.add((int(major, 16), int(minor, 16), int(inode)))
            except ValueError:
                continue
    return held


def _held(info: os.stat_result, locked: set[tuple[int, int, int]]) -> bool:
    return (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino) in locked


def _server_gone(name: str) -> bool:
    """Whether the server that wrote the journal ``name`` (``journal-<pid>-<random>.wal``) may be gone:
    no process has its pid. Read only (a lock taken to ask would make a starting server skip recovering
    the journal); a pid reused since counts as live, which only keeps the reader cautious. A server in
    another PID namespace names its journal with a pid this one does not see: ``journaled`` also asks
    whether the journal's ``flock`` is held (``/proc/locks``) before taking it for gone. That answers
    for a server in a namespace nested in the reader's (a container, read from the host); the kernel
    hides the locks of processes the reader cannot see (a reader inside a container, or beside it)."""
    match = _JOURNAL_NAME.fullmatch(name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, OverflowError):  # (EPERM: it exists, someone else's)
        return False
    return False


def _entries(content: bytes) -> dict[str, bytes]:
    """A journal's latest entry for each record file it names (lines of other shapes skipped)."""
    latest: dict[str, bytes] = {}
    for line in content.split(b"\n")[:-1]:  # the last piece is empty, or a line cut short by a crash
        raw, sep, data = line.partition(b"\t")
        name = raw.decode("ascii", "replace")
        if sep and _NAME.fullmatch(name):
            latest[name] = data
    return latest


def _replay(directory: Path, journal: Path, content: bytes, replaces: Callable[[Path, bytes], bool]) -> int:
    restored, checked = 0, []
    for name, data in _entries(content).items():
        path = directory / name
        if replaces(path, data):
            write_atomic(path, data, durable=True, sync_dir=False)
            restored += 1
        else:
            checked.append(path)
    _sync_files(directory, checked)  # what is already there may still be only in memory
    journal.unlink()
    fsync_dir(directory)
    if restored:
        log.warning("restored %d task record(s) from the journal %s of a server that stopped", restored, journal)
    return restored


def _sync_files(directory: Path, paths: list[Path]) -> None:
    """Make ``paths`` (files in ``directory``) and their directory entries durable."""
    if paths and not _syncfs(directory):
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
            except FileNotFoundError:
                continue  # removed since (pruned): nothing to keep
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


def _syncfs(directory: Path) -> bool:
    """``syncfs`` on the file system of ``directory``; False where there is none."""
    syncfs = _libc_syncfs()
    if syncfs is None:
        return False
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            import ctypes

            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(directory))
    finally:
        os.close(fd)
    return True


def _read_journal(fd: int, size: int) -> bytes:
    """A journal's whole lines, of its last ``MAX_JOURNAL_BYTES`` at most (the first line there cut
    short is left out)."""
    if size <= MAX_JOURNAL_BYTES:
        return _read_all(fd, size)
    os.lseek(fd, size - MAX_JOURNAL_BYTES - 1, os.SEEK_SET)  # (a byte more: is the first line whole?)
    tail = _read_all(fd, MAX_JOURNAL_BYTES + 1)
    start = tail.find(b"\n") + 1
    return tail[start:] if start else b""


def _read_all(fd: int, size: int) -> bytes:
    parts, left = [], size
    while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


_SYNCFS: list[Callable[[int], int] | None] = []


def _libc_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs`` (looked up once, on first use: ctypes costs an import), or None."""
    if not _SYNCFS:
        try:
            import ctypes

            syncfs = ctypes.CDLL(None, use_errno=True).syncfs
            syncfs.argtypes = [ctypes.c_int]
            syncfs.restype = ctypes.c_int
            _SYNCFS.append(syncfs)
        except (OSError, AttributeError):
            _SYNCFS.append(None)
    return _SYNCFS[0]


__all__ = ["Journal", "FirstRecords", "recover", "journaled", "CHECKPOINT_ENTRIES", "JOURNAL_GLOB"]
