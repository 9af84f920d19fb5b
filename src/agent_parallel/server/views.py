"""How a task looks to a client: ``view_task`` (state, a page of output and a run's progress) and
the progress notifications sent while ``task_output`` waits on queue runs."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, overload

import anyio
from mcp.server.mcpserver import Context

from .output_filter import OutputFilter
from ..queue.run import load_report, run_of
from ..agents.job import ItemJob
from ..results import AgentUsage, RunProgress, TaskEntry, TaskView, status_counts, usage_from
from ..tasks.registry import Task, TaskRegistry, wait_any
from .settings import Workspace

PROGRESS_INTERVAL_S = 0.15
"""Least time between two progress notifications of one wait: a run of 300 trivial items ends one
every few milliseconds, and a notification per item (each a JSON message the client must read)
cost more than the items. The latest progress is always sent, at the end or when the wait times out."""

MAX_RUN_ITEMS_SHOWN = 100
"""A run's items listed in one answer: run_queue's `items`, a task_output's outcomes (``RunProgress.shown``);
like a page of ``queue_plan``."""

Report = Callable[[float, float | None, str | None], Awaitable[None]]


async def wait_reporting_progress(ws: Workspace, tasks: list[Task], mode: str, timeout: float, ctx: Context) -> bool:
    """Wait like ``registry.wait``, reporting progress as MCP progress notifications (a no-op unless
    the client asked for them): a queue run's items (``wait_with_progress``), or how many of several
    tasks waited for all have finished (``wait_counting``: a fan-out's members, ``task_ids``; a wait for
    any one of them ends at the first)."""
    if mode == "all" and len(tasks) > 1 and not any(run_of(t) is not None for t in tasks):
        return await wait_counting(ws.registry, tasks, timeout, ctx.report_progress)
    return await wait_with_progress(ws.registry, tasks, mode, timeout, ctx.report_progress)


async def wait_counting(registry: TaskRegistry, tasks: list[Task], timeout: float, report: Report,
                        *, interval: float | None = None) -> bool:
    """Wait like ``registry.wait`` for all of several tasks, reporting how many have finished out of
    all, and how they ended ("12 of 40 finished: 1 failed, 11 completed"): at most once per
    ``interval`` (default ``PROGRESS_INTERVAL_S``), only when the count grew, and the latest before
    returning. An agent waiting on 300 test shards (Claude Code shows a call's progress) sees them go
    by; each interval waits in turn only on the tasks not done yet, so a long wait costs no more than one."""
    interval = PROGRESS_INTERVAL_S if interval is None else interval
    deadline = anyio.current_time() + timeout
    sent = 0

    async def send_if_grew() -> None:
        nonlocal sent
        ended = [t.record.status for t in tasks if t.done.is_set()]
        if len(ended) > sent:
            sent = len(ended)
            how = ", ".join(f"{n} {status}" for status, n in status_counts(ended).items())
            await report(sent, len(tasks), f"{sent} of {len(tasks)} finished: {how}")

    while pending := [t for t in tasks if not t.done.is_set()]:
        left = deadline - anyio.current_time()
        if left <= 0:
            with anyio.CancelScope(shield=True):  # timed out: the client still gets the latest count
                await send_if_grew()
            return False
        await registry.wait(pending, mode="all", timeout=min(interval, left))
        await send_if_grew()
    await send_if_grew()
    return True


async def wait_with_progress(registry: TaskRegistry, tasks: list[Task], mode: str, timeout: float, report: Report,
                             *, interval: float | None = None) -> bool:
    """Wait like ``registry.wait``; while queue runs are among the tasks, ``report`` their progress.

    Progress is the runs' items that have finished out of all their items (the total is fixed
    when a run starts), sent only when it grew: it strictly increases, as clients expect. At most
    one report per ``interval`` (default ``PROGRESS_INTERVAL_S``): between two, the wait sleeps
    through the runs' changes (only a task ending wakes it) and counts nothing; the latest count is
    always reported before returning.
    """
    interval = PROGRESS_INTERVAL_S if interval is None else interval
    runs = [run for t in tasks if (run := run_of(t)) is not None]
    if not runs:
        return await registry.wait(tasks, mode=mode, timeout=timeout)
    total = sum(len(run.members) for run in runs)
    sent = -1

    async def send(finished: int) -> None:
        nonlocal sent
        message = "; ".join(f"run {run.run_id}: {run.progress().counts_text()}" for run in runs)
        await report(finished, total, message)
        sent = finished

    with anyio.move_on_after(timeout):
        while True:
            done = _all_or_any_done(tasks, mode)
            finished = sum(run.finished_count() for run in runs)
            if total and finished > sent:
                await send(finished)
                if not done:  # the next report waits out the interval; a task ending cuts it short
                    with anyio.move_on_after(interval):
                        await wait_any(_unset([t.done for t in tasks]))
                    continue
            if done:
                return True
            await wait_any([run.changed for run in runs] + _unset([t.done for t in tasks]))
    if total and (finished := sum(run.finished_count() for run in runs)) > sent:
        with anyio.CancelScope(shield=True):  # timed out with progress unsent: the client still gets the latest
            await send(finished)
    return False


def _unset(events: list[anyio.Event]) -> list[anyio.Event]:
    """The events not set yet: waiting on a set one returns at once (with ``wait="all"``, a task
    that ended first made the wait spin until the others ended)."""
    return [e for e in events if not e.is_set()]


def _all_or_any_done(tasks: list[Task], mode: str) -> bool:
    flags = [t.done.is_set() for t in tasks]
    return all(flags) if mode == "all" else any(flags)


def live_progress(tasks: list[Task]) -> dict[str, RunProgress]:
    """The progress of the live runs among ``tasks``, taken on the event loop (runs change there)."""
    return {t.record.task_id: run.progress() for t in tasks if (run := run_of(t)) is not None}


@overload
def view_task(ws: Workspace, task: Task, *, cursor: int | None, max_bytes: int, tail_lines: int | None,
              pattern: OutputFilter | None, several: Literal[False] = False,
              live_run: RunProgress | None = None) -> TaskView: ...
@overload
def view_task(ws: Workspace, task: Task, *, cursor: int | None, max_bytes: int, tail_lines: int | None,
              pattern: OutputFilter | None, several: Literal[True], live_run: RunProgress | None = None) -> TaskEntry: ...
def view_task(ws: Workspace, task: Task, *, cursor: int | None, max_bytes: int, tail_lines: int | None,
              pattern: OutputFilter | None, several: bool = False,
              live_run: RunProgress | None = None) -> TaskView | TaskEntry:
    """A task as ``task_output`` shows it: state, a page of output and, for a run, its progress.

    Reads files: call it in a worker thread, passing a live run's progress as ``live_run`` (taken
    on the event loop). ``several``: one of several tasks in an answer (a ``TaskEntry``).
    """
    chunk = ws.registry.read_output(task, cursor=cursor, max_bytes=max_bytes, tail_lines=tail_lines, pattern=pattern)
    run: RunProgress | None
    if (queue_run := run_of(task)) is not None:
        run = live_run if live_run is not None else queue_run.progress()
    else:  # a run of an earlier server, or not a run
        run = load_report(ws.registry.runs_dir, task.record.task_id) if task.record.kind == "run" else None
    if run is not None:
        run = run.shown(MAX_RUN_ITEMS_SHOWN)
    shown: dict[str, Any] = dict(usage=usage_of(task), output=chunk.text, cursor=chunk.start,
                                 next_cursor=chunk.next_cursor, output_bytes=task.output_bytes,
                                 truncated=chunk.truncated, dropped_bytes=ws.registry.dropped_bytes(task), run=run)
    return TaskEntry.of(task.record, **shown) if several else TaskView.of(task.record, **shown)


V = TypeVar("V", TaskView, TaskEntry)


def fit_pages(read: Callable[[int], list[V]], max_bytes: int, room: int) -> list[V]:
    """``read(max_bytes)`` (views of tasks, a page of output each), read again with shorter pages while the
    views' JSON passes ``room`` characters and shorter pages can bring it within.

    A page is bounded in bytes, but an answer reaches a client as JSON, where a byte can take six
    characters (a control character is written ``\\u0001``): 48 KiB of such output made an answer of
    390,000 characters, past what Claude Code shows its model whole (``tools.INLINE_ANSWER_CHARS``).
    Pages only get shorter, from where each began (or back from the end, for the most recent output);
    ``next_cursor`` goes on from where one stops, so nothing is lost. Views too many to fit whatever their
    output (a group of some 340 members and more) keep their pages: cutting them would not help."""
    views = read(max_bytes)
    for _ in range(3):  # output whose escapes are uneven may take a second look
        size = sum(len(view.model_dump_json()) + 1 for view in views)
        if size <= room:
            break
        output = sum(len(json.dumps(view.output, ensure_ascii=False)) - 2 for view in views if view.output)
        fixed = size - output
        if output == 0 or fixed >= room or max_bytes == 1:
            break
        longest = min(max_bytes, max(len(view.output) for view in views if view.output))  # (a page may end early)
        max_bytes = max(1, min(longest - 1, int(longest * (room - fixed) / output * 0.95)))
        views = read(max_bytes)
    return views


def usage_of(task: Task) -> AgentUsage | None:
    """An agent item's usage: live from its job while it runs, else as its record kept it."""
    if isinstance(task.job, ItemJob) and not task.record.is_done:
        return task.job.usage()
    return usage_from(task.record.usage)
