"""The queue planner: validate the graph, rank ready items, and predict a schedule. Pure: no I/O.

Three layers, each usable alone:

* `build_graph(items, diagnostics) -> QueueGraph`: edges (``blocked_by`` and the reverse
  ``blocks``), duplicate ids, dangling and self references, cycles (iterative Tarjan, so a
  10,000-deep chain is fine), which items are stuck behind an error, a failed or a blocked item,
  conflicts, estimates and the priority key of every item that can still run.
* `Scheduler`: given a graph, hands out the best-ranked ready item that conflicts with nothing
  running, the moment a slot is free. The simulation below and the live run engine drive the same
  object, so the plan predicts what the run will do.
* `make_plan(...) -> QueuePlan`: the `queue_plan` result: readiness and reasons per item, `run_now`,
  `waves` from an event-driven simulation, critical path, conflicts, patterns, makespan against a
  lower bound, and a Mermaid flowchart (drawn by `diagrams.to_mermaid`).

Priority (smaller key first, see `QueueGraph.rank`): the longest remaining estimate-weighted path
through the item (its own estimate included), then how many items it transitively unblocks, then
the `priority` field, then fewest blockers, then id. An item without `estimate` counts as
`DEFAULT_ESTIMATE_S`. Times are kept in integer milliseconds so sums are exact.

Isolated items (`IsolationPolicy`: an item's own ``isolation``, else ``runner.isolation``) also take
their expected integration time after their estimate, in their slot, one integration at a time (the
integration lock); with ``allow_overlap`` their declared files and components no longer keep them
apart (the run does the same), and those overlaps become `predicted_conflicts` instead.

Cycle paths read in the ``blocked_by`` direction: ``003 -> 007 -> 005 -> 003`` means 003 waits on
007, which waits on 005, which waits on 003.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet

from pydantic import BaseModel, Field

from .conflicts import ConflictIndex, Mark, is_glob
from .diagrams import to_mermaid
from ..errors import InternalError, UsageError
from ..fields import omitted_if_none
from ..text import short_repr
from .items import Diagnostic, WorkItem, format_id, trusted

DEFAULT_ESTIMATE_S = 60.0
"""What an item without an `estimate` counts as, for ranking and for the predicted schedule."""

MAX_CONFLICTS_SHOWN = 200
"""Conflicting pairs listed in a plan; `conflicts_total` counts them all, `conflict_groups` explains them."""
MAX_WAVES_SHOWN = 100
"""Waves a `queue_plan` answer lists (the first: what starts soonest); `waves_total` counts them all."""
MAX_DIAGNOSTICS_SHOWN = 200
"""Errors, and warnings, a `queue_plan` answer lists: those about its page's items first (a queue of 5,000
items without `files` made 5,000 warnings, 900 KB in every page); `errors_total`/`warnings_total` count them."""
MAX_OVERLAPS_SHOWN = 20
"""Overlapping entries listed per conflict group; `overlaps_total` counts them all."""
MAX_PATH_SHOWN = 10
"""Ids of a cycle printed in a message; the rest are counted (``… 4990 more``). `path` has them all."""

PRIORITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}

_STATUS_REASONS = {
    "completed": "completed",
    "in_progress": "in progress",
    "failed": "failed; move it back to pending to retry",
    "blocked": "blocked; move it back to pending once the problem is solved",
}
_CAUSES = {"error": "has an error", "cycle": "is in a dependency cycle", "failed": "failed", "blocked": "is blocked"}


# --- results ---------------------------------------------------------------------------------------


class PlanItem(BaseModel):
    """One item as the plan sees it. `blocked_by`/`blocks` hold every edge, from either side."""

    id: str
    file: str
    title: str
    status: str
    blocked_by: list[str]
    blocks: list[str]
    files: list[str]
    components: list[str]
    priority: str
    estimate: float | None
    """Seconds, as written in the item; None when it has no `estimate`."""
    isolation: str | None = omitted_if_none()
    """The item's own `isolation` (none | worktree); None (left out) when `runner.isolation` decides."""
    integration_estimate: float | None = omitted_if_none()
    """Seconds its integration is expected to take (part of its predicted time); None (left out): not isolated."""
    forecast: list[str] | None = omitted_if_none()
    """An in-progress isolated item: the files its branch would conflict on if integrated into the
    target now (``git merge-tree``; empty: none). None when it has no branch to ask about."""
    ready: bool
    waiting_on: list[str]
    reason: str | None


class Conflict(BaseModel):
    """Two items that must not run together, and the files or components they share."""

    a: str
    b: str
    files: list[str]
    components: list[str]


class PredictedConflict(BaseModel):
    """Two items whose declared files or components overlap but which may run together (isolated,
    with ``integration.allow_overlap``): the integration queue decides whether they really conflict."""

    a: str
    b: str
    files: list[str]
    components: list[str]
    forecast: list[str] | None = Field(default=None, description=(
        "when both have a branch (in progress): the files git predicts would conflict between them "
        "(`git merge-tree`; empty: none); None when it cannot be asked yet"))


class ConflictGroup(BaseModel):
    """One `files` entry or component that keeps items apart, listed once with the items declaring it."""

    kind: Literal["file", "component"]
    name: str = Field(description="the files entry (a path, directory or glob) or the component, as written")
    items: list[str] = Field(description="the pending or in-progress items declaring it: no two of them run "
                                         "together")
    overlaps: list[str] = Field(description="other files entries that overlap this one (a directory and a path "
                                            "under it, globs that can match a common path, '.'): no item here runs "
                                            f"beside an item of those groups; at most {MAX_OVERLAPS_SHOWN}")
    overlaps_total: int = Field(description="how many entries overlap this one in all")


class ForkJoin(BaseModel):
    """Items that fan out from `fork` and meet again at `join`."""

    fork: str
    branches: list[str]
    join: str


class Patterns(BaseModel):
    fork_join: list[ForkJoin]
    pipelines: list[list[str]]


class QueuePlan(BaseModel):
    """The `queue_plan` result (field names are the contract in TOOLS.md)."""

    items: list[PlanItem]
    run_now: list[str]
    waves: list[list[str]] = Field(description=f"the predicted schedule: each wave the ids that start together, in "
                                               f"order; a `queue_plan` answer lists the first {MAX_WAVES_SHOWN}")
    waves_total: int = Field(default=0, description="how many waves the predicted schedule has in all")
    critical_path: list[str]
    conflicts: list[Conflict] = Field(description=f"pairs of items that never run together, in id order; at most "
                                                  f"{MAX_CONFLICTS_SHOWN} (see conflicts_total and conflict_groups)")
    conflicts_total: int = Field(description="how many pairs of items conflict in all")
    conflict_groups: list[ConflictGroup] = Field(description="every files entry or component that makes items "
                                                             "conflict, once, with the items declaring it")
    patterns: Patterns
    errors: list[Diagnostic]
    warnings: list[Diagnostic]
    max_parallel: int
    predicted_makespan: float
    lower_bound: float
    mermaid: str
    isolation: str = Field(default="none", description="runner.isolation: how items without their own "
                                                       "`isolation` run (none | worktree)")
    allow_overlap: bool = Field(default=False, description="integration.allow_overlap: isolated items with "
                                                           "overlapping files may run together")
    integration_estimate: float | None = Field(default=None, description=(
        "seconds each isolated item's integration is expected to take (the median of the last measured ones, "
        "else a default), included in the prediction; None when no item is isolated"))
    integration_samples: int = Field(default=0, description="measured integrations the estimate comes from "
                                                            "(0: the default)")
    predicted_conflicts: list[PredictedConflict] = Field(default_factory=list, description=(
        f"declared overlaps allowed to run together (isolated items, allow_overlap), at most "
        f"{MAX_CONFLICTS_SHOWN}: possible integration conflicts"))
    predicted_conflicts_total: int = 0


class QueuePlanPage(QueuePlan):
    """The `queue_plan` tool's answer: the plan with one page of `items` (`page_plan`).

    A queue of 10,000 items makes a plan of about 4 MB that no agent reads whole and no client
    parses quickly; the page keeps the answer bounded. The fields about the page's items are cut to
    the page: `conflicts` (the pairs with an item of the page) and `conflict_groups` (the entries an
    item of the page declares) and `patterns` (the fork-joins and pipelines with an item of the page).
    `waves` lists the first ``MAX_WAVES_SHOWN`` (10,000 items make some 9,000 waves, a third of the
    answer). `errors` and `warnings` list at most ``MAX_DIAGNOSTICS_SHOWN`` each, those about the page's
    items (or about no item) first. The rest stays whole: `run_now`, `critical_path` and the totals;
    `mermaid` is drawn in part beyond ``MERMAID_MAX_NODES`` items (a comment says so). A queue that
    fits in one page, with at most ``MAX_WAVES_SHOWN`` waves and ``MAX_DIAGNOSTICS_SHOWN`` errors and
    warnings, is answered exactly as the whole plan, plus the two fields below."""

    total_items: int = Field(description="how many items the queue has (rows of the whole plan)")
    next_offset: int | None = Field(description="the `offset` of the next page of items; None on the last page")
    errors_total: int | None = omitted_if_none(
        f"how many errors there are, when `errors` lists only {MAX_DIAGNOSTICS_SHOWN}: those about this page's "
        "items first")
    warnings_total: int | None = omitted_if_none(
        f"how many warnings there are, when `warnings` lists only {MAX_DIAGNOSTICS_SHOWN}: those about this "
        "page's items first")


# --- the graph ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IsolationPolicy:
    """What the planner needs to know about isolation (plain data, passed in: the planner reads nothing):
    the default (``runner.isolation``), ``integration.allow_overlap`` and the expected integration time."""

    default: str = "none"
    allow_overlap: bool = False
    integration_s: float = 0.0
    integration_samples: int = 0

    def isolated(self, item: WorkItem) -> bool:
        return item.runs_isolated(self.default)


NO_ISOLATION = IsolationPolicy()


@dataclass
class QueueGraph:
    """Everything the planner and the run engine need to know about a queue, computed once."""

    items: list[WorkItem]
    """Every item, sorted by id and file (duplicates included)."""
    by_id: dict[int, WorkItem]
    """Items with a unique id: the nodes of the graph."""
    labels: dict[int, str]
    """Id -> its spelling in the file name (``007``), for every id seen in a file name."""
    waits_on: dict[int, list[int]]
    """Node -> nodes it waits for (from its `blocked_by` and their `blocks`), sorted."""
    unblocks: dict[int, list[int]]
    """Node -> nodes waiting for it, sorted."""
    errors: list[Diagnostic]
    warnings: list[Diagnostic]
    cycles: list[list[int]]
    """Strongly connected components of two or more items: each one holds at least one cycle."""
    reasons: dict[str, str] = field(default_factory=dict)
    """File name -> why the item cannot run now (absent for ready items)."""
    waiting_on: dict[str, list[int]] = field(default_factory=dict)
    """File name of a pending item -> ids it still waits for (not completed), broken ones included."""
    schedulable: list[int] = field(default_factory=list)
    """Pending items that will run once what they wait on completes, in rank order."""
    in_progress: list[int] = field(default_factory=list)
    estimate_ms: dict[int, int] = field(default_factory=dict)
    """Estimate of every schedulable and in-progress item, defaults applied."""
    remaining_ms: dict[int, int] = field(default_factory=dict)
    """Longest estimate-weighted path from the item to the end, its own estimate included."""
    unblocks_count: dict[int, int] = field(default_factory=dict)
    """How many schedulable items transitively wait on the item."""
    rank: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    """Priority key of every schedulable item; smaller runs first."""
    position: dict[int, int] = field(default_factory=dict)
    """Schedulable and in-progress items -> index in one topological order (their bit in `reach`)."""
    reach: dict[int, int] = field(default_factory=dict, repr=False)
    """Schedulable and in-progress items -> bitset of the item itself and every item waiting on it."""
    conflict_index: ConflictIndex = field(default_factory=lambda: ConflictIndex(()))
    """Which pending or in-progress nodes must not run together, by the files and components they hold."""
    conflicts: Mapping[int, frozenset[int]] = field(default_factory=dict)
    """Pending or in-progress node with a conflict -> the nodes it must not run beside (built on demand)."""
    isolation: IsolationPolicy = NO_ISOLATION
    integration_ms: dict[int, int] = field(default_factory=dict)
    """Schedulable and in-progress isolated items -> their expected integration (part of `estimate_ms`)."""
    isolated: frozenset[int] = frozenset()
    """Nodes that run isolated."""
    declared_index: ConflictIndex | None = None
    """With ``allow_overlap`` and isolated items: the conflicts as declared, isolated items included
    (`conflict_index` leaves them out); its pairs with an isolated item are the predicted conflicts."""

    def label(self, item_id: int) -> str:
        """How results spell an id: as in its file name, else zero-padded to three digits."""
        return self.labels.get(item_id) or format_id(item_id)


def build_graph(items: Sequence[WorkItem], diagnostics: Sequence[Diagnostic] = (),
                isolation: IsolationPolicy = NO_ISOLATION) -> QueueGraph:
    """Validate the queue and compute readiness, ranks and conflicts. Never raises for bad input."""
    items = sorted(items, key=lambda item: (item.id, item.file))
    errors = [d for d in diagnostics if d.is_error]
    warnings = [d for d in diagnostics if not d.is_error]
    by_id, labels, broken_ids = _index_ids(items, errors)
    waits_on, waits_on_broken = _edges(items, by_id, broken_ids, errors)
    unblocks: dict[int, list[int]] = {item_id: [] for item_id in by_id}
    for item_id, preds in waits_on.items():
        for pred in preds:
            unblocks[pred].append(item_id)
    graph = QueueGraph(items=items, by_id=by_id, labels=labels, waits_on=waits_on, unblocks=unblocks,
                       errors=errors, warnings=warnings,
                       cycles=strongly_connected_components(list(by_id), waits_on), isolation=isolation)
    if isolation != NO_ISOLATION:
        graph.isolated = frozenset(item_id for item_id, item in by_id.items() if isolation.isolated(item))
    _readiness(graph, waits_on_broken)
    _weigh(graph)
    active = [item for item in by_id.values() if item.status in ("pending", "in_progress")]
    if isolation.allow_overlap and any(item.id in graph.isolated for item in active):
        graph.declared_index = ConflictIndex(active)
        active = [item for item in active if item.id not in graph.isolated]
    graph.conflict_index = ConflictIndex(active)
    graph.conflicts = _Neighbours(graph.conflict_index)
    _warn_assumed(graph, graph.declared_index or graph.conflict_index)
    graph.errors.sort(key=_diagnostic_order)
    graph.warnings.sort(key=_diagnostic_order)
    return graph


def _warn_assumed(graph: QueueGraph, index: ConflictIndex) -> None:
    """One warning per item holding a pattern the conflict index could not afford to compare."""
    assumed = set(index.overlaps.assumed)
    if not assumed:
        return
    for item in graph.items:
        entry = next((entry for entry in item.files if entry in assumed), None)
        if entry is not None and item.id in index.keys:
            why, fix = (("overlapping patterns", "declare directories, or patterns that start and end with *")
                        if is_glob(entry) else
                        ("nested paths", "declare the directory they share instead of each path below it"))
            graph.warnings.append(Diagnostic(
                kind="overlap_assumed", item=item.id_str, file=item.file,
                message=f"files: {short_repr(entry)} is taken to overlap every file, so the item never runs beside "
                        f"another that declares files: the queue holds too many {why} to compare one by "
                        f"one ({len(assumed):,} were not); {fix}"))


class _Neighbours(Mapping[int, frozenset[int]]):
    """`QueueGraph.conflicts`: each node's neighbour set, built only when asked for."""

    def __init__(self, index: ConflictIndex) -> None:
        self._index = index

    def __getitem__(self, item_id: int) -> frozenset[int]:
        if item_id not in self._index.keys or not self._index.has_conflict(item_id):
            raise KeyError(item_id)
        return self._index.neighbours(item_id)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, int) and item_id in self._index.keys and self._index.has_conflict(item_id)

    def __iter__(self) -> Iterator[int]:
        return (item_id for item_id in self._index.keys if self._index.has_conflict(item_id))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _error(errors: list[Diagnostic], kind: str, item: WorkItem, message: str, path: list[str] | None = None) -> None:
    errors.append(Diagnostic(kind=kind, item=item.id_str, file=item.file, message=message, path=path))


def _diagnostic_order(diagnostic: Diagnostic) -> tuple[Any, ...]:
    return (diagnostic.file is None, diagnostic.file or "", diagnostic.kind, diagnostic.message)


def _index_ids(items: list[WorkItem], errors: list[Diagnostic]
               ) -> tuple[dict[int, WorkItem], dict[int, str], set[int]]:
    """Nodes (items with a unique id), id spellings, and broken ids: duplicates, and ids known
    only from an error (a file whose name is wrong but starts with an id)."""
    files_by_id: dict[int, list[WorkItem]] = {}
    labels: dict[int, str] = {}
    for item in items:
        files_by_id.setdefault(item.id, []).append(item)
        labels.setdefault(item.id, item.id_str)
    by_id = {item_id: same[0] for item_id, same in files_by_id.items() if len(same) == 1}
    broken_ids = set()
    for item_id, same in files_by_id.items():
        if len(same) > 1:
            names = ", ".join(item.file for item in same)
            for item in same:
                _error(errors, "duplicate_id", item, f"id {item.id_str} is used by {len(same)} files: {names}")
            broken_ids.add(item_id)
    for diagnostic in list(errors):
        if diagnostic.item and diagnostic.item.isdigit() and int(diagnostic.item) not in files_by_id:
            broken_ids.add(int(diagnostic.item))
            labels.setdefault(int(diagnostic.item), diagnostic.item)
    return by_id, labels, broken_ids


def _edges(items: list[WorkItem], by_id: dict[int, WorkItem], broken_ids: set[int], errors: list[Diagnostic]
           ) -> tuple[dict[int, list[int]], dict[int, set[int]]]:
    """Who waits on whom, from both `blocked_by` and `blocks`; self and dangling references are
    errors. Also: node -> broken ids it waits on (a duplicate's `blocks` counts too)."""
    waits: dict[int, set[int]] = {item_id: set() for item_id in by_id}
    waits_on_broken: dict[int, set[int]] = {}
    for item in items:
        if item.id not in by_id:
            for target in item.blocks:
                if target in by_id:
                    waits_on_broken.setdefault(target, set()).add(item.id)
            continue
        for field_name, refs in (("blocked_by", item.blocked_by), ("blocks", item.blocks)):
            for ref in refs:
                if ref == item.id:
                    _error(errors, "self_reference", item, f"{field_name} refers to the item itself ({item.id_str})")
                elif ref in by_id:
                    if field_name == "blocked_by":
                        waits[item.id].add(ref)
                    else:
                        waits[ref].add(item.id)
                elif ref in broken_ids:
                    if field_name == "blocked_by":
                        waits_on_broken.setdefault(item.id, set()).add(ref)
                else:
                    _error(errors, "dangling_ref", item,
                           f"{field_name} refers to {format_id(ref)}, which does not exist")
    return {item_id: sorted(preds) for item_id, preds in waits.items()}, waits_on_broken


def _readiness(graph: QueueGraph, waits_on_broken: dict[int, set[int]]) -> None:
    """Cycle errors, then why each item is not ready, and which pending items can be scheduled."""
    by_id, label, labels, reasons = graph.by_id, graph.label, graph.labels, graph.reasons
    cycle_members: set[int] = set()
    for component in graph.cycles:
        path = cycle_path(component, graph.waits_on)
        start = label(path[0])
        _error(graph.errors, "cycle", by_id[path[0]],
               f"dependency cycle: {show_path([label(node) for node in path])} (each item waits on the next)",
               [label(node) for node in path])
        on_path = set(path)
        if len(path) - 1 <= MAX_PATH_SHOWN:
            shown = show_path([label(node) for node in path])
            member = f"in a dependency cycle: {shown}"
            other = f"in a group of items that wait on each other (see the cycle {shown})"
        else:  # a long cycle is printed once, in its error
            member = f"in a dependency cycle of {len(path) - 1} items (see the cycle error for {start})"
            other = (f"in a group of {len(component)} items that wait on each other "
                     f"(see the cycle error for {start})")
        for node in component:
            cycle_members.add(node)
            reasons[by_id[node].file] = member if node in on_path else other

    first_error: dict[str, str] = {}
    for diagnostic in graph.errors:
        if diagnostic.file is not None and diagnostic.kind != "cycle":
            first_error.setdefault(diagnostic.file, diagnostic.message)
    # One pass over the items for what their status alone decides; the nodes (not duplicates) that are
    # done, failed or blocked are noted for the passes below, which then look at no other item.
    completed: set[int] = set()
    troubled: list[WorkItem] = []
    for item in graph.items:
        status = item.status
        if status != "pending":
            reasons[item.file] = _STATUS_REASONS[status]
            if by_id.get(item.id) is item:
                if status == "completed":
                    completed.add(item.id)
                elif status != "in_progress":
                    troubled.append(item)
        elif item.file in first_error and item.file not in reasons:
            reasons[item.file] = f"has an error: {first_error[item.file]}"

    causes: dict[int, str] = {}
    if first_error or cycle_members:
        for item_id, item in by_id.items():
            if item.status != "completed" and (item.file in first_error or item_id in cycle_members):
                causes[item_id] = "error" if item.file in first_error else "cycle"
    stuck = _spread_trouble(by_id, graph.unblocks, causes, waits_on_broken)
    for item in troubled:  # failed or blocked, in id order
        if item.id not in causes:
            causes[item.id] = item.status
    stuck.update(_spread_trouble(by_id, graph.unblocks, causes, {}, skip=set(stuck)))

    waits_on, waiting_on, schedulable, in_progress = graph.waits_on, graph.waiting_on, graph.schedulable, []
    quiet: list[WorkItem] = []  # schedulable, then in-progress, items declaring neither files nor components
    for item_id, item in by_id.items():
        if item.status != "pending":
            if item.status == "in_progress":
                in_progress.append(item_id)
            continue
        preds = waits_on[item_id]
        open_preds = [pred for pred in preds if pred not in completed] if preds else []
        broken = waits_on_broken.get(item_id)
        waiting_on[item.file] = sorted(open_preds + list(broken)) if broken else open_preds
        if item.file in reasons:
            continue
        if item_id in stuck:
            via, root = stuck[item_id]
            cause = _CAUSES[causes.get(root, "error")]
            reasons[item.file] = (f"waits on {label(via)}, which {cause}" if via == root
                                  else f"waits on {label(via)}, which cannot run: {label(root)} {cause}")
            continue
        schedulable.append(item_id)
        if not item.files and not item.components:
            quiet.append(item)
        if open_preds:
            reasons[item.file] = "waits on " + ", ".join([labels[pred] for pred in open_preds])
    graph.in_progress.extend(in_progress)
    quiet.extend(item for item in map(by_id.__getitem__, in_progress) if not item.files and not item.components)
    for item in quiet:
        graph.warnings.append(Diagnostic(
            kind="no_files", item=item.id_str, file=item.file,
            message="declares neither files nor components, so it is treated as independent of every other item"))


def show_path(labels: Sequence[str], limit: int = MAX_PATH_SHOWN) -> str:
    """``001 -> 002 -> 001``; a longer path keeps its first `limit` ids, a count, and its last id."""
    if len(labels) <= limit + 1:
        return " -> ".join(labels)
    return " -> ".join(labels[:limit]) + f" -> … {len(labels) - limit - 1} more -> {labels[-1]}"


def _spread_trouble(by_id: dict[int, WorkItem], unblocks: dict[int, list[int]], causes: dict[int, str],
                    waits_on_broken: dict[int, set[int]], skip: AbstractSet[int] = frozenset()
                    ) -> dict[int, tuple[int, int]]:
    """Pending items behind a troubled item: item -> (the item it directly waits on, the root cause).

    Breadth first from every cause in id order, so each item names its nearest trouble. Trouble
    passes only through pending items: a completed item is done whatever its history.
    """
    stuck: dict[int, tuple[int, int]] = {}
    queue: deque[tuple[int, int, int]] = deque()
    for root in sorted(causes):
        for successor in unblocks[root]:
            queue.append((successor, root, root))
    for item_id in sorted(waits_on_broken):
        broken = min(waits_on_broken[item_id])
        queue.append((item_id, broken, broken))
    while queue:
        node, via, root = queue.popleft()
        if node in stuck or node in skip or node in causes or by_id[node].status != "pending":
            continue
        stuck[node] = (via, root)
        for successor in unblocks[node]:
            queue.append((successor, node, root))
    return stuck


def _weigh(graph: QueueGraph) -> None:
    """Estimates, remaining critical path, transitive unblock counts and ranks of runnable items.

    In-progress items count as started at time 0 and wait on nothing; what they wait on is moot.
    """
    active = graph.schedulable + graph.in_progress
    pending = set(graph.schedulable)
    by_id = graph.by_id
    default_ms = round(1000 * DEFAULT_ESTIMATE_S)
    estimate = graph.estimate_ms = {
        item_id: default_ms if (seconds := by_id[item_id].estimate_s) is None else round(1000 * seconds)
        for item_id in active}
    integration_ms = round(1000 * graph.isolation.integration_s)
    if integration_ms > 0 and graph.isolated:
        graph.integration_ms = {item_id: integration_ms for item_id in active if item_id in graph.isolated}
        for item_id in graph.integration_ms:
            estimate[item_id] += integration_ms
    unblocks = graph.unblocks
    successors = {item_id: [s for s in unblocks[item_id] if s in pending] if unblocks[item_id] else []
                  for item_id in active}
    order = topological_order(active, successors)
    graph.position = {item_id: index for index, item_id in enumerate(order)}
    reach, remaining, unblocks_count = graph.reach, graph.remaining_ms, graph.unblocks_count
    for index in range(len(order) - 1, -1, -1):  # last first: an item's successors come after it
        item_id = order[index]
        mask = 1 << index
        longest = 0
        for successor in successors[item_id]:
            mask |= reach[successor]
            if remaining[successor] > longest:
                longest = remaining[successor]
        reach[item_id] = mask
        remaining[item_id] = estimate[item_id] + longest
        unblocks_count[item_id] = mask.bit_count() - 1
    waits_on = graph.waits_on
    graph.rank = {
        item_id: (-remaining[item_id], -unblocks_count[item_id],
                  PRIORITY_ORDER[by_id[item_id].priority], len(waits_on[item_id]), item_id)
        for item_id in graph.schedulable
    }
    graph.schedulable.sort(key=graph.rank.__getitem__)


def topological_order(nodes: Iterable[int], successors: Mapping[int, Sequence[int]]) -> list[int]:
    """Kahn's algorithm, smallest id first among the available; `successors` must be acyclic."""
    nodes = list(nodes)
    indegree = dict.fromkeys(nodes, 0)
    for node in nodes:
        for successor in successors[node]:
            indegree[successor] += 1
    available = [node for node in nodes if indegree[node] == 0]
    heapq.heapify(available)
    order = []
    while available:
        node = heapq.heappop(available)
        order.append(node)
        for successor in successors[node]:
            indegree[successor] -= 1
            if indegree[successor] == 0:
                heapq.heappush(available, successor)
    if len(order) != len(nodes):
        raise InternalError("topological_order was given a graph with a cycle")
    return order


def strongly_connected_components(nodes: Sequence[int], edges: Mapping[int, Sequence[int]]) -> list[list[int]]:
    """Tarjan's algorithm with an explicit stack: components of two or more nodes, each sorted.

    No recursion, so a 10,000-deep chain needs no raised recursion limit. Nodes that cannot be on
    a cycle are peeled off first (Kahn: repeatedly drop nodes nothing left points to), so an
    acyclic queue, the usual one, costs one linear pass.
    """
    left = _on_cycles_or_after(nodes, edges)
    if not left:
        return []
    nodes = [node for node in nodes if node in left]
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    components: list[list[int]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter([other for other in edges[root] if other in left]))]
        while work:
            node, successors = work[-1]
            descended = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter([other for other in edges[successor] if other in left])))
                    descended = True
                    break
                if successor in on_stack and index[successor] < low[node]:
                    low[node] = index[successor]
            if descended:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                if low[node] < low[parent]:
                    low[parent] = low[node]
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    components.sort()
    return components


def _on_cycles_or_after(nodes: Sequence[int], edges: Mapping[int, Sequence[int]]) -> Mapping[int, object]:
    """`nodes` less those Kahn's algorithm peels off (no edge from a node left points to them):
    what remains holds every cycle. Everything when an edge leaves `nodes` (then nothing is peeled)."""
    indegree = dict.fromkeys(nodes, 0)
    for node in nodes:
        for successor in edges[node]:
            if successor not in indegree:
                return indegree
            indegree[successor] += 1
    free = [node for node, count in indegree.items() if count == 0]
    while free:
        node = free.pop()
        del indegree[node]
        for successor in edges[node]:
            indegree[successor] -= 1
            if indegree[successor] == 0:
                free.append(successor)
    return indegree


def cycle_path(component: Sequence[int], edges: Mapping[int, Sequence[int]]) -> list[int]:
    """A shortest closed path through the smallest id of a strongly connected component.

    Returns ``[start, ..., start]``; each step follows an edge of `edges` inside the component.
    """
    members = set(component)
    start = min(component)
    parent: dict[int, int] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in edges[node]:
            if successor == start:
                path = [start]
                while node != start:
                    path.append(node)
                    node = parent[node]
                path.append(start)
                path[1:-1] = reversed(path[1:-1])
                return path
            if successor in members and successor not in parent:
                parent[successor] = node
                queue.append(successor)
    raise InternalError(f"no cycle through {start} in a strongly connected component")


# --- scheduling ----------------------------------------------------------------------------------------


class Scheduler:
    """Hands out the next items to start; the simulation and the live run engine both drive it.

    Create it when the run starts, call `start_next(free_slots)` whenever slots are free and
    `finished(item_id, ok)` when an item ends. It never starts an item before everything it waits
    on has completed, nor beside a running item it conflicts with, and it starts the best-ranked
    candidates first. Items in progress when it is created count as running.

    `only` restricts the run to those ids and the pending items they need; `rank` replaces the
    priority key (benchmarks use it to compare rules).
    """

    def __init__(self, graph: QueueGraph, *, only: Iterable[int] | None = None,
                 rank: Mapping[int, Any] | None = None, running: Iterable[int] = ()) -> None:
        self._graph = graph
        members = set(graph.schedulable)
        if only is not None:
            members = _needed(set(only), graph.waits_on) & members
        self._members = members
        key = rank.__getitem__ if rank is not None else graph.rank.__getitem__
        self._order = sorted(members, key=key)
        self._position = {item_id: index for index, item_id in enumerate(self._order)}
        self.running: set[int] = set(graph.in_progress) | set(running)
        self.done: set[int] = set()
        self.failed: set[int] = set()
        self.skipped: dict[int, int] = {}
        """Item -> the failed item it (transitively) waits on."""
        running = self.running
        self._missing = {
            item_id: len([pred for pred in graph.waits_on[item_id] if pred in members or pred in running])
            for item_id in members
        }
        # Conflicts are checked by counters over what running items hold (`ConflictIndex.marks` and
        # `checks`), not pair by pair.
        self._taken: dict[Mark, int] = {}
        """Counter -> how many running items raise it."""
        self._holding: set[int] = set()
        """The running items counted in `_taken` (`running` may also be changed from outside)."""
        self._freed: list[Mark] = []
        """Counters that fell to zero since the last `_sync_taken` (unparked there, as before a start)."""
        # The ready items are kept in one of two ways. With few counters and many distinct key sets,
        # as bits (`_ReadyBits`, chosen by `_bit_counters`). Otherwise parked: a ready item blocked
        # by a conflict waits in `_parked` under the counter that blocks it; when that counter falls
        # to zero, only its best parked entry returns to `_ready` (the next one when that one is
        # blocked elsewhere). So 1,000 items sharing a component cost O(n log n) to schedule, not a
        # scan of every waiting item per start.
        #
        # Ready items with the same checks ("twins": the same components, say) are blocked by the
        # same running items, so only the best of them is listed in `_ready` or `_parked`; the others
        # wait behind it in `_twins`. 10,000 items drawing 2 components of 10 make 45 listings, not
        # 10,000 that each park again whenever a counter falls to zero.
        #
        # A listing is one int, ``position << 32 | ticket``: heaps order it by rank, and the ticket
        # (new for every listing) tells the one valid listing of a class from stale copies.
        counters = _bit_counters(graph.conflict_index)
        self._bits = _ReadyBits(graph.conflict_index, counters) if counters is not None else None
        """The ready items as bits (then nothing is parked or listed below), or None."""
        self._ready: list[int] = []
        """Heap of listings that may start now (stale ones are skipped)."""
        self._parked: dict[Mark, list[int]] = {}
        """Counter above zero -> heap of the listings it blocks."""
        self._listed: dict[int, int] = {}
        """Twin class -> its one valid listing."""
        self._place: dict[int, Mark | None] = {}
        """Twin class -> the counter its listing is parked under, or None for `_ready`."""
        self._twins: dict[int, list[int]] = {}
        """Twin class -> heap of the positions of its ready members; the listing is at the first."""
        self._class_at: list[int] = (
            list(map(graph.conflict_index.twin_class, self._order)) if self._bits is None else [])
        """Position in rank order -> its item's twin class (asked for at every start and every listing)."""
        self._marks = graph.conflict_index.marks
        self._tickets = 0
        self._promoted: dict[int, Mark] = {}
        """Listing in `_ready` -> the counter whose parked heap it came from."""
        missing, class_at, twins = self._missing, self._class_at, self._twins
        for position, item_id in enumerate(self._order):  # in rank order, so each list below is a heap
            if missing[item_id] == 0:
                if self._bits is not None:
                    self._bits.add(position, item_id)
                else:
                    twins.setdefault(class_at[position], []).append(position)
        for number, (listed, positions) in enumerate(twins.items(), start=1):
            self._listed[listed] = positions[0] << 32 | number
            self._place[listed] = None
            self._ready.append(self._listed[listed])
        self._tickets = len(twins)

    def _list(self, twin_class: int, position: int, place: Mark | None) -> int:
        """List a twin class at `position` in `_ready` (place None) or parked under `place`; any
        earlier listing of the class goes stale. Returns the new listing."""
        self._tickets += 1
        listing = self._listed[twin_class] = position << 32 | self._tickets
        self._place[twin_class] = place
        heapq.heappush(self._ready if place is None else self._parked.setdefault(place, []), listing)
        return listing

    def _became_ready(self, item_id: int) -> None:
        """Everything `item_id` waits on is done: set its bit, list it, or queue it behind its listed twin."""
        if self._bits is not None:
            self._bits.add(self._position[item_id], item_id)
            return
        position = self._position[item_id]
        twin_class = self._class_at[position]
        twins = self._twins.get(twin_class)
        if twins is None:
            self._twins[twin_class] = [position]
            self._list(twin_class, position, None)
            return
        heapq.heappush(twins, position)
        if twins[0] == position:  # better than the listed twin: listed in its place, at its own rank
            old, place = self._listed[twin_class], self._place[twin_class]
            if place is not None and not self._taken.get(place):
                place = None  # its counter fell to zero; whether it may start is checked afresh, as for a new item
            new = self._list(twin_class, position, place)
            if (source := self._promoted.pop(old, None)) is not None:
                self._promoted[new] = source

    def _sync_taken(self) -> None:
        """Count the keys of items that started running, uncount those that stopped, unpark what frees.

        `finished` uncounts its item at once (into `_freed`); here the rest: `running` changed from
        outside, then the unparking."""
        marks, taken = self._graph.conflict_index.marks, self._taken
        freed, self._freed = self._freed, []
        if self._holding != self.running:
            for item_id in self._holding - self.running:
                for mark in marks(item_id):
                    taken[mark] -= 1
                    if not taken[mark]:
                        freed.append(mark)
            for item_id in self.running - self._holding:
                for mark in marks(item_id):
                    taken[mark] = taken.get(mark, 0) + 1
            self._holding = set(self.running)
        for mark in freed:
            if not taken.get(mark):
                self._unpark(mark)

    def _unpark(self, mark: Mark) -> None:
        """Return the best listing parked under a counter that fell to zero to the ready heap."""
        parked = self._parked.get(mark)
        while parked:
            listing = heapq.heappop(parked)
            position = listing >> 32
            twin_class = self._class_at[position]
            if self._listed.get(twin_class) == listing:
                self._promoted[self._list(twin_class, position, None)] = mark
                break
        if not parked:
            self._parked.pop(mark, None)

    def ready(self) -> list[int]:
        """Items that could start now if nothing conflicted, best first."""
        if self._bits is not None:
            return [self._order[position] for position in _set_bits(self._bits.positions)]
        return [self._order[position] for position in sorted(p for twins in self._twins.values() for p in twins)]

    def start_next(self, free_slots: int) -> list[int]:
        """Start up to `free_slots` ready items that conflict with nothing running; best first."""
        self._sync_taken()
        if self._bits is not None:
            return self._start_fitting(self._bits, free_slots)
        started: list[int] = []
        checks, taken, ready, listed = self._graph.conflict_index.checks, self._taken, self._ready, self._listed
        while len(started) < free_slots and ready:
            listing = heapq.heappop(ready)
            source = self._promoted.pop(listing, None) if self._promoted else None
            position = listing >> 32
            item_id = self._order[position]
            twin_class = self._class_at[position]
            if listed.get(twin_class) != listing:
                continue  # stale: the class was listed again (a promotion moves to the new ticket)
            blocker = None
            for mark in checks(item_id):
                if taken.get(mark):
                    blocker = mark
                    break
            if blocker is None:
                self._run(item_id)
                started.append(item_id)
                twins = self._twins[twin_class]
                heapq.heappop(twins)
                if twins:  # the next twin is checked when its turn comes (most often this one has ended by then)
                    self._list(twin_class, twins[0], None)
                else:
                    del self._twins[twin_class], self._listed[twin_class], self._place[twin_class]
            else:
                self._list(twin_class, position, blocker)
            if source is not None and not taken.get(source):
                self._unpark(source)  # its counter is still free: the next listing parked there may start
        return started

    def _start_fitting(self, bits: _ReadyBits, free_slots: int) -> list[int]:
        """`start_next` with the ready items as bits: again and again, the best one none of whose
        checks is raised (counting what it raises in turn)."""
        marks, taken = self._graph.conflict_index.marks, self._taken
        raised = bits.numbers(mark for mark, count in taken.items() if count)
        blocked = bits.blocked(raised)
        started: list[int] = []
        while len(started) < free_slots:
            position = bits.best(blocked)
            if position is None:
                break
            item_id = self._order[position]
            bits.remove(position)
            self._run(item_id)
            started.append(item_id)
            newly = bits.numbers(marks(item_id)) - raised
            raised |= newly
            blocked |= bits.blocked(newly)
        return started

    def _run(self, item_id: int) -> None:
        """Start `item_id`: what `_sync_taken` would do for this one start, without comparing sets."""
        self.running.add(item_id)
        self._holding.add(item_id)
        taken = self._taken
        for mark in self._marks(item_id):
            taken[mark] = taken.get(mark, 0) + 1

    def finished(self, item_id: int, ok: bool) -> list[int]:
        """Record that a running item ended; on failure return the items now skipped because of it.

        An id that is not running is ignored, so reporting an end twice changes nothing.
        """
        if item_id not in self.running:
            return []
        self.running.remove(item_id)
        if item_id in self._holding:  # what _sync_taken would do for this one end, without comparing sets
            self._holding.remove(item_id)
            taken = self._taken
            for mark in self._marks(item_id):
                taken[mark] -= 1
                if not taken[mark]:
                    self._freed.append(mark)
        if ok:
            self.done.add(item_id)
            members, skipped, missing = self._members, self.skipped, self._missing
            for successor in self._graph.unblocks.get(item_id, ()):
                if successor in members and successor not in skipped:
                    missing[successor] -= 1
                    if not missing[successor]:
                        self._became_ready(successor)
            return []
        self.failed.add(item_id)
        newly: list[int] = []
        queue = deque(self._graph.unblocks.get(item_id, ()))
        while queue:  # none of these can be ready, running or done: each waits on the failure
            node = queue.popleft()
            if node in self._members and node not in self.skipped:
                self.skipped[node] = item_id
                newly.append(node)
                queue.extend(self._graph.unblocks[node])
        return newly

    def not_started(self) -> list[int]:
        """Members neither started nor skipped yet, in rank order."""
        return [item_id for item_id in self._order
                if item_id not in self.done and item_id not in self.running
                and item_id not in self.skipped and item_id not in self.failed]

    @property
    def idle(self) -> bool:
        """Nothing running and nothing ready: the run is over (or stuck on conflicts with nothing)."""
        return not self.running and not (self._twins if self._bits is None else self._bits.positions)


def _bit_counters(index: ConflictIndex) -> dict[Mark, int] | None:
    """The counters, numbered, when a scheduler does better keeping its ready items as bits
    (`_ReadyBits`) than parking them; else None.

    Bits pay with few counters and more distinct key sets (twin classes) than counters. Parking wakes
    one listing per key set waiting whenever a counter falls to zero: cheap while those are few (each
    item holding one of ten components), millions with thousands (5,000 items each drawing 4 of 20
    components: 2.2 million). Bits cost a few operations on ints of a bit per item, however many wait."""
    counters = index.counter_bits
    return counters if counters is not None and index.twin_classes() > len(counters) else None


class _ReadyBits:
    """A scheduler's ready items as bitsets over their rank positions (see `_bit_counters`).

    The best item that may start is the lowest bit of `positions` less the items each raised counter
    blocks. Nothing is parked or woken, and the order is the parked structures': every ready item in
    rank order, started when nothing raised blocks it. Ready items started from outside stay listed
    there too (blocked by their own counters while they run).
    """

    def __init__(self, index: ConflictIndex, counters: dict[Mark, int]) -> None:
        self._index = index
        self._counters = counters
        """Counter -> its number."""
        self.positions = 0
        """Bit per ready item, at its position in rank order."""
        self._blocks = [0] * len(counters)
        """Counter's number -> the positions of the ready items it blocks while raised (all in `positions`)."""
        self._checks: dict[int, tuple[int, ...]] = {}
        """Position of a ready item -> the numbers of its checks."""

    def numbers(self, marks: Iterable[Mark]) -> set[int]:
        """The numbers of those counters (none checks the others, so they block nothing)."""
        counters = self._counters
        return {counters[mark] for mark in marks if mark in counters}

    def add(self, position: int, item_id: int) -> None:
        checks = self._checks[position] = tuple(self.numbers(self._index.checks(item_id)))
        bit = 1 << position
        self.positions |= bit
        blocks = self._blocks
        for number in checks:
            blocks[number] |= bit

    def remove(self, position: int) -> None:
        bit = 1 << position
        self.positions ^= bit
        blocks = self._blocks
        for number in self._checks.pop(position):
            blocks[number] ^= bit

    def blocked(self, raised: Iterable[int]) -> int:
        """The positions of the ready items that one of these counters (by number) blocks."""
        found = 0
        for number in raised:
            found |= self._blocks[number]
        return found

    def best(self, blocked: int) -> int | None:
        """The first ready position not in `blocked` (the ready positions some raised counter blocks)."""
        free = self.positions ^ blocked  # blocked is a part of positions: xor removes it, cheaper than & ~
        return (free & -free).bit_length() - 1 if free else None


@dataclass(frozen=True)
class ItemIndex:
    """The queue's items by id, and by the ids their `blocks` name: what `upstream_items` walks."""

    by_id: dict[int, tuple[WorkItem, ...]]
    blockers: dict[int, tuple[WorkItem, ...]]

    @classmethod
    def of(cls, items: Iterable[WorkItem]) -> ItemIndex:
        return cls({}, {}).changed((), items)

    def changed(self, removed: Iterable[WorkItem], added: Iterable[WorkItem]) -> ItemIndex:
        """A new index with these items (by file) taken out and put in; this one is left as it was."""
        by_id, blockers = dict(self.by_id), dict(self.blockers)
        for item in removed:
            for table, key in [(by_id, item.id), *((blockers, target) for target in item.blocks)]:
                kept = tuple(other for other in table.get(key, ()) if other.file != item.file)
                if kept:
                    table[key] = kept
                else:
                    table.pop(key, None)
        for item in added:
            by_id[item.id] = (*by_id.get(item.id, ()), item)
            for target in item.blocks:
                blockers[target] = (*blockers.get(target, ()), item)
        return ItemIndex(by_id, blockers)


def upstream_items(index: ItemIndex, item_id: int) -> list[WorkItem]:
    """The items with id `item_id` and every item they wait on, transitively (through `blocked_by`
    and others' `blocks`), with the items their `blocks` name (so none names a missing item).

    Readiness flows only from what an item waits on, so a graph of these gives `item_id` the same
    readiness and reason as the whole queue's: what `launch_task(item=...)` needs, from a handful of
    items instead of 10,000."""
    seen: set[int] = set()
    chosen: dict[str, WorkItem] = {}
    stack = [item_id]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for item in index.by_id.get(node, ()):
            chosen[item.file] = item
            stack.extend(item.blocked_by)
        for item in index.blockers.get(node, ()):
            chosen[item.file] = item
            stack.append(item.id)
    for item in list(chosen.values()):
        for target in item.blocks:
            chosen.update((other.file, other) for other in index.by_id.get(target, ()))
    return list(chosen.values())


def _needed(targets: set[int], waits_on: Mapping[int, Sequence[int]]) -> set[int]:
    """`targets` and everything they wait on, transitively."""
    needed = set()
    queue = deque(target for target in targets if target in waits_on)
    while queue:
        node = queue.popleft()
        if node in needed:
            continue
        needed.add(node)
        queue.extend(waits_on[node])
    return needed


@dataclass(frozen=True)
class Schedule:
    """A predicted run: when each item starts and ends (ms), and the batches started together.

    Each wave is what one free-slot event starts; two waves can share a start time only when
    zero-length items end at the instant they start.
    """

    start_ms: dict[int, int]
    end_ms: dict[int, int]
    waves: list[list[int]]
    wave_start_ms: list[int]
    makespan_ms: int
    first_started: list[int] = field(default_factory=list)
    """What the first `start_next` (on a fresh scheduler, at time 0) started, even when none ends at
    once: a fresh scheduler given fewer slots starts the first of these (it picks greedily, best
    first), so `plan_graph` takes `run_now` from here instead of building a second scheduler."""


def simulate(graph: QueueGraph, max_parallel: int, *, rank: Mapping[int, object] | None = None) -> Schedule:
    """List scheduling driven by estimates: whenever a slot frees, start the best ready items.

    In-progress items are taken to run from time 0 for their whole estimate. An isolated item's
    work is followed by its integration, in its slot, once no other integration holds the lock
    (first come, first served): its end is when its integration ends.
    """
    scheduler = Scheduler(graph, rank=rank)
    integration = graph.integration_ms
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    events: list[tuple[int, int, int]] = []
    """(time, 1 once integrated else 0, item): the item's work (or its integration) ends then."""
    for item_id in graph.in_progress:
        start[item_id] = 0
        heapq.heappush(events, (graph.estimate_ms[item_id] - integration.get(item_id, 0), 0, item_id))
    waves: list[list[int]] = []
    wave_start: list[int] = []
    lock_free = 0

    def launch(now: int) -> list[int]:
        started = scheduler.start_next(max_parallel - len(scheduler.running))
        if not started:
            return started
        waves.append(started)
        wave_start.append(now)
        for item_id in started:
            start[item_id] = now
            heapq.heappush(events, (now + graph.estimate_ms[item_id] - integration.get(item_id, 0), 0, item_id))
        return started

    first_started = launch(0)
    now = 0
    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            _, integrated, item_id = heapq.heappop(events)
            if not integrated and integration.get(item_id):
                lock_free = max(now, lock_free) + integration[item_id]
                heapq.heappush(events, (lock_free, 1, item_id))
                continue
            end[item_id] = now
            scheduler.finished(item_id, ok=True)
        launch(now)
    if scheduler.not_started():
        raise InternalError(f"the simulation left items unstarted: {scheduler.not_started()[:10]}")
    return Schedule(start, end, waves, wave_start, max(end.values(), default=0), first_started)


# --- bounds and patterns ----------------------------------------------------------------------------------


def lower_bound_ms(graph: QueueGraph, max_parallel: int) -> float:
    """``max(critical path, total work / slots, longest serial set, total integration)``: no schedule
    can beat it (integrations take turns, and an item holds its slot while integrated).

    The serial set is a greedy clique of items that pairwise conflict or wait on one another
    (with at most one in-progress item, since those already overlap): they can only run one after
    another. Slots are `max_parallel`, or more if more items are already in progress.
    """
    active = graph.schedulable + graph.in_progress
    if not active:
        return 0.0
    estimate = graph.estimate_ms
    critical = max(graph.remaining_ms.values())
    work = sum(estimate[item_id] for item_id in active) / max(max_parallel, len(graph.in_progress))
    return max(critical, work, _serial_bound(graph, active), sum(graph.integration_ms.values()))


_SERIAL_SEEDS = 16
_EXACT_WEIGHT_PAIRS = 100_000
"""Up to this many conflicting pairs, seeds are weighed pair by pair (exactly)."""
_SERIAL_BUDGET = 20_000
"""Candidate checks the serial bound may spend in all; it stays a valid bound when cut short."""


def _serial_bound(graph: QueueGraph, active: list[int]) -> int:
    """Sum of estimates of the heaviest greedy clique of mutually serial items (see lower_bound_ms).

    Bitsets over `graph.position`: an item is serial with everything it waits on, everything that
    waits on it and everything it conflicts with. Seeds: the critical path and the items with the
    heaviest conflicts; each clique grows by estimate, heaviest first, within `_SERIAL_BUDGET`
    candidate checks. Without any conflict every such clique is a chain, which the critical
    path already bounds, so nothing is computed.
    """
    position, estimate, index = graph.position, graph.estimate_ms, graph.conflict_index
    with_conflicts = [item_id for item_id in active if index.has_conflict(item_id)]
    if not with_conflicts:
        return 0
    by_id, waits_on, holders, adjacent = graph.by_id, graph.waits_on, index.holders, index.adjacent
    # Everything below is computed on demand and kept: the seeds' cliques take a few hundred items of
    # 10,000, and seeding needs the keys' weights, not their masks.
    upward: dict[int, int] = {}

    def up(item_id: int) -> int:
        """The item and everything it waits on, transitively (an in-progress item waits on nothing).
        Depth first with an explicit stack (a 10,000-deep chain needs no recursion)."""
        found = upward.get(item_id)
        if found is not None:
            return found
        stack = [item_id]
        while stack:
            node = stack[-1]
            if node in upward:  # pushed twice before it was reached
                stack.pop()
                continue
            preds = ([pred for pred in waits_on[node] if pred in position]
                     if by_id[node].status == "pending" else [])
            missing = [pred for pred in preds if pred not in upward]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            mask = 1 << position[node]
            for pred in preds:
                mask |= upward[pred]
            upward[node] = mask
        return upward[item_id]

    running_mask = 0
    for item_id in graph.in_progress:
        running_mask |= 1 << position[item_id]

    # Each helper below is computed on demand and kept (`cache`: the seeds' cliques share keys and members).
    @cache
    def weight_of(key: tuple[str, str]) -> int:
        return sum(estimate[holder] for holder in holders[key] if holder in position)

    @cache
    def mask_of(key: tuple[str, str]) -> int:
        found = 0
        for holder in holders[key]:
            if holder in position:
                found |= 1 << position[holder]
        return found

    @cache
    def near_key_weight(key: tuple[str, str]) -> int:
        """The weight of the holders of `key` and of every key overlapping it (an item holding two counts twice)."""
        return weight_of(key) + sum(weight_of(other) for other in adjacent.get(key, ()))

    @cache
    def near_key_mask(key: tuple[str, str]) -> int:
        """The holders of `key` and of every key overlapping it."""
        found = mask_of(key)
        for other in adjacent.get(key, ()):
            found |= mask_of(other)
        return found

    @cache
    def serial(item_id: int) -> int:
        """The items serial with `item_id`."""
        mask = up(item_id) | graph.reach[item_id]
        for key in index.keys.get(item_id, ()):  # by key, not by pair: items sharing one key share its mask
            mask |= near_key_mask(key)
        return mask & ~(1 << position[item_id])

    # Seeds first: the items with the heaviest conflicts, their own estimate plus their neighbours'
    # (when there are many pairs, weighed by key instead: an estimate, it only orders the seeds).
    # `nsmallest` is ``sorted(...)[:n]`` without sorting all of them (the keys are distinct: ids).
    if all(len(keys) == 1 for keys in index.keys.values()):
        # Each item holds one key, so the holders of distinct keys are disjoint, and an item's own
        # estimate plus its neighbours' is exactly the weight of its key and the keys overlapping it.
        keys = index.keys
        weight = {key: near_key_weight(key) for key in {keys[item_id][0] for item_id in with_conflicts}}
        seeded = [item_id for _, item_id in heapq.nsmallest(
            _SERIAL_SEEDS, [(-weight[keys[item_id][0]], item_id) for item_id in with_conflicts])]
    elif index.pair_count() <= _EXACT_WEIGHT_PAIRS:
        seeded = heapq.nsmallest(_SERIAL_SEEDS, with_conflicts, key=lambda item_id: (-(estimate[item_id] + sum(
            estimate.get(other, 0) for other in index.neighbours(item_id))), item_id))
    else:
        seeded = heapq.nsmallest(_SERIAL_SEEDS, with_conflicts, key=lambda item_id: (
            -sum(near_key_weight(key) for key in index.keys[item_id]), item_id))
    seeds = [critical_path(graph)] + [[item_id] for item_id in seeded]
    # Candidates go heaviest first: (-estimate, id). Ranked once, so each seed sorts plain ints
    # (its candidates' ranks) instead of calling a key function per candidate.
    by_position = sorted(position, key=position.__getitem__)
    heaviest = sorted(by_position, key=lambda item_id: (-estimate[item_id], item_id))
    rank_at = [0] * len(by_position)
    for rank, item_id in enumerate(heaviest):
        rank_at[position[item_id]] = rank
    budget = _SERIAL_BUDGET
    best = 0
    for seed in seeds:
        allowed, members = -1, 0
        for member in seed:
            allowed &= serial(member)
            members |= 1 << position[member]
        if members & running_mask:
            allowed &= ~running_mask
        allowed &= ~members
        total = sum(estimate[member] for member in seed)
        candidates = sorted([rank_at[bit] for bit in _set_bits(allowed)])
        for rank in candidates[:budget]:
            candidate = heaviest[rank]
            bit = 1 << position[candidate]
            if allowed & bit:
                total += estimate[candidate]
                allowed &= serial(candidate)
                if bit & running_mask:
                    allowed &= ~running_mask
                if not allowed:
                    break
        budget -= min(budget, len(candidates))
        best = max(best, total)
        if budget == 0:
            break
    return best


def _set_bits(mask: int) -> list[int]:
    """Positions of the 1 bits of a non-negative int, lowest first."""
    text = bin(mask)[:1:-1]
    positions = []
    index = text.find("1")
    while index >= 0:
        positions.append(index)
        index = text.find("1", index + 1)
    return positions


def critical_path(graph: QueueGraph) -> list[int]:
    """The chain of runnable items with the longest total estimate, from its first item on."""
    remaining = graph.remaining_ms
    if not remaining:
        return []
    pending = set(graph.schedulable)
    node = min(remaining, key=lambda item_id: (-remaining[item_id], item_id))
    path = [node]
    while True:
        successors = [s for s in graph.unblocks[node] if s in pending]
        if not successors:
            return path
        node = min(successors, key=lambda item_id: (-remaining[item_id], item_id))
        path.append(node)


def find_patterns(graph: QueueGraph) -> Patterns:
    """Fork-join groups (a fork whose only-child branches meet at one join) and pipelines
    (maximal chains where each item waits on exactly the one before, which unblocks only it)."""
    waits_on, unblocks = graph.waits_on, graph.unblocks
    fork_joins: list[ForkJoin] = []
    for fork in sorted(unblocks):
        if len(unblocks[fork]) < 2:
            continue
        joins: dict[int, list[int]] = {}
        for branch in unblocks[fork]:
            if waits_on[branch] == [fork]:
                for join in unblocks[branch]:
                    joins.setdefault(join, []).append(branch)
        for join, branches in sorted(joins.items()):
            if len(branches) >= 2:
                fork_joins.append(ForkJoin(fork=graph.label(fork), branches=[graph.label(b) for b in branches],
                                           join=graph.label(join)))
    in_cycle = {node for component in graph.cycles for node in component}
    link = {node: unblocks[node][0] for node in unblocks
            if len(unblocks[node]) == 1 and len(waits_on[unblocks[node][0]]) == 1 and node not in in_cycle}
    linked_to = set(link.values())
    pipelines = []
    for head in sorted(link):
        if head in linked_to:
            continue
        chain = [head]
        while chain[-1] in link:
            chain.append(link[chain[-1]])
        pipelines.append([graph.label(node) for node in chain])
    return Patterns(fork_join=fork_joins, pipelines=pipelines)


# --- the plan ------------------------------------------------------------------------------------------


def make_plan(items: Sequence[WorkItem], diagnostics: Sequence[Diagnostic], max_parallel: int,
              running: int = 0) -> QueuePlan:
    """The `queue_plan` result for these items.

    `running` counts slots already taken by work that is not an in-progress item of this queue
    (in-progress items take their slots themselves); it shrinks `run_now` only: `waves` plan the
    whole `max_parallel` budget from now on.
    """
    check_slots(max_parallel, running)
    return plan_graph(build_graph(items, diagnostics), max_parallel, running)


def check_slots(max_parallel: int, running: int) -> None:
    """Raise `UsageError` for slot counts `make_plan` refuses."""
    if max_parallel < 1:
        raise UsageError(f"max_parallel must be at least 1, not {max_parallel}")
    if running < 0:
        raise UsageError(f"running must not be negative, not {running}")


def plan_graph(graph: QueueGraph, max_parallel: int, running: int = 0, *, rows: bool = True) -> QueuePlan:
    """`make_plan` for a graph already built (arguments checked by `check_slots`).

    ``rows=False`` leaves `items` empty (`has_rows` is then False): for a caller that shows a page
    of them, built by `page_plan` from the graph (10,000 rows cost a tenth of a 10,000-item plan)."""
    schedule = simulate(graph, max_parallel)
    run_now = schedule.first_started[:max(0, max_parallel - running - len(graph.in_progress))]
    labels, index = graph.labels, graph.conflict_index
    # The rows are built by `trusted` (their values have the declared types by construction: see
    # `plan_rows`), the rest as plain data validated in one call.
    return QueuePlan.model_validate({
        "items": plan_rows(graph) if rows else [],
        "run_now": [labels[item_id] for item_id in run_now],
        "waves": [[labels[item_id] for item_id in wave] for wave in schedule.waves],
        "waves_total": len(schedule.waves),
        "critical_path": [labels[item_id] for item_id in critical_path(graph)],
        "conflicts": [{"a": labels[a], "b": labels[b], "files": files, "components": components}
                      for a, b in index.pairs(MAX_CONFLICTS_SHOWN) for files, components in [index.shared(a, b)]],
        "conflicts_total": index.pair_count(),
        "conflict_groups": [{"kind": kind, "name": index.names[(kind, name)],
                             "items": [labels[holder] for holder in holders],
                             "overlaps": [index.names[other] for other in overlaps[:MAX_OVERLAPS_SHOWN]],
                             "overlaps_total": len(overlaps)}
                            for (kind, name), holders, overlaps in index.groups()],
        "patterns": find_patterns(graph),
        "errors": graph.errors,
        "warnings": graph.warnings,
        "max_parallel": max_parallel,
        "predicted_makespan": schedule.makespan_ms / 1000,
        "lower_bound": lower_bound_ms(graph, max_parallel) / 1000,
        "mermaid": to_mermaid(graph),
        **_isolation_fields(graph),
    })


def page_plan(plan: QueuePlan, graph: QueueGraph, offset: int, limit: int) -> QueuePlanPage:
    """`plan` (the plan of `graph`) with the rows ``offset:offset + limit`` of `items` (see `QueuePlanPage`),
    taken from the plan, or built from the graph when the plan was made without them.

    An offset past the end gives an empty page. Nothing is planned again and the plan is not copied:
    the page shares its lists (treat both as read-only)."""
    rows = plan.items[offset:offset + limit] if has_rows(plan, graph) else plan_rows(graph, offset, offset + limit)
    total = len(graph.items)
    fields = dict(plan.__dict__)
    if offset > 0 or offset + limit < total:  # part of the queue: what concerns the page's items only
        index, labels = graph.conflict_index, graph.labels
        on_page = sorted({item.id for item in graph.items[offset:offset + limit] if item.id in index.keys})
        fields["conflicts"] = [trusted(Conflict, {"a": labels[a], "b": labels[b], "files": files,
                                                  "components": components})
                               for a, b in _page_pairs(index, on_page, MAX_CONFLICTS_SHOWN)
                               for files, components in [index.shared(a, b)]]
        shown = {row.id for row in rows}
        fields["conflict_groups"] = [group for group in plan.conflict_groups
                                     if any(item in shown for item in group.items)]
        patterns = plan.patterns
        fields["patterns"] = trusted(Patterns, {
            "fork_join": [pattern for pattern in patterns.fork_join if pattern.fork in shown or pattern.join in shown
                          or any(branch in shown for branch in pattern.branches)],
            "pipelines": [chain for chain in patterns.pipelines if any(item in shown for item in chain)]})
    if len(plan.waves) > MAX_WAVES_SHOWN:
        fields["waves"] = plan.waves[:MAX_WAVES_SHOWN]
    fields["errors_total"] = fields["warnings_total"] = None
    page_ids = {row.id for row in rows}
    for kind in ("errors", "warnings"):
        found: list[Diagnostic] = fields[kind]
        if len(found) > MAX_DIAGNOSTICS_SHOWN:
            ours = [d for d in found if d.item is None or d.item in page_ids]
            others = [d for d in found if not (d.item is None or d.item in page_ids)]
            fields[kind] = (ours + others)[:MAX_DIAGNOSTICS_SHOWN]
            fields[f"{kind}_total"] = len(found)
    fields.update(items=rows, total_items=total, next_offset=offset + limit if offset + limit < total else None)
    return trusted(QueuePlanPage, fields)  # the plan's own values, already validated, and two ints


def _page_pairs(index: ConflictIndex, on_page: list[int], limit: int) -> list[tuple[int, int]]:
    """Conflicting pairs ``(lower id, higher id)`` with an item of `on_page` (sorted ids), going
    through the page's items in order, at most `limit`, sorted. With every item on the page: the
    first `limit` of `ConflictIndex.pairs`."""
    page = set(on_page)
    found: list[tuple[int, int]] = []
    for first in on_page:
        if len(found) >= limit:
            break
        if index.has_conflict(first):
            found.extend((min(first, second), max(first, second)) for second in sorted(index.neighbours(first))
                         if second > first or second not in page)  # a pair of two page items: once
    return sorted(found[:limit])


def _isolation_fields(graph: QueueGraph) -> dict[str, Any]:
    """The plan's top-level isolation fields; none when nothing is isolated (the defaults say so)."""
    policy = graph.isolation
    fields: dict[str, Any] = {"isolation": policy.default, "allow_overlap": policy.allow_overlap}
    active = set(graph.schedulable) | set(graph.in_progress)
    if not active & graph.isolated:
        return fields
    fields["integration_estimate"] = policy.integration_s
    fields["integration_samples"] = policy.integration_samples
    declared = graph.declared_index
    if declared is not None:
        labels, isolated = graph.labels, graph.isolated
        pairs = _allowed_pairs(declared, isolated, MAX_CONFLICTS_SHOWN)
        fields["predicted_conflicts"] = [
            {"a": labels[a], "b": labels[b], "files": files, "components": components}
            for a, b in pairs for files, components in [declared.shared(a, b)]]
        fields["predicted_conflicts_total"] = declared.pair_count() - graph.conflict_index.pair_count()
    return fields


def _allowed_pairs(declared: ConflictIndex, isolated: AbstractSet[int], limit: int) -> list[tuple[int, int]]:
    """Declared conflicting pairs with an isolated item (those allow_overlap lets run together), in
    id order, at most `limit`."""
    found: list[tuple[int, int]] = []
    for first in sorted(declared.keys):
        if len(found) >= limit:
            break
        if declared.has_conflict(first):
            found.extend((first, second) for second in sorted(declared.neighbours(first))
                         if second > first and (first in isolated or second in isolated))
    return found[:limit]


def has_rows(plan: QueuePlan, graph: QueueGraph) -> bool:
    """Whether `plan` (of `graph`) holds its `items` (see `plan_graph`'s ``rows``)."""
    return len(plan.items) == len(graph.items)


def plan_rows(graph: QueueGraph, start: int = 0, stop: int | None = None) -> list[PlanItem]:
    """A `PlanItem` per item (of ``graph.items[start:stop]``), built by `trusted`: every value below
    has its declared type, and the lists are the row's own (not the item's)."""
    labels, by_id, waits_on, unblocks = graph.labels, graph.by_id, graph.waits_on, graph.unblocks
    reasons, waiting_on = graph.reasons, graph.waiting_on
    isolated, integration_s = graph.isolation.isolated, graph.isolation.integration_s
    rows = []
    for item in graph.items[start:stop]:
        file = item.file
        if item.id in by_id:  # a node: its edges from both sides, every id a node's (labels has them all)
            blocked_by = [labels[i] for i in waits_on[item.id]]
            blocks = [labels[i] for i in unblocks[item.id]]
        else:  # a duplicate id: its own fields, which may name ids no file has
            blocked_by = [labels.get(i) or format_id(i) for i in item.blocked_by]
            blocks = [labels.get(i) or format_id(i) for i in item.blocks]
        reason = reasons.get(file)
        rows.append(trusted(PlanItem, {
            "id": item.id_str, "file": file, "title": item.title, "status": item.status,
            "blocked_by": blocked_by, "blocks": blocks,
            "files": list(item.files), "components": list(item.components), "priority": item.priority,
            "estimate": item.estimate_s, "isolation": item.isolation,
            "integration_estimate": integration_s if isolated(item) else None, "forecast": None,
            "ready": item.status == "pending" and reason is None,
            "waiting_on": [labels[i] for i in waiting_on.get(file, ())],
            "reason": reason,
        }))
    return rows
