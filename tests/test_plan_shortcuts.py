"""Shortcuts the planner takes for speed give what the long way gave.

`plan_graph` takes `run_now` from the simulation's first start instead of a second scheduler;
`ConflictIndex.has_conflict` answers from one set found key by key; the serial bound finds what an
item waits on depth first, on demand. Each is compared here with the long way.
"""

from __future__ import annotations

import random

import pytest

import legacy_plan as legacy
from agent_parallel.queue import planner
from agent_parallel.queue.conflicts import ConflictIndex
from agent_parallel.queue.items import WorkItem
from agent_parallel.queue.planner import Scheduler, build_graph, plan_graph

FILES = ["src", "src/a.py", "src/b.py", "src/*.py", "docs", "docs/x.md", "*.md", "lib/x.c", "."]


def rows(rng: random.Random, size: int, components: list[str]) -> list[dict]:
    """Items waiting on up to two earlier ones, some in progress or done, with a few files and components."""
    found = []
    for number in range(1, size + 1):
        status = rng.choice(["pending"] * 6 + ["in_progress", "completed", "failed"])
        found.append(dict(
            id=number, id_str=f"{number:03d}", file=f"{number:03d}-{status}-x.md", path="", slug="x", status=status,
            title="x", blocked_by=rng.sample(range(1, number), min(number - 1, rng.choice([0, 0, 1, 2]))),
            files=rng.sample(FILES, rng.choice([0, 0, 1, 2])),
            components=rng.sample(components, rng.randint(0, min(2, len(components)))),
            estimate_s=rng.choice([None, 0.0, 30.0, 600.0]), priority=rng.choice(["high", "medium", "low"])))
    return found


@pytest.mark.parametrize("bits", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_run_now_is_what_a_fresh_scheduler_starts(seed: int, bits: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """For every slot count and every number of slots taken elsewhere (more than free too)."""
    if bits:
        monkeypatch.setattr(planner, "_bit_counters", lambda index: index.counter_bits)
    rng = random.Random(seed)
    graph = build_graph([WorkItem(**row) for row in rows(rng, rng.choice([3, 20, 80]), ["api", "db", "ui"])])
    for max_parallel in range(1, 7):
        for running in range(0, max_parallel + 2):
            expected = Scheduler(graph).start_next(max_parallel - running - len(graph.in_progress))
            plan = plan_graph(graph, max_parallel, running, rows=False)
            assert plan.run_now == [graph.label(item_id) for item_id in expected]


@pytest.mark.parametrize("seed", range(40))
def test_has_conflict_is_having_a_neighbour(seed: int) -> None:
    """Key by key (the set) and item by item (its neighbours) agree, also for an item holding two
    overlapping entries alone and for ids holding nothing."""
    rng = random.Random(seed)
    items = [WorkItem(**row) for row in rows(rng, rng.choice([1, 2, 5, 30]), ["api", "API", "db"])]
    if seed % 4 == 0:
        items.append(WorkItem(id=999, id_str="999", file="999-pending-x.md", path="", slug="x", status="pending",
                              title="x", files=["lib", "lib/y.c"]))
    index = ConflictIndex(items)
    for item in items:
        assert index.has_conflict(item.id) == bool(index.neighbours(item.id))
    assert not index.has_conflict(12345)


def test_the_serial_bound_follows_a_deep_chain_as_before() -> None:
    """3,000 items in two chains, each item waiting on the one two before (the first in progress),
    sharing a few files across the chains: what the bound takes from an item's ancestors is found
    without recursion, and as before."""
    size = 3000
    items = []
    for number in range(1, size + 1):
        row = dict(id=number, id_str=f"{number:04d}", file=f"{number:04d}-{'in_progress' if number == 1 else 'pending'}-x.md",
                   path="", slug="x", status="in_progress" if number == 1 else "pending", title="x",
                   blocked_by=[number - 2] if number > 2 else [], files=[f"f{number % 5}.py"],
                   estimate_s=float(number % 7) * 10)
        items.append(row)
    graph = build_graph([WorkItem(**row) for row in items])
    old = legacy.build_graph([legacy.WorkItem(**row) for row in items])
    assert planner._serial_bound(graph, graph.schedulable + graph.in_progress) == legacy._serial_bound(
        old, old.schedulable + old.in_progress)
    assert planner.lower_bound_ms(graph, 3) == legacy.lower_bound_ms(old, 3)

