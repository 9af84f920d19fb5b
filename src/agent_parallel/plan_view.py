"""Planning a workspace's queue (config + reader + planner) and showing the plan to people.

`plan_workspace` is what the `queue_plan` tool, the `queue://plan` resource and
`agent-parallel plan` call; `plan_table` renders a plan with rich, `to_dot` as Graphviz.
The Mermaid text is already in the plan (`QueuePlan.mermaid`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .claims import stale_claims
from .config import MAX_PARALLEL_RANGE, load_config
from .errors import UsageError
from .paths import CONFIG_FILE, RUNS_DIR, resolve_inside
from .planner import QueuePlan, make_plan
from .queue import Diagnostic, ItemName, QueueReader, WorkItem


_PLANS_KEPT = 8
"""Plans kept per unchanged queue snapshot (one per max_parallel/running/config combination)."""


def plan_workspace(root: Path, queue_dir: str | None, max_parallel: int | None, reader: QueueReader,
                   *, running: int = 0) -> QueuePlan:
    """Plan the queue of the workspace at `root`; arguments left None come from the config.

    Raises `PathOutsideWorkspace` for a queue_dir that resolves outside `root`, `QueueError`
    for a missing queue directory or an unusable config, `UsageError` for a bad `max_parallel`.
    Problems inside the queue are in the plan's `errors` and `warnings`, never raised.

    While no queue file changes, the reader returns the same snapshot and the plan computed for it
    is returned again (the same object: treat it as read-only).

    Planning never changes a file. An in-progress item whose claiming server no longer runs is
    reported as a ``stale_claim`` warning and left as it is; ``run_queue``, ``update_item`` and
    ``agent-parallel run`` move such items to blocked (``claims.release_stale_claims``).
    """
    root = root.resolve()
    config, config_warnings = load_config(root)
    if max_parallel is not None:
        low, high = MAX_PARALLEL_RANGE
        if isinstance(max_parallel, bool) or not low <= max_parallel <= high:
            raise UsageError(f"max_parallel must be between {low} and {high}, not {max_parallel!r}")
    snapshot = reader.snapshot(root, queue_dir or config.queue_dir)
    slots = max_parallel or config.max_parallel
    key = ("plan", slots, running, tuple(config_warnings))
    plan = snapshot.memo.get(key)
    if plan is None:
        diagnostics = list(snapshot.diagnostics)
        diagnostics += [Diagnostic(kind="config", file=CONFIG_FILE, message=text) for text in config_warnings]
        plan = make_plan(snapshot.items, diagnostics, slots, running=running)
        if len(snapshot.memo) >= _PLANS_KEPT:
            snapshot.memo.clear()
        snapshot.memo[key] = plan
    stale = _stale_claim_warnings(root, [item for item in snapshot.items if item.status == "in_progress"])
    if stale:
        plan = plan.model_copy(update={"warnings": stale + plan.warnings})
    return plan


def _stale_claim_warnings(root: Path, in_progress: list[WorkItem]) -> list[Diagnostic]:
    """A warning per in-progress item claimed by a server that no longer runs (read-only)."""
    if not in_progress:
        return []
    try:
        runs = resolve_inside(root, RUNS_DIR, "the runs directory")
    except UsageError:
        return []  # a runs directory outside the workspace is not read (see paths.runs_dir)
    names = {item.id_str: item for item in in_progress}
    found = stale_claims(runs, [ItemName(item.id, item.id_str, item.status, item.slug) for item in in_progress])
    return [Diagnostic(
        kind="stale_claim", item=name.id_str, file=names[name.id_str].file,
        message=(f"claimed by {claim.get('by', 'an unknown claimant')} of a server (pid {claim.get('pid')}) that "
                 "no longer runs; planning leaves it in_progress. run_queue or update_item will move it to blocked; "
                 "it is not re-run automatically (at-most-once): check whether its work was done"))
        for name, claim in found]


def format_seconds(seconds: float | None) -> str:
    """``3725`` -> ``1h 2m 5s``; None -> ``-``."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:g}s" if seconds < 10 and seconds != whole else f"{whole}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return " ".join(part for part in parts if part)


_STATUS_STYLE = {"pending": "white", "in_progress": "blue", "completed": "green", "blocked": "yellow",
                 "failed": "red"}


def plan_table(plan: QueuePlan) -> RenderableType:
    """The plan for people: a summary, the items, the schedule, conflicts and every diagnostic.

    Text from the queue (titles, file names, messages) is printed as text, never read as rich
    markup: ``Fix [/x] parser`` must print, and ``[link=...]`` must not become a hyperlink.
    """
    counts = Counter(item.status for item in plan.items)
    summary = Text()
    summary.append(f"{len(plan.items)} items", style="bold")
    summary.append(" (" + ", ".join(f"{counts[s]} {s}" for s in _STATUS_STYLE if counts[s]) + ")")
    summary.append(f"   max_parallel {plan.max_parallel}   predicted {format_seconds(plan.predicted_makespan)}")
    summary.append(f" (lower bound {format_seconds(plan.lower_bound)})")
    run_now = Text("run now: ", style="bold")
    run_now.append(", ".join(plan.run_now) or "nothing", style="green" if plan.run_now else "dim")

    items = Table(title="Items", title_justify="left", expand=False)
    for column in ("id", "status", "title", "waits on", "estimate", "priority", "state"):
        items.add_column(column, no_wrap=column in ("id", "status"))
    run_now_ids = set(plan.run_now)
    for item in plan.items:
        if item.ready:
            state = Text("run now" if item.id in run_now_ids else "ready", style="green")
        else:
            state = Text(item.reason or "", style="red" if "error" in (item.reason or "") or "cycle" in (
                item.reason or "") else "dim")
        items.add_row(Text(item.id), Text(item.status, style=_STATUS_STYLE.get(item.status, "")), Text(item.title),
                      Text(", ".join(item.waiting_on)), Text(format_seconds(item.estimate)), Text(str(item.priority)),
                      state)

    parts: list[RenderableType] = [summary, run_now, items]
    if plan.waves:
        waves = Table(title="Predicted schedule (waves)", title_justify="left")
        waves.add_column("#", justify="right")
        waves.add_column("starts")
        for number, wave in enumerate(plan.waves, 1):
            waves.add_row(str(number), Text(", ".join(wave)))
        parts.append(waves)
    if plan.critical_path:
        parts.append(Text("critical path: " + " -> ".join(plan.critical_path)))
    for fork_join in plan.patterns.fork_join:
        parts.append(Text(f"fork-join: {fork_join.fork} -> [{', '.join(fork_join.branches)}] -> {fork_join.join}"))
    for pipeline in plan.patterns.pipelines:
        parts.append(Text("pipeline: " + " -> ".join(pipeline)))
    if plan.conflicts:
        conflicts = Table(title="Conflicts (never run together)", title_justify="left")
        for column in ("a", "b", "shared"):
            conflicts.add_column(column)
        for conflict in plan.conflicts:
            conflicts.add_row(Text(conflict.a), Text(conflict.b), Text(", ".join(conflict.files + conflict.components)))
        parts.append(conflicts)
    for title, diagnostics, style in (("Errors", plan.errors, "red"), ("Warnings", plan.warnings, "yellow")):
        if diagnostics:
            table = Table(title=title, title_justify="left", title_style=f"bold {style}")
            for column in ("kind", "file", "message"):
                table.add_column(column)
            for diagnostic in diagnostics:
                table.add_row(Text(diagnostic.kind), Text(diagnostic.file or ""), Text(diagnostic.message))
            parts.append(table)
    return Group(*parts)


def to_dot(plan: QueuePlan) -> str:
    """The plan's graph in Graphviz dot: arrows from an item to what waits on it, dashed
    undirected lines for conflicts, fill colour by status."""
    colours = {"pending": "#f3f4f6", "in_progress": "#dbeafe", "completed": "#dcfce7", "blocked": "#fef3c7",
               "failed": "#fee2e2"}
    lines = ["digraph queue {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled"];']
    seen: set[str] = set()
    for item in plan.items:
        if item.id in seen:
            continue
        seen.add(item.id)
        label = f"{item.id}: {item.title}".replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'  "{item.id}" [label="{label}", fillcolor="{colours.get(item.status, "white")}"];')
    for item in plan.items:
        for successor in item.blocks:
            lines.append(f'  "{item.id}" -> "{successor}";')
    for conflict in plan.conflicts:
        lines.append(f'  "{conflict.a}" -> "{conflict.b}" [dir=none, style=dashed, color="#dc2626"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
