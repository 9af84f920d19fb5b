"""Carrying out queue items: claim, run through the task registry, move the file when done.

``launch_item`` runs one ready item (``launch_task(item=...)``). ``QueueRun`` is ``run_queue``: it
keeps up to ``max_parallel`` items going, starting the best-ranked ready, non-conflicting item the
moment a slot frees, until nothing is ready; the error policy follows the autonomy level. A run is
itself a task in the registry, whose body is a ``Job`` (this loop) instead of a process, so
``task_output``, ``cancel_task`` and ``list_tasks`` work on it as on any task; ``run_of(task)``
gives a run task's ``QueueRun`` (its progress and report).

Item fields never reach a shell line or an argv: an item's own ``command`` is run as written;
for the configured runner, the item's markdown is its stdin and id, file and title are in
``AGENT_ITEM_ID``, ``AGENT_ITEM_FILE`` and ``AGENT_ITEM_TITLE``.

Nothing here blocks the event loop: a move of an item file takes the queue's ``flock``, which another
process may hold, so moves are made on the event loop only when the lock is free at once
(``claims.queue_lock_now``: a rename and a history line), otherwise in a worker thread, as every
file read is. A move that fails (disk full, ``.agent/runs`` removed by ``git clean -fdX``) is
reported in the item's outcome and never stops the run.

The usual path of trivial items is the short one: a plain item (``runs_plainly``) that completed
is ended in the lane's turn that saw its process exit (``QueueRun.follow_up_now``): its file moved,
its slot freed, and the next ready plain items claimed and launched right there, so they join the
lane's next start batch without a turn of the event loop between. Anything unusual (a failure, a
stop, a hold, a worktree, an agent, retries, the lock held elsewhere) takes the run's loop
(``_turns``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar, overload
from pathlib import Path

import anyio
from anyio.lowlevel import checkpoint_if_cancelled

from . import claims
from .claims import (ClaimLost, find_item, move_item, parse_item_id, queue_lock_now, release_claim,
                     release_stale_claims)
from ..agents import profiles
from ..agents.job import AttemptPlan, Gate, ItemJob, gate_for
from ..config import Config, max_parallel_for, stops_on_first_failure
from ..errors import AgentParallelError, InternalError, QueueError, ResourceLimitError, ShellStopped, exception_reason
from ..paths import ensure_runs_dir, read_regular, resolve_inside, write_atomic
from .planner import QueueGraph, Scheduler, build_graph, lower_bound_ms, simulate
from .isolation import Isolated, SetupFirst, forecast, integrate_item, is_isolated, prepare_item
from .plan import isolation_policy, item_graph
from .items import QueueReader, WorkItem, format_id
from ..results import AgentUsage, ItemOutcome, RunningItem, RunProgress
from ..tasks.executor import ExitInfo
from ..tasks.processes import same_process
from ..tasks.logs import UPSTREAM_LOGS_VAR, LogWriter, upstream_log_path
from ..tasks.records import TaskRecord, TaskStatus
from ..tasks.registry import FollowUps, Task, TaskRegistry, wait_any
from ..text import cut, first_few
from ..worktrees import ShellStop, check_repository, release

log = logging.getLogger(__name__)

LAST_LINES = 10
NOT_RECORDED = "its status could not be recorded in the queue"
ITS_RUN_CANCELLED = "cancelled with its run"  # the reason of an item a run's cancel stopped
MAX_ENV_TITLE = 1000  # characters of an item's title in AGENT_ITEM_TITLE (the item file has it whole)
MAX_REPORT_BYTES = 256 << 20  # a run's report: a few hundred bytes per item (10,000 items: a few MB)
_T = TypeVar("_T")


@dataclass
class QueueContext:
    """What running the queue needs: where things are, the settings, the registry."""

    root: Path
    runs_dir: Path
    config: Config
    registry: TaskRegistry
    reader: QueueReader

    @functools.cached_property
    def queue_dir(self) -> Path:
        """The queue directory, checked to be inside the root once per context (a context lives for
        one call or one run, with the config of its start): resolving it per move was a dozen
        ``lstat`` calls per item on the event loop, each giving up the GIL to the worker threads."""
        return resolve_inside(self.root, self.config.queue_dir, "queue.dir in .agent/config.yaml")

    def graph(self, *, only: list[int] | None = None) -> QueueGraph:
        """The queue as a graph; with ``only``, just those items and the pending items they need.

        Raises the reader's clear ``QueueError`` when the queue directory does not exist."""
        self.queue_dir  # noqa: B018 -- a queue.dir outside the workspace is refused naming the setting
        items, diagnostics = self.reader.read(self.root, self.config.queue_dir)
        policy = isolation_policy(self.root, self.config, items)  # as queue_plan plans: integration time, overlaps
        graph = build_graph(items, diagnostics, policy)
        if only is None:
            return graph
        members = set(Scheduler(graph, only=only).not_started())
        return build_graph([i for i in items if i.status != "pending" or i.id in members], diagnostics, policy)

    def item_graph(self, item_id: int) -> QueueGraph:
        """The graph of one item and what it waits on (`plan.item_graph`): enough to tell whether it may
        start and to hand it its upstream, without the whole queue's graph (0.5 s on 10,000 items)."""
        self.queue_dir  # noqa: B018 -- a queue.dir outside the workspace is refused naming the setting
        return item_graph(self.root, self.config, self.reader.snapshot(self.root, self.config.queue_dir), item_id)

    def ensure_runs_dir(self) -> None:
        """Recreate the runs directory if it vanished mid-run (``git clean -fdX`` removes it):
        every move needs its lock file and its history. Sync: call it in a worker thread."""
        ensure_runs_dir(self.root, self.runs_dir)


# ---------------------------------------------------------------------------------- one item


def check_ready(graph: QueueGraph, item_id: int) -> WorkItem:
    """The item, if it may start now; otherwise a clear refusal saying why."""
    item = graph.by_id.get(item_id)
    if item is None:
        raise QueueError(f"no queue item has id {format_id(item_id)} (or it has duplicates); call queue_plan to see the items")
    if item.status != "pending":
        raise QueueError(f"item {item.id_str} is {item.status}; only pending items can be launched")
    reason = graph.reasons.get(item.file)
    if reason:
        raise QueueError(f"item {item.id_str} is not ready: {reason}")
    return item


@dataclass
class ItemEnd:
    """How a launched item ended, as ``launch_item`` tells ``on_end``: ``ok`` is the item's result (for
    an isolated item: its process completed *and* it was integrated), ``reason`` why it failed when
    its task did not say (an integration conflict), ``notes`` what else happened (its file, its worktree)."""

    ok: bool
    notes: list[str]
    reason: str | None = None
    usage: AgentUsage | None = None
    attempts: int | None = None


class NotStarted(QueueError):
    """``launch_item`` claimed the item but was told not to start it (its run was stopped); the
    claim was given back."""


@dataclass(eq=False)
class _EndMove:
    move: Callable[[], list[str]]
    done: anyio.Event  # shared by the moves queued together: a hop takes them all at once
    notes: list[str] | None = None


def _last_guard(move: Callable[[], list[str]]) -> list[str]:
    """An end move's notes; ``_end_move`` returns its problems as notes, and this is a last guard."""
    try:
        return move()
    except Exception as exc:
        return [f"{NOT_RECORDED}: {exception_reason(exc)}"]


def _make(requests: list[_EndMove]) -> None:
    for request in requests:
        request.notes = _last_guard(request.move)


class Mover:
    """A run's item file moves, several at a time. A worker-thread hop (waking a worker thread, then
    taking the GIL back) costs about as much CPU as the moves it carries, and a run of trivial items
    made two per item: the claim, then the end move. Here a completed item's end move waits (``end``)
    for the run's next claim and goes with it (``run``), before the claim: what waits on the item
    is claimed after its file moved. The run flushes the moves no claim carried before it sleeps;
    a move no claim took within ``PATIENCE_S`` (no other item left to start, say) is made on its
    own, so an item's end is never held up long by the run's other work.

    The moves of ``run`` are made on the event loop when the queue's lock is free at once
    (``claims.queue_lock_now``): a few renames and history lines, where the hop they would ride cost
    2.5 ms of a busy run's start path (the claim comes first: a run starts its items one at a time).
    Only when another claimant holds the lock do they go to a worker thread, which may wait for it."""

    PATIENCE_S = 0.05

    def __init__(self, runs_dir: Path | None = None) -> None:
        self.runs_dir = runs_dir  # None: every move in a worker thread
        self._pending: list[_EndMove] = []
        self.closed = False
        """Set when the run's loop ended: an end move is then made at once, on its own."""

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    async def end(self, move: Callable[[], list[str]]) -> list[str]:
        """Queue an end move (``_end_move``, which never raises) and wait until a hop carried it."""
        return (await self.end_many([move]))[0]

    async def end_many(self, moves: list[Callable[[], list[str]]]) -> list[list[str]]:
        """``end`` of several moves (the items that ended together), waited for as one."""
        if self.closed:
            return await self.make(moves)
        done = anyio.Event()
        requests = [_EndMove(move, done) for move in moves]
        self._pending += requests
        with anyio.move_on_after(self.PATIENCE_S):
            await done.wait()
        if requests[0] in self._pending:  # no claim took them in time (a hop takes every pending move)
            self._pending = [r for r in self._pending if r.done is not done]
            return await self.make(moves)
        await done.wait()  # taken by a hop under way
        return [r.notes or [] for r in requests]

    async def make(self, moves: list[Callable[[], list[str]]]) -> list[list[str]]:
        """Make ``moves`` now (after those queued so far), each one's notes in order."""
        return await self.run(lambda: [_last_guard(move) for move in moves])

    async def run(self, fn: Callable[[], _T]) -> _T:
        """``fn`` after the end moves queued so far: on the event loop when the queue's lock is free,
        else in a worker thread."""
        taken, self._pending = self._pending, []

        def moves_then_fn() -> _T:
            _make(taken)
            return fn()

        try:
            if self.runs_dir is not None:
                with queue_lock_now(self.runs_dir) as held:
                    if held:
                        return moves_then_fn()
            return await anyio.to_thread.run_sync(moves_then_fn)
        finally:
            for request in taken:
                if request.notes is None:
                    request.notes = [f"{NOT_RECORDED}: the move was interrupted"]
                request.done.set()

    def carry_now(self) -> None:
        """Make the end moves waiting for a claim now, on the event loop: the caller holds the queue's
        lock (``QueueRun.follow_up_now``)."""
        taken, self._pending = self._pending, []
        try:
            _make(taken)
        finally:
            for request in taken:
                request.done.set()

    async def flush(self) -> None:
        """Carry out the end moves still waiting, in one hop."""
        if self._pending:
            with anyio.CancelScope(shield=True):
                await self.run(lambda: None)


async def launch_item(ctx: QueueContext, graph: QueueGraph, item: WorkItem, *, by: str,
                      on_end: Callable[[Task, ItemEnd], None] | None = None,
                      go_on: Callable[[], bool] | None = None, mover: Mover | None = None,
                      on_completed: Callable[[], None] | None = None,
                      stop: ShellStop | None = None) -> tuple[Task, Isolated | None]:
    """Claim ``item`` (pending → in_progress) and start it; when it ends, move it to completed/failed.

    An isolated item (``is_isolated``) first gets its worktree (``prepare_item``: a failed setup
    fails the item with the setup's output), runs there, and once its process completed is
    integrated before its file moves (``integrate_item``): completed only if integrated. Returns
    the task and, for an isolated item, its ``Isolated`` (its phase, for progress).

    Claim and start are one step as far as cancellation goes: if the caller is cancelled while
    claiming, or ``go_on()`` (asked once the claim is made) says no, or the start fails, the
    claim is given back (pending, with the reason in the history), so an item is never left
    in_progress with nothing running. Raises ``ClaimLost`` when another claimant was first, and
    ``NotStarted`` when ``go_on`` said no.

    A run passes its ``mover``: the claim and the end move go through it, and an item that
    completed (not isolated: nothing is left to decide) calls ``on_completed`` before its file
    moves, so the run can free its slot and start the next item, whose claim carries this move.
    Its ``stop`` kills the item's ``worktree.setup`` (the claim is given back: ``NotStarted``) or
    ``integration.verify`` (the item fails, its work kept) when the run is stopped. Without one (a
    ``launch_task(item=...)``), the worktree and its setup are the task's first step (``SetupFirst``):
    this returns once the task is registered, as any launch does, and a ``cancel_task`` (or a
    shutdown) during the setup kills it and gives the claim back; a setup that fails fails the task.
    """
    ready = await prepare_launch(ctx, graph, item, by=by)
    with anyio.CancelScope(shield=True):  # a claim made is never dropped by a cancellation
        path, before = await (mover.run(ready.claim) if mover is not None else anyio.to_thread.run_sync(ready.claim))
    return await launch_claimed(ctx, graph, ready, path, before, by=by, on_end=on_end, go_on=go_on, mover=mover,
                                on_completed=on_completed, stop=stop)


@dataclass
class Launch:
    """An item about to be claimed and started: how it runs and what it is handed (``prepare_launch``)."""

    ctx: QueueContext
    item: WorkItem
    by: str
    argv: list[str] | None
    timeout_s: float | None
    waits_on: list[int]
    upstream_logs: list[Path]
    missing: list[str]
    isolating: bool

    def claim(self, *, ensure: bool = True) -> tuple[Path, tuple[int, int] | None]:
        """Claim the item (pending -> in_progress): its file now, and its size and time (sync).
        ``ensure``: make the runs directory again first if it vanished (a batch checks once)."""
        ctx, item = self.ctx, self.item
        if ensure:
            ctx.ensure_runs_dir()
        path = move_item(ctx.queue_dir, ctx.runs_dir, item.id, "in_progress", by=self.by, expect="pending",
                         owned=True, known=ctx.queue_dir / item.file)
        return path, _file_state(path)

    async def give_back(self, path: Path, why: str) -> None:
        """Give a claim that never ran back (in_progress -> pending), ``why`` in the history."""
        await anyio.to_thread.run_sync(lambda: self.give_back_now(path, why))

    def give_back_now(self, path: Path, why: str) -> None:
        """``give_back``, sync: in a worker thread, or on the loop with the queue's lock held."""
        ctx, item = self.ctx, self.item
        try:
            release_claim(ctx.queue_dir, ctx.runs_dir, item.id, by=self.by, reason=why, known=path)
        except Exception as exc:  # the outcome already says why it did not start; add why it stays claimed
            raise QueueError(f"{why}; the claim could not be given back either ({exception_reason(exc)}): "
                             f"move item {item.id_str} back with update_item") from exc


def _prepare(ctx: QueueContext, graph: QueueGraph, item: WorkItem, *, by: str) -> tuple[Launch, list[TaskRecord]]:
    """``prepare_launch``'s checks that need no worker thread, and the records of the upstream items whose
    cut output must first be assembled in a file (off the loop; their logs are not in the ``Launch`` yet)."""
    argv, timeout_s = _how_to_run(ctx.config, item)
    waits_on = graph.waits_on.get(item.id, item.blocked_by)  # its blocked_by and others' `blocks`
    upstream = [t.record for t in ctx.registry.completed_items(waits_on)]
    missing = missing_upstream(ctx.registry, graph, waits_on)
    to_assemble = upstream if any(r.tail_segments for r in upstream) else []
    upstream_logs = [] if to_assemble else _upstream_logs(ctx, item, upstream)
    return Launch(ctx, item, by, argv, timeout_s, list(waits_on), upstream_logs, missing,
                  is_isolated(ctx.config, item)), to_assemble


def _upstream_logs(ctx: QueueContext, item: WorkItem, upstream: list[TaskRecord]) -> list[Path]:
    """Each upstream item's output as one file (its head log, made empty for one that printed nothing;
    cut output assembled in a file: blocking then)."""
    try:
        return [upstream_log_path(ctx.runs_dir, r) for r in upstream]
    except OSError as exc:
        raise QueueError(f"cannot hand item {item.id_str} the output of the items it waits on: {exception_reason(exc)}") from exc


def prepare_launch_now(ctx: QueueContext, graph: QueueGraph, item: WorkItem, *, by: str) -> Launch | None:
    """``prepare_launch`` of an item whose checks need no worker thread (no worktree, no cut upstream
    output to assemble), on the event loop; None for the others."""
    if is_isolated(ctx.config, item):
        return None
    ready, to_assemble = _prepare(ctx, graph, item, by=by)
    return None if to_assemble else ready


async def prepare_launch(ctx: QueueContext, graph: QueueGraph, item: WorkItem, *, by: str) -> Launch:
    """What starting ``item`` needs, checked before it is claimed: raises (``QueueError``) when it cannot
    start (no runner, its upstream output cannot be handed over, no repository for its worktree)."""
    ready, to_assemble = _prepare(ctx, graph, item, by=by)
    if to_assemble:
        ready.upstream_logs = await anyio.to_thread.run_sync(lambda: _upstream_logs(ctx, item, to_assemble))
    if ready.isolating:  # a workspace that cannot host worktrees is refused before the claim
        await anyio.to_thread.run_sync(lambda: check_repository(ctx.root, ctx.config))
    return ready


async def launch_claimed(ctx: QueueContext, graph: QueueGraph, ready: Launch, path: Path,
                         before: tuple[int, int] | None, *, by: str,
                         on_end: Callable[[Task, ItemEnd], None] | None = None,
                         go_on: Callable[[], bool] | None = None, mover: Mover | None = None,
                         on_completed: Callable[[], None] | None = None, stop: ShellStop | None = None,
                         finish_with: FollowUps | None = None) -> tuple[Task, Isolated | None]:
    """``launch_item`` once the item is claimed (its file at ``path``): start it, or give the claim back.

    ``finish_with`` (a run, for an item run once as a plain process): its end is made by that owner's
    ``follow_up_many`` with the other items ending together, instead of ``on_end``/``on_completed``."""
    item, argv, timeout_s, isolating = ready.item, ready.argv, ready.timeout_s, ready.isolating
    give_back = ready.give_back
    try:
        await checkpoint_if_cancelled()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await give_back(path, "not started: the call was cancelled while claiming it")
        raise
    if go_on is not None and not go_on():
        with anyio.CancelScope(shield=True):
            await give_back(path, f"not started: {by} was stopped while claiming it")
        raise NotStarted(f"{by} was stopped while claiming it; the claim was given back")

    isolated: Isolated | None = None
    prelude = b""
    workdir = ctx.root
    env = _item_env(graph, ready, path)
    setup: SetupFirst | None = None
    if isolating and stop is None:
        # a launch_task: answered at once, the worktree and its setup being the task's first step
        def then(ready: Isolated) -> ItemJob:
            return _item_job(ctx, item, argv, ready.lease.workdir, {**env, **ready.lease.env()}, path, timeout_s,
                             always=True)

        def on_ready(task_id: str, ready: Isolated) -> None:
            nonlocal isolated
            isolated = ready
            rec = ctx.registry.get(task_id).record  # (running: its task is known)
            rec.cwd, rec.branch, rec.worktree = str(ready.lease.workdir), ready.lease.branch, ready.worktree
            ready.show_in(rec)

        setup = SetupFirst(ctx.root, ctx.config, item, then, on_ready)
    elif isolating:
        with anyio.CancelScope(shield=True):  # claimed: prepare it, or record why it could not be
            try:  # a run's stop kills its setups
                isolated, prelude = await prepare_item(ctx.root, ctx.config, item, stop=stop)
                workdir = isolated.lease.workdir
                env.update(isolated.lease.env())
            except ShellStopped as exc:  # its run was stopped during the setup: it never ran
                await give_back(path, f"not started: {exc}")
                raise NotStarted(f"{by} was stopped during the worktree setup of item {item.id_str}; the "
                                 "claim was given back") from exc
            except AgentParallelError as exc:  # not a git repository, setup failed, git refused a step
                why = f"its worktree could not be prepared: {exc}"
                notes = await anyio.to_thread.run_sync(
                    lambda: _end_move(ctx, item.id, path, before, "failed", by=by, reason=why))
                raise QueueError(why + "".join(f"; {n}" for n in notes)) from exc

    job = _item_job(ctx, item, argv, workdir, env, path, timeout_s) if setup is None else None

    async def finished(task: Task) -> str | None:
        """Move the item to completed/failed, off the event loop; always tells ``on_end``. What went
        wrong with the move is returned: the registry adds it to the task's reason."""
        rec = task.record
        ok = rec.status == TaskStatus.COMPLETED
        end = ItemEnd(ok, [f"{NOT_RECORDED}: the move was interrupted"])
        said: list[str] = []
        if setup is not None and setup.inner is None and rec.status in (TaskStatus.CANCELLED, TaskStatus.INTERRUPTED):
            why = setup.setup_stopped or rec.reason  # stopped in (or before) its setup: it never ran, it is given back
            try:
                await give_back(path, f"not started: {why}")
                end.notes = [f"not started: {why}; item {item.id_str} is pending again"]
            except QueueError as exc:
                end.notes = [str(exc)]
            finally:
                if on_end is not None:
                    on_end(task, end)
            return "; ".join(end.notes)
        attempts = setup.inner if setup is not None else job
        if attempts is not None:  # its usage is kept in the record; what its attempts did goes in the reason
            end.usage = attempts.usage()
            rec.usage = end.usage.model_dump(exclude_none=True) if end.usage is not None else None
            end.attempts = attempts.attempts if attempts.plan.retries else None
            said = list(attempts.plan.notes)
        try:
            kept: list[str] = []
            if isolated is not None:
                try:
                    ok, end.reason, kept = await integrate_item(ctx.root, ctx.config, isolated, item, succeeded=ok,
                                                                stop=stop)
                except Exception as exc:  # whatever happens, the item's file moves (never left in_progress)
                    log.exception("item %s: its integration failed", item.id_str)
                    ok, end.reason = False, f"its integration failed: {exception_reason(exc)}"
                end.ok = ok
            reason = end.reason or rec.reason

            def move() -> list[str]:
                return _end_move(ctx, item.id, path, before, "completed" if ok else "failed", by=by, reason=reason)

            if mover is None:
                end.notes = await anyio.to_thread.run_sync(move)
            elif ok and isolated is None:  # the run may start the next item now; its claim carries this move
                if on_completed is not None:
                    on_completed()
                end.notes = await mover.end(move)
            else:
                end.notes = await mover.run(move)
            end.notes += kept
        finally:
            if on_end is not None:
                on_end(task, end)
        return "; ".join(said + ([end.reason] if end.reason else []) + end.notes) or None

    with anyio.CancelScope(shield=True):  # claimed: start it, or give the claim back
        try:
            if job is not None or setup is not None:  # its attempts run the process; the record shows the first argv
                task = await ctx.registry.launch(
                    command=_shown_command(ctx.config, item, argv), cwd=workdir,
                    description=f"item {item.id_str}: {item.title}", env=env, kind="item", item_id=item.id_str,
                    item_file=path.name, job=job or setup, on_finish=finished, prelude=prelude,
                    follow_up_timeout=math.inf if isolating else None,
                    branch=isolated.lease.branch if isolated else None,
                    worktree=str(isolated.lease.path) if isolated else None, answer_at_once=setup is not None)
            else:
                task = await ctx.registry.launch(
                    command=item.command, argv=argv, cwd=workdir, description=f"item {item.id_str}: {item.title}",
                    env=env, timeout_s=timeout_s, kind="item", item_id=item.id_str, item_file=path.name,
                    stdin_path=path if argv else None, prelude=prelude,
                    on_finish=finished if finish_with is None or isolated is not None else None,
                    finish_with=finish_with if isolated is None else None,
                    follow_up_timeout=math.inf if isolated is not None else None, resources=item.resources,
                    branch=isolated.lease.branch if isolated else None,
                    worktree=str(isolated.lease.path) if isolated else None,
                    answer_at_once=True,  # the run goes on to its next start while this one's process starts
                    record_soon=True)  # its claim is in the history: its first record is written in the background
        except Exception as exc:  # not started (bad strings, a cap, shutting down...): the process never ran
            if isolated is not None:
                lease = isolated.lease
                await anyio.to_thread.run_sync(lambda: release(ctx.root, lease))
            await give_back(path, f"not started: {exception_reason(exc)}")
            raise
    if isolated is not None:  # a run's isolated item: its worktree is ready, its process started
        isolated.show_in(task.record)
    elif setup is not None and setup.isolated is None:  # a launch_task's: its worktree is the task's first step
        task.record.phase = "setup"
    return task, isolated


def _item_env(graph: QueueGraph, ready: Launch, path: Path) -> dict[str, str]:
    """What an item's process is told of it (its id, file, title) and of what it waited on."""
    item = ready.item
    env = {"AGENT_ITEM_ID": item.id_str, "AGENT_ITEM_FILE": str(path), "AGENT_ITEM_TITLE": cut(item.title, MAX_ENV_TITLE)}
    if ready.waits_on:
        env["AGENT_UPSTREAM_ITEMS"] = " ".join(graph.label(dep) for dep in ready.waits_on)
    if ready.upstream_logs:
        env[UPSTREAM_LOGS_VAR] = os.pathsep.join(str(p) for p in ready.upstream_logs)
    if ready.missing:
        env[UPSTREAM_MISSING_VAR] = " ".join(ready.missing)
    return env


def launch_plain_now(ctx: QueueContext, graph: QueueGraph, ready: Launch, path: Path, *,
                     finish_with: FollowUps) -> Task:
    """``launch_claimed`` of a plain item (``runs_plainly``) without awaiting, its end made by ``finish_with``;
    the claim is given back (in this thread: the caller holds the queue's lock) when it cannot start."""
    item = ready.item
    try:
        return ctx.registry.launch_now(
            command=item.command, argv=ready.argv, cwd=ctx.root, description=f"item {item.id_str}: {item.title}",
            env=_item_env(graph, ready, path), timeout_s=ready.timeout_s, kind="item", item_id=item.id_str,
            item_file=path.name, stdin_path=path if ready.argv else None, resources=item.resources,
            finish_with=finish_with)
    except Exception as exc:  # not started (bad strings, a cap, shutting down...): the process never ran
        ready.give_back_now(path, f"not started: {exception_reason(exc)}")
        raise


def _end_move(ctx: QueueContext, item_id: int, path: Path, before: tuple[int, int] | None, to_status: str, *,
              by: str, reason: str | None) -> list[str]:
    """An item's end, in a worker thread: what happened to its file while it ran, then the move.

    A failed move is returned as a note, never raised: the item's own result still decides what
    happens to its dependents, and the run must end."""
    notes = _item_file_notes(path, before)
    try:
        ctx.ensure_runs_dir()
        move_item(ctx.queue_dir, ctx.runs_dir, item_id, to_status, by=by, reason=reason, expect="in_progress",
                  known=path)
    except Exception as exc:
        notes.append(f"{NOT_RECORDED}: {exception_reason(exc)}")
    return notes


def runs_plainly(config: Config, item: WorkItem) -> bool:
    """An item run once as a plain process where the queue is: no worktree, agent or retries."""
    return not is_isolated(config, item) and not is_agent_item(config, item) and not retries_of(config, item)


def is_agent_item(config: Config, item: WorkItem) -> bool:
    """An item the configured agent profile (``runner.agent``) carries out."""
    return item.command is None and config.agent is not None


def retries_of(config: Config, item: WorkItem) -> int:
    return item.retries if item.retries is not None else config.retries


def _gate(ctx: QueueContext, config: Config) -> Gate:
    """The server's gate of the configured agent profile, with the cap the config sets now."""
    assert config.agent is not None
    gate = gate_for(ctx.registry, config.agent)
    gate.cap = config.agent_max_parallel
    return gate


@overload
def _item_job(ctx: QueueContext, item: WorkItem, argv: list[str] | None, workdir: Path, env: dict[str, str],
              path: Path, timeout_s: float | None, *, always: Literal[True]) -> ItemJob: ...
@overload
def _item_job(ctx: QueueContext, item: WorkItem, argv: list[str] | None, workdir: Path, env: dict[str, str],
              path: Path, timeout_s: float | None, *, always: bool = False) -> ItemJob | None: ...
def _item_job(ctx: QueueContext, item: WorkItem, argv: list[str] | None, workdir: Path, env: dict[str, str],
              path: Path, timeout_s: float | None, *, always: bool = False) -> ItemJob | None:
    """The body of an item that retries or is run by an agent profile (``agents/job.py``); None for an
    item run once as a plain process (the registry runs it, as any task), unless ``always`` (an item
    whose worktree setup comes first: ``SetupFirst`` runs it as a job)."""
    config, agent = ctx.config, is_agent_item(ctx.config, item)
    retries = retries_of(config, item)
    if not agent and not retries and not always:
        return None
    return ItemJob(AttemptPlan(
        executor=ctx.registry.executor, runs_dir=ctx.runs_dir, cwd=workdir, env=dict(env), command=item.command,
        argv=argv, stdin_path=path if item.command is None else None, timeout_s=timeout_s, retries=retries,
        retry_delay_s=config.retry_delay_s, agent=config.agent if agent else None, agent_args=config.agent_args,
        agent_command=config.runner_command, auto_resume=config.auto_resume,
        gate=_gate(ctx, config) if agent and config.agent else None,
        grace_s=ctx.registry.settings.kill_grace_s, resources=dict(item.resources),
        admission=ctx.registry.settings.admission, admission_retry_s=ctx.registry.settings.admission_retry_s))


def _shown_command(config: Config, item: WorkItem, argv: list[str] | None) -> str:
    """What an item's record shows as its command: its own, else the first argv its runner runs."""
    if item.command is not None:
        return item.command
    if is_agent_item(config, item) and config.agent is not None:
        return " ".join(profiles.first_run(config.agent, config.agent_args, config.runner_command).argv)
    return " ".join(argv or [])


def _how_to_run(config: Config, item: WorkItem) -> tuple[list[str] | None, float | None]:
    if item.command is not None:
        return None, item.timeout_s
    if config.agent is not None:  # the profile builds the argv (agents/profiles.py)
        return None, item.timeout_s or config.runner_timeout_s
    if config.runner_command:
        return list(config.runner_command), item.timeout_s or config.runner_timeout_s
    raise QueueError(f"item {item.id_str} has no `command` and no runner is configured; set runner.command in "
                     ".agent/config.yaml (e.g. [\"claude\", \"-p\"]), or carry the item out yourself and "
                     "record it with update_item")


UPSTREAM_MISSING_VAR = "AGENT_UPSTREAM_MISSING"
"""The items an item waits on whose output this server does not keep: left out of AGENT_UPSTREAM_LOGS."""


def missing_upstream(registry: TaskRegistry, graph: QueueGraph, waits_on: Iterable[int]) -> list[str]:
    """Of the items ``waits_on`` names, those without a completed task kept here (completed by hand with
    update_item, or by another server, or pruned past ``tasks.max_tasks`` before this run): what the
    item cannot be handed the output of, spelled as their files spell them."""
    return [graph.label(d) for d in waits_on if not registry.completed_items([d])]


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _item_file_notes(path: Path, before: tuple[int, int] | None) -> list[str]:
    now = _file_state(path)
    if now is None:
        return ["the item file was deleted or renamed while it ran"]
    if now != before:
        return ["the item file was edited while it ran (the run used the version it started with)"]
    return []


@dataclass
class _Where:
    """Where an item another claimant took went: its status now, and who moved or holds it."""

    status: str | None  # None: no file (or several)
    by: str
    claim: tuple[int, int | None] | None = None  # (pid, start time) of a claim made by a run or launch_task
    path: Path | None = None
    live: bool = False
    """In progress, claimed by a process that still runs: it will leave in_progress by itself."""

    def claimant_alive(self) -> bool:
        if self.claim is None:
            return False
        return same_process(*self.claim)

    def still_there(self) -> bool:
        """The cheap re-check while waiting (sync): the same in_progress file, its claimant alive."""
        return self.path is not None and self.path.exists() and self.claimant_alive()


def _locate(queue_dir: Path, runs_dir: Path, item_id: int) -> _Where:
    """Look up an item's file and history (sync: call it in a worker thread)."""
    try:
        path, name = find_item(queue_dir, item_id)
    except (QueueError, OSError) as exc:
        return _Where(None, exception_reason(exc))
    try:
        last, last_claim = claims.last_move_and_claim(runs_dir, name.id_str)
    except OSError:
        last = last_claim = None
    if name.status != "in_progress":
        return _Where(name.status, str(last["by"]) if last else "another agent or by hand", path=path)
    if last_claim is None:
        return _Where("in_progress", "another agent (no claim was recorded; it was moved by hand)", path=path)
    pid = last_claim.get("pid")
    owned = (pid, last_claim.get("pid_start")) if isinstance(pid, int) else None
    where = _Where("in_progress", str(last_claim.get("by")), claim=owned, path=path)
    where.live = where.claimant_alive()
    return where


# ---------------------------------------------------------------------------------- a run


@dataclass
class RunOptions:
    level: str
    continue_on_error: bool
    """Whether this run goes on past a failure (the level and the written setting resolved by
    ``stops_on_first_failure``)."""
    max_parallel: int
    only: list[int] | None = None

    @property
    def stops_on_first_failure(self) -> bool:
        return not self.continue_on_error


def _isolation_fields(isolated: Isolated | None) -> dict[str, object]:
    """An isolated item's phase, branch, worktree and conflicts, for its row in progress and report."""
    if isolated is None:
        return {}
    return {"phase": isolated.phase, "branch": isolated.lease.branch, "worktree": isolated.worktree,
            "conflicts": list(isolated.conflicts), "integration_s": isolated.integration_s}


@dataclass
class _Preparing:
    """An isolated item whose start is under way: claimed (or being claimed), its worktree being made."""

    item: WorkItem
    since: float
    agent: bool


@dataclass
class _Slot:
    item: WorkItem
    task: Task
    isolated: Isolated | None = None
    agent: bool = False

    def job(self) -> ItemJob | None:
        return self.task.job if isinstance(self.task.job, ItemJob) else None


_IDS_SHOWN = 20
"""Item ids a run's recorded command lists (``run_queue ... items=001,002,... (and 480 more)``)."""


async def start_run(ctx: QueueContext, *, max_parallel: int | None = None, level: str | None = None,
                    continue_on_error: bool | None = None, items: list[str] | None = None) -> tuple[Task, list[str]]:
    """Start a queue run in the registry; arguments left None come from the config.

    Returns the run's task (``run_of(task)`` is its ``QueueRun``) and warnings for the caller.
    Fails at once with a clear ``QueueError`` when the queue directory does not exist.
    """
    config = ctx.config
    warnings: list[str] = []
    parallel = max_parallel_for(max_parallel, config)
    chosen_level = level or config.level
    coe = config.continue_on_error if continue_on_error is None else continue_on_error
    if coe and chosen_level != "L3":
        warnings.append(f"continue_on_error applies at L3 only; level {chosen_level} stops at the first failure")
    if items is not None and not items:
        raise QueueError("items is an empty list: name the items to run, or leave items out to run the whole queue")
    only = list(dict.fromkeys(parse_item_id(i) for i in items)) if items is not None else None  # repeats once
    graph = await anyio.to_thread.run_sync(ctx.graph)  # a missing queue directory is refused here, clearly
    if only is not None:
        missing = [format_id(i) for i in only if i not in graph.by_id]
        if missing:
            raise QueueError(f"no queue item has id {first_few(missing, 5)}; call queue_plan to see the items")
    if graph.errors:  # the items they concern cannot run: say so, rather than run the rest in silence
        shown = first_few([f"{d.file or d.item or d.kind}: {d.message}" for d in graph.errors[:3]], 3, sep="; ",
                          total=len(graph.errors))
        warnings.append(f"the queue has {len(graph.errors)} error(s), and the items they concern do not run: "
                        f"{shown}; queue_plan lists them")
    released = await anyio.to_thread.run_sync(lambda: release_stale_claims(ctx.queue_dir, ctx.runs_dir))
    warnings += [f"item {item} ({file}) was {message}" for item, file, message in released]
    options = RunOptions(level=chosen_level, continue_on_error=not stops_on_first_failure(chosen_level, coe),
                         max_parallel=parallel, only=only)
    command = f"run_queue level={chosen_level} max_parallel={parallel}" + (
        f" items={first_few([format_id(i) for i in only[:_IDS_SHOWN]], _IDS_SHOWN, sep=',', total=len(only))}"
        if only else "")  # (a record to read, not a process's argument: 25,000 ids made it 150 KB, refused as such)
    task = await ctx.registry.launch(command=command, cwd=ctx.root, description="queue run", kind="run",
                                     job=QueueRun(ctx, options))
    return task, warnings


def run_of(task: Task) -> QueueRun | None:
    """The queue run a task carries out (started by this server), or None (a process, or a run
    of an earlier server: its report is in ``load_report``)."""
    return task.job if isinstance(task.job, QueueRun) else None


class QueueRun:
    """One ``run_queue``: the scheduling loop, its progress and its report (the ``Job`` of its task).

    Another run (or server, or ``launch_task``) may take an item first. The run then follows
    where the item went: completed elsewhere counts as done, failed or blocked as a failure of
    that item, and while a live process holds it in_progress the run waits (polling its file in
    a worker thread). The same holds for in-progress items that this run's items wait on.
    """

    def __init__(self, ctx: QueueContext, options: RunOptions) -> None:
        self.ctx, self.options = ctx, options
        self.shell_stop = ShellStop()

    # -- Job
    async def start(self, task_id: str, log: LogWriter) -> None:
        """Read the queue and set the run up; a failure fails the run's task, never the registry
        (the queue may vanish between ``start_run``'s check and here)."""
        try:
            graph = await anyio.to_thread.run_sync(lambda: self.ctx.graph(only=self.options.only))
        except AgentParallelError as exc:
            raise QueueError(f"the run could not start: {exc}") from exc
        except Exception as exc:
            raise InternalError(f"the run could not start: {exc!r}") from exc
        self._set_up(task_id, log, graph)

    def _set_up(self, run_id: str, log: LogWriter, graph: QueueGraph) -> None:
        options = self.options
        self.run_id, self.log = run_id, log
        self.by = f"run {run_id}"
        self.graph = graph
        self.scheduler = Scheduler(self.graph)
        self.members = self.scheduler.not_started()  # the pending items this run considers, best first
        self._member_set = set(self.members)
        self._pinned: list[Task] = []  # item tasks whose output its items will read: kept while it runs (``_loop``)
        self.predicted = simulate(self.graph, options.max_parallel).makespan_ms / 1000
        self.lower_bound = lower_bound_ms(self.graph, options.max_parallel) / 1000
        self.unestimated = sum(1 for m in self.members if self.graph.by_id[m].estimate_s is None)
        self.started = time.time()
        self.first_start: float | None = None  # when the first item was launched (its start may still be under way)
        self._first_started: float | None = None  # the earliest start its ended items recorded
        self.last_end: float | None = None
        self.running: dict[int, _Slot] = {}
        self.preparing: dict[int, _Preparing] = {}  # isolated items claimed, their worktree being made: slots taken
        self.outcomes: dict[int, ItemOutcome] = {}
        self._by_id: list[ItemOutcome] | None = None  # the outcomes sorted by item id, until the next one
        self._change = anyio.Event()  # set on every start and end (``changed``): progress waiters use it
        self.state = "running"
        self.stop_reason: str | None = None
        self.held: str | None = None
        self._held_for_room = False  # held at the registry's task cap: woken by any task ending
        self._cancelled = False
        self._retry: list[int] = []  # items to (re)claim before asking the scheduler (held at the cap, given back)
        self._agent_wait: list[int] = []  # agent items taken from the scheduler while agents may not start
        self.budget: str | None = None  # why no agent item starts any more (runner.max_cost_usd / max_tokens)
        self.watching: dict[int, str] = {}  # items held by another claimant -> who
        self._elsewhere: dict[int, str] = {}  # items left in progress elsewhere -> why this run does not wait
        self._watched: list[tuple[int, _Where]] = []
        self._finished: list[tuple[int, Task, ItemEnd]] = []
        self.mover = Mover(self.ctx.runs_dir)  # the claims and end moves of its items, several at a time
        self._completed: list[int] = []  # items whose process completed, their file not moved yet
        self._plain: dict[int, tuple[WorkItem, Path, tuple[int, int] | None]] = {}  # started by _start_plain
        self._released: dict[int, _Slot | None] = {}  # ... their slot freed, their outcome still to come
        self._starting = False  # a turn is starting items (``_start_what_fits`` awaits meanwhile)
        self._tg: anyio.abc.TaskGroup | None = None
        self._exit: ExitInfo | None = None
        policy = "continues past failures" if options.continue_on_error else "stops at the first failure"
        self._write(f"run {run_id}: level {options.level} ({policy}), "
                    f"max_parallel {options.max_parallel}; predicted makespan {self.predicted:.1f}s, "
                    f"lower bound {self.lower_bound:.1f}s")

    async def run(self) -> ExitInfo:
        if self._exit is None:
            await self._loop()
        assert self._exit is not None
        return self._exit

    async def stop(self, grace: float, reason: str) -> None:
        """Stop the run: start nothing new, cancel the items that are running and kill the setup and
        verify commands of its isolated items (a worker thread waiting on one cannot be interrupted)."""
        self._cancelled = True
        self._stop(f"the run was {reason}")
        self.shell_stop.stop(f"its run was {reason}")
        async with anyio.create_task_group() as tg:
            for slot in list(self.running.values()):
                tg.start_soon(self.ctx.registry.cancel, slot.task, ITS_RUN_CANCELLED)

    # -- the loop
    async def _loop(self) -> None:
        # the output its items will be handed (AGENT_UPSTREAM_LOGS) is kept past tasks.max_tasks until it
        # ends: that of items done before it from now, that of its own items as they start (``_start``)
        before = sorted({d for m in self.members for d in self.graph.waits_on.get(m, ()) if d not in self._member_set})
        self._pinned += self.ctx.registry.completed_items(before)
        self.ctx.registry.pin(self._pinned)
        try:
            await self._turns()
        finally:  # whatever ended the loop, no item's end move is left waiting for a claim
            self.ctx.registry.unpin(self._pinned)  # its items' dependents have all ended
            self._pinned = []
            self.mover.closed = True
            await self.mover.flush()
        self.state = "finished"
        await self._finalize()

    async def _turns(self) -> None:
        async with anyio.create_task_group() as self._tg:
            needed = {p for m in self.members for p in self.graph.waits_on.get(m, ())}
            for item_id in sorted(needed & set(self.graph.in_progress)):
                self._follow(item_id, "in progress when the run started")
            while True:
                # Take the event before looking at anything: an item ending while we collect or start
                # others sets this very event, so the wait below returns at once instead of missing it.
                wake = self.changed
                await self._collect()
                started = await self._start_what_fits() if self.state == "running" else False
                busy = bool(self.running) or bool(self.preparing) or bool(self._released) or started
                if self.state == "running":
                    busy = busy or bool(self.watching) or self.held is not None
                if not busy:
                    break  # nothing running, and nothing can start: either all done, or stuck behind others' work
                await self.mover.flush()  # end moves no claim carried this turn
                await self._sleep(wake)
            self._tg.cancel_scope.cancel()  # stop following others' items

    async def _sleep(self, wake: anyio.Event) -> None:
        """Until something changes; while held, also re-check every ``admission_retry_s`` (memory
        and load have no event) and, at the task cap, wake the moment any task ends."""
        if self.held is None:
            await wake.wait()
            return
        events = [wake]
        if self._held_for_room:
            events += [t.done for t in self.ctx.registry.newest_first({TaskStatus.QUEUED, TaskStatus.RUNNING})
                       if t.record.task_id != self.run_id]
        with anyio.move_on_after(self.ctx.registry.settings.admission_retry_s):
            await wait_any(events)

    async def _start_what_fits(self) -> bool:
        """Start the best-ranked ready items while slots are free and the machine allows it. Items run
        once as a plain process are started together once the others are under way (``_start_plain``)."""
        self._starting = True  # (``follow_up_now`` starts nothing meanwhile: it would count slots wrong)
        try:
            return await self._start_fitting()
        finally:
            self._starting = False

    async def _start_fitting(self) -> bool:
        registry = self.ctx.registry
        check = registry.settings.admission
        started = held = False
        previous = self.held
        plain: list[WorkItem] = []
        while len(self.running) + len(self.preparing) + len(plain) < self.options.max_parallel \
                and self.state == "running":
            if registry.room() <= len(plain):
                self._hold(f"the server already has {registry.settings.max_running} tasks queued or running (its "
                           "limit); the next item starts when one of them ends", for_room=True)
                held = True
                break
            if check is not None and (why := check()):
                self._hold(why)
                held = True
                break
            self.held, self._held_for_room = None, False
            block = self._agents_blocked()
            if self._retry:
                item_id = self._retry.pop(0)
            elif self._agent_wait and block is None:
                item_id = self._agent_wait.pop(0)
            else:
                batch = self.scheduler.start_next(1)
                if not batch:
                    break
                item_id = batch[0]
            item = self.graph.by_id[item_id]
            if block is not None and is_agent_item(self.ctx.config, item):
                self._agent_wait.append(item_id)  # commands keep starting beside the held agents
                continue
            if is_isolated(self.ctx.config, item) and self._tg is not None:
                # its worktree and worktree.setup may take minutes: made beside the loop, which goes on
                # starting the next items and ending the finished ones meanwhile (its slot is taken)
                self.preparing[item_id] = _Preparing(item, time.time(), is_agent_item(self.ctx.config, item))
                self._tg.start_soon(self._start_isolated, item_id)
                started = True
                continue
            if runs_plainly(self.ctx.config, item):
                plain.append(item)
                continue
            started = await self._start(item_id) or started
        if plain:
            started = await self._start_plain(plain) or started
        if held:
            return started
        if self.state == "running" and self._agent_wait and self.held is None and self.budget is None:
            if block := self._agents_blocked():
                why = f"agent items: {block}"
                if previous == why:
                    self.held = why  # unchanged: no wake-up (it would spin the loop)
                else:
                    self._hold(why)
        return started

    def _agents_blocked(self) -> str | None:
        """Why no agent item may start now: the run's budget, a rate limit, the per-profile cap; or None."""
        config = self.ctx.config
        if config.agent is None:
            return None
        if self.budget is None and (config.max_cost_usd is not None or config.max_tokens is not None):
            spent = self.usage()
            if spent is not None and config.max_cost_usd is not None and (spent.cost_usd or 0) >= config.max_cost_usd:
                self.budget = f"runner.max_cost_usd ${config.max_cost_usd:g} was reached (${spent.cost_usd or 0:.2f} spent)"
            elif spent is not None and config.max_tokens is not None and spent.tokens >= config.max_tokens:
                self.budget = f"runner.max_tokens {config.max_tokens} was reached ({spent.tokens} tokens used)"
            if self.budget is not None:
                self.stop_reason = f"the budget stopped the run: {self.budget}; no new agent item started, " \
                                   "running ones were left to finish"
                self._write(f"stopping agent items: {self.stop_reason}")
        if self.budget is not None:
            return self.budget
        if why := gate_for(self.ctx.registry, config.agent).holding():
            return why
        cap = config.agent_max_parallel
        gate = gate_for(self.ctx.registry, config.agent)
        agents = sum(1 for s in self.running.values() if s.agent) + sum(1 for p in self.preparing.values() if p.agent)
        if cap is not None and max(agents, gate.running) >= cap:
            return f"runner.max_parallel: {cap} agent item(s) already running"
        return None

    def usage(self) -> AgentUsage | None:
        """The run's agent usage: finished items' and running items' so far (and those released, whose
        outcome is still to come: the budget must count them)."""
        slots = [*self.running.values(), *(s for s in self._released.values() if s is not None)]
        live = [job.usage() for s in slots if (job := s.job()) is not None]
        return AgentUsage.total([o.usage for o in self.outcomes.values()] + live)

    def _hold(self, why: str, *, for_room: bool = False) -> None:
        if self.held != why:
            self._write(f"start held: {why}")
            self.held = why
            self._changed()
        self._held_for_room = for_room

    async def _start_isolated(self, item_id: int) -> None:
        """`_start` of an isolated item, in the background (see `_start_what_fits`); its slot stays taken
        until the item runs (then it is in ``running``) or could not start (its outcome says why)."""
        try:
            await self._start(item_id)
        finally:
            del self.preparing[item_id]
            self._changed()

    async def _start(self, item_id: int) -> bool:
        item = self.graph.by_id[item_id]
        try:
            task, isolated = await launch_item(self.ctx, self.graph, item, by=self.by,
                                               go_on=lambda: self.state == "running", stop=self.shell_stop,
                                               on_end=functools.partial(self._on_end, item_id), mover=self.mover,
                                               on_completed=functools.partial(self._on_completed, item_id))
        except Exception as exc:
            self._not_started(item, exc)
            return False
        self._started(item, task, isolated)
        return True

    async def _start_plain(self, items: list[WorkItem]) -> bool:
        """Start items run once as a plain process (``runs_plainly``) together: their claims in one move
        of the queue, and their ends made together too (``follow_up_now``, else ``follow_up_many``). A
        trivial item's own work is a few file moves; one coroutine, lock and event per move cost more
        than the moves."""
        ready: list[Launch] = []
        for i, item in enumerate(items):
            try:
                ready.append(await prepare_launch(self.ctx, self.graph, item, by=self.by))
            except Exception as exc:  # (no runner...) in rank order: those before it start first
                started = await self._start_ready(ready)
                self._not_started(item, exc)
                if self.state == "running":
                    return await self._start_plain(items[i + 1:]) or started
                for never in items[i + 1:]:  # taken from the scheduler, not claimed: the run stopped
                    self._record(never, "not_started", reason=self.stop_reason or "the run was stopped")
                return started
        return await self._start_ready(ready)

    async def _start_ready(self, ready: list[Launch]) -> bool:
        """``_start_plain`` of items checked ready to be claimed."""
        if not ready:
            return False

        def claim_all() -> list[tuple[Path, tuple[int, int] | None] | Exception]:
            claimed: list[tuple[Path, tuple[int, int] | None] | Exception] = []
            try:
                self.ctx.ensure_runs_dir()
            except Exception as exc:  # every claim fails: each item's outcome says why
                return [exc] * len(ready)
            for one in ready:
                try:
                    claimed.append(one.claim(ensure=False))
                except Exception as exc:  # taken by another claimant, a full disk...: that item alone
                    claimed.append(exc)
            return claimed

        with anyio.CancelScope(shield=True):  # a claim made is never dropped by a cancellation
            claims = await self.mover.run(claim_all)
        started = False
        left = list(zip(ready, claims, strict=True))
        try:
            while left:
                one, claimed = left.pop(0)
                if isinstance(claimed, Exception):
                    self._not_started(one.item, claimed)
                    continue
                path, before = claimed
                self._plain[one.item.id] = (one.item, path, before)
                try:
                    task, _ = await launch_claimed(self.ctx, self.graph, one, path, before, by=self.by,
                                                   go_on=lambda: self.state == "running", mover=self.mover,
                                                   finish_with=self)
                except Exception as exc:
                    del self._plain[one.item.id]
                    self._not_started(one.item, exc)
                    continue
                self._started(one.item, task, None)
                started = True
        finally:  # cancelled amid the starts: the claims not started yet are given back
            if unstarted := [(one, claimed) for one, claimed in left if not isinstance(claimed, Exception)]:
                with anyio.CancelScope(shield=True):
                    for one, (path, _) in unstarted:
                        try:
                            await one.give_back(path, "not started: the run was cancelled while starting it")
                        except QueueError as exc:
                            log.error("run %s: %s", self.run_id, exc)
        return started

    async def follow_up_many(self, tasks: list[Task]) -> list[str | None]:
        """The end of plain items that ended together (``FollowUps``): what ``launch_item``'s ``finished``
        does for one, made for all. Completed ones free their slots at once and their files move with the
        run's next claims (``Mover.end_many``); failed ones move at once."""
        ends: list[tuple[int, Task, ItemEnd, Callable[[], list[str]]]] = []
        for task in tasks:
            rec = task.record
            item_id = parse_item_id(rec.item_id or "")
            if (started := self._plain.pop(item_id, None)) is not None:
                _, path, before = started
            else:  # (never: _start_ready keeps every item it launched) its file moves all the same
                log.error("run %s: item %s ended without its start on record", self.run_id, rec.item_id)
                path = self.ctx.queue_dir / (rec.item_file or "")
                before = _file_state(path)
            ok = rec.status == TaskStatus.COMPLETED
            move = functools.partial(_end_move, self.ctx, item_id, path, before, "completed" if ok else "failed",
                                     by=self.by, reason=None if ok else rec.reason)
            ends.append((item_id, task, ItemEnd(ok, [f"{NOT_RECORDED}: the move was interrupted"]), move))
        try:
            if failed := [e for e in ends if not e[2].ok]:
                for (_, _, end, _), notes in zip(failed, await self.mover.make([e[3] for e in failed]), strict=True):
                    end.notes = notes
            if completed := [e for e in ends if e[2].ok]:
                self._completed += [item_id for item_id, _, _, _ in completed]  # their slots are free
                self._changed()
                for (_, _, end, _), notes in zip(completed, await self.mover.end_many([e[3] for e in completed]),
                                                 strict=True):
                    end.notes = notes
        finally:
            self._finished += [(item_id, task, end) for item_id, task, end, _ in ends]
            self._changed()
        return ["; ".join(end.notes) or None for _, _, end, _ in ends]

    def follow_up_now(self, tasks: list[Task]) -> list[str | None] | None:
        """``follow_up_many`` made at once in the lane's turn (``FollowUps``), when every one of ``tasks``
        completed, the run is under way and the queue's lock is free now: their files move, their slots
        free, their outcomes are recorded and the next plain items are claimed and started right there
        (``_start_plain_now``), with no turn of the event loop between an end and the next start. None
        (nothing done) otherwise."""
        if self.state != "running" or self._cancelled:
            return None
        ids = [parse_item_id(task.record.item_id or "") for task in tasks]
        if any(task.record.status != TaskStatus.COMPLETED for task in tasks) or any(i not in self._plain for i in ids):
            return None
        with queue_lock_now(self.ctx.runs_dir) as held:
            if not held:
                return None
            self.mover.carry_now()  # those waiting for a claim go first, as a claim would take them
            answers: list[str | None] = []
            for item_id, task in zip(ids, tasks, strict=True):
                item, path, before = self._plain.pop(item_id)
                notes = _last_guard(functools.partial(_end_move, self.ctx, item_id, path, before, "completed",
                                                      by=self.by, reason=None))
                self.running.pop(item_id, None)  # its slot is free
                self.scheduler.finished(item_id, ok=True)
                self._record_end(item, task, ItemEnd(True, notes), [], None)  # (logged before what it lets start)
                answers.append("; ".join(notes) or None)
            if not self._starting:
                self._start_plain_now()
        self._changed()
        return answers

    def _start_plain_now(self) -> None:
        """Claim and start the next best-ranked items while slots are free, on the event loop, with the
        queue's lock held (``follow_up_now``): plain items only, and only while nothing holds the run's
        starts. The first item this cannot start so (a worktree, an agent, retries, upstream output to
        assemble in a worker thread) waits at the front for the run's next turn, which starts it."""
        registry, config = self.ctx.registry, self.ctx.config
        check = registry.settings.admission
        if self.held is not None or self._retry or self._agent_wait or self.preparing:
            return  # the turn decides those (and says why a start is held)
        while len(self.running) < self.options.max_parallel and self.state == "running":
            if not registry.has_room() or (check is not None and check()):
                return  # the turn holds the start, saying why
            batch = self.scheduler.start_next(1)
            if not batch:
                return
            item = self.graph.by_id[batch[0]]
            try:
                ready = prepare_launch_now(self.ctx, self.graph, item, by=self.by) \
                    if runs_plainly(config, item) else None
            except Exception as exc:  # (no runner...)
                self._not_started(item, exc)
                continue
            if ready is None:
                self._retry.insert(0, item.id)
                return
            try:
                path, before = ready.claim(ensure=False)  # (the lock held: the runs directory is there)
            except Exception as exc:  # taken by another claimant, a full disk...
                self._not_started(item, exc)
                continue
            self._plain[item.id] = (item, path, before)
            try:
                task = launch_plain_now(self.ctx, self.graph, ready, path, finish_with=self)
            except Exception as exc:
                del self._plain[item.id]
                self._not_started(item, exc)
                continue
            self._started(item, task, None)

    def _not_started(self, item: WorkItem, exc: Exception) -> None:
        """An item that could not start: followed (claimed elsewhere), held (at the cap), or failed."""
        if isinstance(exc, ClaimLost):
            self._follow(item.id, str(exc))
        elif isinstance(exc, NotStarted):
            self._record(item, "not_started", reason=self.stop_reason or "the run was stopped")
        elif isinstance(exc, ResourceLimitError) and not self.ctx.registry.has_room():
            self._retry.insert(0, item.id)  # the cap filled between our check and the start: hold, retry
        else:  # bad strings for the process, no runner, a full disk, shutting down...
            self._could_not_start(item, exc)

    def _started(self, item: WorkItem, task: Task, isolated: Isolated | None) -> None:
        item_id = item.id
        if self.first_start is None:
            self.first_start = task.record.started_at or time.time()
        self.running[item_id] = _Slot(item, task, isolated, is_agent_item(self.ctx.config, item))
        if any(d in self._member_set for d in self.graph.unblocks.get(item_id, ())):  # read by a later item
            self._pinned.append(task)
            self.ctx.registry.pin([task])
        self._write(f"started {item.id_str} ({item.title}) as task {task.record.task_id}")
        if missing := missing_upstream(self.ctx.registry, self.graph, self.graph.waits_on.get(item_id, ())):
            self._write(f"  {item.id_str} is not handed the output of {first_few(missing, 5)}: not kept by this "
                        f"server (completed by hand or elsewhere, or pruned); {UPSTREAM_MISSING_VAR} names them")
        if self._cancelled and self._tg is not None:  # cancelled while it was starting
            self._tg.start_soon(self.ctx.registry.cancel, task, ITS_RUN_CANCELLED)
        self._changed()

    def _could_not_start(self, item: WorkItem, exc: Exception) -> None:
        self._record(item, "failed", reason=f"could not start: {exception_reason(exc)}")
        self._write(f"FAILED {item.id_str} ({item.title}): could not start: {exception_reason(exc)}")
        self._failure(item.id)

    def _on_end(self, item_id: int, task: Task, end: ItemEnd) -> None:
        self._finished.append((item_id, task, end))
        self._changed()

    def _on_completed(self, item_id: int) -> None:
        """Its process completed and its file is about to move: free the slot now (``_collect``)."""
        self._completed.append(item_id)
        self._changed()

    # -- items another claimant holds
    def _follow(self, item_id: int, why: str) -> None:
        """Follow an item someone else claimed until it leaves in_progress (see the class docstring)."""
        self.watching[item_id] = why
        self._write(f"{self.graph.label(item_id)}: {why}; following it")
        assert self._tg is not None
        self._tg.start_soon(self._watch, item_id)

    async def _watch(self, item_id: int) -> None:
        queue_dir, runs_dir = self.ctx.queue_dir, self.ctx.runs_dir
        interval = self.ctx.registry.settings.admission_retry_s
        where = await anyio.to_thread.run_sync(lambda: _locate(queue_dir, runs_dir, item_id))
        while where.live:
            self.watching[item_id] = f"in progress, claimed by {where.by}"
            await anyio.sleep(interval)
            if not await anyio.to_thread.run_sync(where.still_there):
                where = await anyio.to_thread.run_sync(lambda: _locate(queue_dir, runs_dir, item_id))
        self._watched.append((item_id, where))
        self._changed()

    def _settle(self, item_id: int, where: _Where) -> None:
        """Act on where an item held elsewhere went."""
        self.watching.pop(item_id, None)
        member = item_id in self._member_set
        label = self.graph.label(item_id)
        item = self.graph.by_id.get(item_id)
        if where.status == "pending" and member:  # given back: try to claim it ourselves
            self._retry.append(item_id)
            return
        if where.status == "completed":
            what = f"claimed by {where.by}, where it completed"
        elif where.status in ("failed", "blocked"):
            what = f"claimed by {where.by}, where it ended {where.status}"
        elif where.status is None:
            what = f"claimed elsewhere, then its file went away ({where.by})"
        else:
            what = (f"{where.status} ({where.by}); this run does not wait for it: only a live run or launch_task "
                    "claim is followed")
        self._write(f"{label}: {what}")
        if member and item is not None:
            self._record(item, "claimed_elsewhere", reason=what)
        if where.status == "completed":
            self.scheduler.finished(item_id, ok=True)
        elif where.status in ("failed", "blocked"):
            self._failure(item_id, f" ({what})")
        else:  # stays "running" for the scheduler: what waits on it or conflicts with it does not start
            self._elsewhere[item_id] = what

    # -- ends
    async def _collect(self) -> None:
        """Take in ended items and items settled elsewhere; the failed ones' last lines are read off the loop."""
        watched, self._watched = self._watched, []
        for item_id, where in watched:
            self._settle(item_id, where)
        completed, self._completed = self._completed, []
        for item_id in completed:  # what waits on it may start; its outcome comes with its end (below)
            self._released[item_id] = self.running.pop(item_id, None)
            self.scheduler.finished(item_id, ok=True)
        finished, self._finished = self._finished, []
        if not finished:
            return
        tails: list[list[str]] = [[] for _ in finished]  # a completed item shows no lines: no thread needed
        if any(task.record.status != TaskStatus.COMPLETED for _, task, _ in finished):
            tails = await anyio.to_thread.run_sync(lambda: [self._last_lines(task) for _, task, _ in finished])
        integrated = False
        for (item_id, task, end), lines in zip(finished, tails, strict=True):
            released = item_id in self._released
            slot = self._released.pop(item_id) if released else self.running.pop(item_id, None)
            item = slot.item if slot else self.graph.by_id[item_id]
            isolated = slot.isolated if slot else None
            self._record_end(item, task, end, lines, isolated)
            ok = end.ok
            integrated |= ok and isolated is not None
            if released:
                pass  # the scheduler heard of it when it completed
            elif ok:
                self.scheduler.finished(item_id, ok=True)
            else:
                self._failure(item_id)
        running = [s.isolated for s in self.running.values() if s.isolated is not None]
        if integrated and running and self._tg is not None:  # the target moved: what would conflict now?
            self._tg.start_soon(self._forecast, running)

    def _record_end(self, item: WorkItem, task: Task, end: ItemEnd, lines: list[str], isolated: Isolated | None) -> None:
        """An ended item's outcome, and its line in the run's log."""
        rec = task.record
        self.last_end = max(self.last_end or 0.0, rec.ended_at or time.time())
        if rec.started_at is not None:
            self._first_started = min(self._first_started or rec.started_at, rec.started_at)
        ok = end.ok
        reason = None if ok else (end.reason or rec.reason)
        self._record(item, "completed" if ok else "failed", task_id=rec.task_id, exit_code=rec.exit_code,
                     reason=reason, duration_s=rec.duration_s, last_lines=lines,
                     notes=end.notes, started_at=rec.started_at, ended_at=rec.ended_at,
                     usage=end.usage, attempts=end.attempts, **_isolation_fields(isolated))
        self._write(f"{'completed' if ok else 'FAILED'} {item.id_str} ({item.title})"
                    + ("" if ok else f": {reason}"))

    async def _forecast(self, running: list[Isolated]) -> None:
        """Predicted conflicts of the running isolated items with the target as it is now (shown in
        progress); a forecast that fails only leaves the previous one in place."""
        try:
            await forecast(self.ctx.root, running[0].lease.target, running)
        except Exception as exc:
            log.warning("run %s: could not forecast conflicts: %s", self.run_id, exc)
            return
        self._changed()

    def _last_lines(self, task: Task) -> list[str]:
        """A failed item's last lines (sync: in a worker thread); none for a completed one."""
        if task.record.status == TaskStatus.COMPLETED:
            return []
        try:
            return self.ctx.registry.read_output(task, cursor=None, max_bytes=4096, tail_lines=LAST_LINES,
                                                 pattern=None).text.splitlines()
        except OSError as exc:
            return [f"(its output could not be read: {exception_reason(exc)})"]

    def _failure(self, item_id: int, where: str = "") -> None:
        """An item failed (here, or elsewhere as ``where`` says): skip what waits on it; maybe stop."""
        label = self.graph.label(item_id)
        for node in self.scheduler.finished(item_id, ok=False):
            self._record(self.graph.by_id[node], "skipped", waited_on=label, reason=f"waits on {label}, which failed{where}")
        if self.options.stops_on_first_failure and self.state == "running":
            policy = (f"level {self.options.level} stops on the first failure" if self.options.level != "L3"
                      else "continue_on_error is off")
            self._stop(f"item {label} failed and {policy}; running items were left to finish")

    def _stop(self, reason: str) -> None:
        if self.state == "running":
            self.state = "stopping"
            self.stop_reason = reason
            self._write(f"stopping: {reason}")
            self._changed()

    def _record(self, item: WorkItem, outcome: str, **fields: object) -> None:
        self.outcomes[item.id] = ItemOutcome(item=item.id_str, title=item.title, outcome=outcome, **fields)
        self._by_id = None

    @property
    def changed(self) -> anyio.Event:
        """An event set at the run's next change (a start, an end, a hold): take it, look, then wait."""
        if self._change.is_set():  # a new one only when one is asked for: a turn makes several changes
            self._change = anyio.Event()
        return self._change

    def _changed(self) -> None:
        self._change.set()

    async def _finalize(self) -> None:
        """Give every item of the run an outcome; the run succeeds only if every one of them completed
        (here or elsewhere): items that never ran are reported, never passed over."""
        for item_id, who in self.watching.items():
            if item_id in self._member_set and item_id not in self.outcomes:
                self._record(self.graph.by_id[item_id], "claimed_elsewhere",
                             reason=f"{who}; still in progress there when this run ended")
        for item_id in self._retry + self._agent_wait:
            if item_id not in self.outcomes:
                self._record(self.graph.by_id[item_id], "not_started",
                             reason=self.stop_reason or "its start was held when the run ended")
        for item_id in self.scheduler.not_started():
            if item_id not in self.outcomes:
                item = self.graph.by_id[item_id]
                waits = [self.graph.label(d) + (f" ({note})" if (note := self._elsewhere.get(d) or self.watching.get(d)) else "")
                         for d in self.graph.waits_on.get(item_id, []) if d not in self.scheduler.done]
                why = self.stop_reason or (f"waits on {', '.join(waits)}" if waits else "never became ready")
                self._record(item, "not_started", reason=why)
        all_done = all(item_id in self.scheduler.done for item_id in self.members)
        self._write(self.report_text())
        progress = self.progress()
        try:
            await anyio.to_thread.run_sync(lambda: save_report(self.ctx.runs_dir, progress))
        except OSError as exc:
            self._write(f"could not save the run report: {exception_reason(exc)}")
        self._exit = ExitInfo(0 if all_done else 1, None)
        self._changed()

    # -- views
    def finished_count(self) -> int:
        """How many of the run's items have an outcome (all of them once it finished): O(1), for
        progress notifications, which need the count far more often than the whole ``progress()``."""
        if self.state == "finished":
            return len(self.members)
        return min(len(self.outcomes), len(self.members))

    def progress(self) -> RunProgress:
        counts: dict[str, int] = {"running": len(self.running) + len(self.preparing)  # preparing: claimed, in setup
                                  + len(self._released)}  # released: moving its file
        for outcome in self.outcomes.values():
            counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
        if self.state != "finished":
            elsewhere = sum(1 for i in self.watching if i in self._member_set and i not in self.outcomes)
            counts["waiting"] = len(self.scheduler.not_started()) + len(self._retry) + len(self._agent_wait) + elsewhere
        now = time.time()
        return RunProgress(
            run_id=self.run_id, level=self.options.level, continue_on_error=self.options.continue_on_error,
            max_parallel=self.options.max_parallel, state=self.state, elapsed_s=round(now - self.started, 3),
            counts=counts, held=self.held, stop_reason=self.stop_reason,
            running=[RunningItem(item=s.item.id_str, title=s.item.title, task_id=s.task.record.task_id,
                                 elapsed_s=round(now - (s.task.record.started_at or now), 3),
                                 usage=job.usage() if (job := s.job()) else None,
                                 waiting=job.waiting if job else None, **_isolation_fields(s.isolated))
                     for s in self.running.values()]
            + [RunningItem(item=p.item.id_str, title=p.item.title, task_id=None, elapsed_s=round(now - p.since, 3),
                           phase="setup") for p in self.preparing.values()],
            predicted_makespan=self.predicted, lower_bound=self.lower_bound, unestimated=self.unestimated,
            makespan=round(self.last_end - first, 3) if (first := self._first_started or self.first_start)
            and self.last_end else None,
            outcomes=self._sorted_outcomes(), usage=self.usage(),
        )

    def _sorted_outcomes(self) -> list[ItemOutcome]:
        """The outcomes by item id, sorted once per change (progress is asked far more often)."""
        if self._by_id is None:
            self._by_id = [outcome for _, outcome in sorted(self.outcomes.items())]
        return list(self._by_id)

    def report_text(self) -> str:
        p = self.progress()
        lines = [f"run {self.run_id} finished: {p.counts_text()}"]
        for o in p.outcomes:
            extra = f" (exit {o.exit_code})" if o.exit_code not in (None, 0) else ""
            why = f": {o.reason}" if o.reason else ""
            lines.append(f"  {o.outcome:<17} {o.item} {o.title}{extra}{why}")
            if o.usage is not None:
                lines.append(f"      {o.usage.agent or 'agent'}: {o.usage.short()}"
                             + (f", session {o.usage.session_id}" if o.usage.session_id else ""))
            elif o.attempts and o.attempts > 1:
                lines.append(f"      {o.attempts} attempts")
            lines.extend(f"      | {line}" for line in o.last_lines)
        if p.usage is not None:
            lines.append(f"agents in all: {p.usage.short()}")
        if p.stop_reason:
            lines.append(f"stopped: {p.stop_reason}")
        if (makespan := p.makespan_text(lambda s: f"{s:.1f}s")) is not None:
            lines.append(makespan)
        return "\n".join(lines)

    def _write(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        try:
            self.log.write(f"{stamp} {line}\n".encode())
        except OSError:
            pass


def report_path(runs_dir: Path, run_id: str) -> Path:
    return runs_dir / f"{run_id}.report.json"


def save_report(runs_dir: Path, progress: RunProgress) -> None:
    """Keep a finished run's report next to its record (for `agent-parallel report` and restarts),
    durably like a final task record: it is written once, when the run ends."""
    write_atomic(report_path(runs_dir, progress.run_id), progress.model_dump_json().encode(), durable=True)


def load_report(runs_dir: Path, run_id: str) -> RunProgress | None:
    try:
        return RunProgress.model_validate_json(read_regular(report_path(runs_dir, run_id), MAX_REPORT_BYTES))
    except (OSError, ValueError):  # absent, or not ours (a symlink planted there is never followed)
        return None
