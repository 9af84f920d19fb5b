"""Group commit: durable file writes that share their directory fsync and their worker thread.

A final task record must survive a crash: written to a temporary file, fsynced, renamed over the
record, and the directory fsynced (``paths.write_atomic(durable=True)``). When many tasks end at
once (300 trivial items through a queue run), doing that one record per worker thread costs a
thread hop and a directory fsync each. ``GroupCommit.save`` queues the write instead: the first
caller finding no batch in progress writes everything queued so far in one worker thread (each
file written, fsynced and renamed in the order queued, then each directory fsynced once), while
later callers queue up for the next batch. Durability is unchanged: ``save`` returns only once
its own file and its directory entry are on disk, and raises the ``OSError`` of its own write
(a failed write fails only its caller). A batch, once begun, is finished even if its callers are
cancelled; a caller cancelled while its write still waits for a batch takes it back (not written).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..paths import write_atomic

MAX_BATCH = 256  # files per batch: one batch never keeps a worker thread for long


@dataclass
class _Write:
    path: Path
    data: bytes
    done: bool = False
    error: OSError | None = None


class GroupCommit:
    """Durable atomic writes, batched (see the module docstring). One per event loop."""

    def __init__(self, *, max_batch: int = MAX_BATCH) -> None:
        self._queued: list[_Write] = []
        self._busy = False  # a batch is being written
        self._written = anyio.Event()  # set (and replaced) when a batch is finished
        self._max_batch = max_batch
        self.batches = 0  # batches written (for tests and benchmarks)

    async def save(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably; return once it is on disk.

        Raises the ``OSError`` of this write (disk full, directory gone...)."""
        write = _Write(path, data)
        self._queued.append(write)
        while not write.done:
            if self._busy:
                try:
                    await self._written.wait()
                except BaseException:  # cancelled before a batch took it: it is not written at all
                    if write in self._queued:
                        self._queued.remove(write)
                    raise
                continue
            batch, self._queued = self._queued[:self._max_batch], self._queued[self._max_batch:]
            self._busy = True
            try:
                with anyio.CancelScope(shield=True):  # a batch begun is finished: its other writers wait on it
                    await anyio.to_thread.run_sync(write_batch, batch)
            finally:
                self.batches += 1
                self._busy = False
                written, self._written = self._written, anyio.Event()
                written.set()
        if write.error is not None:
            raise write.error


def write_batch(batch: list[_Write]) -> None:
    """Write, fsync and rename each file in order, then fsync each directory once (sync: in a worker thread).

    Every write ends ``done``, with its own ``error`` when it failed (its directory's fsync included)."""
    by_dir: dict[Path, list[_Write]] = {}
    for write in batch:
        try:
            _write_file(write.path, write.data)
            by_dir.setdefault(write.path.parent, []).append(write)
        except OSError as exc:
            write.error = exc
    for directory, writes in by_dir.items():
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            for write in writes:
                write.error = exc
    for write in batch:
        write.done = True


def _write_file(path: Path, data: bytes) -> None:
    """``paths.write_atomic(durable=True)`` without its directory fsync (the batch does that once)."""
    write_atomic(path, data, durable=True, sync_dir=False)


__all__ = ["GroupCommit", "write_batch", "MAX_BATCH"]
