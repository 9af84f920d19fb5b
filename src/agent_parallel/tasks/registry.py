"""The task registry: every task of this server, its record, and the events waiters block on.

Only the registry changes a task's state (``TaskRecord.start``/``end``: the record's state machine). Each task has one supervising coroutine (in the
registry's task group) that waits for its predecessors, starts it through the executor, enforces
its timeout and records how it ended. A task's body is a process (started by an ``Executor``)
or a ``Job``: a coroutine of this server, such as a queue run, with the same lifecycle and record. Waiters block on an ``anyio.Event`` per task, so they wake
the moment a task ends: no polling.

A failure inside one task's supervision fails that task and nothing else: whatever goes wrong
(the executor raising anything, no file descriptor left, a log or record that cannot be
written), the task ends ``failed`` with the reason (and a line in its log when one can be
written), its processes are stopped, and the registry's task group, and so the server, goes on.
Blocking work (record saves, log reads, looking through /proc) runs in worker threads.
"""

from __future__ import annotations

import builtins
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus as StartStatus

from ..errors import (AgentParallelError, InternalError, ResourceLimitError, ShuttingDown, StorageError, UnknownTask,
                      UsageError, exception_reason,
                      os_error_text)
from ..paths import ensure_runs_dir
from ..text import first_few, short_repr
from .executor import MAX_ARG_BYTES, Executor, ExecutorError, ExitInfo, LaunchSpec, TaskHandle, check_launch_strings
from .group_commit import FILE_DELAY_S, SOON_DELAY_S, GroupCommit, write_now
from .journal import FirstRecords, Journal, recover
from .lane import open_lane
from .logs import (UPSTREAM_LOGS_VAR, LineMatcher, LogChunk, LogReader, LogWriter, head_cap, head_log_path, record_path,
                   recover_log_extent, spill_upstream_logs, tail_segments_on_disk, task_files,
                   upstream_log_path)
from .processes import TASK_ID_VAR, describe_survivors, kill_tasks_now, process_start_time, same_process
from .records import (Cancelled, Failed, FailedToStart, Interrupted, Outcome, ProcessRef, Running, Skipped, Succeeded,
                      TaskKind, TaskRecord, TaskStatus, TimedOut, is_group_id, journal_replaces, load_records,
                      new_group_id, new_task_id)

log = logging.getLogger(__name__)

FIRST_RECORD_DELAY_S = 1.0  # a launched task's first record (journaled) is written as a file this late if still queued
FOLLOW_UP_TIMEOUT_S = 30.0  # the longest a task's on_finish may take before waiters are woken anyway
STOP_BOUND_S = 15.0  # the longest a failing task's processes are given to be stopped


class _TaskFailure(Exception):
    """Supervision of one task cannot go on; the message is the task's ``reason``."""


@dataclass
class RegistrySettings:
    log_cap_bytes: int = 64 << 20
    kill_grace_s: float = 2.0
    max_running: int = 256  # concurrently running or queued tasks
    admission: Callable[[], str | None] | None = None
    """Asked before each process starts: None to go ahead, or why to hold the start (low memory, high load)."""
    admission_retry_s: float = 0.5
    max_records: int = 10_000
    """Finished tasks kept (records and logs); the oldest beyond this are removed."""


class Job(Protocol):
    """A task's body when it is not a process: a coroutine of this server (a queue run).

    The registry calls ``start`` once the task may start (``launch`` returns after it; raising
    fails the task with the error as its reason), then ``run`` until it returns the task's exit,
    and ``stop`` when the task is cancelled, times out or the server shuts down (``run`` must then
    return soon). A finished job stays on its task (``Task.job``) and may still be read."""

    async def start(self, task_id: str, log: LogWriter) -> None:
        """Get ready to run as task ``task_id``, writing what it reports to ``log``."""

    async def run(self) -> ExitInfo:
        """Do the work; the exit code decides the task's status (0: completed)."""

    async def stop(self, grace: float, reason: str) -> None:
        """Wind down: start nothing new and stop what it started, within about ``grace`` seconds.
        ``reason`` says who or what stopped it, as a phrase that follows "was" ("cancelled by
        cancel_task", "stopped by Ctrl-C …", "stopped: the server is shutting down")."""


@dataclass
class GroupSlots:
    """A fan-out's members share this: at most ``max_parallel`` of them run at once.

    Its members start in order (``TaskRegistry._dispatch_now``): as many as fit once its predecessors
    completed (one coroutine per group, ``_dispatch_group``, waits for those and retries a start the
    task cap holds), then the next one as soon as a member's end frees its slot, in the same turn (in
    the lane's, for members it followed). A member waiting for its turn has only its record."""

    group_id: str
    max_parallel: int
    running: int = 0  # members holding a slot (started, not yet finished)
    freed: anyio.Event = field(default_factory=anyio.Event)  # set (and replaced) when a slot is given back
    waiting: deque[tuple[Task, LaunchSpec]] = field(default_factory=deque)  # members not started yet, in order
    predecessors: builtins.list[Task] = field(default_factory=list)  # what every member waits on
    open: bool = False  # its predecessors completed: members start as slots free


FollowUp = Callable[["Task"], Awaitable[str | None]]
"""A task's ``on_finish``: awaited once its final status is set, before waiters wake; what it
returns is added to the task's reason (e.g. that a queue item's file could not be moved)."""


class FollowUps(Protocol):
    """The follow-up of many tasks at once (``launch(finish_with=...)``): a queue run's plain items.

    The tasks of one owner that end together get one call instead of a coroutine, a timeout scope
    and an event each: that machinery cost more than the item's file move it waited for."""

    async def follow_up_many(self, tasks: list[Task]) -> list[str | None]:
        """As ``FollowUp`` for each of ``tasks`` (their final status is set), in their order."""

    def follow_up_now(self, tasks: list[Task]) -> list[str | None] | None:
        """The same made at once, on the event loop, in the lane's turn that took the ends (no await:
        a run frees the slots and starts its next items there); None when it cannot be made at once
        now, and ``follow_up_many`` makes it instead."""


@dataclass
class Task:
    """A record plus what only exists while this server runs."""

    record: TaskRecord
    done: anyio.Event = field(default_factory=anyio.Event)
    handle: TaskHandle | None = None  # the task's process, while it runs
    job: Job | None = None  # the task's job once started (a finished job stays readable)
    log: LogWriter | None = None
    cancel_requested: bool = False
    cancel_reason: str = "cancelled by cancel_task"  # its reason once cancelled (who stopped it)
    waker: anyio.CancelScope | None = None  # wakes a task still waiting for its predecessors
    on_finish: FollowUp | None = None
    finish_with: FollowUps | None = None  # its follow-up, made with others' (``FollowUps``)
    active: bool = False  # counted in the registry's queued-or-running tally
    group: GroupSlots | None = None  # the fan-out it belongs to (it waits for one of the group's slots)
    holds_slot: bool = False  # holds one of its group's slots
    dispatched: bool = True  # False for a group member its group has not started yet
    prelude: bytes = b""  # written at the head of its log when the log is opened
    follow_up_timeout: float = FOLLOW_UP_TIMEOUT_S
    finishing: bool = False  # _finish has begun: it runs once
    pins: int = 0  # kept past ``max_records`` while pinned (``TaskRegistry.pin``)
    storage_error: str | None = None  # its running record could not be written: it was stopped, and fails

    @property
    def output_bytes(self) -> int:
        return self.log.total if self.log is not None else self.record.output_bytes


class TaskRegistry:
    def __init__(self, root: Path, runs_dir: Path, executor: Executor, tg: TaskGroup,
                 settings: RegistrySettings | None = None, *, new_id: Callable[[], str] = new_task_id) -> None:
        self.root, self.runs_dir, self.executor, self._tg = root, runs_dir, executor, tg
        self.settings = settings or RegistrySettings()
        self._new_task_id = new_id
        self._server = (os.getpid(), process_start_time(os.getpid()))
        self._tasks: dict[str, Task] = {}
        self._prune_at = 0  # no prune before the registry holds this many tasks (``_prune``)
        self._groups: dict[str, builtins.list[str]] = {}  # group id -> its members' task ids, in launch order
        self._items_done: dict[int, Task] = {}  # queue item number -> its latest completed task (``completed_items``)
        self._group_wakers: dict[str, anyio.CancelScope] = {}  # groups waiting for their predecessors
        self._closing = False
        self._active = 0  # tasks queued or running, plus launches under way (kept, not counted: O(1))
        self._saving = 0  # final records being written in worker threads
        self._saved = anyio.Event()  # set whenever no final record is being written
        self._saved.set()
        self._ended = anyio.Event()  # the ``done`` of every finished task: one set event (~0.8 KB less each)
        self._ended.set()
        # the first records of launched tasks, journaled instead of written at once (journal.py)
        self._firsts = FirstRecords(runs_dir)
        # final records of tasks ending together share a worker thread and one fdatasync (journal.py);
        # their files are written a little later, many at once (group_commit.py)
        self._commits = GroupCommit(tg=tg, journal=Journal(runs_dir), on_written=self._firsts.filed,
                                    file_delay=FILE_DELAY_S)
        self._lane = open_lane(executor, self, tg)  # starts and follows the common tasks together
        self._load_history()

    def close(self) -> None:
        """Release what the registry holds (once its task group has ended)."""
        self._commits.file_now()  # the final records' files still waiting
        if self._commits.journal is not None:
            self._commits.journal.close()
        self._firsts.close()
        if self._lane is not None:
            self._lane.close()
            self._lane = None

    # ----------------------------------------------------------------- queries
    def get(self, task_id: str) -> Task:
        try:
            return self._tasks[task_id]
        except (KeyError, TypeError):
            raise UnknownTask(task_id) from None

    def group(self, group_id: str) -> builtins.list[Task]:
        """A fan-out's members, in the order they were given."""
        members = self._groups.get(group_id) if isinstance(group_id, str) else None
        if not members:
            raise UsageError(f"unknown group_id {short_repr(group_id)}; launch_task(commands=[...]) answers with the group_id "
                             "of the commands it started")
        return [self._tasks[task_id] for task_id in members]

    def resolve(self, ids: builtins.list[str]) -> builtins.list[Task]:
        """The tasks ``ids`` name, a group id standing for all its members; each task once, in order."""
        seen: dict[str, Task] = {}
        for one in ids:
            for task in self.group(one) if isinstance(one, str) and is_group_id(one) else [self.get(one)]:
                seen.setdefault(task.record.task_id, task)
        return list(seen.values())

    def has_room(self) -> bool:
        """False while ``max_running`` tasks are queued or running: a launch now would be refused."""
        return self.room() > 0

    def room(self) -> int:
        """How many more tasks may be launched before ``max_running`` is reached."""
        return max(0, self.settings.max_running - self._active)

    def newest_first(self, statuses: set[str] | None = None, among: set[str] | None = None) -> Iterator[Task]:
        """Tasks from the newest, optionally only in ``statuses`` and only those ``among`` these ids
        (insertion order is creation order)."""
        for task in reversed(self._tasks.values()):
            if (not statuses or task.record.status in statuses) and (among is None or task.record.task_id in among):
                yield task

    def completed_items(self, numbers: Iterable[int]) -> builtins.list[Task]:
        """The latest completed task of each queue item in ``numbers`` that has one kept, in that order.
        Items are known by number (a file may spell item 7 ``007`` or ``0007``); kept in an index, as
        every item a run starts asks for those it waits on (a scan of the tasks each time made a run of
        10,000 items quadratic)."""
        return [task for n in numbers if (task := self._items_done.get(n)) is not None]

    def _index_item(self, task: Task) -> None:
        if (number := _item_number(task.record)) is not None and task.record.status == TaskStatus.COMPLETED:
            self._items_done[number] = task

    def list(self, statuses: set[str] | None = None, limit: int = 50, offset: int = 0,
             among: set[str] | None = None) -> tuple[builtins.list[Task], int]:
        """A page of tasks, newest first, and how many match in all."""
        matching = list(self.newest_first(statuses, among))
        return matching[offset:offset + limit], len(matching)

    def reader(self, task: Task) -> LogReader:
        rec = task.record
        if task.log is not None:
            return LogReader(self.runs_dir, rec.task_id, task.log.total, task.log.head_cap, list(task.log.segments))
        return LogReader(self.runs_dir, rec.task_id, rec.output_bytes, self._head_cap(rec), rec.tail_segments)

    def _head_cap(self, rec: TaskRecord) -> int:
        return head_cap(rec.log_cap_bytes or self.settings.log_cap_bytes)

    def read_output(self, task: Task, *, cursor: int | None, max_bytes: int, tail_lines: int | None,
                    pattern: LineMatcher | None) -> LogChunk:
        reader = self.reader(task)
        if pattern is not None:
            chunk = reader.grep(pattern, cursor, max_bytes)
        else:
            chunk = reader.read(cursor, max_bytes)
        if tail_lines is not None:
            lines = chunk.text.splitlines(keepends=True)
            if len(lines) > tail_lines:
                chunk.text = "".join(lines[len(lines) - tail_lines:]) if tail_lines else ""
                chunk.truncated = True
        return chunk

    def last_line(self, task: Task) -> str | None:
        """The last line of output: from the record once the task is done (no log is read), else from its log."""
        if task.record.is_done or task.log is None:
            return task.record.last_line
        return self._read_last_line(task)

    def _read_last_line(self, task: Task) -> str | None:
        text = self.reader(task).read(None, 4096).text.rstrip("\n")
        return text.rsplit("\n", 1)[-1][-200:] if text else None

    def dropped_bytes(self, task: Task) -> int:
        return task.log.dropped if task.log is not None else task.record.dropped_bytes

    # ----------------------------------------------------------------- actions
    async def launch(self, *, command: str | None = None, argv: builtins.list[str] | None = None, cwd: Path,
                     description: str | None = None, env: dict[str, str] | None = None,
                     timeout_s: float | None = None, after: builtins.list[str] | None = None,
                     kind: TaskKind = "command", item_id: str | None = None, item_file: str | None = None,
                     stdin_path: Path | None = None, executor: Executor | None = None, job: Job | None = None,
                     on_finish: FollowUp | None = None,
                     prelude: bytes = b"", follow_up_timeout: float | None = None,
                     resources: dict[str, float] | None = None, branch: str | None = None,
                     worktree: str | None = None, answer_at_once: bool = False, record_soon: bool = False,
                     finish_with: FollowUps | None = None) -> Task:
        """Register a task and start it (or queue it behind ``after``); returns once it is running.

        ``answer_at_once`` (a background ``launch_task``, a queue run's command item): return as soon as
        the task is registered, still ``queued`` while its start is under way.

        The first record is journaled before the task id is given out (``_journal_first``), and its file
        written in the background (``GroupCommit.save_soon``) ``FIRST_RECORD_DELAY_S`` later, unless the
        running record replaced it by then, or the final one: a short task writes one record file, none
        of them on the event loop. ``record_soon`` (a queue run's command item, whose claim is in the
        queue's history already and whose task id nobody was given yet): not journaled, its file written
        ``SOON_DELAY_S`` later. A write that fails fails the task.

        The task runs ``command`` or ``argv`` through ``executor`` (the registry's by default), or,
        given a ``job``, runs that job (``command`` is then only what the record shows).

        Raises ``UsageError`` before registering anything when a string bound for the process
        cannot reach it (``check_launch_strings``), ``ResourceLimitError`` at the task cap,
        ``StorageError`` when the record cannot be written, ``ShuttingDown`` once the server stops. Once registered, every failure ends the task instead.
        ``prelude`` opens the task's log (what was
        done to prepare it); ``on_finish`` may take ``follow_up_timeout`` seconds (default
        ``FOLLOW_UP_TIMEOUT_S``; an integration takes as long as it needs); ``finish_with`` instead
        makes it with the other tasks of that owner that end together (``FollowUps``). ``resources``
        go to the executor as they are (``LaunchSpec.resources``).
        """
        task, spec, predecessors = self._new_task(
            command=command, argv=argv, cwd=cwd, description=description, env=env, timeout_s=timeout_s, after=after,
            kind=kind, item_id=item_id, item_file=item_file, stdin_path=stdin_path, on_finish=on_finish,
            prelude=prelude, follow_up_timeout=follow_up_timeout, resources=resources, branch=branch,
            worktree=worktree, held_now=answer_at_once and job is None, record_soon=record_soon,
            finish_with=finish_with)
        if answer_at_once and job is None and not predecessors and executor in (None, self.executor):
            self._go_now(task, spec)
        else:
            await self._register(task, spec, predecessors, executor or self.executor, job,
                                 wait_start=not answer_at_once)
        await self._prune()
        return task

    def launch_now(self, *, command: str | None, argv: builtins.list[str] | None, cwd: Path, description: str,
                   env: dict[str, str], timeout_s: float | None, kind: TaskKind, item_id: str, item_file: str,
                   stdin_path: Path | None, resources: dict[str, float] | None, finish_with: FollowUps) -> Task:
        """``launch(answer_at_once=True, record_soon=True)`` of a queue run's plain item, made without
        awaiting (``FollowUps.follow_up_now`` starts the next items in the lane's turn): the same
        checks and errors, the same start (the lane's, or its own supervision when held)."""
        task, spec, _ = self._new_task(
            command=command, argv=argv, cwd=cwd, description=description, env=env, timeout_s=timeout_s, after=None,
            kind=kind, item_id=item_id, item_file=item_file, stdin_path=stdin_path, on_finish=None, prelude=b"",
            follow_up_timeout=None, resources=resources, branch=None, worktree=None, held_now=True,
            record_soon=True, finish_with=finish_with)
        self._go_now(task, spec)
        if self._prune_due():
            self._tg.start_soon(self._prune)
        return task

    def _new_task(self, *, command: str | None, argv: builtins.list[str] | None, cwd: Path,
                  description: str | None, env: dict[str, str] | None, timeout_s: float | None,
                  after: builtins.list[str] | None, kind: TaskKind, item_id: str | None, item_file: str | None,
                  stdin_path: Path | None, on_finish: FollowUp | None, prelude: bytes,
                  follow_up_timeout: float | None, resources: dict[str, float] | None, branch: str | None,
                  worktree: str | None, held_now: bool, record_soon: bool, finish_with: FollowUps | None,
                  ) -> tuple[Task, LaunchSpec, builtins.list[Task]]:
        """``launch`` up to the start: checked, its record journaled (or ``record_soon``) and counted
        active; ``held_now``: a start the admission check holds says so in the record already."""
        if self._closing:
            raise ShuttingDown("the server is shutting down; launch the task again after it restarts")
        if not self.has_room():
            raise ResourceLimitError(
                f"{self._active} tasks are already queued or running (the limit is {self.settings.max_running}); "
                "wait for some with task_output or stop some with cancel_task"
            )
        record, spec, predecessors = self._new_record(
            command=command, argv=argv, cwd=cwd, description=description, env=env, timeout_s=timeout_s, after=after,
            kind=kind, item_id=item_id, item_file=item_file, stdin_path=stdin_path, group=None, resources=resources)
        record.branch, record.worktree = branch, worktree
        first = None if record_soon else self._journal_first([record])[0]
        self._active += 1
        task = Task(record, on_finish=on_finish, finish_with=finish_with, active=True, prelude=prelude,
                    follow_up_timeout=FOLLOW_UP_TIMEOUT_S if follow_up_timeout is None else follow_up_timeout)
        self._save_soon(task, delay=SOON_DELAY_S if record_soon else FIRST_RECORD_DELAY_S, data=first)
        if held_now and not predecessors and self.settings.admission is not None and (why := self.settings.admission()):
            record.hold(f"start held: {why}")  # the answer says why the start waits (``_admit`` holds it)
        return task, spec, predecessors

    def _go_now(self, task: Task, spec: LaunchSpec) -> None:
        """Start a registered task answered at once with nothing to wait for: through the lane, or on
        its own (``_supervise``) when its start is held or there is no lane."""
        self._tasks[task.record.task_id] = task
        if task.record.reason is None and self._lane is not None:
            self._lane_submit(task, spec)
        else:
            self._tg.start_soon(self._supervise, task, spec, [], self.executor, None)

    def _new_record(self, *, command: str | None, argv: builtins.list[str] | None, cwd: Path, description: str | None,
                    env: dict[str, str] | None, timeout_s: float | None, after: builtins.list[str] | None,
                    kind: TaskKind, item_id: str | None, item_file: str | None, stdin_path: Path | None,
                    group: GroupSlots | None, resources: dict[str, float] | None = None, what: str = "the task",
                    ) -> tuple[TaskRecord, LaunchSpec, builtins.list[Task]]:
        """A new task's record and launch spec, checked (``UsageError`` naming ``what``, ``UnknownTask``);
        nothing registered (an upstream list too long for the environment is written to its file)."""
        predecessors = [self.get(p) for p in (after or [])]
        task_id = self._new_id()
        spec = LaunchSpec(task_id=task_id, cwd=cwd, command=command, argv=argv,
                          env={**(env or {}), TASK_ID_VAR: task_id},  # what finds its processes (processes.py)
                          stdin_path=stdin_path, resources=dict(resources or {}))
        try:  # (a queue item's upstream logs: a fan-in of thousands of items; one small file, on the loop, rarely)
            spill_upstream_logs(self.runs_dir, task_id, spec.env, MAX_ARG_BYTES)
        except OSError as exc:
            raise StorageError(f"cannot start {what}: its upstream log paths could not be written to a file: "
                               f"{os_error_text(exc)}") from exc
        if problem := check_launch_strings(spec):
            raise UsageError(f"cannot start {what}: {problem}")
        shown = command if command is not None else " ".join(argv or [])
        record = TaskRecord(task_id=task_id, kind=kind, command=shown, description=description,
                            cwd=str(cwd), env_keys=sorted(env or {}), timeout_s=timeout_s,
                            after=[p.record.task_id for p in predecessors], item_id=item_id, item_file=item_file,
                            group_id=group.group_id if group is not None else None,
                            server_pid=self._server[0], server_start=self._server[1],
                            log_cap_bytes=self.settings.log_cap_bytes)
        return record, spec, predecessors

    def _journal_first(self, records: builtins.list[TaskRecord]) -> builtins.list[bytes]:
        """Keep new tasks' first records before their ids are given out: in this server's journal of
        first records (``journal.py``: one write on the event loop for all, no file yet; a crash
        leaves them for the next server to recover); ``StorageError`` if they cannot be written
        (none of them is kept then). Returns them serialized: the tasks then ``_save_soon`` them as files."""
        data = [r.model_dump_json().encode() for r in records]
        writes = [(record_path(self.runs_dir, r.task_id), d) for r, d in zip(records, data, strict=True)]
        try:
            try:
                self._firsts.append(writes)
            except FileNotFoundError:  # the runs directory was removed (git clean -fdX): made again
                ensure_runs_dir(self.root, self.runs_dir)
                self._firsts.append(writes)
        except (OSError, UsageError) as exc:
            why = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            raise StorageError(
                f"cannot write the task record in {self.runs_dir}: {why}; "
                "free some disk space (or fix the directory's permissions) and launch again") from exc
        return data

    async def _register(self, task: Task, spec: LaunchSpec, predecessors: builtins.list[Task], executor: Executor,
                        job: Job | None, *, wait_start: bool = True) -> None:
        """Add a task whose record is written and start supervising it; returns once it is running,
        or at once when it must wait (predecessors, a slot of its group, a held start) or when not
        ``wait_start``."""
        self._tasks[task.record.task_id] = task
        if wait_start:
            await self._tg.start(self._supervise, task, spec, predecessors, executor, job)
        else:
            self._tg.start_soon(self._supervise, task, spec, predecessors, executor, job)

    async def launch_group(self, commands: builtins.list[str], *, max_parallel: int, cwd: Path,
                           description: str | None = None, env: dict[str, str] | None = None,
                           timeout_s: float | None = None, after: builtins.list[str] | None = None,
                           ) -> tuple[str, builtins.list[Task]]:
        """Start ``commands`` as one group (a fan-out), at most ``max_parallel`` of them at once.

        Returns the group id and its members, in the order given, once their records are written;
        one coroutine (``_dispatch_group``) then starts them in order, at most ``max_parallel`` at a
        time. All or nothing: every command is checked, and every record written, before any starts."""
        if self._closing:
            raise ShuttingDown("the server is shutting down; launch the tasks again after it restarts")
        slots = min(len(commands), max_parallel)
        if self._active + slots > self.settings.max_running:
            raise ResourceLimitError(
                f"{self._active} tasks are already queued or running and this group would run {slots} more "
                f"(the limit is {self.settings.max_running}); lower max_parallel, or wait for some tasks")
        group = GroupSlots(new_group_id(), max_parallel)
        made = [self._new_record(command=command, argv=None, cwd=cwd, description=description, env=env,
                                 timeout_s=timeout_s, after=after, kind="command", item_id=None, item_file=None,
                                 stdin_path=None, group=group, what=f"commands[{i}]")
                for i, command in enumerate(commands)]  # every command checked before anything is written
        firsts = self._journal_first([record for record, _, _ in made])  # all first records in one write
        members: builtins.list[tuple[Task, LaunchSpec]] = []
        for (record, spec, _), first in zip(made, firsts, strict=True):
            task = Task(record, group=group, dispatched=False)
            self._save_soon(task, delay=FIRST_RECORD_DELAY_S, data=first)
            self._tasks[record.task_id] = task
            self._groups.setdefault(group.group_id, []).append(record.task_id)
            members.append((task, spec))
        predecessors = made[0][2] if made else []
        self._tg.start_soon(self._dispatch_group, group, members, predecessors)
        await self._prune()
        return group.group_id, [task for task, _ in members]

    async def _dispatch_group(self, group: GroupSlots, members: builtins.list[tuple[Task, LaunchSpec]],
                              predecessors: builtins.list[Task]) -> None:
        """Start a group's members in order, each once one of the group's slots is free and the task
        cap has room; members cancelled meanwhile are passed over (``cancel`` ended them)."""
        try:
            with anyio.CancelScope() as waiting:  # the members' shared predecessors come first
                self._group_wakers[group.group_id] = waiting
                for p in predecessors:
                    await p.done.wait()
            if self._closing:
                return  # shutting down while the predecessors ran: the members end below, interrupted
            if failed := [p for p in predecessors if p.record.status != TaskStatus.COMPLETED]:
                first = failed[0].record
                skipped = Skipped(because=f"predecessor {first.task_id} ended {first.status.value}, so this task did not run")
                for task, _ in members:
                    task.dispatched = True
                    await self._finish(task, skipped)
                return
            group.waiting.extend(members)
            group.predecessors, group.open = predecessors, True
            while True:  # the members' ends start the next ones (``_free``); here: a start the cap held
                self._dispatch_now(group)
                if not group.waiting or self._closing:
                    break  # (once the server stops nothing starts: the members left end below, interrupted)
                if group.running >= group.max_parallel:
                    await group.freed.wait()
                else:
                    with anyio.move_on_after(self.settings.admission_retry_s):
                        await group.freed.wait()
        finally:
            group.open = False
            self._group_wakers.pop(group.group_id, None)
            with anyio.CancelScope(shield=True):  # the registry closing: members never started end here
                for task, _ in members:
                    if not task.dispatched and not task.finishing:
                        await self._end_undispatched(task)

    def _dispatch_now(self, group: GroupSlots) -> None:
        """Start the group's next members in order while one of its slots is free and the task cap has
        room; a member cancelled meanwhile is passed over (``cancel`` ended it), one the cap holds says
        so in its record (``_dispatch_group`` tries it again)."""
        while group.waiting and not self._closing:
            task, spec = group.waiting[0]
            if task.finishing:
                group.waiting.popleft()
                continue
            if group.running >= group.max_parallel:
                return
            if not self.has_room():
                task.record.hold(f"start held: {self._active} tasks are queued or running (the limit is "
                                 f"{self.settings.max_running})")
                return
            group.waiting.popleft()
            if task.record.reason is not None:
                task.record.hold(None)
            group.running += 1
            task.holds_slot = task.active = task.dispatched = True
            self._active += 1
            if group.predecessors or self._lane is None:
                self._tg.start_soon(self._supervise, task, spec, group.predecessors, self.executor, None)
            else:
                self._lane_submit(task, spec)

    async def _end_undispatched(self, task: Task) -> None:
        """End a group member that never started (cancelled, or the server shutting down)."""
        outcome: Outcome
        if self._closing:
            outcome = Interrupted(reason="the server shut down before this task could start")
        else:
            outcome = Cancelled(reason="cancelled while waiting for a slot in its group")
        await self._finish(task, outcome)

    async def wait(self, tasks: builtins.list[Task], *, mode: str, timeout: float) -> bool:
        """Block until all (or any) of ``tasks`` are done; False if ``timeout`` passed first."""
        with anyio.move_on_after(timeout):
            if mode == "all":
                for task in tasks:
                    await task.done.wait()
            else:
                await wait_any([t.done for t in tasks])
            return True
        return False

    async def cancel(self, task: Task, reason: str | None = None) -> bool:
        """Stop a task and everything it started; False if it had already finished. ``reason``: who
        stopped it, for its record (default "cancelled by cancel_task"; the first cancel's counts)."""
        if task.record.is_done:
            return False
        if reason is not None and not task.cancel_requested:
            task.cancel_reason = reason
        task.cancel_requested = True
        if not task.dispatched:  # a group member waiting for its turn: no coroutine of its own
            await self._end_undispatched(task)
        elif not await self._stop_body(task, self.settings.kill_grace_s):
            self._wake_queued(task)
        await task.done.wait()
        return True

    def pin(self, tasks: Iterable[Task]) -> None:
        """Keep these tasks' records and logs past ``max_records`` until ``unpin``: a queue run's
        items whose dependents will read their output (``AGENT_UPSTREAM_LOGS``) while the run goes on."""
        for task in tasks:
            task.pins += 1

    def unpin(self, tasks: Iterable[Task]) -> None:
        """Undo ``pin`` (the next prune may take them)."""
        for task in tasks:
            task.pins -= 1

    async def records_saved(self) -> None:
        """Return once no final record is being written (they are saved in worker threads)."""
        while not self._saved.is_set():
            await self._saved.wait()

    async def records_filed(self) -> None:
        """``records_saved``, and every saved record's file written now instead of a little later
        (they are durable in the record journal first: ``group_commit.py``)."""
        await self.records_saved()
        await self._commits.file_all()

    async def shutdown(self, grace: float = 0.5) -> None:
        """Stop every running task (TERM, ``grace``, KILL) and record them as interrupted."""
        self._closing = True
        live = [t for t in self._tasks.values() if not t.record.is_done]
        async with anyio.create_task_group() as tg:
            for task in live:
                task.cancel_requested = True
                if not task.dispatched:
                    tg.start_soon(self._end_undispatched, task)
                elif task.handle is not None or task.job is not None:
                    tg.start_soon(self._stop_body, task, grace)
                else:
                    self._wake_queued(task)
            for waker in list(self._group_wakers.values()):  # groups still waiting for their predecessors
                waker.cancel()
        with anyio.move_on_after(1.0):
            for task in live:
                await task.done.wait()
            await self.records_saved()  # the process may exit right after: final records first

    # ----------------------------------------------------------------- internals
    def _new_id(self) -> str:
        while (task_id := self._new_task_id()) in self._tasks:
            pass
        return task_id

    def _excess(self) -> builtins.list[Task]:
        """The oldest finished tasks beyond ``max_records`` (insertion order is age), pinned ones left."""
        excess = len(self._tasks) - self.settings.max_records
        if excess <= 0:
            return []
        # (the oldest are the first found: a launch at the cap looks at a few tasks, not at all of them)
        return list(itertools.islice((t for t in self._tasks.values() if t.record.is_done and not t.pins), excess))

    def _forget(self, tasks: builtins.list[Task]) -> builtins.list[Path]:
        """Drop ``tasks`` from the registry; the files to delete (exact names, never a pattern)."""
        paths = []
        for task in tasks:
            del self._tasks[task.record.task_id]
            if (number := _item_number(task.record)) is not None and self._items_done.get(number) is task:
                del self._items_done[number]
            if (group_id := task.record.group_id) is not None and (members := self._groups.get(group_id)):
                members.remove(task.record.task_id)
                if not members:
                    del self._groups[group_id]
            paths.extend(task_files(self.runs_dir, task.record.task_id, task.record.tail_segments))
            self._commits.forget(record_path(self.runs_dir, task.record.task_id))
        return paths

    @property
    def _prune_batch(self) -> int:
        return max(1, min(32, self.settings.max_records // 100))

    def _prune_due(self) -> bool:
        """Whether ``_prune`` has a batch of tasks to forget."""
        return len(self._tasks) - self.settings.max_records >= self._prune_batch and len(self._tasks) >= self._prune_at

    async def _prune(self) -> None:
        """Forget the oldest finished tasks beyond ``max_records`` and delete their files (off the loop),
        in batches of up to 1 % of the cap (at most 32): at the cap every launch would otherwise pay
        a worker-thread hop for one task's files."""
        if not self._prune_due():
            return
        batch = self._prune_batch
        paths = self._forget(self._excess())
        if len(self._tasks) - self.settings.max_records >= batch:  # pinned or live tasks held some back:
            self._prune_at = len(self._tasks) + batch  # look again a batch later, not at every launch
        if paths:
            await anyio.to_thread.run_sync(_unlink_all, paths)

    def _load_history(self) -> None:
        """Bring back earlier tasks; those that were live when their server died are interrupted,
        and whatever is left of their processes is killed: only processes that carry the task's
        ``AGENT_TASK_ID`` (and started no earlier than it), never a pid taken from a record.
        Live tasks of another server that is still running on this workspace are left alone (and
        not listed)."""
        stale: builtins.list[TaskRecord] = []
        recover(self.runs_dir, journal_replaces)  # final records a crash kept only in a journal
        for record in sorted(load_records(self.runs_dir), key=lambda r: r.created_at):
            if not record.is_done:
                if self._owned_by_live_server(record):
                    continue
                stale.append(record)
            self._tasks[record.task_id] = task = Task(record, done=self._ended)
            self._index_item(task)
            if record.group_id is not None:
                self._groups.setdefault(record.group_id, []).append(record.task_id)
        if stale:
            left = kill_tasks_now({r.task_id: r.process.start_time if r.process else None for r in stale})
            segments = tail_segments_on_disk(self.runs_dir, {r.task_id for r in stale})
            for record in stale:
                self._interrupted(record, left.get(record.task_id, []), segments[record.task_id])
            if ran := [r.task_id for r in stale if r.started_at is not None and not left.get(r.task_id)]:
                log.warning("stopped what was left of %s from an earlier server: %s",
                            "1 task" if len(ran) == 1 else f"{len(ran):,} tasks", first_few(ran, 5))
            self._save_interrupted(stale)
            for record in stale:
                record.compact()
        _unlink_all(self._forget(self._excess()))

    def _interrupted(self, record: TaskRecord, survivors: builtins.list[int], segments: builtins.list[int]) -> None:
        record.output_bytes, record.tail_segments, record.dropped_bytes = recover_log_extent(
            self.runs_dir, record.task_id, self._head_cap(record), segments)
        record.end(Interrupted(reason="the server stopped while this task was live"), time.time())
        if survivors:
            record.note(describe_survivors(survivors))
        record.last_line = self._read_last_line(Task(record))

    def _save_interrupted(self, records: builtins.list[TaskRecord]) -> None:
        """Save the interrupted records durably in one batch through the record journal (one
        ``fdatasync`` for them all): a crash can leave thousands live (a fan-out's members waiting
        for their turn), and an fsync of each took 4.8 s of a restart's 6.3 for 9,000."""
        errors = write_now([(record_path(self.runs_dir, r.task_id), r.model_dump_json().encode()) for r in records],
                           self._commits.journal)
        for record, error in zip(records, errors, strict=True):
            if error is not None:
                log.error("could not save the record of task %s: %s", record.task_id, os_error_text(error))

    def _owned_by_live_server(self, record: TaskRecord) -> bool:
        if record.server_pid is None or record.server_start is None:
            return False
        return (record.server_pid, record.server_start) != self._server and \
            same_process(record.server_pid, record.server_start)

    async def _stop_body(self, task: Task, grace: float) -> bool:
        """Stop what the task runs (its process or its job); False when nothing runs yet."""
        if task.handle is not None:
            await task.handle.terminate(grace)
        elif task.job is not None and not task.record.is_done:
            await task.job.stop(grace, self._stop_reason(task))
        else:
            return False
        return True

    def _stop_reason(self, task: Task) -> str:
        """Why a task is being stopped, for its job (``Job.stop``)."""
        if task.storage_error:
            return f"stopped: {task.storage_error}"
        if self._closing:
            return "stopped: the server is shutting down"
        return task.cancel_reason

    def _wake_queued(self, task: Task) -> None:
        if task.waker is not None:
            task.waker.cancel()

    async def _supervise(self, task: Task, spec: LaunchSpec, predecessors: builtins.list[Task], executor: Executor,
                         job: Job | None, *, task_status: StartStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run one task from start to end. ``launch`` returns once this calls ``answer()``: at once
        when the task must wait (predecessors, a held start), else when its process is running
        (or once it has failed). Nothing raised here leaves this coroutine: it ends the task."""
        answered = False

        def answer() -> None:
            nonlocal answered
            if not answered:
                answered = True
                task_status.started()

        async def start_then_watch() -> None:
            if await self._start(task, spec, predecessors, executor, job, answer):
                answer()
                await self._watch(task)

        try:
            await self._failing_the_task(task, start_then_watch)
        finally:
            answer()

    async def _failing_the_task(self, task: Task, body: Callable[[], Awaitable[None]]) -> None:
        """Run ``body`` (a task's supervision): whatever it raises ends the task, failed, and goes no
        further; a cancellation (the launch was abandoned, or the registry is closing) ends it too."""
        try:
            try:
                await body()
            except Exception as exc:
                await self._fail(task, exc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._fail(task, None)
            raise

    async def _start(self, task: Task, spec: LaunchSpec, predecessors: builtins.list[Task], executor: Executor,
                     job: Job | None,
                     answer: Callable[[], None]) -> bool:
        """Wait for predecessors and admission, start the process and record it running.

        True when a process or job now runs (to be watched); False when the task already ended."""
        rec = task.record
        if predecessors:
            answer()
            with anyio.CancelScope() as task.waker:
                for p in predecessors:
                    await p.done.wait()
            if task.cancel_requested:
                await self._finish(task, Cancelled(reason="cancelled while waiting for its predecessors"))
                return False
            failed = [p for p in predecessors if p.record.status != TaskStatus.COMPLETED]
            if failed:
                first = failed[0].record
                await self._finish(task, Skipped(
                    because=f"predecessor {first.task_id} ended {first.status.value}, so this task did not run"))
                return False
            if UPSTREAM_LOGS_VAR not in spec.env:
                def hand_over() -> None:
                    paths = [str(upstream_log_path(self.runs_dir, p.record)) for p in predecessors]
                    spec.env[UPSTREAM_LOGS_VAR] = os.pathsep.join(paths)
                    spill_upstream_logs(self.runs_dir, rec.task_id, spec.env, MAX_ARG_BYTES)  # (256 paths of 500 characters)

                try:
                    await anyio.to_thread.run_sync(hand_over)
                except OSError as exc:
                    raise _TaskFailure(f"could not hand over its predecessors' output: {os_error_text(exc)}") from exc
        try:  # on the event loop: one small file, created as the task starts
            task.log = LogWriter(self.runs_dir, rec.task_id, self.settings.log_cap_bytes)
            if task.prelude:
                task.log.write(task.prelude)
                task.prelude = b""
        except OSError as exc:
            raise _TaskFailure(self._log_failure(rec.task_id, exc)) from exc
        # a job (a queue run) is no process: memory and load hold each of its items, not the job itself
        if job is None and not await self._admit(task, answer):
            await self._finish(task, Cancelled(reason="cancelled while its start was held"))
            return False
        if task.cancel_requested:  # cancel_task came while this was preparing: nothing to start
            await self._finish(task, Cancelled(reason="cancelled before it started"))
            return False
        if task.storage_error:  # its first record could not be written (``record_soon``): nothing to start
            raise _TaskFailure(task.storage_error)
        spawn_time = time.time()
        try:
            if job is not None:
                await job.start(rec.task_id, task.log)
                task.job = job
                rec.start(spawn_time, None)
            else:
                task.handle = handle = await executor.start(spec, task.log)
                pid = handle.pid
                rec.start(spawn_time, ProcessRef(pid=pid, start_time=handle.start_time) if pid is not None else None)
        except Exception as exc:  # SpawnError, a job that cannot start, or a bug: this task fails
            await self._fail(task, exc)
            return False
        if task.cancel_requested:  # cancel_task came during the start and found nothing running yet
            self._tg.start_soon(self._stop_body, task, self.settings.kill_grace_s)
        self._save_soon(task)
        return True

    def _log_failure(self, task_id: str, exc: OSError) -> str:
        return f"could not open the task's log {head_log_path(self.runs_dir, task_id)}: {os_error_text(exc)}"

    def _save_soon(self, task: Task, *, delay: float = SOON_DELAY_S, data: bytes | None = None) -> None:
        """Write the task's record (``data``: as serialized already; else as it is when written)
        ``delay`` seconds from now, batched with other tasks' (a later record of the task queued before
        the batch takes this one replaces it: a task that ends at once never has its running record
        written, nor serialized); if it cannot be written, the task is stopped and fails saying why."""
        rec = task.record
        self._commits.save_soon(record_path(self.runs_dir, rec.task_id),
                                (lambda: rec.model_dump_json().encode()) if data is None else data,
                                lambda exc: self._record_failed(task, exc), delay=delay)

    def _record_failed(self, task: Task, exc: OSError) -> None:
        """A running task's record could not be written: stop the task, which then fails saying why.

        Not when the runs directory is gone (``git clean -fdX`` removes it): the task goes on, and
        its final record is written once the directory is back (a queue run recreates it)."""
        if task.finishing:
            return
        if isinstance(exc, FileNotFoundError):
            log.warning("task %s: its running record could not be written (%s); it goes on",
                        task.record.task_id, os_error_text(exc))
            return
        task.storage_error = (f"could not write the task record in {self.runs_dir}: {os_error_text(exc)}; "
                              "free some disk space (or fix the directory's permissions) and launch again")
        self._tg.start_soon(self._stop_body, task, self.settings.kill_grace_s)

    # -- the lane (``lane.py``): a background launch or a fan-out member with nothing to wait for
    def _lane_submit(self, task: Task, spec: LaunchSpec) -> None:
        """Start a task through the lane; on its own instead when the admission check holds it (its
        own supervision then holds it until the check lets it go)."""
        assert self._lane is not None
        rec = task.record
        check = self.settings.admission
        if check is not None and check():
            self._tg.start_soon(self._supervise, task, spec, [], self.executor, None)
            return
        prelude, task.prelude = task.prelude, b""

        def open_log() -> LogWriter:  # in the lane's worker thread
            log_writer = None
            try:
                log_writer = LogWriter(self.runs_dir, rec.task_id, self.settings.log_cap_bytes)
                if prelude:
                    log_writer.write(prelude)
                return log_writer
            except OSError as exc:
                if log_writer is not None:
                    log_writer.close()
                raise _TaskFailure(self._log_failure(rec.task_id, exc)) from exc

        # the loop already touches the workspace's file system (claims), and /bin/sh is the system's: a start
        # that only enters the root and execs the shell can hang nothing new (a cwd elsewhere could: a hung mount;
        # a prelude would make the log file at the start, where a new file can cost half a millisecond)
        inline = spec.command is not None and spec.stdin_path is None and spec.cwd == self.root and not prelude
        self._lane.submit(task, spec, open_log, rec.timeout_s, inline=inline)

    def lane_go(self, task: Task) -> bool:
        if self._closing or task.cancel_requested or task.storage_error:
            self._tg.start_soon(self._end_unstarted, task)
            return False
        return True

    async def _end_unstarted(self, task: Task) -> None:
        """End a lane task that is not to start after all, as ``_start`` would have."""
        if self._closing:
            await self._fail(task, None)
        elif task.cancel_requested:
            await self._finish(task, Cancelled(reason="cancelled before it started"))
        else:
            await self._fail(task, _TaskFailure(task.storage_error or "its start was refused"))

    def lane_started(self, task: Task, result: TaskHandle | Exception, log_writer: LogWriter | None,
                     at: float) -> None:
        task.log = log_writer
        if isinstance(result, Exception):
            self._tg.start_soon(self._fail, task, result)
            return
        task.handle = result
        pid = result.pid
        task.record.start(at, ProcessRef(pid=pid, start_time=result.start_time) if pid is not None else None)
        if task.cancel_requested or self._closing:  # cancel_task came while it was starting
            self._tg.start_soon(self._stop_body, task, self.settings.kill_grace_s)
        self._save_soon(task)

    def lane_ended(self, ends: builtins.list[tuple[Task, ExitInfo]]) -> None:
        plain: builtins.list[tuple[Task, Outcome, tuple[str, ...]]] = []
        shared: dict[int, builtins.list[tuple[Task, Outcome, tuple[str, ...]]]] = {}  # by FollowUps owner
        for task, info in ends:
            if task.finishing:
                continue
            task.finishing = True
            end: tuple[Task, Outcome, tuple[str, ...]] = (task, self._outcome(task, info, False), ())
            if task.finish_with is not None:  # one call for the owner's tasks (``FollowUps``)
                shared.setdefault(id(task.finish_with), []).append(end)
            elif task.on_finish is None:
                plain.append(end)
            else:  # its follow-up may take long: it must not hold the others' waiters
                self._tg.start_soon(self._finish_now, [end])
        for batch in shared.values():
            if not self._finish_at_once(batch):
                self._tg.start_soon(self._finish_now, batch)
        if plain:
            self._free(plain)  # a fan-out's next members start in this turn (``_dispatch_now``)
            self._tg.start_soon(self._finish_now, plain)

    def lane_handover(self, task: Task, deadline: float | None) -> None:
        self._tg.start_soon(self._watch_rest, task, deadline)

    async def _watch_rest(self, task: Task, deadline: float | None) -> None:
        """Supervise a task the lane gave up, from where it was (as ``_supervise`` after the start)."""
        await self._failing_the_task(task, lambda: self._watch(task, deadline))

    async def _watch(self, task: Task, deadline: float | None = None) -> None:
        """Wait for a running task to end (enforcing its timeout, due at ``deadline`` when the lane
        followed it so far) and record how it ended."""
        rec = task.record
        assert task.log is not None
        handle = task.handle
        timed_out = False
        limit = rec.timeout_s if rec.timeout_s is not None else math.inf
        if deadline is not None:
            limit = deadline - anyio.current_time()
        try:
            with anyio.CancelScope(shield=True):  # only this coroutine decides how the task ends
                if handle is None:
                    assert task.job is not None
                    info, timed_out = await self._run_job(task.job, limit)
                elif limit == math.inf:
                    info = await handle.wait()
                else:
                    with anyio.move_on_after(limit) as scope:
                        info = await handle.wait()
                    if scope.cancelled_caught:
                        timed_out = True
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(handle.terminate, self.settings.kill_grace_s)
                            info = await handle.wait()
        except (ExecutorError, AgentParallelError) as exc:  # the executor (or a job that cannot go on) says why
            if isinstance(exc, InternalError):
                log.error("task %s: %s", rec.task_id, exc, exc_info=exc)
            raise _TaskFailure(str(exc)) from exc
        except Exception as exc:  # a bug in an executor or a job must fail this task, not the server
            what = "executor" if handle is not None else "job"
            log.exception("task %s: its %s failed", rec.task_id, what)
            raise _TaskFailure(str(InternalError(f"the task's {what} failed: {exc!r}"))) from exc
        survivors = handle.survivors if handle is not None else []
        await self._finish(task, self._outcome(task, info, timed_out),
                           notes=(describe_survivors(survivors),) if survivors else ())

    def _outcome(self, task: Task, info: ExitInfo, timed_out: bool) -> Outcome:
        """How a task whose body ended with ``info`` ended (``timed_out``: its timeout stopped it)."""
        rec = task.record
        assert task.log is not None
        exits = {"exit_code": info.exit_code, "signal": info.signal}
        outcome: Outcome
        if self._closing:
            outcome = Interrupted(reason="the server shut down while this task was running", **exits)
        elif task.cancel_requested:
            outcome = Cancelled(reason=task.cancel_reason, **exits)
        elif timed_out or info.timed_out:
            outcome = TimedOut(reason=f"killed after its timeout of {rec.timeout_s:g} s" if timed_out
                               else "its last attempt was killed after its timeout", **exits)
        elif task.storage_error:
            outcome = Failed(reason=task.storage_error, **exits)
        elif task.log.error:
            outcome = Failed(reason=task.log.error, **exits)
        elif info.exit_code == 0:
            outcome = Succeeded()
        else:
            outcome = Failed(reason=f"exit code {info.exit_code}" if info.exit_code is not None
                             else f"killed by {info.signal}", **exits)
        return outcome

    async def _run_job(self, job: Job, limit: float) -> tuple[ExitInfo, bool]:
        """Run a job to its end; past ``limit`` seconds it is stopped (and True says it timed out)."""
        timed_out = False

        async def stop_at_limit() -> None:
            nonlocal timed_out
            await anyio.sleep(limit)
            timed_out = True
            await job.stop(self.settings.kill_grace_s, f"stopped after its timeout of {limit:g} s")

        try:
            async with anyio.create_task_group() as tg:
                if limit != math.inf:
                    tg.start_soon(stop_at_limit)
                info = await job.run()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the job's own error, as it raised it (not in the timer's group)
            if len(group.exceptions) == 1:
                raise group.exceptions[0]  # noqa: B904 (the same object: its traceback and cause are kept)
            raise
        return info, timed_out

    async def _admit(self, task: Task, answer: Callable[[], None]) -> bool:
        """Hold the start while the admission check says so; False if cancelled meanwhile.

        A held task is answered at once (status ``queued``, the reason says why). Memory and load
        have no event to wait on, so this re-checks every ``admission_retry_s``.
        """
        check = self.settings.admission
        if check is None or not (why := check()):
            return True
        task.record.hold(f"start held: {why}")
        answer()
        with anyio.CancelScope() as task.waker:
            while why and not task.cancel_requested:
                task.record.hold(f"start held: {why}")  # shown by task_output while queued
                await anyio.sleep(self.settings.admission_retry_s)
                why = check()
        task.record.hold(None)
        return not task.cancel_requested

    async def _fail(self, task: Task, exc: BaseException | None) -> None:
        """End a task whose supervision failed (``exc``; None: it was cancelled): stop its
        processes, say why in its log and its reason. Never raises."""
        if task.finishing:
            return
        outcome: Outcome
        if exc is None:
            reason = "the server shut down while this task was starting" if self._closing else \
                "the launch was abandoned while the task was starting"
            outcome = Interrupted(reason=reason) if self._closing else Cancelled(reason=reason)
        else:
            reason = _failure_text(exc)
            outcome = Failed(reason=reason) if isinstance(task.record.state, Running) else FailedToStart(reason=reason)
            if not isinstance(exc, (_TaskFailure, ExecutorError, AgentParallelError, OSError)):
                log.error("task %s: its supervision failed", task.record.task_id, exc_info=exc)
        with anyio.CancelScope(shield=True):
            handle = task.handle
            if handle is not None and exc is not None:
                with anyio.move_on_after(STOP_BOUND_S):
                    try:
                        await handle.terminate(self.settings.kill_grace_s)
                        await handle.wait()  # drains and closes what the handle holds
                    except Exception:
                        log.exception("task %s: could not stop it after its supervision failed", task.record.task_id)
            elif handle is not None:  # cancelled: stop it, but never wait long
                with anyio.move_on_after(STOP_BOUND_S):
                    try:
                        await handle.terminate(0.5)
                        await handle.wait()
                    except Exception:
                        log.exception("task %s: could not stop it", task.record.task_id)
            elif task.job is not None:  # a job that failed or was cancelled: it starts nothing more
                with anyio.move_on_after(STOP_BOUND_S):
                    try:
                        await task.job.stop(0.5 if exc is None else self.settings.kill_grace_s, f"stopped: {reason}")
                    except Exception:
                        log.exception("task %s: could not stop its job", task.record.task_id)
            if task.log is not None and exc is not None:
                try:
                    task.log.write(f"agent-parallel: {reason}\n".encode())
                except OSError:
                    pass  # the log itself is what fails: the reason says it
            await self._finish(task, outcome)

    async def _finish(self, task: Task, outcome: Outcome, *, notes: tuple[str, ...] = ()) -> None:
        """Record how the task ended (``outcome``, and ``notes`` on what else happened), run its
        follow-up, then wake its waiters. Runs once, whole."""
        if task.finishing:
            return
        task.finishing = True
        await self._finish_now([(task, outcome, notes)])

    async def _finish_now(self, ends: builtins.list[tuple[Task, Outcome, tuple[str, ...]]]) -> None:
        """``_finish`` for tasks marked ``finishing``: their last lines read in one worker thread,
        their final records written in one batch. The follow-ups run one after the other, so the
        lane gives each task that has one a call of its own (those of one ``FollowUps`` owner share
        one call)."""
        with anyio.CancelScope(shield=True):
            self._free(ends)
            if readable := [task for task, _, _ in ends if task.log is not None and task.log.total]:
                lines = await anyio.to_thread.run_sync(lambda: [self._last_line_or_none(t) for t in readable])
                for task, line in zip(readable, lines, strict=True):
                    task.record.last_line = line
            self._mark_ended(ends)
            await self._follow_ups_then_close(ends)

    def _free(self, ends: builtins.list[tuple[Task, Outcome, tuple[str, ...]]]) -> None:
        """Give back what the ending tasks held: their place in the active tally, their group's slot,
        which the group's next member takes at once (``_dispatch_now``). Once per task."""
        for task, _, _ in ends:
            if task.active:
                task.active = False
                self._active -= 1
            if task.holds_slot and task.group is not None:
                group = task.group
                task.holds_slot = False
                group.running -= 1
                freed, group.freed = group.freed, anyio.Event()
                freed.set()
                if group.open:
                    self._dispatch_now(group)

    def _mark_ended(self, ends: builtins.list[tuple[Task, Outcome, tuple[str, ...]]]) -> None:
        """Set each record's final status (in memory) and close its log."""
        for task, outcome, notes in ends:
            rec = task.record
            rec.end(outcome, time.time())
            self._index_item(task)
            for note in notes:
                rec.note(note)
            if task.log is not None:
                try:
                    task.log.close()
                except OSError:
                    pass
                rec.output_bytes, rec.dropped_bytes = task.log.total, task.log.dropped
                rec.tail_segments = list(task.log.segments)

    async def _follow_ups_then_close(self, ends: builtins.list[tuple[Task, Outcome, tuple[str, ...]]]) -> None:
        with anyio.CancelScope(shield=True):
            owners: dict[int, tuple[FollowUps, builtins.list[Task]]] = {}
            for task, _, _ in ends:
                if task.on_finish is not None:
                    await self._follow_up(task)
                elif task.finish_with is not None:
                    owners.setdefault(id(task.finish_with), (task.finish_with, []))[1].append(task)
            for owner, tasks in owners.values():
                await self._follow_up_many(owner.follow_up_many, tasks, FOLLOW_UP_TIMEOUT_S)
            await self._close(ends)

    async def _close(self, ends: builtins.list[tuple[Task, Outcome, tuple[str, ...]]]) -> None:
        """The last of ``_finish``: a finished task keeps only its record, written durably before its
        waiters wake."""
        with anyio.CancelScope(shield=True):
            for task, _, _ in ends:
                task.on_finish = task.finish_with = task.waker = task.log = None  # a finished task keeps only its record
                task.handle = None  # a process handle is spent; a job stays readable (a run's report)
            if self._saving == 0:
                self._saved = anyio.Event()
            self._saving += len(ends)
            await self._save_final([task.record for task, _, _ in ends])  # before waiters wake: on disk
            for task, _, _ in ends:
                task.done.set()
                task.done = self._ended  # (its waiters hold the event they wait on)
                task.record.compact()  # kept in memory until pruned: the smaller the better

    def _finish_at_once(self, ends: builtins.list[tuple[Task, Outcome, tuple[str, ...]]]) -> bool:
        """``_finish_now`` of one ``FollowUps`` owner's tasks, its follow-up made at once
        (``follow_up_now``) in the lane's turn: a run frees their slots and starts its next items
        there instead of some turns of the event loop later. False (nothing done) when one of them
        printed something (its last line is read in a worker thread). A follow-up that fails is added
        to each task's reason, never raised (the lane would hand every task it follows over)."""
        if any(task.log is not None and task.log.total for task, _, _ in ends):
            return False
        tasks = [task for task, _, _ in ends]
        owner = tasks[0].finish_with
        assert owner is not None
        self._free(ends)
        self._mark_ended(ends)
        try:
            answers = owner.follow_up_now(tasks)
            problems = None if answers is None else _answers_for(tasks, answers)
        except Exception as exc:
            problems = _follow_up_failed(tasks, exc)
        if problems is None:
            self._tg.start_soon(self._follow_ups_then_close, ends)
            return True
        _note_each(tasks, problems)
        self._tg.start_soon(self._close, ends)
        return True

    def _last_line_or_none(self, task: Task) -> str | None:
        try:
            return self._read_last_line(task)
        except Exception:  # the log is unreadable: no last line
            return None

    async def _follow_up(self, task: Task) -> None:
        """Await the task's ``on_finish`` (at most its ``follow_up_timeout``); a failure is added to its reason."""
        on_finish, task.on_finish = task.on_finish, None
        assert on_finish is not None

        async def one(tasks: builtins.list[Task]) -> builtins.list[str | None]:
            return [await on_finish(tasks[0])]

        await self._follow_up_many(one, [task], task.follow_up_timeout)

    async def _follow_up_many(self, follow_up: Callable[[builtins.list[Task]], Awaitable[builtins.list[str | None]]],
                              tasks: builtins.list[Task], limit: float) -> None:
        """Await ``follow_up`` of ``tasks`` (one call: a ``FollowUps`` owner's, or a task's own ``on_finish``),
        at most ``limit`` seconds; what it answers for each task, or why it failed, is added to that
        task's reason. Never raises: a follow-up failing must never leave waiters hanging."""
        problems: builtins.list[str | None] = [None] * len(tasks)
        with anyio.move_on_after(limit) as scope:
            try:
                problems = _answers_for(tasks, await follow_up(tasks))
            except Exception as exc:
                problems = _follow_up_failed(tasks, exc)
        if scope.cancelled_caught:
            log.error("follow-up of task %s did not finish within %g s", _ids_of(tasks), limit)
            problems = [f"its follow-up did not finish within {limit:g} s"] * len(tasks)
        _note_each(tasks, problems)

    async def _save_final(self, records: builtins.list[TaskRecord]) -> None:
        """Save final records durably, even while shutting down. Records of tasks ending together
        share one worker thread and one ``fdatasync`` of the journal (``GroupCommit``).

        ``_finish_now`` counted them in ``_saving`` already, so ``shutdown`` can wait for them."""
        with anyio.CancelScope(shield=True):
            try:
                errors: builtins.list[BaseException | None] = list(await self._commits.save_all(
                    [(record_path(self.runs_dir, rec.task_id), rec.model_dump_json().encode()) for rec in records]))
            except Exception as exc:
                errors = [exc] * len(records)
            finally:
                self._saving -= len(records)
                if self._saving == 0:
                    self._saved.set()
            for rec, error in zip(records, errors, strict=True):
                if error is not None:
                    log.error("could not save the record of task %s: %s", rec.task_id, error)


def _answers_for(tasks: list[Task], answers: list[str | None]) -> list[str | None]:
    """A follow-up's answers, one per task (``InternalError`` otherwise: a bug in the follow-up)."""
    if len(answers) != len(tasks):
        raise InternalError(f"{len(answers)} answers for {len(tasks)} tasks")
    return list(answers)


def _follow_up_failed(tasks: list[Task], exc: Exception) -> list[str | None]:
    """What each task's reason says of a follow-up that raised ``exc`` (logged with its traceback)."""
    log.exception("follow-up of task %s failed", _ids_of(tasks))
    return [f"its follow-up failed: {exception_reason(exc)}"] * len(tasks)


def _note_each(tasks: list[Task], problems: list[str | None]) -> None:
    for task, problem in zip(tasks, problems, strict=True):
        if problem:
            task.record.note(problem)


def _ids_of(tasks: list[Task]) -> str:
    return first_few([t.record.task_id for t in tasks], 5)


def _item_number(record: TaskRecord) -> int | None:
    """The number of the queue item a task carried out (``007`` is 7), or None for any other task."""
    item_id = record.item_id
    return int(item_id) if record.kind == "item" and item_id is not None and item_id.isdigit() else None


def _failure_text(exc: BaseException) -> str:
    """The reason a task gets when ``exc`` ended its supervision."""
    if isinstance(exc, (_TaskFailure, ExecutorError, AgentParallelError)):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"an operating-system error stopped the task: {os_error_text(exc)}{where}"
    return str(InternalError(f"supervising the task failed: {exc!r}"))


def _unlink_all(paths: builtins.list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)


@asynccontextmanager
async def open_registry(root: Path, runs_dir: Path, settings: RegistrySettings,
                        executor: Executor | None = None) -> AsyncIterator[TaskRegistry]:
    """A registry with its task group and executor; on exit every task is stopped (TERM, grace, KILL)."""
    from .executor import LocalExecutor

    runner = executor or LocalExecutor(guard=True)
    try:
        async with anyio.create_task_group() as tg:
            registry = TaskRegistry(root, runs_dir, runner, tg, settings)
            try:
                yield registry
            finally:
                with anyio.CancelScope(shield=True):
                    await registry.shutdown(grace=0.5)
                tg.cancel_scope.cancel()
        registry.close()
    finally:
        runner.close()


async def wait_any(events: list[anyio.Event]) -> None:
    """Return as soon as one of ``events`` is set."""
    if any(e.is_set() for e in events):
        return
    async with anyio.create_task_group() as tg:
        for event in events:
            tg.start_soon(_wait_then_cancel, event, tg.cancel_scope)


async def _wait_then_cancel(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
