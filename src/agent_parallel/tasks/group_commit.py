"""Group commit: durable file writes that share their worker thread and their sync.

A final task record must survive a crash. Written one at a time, each would cost a thread hop, an
fsync of the file and one of its directory (``paths.write_atomic(durable=True)``). ``GroupCommit.save``
queues the write instead: the first caller finding no batch in progress writes everything queued so
far in one worker thread, while later callers queue up for the next batch. Given a ``Journal``, the
batch's durable writes into the journal's directory are appended to it and made durable together by
one ``fdatasync``, then written without an fsync (``journal.py``: a crash's losses are written back
from it); any other durable write is fsynced, and its directory once per batch. Durability is
unchanged: ``save`` (``save_all``) returns only once its writes are durable, and raises the ``OSError``
of its own write (a failed write fails only its caller). A batch, once begun, is finished even if its
callers are cancelled; a caller cancelled while its write still waits for a batch takes it back (not
written).

``save_soon`` queues a write nobody waits for (a running task's record: it may be lost in a crash,
never torn): it is written ``SOON_DELAY_S`` later (or after the delay given), with the batch then
under way or in one begun in the background, and a later write of the same file queued before it is
written replaces it. So a task that ends within that time never has its running record written:
its final record supersedes it, and is then a new file. (On ext4 a rename over an existing file
starts the writeback of the new one, ``auto_da_alloc``: about 0.7 ms of CPU on this project's VMs,
the largest cost of a trivial task.) Writes of one file are always written in the order queued. A
failed ``save_soon`` write calls its ``on_error``; every file written is reported to ``on_written``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from ..paths import fsync_dir, write_atomic
from .journal import Journal

log = logging.getLogger(__name__)

MAX_BATCH = 256  # files per batch: one batch never keeps a worker thread for long
SOON_DELAY_S = 0.05  # how long a save_soon write waits to be superseded (a running record, by the final one)


@dataclass(eq=False)
class _Write:
    path: Path
    data: bytes
    durable: bool = True
    on_error: Callable[[OSError], None] | None = None  # a save_soon write's: nobody waits for it
    due: float = 0.0  # a save_soon write is not written before this (``anyio.current_time``)
    done: bool = False
    error: OSError | None = None
    superseded: bool = False  # a save_soon write replaced by a later write of its file: never written
    make: Callable[[], bytes] | None = None  # a save_soon write's data, made when a batch takes it


class GroupCommit:
    """Atomic writes, batched (see the module docstring). One per event loop; ``save_soon``
    needs ``tg``, where the background batches run."""

    def __init__(self, *, max_batch: int = MAX_BATCH, tg: TaskGroup | None = None, journal: Journal | None = None,
                 on_written: Callable[[Path], None] | None = None) -> None:
        self._queued: list[_Write] = []  # durable writes waiting, in the order queued
        self._soon: dict[Path, _Write] = {}  # save_soon writes waiting, by file
        self._soon_due: list[tuple[float, int, _Write]] = []  # the same by due time (a heap; superseded ones too)
        self._order = itertools.count()
        self._busy = False  # a batch is being written
        self._flushing = False  # a background batch is on its way
        self._flush_at = math.inf  # when it is due
        self._sooner = anyio.Event()  # set when a save_soon write falls due before that
        self._written = anyio.Event()  # set (and replaced) when a batch is finished
        self._max_batch = max_batch
        self._tg = tg
        self.journal = journal  # where durable writes into its directory are made durable together
        self._on_written = on_written  # told of each file written (on the event loop)
        self.batches = 0  # batches written (for tests and benchmarks)

    def save_soon(self, path: Path, data: bytes | Callable[[], bytes], on_error: Callable[[OSError], None], *,
                  delay: float = SOON_DELAY_S) -> None:
        """Queue an atomic write of ``data`` to ``path`` that nobody waits for (not fsynced), written
        ``delay`` seconds later unless superseded; ``on_error`` is called (on the event loop) if it
        fails. ``data`` may be a function that makes it, called (on the event loop) only if the write
        is not superseded first: most are. See the module docstring."""
        assert self._tg is not None, "save_soon needs the task group GroupCommit was given"
        self._supersede(path)
        write = _Write(path, b"", durable=False, on_error=on_error, due=anyio.current_time() + delay)
        if callable(data):
            write.make = data
        else:
            write.data = data
        self._soon[path] = write
        heapq.heappush(self._soon_due, (write.due, next(self._order), write))
        if not self._flushing:
            self._flushing = True
            self._tg.start_soon(self._flush_soon)
        elif write.due < self._flush_at:
            self._sooner.set()

    async def _flush_soon(self) -> None:
        """Write the ``save_soon`` writes as they fall due (those a batch has not taken already)."""
        try:
            while self._soon:
                self._flush_at = self._next_due()
                with anyio.move_on_after(self._flush_at - anyio.current_time()):
                    await self._sooner.wait()  # one due earlier was queued meanwhile
                if self._sooner.is_set():
                    self._sooner = anyio.Event()
                    continue
                with anyio.CancelScope(shield=True):  # a batch begun is finished
                    await self._write_queued(None)
        finally:
            self._flushing = False
            self._flush_at = math.inf

    def _supersede(self, path: Path) -> None:
        """A new write of ``path`` replaces its ``save_soon`` write still waiting in the queue."""
        if (earlier := self._soon.pop(path, None)) is not None:
            earlier.superseded = True

    async def save(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably; return once it is on disk.

        Raises the ``OSError`` of this write (disk full, directory gone...)."""
        [error] = await self.save_all([(path, data)])
        if error is not None:
            raise error

    async def save_all(self, files: list[tuple[Path, bytes]]) -> list[OSError | None]:
        """``save`` for several files at once: return once all are on disk, with each one's error (None: written)."""
        if not files:
            return []
        writes = []
        for path, data in files:
            if self._soon:
                self._supersede(path)
            writes.append(_Write(path, data))
        self._queued.extend(writes)
        await self._write_queued(writes)
        return [write.error for write in writes]

    async def _write_queued(self, writes: list[_Write] | None) -> None:
        """Write batches until ``writes`` are written (None: until no queued write is due). Batches
        take the durable writes in the order queued (``_take_batch``): once the last of ``writes`` is
        written, all are."""
        last = writes[-1] if writes else None
        while not last.done if last is not None else self._due(anyio.current_time()):
            if self._busy:
                try:
                    await self._written.wait()
                except BaseException:  # cancelled before a batch took them: they are not written at all
                    mine = set(map(id, writes or []))
                    self._queued = [w for w in self._queued if id(w) not in mine]
                    raise
                continue
            batch = self._take_batch()
            self._busy = True
            try:
                with anyio.CancelScope(shield=True):  # a batch begun is finished: its other writers wait on it
                    await anyio.to_thread.run_sync(write_batch, batch, self.journal)
            finally:
                self.batches += 1
                self._busy = False
                written, self._written = self._written, anyio.Event()
                written.set()
            for taken in batch:
                if taken.error is None and self._on_written is not None:
                    self._on_written(taken.path)
                if taken.error is not None and taken.on_error is not None:
                    try:
                        taken.on_error(taken.error)
                    except Exception:
                        log.exception("handling the failed write of %s failed", taken.path)

    def _due(self, now: float) -> bool:
        return bool(self._queued) or self._next_due() <= now

    def _next_due(self) -> float:
        """When the next ``save_soon`` write falls due (``inf``: none waits)."""
        heap = self._soon_due
        while heap and heap[0][2].superseded:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def _take_batch(self) -> list[_Write]:
        """The next batch: up to ``max_batch`` writes, the durable ones in the order queued, then the
        ``save_soon`` writes that are due (a write of a file always comes after the earlier ones of
        that file: a save_soon write queued before a durable one was superseded by it)."""
        batch, self._queued = self._queued[:self._max_batch], self._queued[self._max_batch:]
        now = anyio.current_time()
        while len(batch) < self._max_batch and self._next_due() <= now:
            _, _, write = heapq.heappop(self._soon_due)
            del self._soon[write.path]
            if write.make is not None:
                try:
                    write.data = write.make()
                except Exception:  # a bug in the caller's function: that write is dropped, the others go on
                    log.exception("could not make the data of %s; it is not written", write.path)
                    continue
            batch.append(write)
        return batch


def write_now(files: list[tuple[Path, bytes]], journal: Journal | None) -> list[OSError | None]:
    """``save_all`` for a caller that is not on the event loop yet (a registry loading its history):
    the files written atomically and durably in one batch, through ``journal`` (one ``fdatasync`` for
    them all), each one's error (None: written). Sync."""
    writes = [_Write(path, data) for path, data in files]
    write_batch(writes, journal)
    return [write.error for write in writes]


def write_batch(batch: list[_Write], journal: Journal | None = None) -> None:
    """Write and rename each file in order, the durable ones made durable (sync: in a worker thread).

    The durable writes ``journal`` takes are appended to it with one ``fdatasync`` (``journal.py``),
    then written without one; any other durable write is fsynced, and its directory once. Every
    write ends ``done``, with its own ``error`` when it failed (its directory's fsync included)."""
    journaled: set[int] = set()
    if journal is not None and (taken := [w for w in batch if w.durable and journal.takes(w.path, w.data)]):
        try:
            journal.commit([(w.path, w.data) for w in taken])
            journaled = {id(w) for w in taken}
        except OSError as exc:
            log.warning("could not write the record journal (%s): each record is made durable on its own", exc)
    by_dir: dict[Path, list[_Write]] = {}
    for write in batch:
        durable = write.durable and id(write) not in journaled
        try:
            write_atomic(write.path, write.data, durable=durable, sync_dir=False)
            if durable:
                by_dir.setdefault(write.path.parent, []).append(write)
        except OSError as exc:
            write.error = exc
    for directory, writes in by_dir.items():
        try:
            fsync_dir(directory)
        except OSError as exc:
            for write in writes:
                write.error = exc
    if journaled:
        assert journal is not None
        journal.written()
    for write in batch:
        write.done = True


__all__ = ["GroupCommit", "write_batch", "write_now", "MAX_BATCH"]
