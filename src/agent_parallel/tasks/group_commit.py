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

Given a ``file_delay`` too, the file of a journaled write waits that long (``file_later``). Creating a
file is the costliest part of a trivial task's record on ext4 (15 µs to over 1 ms of kernel CPU,
bench/README.md); made while the next tasks start, it took the second core from their children.
Later, the files of many records are written in one batch, after the burst. The journal holds them
meanwhile: a crash writes them back, ``agent-parallel status`` reads them there, a checkpoint writes
those still waiting before it empties the journal, and ``file_now`` writes them at close. Only a file
not made yet waits: one that a ``save_soon`` write made (a running record) is replaced at once, so no
file shows a task running that has ended.

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

import functools
import heapq
import itertools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from ..errors import os_error_text
from ..paths import fsync_dir, write_atomic
from .journal import CHECKPOINT_ENTRIES, Journal

log = logging.getLogger(__name__)

MAX_BATCH = 256  # files per batch: one batch never keeps a worker thread for long
SOON_DELAY_S = 0.05  # how long a save_soon write waits to be superseded (a running record, by the final one)
FILE_DELAY_S = 1.0  # how long a journaled write's file waits (the registry's final records: see above)
FILE_NOW_TIMEOUT_S = 5.0  # how long ``file_now`` (at close) waits for the files still waiting


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
    file_later: bool = False  # durable: once journaled, its file may wait (``file_delay``)
    deferred: bool = False  # it was journaled and its file left for later (``write_batch``)
    filing: bool = False  # the later write of a journaled write's file (not fsynced: the journal holds it)
    file_error: OSError | None = None  # a journaled write's file failed (``write_batch(keep_failed=True)``)

    @classmethod
    def filing_of(cls, path: Path, data: bytes) -> _Write:
        """The later write of a journaled write's file: not fsynced, as the journal holds its data."""
        return cls(path, data, durable=False, filing=True)


class GroupCommit:
    """Atomic writes, batched (see the module docstring). One per event loop; ``save_soon``
    needs ``tg``, where the background batches run."""

    def __init__(self, *, max_batch: int = MAX_BATCH, tg: TaskGroup | None = None, journal: Journal | None = None,
                 on_written: Callable[[Path], None] | None = None, file_delay: float | None = None) -> None:
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
        self._file_delay = file_delay if journal is not None and tg is not None else None
        self._unfiled: dict[Path, bytes] = {}  # journaled writes whose file is not made yet (waits, or failed)
        self._on_disk: set[Path] = set()  # files a save_soon write made (a running record): not left stale
        self._force_at = 0  # journal entries before waiting files are forced again (after some failed)

    @property
    def unfiled(self) -> int:
        """Journaled writes whose file is not written yet."""
        return len(self._unfiled)

    def save_soon(self, path: Path, data: bytes | Callable[[], bytes], on_error: Callable[[OSError], None], *,
                  delay: float = SOON_DELAY_S, filing: bool = False) -> None:
        """Queue an atomic write of ``data`` to ``path`` that nobody waits for (not fsynced), written
        ``delay`` seconds later unless superseded; ``on_error`` is called (on the event loop) if it
        fails. ``data`` may be a function that makes it, called (on the event loop) only if the write
        is not superseded first: most are. See the module docstring."""
        assert self._tg is not None, "save_soon needs the task group GroupCommit was given"
        self._supersede(path)
        write = _Write(path, b"", durable=False, on_error=on_error, due=anyio.current_time() + delay, filing=filing)
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

    def forget(self, path: Path) -> None:
        """``path`` is being deleted (a pruned record): its file is not to be written any more."""
        self._supersede(path)
        self._unfiled.pop(path, None)
        self._on_disk.discard(path)

    async def file_all(self) -> None:
        """Write now the files still waiting for ``file_delay`` (one batch); return once written."""
        if self._unfiled:
            await self.save_all([], filing=list(self._unfiled.items()))

    def file_now(self, timeout: float = FILE_NOW_TIMEOUT_S) -> bool:
        """``file_all`` for a caller off the event loop's turn (the registry closing, its task group
        ended: no batch under way). Sync, in a thread given ``timeout`` seconds: a hung disk must not
        hang a server's exit. What is not written by then, or cannot be, stays in the journal, which
        the next server recovers. Whether every file was written."""
        writes = [_Write.filing_of(path, data) for path, data in self._unfiled.items()]
        if not writes:
            return True
        writer = threading.Thread(target=write_batch, args=(writes, None), name="record files", daemon=True)
        writer.start()
        writer.join(timeout)
        if writer.is_alive():
            log.warning("%d task record files were not written within %g s (a slow or hung disk?); the record "
                        "journal keeps them for the next start", len(writes), timeout)
            return False
        self._after_batch(writes)
        return not self._unfiled

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

    async def save_all(self, files: list[tuple[Path, bytes]], *,
                       filing: list[tuple[Path, bytes]] | None = None) -> list[OSError | None]:
        """``save`` for several files at once: return once all are on disk, with each one's error (None: written).
        (``filing``: files of journaled writes to write now, not fsynced, ``file_all``.)"""
        if not files and not filing:
            return []
        writes = []
        later = self._file_delay is not None
        for path, data in files:
            if self._soon:
                self._supersede(path)
            writes.append(_Write(path, data, file_later=later))
        for path, data in filing or ():
            self._supersede(path)
            writes.append(_Write.filing_of(path, data))
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
            # the journal may be emptied after this batch only if it files every waiting file (the filing
            # writes are of waiting files only: fewer of them than files waiting settles it at once)
            filing = [w.path for w in batch if w.filing]
            checkpoint = len(filing) >= len(self._unfiled) and self._unfiled.keys() <= set(filing)
            self._busy = True
            try:
                with anyio.CancelScope(shield=True):  # a batch begun is finished: its other writers wait on it
                    await anyio.to_thread.run_sync(functools.partial(write_batch, batch, self.journal,
                                                                     may_checkpoint=checkpoint, keep_failed=True))
            finally:
                self.batches += 1
                self._busy = False
                written, self._written = self._written, anyio.Event()
                written.set()
            self._after_batch(batch)

    def _after_batch(self, batch: list[_Write]) -> None:
        """Tell of the files written and of the failed writes; the files of journaled writes wait
        ``file_delay`` (their later write, ``filing``, goes like a ``save_soon`` write). Files that could
        not be written stay waiting, said in one warning, and are tried again with the next checkpoint
        after ``CHECKPOINT_ENTRIES`` more records (not at every batch: a directory refusing files must
        not make each batch try them all)."""
        failed: list[tuple[Path, OSError]] = []
        for w in batch:
            if (error := w.file_error or (w.error if w.filing else None)) is not None:
                failed.append((w.path, error))
        if failed:
            (path, error), more = failed[0], ", ..." if len(failed) > 1 else ""
            log.warning("could not write %d task record file(s) (%s: %s%s); the record journal keeps them, and "
                        "they are tried again later", len(failed), path, os_error_text(error), more)
            if self.journal is not None:
                self._force_at = self.journal.entries + CHECKPOINT_ENTRIES
        for taken in batch:
            if taken.deferred:
                self._unfiled[taken.path] = taken.data
                if self._tg is not None:  # (else tried again by the next checkpoint, file_all or file_now)
                    self.save_soon(taken.path, taken.data, _told_after_the_batch, filing=True,
                                   delay=FILE_DELAY_S if self._file_delay is None else self._file_delay)
                continue
            if taken.filing and taken.error is None and self._unfiled.get(taken.path) is taken.data:
                del self._unfiled[taken.path]
            elif not taken.durable and not taken.filing and taken.error is None and self._file_delay is not None:
                # (a save_soon write queued after a durable one makes the record as it is then: the file is current)
                if self._unfiled.pop(taken.path, None) is None:
                    self._on_disk.add(taken.path)
            if taken.error is None and self._on_written is not None:
                self._on_written(taken.path)
            if taken.error is not None and taken.on_error is not None:
                try:
                    taken.on_error(taken.error)
                except Exception:
                    log.exception("handling the failed write of %s failed", taken.path)
        if not self._unfiled:
            self._force_at = 0

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
        if self._on_disk:  # a file made already (a running record) is replaced at once, never left stale
            for write in batch:
                if write.durable and write.path in self._on_disk:
                    write.file_later = False
                    self._on_disk.discard(write.path)
        if self._unfiled and self.journal is not None and self.journal.entries >= max(CHECKPOINT_ENTRIES,
                                                                                      self._force_at):
            # the journal is due to be emptied: every file it still holds the only copy of goes now
            for write in batch:
                write.file_later = False
            filing = {w.path for w in batch if w.filing}
            for path, data in self._unfiled.items():
                if path not in filing:
                    self._supersede(path)
                    batch.append(_Write.filing_of(path, data))
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


def _told_after_the_batch(exc: OSError) -> None:
    """A waiting file's write failed: ``GroupCommit._after_batch`` says so, once for its batch."""


def write_now(files: list[tuple[Path, bytes]], journal: Journal | None) -> list[OSError | None]:
    """``save_all`` for a caller that is not on the event loop yet (a registry loading its history):
    the files written atomically and durably in one batch, through ``journal`` (one ``fdatasync`` for
    them all), each one's error (None: written). Sync."""
    writes = [_Write(path, data) for path, data in files]
    write_batch(writes, journal)
    return [write.error for write in writes]


def write_batch(batch: list[_Write], journal: Journal | None = None, *, may_checkpoint: bool = True,
                keep_failed: bool = False) -> None:
    """Write and rename each file in order, the durable ones made durable (sync: in a worker thread).

    The durable writes ``journal`` takes are appended to it with one ``fdatasync`` (``journal.py``),
    then written without one, or not yet (``file_later``: marked ``deferred``); any other durable
    write is fsynced, and its directory once. The journal is checkpointed when due, unless a file it
    holds the only copy of is not written (``may_checkpoint``: none outside this batch). Every write
    ends ``done``, with its own ``error`` when it failed (its directory's fsync included); with
    ``keep_failed``, a journaled write whose file failed is durable all the same: marked ``deferred``
    (its file tried again later) with the cause in ``file_error``, not failed."""
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
        if write.file_later and write.durable and not durable:  # journaled: its file waits
            write.deferred = True
            may_checkpoint = False  # (the journal holds the only copy)
            continue
        try:
            write_atomic(write.path, write.data, durable=durable, sync_dir=False)
            if durable:
                by_dir.setdefault(write.path.parent, []).append(write)
        except OSError as exc:
            if id(write) in journaled or write.filing:
                may_checkpoint = False  # (the journal holds the only copy)
                if keep_failed and not write.filing:
                    write.deferred, write.file_error = True, exc
                    continue
            write.error = exc
    for directory, writes in by_dir.items():
        try:
            fsync_dir(directory)
        except OSError as exc:
            for write in writes:
                write.error = exc
    if journal is not None and may_checkpoint:
        journal.written()
    for write in batch:
        write.done = True


__all__ = ["GroupCommit", "write_batch", "write_now", "MAX_BATCH", "FILE_DELAY_S"]
