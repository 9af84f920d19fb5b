"""Planning a workspace's queue (config + reader + planner).

`plan_workspace` is what the `queue_plan` tool, the `queue://plan` resource and
`agent-parallel plan` call. A plan is kept with the reader's snapshot it was made from: an
unchanged queue gets the same plan back, and a queue whose changed files changed nothing the plan
uses (a body, a command) or only a title gets the previous plan (with the new titles). Showing a
plan to people is in ``cli/render.py``, its diagrams in ``diagrams.py``.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import load_config, max_parallel_for
from ..errors import UsageError
from ..paths import CONFIG_FILE, RUNS_DIR, resolve_inside
from .diagrams import to_mermaid
from .planner import QueueGraph, QueuePlan, build_graph, check_slots, plan_graph
from .items import Diagnostic, ItemName, QueueReader, QueueSnapshot, WorkItem


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
    with paused_gc():
        return _plan_workspace(root, queue_dir, max_parallel, reader, running)


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside: parsing and planning allocate hundreds of thousands of
    small objects beside the ones they keep, and the collector would walk the whole heap again and
    again for garbage they do not make (a third of a 10,000-item plan's time). Reference counting
    still frees everything at once; a cycle made meanwhile is collected after. Process-wide, so
    restored only by the call that paused it."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _plan_workspace(root: Path, queue_dir: str | None, max_parallel: int | None, reader: QueueReader,
                    running: int) -> QueuePlan:
    root = root.resolve()
    config, config_warnings = load_config(root)
    slots = max_parallel_for(max_parallel, config)
    snapshot = reader.snapshot(root, queue_dir or config.queue_dir)
    key = ("plan", slots, running, tuple(config_warnings))
    planned = snapshot.memo.get(key)
    if planned is None:
        check_slots(slots, running)
        planned = _replanned(snapshot, key)
        if planned is None:
            diagnostics = list(snapshot.diagnostics)
            diagnostics += [Diagnostic(kind="config", file=CONFIG_FILE, message=text) for text in config_warnings]
            graph = build_graph(snapshot.items, diagnostics)
            planned = (plan_graph(graph, slots, running), graph)
        if len(snapshot.memo) >= _PLANS_KEPT:
            snapshot.memo.clear()  # in_progress too: it is recomputed
        snapshot.memo[key] = planned
    plan = planned[0]
    in_progress = snapshot.memo.get("in_progress")
    if in_progress is None:
        in_progress = snapshot.memo["in_progress"] = [item for item in snapshot.items if item.status == "in_progress"]
    stale = _stale_claim_warnings(root, in_progress)
    if stale:
        plan = plan.model_copy(update={"warnings": stale + plan.warnings})
    return plan


_UNPLANNED_FIELDS: set[str] = {"title", "body", "command", "timeout_s", "path"}
"""`WorkItem` fields no part of a plan depends on, but for the title shown in `items` and `mermaid`."""


def _replanned(snapshot: QueueSnapshot, key: tuple[object, ...]) -> tuple[QueuePlan, QueueGraph] | None:
    """The plan of `snapshot` from the plan of the snapshot before it, when the files that changed
    since changed only in what the plan does not use (a body, a command) or only shows (a title);
    else None (plan it all again).

    An agent editing one item's notes in a queue of 10,000 gets its plan back at once, not after
    the whole schedule is simulated again.
    """
    base = snapshot.base
    planned = None if base is None else base.memo.get(key)
    if planned is None or snapshot.changes is None:
        return None
    plan, graph = planned
    retitled: dict[str, WorkItem] = {}
    for name, (before, after) in snapshot.changes.items():
        if before is None or after is None or before[0] is None or after[0] is None or before[1] != after[1]:
            return None
        old, new = before[0], after[0]
        if old.model_dump(exclude=_UNPLANNED_FIELDS) != new.model_dump(exclude=_UNPLANNED_FIELDS):
            return None
        if old.title != new.title:
            retitled[name] = new
    if not retitled:
        return plan, graph
    items = [retitled.get(item.file, item) for item in graph.items]
    by_id = {item_id: retitled.get(item.file, item) for item_id, item in graph.by_id.items()}
    graph = replace(graph, items=items, by_id=by_id)
    rows = [row if row.file not in retitled else row.model_copy(update={"title": retitled[row.file].title})
            for row in plan.items]
    return plan.model_copy(update={"items": rows, "mermaid": to_mermaid(graph)}), graph


def _stale_claim_warnings(root: Path, in_progress: list[WorkItem]) -> list[Diagnostic]:
    """A warning per in-progress item claimed by a server that no longer runs (read-only)."""
    if not in_progress:
        return []
    try:
        runs = resolve_inside(root, RUNS_DIR, "the runs directory")
    except UsageError:
        return []  # a runs directory outside the workspace is not read (see paths.runs_dir)
    from .claims import stale_claims  # only with items in progress: it brings the process table reader

    names = {item.id_str: item for item in in_progress}
    found = stale_claims(runs, [ItemName(item.id, item.id_str, item.status, item.slug) for item in in_progress])
    return [Diagnostic(
        kind="stale_claim", item=name.id_str, file=names[name.id_str].file,
        message=(f"claimed by {claim.get('by', 'an unknown claimant')} of a server (pid {claim.get('pid')}) that "
                 "no longer runs; planning leaves it in_progress. run_queue or update_item will move it to blocked; "
                 "it is not re-run automatically (at-most-once): check whether its work was done"))
        for name, claim in found]
