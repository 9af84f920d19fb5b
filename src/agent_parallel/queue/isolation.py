"""An isolated item (``runner.isolation: worktree``): its own git worktree before its process starts,
its integration into the target after the process succeeds.

The git work is ``agent_parallel.worktrees`` (synchronous: run here in worker threads); this module
decides when, keeps the item's ``phase`` (setup → running → integrating → integrated | conflict)
and words what happened for the item's log, reason and report. An item's dependents start only
once its file is ``completed``, which for an isolated item means integrated: so a dependent's
worktree, made from the target at its claim, starts from its predecessors' merged work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import anyio

from ..agents.job import ItemJob
from ..config import Config
from ..errors import AgentParallelError, QueueError, ShellStopped
from ..results import AgentUsage
from ..tasks.executor import ExitInfo
from ..tasks.logs import LogWriter
from ..tasks.records import Phase, TaskRecord
from ..worktrees import (Integration, Lease, ShellStop, integrate, is_safe_to_remove, list_worktrees,
                         predict_conflicts, prepare, release, remove)
from .items import WorkItem
from .timings import record_integration

log = logging.getLogger(__name__)

SETUP_LOG_BYTES = 64 << 10
"""What ``worktree.setup`` printed is kept up to this much (its end) for the head of the item's log."""


def is_isolated(config: Config, item: WorkItem) -> bool:
    return item.runs_isolated(config.isolation)


@dataclass
class Isolated:
    """An isolated item's worktree (its ``lease``) and where it is in its life."""

    lease: Lease
    phase: Phase = "setup"
    conflicts: list[str] = field(default_factory=list)
    """Files that conflict: predicted while it runs (``forecast``), real after a failed integration."""
    integration_s: float | None = None
    record: TaskRecord | None = field(default=None, repr=False)
    """The item's task record once it has one (``show_in``): it shows the phase and conflicts too."""

    @property
    def worktree(self) -> str:
        return str(self.lease.path)

    def show_in(self, record: TaskRecord) -> None:
        """From now on keep ``record``'s phase and conflicts as these are (task_output shows them)."""
        self.record = record
        self.move(self.phase, self.conflicts)

    def move(self, phase: Phase, conflicts: list[str] | None = None) -> None:
        """Set the phase (and the conflicts, when given), in the task record too once there is one."""
        self.phase = phase
        if conflicts is not None:
            self.conflicts = list(conflicts)
        if self.record is not None:
            self.record.phase, self.record.conflicts = self.phase, list(self.conflicts)


class _Tail:
    """A binary sink keeping only the last ``limit`` bytes written to it (setup output can be long);
    ``prepare`` only writes to and flushes its ``log``."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data, self.dropped = limit, bytearray(), 0

    def flush(self) -> None:
        pass

    def write(self, b: bytes) -> int:
        self.data += b
        if len(self.data) > self.limit:
            cut = len(self.data) - self.limit
            del self.data[:cut]
            self.dropped += cut
        return len(b)


class _Forward:
    """A binary sink handing what ``worktree.setup`` prints, as it comes, to ``write`` on the event loop
    (``prepare`` writes to its ``log`` from a worker thread). A write that fails (a full disk) ends the
    forwarding, never the setup."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write: Callable[[bytes], object] | None = write
        self.mid_line = False  # what was written last did not end a line

    def flush(self) -> None:
        pass

    def write(self, b: bytes) -> int:
        if self._write is not None and b:
            self.mid_line = not b.endswith(b"\n")
            try:
                anyio.from_thread.run_sync(self._write, bytes(b))
            except Exception:
                log.warning("the setup's output could not be written to its task's log", exc_info=True)
                self._write = None
        return len(b)


async def prepare_item(root: Path, config: Config, item: WorkItem, *, stop: ShellStop | None = None,
                       live: Callable[[bytes], object] | None = None) -> tuple[Isolated, bytes]:
    """Make (or reuse) the item's worktree and run ``worktree.setup`` in it (in a worker thread;
    ``stop``, the run's, kills the setup when the run is stopped: `ShellStopped`).

    Returns it and the text that opens the item's log: where it runs and what setup printed (its
    last ``SETUP_LOG_BYTES``); with ``live`` (its task's log already open), what setup prints goes
    there as it comes instead. Raises ``ConfigError`` (not a git repository ...), ``SetupFailed``
    or ``WorktreeError``."""
    tail = _Tail(SETUP_LOG_BYTES)
    sink = _Forward(live) if live is not None else tail
    lease = await anyio.to_thread.run_sync(lambda: prepare(root, config, item.id_str, item.slug,
                                                           log=cast(BinaryIO, sink), stop=stop))
    lines = [f"agent-parallel: item {item.id_str} runs in the worktree {lease.path} on branch {lease.branch}"
             + (f", port {lease.port}" if lease.port is not None else "")
             + (" (reused: the work done so far is kept)" if lease.reused else "")]
    lines += [f"agent-parallel: {note}" for note in lease.notes]
    if tail.dropped:
        lines.append(f"agent-parallel: the first {tail.dropped} bytes of the setup's output are not kept")
    head = (b"\n" if isinstance(sink, _Forward) and sink.mid_line else b"") + ("\n".join(lines) + "\n").encode() \
        + bytes(tail.data)
    if tail.data and not tail.data.endswith(b"\n"):
        head += b"\n"
    return Isolated(lease, phase="running"), head


class SetupFirst:
    """The task body (a registry ``Job``) of an isolated item started by ``launch_task(item=...)``:
    its worktree and ``worktree.setup`` first, then the item's own attempts there (``then``, given
    the worktree, makes its ``ItemJob``).

    A setup may take minutes (an ``npm ci``): as the task's first step it no longer holds the tool
    call, which answers at once like any launch. A setup that fails fails the task (and the item),
    saying why; one stopped by ``cancel_task`` or a shutdown (``stop``: its command is killed) ends
    with ``setup_stopped`` set, and the item is given back, as a run gives back an item whose setup
    it stopped. ``isolated`` is the worktree once made; ``inner`` the attempts once begun."""

    def __init__(self, root: Path, config: Config, item: WorkItem, then: Callable[[Isolated], ItemJob],
                 on_ready: Callable[[str, Isolated], None]) -> None:
        self.root, self.config, self.item, self.then, self.on_ready = root, config, item, then, on_ready
        self.isolated: Isolated | None = None
        self.inner: ItemJob | None = None
        self.setup_stopped: str | None = None
        """Why the setup was stopped (its command killed), when it was: the item never ran."""
        self._stop = ShellStop("its task was stopped")
        self._stopped = False

    async def start(self, task_id: str, log: LogWriter) -> None:
        self.task_id, self.log = task_id, log
        setup = f" and runs worktree.setup ({self.config.worktree_setup})" if self.config.worktree_setup else ""
        log.write(f"agent-parallel: item {self.item.id_str} gets its worktree{setup} first\n".encode())

    async def run(self) -> ExitInfo:
        try:  # what the setup prints goes to the task's log as it comes: task_output shows its progress
            self.isolated, head = await prepare_item(self.root, self.config, self.item, stop=self._stop,
                                                     live=self.log.write)
        except ShellStopped as exc:
            self.setup_stopped = str(exc)
            return ExitInfo(None, "not started")
        except AgentParallelError as exc:  # the task fails saying why; the item fails with it
            raise QueueError(f"its worktree could not be prepared: {exc}") from exc
        self.log.write(head)
        if self._stopped:  # stopped as the setup ended: the item never ran, its worktree stays for later
            self.setup_stopped = "its task was stopped as its worktree became ready"
            lease = self.isolated.lease
            await anyio.to_thread.run_sync(lambda: release(self.root, lease))
            self.isolated = None
            return ExitInfo(None, "not started")
        self.on_ready(self.task_id, self.isolated)
        self.inner = self.then(self.isolated)
        await self.inner.start(self.task_id, self.log)
        return await self.inner.run()

    async def stop(self, grace: float, reason: str) -> None:
        self._stopped = True
        self._stop.stop(f"its task was {reason}")
        if self.inner is not None:
            await self.inner.stop(grace, reason)

    def usage(self) -> AgentUsage | None:
        return self.inner.usage() if self.inner is not None else None


async def integrate_item(root: Path, config: Config, isolated: Isolated, item: WorkItem, *,
                         succeeded: bool, stop: ShellStop | None = None) -> tuple[bool, str | None, list[str]]:
    """After the item's process: integrate it if it succeeded, then give the lease back (``stop``,
    the run's, kills ``integration.verify`` when the run is stopped: the item fails, its work kept).

    Returns whether the item succeeded as a whole, the reason when integration failed it, and
    notes (the worktree removed, or kept and why). A failed integration keeps branch and worktree."""
    lease = isolated.lease
    notes: list[str] = []
    try:
        if not succeeded:
            notes.append(f"its worktree {lease.path} and branch {lease.branch} are kept: move item {item.id_str} "
                         "back to pending with update_item to go on from the work done so far (they are reused)")
            return False, None, notes
        isolated.move("integrating")
        try:
            result: Integration = await anyio.to_thread.run_sync(
                lambda: integrate(root, config, lease, item.title or f"item {item.id_str}", config.integration_author,
                                  stop=stop))
        except ShellStopped as exc:  # the run was stopped during its verify: the target did not move
            notes.append(f"its worktree {lease.path} and branch {lease.branch} are kept: move item {item.id_str} "
                         "back to pending with update_item to integrate it later (they are reused)")
            return False, f"integration was not finished: {exc}", notes
        except Exception as exc:  # git itself failed: the item fails (its file must still move), its work is kept
            isolated.move("conflict")
            notes.append(f"its worktree {lease.path} and branch {lease.branch} are kept: fix the cause, then move "
                         f"item {item.id_str} back to pending with update_item (they are reused)")
            return False, f"integration could not run: {exc}", notes
        isolated.integration_s = result.seconds
        if result.ok:  # what the planner expects the next ones to take (a failed one ends early: not counted)
            await anyio.to_thread.run_sync(lambda: _record(root, item.id_str, result.seconds))
        if not result.ok:
            isolated.move("conflict", list(result.conflicts))
            reason = f"integration failed: {result.message}"
            if result.output_tail:
                reason += f"\n{result.output_tail.rstrip()}"
            notes.append(f"its worktree {lease.path} and branch {lease.branch} are kept: fix it there, then move "
                         f"item {item.id_str} back to pending with update_item (its worktree is reused)")
            return False, reason, notes
        isolated.move("integrated", [])
        notes.append(f"integrated into {lease.target} in {result.seconds:.2f} s ({result.message})")
        notes.append(await anyio.to_thread.run_sync(lambda: _release_and_remove(root, config, lease)))
        return True, None, notes
    finally:
        try:
            await anyio.to_thread.run_sync(lambda: release(root, lease))  # releasing twice is harmless
        except Exception as exc:  # the lease of a process that ends is dropped anyway: never fail the item here
            log.warning("could not release the worktree lease of item %s: %s", item.id_str, exc)


def _record(root: Path, item_id: str, seconds: float) -> None:
    """Keep the measured integration time for the planner; a failure to keep it only loses a sample."""
    try:
        record_integration(root, item_id, seconds)
    except Exception as exc:
        log.warning("could not record the integration time of item %s: %s", item_id, exc)


def _release_and_remove(root: Path, config: Config, lease: Lease) -> str:
    """Give the lease back (a held worktree is never safe to remove), then `_remove_if_safe`."""
    try:
        release(root, lease)
    except Exception as exc:
        return f"its worktree {lease.path} is kept: {exc}; `agent-parallel worktrees clean` removes it once safe"
    return _remove_if_safe(root, config, lease)


def _remove_if_safe(root: Path, config: Config, lease: Lease) -> str:
    """Remove an integrated item's worktree and branch when that provably loses nothing. Housekeeping:
    the item is integrated whatever happens here, so nothing is raised (another item's worktree
    removed at the same moment makes the listing fail, for one)."""
    try:
        for state in list_worktrees(root, config):
            if state.path == lease.path:
                safe, why = is_safe_to_remove(root, config, state)
                if not safe:
                    return f"its worktree {lease.path} is kept: {why}"
                return remove(root, config, state)
    except Exception as exc:
        return f"its worktree {lease.path} is kept: {exc}; `agent-parallel worktrees clean` removes it once safe"
    return f"its worktree {lease.path} was already gone"


async def forecast(root: Path, target: str, running: list[Isolated]) -> None:
    """Predict, with ``git merge-tree`` (no working tree touched), which files each running isolated
    item's branch would conflict on with the target as it is now; stored in its ``conflicts``."""
    branches = [i.lease.branch for i in running if i.phase == "running"]
    if not branches:
        return
    found = await anyio.to_thread.run_sync(lambda: predict_conflicts(root, target, branches))
    for isolated in running:
        if isolated.phase == "running":
            isolated.move("running", found.get(isolated.lease.branch, []))
