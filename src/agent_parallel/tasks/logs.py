"""Task logs on disk: a capped writer fed straight from the child's pipe, and a paging reader.

One module owns the paths (``head_log_path``, ``tail_segment_path``, ``upstream_path``,
``task_files``). A log keeps the start of the output in ``<id>.log`` (up to half the cap) and the
most recent output in tail segments ``<id>.<offset>.log`` (each a quarter of the cap, at most two
kept; a cap below ``MIN_LOG_CAP`` counts as that, so a tiny cap cannot mean one file per
byte). Offsets are absolute byte positions in everything the task ever printed, so a cursor
stays valid while old tail segments are dropped; bytes in the gap are counted as ``dropped_bytes``.
A dependent task is handed ``upstream_log_path``: the head log when nothing was cut, else one
file with all kept output and the dropped middle marked.

Output never passes through an unbounded buffer: the writer moves bytes pipe → file with
``os.splice`` (in the kernel) and falls back to read/write where splice is not supported. Nor
does it on the way back: a page holds at most ``max_bytes``, with a filter too, and a filter's
scan holds one chunk and the start of one line, however long the line (``LogReader.grep``).
Files are read only when they are regular files (never through a symlink, never a FIFO): a
cloned repository can ship a ``.agent/runs`` of its own.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..paths import atomic_temporary, open_regular, write_all, write_atomic

if TYPE_CHECKING:
    from .records import TaskRecord

CHUNK = 1 << 20
MIN_LOG_CAP = 4096  # the smallest log kept, whatever the configured cap: head 2 KiB, two tail segments of 1 KiB


def head_log_path(runs_dir: Path, task_id: str) -> Path:
    """The head log: the start of a task's output (its tail segments: ``tail_segment_path``)."""
    return runs_dir / f"{task_id}.log"


def tail_segment_path(runs_dir: Path, task_id: str, start: int) -> Path:
    return runs_dir / f"{task_id}.{start}.log"


def upstream_path(runs_dir: Path, task_id: str) -> Path:
    """Where ``upstream_log_path`` assembles a cut log's kept output."""
    return runs_dir / f"{task_id}.upstream.log"


UPSTREAM_LOGS_VAR = "AGENT_UPSTREAM_LOGS"
UPSTREAM_LOGS_FILE_VAR = "AGENT_UPSTREAM_LOGS_FILE"


def upstream_list_path(runs_dir: Path, task_id: str) -> Path:
    """Where ``spill_upstream_logs`` writes a task's upstream log paths, one per line."""
    return runs_dir / f"{task_id}.upstream-logs"


def spill_upstream_logs(runs_dir: Path, task_id: str, env: dict[str, str], limit: int) -> None:
    """When ``env``'s ``AGENT_UPSTREAM_LOGS`` is too long for one environment entry (``NAME=value`` of
    ``limit`` bytes or more, which the kernel refuses and ``check_launch_strings`` would: a fan-in of a
    few thousand items), write its paths to a file, one per line, and give the task
    ``AGENT_UPSTREAM_LOGS_FILE`` naming it instead. Raises ``OSError`` when it cannot be written."""
    value = env.get(UPSTREAM_LOGS_VAR)
    if value is None or len(UPSTREAM_LOGS_VAR) + 1 + len(os.fsencode(value)) < limit:
        return
    path = upstream_list_path(runs_dir, task_id)
    write_atomic(path, "".join(p + "\n" for p in value.split(os.pathsep)).encode())
    del env[UPSTREAM_LOGS_VAR]
    env[UPSTREAM_LOGS_FILE_VAR] = str(path)


@functools.lru_cache(maxsize=4096)
def record_path(runs_dir: Path, task_id: str) -> Path:
    """The task's record (``records.save_record``, the registry's batched saves). Cached: each of a
    task's two or three saves is keyed by this path, and a new ``Path`` is parsed and hashed anew."""
    return runs_dir / f"{task_id}.json"


def task_files(runs_dir: Path, task_id: str, segments: list[int]) -> list[Path]:
    """Every file a task may have in ``runs_dir``, by exact name (for pruning: never a pattern)."""
    record = record_path(runs_dir, task_id)
    return [record, atomic_temporary(record), head_log_path(runs_dir, task_id),
            upstream_path(runs_dir, task_id), upstream_list_path(runs_dir, task_id), runs_dir / f"{task_id}.report.json",
            *(tail_segment_path(runs_dir, task_id, s) for s in segments)]


def head_cap(cap_bytes: int) -> int:
    """Bytes of a log's start kept in ``<id>.log`` for a log capped at ``cap_bytes``."""
    return max(cap_bytes, MIN_LOG_CAP) // 2


def segment_cap(cap_bytes: int) -> int:
    """Bytes in each tail segment for a log capped at ``cap_bytes``."""
    return max(cap_bytes, MIN_LOG_CAP) // 4


def _regular_size(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def tail_segments_on_disk(runs_dir: Path, task_ids: set[str]) -> dict[str, list[int]]:
    """The tail segments (``<id>.<start>.log``) each of ``task_ids`` has in ``runs_dir``, sorted, from one
    listing of the directory: a server restarting after a crash recovers every task it left live, and
    a listing per task made that quadratic (2,000 tasks left live: seconds of ``getdents``)."""
    found: dict[str, list[int]] = {task_id: [] for task_id in task_ids}
    try:
        names = os.listdir(runs_dir)
    except OSError:
        return found
    for name in names:
        task_id, dot, rest = name.partition(".")
        if dot and task_id in found and (m := _SEGMENT_NAME.fullmatch(rest)):
            found[task_id].append(int(m.group(1)))
    for segments in found.values():
        segments.sort()
    return found


_SEGMENT_NAME = re.compile(r"([0-9]{1,18})\.log", re.ASCII)


def recover_log_extent(runs_dir: Path, task_id: str, head_cap: int, segments: list[int]) -> tuple[int, list[int], int]:
    """For a log whose writer died (server crash): (total bytes, tail segment starts, dropped bytes),
    given its tail segments as ``tail_segments_on_disk`` found them."""
    total = _regular_size(head_log_path(runs_dir, task_id))
    if segments:
        total = segments[-1] + _regular_size(tail_segment_path(runs_dir, task_id, segments[-1]))
    dropped = segments[0] - head_cap if segments else 0
    return total, segments, max(dropped, 0)


def dropped_marker(dropped: int) -> bytes:
    return f"[agent-parallel: {dropped} bytes dropped here]\n".encode()


def upstream_log_path(runs_dir: Path, record: TaskRecord) -> Path:
    """The file to give a dependent task (``AGENT_UPSTREAM_LOGS``) for ``record``'s output.

    The head log when nothing was cut; else ``<id>.upstream.log``, holding the head, one line
    ``[agent-parallel: N bytes dropped here]`` where output was dropped, and the kept tail (made
    once, atomically, then reused). ``record`` must be final. Blocking: call it in a worker thread.
    """
    head = head_log_path(runs_dir, record.task_id)
    if not record.tail_segments:
        if not record.output_bytes:  # it printed nothing, so no log was made (``LogWriter``): an empty one
            try:
                os.close(os.open(head, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
            except OSError:  # there already, or the runs directory is gone (git clean): the path as it is
                pass
        return head
    segments = record.tail_segments
    pieces = [(head, min(_regular_size(head), segments[0]))]
    for i, start in enumerate(segments):
        end = segments[i + 1] if i + 1 < len(segments) else record.output_bytes
        path = tail_segment_path(runs_dir, record.task_id, start)
        pieces.append((path, min(_regular_size(path), max(end - start, 0))))
    marker = b""
    if record.dropped_bytes > 0:
        marker = dropped_marker(record.dropped_bytes)
        if pieces[0][1] and not _ends_with_newline(head, pieces[0][1]):
            marker = b"\n" + marker
    out = upstream_path(runs_dir, record.task_id)
    if _regular_size(out) == sum(n for _, n in pieces) + len(marker):
        return out
    tmp = runs_dir / f".{record.task_id}.upstream.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        for i, (path, length) in enumerate(pieces):
            if i == 1 and marker:
                write_all(fd, marker)
            _copy(path, fd, length)
        os.close(fd)
        fd = -1
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return out


def _ends_with_newline(path: Path, length: int) -> bool:
    fd = open_regular(path)
    try:
        return os.pread(fd, 1, length - 1) == b"\n"
    finally:
        os.close(fd)


def _copy(path: Path, dst: int, length: int) -> None:
    if length <= 0:
        return
    src = open_regular(path)
    try:
        offset = 0
        while offset < length:
            data = os.pread(src, min(CHUNK, length - offset), offset)
            if not data:
                break
            write_all(dst, data)
            offset += len(data)
    finally:
        os.close(src)


class LineMatcher(Protocol):
    """What ``grep`` needs of a filter: ``re.Pattern`` has it, and so has the server's time-bounded
    ``OutputFilter``."""

    def search(self, line: str, /) -> object: ...


LOG_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""How a log file is opened (on the event loop): never through a link planted at its name, never
waiting for a reader of a FIFO planted there (both fail at once, and the task with them)."""


class LogWriter:
    """Appends a task's output to its log files, keeping the head and the most recent tail.

    The head file is created with the first byte of output: a task that prints nothing (most
    trivial commands) has no log file at all, and one file less to create is a good part of such a
    task's cost on ext4 (bench/README.md, "The file system's share"). Readers need no file for an
    empty log (``LogReader`` reads up to ``total``); ``upstream_log_path`` makes an empty one for a
    dependent. Anything already at the head's name (a planted directory, FIFO or link) is opened, and
    refused, at once, before the task's command runs."""

    def __init__(self, runs_dir: Path, task_id: str, cap_bytes: int) -> None:
        self.runs_dir, self.task_id = runs_dir, task_id
        self.head_cap = head_cap(cap_bytes)
        self.segment_cap = segment_cap(cap_bytes)
        self.total = 0
        self.dropped = 0
        self.segments: list[int] = []  # start offsets of the kept tail segments, oldest first
        self._head = head_log_path(runs_dir, task_id)
        self._fd = -1  # the head is opened with the first output (``_open_head``)
        self._closed = False
        if os.path.lexists(self._head):
            self._open_head()
        self._room = self.head_cap  # bytes left in the current file
        self._splice = hasattr(os, "splice")
        self.error: str | None = None  # set when the log could not be written (e.g. disk full)

    def _open_head(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the task's log is closed")
        try:
            self._fd = os.open(self._head, LOG_OPEN_FLAGS, 0o644)
        except FileNotFoundError:
            if self.runs_dir.exists():
                raise
            # the runs directory was removed while the task ran (``git clean -fdX``): its output is lost,
            # as it was when the log had been made before (written into a file no longer listed), and
            # the task goes on to its end; the next launch makes the directory again
            self._fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

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
        if self._fd < 0 and not self._closed:  # no output yet: the head is made only if some comes
            first = os.read(src_fd, min(self._room, CHUNK))
            if first:
                self.write(first)
            return len(first)
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
            if self._fd < 0:
                self._open_head()
            return
        os.close(self._fd)
        if len(self.segments) == 2:
            oldest = self.segments.pop(0)
            tail_segment_path(self.runs_dir, self.task_id, oldest).unlink(missing_ok=True)
            self.dropped = self.segments[0] - self.head_cap  # all between the head and the first kept segment
        self.segments.append(self.total)
        self._fd = os.open(tail_segment_path(self.runs_dir, self.task_id, self.total), LOG_OPEN_FLAGS, 0o644)
        self._room = self.segment_cap

    def close(self) -> None:
        self._closed = True
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
        self.ranges: list[tuple[int, int, Path]] = [(0, head_len, head_log_path(runs_dir, task_id))]
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
                fd = open_regular(path)
            except OSError:  # a tail segment rotated away while we read (or not a regular file)
                break
            try:
                data = os.pread(fd, min(want, hi - pos), pos - lo)
            except OSError:
                break
            finally:
                os.close(fd)
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

    def grep(self, pattern: LineMatcher, cursor: int | None, max_bytes: int) -> LogChunk:
        """Lines matching ``pattern``: from ``cursor=None`` the last ``max_bytes`` of all matches in the
        kept log; from a cursor, the matches that follow it, ``max_bytes`` at most (``_grep_page``).

        Memory stays bounded whatever the lines' length: a line is matched on its first
        ``MAX_MATCHED_LINE`` bytes only, and no more of it than a page is kept. ``truncated`` says
        output was left out: earlier matches, a line shown cut, or (paging) output before ``start``.
        """
        first = self._kept_from(0 if cursor is None else max(cursor, 0))
        if cursor is not None:
            return self._grep_page(pattern, first, max_bytes)
        lines = _Lines(self, first, keep_tail=max_bytes)
        kept: deque[bytes] = deque()
        size, cut = 0, False
        while True:
            _, batch = lines.whole_lines()
            pieces = [raw + b"\n" for raw in batch if pattern.search(raw.decode("utf-8", "replace"))]
            if not batch:
                if (line := lines.next()) is None:
                    break
                lines.finish(line)
                if not pattern.search(line.matched_text()):
                    continue
                pieces = [line.last_bytes(max_bytes)]
                cut = cut or len(pieces[0]) < line.length + line.newline  # longer than the page: its end only
            for piece in pieces:
                kept.append(piece)
                size += len(piece)
                while size - len(kept[0]) >= max_bytes:  # the matches before it no longer show
                    size -= len(kept.popleft())
                    cut = True
        data = b"".join(kept)
        if len(data) > max_bytes:
            data, cut = data[-max_bytes:], True
        if cut:
            data, _ = _trim_to_characters(data, 1, keep_tail=False)
        return LogChunk(data.decode("utf-8", "replace"), first, lines.at, first > 0 or cut)

    def _grep_page(self, pattern: LineMatcher, first: int, max_bytes: int) -> LogChunk:
        """The matching lines from offset ``first``, whole, until the next does not fit in ``max_bytes``:
        ``next_cursor`` is then that line's start, so the next page begins with it.

        A matching line longer than a whole page is shown cut: its first ``max_bytes`` (whole
        characters), ``truncated`` set, and ``next_cursor`` after that line, so paging goes on with
        the next line rather than with the rest of this one (which, out of its line, the filter
        might not match). Page from its offset without a filter to read the rest.
        """
        lines = _Lines(self, first, keep_tail=0)
        shown: list[bytes] = []
        size = 0

        def page(next_cursor: int, *, cut: bool = False) -> LogChunk:
            return LogChunk(b"".join(shown).decode("utf-8", "replace"), first, next_cursor, first > 0 or cut)

        while True:
            pos, batch = lines.whole_lines()
            for raw in batch:
                start, pos = pos, pos + len(raw) + 1
                if not pattern.search(raw.decode("utf-8", "replace")):
                    continue
                if size + len(raw) + 1 <= max_bytes:
                    shown.append(raw + b"\n")
                    size += len(raw) + 1
                    if size == max_bytes:
                        return page(pos)
                elif shown:  # it does not fit after the others: the next page starts with it
                    return page(start)
                else:  # alone it is longer than a page: shown cut
                    shown.append(_trim_to_characters(raw[:max_bytes], 0, keep_tail=True)[0])
                    return page(pos, cut=True)
            if batch:
                continue
            if (line := lines.next()) is None:
                return page(lines.at)
            if not pattern.search(line.matched_text()):
                lines.finish(line)
                continue
            whole = line.ended and line.length == len(line.head)  # (a line past MAX_MATCHED_LINE never is)
            if whole and size + line.length + line.newline <= max_bytes:
                shown.append(line.head + b"\n" * line.newline)
                size += line.length + line.newline
                continue
            if shown:
                return page(line.start)
            shown.append(_trim_to_characters(line.head[:max_bytes], 0, keep_tail=True)[0])
            lines.finish(line)  # (read to its end without keeping it: next_cursor is after it)
            return page(lines.at, cut=True)


MAX_MATCHED_LINE = CHUNK
"""Bytes of a line a filter sees: a longer line (one 200 MB line of minified JSON) is matched on
its start, so a scan holds one chunk and one line's start, never a whole line."""


@dataclass(slots=True)
class _Line:
    """One line of a log as ``_Lines.next`` reads it (its newline is not in ``head``, ``tail`` or ``length``)."""

    start: int  # offset of its first byte
    head: bytes = b""  # its first MAX_MATCHED_LINE bytes
    tail: bytes = b""  # its bytes after the head: the last ``keep_tail`` of them
    length: int = 0  # its bytes read so far; all of them once ``ended``
    ended: bool = False  # its end was reached: a newline, the end of the kept output, or a dropped gap
    newline: bool = False  # it ended with a newline

    def matched_text(self) -> str:
        """What the filter is matched against: the head, a character cut at its end left out."""
        head = self.head if self.length <= len(self.head) else _trim_to_characters(self.head, 0, keep_tail=True)[0]
        return head.decode("utf-8", "replace")

    def last_bytes(self, n: int) -> bytes:
        """Its last ``n`` bytes and its newline (``_Lines`` must have kept ``n`` of its tail)."""
        return (self.head + self.tail)[-n:] + b"\n" * self.newline


class _Lines:
    """The lines of a log from an offset, read a chunk at a time: at most one chunk, one line's
    head and ``keep_tail`` bytes of its end are held, however long the line. A dropped gap ends a
    line (the output around it does not join).

    ``whole_lines`` hands over the short lines in hand at once (a log of a million short lines
    would spend more in a call per line than in matching); ``next`` reads any one line."""

    def __init__(self, reader: LogReader, start: int, *, keep_tail: int) -> None:
        self._reader, self._keep_tail = reader, keep_tail
        self._data, self._off = b"", 0
        self.at = start  # the offset of the next byte not yet taken (where a next page would start)

    def whole_lines(self) -> tuple[int, list[bytes]]:
        """Take the lines wholly in hand (each at most ``MAX_MATCHED_LINE`` bytes): the offset of the
        first, and the lines without their newlines; ``[]`` when the next line is not in hand whole
        (then ``next`` reads it)."""
        begin, at = self._off, self.at
        last = self._data.rfind(b"\n", begin)
        if last < 0:
            return at, []
        batch = self._data[begin:last].split(b"\n")
        if last - begin > MAX_MATCHED_LINE and max(map(len, batch)) > MAX_MATCHED_LINE:
            batch = batch[:next(i for i, raw in enumerate(batch) if len(raw) > MAX_MATCHED_LINE)]
            last = begin + sum(len(raw) + 1 for raw in batch) - 1
        self._off = last + 1
        self.at += last + 1 - begin
        return at, batch

    def next(self) -> _Line | None:
        """The next line, read to its end or through its head (then call ``finish`` before the next);
        None at the end of the kept output."""
        if not self._in_hand() and not self._in_hand():  # (the first False may only be a gap)
            return None
        line = _Line(self.at)
        head = bytearray()
        while not line.ended and line.length <= MAX_MATCHED_LINE:  # (one byte more tells a longer line)
            piece = self._take(line)
            room = MAX_MATCHED_LINE - len(head)
            head += piece[:room]
            self._keep(line, piece[room:])
        line.head = bytes(head)
        return line

    def finish(self, line: _Line) -> None:
        """Read on to the end of ``line`` (returned by ``next``), keeping only its last bytes."""
        while not line.ended:
            self._keep(line, self._take(line))

    def _keep(self, line: _Line, beyond_head: bytes) -> None:
        if beyond_head and self._keep_tail:
            line.tail = (line.tail + beyond_head)[-self._keep_tail:]

    def _take(self, line: _Line) -> bytes:
        """The bytes of ``line`` in hand, up to its newline (consumed, not returned); marks its end."""
        if not self._in_hand():
            line.ended = True
            return b""
        begin, nl = self._off, self._data.find(b"\n", self._off)
        piece = self._data[begin:] if nl < 0 else self._data[begin:nl]
        self._off = len(self._data) if nl < 0 else nl + 1
        self.at += self._off - begin
        line.length += len(piece)
        if nl >= 0:
            line.ended = line.newline = True
        return piece

    def _in_hand(self) -> bool:
        """Whether unread bytes are held, reading the next chunk when not. False at the end, and once
        at a dropped gap (then the bytes after it are held, and ``at`` is past the gap)."""
        if self._off < len(self._data):
            return True
        data, real = self._reader.read_bytes(self.at, CHUNK)
        self._data, self._off = data, 0
        if real != self.at:
            self.at = real
            return False
        return bool(data)


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
