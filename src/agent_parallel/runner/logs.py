"""Task logs on disk: a capped writer fed straight from the child's pipe, and a paging reader.

One function owns the paths (``log_paths``). A log keeps the start of the output in
``<id>.log`` (up to half the cap) and the most recent output in tail segments
``<id>.<offset>.log`` (each a quarter of the cap, at most two kept). Offsets are absolute byte
positions in everything the task ever printed, so a cursor stays valid while old tail segments
are dropped; bytes in the gap are counted as ``dropped_bytes``.

Output never passes through an unbounded buffer: the writer moves bytes pipe → file with
``os.splice`` (in the kernel) and falls back to read/write where splice is not supported.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


def log_paths(runs_dir: Path, task_id: str) -> tuple[Path, Path]:
    """The head log, and the directory-plus-prefix tail segments are named from."""
    return runs_dir / f"{task_id}.log", runs_dir / task_id


def tail_segment_path(runs_dir: Path, task_id: str, start: int) -> Path:
    return runs_dir / f"{task_id}.{start}.log"


def head_cap(cap_bytes: int) -> int:
    """Bytes of a log's start kept in ``<id>.log`` for a log capped at ``cap_bytes``."""
    return max(cap_bytes // 2, 1)


def recover_log_extent(runs_dir: Path, task_id: str, head_cap: int) -> tuple[int, list[int], int]:
    """For a log whose writer died (server crash): (total bytes, tail segment starts, dropped bytes)."""
    head = log_paths(runs_dir, task_id)[0]
    total = head.stat().st_size if head.exists() else 0
    segments = sorted(int(p.name.split(".")[1]) for p in runs_dir.glob(f"{task_id}.*.log")
                      if p.name.split(".")[1].isdigit())
    if segments:
        last = tail_segment_path(runs_dir, task_id, segments[-1])
        total = segments[-1] + last.stat().st_size
    dropped = segments[0] - head_cap if segments else 0
    return total, segments, max(dropped, 0)


class LogWriter:
    """Appends a task's output to its log files, keeping the head and the most recent tail."""

    def __init__(self, runs_dir: Path, task_id: str, cap_bytes: int) -> None:
        self.runs_dir, self.task_id = runs_dir, task_id
        self.head_cap = head_cap(cap_bytes)
        self.segment_cap = max(cap_bytes // 4, 1)
        self.total = 0
        self.dropped = 0
        self.segments: list[int] = []  # start offsets of the kept tail segments, oldest first
        self._fd = os.open(log_paths(runs_dir, task_id)[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._room = self.head_cap  # bytes left in the current file
        self._splice = hasattr(os, "splice")
        self.error: str | None = None  # set when the log could not be written (e.g. disk full)

    def write(self, data: bytes) -> None:
        """Append bytes produced by us (e.g. a spawn error), honouring the cap."""
        view = memoryview(data)
        while view:
            self._make_room()
            n = os.write(self._fd, view[: self._room])
            self._advance(n)
            view = view[n:]

    def absorb(self, src_fd: int) -> int:
        """Move what is waiting in the (non-blocking) pipe ``src_fd`` into the log.

        Returns the bytes moved, 0 at end of stream; raises ``BlockingIOError`` when the pipe is
        empty. Raises ``OSError`` (e.g. ENOSPC) when the log cannot be written.
        """
        self._make_room()
        want = min(self._room, CHUNK)
        if self._splice:
            try:
                n = os.splice(src_fd, self._fd, want, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                self._splice = False
                return self.absorb(src_fd)
        else:
            data = os.read(src_fd, want)
            n = len(data)
            if n:
                written = 0
                while written < n:
                    written += os.write(self._fd, data[written:])
        self._advance(n)
        return n

    def _advance(self, n: int) -> None:
        self.total += n
        self._room -= n

    def _make_room(self) -> None:
        if self._room > 0:
            return
        os.close(self._fd)
        if len(self.segments) == 2:
            oldest = self.segments.pop(0)
            tail_segment_path(self.runs_dir, self.task_id, oldest).unlink(missing_ok=True)
            self.dropped = self.segments[0] - self.head_cap  # all between the head and the first kept segment
        self.segments.append(self.total)
        self._fd = os.open(tail_segment_path(self.runs_dir, self.task_id, self.total), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._room = self.segment_cap

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class LogChunk:
    text: str
    start: int
    next_cursor: int
    truncated: bool  # output exists before `start` that this chunk does not show


class LogReader:
    """Reads a task's log by absolute byte offsets, across the head file and tail segments."""

    def __init__(self, runs_dir: Path, task_id: str, total: int, head_cap: int, segments: list[int]) -> None:
        self.runs_dir, self.task_id, self.total = runs_dir, task_id, total
        head_len = min(total, head_cap)
        self.ranges: list[tuple[int, int, Path]] = [(0, head_len, log_paths(runs_dir, task_id)[0])]
        for i, start in enumerate(segments):
            end = segments[i + 1] if i + 1 < len(segments) else total
            self.ranges.append((start, end, tail_segment_path(runs_dir, task_id, start)))

    def _kept_from(self, offset: int) -> int:
        """The first kept offset at or after ``offset``."""
        for start, end, _ in self.ranges:
            if offset < end:
                return max(offset, start)
        return self.total

    def read_bytes(self, start: int, max_bytes: int) -> tuple[bytes, int]:
        """Up to ``max_bytes`` from ``start`` (moved past any dropped gap), stopping at the next gap.

        Returns (data, real start).
        """
        start = self._kept_from(start)
        parts: list[bytes] = []
        pos, want = start, max_bytes
        for lo, hi, path in self.ranges:
            if want <= 0 or pos >= self.total:
                break
            if not lo <= pos < hi:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(pos - lo)
                    data = f.read(min(want, hi - pos))
            except FileNotFoundError:  # a tail segment rotated away while we read
                break
            parts.append(data)
            pos, want = pos + len(data), want - len(data)
            if want > 0 and pos < hi:
                break  # short read: the file ends early
        return b"".join(parts), start

    def read(self, cursor: int | None, max_bytes: int) -> LogChunk:
        """``cursor=None``: the most recent ``max_bytes``; otherwise page forward from ``cursor``."""
        if cursor is None:
            start = max(self.total - max_bytes, 0)
        else:
            start = min(max(cursor, 0), self.total)
        data, real = self.read_bytes(start, max_bytes)
        at_end = real + len(data) >= self.total
        data, real = _trim_to_characters(data, real, keep_tail=not at_end)
        return LogChunk(data.decode("utf-8", "replace"), real, real + len(data), real > 0)

    def grep(self, pattern: re.Pattern[str], cursor: int | None, max_bytes: int) -> LogChunk:
        """Lines matching ``pattern`` from ``cursor`` (or the whole kept log) to the end.

        Keeps the last ``max_bytes`` of matches when starting from None, the first when paging.
        """
        pos = self._kept_from(0 if cursor is None else max(cursor, 0))
        first = pos
        matched: list[str] = []
        size = 0
        pending = b""
        while pos < self.total:
            data, real = self.read_bytes(pos, CHUNK)
            if not data:
                break
            pos = real + len(data)
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if pattern.search(line):
                    matched.append(line + "\n")
                    size += len(line) + 1
            if cursor is not None and size >= max_bytes:
                pos -= len(pending)
                pending = b""
                break
        if pending:
            line = pending.decode("utf-8", "replace")
            if pattern.search(line):
                matched.append(line)
        text = "".join(matched)
        if cursor is None and len(text) > max_bytes:
            text = text[-max_bytes:]
        return LogChunk(text, first, pos, first > 0)


def _trim_to_characters(data: bytes, start: int, *, keep_tail: bool) -> tuple[bytes, int]:
    """Cut a UTF-8 sequence split at either edge so pages join without replacement characters."""
    lead = 0
    while lead < min(3, len(data)) and 0x80 <= data[lead] < 0xC0 and start > 0:
        lead += 1
    if lead:
        data, start = data[lead:], start + lead
    if keep_tail and data:
        for back in range(1, min(4, len(data)) + 1):
            b = data[-back]
            if b < 0x80:
                break
            if b >= 0xC0:  # a lead byte: is its sequence complete?
                need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
                if back < need:
                    data = data[:-back]
                break
    return data, start
