"""Showing plans, runs and tasks to people in a terminal (rich): the plan table, live progress,
the final report and status. Diagrams (the plan's Mermaid flowchart and Graphviz dot, a run's
Mermaid Gantt chart) are drawn in ``queue/diagrams.py``; `to_dot`, `gantt` and `format_seconds`
are imported from there.

Text from items, commands, output, records and git is always a rich ``Text`` made by `shown` (or a
string cell given to `add_row`, which makes one), never markup: ``Fix [/x] parser`` must print as
written, ``[link=...]`` must not become a terminal hyperlink, and a raw ESC (``\\x1b]8;;URL``, a
hidden link; ``\\x1b[2J``, a cleared screen) is shown as ``\\x1b``, never sent to the terminal.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..queue.diagrams import format_seconds, gantt, to_dot
from ..text import cut
from ..text import visible

if TYPE_CHECKING:  # (`agent-parallel plan` needs neither: 45 ms of imports, a sixth of its wall time)
    from ..queue.planner import PlanItem, QueuePlan  # (nor `agent-parallel worktrees` the planner)
    from ..results import ItemOutcome, RunProgress
    from ..tasks.records import TaskRecord


_STATUS_STYLE = {"pending": "white", "in_progress": "blue", "completed": "green", "blocked": "yellow",
                 "failed": "red"}

ROWS_SHOWN = 100
"""Items, conflicts, errors and warnings `plan_table` lists (unless asked for every row); the rest are
counted in one line. A terminal table of 10,000 items took 11 s to draw and nobody reads it."""
WAVES_SHOWN = 20
"""Waves, fork-joins and pipelines `plan_table` lists (the first waves: what starts soonest)."""
_EVERY_ROW = "`agent-parallel plan --all` lists every row, `--format json` gives every field"


def shown(text: str, style: str = "") -> Text:
    """Text from outside (a queue, a task, a record, git) for rich: as written, never markup, with
    its control characters made visible (`visible`), so it cannot drive the terminal."""
    return Text(visible(text), style=style)


def add_row(table: Table, *cells: str | Text) -> None:
    """``table.add_row`` with every string cell `shown`: a new column cannot put a title on the
    terminal raw or as markup. A ``Text`` cell must be built by `shown` or hold only our own words."""
    table.add_row(*(shown(cell) if isinstance(cell, str) else cell for cell in cells))


def _attention(item: PlanItem) -> int:
    """Which items a shortened table keeps first: those needing a person, then those that can run."""
    reason = item.reason or ""
    if item.status in ("failed", "blocked", "in_progress") or "error" in reason or "cycle" in reason:
        return 0
    if item.ready:
        return 1
    return 2 if item.status != "completed" else 3


def _more(hidden: int, what: str) -> Text:
    return Text(f"… {hidden:,} more {what} not listed; {_EVERY_ROW}", style="dim")


def plan_table(plan: QueuePlan, *, every_row: bool = False) -> RenderableType:
    """The plan for people: a summary, the items, the schedule, conflicts and the diagnostics.

    Beyond `ROWS_SHOWN` items it lists those needing attention first (failed, blocked, in progress,
    errors), then the ready ones, then those waiting, then completed ones, in id order, and counts
    the rest; likewise for the other lists (`every_row` lists everything).
    Text from the queue (titles, file names, messages) is printed as text, never read as rich
    markup: ``Fix [/x] parser`` must print, and ``[link=...]`` must not become a hyperlink.
    """
    rows_shown = None if every_row else ROWS_SHOWN
    waves_shown = None if every_row else WAVES_SHOWN
    counts = Counter(item.status for item in plan.items)
    summary = Text()
    summary.append(f"{len(plan.items)} items", style="bold")
    summary.append(" (" + ", ".join(f"{counts[s]} {s}" for s in _STATUS_STYLE if counts[s]) + ")")
    summary.append(f"   max_parallel {plan.max_parallel}   predicted {format_seconds(plan.predicted_makespan)}")
    summary.append(f" (lower bound {format_seconds(plan.lower_bound)})")
    isolation = None
    if plan.integration_estimate is not None:
        measured = (f"median of {plan.integration_samples} measured" if plan.integration_samples
                    else "none measured yet")
        isolation = shown(f"isolation {plan.isolation}: integration {format_seconds(plan.integration_estimate)} "
                          f"per isolated item ({measured})" + (", overlaps allowed" if plan.allow_overlap else ""))
    run_now = Text("run now: ", style="bold")
    run_now.append_text(shown(", ".join(plan.run_now) or "nothing", style="green" if plan.run_now else "dim"))

    items = Table(title="Items", title_justify="left", expand=False)
    for column in ("id", "status", "title", "waits on", "estimate", "priority", "state"):
        items.add_column(column, no_wrap=column in ("id", "status"))
    run_now_ids = set(plan.run_now)
    shown_items = plan.items
    if rows_shown is not None and len(shown_items) > rows_shown:
        kept = sorted(range(len(shown_items)), key=lambda n: (_attention(shown_items[n]), n))[:rows_shown]
        shown_items = [plan.items[n] for n in sorted(kept)]
    for item in shown_items:
        if item.ready:
            state = Text("run now" if item.id in run_now_ids else "ready", style="green")
        else:
            state = shown(item.reason or "", style="red" if "error" in (item.reason or "") or "cycle" in (
                item.reason or "") else "dim")
        estimate = format_seconds(item.estimate)
        if item.integration_estimate is not None:  # isolated: its worktree, then its integration
            estimate += f" + {format_seconds(item.integration_estimate)} integration"
        if item.forecast:
            state.append_text(shown(f" (would conflict on {', '.join(item.forecast)})", style="yellow"))
        add_row(items, item.id, shown(item.status, style=_STATUS_STYLE.get(item.status, "")), item.title,
                ", ".join(item.waiting_on), estimate, str(item.priority), state)

    parts: list[RenderableType] = [summary, *([isolation] if isolation else []), run_now, items]
    if len(shown_items) < len(plan.items):
        hidden = Counter(item.status for item in plan.items) - Counter(item.status for item in shown_items)
        parts.append(_more(len(plan.items) - len(shown_items), "items (" + ", ".join(
            f"{hidden[status]:,} {status}" for status in _STATUS_STYLE if hidden[status]) + ")"))
    if plan.waves:
        waves = Table(title="Predicted schedule (waves)", title_justify="left")
        waves.add_column("#", justify="right")
        waves.add_column("starts")
        for number, wave in enumerate(plan.waves[:waves_shown], 1):
            add_row(waves, str(number), ", ".join(wave))
        parts.append(waves)
        if (total := max(plan.waves_total, len(plan.waves))) > len(waves.rows):
            parts.append(_more(total - len(waves.rows), "waves"))
    if plan.critical_path:
        parts.append(shown("critical path: " + " -> ".join(plan.critical_path)))
    for what, lines in (
            ("fork-joins", [f"fork-join: {f.fork} -> [{', '.join(f.branches)}] -> {f.join}"
                            for f in plan.patterns.fork_join]),
            ("pipelines", ["pipeline: " + " -> ".join(pipeline) for pipeline in plan.patterns.pipelines])):
        parts += [shown(line) for line in lines[:waves_shown]]
        if waves_shown is not None and len(lines) > waves_shown:
            parts.append(_more(len(lines) - waves_shown, what))
    if plan.conflicts:
        conflicts = Table(title="Conflicts (never run together)", title_justify="left")
        for column in ("a", "b", "shared"):
            conflicts.add_column(column)
        for conflict in plan.conflicts[:rows_shown]:
            add_row(conflicts, conflict.a, conflict.b, ", ".join(conflict.files + conflict.components))
        parts.append(conflicts)
        if (total := max(plan.conflicts_total, len(plan.conflicts))) > len(conflicts.rows):
            parts.append(_more(total - len(conflicts.rows), "conflicting pairs") if total == len(plan.conflicts) else
                         Text(f"… {total - len(conflicts.rows):,} more conflicting pairs not listed ({total:,} in all); "
                              "`agent-parallel plan --format json` groups them by what they share (conflict_groups)",
                              style="dim"))
    if plan.predicted_conflicts:
        predicted = Table(title=f"Predicted conflicts ({plan.predicted_conflicts_total} declared overlaps "
                                "run together)", title_justify="left")
        for column in ("a", "b", "declared", "git forecast"):
            predicted.add_column(column)
        for pair in plan.predicted_conflicts[:rows_shown]:
            forecast = "-" if pair.forecast is None else (", ".join(pair.forecast) or "no conflict")
            add_row(predicted, pair.a, pair.b, ", ".join(pair.files + pair.components), forecast)
        parts.append(predicted)
        if len(plan.predicted_conflicts) > len(predicted.rows):
            parts.append(_more(len(plan.predicted_conflicts) - len(predicted.rows), "predicted conflicts"))
    for title, diagnostics, style in (("Errors", plan.errors, "red"), ("Warnings", plan.warnings, "yellow")):
        if diagnostics:
            table = Table(title=title, title_justify="left", title_style=f"bold {style}")
            for column in ("kind", "file", "message"):
                table.add_column(column)
            for diagnostic in diagnostics[:rows_shown]:
                add_row(table, diagnostic.kind, diagnostic.file or "", diagnostic.message)
            parts.append(table)
            if len(diagnostics) > len(table.rows):
                parts.append(_more(len(diagnostics) - len(table.rows), title.lower()))
    return Group(*parts)


_OUTCOME_STYLE = {"completed": "green", "failed": "red", "skipped": "yellow", "not_started": "dim",
                  "claimed_elsewhere": "magenta"}


def progress_view(p: RunProgress) -> RenderableType:
    """What a run is doing now: counts, the running items, and why starts are held (if they are)."""
    head = shown(f"run {p.run_id}  {p.level}  max_parallel {p.max_parallel}  {format_seconds(p.elapsed_s)}  ",
                 style="bold")
    head.append_text(shown(p.counts_text()))
    table = Table(show_header=True, box=None)
    for column in ("item", "title", "task", "running for", "agent"):
        table.add_column(column)
    for r in p.running:
        extra = r.waiting or (r.usage.short() if r.usage is not None else "")
        add_row(table, r.item, r.title, r.task_id or "-", format_seconds(r.elapsed_s), extra)
    parts: list[RenderableType] = [head, table]
    if p.held:
        parts.append(shown(f"start held: {p.held}", style="yellow"))
    if p.stop_reason:
        parts.append(shown(f"stopping: {p.stop_reason}", style="red"))
    return Group(*parts)


FOLD_COMPLETED_OVER = 20
"""``report_view(fold=True)`` shows plain completions (nothing else to say) only up to this many."""


def _plain_completion(o: ItemOutcome) -> bool:
    return o.outcome == "completed" and not (o.reason or o.notes or o.usage is not None or (o.attempts or 0) > 1)


def report_view(p: RunProgress, *, fold: bool = False) -> RenderableType:
    """The end of a run: every item's outcome, the last lines of failures, makespan vs lower bound.

    ``fold`` (the end of ``agent-parallel run``): beyond ``FOLD_COMPLETED_OVER`` plain completions,
    those are counted in one line instead of a row each (``agent-parallel report`` lists them all);
    every other outcome keeps its row."""
    table = Table(title=shown(f"Run {p.run_id}"), title_justify="left")
    for column in ("item", "title", "outcome", "time", "details"):
        table.add_column(column)
    outcomes = p.outcomes
    folded = 0
    if fold and sum(map(_plain_completion, outcomes)) > FOLD_COMPLETED_OVER:
        listed = [o for o in outcomes if not _plain_completion(o)]
        folded = len(outcomes) - len(listed)
        outcomes = listed
    for o in outcomes:
        details = o.reason or ""
        if o.exit_code not in (None, 0):
            details = f"exit {o.exit_code}" + (f"; {details}" if details and details != f"exit code {o.exit_code}" else "")
        if o.last_lines:
            details += "\n" + "\n".join(f"| {line}" for line in o.last_lines[-5:])
        if o.usage is not None:
            details += f"\n{o.usage.agent or 'agent'}: {o.usage.short()}" + (
                f"; session {o.usage.session_id}" if o.usage.session_id else "") + (
                f"; {o.usage.error}" if o.usage.error else "")
        elif o.attempts and o.attempts > 1:
            details += f"\n{o.attempts} attempts"
        if o.notes:
            details += "\n" + "; ".join(o.notes)
        add_row(table, o.item, o.title, shown(o.outcome, style=_OUTCOME_STYLE.get(o.outcome, "")),
                format_seconds(o.duration_s), details.strip())
    parts: list[RenderableType] = [table] if outcomes else []
    if folded:
        parts.append(shown(f"{folded} {'more ' if outcomes else ''}items completed "
                           f"(agent-parallel report {p.run_id} lists every item)",
                           style=_OUTCOME_STYLE.get("completed", "")))
    if p.usage is not None:
        parts.append(shown(f"agents in all: {p.usage.short()}"))
    if (makespan := p.makespan_text(format_seconds)) is not None:
        parts.append(shown(makespan))
    if p.stop_reason:
        parts.append(shown(f"stopped: {p.stop_reason}", style="red"))
    return Group(*parts)


def status_view(records: list[TaskRecord]) -> RenderableType:
    """Recent tasks and runs, newest first."""
    from ..results import SHORT_TEXT_CHARS, iso

    table = Table(title="Recent tasks and runs", title_justify="left")
    for column in ("id", "kind", "status", "exit", "started", "time", "what"):
        table.add_column(column, no_wrap=column in ("id", "status"))
    for r in records:
        exit_text = str(r.exit_code) if r.exit_code is not None else (r.signal or "")
        add_row(table, r.task_id, r.kind, r.status.value, exit_text, iso(r.started_at) or "",
                format_seconds(r.duration_s), cut(r.description or r.command, SHORT_TEXT_CHARS))
    return table


__all__ = ["add_row", "format_seconds", "gantt", "plan_table", "progress_view", "report_view", "shown", "status_view",
           "to_dot"]
