"""Drawing plans and runs as text for diagram tools: the plan's Mermaid flowchart
(`QueuePlan.mermaid`, built from the planner's graph), its Graphviz dot (`agent-parallel plan
--format dot`), and a run's Mermaid Gantt chart (`agent-parallel report --gantt`).

One place for every diagram, imported by the planner (so the MCP layer's `queue_plan` carries the
flowchart) and by the CLI; nothing here needs rich or the MCP SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..results import RunProgress
    from .conflicts import Key
    from .planner import QueueGraph, QueuePlan


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


# --- the plan's flowchart (Mermaid) ------------------------------------------------------------------

_MERMAID_CLASSES = (
    "classDef pending fill:#f3f4f6,stroke:#6b7280,color:#111827",
    "classDef in_progress fill:#dbeafe,stroke:#2563eb,color:#1e3a8a",
    "classDef completed fill:#dcfce7,stroke:#16a34a,color:#14532d",
    "classDef blocked fill:#fef3c7,stroke:#d97706,color:#78350f",
    "classDef failed fill:#fee2e2,stroke:#dc2626,color:#7f1d1d",
    "classDef error fill:#fee2e2,stroke:#dc2626,stroke-width:3px,stroke-dasharray:5 3,color:#7f1d1d",
)


def _mermaid_label(text: str) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= 60 else text[:57] + "..."
    for char, entity in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, entity)
    return text


MERMAID_MAX_NODES = 200
MERMAID_MAX_EDGES = 500
"""Mermaid refuses to render more than 500 edges by default; larger queues are drawn in part."""


def to_mermaid(graph: QueueGraph) -> str:
    """A flowchart: arrows from an item to what waits on it, dashed links between conflicting
    items, nodes coloured by status (items with an error get the `error` class). Isolated items are
    drawn as subroutines (``[[...]]``: their own worktree); declared overlaps allowed to run together
    (`QueueGraph.declared_index`) are dotted links labelled ``may conflict``.

    A queue larger than `MERMAID_MAX_NODES` items or `MERMAID_MAX_EDGES` links is drawn in part
    (unfinished items first, by id) with a comment saying so; the plan's other fields are complete.
    """
    error_files = {d.file for d in graph.errors if d.file}
    in_cycle = {node for component in graph.cycles for node in component}
    nodes = list(graph.by_id)
    if len(nodes) > MERMAID_MAX_NODES:
        nodes.sort(key=lambda item_id: (graph.by_id[item_id].status == "completed", item_id))
        nodes = sorted(nodes[:MERMAID_MAX_NODES])
    shown = set(nodes)
    names = {item_id: "n" + graph.by_id[item_id].id_str for item_id in nodes}
    lines = ["flowchart LR", *("    " + line for line in _MERMAID_CLASSES)]
    for item_id in nodes:
        item = graph.by_id[item_id]
        css = "error" if item.file in error_files or item_id in in_cycle else item.status
        label = _mermaid_label(f"{item.id_str}: {item.title}")
        shape = f'[["{label}"]]' if item_id in graph.isolated else f'["{label}"]'
        lines.append(f"    {names[item_id]}{shape}:::{css}")
    links = [f"    {names[item_id]} --> {names[successor]}"
             for item_id in nodes for successor in graph.unblocks[item_id] if successor in shown]
    index = graph.conflict_index
    shown_holders: dict[Key, list[int]] = {}

    def shown_neighbours(item_id: int) -> set[int]:
        """``index.neighbours(item_id) & shown``, by key among the items drawn: with dense conflicts
        (each of 5,000 items holding 50 of 60 components) a whole neighbour set is thousands of items."""
        found: set[int] = set()
        for key in index.reach(item_id):
            holders = shown_holders.get(key)
            if holders is None:
                holders = shown_holders[key] = [holder for holder in index.holders[key] if holder in shown]
            found.update(holders)
        found.discard(item_id)
        return found

    links += [f"    {names[first]} -.- {names[second]}"
              for first in nodes if first in index.keys and index.has_conflict(first)
              for second in sorted(shown_neighbours(first)) if second > first]
    declared = graph.declared_index
    if declared is not None:
        isolated = graph.isolated
        links += [f"    {names[first]} -. may conflict .- {names[second]}"
                  for first in nodes if first in declared.keys and declared.has_conflict(first)
                  for second in sorted(declared.neighbours(first) & shown)
                  if second > first and (first in isolated or second in isolated)]
    lines += links[:MERMAID_MAX_EDGES]
    if len(nodes) < len(graph.by_id) or len(links) > MERMAID_MAX_EDGES:
        lines.append(f"    %% drawn in part: {len(nodes)} of {len(graph.by_id)} items, "
                     f"{min(len(links), MERMAID_MAX_EDGES)} of {len(links)} links among them "
                     f"(Mermaid renders at most about {MERMAID_MAX_EDGES} links)")
    return "\n".join(lines) + "\n"


# --- the plan's graph (Graphviz dot) ----------------------------------------------------------------


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


# --- a run's Gantt chart (Mermaid) ------------------------------------------------------------------


def gantt(p: RunProgress) -> str:
    """A Mermaid Gantt chart of what ran when (failed items marked ``crit``)."""
    summary = p.makespan_text(format_seconds) or "not finished"  # the report's own line (no estimates: no bound)
    lines = ["gantt", f"    title Run {p.run_id}: {summary}", "    dateFormat x", "    axisFormat %M:%S",
             "    section items"]
    for o in sorted(p.outcomes, key=lambda o: (o.started_at or 0, o.item)):
        if o.started_at is None or o.ended_at is None:
            continue
        tag = "done" if o.outcome == "completed" else "crit"
        label = f"{o.item} {o.title}".replace(":", " ").replace("#", " ")
        lines.append(f"    {label} :{tag}, i{o.item}, {int(o.started_at * 1000)}, {max(int(o.ended_at * 1000), int(o.started_at * 1000) + 1)}")
    return "\n".join(lines) + "\n"
