"""Planning a workspace's queue (config + reader + planner).

`plan_workspace` is what the `queue_plan` tool, the `queue://plan` resource and
`agent-parallel plan` call. A plan is kept with the reader's snapshot it was made from: an
unchanged queue gets the same plan back, and a queue whose changed files changed nothing the plan
uses (a body, a command) or only a title gets the previous plan (with the new titles). Showing a
plan to people is in ``cli/render.py``, its diagrams in ``diagrams.py``.

Isolated items are planned as the run schedules them (`isolation_policy`): with their measured
integration time (``timings``) and, with ``integration.allow_overlap``, their declared overlaps shown as
predicted conflicts; items in progress in their worktrees get git's forecast (`_forecast`, never cached:
branches move without a queue file changing).
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
from dataclasses import replace
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import Config, load_config, max_parallel_for
from ..errors import AgentParallelError, UsageError
from ..paths import CONFIG_FILE, RUNS_DIR, resolve_inside
from .diagrams import to_mermaid
from .planner import (IsolationPolicy, ItemIndex, QueueGraph, QueuePlan, QueuePlanPage, build_graph, check_slots, has_rows,
                      page_plan, plan_graph, plan_rows, upstream_items)
from .items import Diagnostic, QueueReader, QueueSnapshot, ReadStopped, WorkItem
from .names import ItemName
from .timings import integration_estimate


_PLANS_KEPT = 8
"""Plans kept per unchanged queue snapshot (one per max_parallel/running/config combination)."""
PAGE_ITEMS = 100
"""Items per `queue_plan` answer by default (`plan_page`): about 40 KB of JSON, what an agent reads at once."""
MAX_PAGE_ITEMS = 1000
"""Items per `queue_plan` answer at most: about 400 KB of JSON."""
MAX_FORECASTS = 20
"""In-progress isolated items (and pairs of them) whose branches git is asked about, per plan."""
PREPARE_MAX_FILES = 20_000
"""Queue files at most for `prepare_plan` to plan a queue nobody asked about yet (some 4 s of a core)."""


def isolation_policy(root: Path, config: Config, items: list[WorkItem]) -> IsolationPolicy:
    """What the planner needs to know about isolation for these items: the config's default and
    ``allow_overlap``, and (only when an item is isolated) the measured integration time."""
    return _policy_for(root, config, any(item.isolation == "worktree" for item in items))


def _policy_for(root: Path, config: Config, own_isolation: bool) -> IsolationPolicy:
    policy = IsolationPolicy(default=config.isolation, allow_overlap=config.integration_allow_overlap)
    if config.isolation != "worktree" and not own_isolation:
        return policy  # nothing isolated: the stats file is not read
    seconds, samples = integration_estimate(root.resolve())
    return replace(policy, integration_s=seconds, integration_samples=samples)


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
        return _plan_workspace(root, queue_dir, max_parallel, reader, running, rows=True)[0]


def plan_page(root: Path, queue_dir: str | None, max_parallel: int | None, reader: QueueReader, *,
              offset: int = 0, limit: int = PAGE_ITEMS, fit_chars: int | None = None) -> QueuePlanPage:
    """`plan_workspace` with one page of its items (`planner.page_plan`): what `queue_plan` answers.

    Every page of an unchanged queue comes from the one cached plan: paging plans nothing again.
    ``fit_chars``: fewer rows (at least one) while the page's JSON passes this many characters; its
    ``next_offset`` goes on from there (items whose files, components or conflicts run to thousands of
    entries made a page of 100 rows megabytes long).
    Raises `UsageError` for an offset below 0 or a limit outside 1..`MAX_PAGE_ITEMS`."""
    if offset < 0:
        raise UsageError(f"offset must be >= 0 (got {offset}); the first page of items is offset 0, the next "
                         "one the answer's next_offset")
    if not 1 <= limit <= MAX_PAGE_ITEMS:
        raise UsageError(f"limit must be between 1 and {MAX_PAGE_ITEMS} items per page (got {limit}); page "
                         "through a larger queue with offset and next_offset")
    with paused_gc():
        plan, graph = _plan_workspace(root, queue_dir, max_parallel, reader, 0, rows=False)
        page = page_plan(plan, graph, offset, limit)
        while fit_chars is not None and limit > 1 and (size := len(page.model_dump_json())) > fit_chars:
            limit = max(1, min(limit - 1, int(limit * fit_chars / size * 0.9)))
            page = page_plan(plan, graph, offset, limit)
        return page


def prepare_plan(root: Path, reader: QueueReader, stop: Callable[[], bool]) -> int | None:
    """Plan the workspace's queue ahead of any call, as `queue_plan` with its defaults would, and
    keep the plan in `reader`'s snapshot: what a server does in the background when it starts, so
    that the first `queue_plan` finds it made (a 10,000-item queue takes a second or two to read and
    plan on these machines, and a client asks for it seconds or minutes after starting the server).

    Returns how many items it planned, or None when it had nothing to do or gave up: no queue
    directory, more than `PREPARE_MAX_FILES` entries in it (a queue nobody asked about is not worth
    minutes of a core), or `stop` said True (the server is closing). Raises what `queue_plan` would
    raise for the workspace (`QueueError` for an unusable config, `OSError` for a directory that
    cannot be listed); the caller logs it, and `queue_plan` reports it when asked.
    """
    root = root.resolve()
    config, _ = load_config(root)
    directory = resolve_inside(root, config.queue_dir, "queue_dir")
    if not directory.is_dir():
        return None
    with os.scandir(directory) as listing:
        if sum(1 for _ in itertools.islice(listing, PREPARE_MAX_FILES + 1)) > PREPARE_MAX_FILES:
            return None
    with paused_gc():
        try:
            graph = _plan_workspace(root, None, None, reader, 0, rows=False, stop=stop)[1]  # as `plan_page` does
        except ReadStopped:
            return None
    return len(graph.items)


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


_planning = threading.Lock()
"""Held while a plan is made: planning is CPU-bound, so two at once (a plan prepared at start and the
first `queue_plan`) took twice as long each, and for the same plan, made it twice."""

_FREEZES_BETWEEN_THAWS = 32
_freezes = [0]


def keep_out_of_collections() -> None:
    """Move every object alive now (a new plan and its snapshot, graph and rows among them) out of the
    cyclic collector's sight (`gc.freeze`).

    A 10,000-item plan is kept as some 250,000 objects, and every full collection walked them all
    (0.15-0.3 s) for garbage they never make: planning leaves no cycles, and reference counting
    frees a replaced plan as before. A full collection came every few calls, since each answer's
    temporaries count towards the next one, and cost a warm ``queue_plan`` six times its work.
    Other objects alive at this moment are frozen too: one that later ends in a garbage cycle
    would not be collected, so every `_FREEZES_BETWEEN_THAWS` new plans everything is thawed
    first (the next full collection sees it all once)."""
    _freezes[0] += 1
    if _freezes[0] % _FREEZES_BETWEEN_THAWS == 0:
        gc.unfreeze()
    gc.freeze()


def _plan_workspace(root: Path, queue_dir: str | None, max_parallel: int | None, reader: QueueReader,
                    running: int, *, rows: bool, stop: Callable[[], bool] | None = None) -> tuple[QueuePlan, QueueGraph]:
    """The plan and its graph. With ``rows=False`` the plan may come without its `items` (a page's
    rows are built from the graph): a new plan is made without them, and a cached plan gets them
    (once, kept in the cache) only when asked for, or when a forecast has to be written into them.
    ``stop`` is the snapshot's (`QueueReader.snapshot`)."""
    root = root.resolve()
    config, config_warnings = load_config(root)
    slots = max_parallel_for(max_parallel, config)
    snapshot = reader.snapshot(root, queue_dir or config.queue_dir, stop=stop)
    isolation = _policy(root, config, snapshot)
    key = ("plan", slots, running, tuple(config_warnings), isolation)
    planned = snapshot.memo.get(key)
    if planned is None:
        check_slots(slots, running)
        with _planning:  # a second caller of the same plan waits for it instead of making it again beside
            planned = snapshot.memo.get(key)
            if planned is None:
                planned = _replanned(snapshot, key)
                if planned is None:
                    diagnostics = list(snapshot.diagnostics)
                    diagnostics += [Diagnostic(kind="config", file=CONFIG_FILE, message=text)
                                    for text in config_warnings]
                    graph = build_graph(snapshot.items, diagnostics, isolation)
                    planned = (plan_graph(graph, slots, running, rows=rows), graph)
                if len(snapshot.memo) >= _PLANS_KEPT:
                    snapshot.memo.clear()  # in_progress too: it is recomputed
                snapshot.memo[key] = planned
                keep_out_of_collections()
    in_progress = snapshot.memo.get("in_progress")
    if in_progress is None:
        in_progress = snapshot.memo["in_progress"] = [item for item in snapshot.items if item.status == "in_progress"]
    forecast = bool(in_progress) and bool(planned[1].isolated)
    if (rows or forecast) and not has_rows(*planned):
        planned = snapshot.memo[key] = (planned[0].model_copy(update={"items": plan_rows(planned[1])}), planned[1])
        keep_out_of_collections()
    plan = planned[0]
    stale = _stale_claim_warnings(root, in_progress, planned[1])
    if stale:
        plan = plan.model_copy(update={"warnings": stale + plan.warnings})
    if forecast:
        plan = _forecast(root, config, plan, planned[1], in_progress)
    return plan, planned[1]


def item_graph(root: Path, config: Config, snapshot: QueueSnapshot, item_id: int) -> QueueGraph:
    """The graph of one item and what it waits on (`planner.upstream_items`): enough to tell whether
    it may start and to hand it its upstream. Its index and policy are kept with the snapshot and
    carried to the next one through its changes: a launch moves a file, and on a queue of 10,000
    items rebuilding either cost more than the rest of the launch."""
    return build_graph(upstream_items(_item_index(snapshot), item_id), snapshot.diagnostics,
                       _policy(root, config, snapshot))


def _item_index(snapshot: QueueSnapshot) -> ItemIndex:
    index = snapshot.memo.get("item_index")
    if index is None:
        changed = _changed_items(snapshot)
        before = None if changed is None else changed[0].memo.get("item_index")
        index = ItemIndex.of(snapshot.items) if before is None or changed is None else before.changed(*changed[1:])
        snapshot.memo["item_index"] = index
    return index


def _changed_items(snapshot: QueueSnapshot) -> tuple[QueueSnapshot, list[WorkItem], list[WorkItem]] | None:
    """The snapshot before this one and the items its changed files held then and hold now
    (removed, added); None when it follows none, so nothing kept for one can be carried to it."""
    if snapshot.base is None or snapshot.changes is None:
        return None
    changes = snapshot.changes.values()
    return (snapshot.base, [old[0] for old, _ in changes if old is not None and old[0] is not None],
            [new[0] for _, new in changes if new is not None and new[0] is not None])


def _policy(root: Path, config: Config, snapshot: QueueSnapshot) -> IsolationPolicy:
    """`isolation_policy` for a snapshot: whether any item has its own isolation is looked at once per
    snapshot (and not at all when the snapshot before had none and no changed file has it)."""
    own = snapshot.memo.get("own_isolation")
    if own is None:
        changed = _changed_items(snapshot)
        if (changed is not None and changed[0].memo.get("own_isolation") is False
                and not any(item.isolation == "worktree" for item in changed[2])):
            own = False
        else:
            own = any(item.isolation == "worktree" for item in snapshot.items)
        snapshot.memo["own_isolation"] = own
    return _policy_for(root, config, bool(own))


def _forecast(root: Path, config: Config, plan: QueuePlan, graph: QueueGraph, in_progress: list[WorkItem]) -> QueuePlan:
    """Git's forecast for the in-progress isolated items whose branches exist: each branch against the
    target (the row's ``forecast``) and, for predicted conflicts between two of them, against each other.
    Read-only (``git merge-tree``); a workspace git cannot answer for gets a warning, not an error."""
    from ..worktrees import check_repository, predict_conflicts  # only here: planning stays free of git
    from ..worktrees.repo import BRANCH_PREFIX, worktree_name

    branches: dict[str, str] = {}
    for item in in_progress:
        if item.id in graph.isolated and len(branches) < MAX_FORECASTS:
            try:
                branches[item.id_str] = BRANCH_PREFIX + worktree_name(item.id_str, item.slug)
            except UsageError:
                continue  # a slug that cannot name a branch: it never had one
    if not branches:
        return plan
    try:
        target = check_repository(root, config).target
        against_target: dict[str, list[str]] = {}
        for item_id, branch in branches.items():
            try:
                against_target[item_id] = predict_conflicts(root, target, [branch])[branch]
            except UsageError:
                continue  # no such branch (yet, or any more)
        between: dict[tuple[str, str], list[str]] = {}
        for pair in plan.predicted_conflicts:
            if len(between) < MAX_FORECASTS and pair.a in against_target and pair.b in against_target:
                between[(pair.a, pair.b)] = predict_conflicts(root, branches[pair.a], [branches[pair.b]])[branches[pair.b]]
    except (AgentParallelError, OSError) as exc:
        warning = Diagnostic(kind="forecast", message=f"no conflict forecast for the items in progress in their "
                                                      f"worktrees: {exc}")
        return plan.model_copy(update={"warnings": [*plan.warnings, warning]})
    rows = [row.model_copy(update={"forecast": against_target[row.id]}) if row.id in against_target
            and row.status == "in_progress" else row for row in plan.items]
    pairs = [pair.model_copy(update={"forecast": between[(pair.a, pair.b)]}) if (pair.a, pair.b) in between else pair
             for pair in plan.predicted_conflicts]
    return plan.model_copy(update={"items": rows, "predicted_conflicts": pairs})


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


def _stale_claim_warnings(root: Path, in_progress: list[WorkItem], graph: QueueGraph) -> list[Diagnostic]:
    """A warning per in-progress item claimed by a server that no longer runs (read-only); for an
    isolated one, where its work so far is kept."""
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
                 "it is not re-run automatically (at-most-once): check whether its work was done"
                 + _kept_worktree(names[name.id_str], graph)))
        for name, claim in found]


def _kept_worktree(item: WorkItem, graph: QueueGraph) -> str:
    """For an isolated item: where its work so far is, and that it is not lost (said without asking git)."""
    if item.id not in graph.isolated:
        return ""
    return (f". Its worktree .agent/worktrees/{item.id_str}-{item.slug} and branch agent/{item.id_str}-{item.slug} "
            "are kept (`agent-parallel worktrees` shows them); moving it back to pending reuses both, so the work "
            "done so far goes on from where it was")
