"""Carrying out queue items: claim, run through the task registry, move the file when done.

``launch_item`` runs one ready item (``launch_task(item=...)``). ``QueueRun`` is ``run_queue``: it
keeps up to ``max_parallel`` items going, starting the best-ranked ready, non-conflicting item the
moment a slot frees, until nothing is ready; the error policy follows the autonomy level. A run is
itself a task in the registry (its "process" is this loop), so ``task_output``, ``cancel_task``
and ``list_tasks`` work on it as on any task.

Item fields never reach a shell line or an argv: an item's own ``command`` is run as written;
for the configured runner, the item's markdown is its stdin and id, file and title are in
``AGENT_ITEM_ID``, ``AGENT_ITEM_FILE`` and ``AGENT_ITEM_TITLE``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from .claims import ClaimLost, move_item, parse_item_id, release_claim, release_stale_claims
from .config import MAX_PARALLEL_RANGE, Config, stops_on_first_failure
from .errors import AgentParallelError, QueueError
from .paths import resolve_inside
from .planner import QueueGraph, Scheduler, build_graph, lower_bound_ms, simulate
from .queue import QueueReader, WorkItem, format_id
from .results import ItemOutcome, RunningItem, RunProgress
from .runner.executor import ExitInfo, LaunchSpec
from .runner.logs import LogWriter
from .runner.records import TaskStatus
from .runner.registry import Task, TaskRegistry

LAST_LINES = 10


@dataclass
class QueueContext:
    """What running the queue needs: where things are, the settings, the registry."""

    root: Path
    runs_dir: Path
    config: Config
    registry: TaskRegistry
    reader: QueueReader

    @property
    def queue_dir(self) -> Path:
        return resolve_inside(self.root, self.config.queue_dir, "queue.dir in .agent/config.yaml")

    def graph(self, *, only: list[int] | None = None) -> QueueGraph:
        """The queue as a graph; with ``only``, just those items and the pending items they need."""
        items, diagnostics = self.reader.read(self.root, self.queue_dir)
        graph = build_graph(items, diagnostics)
        if only is None:
            return graph
        members = set(Scheduler(graph, only=only).not_started())
        return build_graph([i for i in items if i.status != "pending" or i.id in members], diagnostics)


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


async def launch_item(ctx: QueueContext, graph: QueueGraph, item: WorkItem, *, by: str,
                      on_end: Callable[[Task, list[str]], None] | None = None) -> Task:
    """Claim ``item`` (pending → in_progress) and start it; when it ends, move it to completed/failed."""
    argv, timeout_s = _how_to_run(ctx.config, item)
    queue_dir = ctx.queue_dir
    path = await anyio.to_thread.run_sync(
        lambda: move_item(queue_dir, ctx.runs_dir, item.id, "in_progress", by=by, expect="pending", owned=True,
                          known=queue_dir / item.file))
    before = _file_state(path)
    env = {"AGENT_ITEM_ID": item.id_str, "AGENT_ITEM_FILE": str(path), "AGENT_ITEM_TITLE": item.title}
    waits_on = graph.waits_on.get(item.id, item.blocked_by)  # its blocked_by and others' `blocks`
    upstream = [t for dep in waits_on if (t := _latest_item_task(ctx.registry, format_id(dep)))]
    if waits_on:
        env["AGENT_UPSTREAM_ITEMS"] = " ".join(format_id(dep) for dep in waits_on)
    if upstream:
        env["AGENT_UPSTREAM_LOGS"] = os.pathsep.join(str(ctx.runs_dir / f"{t.record.task_id}.log") for t in upstream)

    def finished(task: Task) -> None:
        ok = task.record.status == TaskStatus.COMPLETED
        notes = _item_file_notes(path, before)
        try:
            move_item(queue_dir, ctx.runs_dir, item.id, "completed" if ok else "failed", by=by,
                      reason=task.record.reason, expect="in_progress", known=path)
        except QueueError as exc:
            notes.append(f"its status could not be recorded in the queue: {exc}")
        if notes:
            note = "; ".join(notes)
            task.record.reason = f"{task.record.reason}; {note}" if task.record.reason else note
        if on_end is not None:
            on_end(task, notes)

    try:
        return await ctx.registry.launch(
            command=item.command, argv=argv, cwd=ctx.root, description=f"item {item.id_str}: {item.title}",
            env=env, timeout_s=timeout_s, kind="item", item_id=item.id_str, item_file=path.name,
            stdin_path=path if argv else None, on_finish=finished)
    except Exception:
        # not started (a cap was reached...): give the claim back so the item is not stuck
        await anyio.to_thread.run_sync(lambda: release_claim(queue_dir, ctx.runs_dir, item.id, by=by,
                                                             reason="could not start", known=path))
        raise


def _how_to_run(config: Config, item: WorkItem) -> tuple[list[str] | None, float | None]:
    if item.command is not None:
        return None, item.timeout_s
    if config.runner_command:
        return list(config.runner_command), item.timeout_s or config.runner_timeout_s
    raise QueueError(f"item {item.id_str} has no `command` and no runner is configured; set runner.command in "
                     ".agent/config.yaml (e.g. [\"claude\", \"-p\"]), or carry the item out yourself and "
                     "record it with update_item")


def _latest_item_task(registry: TaskRegistry, item_id: str) -> Task | None:
    for task in registry.newest_first():
        if task.record.item_id == item_id and task.record.kind == "item" and task.record.status == TaskStatus.COMPLETED:
            return task
    return None


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
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


# ---------------------------------------------------------------------------------- a run


@dataclass
class RunOptions:
    level: str
    continue_on_error: bool
    max_parallel: int
    only: list[int] | None = None

    @property
    def stops_on_first_failure(self) -> bool:
        return self.level != "L3" or not self.continue_on_error


@dataclass
class _Slot:
    item: WorkItem
    task: Task


async def start_run(ctx: QueueContext, *, max_parallel: int | None = None, level: str | None = None,
                    continue_on_error: bool | None = None, items: list[str] | None = None) -> tuple[Task, list[str]]:
    """Start a queue run in the registry; arguments left None come from the config.

    Returns the run's task (its ``handle`` is the ``QueueRun``) and warnings for the caller.
    """
    config = ctx.config
    warnings: list[str] = []
    parallel = config.max_parallel if max_parallel is None else max_parallel
    low, high = MAX_PARALLEL_RANGE
    if not low <= parallel <= high:
        warnings.append(f"max_parallel {parallel} is outside {low}..{high}; using {min(max(parallel, low), high)}")
        parallel = min(max(parallel, low), high)
    chosen_level = level or config.level
    coe = config.continue_on_error if continue_on_error is None else continue_on_error
    if coe and chosen_level != "L3":
        warnings.append(f"continue_on_error applies at L3 only; level {chosen_level} stops at the first failure")
    only = [parse_item_id(i) for i in items] if items is not None else None
    if only is not None:
        graph = await anyio.to_thread.run_sync(ctx.graph)
        missing = [format_id(i) for i in only if i not in graph.by_id]
        if missing:
            raise QueueError(f"no queue item has id {', '.join(missing)}; call queue_plan to see the items")
    released = await anyio.to_thread.run_sync(lambda: release_stale_claims(ctx.queue_dir, ctx.runs_dir))
    warnings += [f"item {item} ({file}) was {message}" for item, file, message in released]
    options = RunOptions(level=chosen_level, continue_on_error=not stops_on_first_failure(chosen_level, coe), max_parallel=parallel, only=only)
    command = f"run_queue level={chosen_level} max_parallel={parallel}" + (f" items={','.join(items or [])}" if only else "")
    task = await ctx.registry.launch(command=command, cwd=ctx.root, description="queue run", kind="run",
                                     executor=QueueRunExecutor(ctx, options))
    return task, warnings


class QueueRunExecutor:
    """Starts a ``QueueRun`` where the registry expects a process: the run is the task's body."""

    def __init__(self, ctx: QueueContext, options: RunOptions) -> None:
        self.ctx, self.options = ctx, options

    async def start(self, spec: LaunchSpec, log: LogWriter) -> QueueRun:
        graph = await anyio.to_thread.run_sync(lambda: self.ctx.graph(only=self.options.only))
        return QueueRun(self.ctx, self.options, spec.task_id, log, graph)

    def close(self) -> None:
        pass


class QueueRun:
    """One ``run_queue``: the scheduling loop, its progress and its report (a ``TaskHandle``)."""

    pid = None
    start_time = None

    def __init__(self, ctx: QueueContext, options: RunOptions, run_id: str, log: LogWriter, graph: QueueGraph) -> None:
        self.ctx, self.options, self.run_id, self.log = ctx, options, run_id, log
        self.by = f"run {run_id}"
        self.graph = graph
        self.scheduler = Scheduler(self.graph)
        self.members = self.scheduler.not_started()  # the pending items this run considers, best first
        self.predicted = simulate(self.graph, options.max_parallel).makespan_ms / 1000
        self.lower_bound = lower_bound_ms(self.graph, options.max_parallel) / 1000
        self.started = time.time()
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.running: dict[int, _Slot] = {}
        self.outcomes: dict[int, ItemOutcome] = {}
        self.changed = anyio.Event()  # set (and replaced) on every start and end: progress waiters use it
        self.state = "running"
        self.stop_reason: str | None = None
        self.held: str | None = None
        self._finished: list[tuple[int, Task, list[str]]] = []
        self._exit: ExitInfo | None = None
        self._write(f"run {run_id}: level {options.level}, continue_on_error {options.continue_on_error}, "
                    f"max_parallel {options.max_parallel}; predicted makespan {self.predicted:.1f}s, "
                    f"lower bound {self.lower_bound:.1f}s")

    # -- TaskHandle
    async def wait(self) -> ExitInfo:
        if self._exit is None:
            await self._loop()
        assert self._exit is not None
        return self._exit

    async def terminate(self, grace: float) -> None:
        """Stop the run: start nothing new and cancel the items that are running."""
        self._stop("the run was cancelled")
        async with anyio.create_task_group() as tg:
            for slot in list(self.running.values()):
                tg.start_soon(self.ctx.registry.cancel, slot.task)

    # -- the loop
    async def _loop(self) -> None:
        while True:
            # Take the event before looking at anything: an item ending while we collect or start
            # others sets this very event, so the wait below returns at once instead of missing it.
            wake = self.changed
            self._collect_finished()
            started = await self._start_what_fits() if self.state == "running" else False
            if not self.running and not started and (self.state != "running" or self.held is None):
                break  # nothing running, and nothing can start: either all done, or stuck behind others' work
            with anyio.move_on_after(self.ctx.registry.settings.admission_retry_s if self.held else math.inf):
                await wake.wait()
        self.state = "finished"
        self._finalize()

    async def _start_what_fits(self) -> bool:
        """Start the best-ranked ready items while slots are free and the machine allows it."""
        check = self.ctx.registry.settings.admission
        started = False
        while len(self.running) < self.options.max_parallel and self.state == "running":
            if check is not None and (why := check()):
                if self.held != why:
                    self._write(f"start held: {why}")
                self.held = why
                return started
            self.held = None
            batch = self.scheduler.start_next(1)
            if not batch:
                break
            started = await self._start(batch[0]) or started
        return started

    async def _start(self, item_id: int) -> bool:
        item = self.graph.by_id[item_id]
        try:
            task = await launch_item(self.ctx, self.graph, item, by=self.by,
                                     on_end=lambda t, notes, i=item_id: self._on_end(i, t, notes))
        except ClaimLost as exc:
            self._record(item, "claimed_elsewhere", reason=str(exc))
            self._skip_dependents(item_id, f"{item.id_str} was claimed by someone else")
            return False
        except AgentParallelError as exc:  # no runner, a cap reached, the server shutting down...
            self._record(item, "failed", reason=f"could not start: {exc}")
            self._failure(item_id, item)
            return False
        if self.first_start is None:
            self.first_start = task.record.started_at or time.time()
        self.running[item_id] = _Slot(item, task)
        self._write(f"started {item.id_str} ({item.title}) as task {task.record.task_id}")
        self._changed()
        return True

    def _on_end(self, item_id: int, task: Task, notes: list[str]) -> None:
        self._finished.append((item_id, task, notes))
        self._changed()

    def _collect_finished(self) -> None:
        finished, self._finished = self._finished, []
        for item_id, task, notes in finished:
            slot = self.running.pop(item_id, None)
            item = slot.item if slot else self.graph.by_id[item_id]
            rec = task.record
            self.last_end = max(self.last_end or 0.0, rec.ended_at or time.time())
            lines = self.ctx.registry.read_output(task, cursor=None, max_bytes=4096, tail_lines=LAST_LINES,
                                                  pattern=None).text.splitlines()
            ok = rec.status == TaskStatus.COMPLETED
            self._record(item, "completed" if ok else "failed", task_id=rec.task_id, exit_code=rec.exit_code,
                         reason=None if ok else rec.reason, duration_s=rec.duration_s, last_lines=[] if ok else lines,
                         notes=notes, started_at=rec.started_at, ended_at=rec.ended_at)
            self._write(f"{'completed' if ok else 'FAILED'} {item.id_str} ({item.title})"
                        + ("" if ok else f": {rec.reason}"))
            if ok:
                self.scheduler.finished(item_id, ok=True)
            else:
                self._failure(item_id, item)

    def _failure(self, item_id: int, item: WorkItem) -> None:
        skipped = self.scheduler.finished(item_id, ok=False)
        for node in skipped:
            other = self.graph.by_id[node]
            self._record(other, "skipped", waited_on=item.id_str,
                         reason=f"waits on {item.id_str}, which failed")
        if self.options.stops_on_first_failure and self.state == "running":
            policy = (f"level {self.options.level} stops on the first failure" if self.options.level != "L3"
                      else "continue_on_error is off")
            self._stop(f"item {item.id_str} failed and {policy}; running items were left to finish")

    def _skip_dependents(self, item_id: int, why: str) -> None:
        for node in self.scheduler.finished(item_id, ok=False):
            self._record(self.graph.by_id[node], "skipped", waited_on=format_id(item_id), reason=why)

    def _stop(self, reason: str) -> None:
        if self.state == "running":
            self.state = "stopping"
            self.stop_reason = reason
            self._write(f"stopping: {reason}")
            self._changed()

    def _record(self, item: WorkItem, outcome: str, **fields: object) -> None:
        self.outcomes[item.id] = ItemOutcome(item=item.id_str, title=item.title, outcome=outcome, **fields)  # type: ignore[arg-type]

    def _changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def _finalize(self) -> None:
        for item_id in self.scheduler.not_started():
            if item_id not in self.outcomes:
                item = self.graph.by_id[item_id]
                waits = [format_id(d) for d in self.graph.waits_on.get(item_id, [])
                         if d not in self.scheduler.done]
                why = self.stop_reason or (f"waits on {', '.join(waits)}" if waits else "never became ready")
                self._record(item, "not_started", reason=why)
        failed = [o for o in self.outcomes.values() if o.outcome in ("failed",)]
        self._write(self.report_text())
        try:
            save_report(self.ctx.runs_dir, self.progress())
        except OSError as exc:
            self._write(f"could not save the run report: {exc.strerror or exc}")
        self._exit = ExitInfo(1 if failed else 0, None)
        self._changed()

    # -- views
    def progress(self) -> RunProgress:
        counts: dict[str, int] = {"running": len(self.running)}
        for outcome in self.outcomes.values():
            counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
        if self.state != "finished":
            counts["waiting"] = len(self.scheduler.not_started())
        now = time.time()
        return RunProgress(
            run_id=self.run_id, level=self.options.level, continue_on_error=self.options.continue_on_error,
            max_parallel=self.options.max_parallel, state=self.state, elapsed_s=round(now - self.started, 3),
            counts=counts, held=self.held, stop_reason=self.stop_reason,
            running=[RunningItem(item=s.item.id_str, title=s.item.title, task_id=s.task.record.task_id,
                                 elapsed_s=round(now - (s.task.record.started_at or now), 3))
                     for s in self.running.values()],
            predicted_makespan=self.predicted, lower_bound=self.lower_bound,
            makespan=round(self.last_end - self.first_start, 3) if self.first_start and self.last_end else None,
            outcomes=sorted(self.outcomes.values(), key=lambda o: int(o.item)),
        )

    def report_text(self) -> str:
        p = self.progress()
        lines = [f"run {self.run_id} finished: " + ", ".join(f"{n} {k}" for k, n in sorted(p.counts.items()) if n)]
        for o in p.outcomes:
            extra = f" (exit {o.exit_code})" if o.exit_code not in (None, 0) else ""
            why = f": {o.reason}" if o.reason else ""
            lines.append(f"  {o.outcome:<17} {o.item} {o.title}{extra}{why}")
            lines.extend(f"      | {line}" for line in o.last_lines)
        if p.makespan is not None:
            ratio = f" ({p.makespan / p.lower_bound:.2f}x)" if p.lower_bound else ""
            lines.append(f"makespan {p.makespan:.1f}s vs lower bound {p.lower_bound:.1f}s{ratio}")
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
    """Keep a finished run's report next to its record (for `agent-parallel report` and restarts)."""
    path = report_path(runs_dir, progress.run_id)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(progress.model_dump_json())
    os.replace(tmp, path)


def load_report(runs_dir: Path, run_id: str) -> RunProgress | None:
    try:
        return RunProgress.model_validate_json(report_path(runs_dir, run_id).read_bytes())
    except (OSError, ValueError):
        return None


__all__ = ["load_report", "save_report", "QueueContext", "QueueRun", "QueueRunExecutor", "RunOptions", "check_ready", "launch_item"]
