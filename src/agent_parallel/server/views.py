"""How a task looks to a client: ``view_task`` (state, a page of output and a run's progress) and
the progress notifications sent while ``task_output`` waits on queue runs."""

from __future__ import annotations


import anyio
from mcp.server.mcpserver import Context

from .output_filter import OutputFilter
from ..queue.run import QueueRun, load_report, run_of
from ..agents.job import ItemJob
from ..results import AgentUsage, RunProgress, TaskView, usage_from
from ..tasks.registry import Task, wait_any
from .settings import Workspace

async def wait_reporting_progress(ws: Workspace, tasks: list[Task], mode: str, timeout: float, ctx: Context) -> bool:
    """Wait like ``registry.wait``; while queue runs are among the tasks, report their progress.

    Progress is the runs' items that have finished out of all their items (the total is fixed
    when a run starts), sent only when it grew: it strictly increases, as clients expect.
    """
    runs = [run for t in tasks if (run := run_of(t)) is not None]
    if not runs:
        return await ws.registry.wait(tasks, mode=mode, timeout=timeout)
    total = sum(len(run.members) for run in runs)
    sent = -1
    with anyio.move_on_after(timeout):
        while True:
            views = [run.progress() for run in runs]
            finished = sum(_items_finished(run, p) for run, p in zip(runs, views, strict=True))
            if total and finished > sent:
                sent = finished
                message = "; ".join(f"run {p.run_id}: {p.counts_text()}" for p in views)
                await ctx.report_progress(finished, total, message)
            if _all_or_any_done(tasks, mode):
                return True
            await wait_any([run.changed for run in runs] + [t.done for t in tasks])
    return False


def _items_finished(run: QueueRun, progress: RunProgress) -> int:
    if progress.state == "finished":
        return len(run.members)
    done = sum(n for k, n in progress.counts.items() if k not in ("running", "waiting"))
    return min(done, len(run.members))


def _all_or_any_done(tasks: list[Task], mode: str) -> bool:
    flags = [t.done.is_set() for t in tasks]
    return all(flags) if mode == "all" else any(flags)


def live_progress(tasks: list[Task]) -> dict[str, RunProgress]:
    """The progress of the live runs among ``tasks``, taken on the event loop (runs change there)."""
    return {t.record.task_id: run.progress() for t in tasks if (run := run_of(t)) is not None}


def view_task(ws: Workspace, task: Task, *, cursor: int | None, max_bytes: int, tail_lines: int | None,
              pattern: OutputFilter | None, short: bool = False, live_run: RunProgress | None = None) -> TaskView:
    """A task as ``task_output`` shows it: state, a page of output and, for a run, its progress.

    Reads files: call it in a worker thread, passing a live run's progress as ``live_run`` (taken
    on the event loop). ``short`` cuts the command and description (one of several tasks).
    """
    chunk = ws.registry.read_output(task, cursor=cursor, max_bytes=max_bytes, tail_lines=tail_lines, pattern=pattern)
    run: RunProgress | None
    if (queue_run := run_of(task)) is not None:
        run = live_run if live_run is not None else queue_run.progress()
    else:  # a run of an earlier server, or not a run
        run = load_report(ws.registry.runs_dir, task.record.task_id) if task.record.kind == "run" else None
    return TaskView.of(task.record, short=short, usage=usage_of(task), output=chunk.text, cursor=chunk.start, next_cursor=chunk.next_cursor,
                       output_bytes=task.output_bytes, truncated=chunk.truncated,
                       dropped_bytes=ws.registry.dropped_bytes(task), run=run)


def usage_of(task: Task) -> AgentUsage | None:
    """An agent item's usage: live from its job while it runs, else as its record kept it."""
    if isinstance(task.job, ItemJob) and not task.record.is_done:
        return task.job.usage()
    return usage_from(task.record.usage)
