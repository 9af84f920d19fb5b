"""Showing runs and tasks to people in a terminal (rich): live progress, the final report, status.

Text from items, commands and output is always a rich ``Text``, never markup: ``Fix [/x] parser``
must print as written, and ``[link=...]`` must not become a terminal hyperlink.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .plan_view import format_seconds
from .results import SHORT_TEXT_CHARS, RunProgress, iso
from .text import cut
from .tasks.records import TaskRecord

_OUTCOME_STYLE = {"completed": "green", "failed": "red", "skipped": "yellow", "not_started": "dim",
                  "claimed_elsewhere": "magenta"}


def progress_view(p: RunProgress) -> RenderableType:
    """What a run is doing now: counts, the running items, and why starts are held (if they are)."""
    head = Text(f"run {p.run_id}  {p.level}  max_parallel {p.max_parallel}  {format_seconds(p.elapsed_s)}  ", style="bold")
    head.append(", ".join(f"{n} {k}" for k, n in sorted(p.counts.items()) if n))
    table = Table(show_header=True, box=None)
    for column in ("item", "title", "task", "running for"):
        table.add_column(column)
    for r in p.running:
        table.add_row(Text(r.item), Text(r.title), Text(r.task_id), format_seconds(r.elapsed_s))
    parts: list[RenderableType] = [head, table]
    if p.held:
        parts.append(Text(f"start held: {p.held}", style="yellow"))
    if p.stop_reason:
        parts.append(Text(f"stopping: {p.stop_reason}", style="red"))
    return Group(*parts)


def report_view(p: RunProgress) -> RenderableType:
    """The end of a run: every item's outcome, the last lines of failures, makespan vs lower bound."""
    table = Table(title=Text(f"Run {p.run_id}"), title_justify="left")
    for column in ("item", "title", "outcome", "time", "details"):
        table.add_column(column)
    for o in p.outcomes:
        details = o.reason or ""
        if o.exit_code not in (None, 0):
            details = f"exit {o.exit_code}" + (f"; {details}" if details and details != f"exit code {o.exit_code}" else "")
        if o.last_lines:
            details += "\n" + "\n".join(f"| {line}" for line in o.last_lines[-5:])
        if o.notes:
            details += "\n" + "; ".join(o.notes)
        table.add_row(Text(o.item), Text(o.title), Text(o.outcome, style=_OUTCOME_STYLE.get(o.outcome, "")),
                      format_seconds(o.duration_s), Text(details.strip()))
    parts: list[RenderableType] = [table]
    if p.makespan is not None:
        ratio = f" = {p.makespan / p.lower_bound:.2f} x" if p.lower_bound else ""
        parts.append(Text(f"makespan {format_seconds(p.makespan)} vs lower bound {format_seconds(p.lower_bound)}"
                          f"{ratio} (the plan predicted {format_seconds(p.predicted_makespan)})"))
    if p.stop_reason:
        parts.append(Text(f"stopped: {p.stop_reason}", style="red"))
    return Group(*parts)


def status_view(records: list[TaskRecord]) -> RenderableType:
    """Recent tasks and runs, newest first."""
    table = Table(title="Recent tasks and runs", title_justify="left")
    for column in ("id", "kind", "status", "exit", "started", "time", "what"):
        table.add_column(column, no_wrap=column in ("id", "status"))
    for r in records:
        exit_text = str(r.exit_code) if r.exit_code is not None else (r.signal or "")
        table.add_row(Text(r.task_id), Text(r.kind), Text(r.status.value), Text(exit_text), iso(r.started_at) or "",
                      format_seconds(r.duration_s), Text(cut(r.description or r.command, SHORT_TEXT_CHARS)))
    return table


def gantt(p: RunProgress) -> str:
    """A Mermaid Gantt chart of what ran when (failed items marked ``crit``)."""
    lines = ["gantt", f"    title Run {p.run_id}: makespan {format_seconds(p.makespan)} "
             f"(lower bound {format_seconds(p.lower_bound)})", "    dateFormat x", "    axisFormat %M:%S",
             "    section items"]
    for o in sorted(p.outcomes, key=lambda o: (o.started_at or 0, o.item)):
        if o.started_at is None or o.ended_at is None:
            continue
        tag = "done" if o.outcome == "completed" else "crit"
        label = f"{o.item} {o.title}".replace(":", " ").replace("#", " ")
        lines.append(f"    {label} :{tag}, i{o.item}, {int(o.started_at * 1000)}, {max(int(o.ended_at * 1000), int(o.started_at * 1000) + 1)}")
    return "\n".join(lines) + "\n"
