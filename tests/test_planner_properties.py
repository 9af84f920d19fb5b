"""Properties of the planner over random queues (hypothesis): random DAGs with random statuses,
estimates, files and components, and random graphs with cycles.

Checked against independent oracles written here: reachability by search, file overlap by
matching entries against a universe of concrete paths, acyclicity by Kahn's algorithm.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_parallel.queue import planner
from agent_parallel.queue.conflicts import ConflictIndex
from agent_parallel.queue.planner import ItemIndex, build_graph, make_plan, simulate, upstream_items
from agent_parallel.queue.items import PRIORITIES, WorkItem, format_id

FILE_POOL = ["src", "src/a.py", "src/b.py", "src/*.py", "src/c", "docs", "docs/x.md", "*.md", "lib/*.c",
             "lib/x.c", "README.md", "src/**/*.py", "[dl]*/x.*"]
UNIVERSE = ["src/a.py", "src/b.py", "src/c/d.py", "src/c/e.md", "docs/x.md", "docs/y.txt", "lib/x.c", "lib/y.h",
            "README.md", "a.md", "src/x.md", "docs/x.c"]
COMPONENTS = ["api", "db", "UI", "ui"]
STATUSES = ["pending"] * 6 + ["completed", "completed", "in_progress", "failed", "blocked"]
SETTINGS = settings(max_examples=120, deadline=None)


@st.composite
def queues(draw: st.DrawFn, *, cycles: bool = False) -> tuple[list[WorkItem], int, int]:
    size = draw(st.integers(1, 16))
    items = []
    for number in range(1, size + 1):
        candidates = [other for other in range(1, size + 1) if other != number] if cycles else list(range(1, number))
        later = list(range(number + 1, size + 1))
        deps = draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True)) if candidates else []
        blocks = draw(st.lists(st.sampled_from(later), max_size=1)) if later and not cycles else []
        status = draw(st.sampled_from(STATUSES))
        items.append(WorkItem(
            id=number, id_str=format_id(number), file=f"{number:03d}-{status}-x.md", path="", slug="x",
            status=status, title="x", blocked_by=deps, blocks=blocks,
            files=draw(st.lists(st.sampled_from(FILE_POOL), max_size=2, unique=True)),
            components=draw(st.lists(st.sampled_from(COMPONENTS), max_size=1)),
            estimate_s=draw(st.one_of(st.none(), st.sampled_from([0, 1, 30, 60, 90, 600, 3600]))),
            priority=draw(st.sampled_from(PRIORITIES)),
        ))
    return items, draw(st.integers(1, 5)), draw(st.integers(0, 2))


def waits_on(items: list[WorkItem]) -> dict[int, set[int]]:
    """Item -> items it waits on, from both sides (the oracle's own reading of the fields)."""
    edges: dict[int, set[int]] = {item.id: set() for item in items}
    for item in items:
        edges[item.id].update(dep for dep in item.blocked_by if dep in edges and dep != item.id)
        for target in item.blocks:
            if target in edges and target != item.id:
                edges[target].add(item.id)
    return edges


def depends(items: list[WorkItem], edges: dict[int, set[int]], a: int, b: int) -> bool:
    """Whether pending item a waits on b, directly or through other pending items (an item in
    progress or completed waits on nothing any more)."""
    status = {item.id: item.status for item in items}
    seen, stack = set(), [a]
    while stack:
        node = stack.pop()
        for pred in edges[node]:
            if pred == b:
                return True
            if pred not in seen and status[pred] == "pending":
                seen.add(pred)
                stack.append(pred)
    return False


def covers(entry: str, path: str) -> bool:
    return path == entry or path.startswith(entry + "/") or fnmatchcase(path, entry.replace("**/", "*"))


def overlap_oracle(a: WorkItem, b: WorkItem) -> bool:
    """Items that share a concrete path of the universe, or a component (ignoring case)."""
    if {c.casefold() for c in a.components} & {c.casefold() for c in b.components}:
        return True
    return any(covers(x, path) and covers(y, path) for x in a.files for y in b.files for path in UNIVERSE)


def labels_to_ids(labels: list[str]) -> list[int]:
    return [int(label) for label in labels]


@SETTINGS
@given(queues())
def test_run_now_holds_no_dependent_or_conflicting_pair(queue) -> None:
    items, max_parallel, running = queue
    plan = make_plan(items, [], max_parallel, running=running)
    by_id = {item.id: item for item in items}
    edges = waits_on(items)
    run_now = labels_to_ids(plan.run_now)
    in_progress = [item.id for item in items if item.status == "in_progress"]
    conflicts = {(int(c.a), int(c.b)) for c in plan.conflicts}
    assert len(run_now) == len(set(run_now)) <= max(0, max_parallel - running - len(in_progress))
    ready = {int(row.id) for row in plan.items if row.ready}
    assert set(run_now) <= ready
    schedule = simulate(build_graph(items), max_parallel)
    if running == 0 and all(by_id[i].estimate_s != 0 for i in in_progress):
        # what to start now is the first wave of the predicted schedule
        starts_now = schedule.waves[0] if schedule.waves and schedule.wave_start_ms[0] == 0 else []
        assert run_now == starts_now
    for a, b in combinations(run_now, 2):
        assert not depends(items, edges, a, b) and not depends(items, edges, b, a)
        assert not overlap_oracle(by_id[a], by_id[b])
        assert (min(a, b), max(a, b)) not in conflicts
    for a in run_now:
        for b in in_progress:
            assert not overlap_oracle(by_id[a], by_id[b])


@SETTINGS
@given(queues())
def test_conflicts_include_every_real_overlap(queue) -> None:
    items, max_parallel, running = queue
    plan = make_plan(items, [], max_parallel, running=running)
    conflicts = {(int(c.a), int(c.b)) for c in plan.conflicts}
    active = [item for item in items if item.status in ("pending", "in_progress")]
    for a, b in combinations(active, 2):
        if overlap_oracle(a, b):
            assert (min(a.id, b.id), max(a.id, b.id)) in conflicts


@SETTINGS
@given(queues())
def test_the_schedule_respects_dependencies_conflicts_and_max_parallel(queue) -> None:
    items, max_parallel, running = queue
    graph = build_graph(items)
    schedule = simulate(graph, max_parallel)
    plan = make_plan(items, [], max_parallel, running=running)
    by_id = {item.id: item for item in items}
    edges = waits_on(items)
    in_progress = {item.id for item in items if item.status == "in_progress"}
    scheduled = [item_id for wave in schedule.waves for item_id in wave]

    assert [labels_to_ids(wave) for wave in plan.waves] == schedule.waves
    assert sorted(scheduled) == sorted(graph.schedulable)  # every runnable item once
    for item_id in scheduled:
        assert by_id[item_id].status == "pending"
        for pred in edges[item_id]:
            if by_id[pred].status != "completed":
                assert schedule.end_ms[pred] <= schedule.start_ms[item_id]
    for wave in schedule.waves:
        assert len(wave) <= max_parallel
        for a, b in combinations(wave, 2):
            assert not depends(items, edges, a, b) and not depends(items, edges, b, a)
    timed = scheduled + sorted(in_progress)
    for a, b in combinations(timed, 2):
        if a in in_progress and b in in_progress:
            continue  # both were already running: the plan cannot undo that
        if overlap_oracle(by_id[a], by_id[b]) or b in graph.conflicts.get(a, ()):
            apart = schedule.end_ms[a] <= schedule.start_ms[b] or schedule.end_ms[b] <= schedule.start_ms[a]
            zero_length = schedule.start_ms[a] == schedule.end_ms[a] or schedule.start_ms[b] == schedule.end_ms[b]
            assert apart or zero_length
    slots = max(max_parallel, len(in_progress))
    for moment in {schedule.start_ms[item_id] for item_id in timed}:
        running_then = [i for i in timed if schedule.start_ms[i] <= moment < schedule.end_ms[i]]
        assert len(running_then) <= slots


@SETTINGS
@given(queues())
def test_predicted_makespan_is_never_below_the_lower_bound(queue) -> None:
    items, max_parallel, running = queue
    plan = make_plan(items, [], max_parallel, running=running)
    assert plan.predicted_makespan >= plan.lower_bound >= 0
    graph = build_graph(items)
    critical = sum(graph.estimate_ms[int(label)] for label in plan.critical_path) / 1000
    assert plan.lower_bound >= critical


@st.composite
def dense_queues(draw: st.DrawFn) -> tuple[list[WorkItem], int]:
    """Items drawing many of a few components (nearly each its own key set), some in progress."""
    pool = [f"c{number}" for number in range(draw(st.integers(2, 8)))]
    size = draw(st.integers(1, 24))
    items = []
    for number in range(1, size + 1):
        status = draw(st.sampled_from(["pending"] * 5 + ["in_progress", "completed"]))
        deps = draw(st.lists(st.integers(1, number - 1), max_size=2, unique=True)) if number > 1 else []
        items.append(WorkItem(
            id=number, id_str=format_id(number), file=f"{number:03d}-{status}-x.md", path="", slug="x",
            status=status, title="x", blocked_by=deps,
            components=draw(st.lists(st.sampled_from(pool), min_size=1, unique=True)),
            estimate_s=draw(st.sampled_from([None, 0, 30, 60, 600])), priority=draw(st.sampled_from(PRIORITIES))))
    return items, draw(st.integers(1, 5))


@SETTINGS
@given(dense_queues())
def test_ready_items_kept_as_bits_or_parked_give_one_schedule(queue) -> None:
    """The scheduler's two ways of keeping ready items (`planner._bit_counters`) start the same items
    at the same times, and no two that share a component run together."""
    items, max_parallel = queue
    schedules = []
    for choice in (lambda index: None, lambda index: index.counter_bits):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(planner, "_bit_counters", choice)
            schedules.append(simulate(build_graph(items), max_parallel))
    parked, bits = schedules
    assert (bits.waves, bits.wave_start_ms, bits.end_ms) == (parked.waves, parked.wave_start_ms, parked.end_ms)
    by_id = {item.id: item for item in items}
    for a, b in combinations(bits.start_ms, 2):
        if by_id[a].status == by_id[b].status == "in_progress" or not overlap_oracle(by_id[a], by_id[b]):
            continue
        apart = bits.end_ms[a] <= bits.start_ms[b] or bits.end_ms[b] <= bits.start_ms[a]
        assert apart or bits.start_ms[a] == bits.end_ms[a] or bits.start_ms[b] == bits.end_ms[b]


@SETTINGS
@given(queues(cycles=True))
def test_every_reported_cycle_is_a_real_closed_path(queue) -> None:
    items, max_parallel, running = queue
    plan = make_plan(items, [], max_parallel, running=running)
    edges = waits_on(items)
    cycles = [error for error in plan.errors if error.kind == "cycle"]
    for cycle in cycles:
        path = labels_to_ids(cycle.path)
        assert len(path) >= 3 and path[0] == path[-1] == min(path)
        assert len(set(path[:-1])) == len(path) - 1
        for waiter, waited in zip(path, path[1:]):
            assert waited in edges[waiter]
        shown = cycle.path if len(cycle.path) <= 11 else [*cycle.path[:10], f"… {len(cycle.path) - 11} more",
                                                          cycle.path[-1]]  # a long cycle is cut after 10 ids
        assert cycle.message == "dependency cycle: " + " -> ".join(shown) + " (each item waits on the next)"
        assert cycle.item == cycle.path[0]
    # Kahn's algorithm: the graph has a cycle exactly when some item is never freed.
    remaining = {item_id: set(preds) for item_id, preds in edges.items()}
    freed = True
    while freed:
        freed = False
        for item_id in [i for i, preds in remaining.items() if not preds]:
            del remaining[item_id]
            for preds in remaining.values():
                preds.discard(item_id)
            freed = True
    assert bool(cycles) == bool(remaining)
    in_cycles = {int(label) for cycle in cycles for label in cycle.path}
    for row in plan.items:
        if int(row.id) in in_cycles:
            assert not row.ready
    assert plan.predicted_makespan >= plan.lower_bound


@SETTINGS
@given(queues())
def test_has_conflict_says_whether_an_item_has_any_neighbour(queue) -> None:
    """The shortcut (`ConflictIndex.has_conflict`, by contested keys) agrees with the neighbour sets,
    also for an item whose own entries overlap each other (``files: [src, src/a.py]``)."""
    items, _, _ = queue
    index = ConflictIndex(items)
    for item in items:
        assert index.has_conflict(item.id) == bool(index.neighbours(item.id)), item


@st.composite
def tangled_queues(draw: st.DrawFn) -> list[WorkItem]:
    """Queues with what readiness must see through: cycles both ways (`blocked_by` and `blocks`),
    references to missing items, duplicate ids, every status."""
    size = draw(st.integers(1, 12))
    items = []
    for index in range(size + draw(st.integers(0, 2))):  # the extra files repeat an id
        number = index + 1 if index < size else draw(st.integers(1, size))
        status = draw(st.sampled_from(STATUSES))
        refs = st.lists(st.integers(1, size + 2), max_size=2, unique=True)
        items.append(WorkItem(
            id=number, id_str=format_id(number), file=f"{number:03d}-{status}-x{index}.md", path="", slug="x",
            status=status, title="x", blocked_by=draw(refs), blocks=draw(refs)))
    return items


@SETTINGS
@given(tangled_queues())
def test_an_item_and_what_it_waits_on_give_it_the_whole_queue_s_readiness(items) -> None:
    """`upstream_items` (what `launch_task(item=...)` builds its graph from) loses nothing readiness
    depends on: each item's reason and what it waits on are the whole queue's."""
    whole = build_graph(items)
    for item in items:
        part = build_graph(upstream_items(ItemIndex.of(items), item.id))
        assert part.reasons.get(item.file) == whole.reasons.get(item.file), item
        assert (item.id in part.by_id) == (item.id in whole.by_id)
        if item.id in whole.by_id:
            assert part.waits_on[item.id] == whole.waits_on[item.id]
            assert (item.id in part.schedulable) == (item.id in whole.schedulable)
