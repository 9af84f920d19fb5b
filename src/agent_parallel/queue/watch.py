"""Which files of a queue directory changed, told by the kernel (inotify), so that a queue of
10,000 unchanged files is known unchanged without a stat per file (20 ms of a warm `queue_plan`
of 50 ms, the rest the Python loop around the stats).

A `DirectoryWatch` is made before the directory is read in full: every change made after that
read is then queued by the kernel, synchronously, as the change is made (a write, a rename, a
touch), so ``changed()`` (a read of the queue that does not wait) names every file changed since,
and the reader looks at those alone. An agent that edits an item and plans at once sees its edit.

A watch can stop telling, and then says so (``changed()`` answers None: read everything, with a
new watch): the kernel's queue overflowed, the directory was moved, removed or replaced (an
ancestor renamed: the path is checked to be still the same inode on every look). A watch is only
made on a file system whose changes all pass through this kernel (`LOCAL_FILE_SYSTEMS`): on NFS,
SMB or FUSE another machine's edit makes no event, so such a queue is stat'ed file by file as
before. Without inotify (not Linux, no instance left: ``fs.inotify.max_user_instances``) the
reader works as before too. Files the queue reaches through a symlink are always looked at again
(an edit of the target makes no event in this directory). Not seen: a write through a hard link
made in another directory, or through a shared memory mapping; neither is how agents, editors or
git change a queue file.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

LOCAL_FILE_SYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "bcachefs", "reiserfs", "jfs",
    "ramfs", "nilfs2",
})
"""File systems whose every change passes through this kernel, so inotify reports it."""


# inotify's event bits (<sys/inotify.h>)
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_DONT_FOLLOW = 0x2000, 0x4000, 0x8000, 0x01000000, 0x02000000
WATCHED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
           | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
LOST = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT
"""Events after which a watch no longer tells every change (the watch is gone, or events were dropped)."""


class DirectoryWatch:
    """The names changed in one directory since the watch began (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        from inotify_simple import INotify  # type: ignore[import-untyped]  # (ctypes: only once a watch is made)

        info = os.stat(directory)
        self.directory = directory
        self._identity = (info.st_dev, info.st_ino)
        self._inotify = INotify(nonblocking=True)
        try:
            self._inotify.add_watch(directory, WATCHED)
        except BaseException:
            self._inotify.close()
            raise
        self._pending: set[str] = set()
        self.lost = False
        self._closer = weakref.finalize(self, self._inotify.close)  # a reader dropped unclosed frees it too

    @classmethod
    def start(cls, directory: Path) -> DirectoryWatch | None:
        """A watch on ``directory``, or None where one would not tell every change (see the module docstring)."""
        if file_system_type(directory) not in LOCAL_FILE_SYSTEMS:
            return None
        try:
            return cls(directory)
        except ImportError:  # a platform without inotify (the dependency is Linux only)
            return None
        except OSError as exc:  # no inotify instance or watch left: stat every file, as without a watch
            log.debug("no inotify watch on %s (%s): its files are stat'ed on every read", directory, exc)
            return None

    def changed(self) -> set[str] | None:
        """The names changed since the last ``settle`` (without waiting), or None when the watch can no
        longer tell (read the whole directory again, with a new watch)."""
        if self.lost:
            return None
        try:
            events = self._inotify.read(timeout=0)
            info = os.stat(self.directory)
        except OSError:
            self.lost = True
            return None
        if (info.st_dev, info.st_ino) != self._identity:  # replaced (e.g. an ancestor renamed): not ours any more
            self.lost = True
            return None
        for event in events:
            if event.mask & LOST:
                self.lost = True
                return None
            if event.name:
                self._pending.add(event.name)
        return set(self._pending)

    def settle(self, names: set[str]) -> None:
        """``names`` were looked at: they no longer count as changed (until they change again)."""
        self._pending -= names

    def close(self) -> None:
        self._closer()


def file_system_type(path: Path) -> str | None:
    """The type of the file system ``path`` is on (``ext4``, ``nfs4``...), from /proc/self/mountinfo;
    None when it cannot be told."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError:
        return None
    target = str(path)
    best, found = -1, None
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        point = _unescape(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # the deepest mount holding the path (the last one mounted there wins)
            best, found = len(point), rest[0]
    return found


def _unescape(text: str) -> str:
    """A mountinfo field with its octal escapes (``\\040`` for a space) decoded."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        digits = text[i + 1:i + 4]
        if text[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


__all__ = ["DirectoryWatch", "file_system_type", "LOCAL_FILE_SYSTEMS"]
