"""Planning a workspace's queue (config + reader + planner).

`plan_workspace` is what the `queue_plan` tool, the `queue://plan` resource and
`agent-parallel plan` call. Showing a plan to people is in ``cli/render.py``.
"""

from __future__ import annotations

from pathlib import Path

from .claims import stale_claims
from ..config import load_config, max_parallel_for
from ..errors import UsageError
from ..paths import CONFIG_FILE, RUNS_DIR, resolve_inside
from .planner import QueuePlan, make_plan
from .items import Diagnostic, ItemName, QueueReader, WorkItem


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
    slots = max_parallel_for(max_parallel, config)
    snapshot = reader.snapshot(root, queue_dir or config.queue_dir)
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
