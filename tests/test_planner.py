"""The planner: graph errors with exact messages, readiness and reasons, priority, conflicts,
the predicted schedule, patterns, Mermaid, the Scheduler API, and planning a real workspace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rich.console import Console

from agent_parallel.queue.conflicts import FEW_COUNTERS, ConflictIndex, entry_overlaps, files_overlap, find_conflicts, overlap_groups
from agent_parallel.errors import PathOutsideWorkspace, QueueError, UsageError
from agent_parallel.cli.render import format_seconds, plan_table, to_dot
from agent_parallel.queue import planner
from agent_parallel.queue.plan import plan_workspace
from agent_parallel.queue.planner import (DEFAULT_ESTIMATE_S, Scheduler, build_graph, make_plan, simulate,
                                    strongly_connected_components)
from agent_parallel.queue.items import Diagnostic, QueueReader, WorkItem, format_id

REPO = Path(__file__).resolve().parents[1]


def item(item_id: int, status: str = "pending", *, deps: tuple[int, ...] = (), blocks: tuple[int, ...] = (),
         files: tuple[str, ...] | None = None, components: tuple[str, ...] = (), estimate: float | None = None,
         priority: str = "medium", file: str | None = None) -> WorkItem:
    """A work item; by default it touches a file of its own, so it conflicts with nothing."""
    return WorkItem(id=item_id, id_str=format_id(item_id), file=file or f"{item_id:03d}-{status}-item.md", path="",
                    slug="item", status=status, title=f"Item {item_id}", blocked_by=list(deps), blocks=list(blocks),
                    files=list(files if files is not None else (f"own/{item_id}.py",)), components=list(components),
                    estimate_s=estimate, priority=priority)


def plan_of(*items: WorkItem, max_parallel: int = 5, running: int = 0, diagnostics: list[Diagnostic] | None = None):
    return make_plan(list(items), diagnostics or [], max_parallel, running=running)


def rows(plan) -> dict[str, tuple]:
    return {row.id: (row.ready, row.waiting_on, row.reason) for row in plan.items}


# --- graph errors -----------------------------------------------------------------------------------------


def test_cycle_is_reported_as_a_closed_path_starting_at_the_smallest_id() -> None:
    plan = plan_of(item(3, deps=(7,)), item(7, deps=(5,)), item(5, deps=(3,)), item(9, deps=(5,)), item(1))
    [cycle] = plan.errors
    assert cycle == Diagnostic(kind="cycle", item="003", file="003-pending-item.md",
                               message="dependency cycle: 003 -> 007 -> 005 -> 003 (each item waits on the next)",
                               path=["003", "007", "005", "003"])
    assert rows(plan) == {
        "001": (True, [], None),
        "003": (False, ["007"], "in a dependency cycle: 003 -> 007 -> 005 -> 003"),
        "005": (False, ["003"], "in a dependency cycle: 003 -> 007 -> 005 -> 003"),
        "007": (False, ["005"], "in a dependency cycle: 003 -> 007 -> 005 -> 003"),
        "009": (False, ["005"], "waits on 005, which is in a dependency cycle"),
    }
    assert plan.run_now == ["001"] and plan.waves == [["001"]]


def test_cycle_through_blocks_and_a_member_off_the_reported_path() -> None:
    # 1 waits on 2 (via 2's blocks), 2 waits on 1; 3 is in the same component through 1 and 2.
    plan = plan_of(item(1, deps=(2,)), item(2, blocks=(1,), deps=(1, 3)), item(3, deps=(2,)))
    assert [e.message for e in plan.errors] == ["dependency cycle: 001 -> 002 -> 001 (each item waits on the next)"]
    assert rows(plan)["003"][2] == ("in a group of items that wait on each other "
                                    "(see the cycle 001 -> 002 -> 001)")


def test_each_strongly_connected_component_gets_one_cycle_error() -> None:
    plan = plan_of(item(1, deps=(2,)), item(2, deps=(1,)), item(10, deps=(11,)), item(11, deps=(10,)))
    assert [e.path for e in plan.errors] == [["001", "002", "001"], ["010", "011", "010"]]


def test_a_10000_deep_chain_needs_no_recursion() -> None:
    chain = [item(1, deps=(10_000,))] + [item(number, deps=(number - 1,)) for number in range(2, 10_001)]
    [cycle] = plan_of(*chain).errors
    assert len(cycle.path) == 10_001 and cycle.path[0] == cycle.path[-1] == "001"
    assert cycle.path[:3] == ["001", "10000", "9999"]
    plan = plan_of(*chain[1:], item(1))
    assert plan.errors == [] and plan.critical_path[:2] == ["001", "002"] and len(plan.critical_path) == 10_000
    assert plan.predicted_makespan == plan.lower_bound == 10_000 * DEFAULT_ESTIMATE_S


def test_strongly_connected_components_only_returns_real_groups() -> None:
    edges = {1: [2], 2: [3], 3: [1], 4: [4], 5: [1]}
    assert strongly_connected_components([1, 2, 3, 4, 5], edges) == [[1, 2, 3]]


@pytest.mark.parametrize(("items", "errors", "reasons"), [
    ([item(4, deps=(9,))],
     [("dangling_ref", "004", "blocked_by refers to 009, which does not exist")],
     {"004": "has an error: blocked_by refers to 009, which does not exist"}),
    ([item(4, blocks=(9,)), item(5, deps=(4,))],
     [("dangling_ref", "004", "blocks refers to 009, which does not exist")],
     {"004": "has an error: blocks refers to 009, which does not exist",
      "005": "waits on 004, which has an error"}),
    ([item(4, deps=(4,))],
     [("self_reference", "004", "blocked_by refers to the item itself (004)")],
     {"004": "has an error: blocked_by refers to the item itself (004)"}),
    ([item(4, blocks=(4,))],
     [("self_reference", "004", "blocks refers to the item itself (004)")],
     {"004": "has an error: blocks refers to the item itself (004)"}),
    ([item(4, file="004-pending-a.md"), item(4, file="004-pending-b.md"), item(5, deps=(4,)), item(6, deps=(5,))],
     [("duplicate_id", "004", "id 004 is used by 2 files: 004-pending-a.md, 004-pending-b.md")] * 2,
     {"004": "has an error: id 004 is used by 2 files: 004-pending-a.md, 004-pending-b.md",
      "005": "waits on 004, which has an error",
      "006": "waits on 005, which cannot run: 004 has an error"}),
])
def test_reference_errors_name_the_file_and_field(items, errors, reasons) -> None:
    plan = plan_of(*items)
    assert [(e.kind, e.item, e.message) for e in plan.errors] == errors
    assert all(e.file is not None and e.file.startswith(e.item) for e in plan.errors)
    assert {row.id: row.reason for row in plan.items if row.reason} == reasons
    assert plan.run_now == [] and plan.waves == []


def test_a_duplicate_s_blocks_still_hold_back_its_target() -> None:
    plan = plan_of(item(4, file="004-pending-a.md", blocks=(7,)), item(4, file="004-pending-b.md"), item(7))
    assert rows(plan)["007"] == (False, ["004"], "waits on 004, which has an error")


def test_an_id_known_only_from_a_broken_file_is_an_error_not_a_dangling_reference() -> None:
    broken = Diagnostic(kind="bad_name", item="008", file="008-done-x.md", message="file name has unknown status")
    plan = plan_of(item(9, deps=(8,)), diagnostics=[broken])
    assert plan.errors == [broken]
    assert rows(plan)["009"] == (False, ["008"], "waits on 008, which has an error")


def test_an_unreadable_item_holds_back_what_waits_on_it() -> None:
    stub = item(5)  # the reader keeps an item known only by its name, with its error
    error = Diagnostic(kind="too_large", item="005", file=stub.file, message="file is too large")
    plan = plan_of(stub, item(6, deps=(5,)), diagnostics=[error])
    assert rows(plan) == {"005": (False, [], "has an error: file is too large"),
                          "006": (False, ["005"], "waits on 005, which has an error")}


def test_failed_and_blocked_items_hold_back_their_dependents_transitively() -> None:
    plan = plan_of(item(1, "completed"), item(2, "failed", deps=(1,)), item(3, deps=(2,)), item(4, deps=(3,)),
                   item(5, "blocked"), item(6, deps=(5,)), item(7, "in_progress"), item(8, deps=(7,)))
    assert rows(plan) == {
        "001": (False, [], "completed"),
        "002": (False, [], "failed; move it back to pending to retry"),
        "003": (False, ["002"], "waits on 002, which failed"),
        "004": (False, ["003"], "waits on 003, which cannot run: 002 failed"),
        "005": (False, [], "blocked; move it back to pending once the problem is solved"),
        "006": (False, ["005"], "waits on 005, which is blocked"),
        "007": (False, [], "in progress"),
        "008": (False, ["007"], "waits on 007"),
    }
    assert plan.errors == [] and plan.run_now == [] and plan.waves == [["008"]]


def test_an_error_is_reported_before_a_failure_on_the_same_path() -> None:
    plan = plan_of(item(1, "failed"), item(2, deps=(9,)), item(3, deps=(1, 2)))
    assert rows(plan)["003"][2] == "waits on 002, which has an error"


def test_items_without_files_or_components_get_a_warning() -> None:
    plan = plan_of(item(1, files=()), item(2, "completed", files=()), item(3, components=("db",), files=()))
    assert plan.warnings == [Diagnostic(
        kind="no_files", item="001", file="001-pending-item.md",
        message="declares neither files nor components, so it is treated as independent of every other item")]


def test_blocks_is_the_reverse_edge() -> None:
    plan = plan_of(item(1, blocks=(2,)), item(2))
    assert [(row.id, row.blocked_by, row.blocks) for row in plan.items] == [("001", [], ["002"]),
                                                                             ("002", ["001"], [])]
    assert rows(plan)["002"] == (False, ["001"], "waits on 001")


def test_ids_are_spelled_as_in_the_file_names() -> None:
    first = WorkItem(id=1, id_str="00001", file="00001-pending-a.md", path="", slug="a", status="pending",
                     title="a", files=["a"])
    second = WorkItem(id=2, id_str="00002", file="00002-pending-b.md", path="", slug="b", status="pending",
                      title="b", blocked_by=[1], files=["b"])
    plan = plan_of(first, second)
    assert plan.run_now == ["00001"] and plan.items[1].waiting_on == ["00001"]
    assert plan.items[1].reason == "waits on 00001"


# --- priority ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("items", "order"), [
    # the longest remaining estimate-weighted path first (own estimate included)
    ([item(1, estimate=600), item(2, deps=(1,), estimate=3600), item(3, estimate=1800)], ["001", "003"]),
    ([item(1, estimate=600), item(3, estimate=1800)], ["003", "001"]),
    # then the number of items transitively unblocked
    ([item(1, estimate=60), item(2, deps=(1,), estimate=60), item(3, estimate=60),
      item(4, deps=(3,), estimate=60), item(5, deps=(3,), estimate=60)], ["003", "001"]),
    # then the priority field
    ([item(1), item(2, priority="high"), item(3, priority="critical"), item(4, priority="low")],
     ["003", "002", "001", "004"]),
    # then fewest blockers
    ([item(1, "completed"), item(2, "completed"), item(3, deps=(1, 2)), item(4, deps=(1,)), item(5)],
     ["005", "004", "003"]),
    # then id
    ([item(9), item(4), item(6)], ["004", "006", "009"]),
])
def test_run_now_priority_order(items, order) -> None:
    assert plan_of(*items).run_now == order


def test_run_now_respects_free_slots() -> None:
    items = [item(number) for number in range(1, 8)]
    assert plan_of(*items, max_parallel=3).run_now == ["001", "002", "003"]
    assert plan_of(*items, max_parallel=3, running=2).run_now == ["001"]
    assert plan_of(*items, max_parallel=3, running=5).run_now == []
    assert plan_of(*items, item(8, "in_progress"), max_parallel=3).run_now == ["001", "002"]


def test_run_now_skips_items_that_conflict_with_a_better_one_or_a_running_one() -> None:
    plan = plan_of(item(1, files=("src/api",), estimate=600), item(2, files=("src/api/x.py",), estimate=300),
                   item(3, files=("docs",)), item(4, "in_progress", components=("db",), files=()),
                   item(5, components=("DB",), files=(), estimate=9000))
    assert plan.run_now == ["001", "003"]
    assert plan.waves == [["001", "003"], ["005"], ["002"]]  # 005 starts when 004 ends at 60 s
    assert [(c.a, c.b, c.files, c.components) for c in plan.conflicts] == [
        ("001", "002", ["src/api", "src/api/x.py"], []), ("004", "005", [], ["db"])]


def test_bad_arguments() -> None:
    with pytest.raises(UsageError, match="^max_parallel must be at least 1, not 0$"):
        plan_of(item(1), max_parallel=0)
    with pytest.raises(UsageError, match="^running must not be negative, not -1$"):
        plan_of(item(1), running=-1)


# --- conflicts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("src/a.py", "src/a.py", True),
    ("src/a.py", "src/b.py", False),
    ("src", "src/api/x.py", True),             # a directory holds what is under it
    ("src", "src2/x.py", False),
    ("src/a.py", "src/a.pyc", False),
    ("src/*.py", "src/a.py", True),
    ("src/*", "src/a/b.py", True),             # fnmatch: * crosses /
    ("src/**/*.py", "src/a.py", True),         # **/ may match no directory at all
    ("src/api/*.py", "src", True),             # the directory holds what the glob matches
    ("src/api/sub", "src/api/*.py", True),     # a directory whose files the glob matches
    ("src/*.py", "src/*.ts", False),
    ("*.py", "src/*", True),                   # src/x.py matches both
    ("docs/*.md", "src/*", False),
    ("src/[ab].py", "src/a.py", True),
    ("src/[!ab].py", "src/a.py", False),
    ("src/?.py", "src/ab.py", False),
    ("[ab]/x", "[bc]/x", True),                 # two classes are assumed to share a character
    (".", "anything/at/all", True),
])
def test_files_overlap(a: str, b: str, overlap: bool) -> None:
    assert files_overlap(a, b) is overlap
    assert files_overlap(b, a) is overlap


def test_find_conflicts_agrees_with_files_overlap_pairwise() -> None:
    entries = ["src", "src/a.py", "src/b.py", "src/*.py", "docs/*.md", "docs/x.md", "*.txt", "notes/a.txt",
               "lib/sub/deep/x.c", "lib", "other", "src/api/*.py", "[ab]/x", "a/x"]
    items = [item(index + 1, files=(entry,)) for index, entry in enumerate(entries)]
    found = {pair for pair in find_conflicts(items)}
    expected = {(i + 1, j + 1) for i in range(len(entries)) for j in range(i + 1, len(entries))
                if files_overlap(entries[i], entries[j])}
    assert found == expected


def test_a_large_group_of_patterns_with_the_same_ends_is_one_key() -> None:
    """40 items' ``docs/*{i}*.md`` all overlap one another (``docs/12.md`` matches ``*1*`` and ``*2*``)
    and the same other entries: one key with 40 holders, not 780 pairs of keys; what is shown of a
    pair still names each item's own pattern."""
    patterns = [f"docs/*{i}*.md" for i in range(40)]
    items = [item(n + 1, files=(pattern,)) for n, pattern in enumerate(patterns)]
    items += [item(41, files=("docs/12.md",)), item(42, files=("lib/x.md",)), item(43, files=("docs/*0*.txt",))]
    index = ConflictIndex(items)
    key = ("file", "docs/*0*.md")
    assert index.holders[key] == list(range(1, 41))
    assert index.names[key] == "docs/*0*.md and 39 more patterns with its literal start and end"
    assert index.adjacent[key] == (("file", "docs/12.md"),)
    assert index.shared(3, 7) == (["docs/*2*.md", "docs/*6*.md"], [])
    assert index.shared(41, 5) == (["docs/*4*.md", "docs/12.md"], [])
    expected = {(i + 1, j + 1) for i in range(43) for j in range(i + 1, 43)
                if files_overlap(items[i].files[0], items[j].files[0])}
    assert set(find_conflicts(items)) == expected and (1, 43) not in expected


@pytest.mark.parametrize("entries", [
    ["docs/*1*.md", "docs/*2*.md", "docs/a/*x*.md", "doc*", "*.md", "d*s/*", "docs", "docs/x.md", "src/*"],
    ["*", ".", "src", "src/**/*.py", "src/a.py", "lib/*.c", "**/x", "abx", "a*bx", "*a*", "b.[ch]"],
    ["src/?.py", "src/[ab].py", "src/a.py", "src/*.py", "src/**/*", "x/*y*z", "x/*z", "x/y?z"],
])
def test_overlaps_by_ends_agree_with_pairwise_matching(entries: list[str]) -> None:
    found = entry_overlaps(entries)
    for first in entries:
        for second in entries:
            if first != second:
                assert (second in found.get(first, ())) is files_overlap(first, second), (first, second)


def test_patterns_past_the_comparison_budget_are_taken_to_overlap_everything() -> None:
    entries = [f"docs/*{i}*.m?" for i in range(30)] + ["src/a.py", "lib", "docs/*a*.md"]
    exact = entry_overlaps(entries)
    found = overlap_groups(entries, budget=300)
    assert 16 < len(found.assumed) < 31 and "docs/*a*.md" in found.assumed  # the last ones compared
    key = found.everything[0]
    assert found.members[key] == found.everything == sorted(found.assumed)  # more than 16: one key
    assert found.adjacent[key] == {"src/a.py", "lib"} | {entry for entry in entries if entry not in found.assumed}
    for first in entries:  # never less than the exact answer
        for second in exact.get(first, ()):
            ka, kb = found.key_of.get(first, first), found.key_of.get(second, second)
            assert ka == kb or kb in found.adjacent[ka]


# --- the predicted schedule, bounds and patterns -----------------------------------------------------------------


def test_schedule_is_list_scheduling_by_priority() -> None:
    items = [item(1, estimate=60), item(2, estimate=120, deps=(1,)), item(3, estimate=60, deps=(1,)),
             item(4, estimate=60, deps=(1,)), item(5, estimate=60, deps=(2, 3, 4))]
    graph = build_graph(items)
    schedule = simulate(graph, 2)
    assert schedule.waves == [[1], [2, 3], [4], [5]]
    assert schedule.start_ms == {1: 0, 2: 60_000, 3: 60_000, 4: 120_000, 5: 180_000}
    assert schedule.makespan_ms == 240_000
    plan = plan_of(*items, max_parallel=2)
    assert plan.predicted_makespan == 240.0 and plan.lower_bound == 240.0  # work / slots = 360 / 2 + ...
    assert plan.critical_path == ["001", "002", "005"]


def test_lower_bound_counts_items_that_conflict_in_a_chain() -> None:
    # 1 -> 2 is the critical path (120 s); 3 conflicts with both, so the three run one after another.
    plan = plan_of(item(1, estimate=60, files=("x", "y")), item(2, estimate=60, deps=(1,), files=("y",)),
                   item(3, estimate=50, files=("x", "y")), max_parallel=4)
    assert plan.lower_bound == 170.0 and plan.predicted_makespan == 170.0


def test_lower_bound_uses_total_work_over_slots() -> None:
    plan = plan_of(*(item(number, estimate=100) for number in range(1, 11)), max_parallel=4)
    assert plan.lower_bound == 250.0 and plan.predicted_makespan == 300.0


def test_in_progress_items_hold_slots_and_run_for_their_estimate() -> None:
    plan = plan_of(item(1, "in_progress", estimate=100), item(2, estimate=10), item(3, estimate=10, deps=(1,)),
                   max_parallel=1)
    assert plan.run_now == [] and plan.waves == [["002"], ["003"]] and plan.predicted_makespan == 120.0
    plan = plan_of(*(item(number, "in_progress", estimate=100) for number in range(1, 4)), max_parallel=2)
    assert plan.predicted_makespan == 100.0 and plan.lower_bound == 100.0  # already more than max_parallel


def test_patterns() -> None:
    # 4 also waits on 8, so it is not a branch of the fork at 1; 8 -> 4 is no pipeline either.
    plan = plan_of(item(1), item(2, deps=(1,)), item(3, deps=(1,)), item(4, deps=(1, 8)),
                   item(5, deps=(2, 3, 4)), item(6, deps=(5,)), item(7, deps=(6,)), item(8))
    assert plan.patterns.model_dump() == {
        "fork_join": [{"fork": "001", "branches": ["002", "003"], "join": "005"}],
        "pipelines": [["005", "006", "007"]],
    }


def test_mermaid_flowchart() -> None:
    plan = plan_of(item(1, "completed"), item(2, deps=(1,), files=("a",)), item(3, deps=(1,), files=("a",)),
                   item(4, deps=(9,)), WorkItem(id=5, id_str="005", file="005-failed-q.md", path="", slug="q",
                                                status="failed", title='Say "hi" <now>', files=["q"]))
    assert plan.mermaid == """flowchart LR
    classDef pending fill:#f3f4f6,stroke:#6b7280,color:#111827
    classDef in_progress fill:#dbeafe,stroke:#2563eb,color:#1e3a8a
    classDef completed fill:#dcfce7,stroke:#16a34a,color:#14532d
    classDef blocked fill:#fef3c7,stroke:#d97706,color:#78350f
    classDef failed fill:#fee2e2,stroke:#dc2626,color:#7f1d1d
    classDef error fill:#fee2e2,stroke:#dc2626,stroke-width:3px,stroke-dasharray:5 3,color:#7f1d1d
    n001["001: Item 1"]:::completed
    n002["002: Item 2"]:::pending
    n003["003: Item 3"]:::pending
    n004["004: Item 4"]:::error
    n005["005: Say #quot;hi#quot; #lt;now#gt;"]:::failed
    n001 --> n002
    n001 --> n003
    n002 -.- n003
"""


def test_mermaid_draws_large_queues_in_part() -> None:
    plan = plan_of(*(item(number, deps=(number - 1,) if number > 1 else ()) for number in range(1, 1001)))
    assert plan.mermaid.count(":::pending") == 200
    assert plan.mermaid.endswith("    %% drawn in part: 200 of 1000 items, 199 of 199 links among them "
                                 "(Mermaid renders at most about 500 links)\n")


# --- the Scheduler the run engine drives -------------------------------------------------------------------------


@pytest.fixture(params=["parked", "bits"])
def ready_kept(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A Scheduler test runs with the ready items parked, and kept as bits (`planner._bit_counters`)."""
    choice = (lambda index: None) if request.param == "parked" else (lambda index: index.counter_bits)
    monkeypatch.setattr(planner, "_bit_counters", choice)
    return request.param


def test_the_scheduler_keeps_ready_items_as_bits_with_few_counters_and_many_key_sets() -> None:
    def kept_as_bits(components: list[tuple[str, ...]]) -> bool:
        graph = build_graph([item(number, components=held) for number, held in enumerate(components, start=1)])
        return Scheduler(graph)._bits is not None

    pairs = [(f"c{a}", f"c{b}") for a in range(4) for b in range(a + 1, 4)]
    assert kept_as_bits(pairs * 2)  # 6 key sets, 4 counters
    assert not kept_as_bits([(f"c{a}",) for a in range(4)] * 3)  # 4 key sets, 4 counters: parking wakes few
    past = FEW_COUNTERS + 1
    assert not kept_as_bits([(f"c{a}", f"c{(a + 1) % past}", f"c{(a + 7) % past}") for a in range(past)])


@pytest.mark.usefixtures("ready_kept")
def test_scheduler_starts_the_best_ready_items_and_follows_completions() -> None:
    graph = build_graph([item(1, estimate=600), item(2, deps=(1,)), item(3), item(4, deps=(2,)),
                         item(5, files=("shared",)), item(6, files=("shared",), priority="high")])
    scheduler = Scheduler(graph)
    assert scheduler.ready() == [1, 6, 3, 5]
    assert scheduler.start_next(3) == [1, 6, 3]
    assert scheduler.start_next(3) == []        # 5 conflicts with the running 6
    assert scheduler.finished(6, ok=True) == []
    assert scheduler.start_next(3) == [5]
    assert scheduler.finished(1, ok=False) == [2, 4]   # what waits on a failure is skipped
    assert scheduler.skipped == {2: 1, 4: 1}
    scheduler.finished(3, ok=True)
    scheduler.finished(5, ok=True)
    assert scheduler.idle and scheduler.not_started() == []
    assert (scheduler.done, scheduler.failed) == ({3, 5, 6}, {1})


@pytest.mark.usefixtures("ready_kept")
def test_scheduler_can_run_part_of_the_queue() -> None:
    graph = build_graph([item(1), item(2, deps=(1,)), item(3), item(4, deps=(3,))])
    scheduler = Scheduler(graph, only=[2])
    assert scheduler.start_next(5) == [1]
    scheduler.finished(1, ok=True)
    assert scheduler.start_next(5) == [2]
    scheduler.finished(2, ok=True)
    assert scheduler.idle


@pytest.mark.usefixtures("ready_kept")
def test_scheduler_waits_for_items_already_in_progress() -> None:
    graph = build_graph([item(1, "in_progress", files=("x",)), item(2, deps=(1,)), item(3, files=("x",))])
    scheduler = Scheduler(graph)
    assert scheduler.start_next(5) == []
    scheduler.finished(1, ok=True)
    assert scheduler.start_next(5) == [3, 2]  # equal paths: fewest blockers first


# --- planning a workspace ----------------------------------------------------------------------------------------


def test_repository_example_queue() -> None:
    plan = plan_workspace(REPO, None, None, QueueReader())
    assert plan.errors == [] and plan.warnings == []
    assert plan.max_parallel == 3
    assert plan.run_now == ["001"]
    assert plan.waves == [["001"], ["002", "003"], ["004"], ["005"], ["006"], ["007"]]
    assert plan.critical_path == ["001", "002", "005", "006", "007"]
    assert [(c.a, c.b, c.components) for c in plan.conflicts] == [("003", "004", ["api"])]
    assert plan.patterns.model_dump() == {"fork_join": [{"fork": "001", "branches": ["002", "003", "004"],
                                                         "join": "005"}],
                                          "pipelines": [["005", "006", "007"]]}
    assert (plan.predicted_makespan, plan.lower_bound) == (8.0, 8.0)
    assert {row.id for row in plan.items} == {f"00{n}" for n in range(1, 8)}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(REPO / ".agent" / "queue", root / ".agent" / "queue")
    return root


def test_plan_workspace_arguments(workspace: Path, tmp_path: Path) -> None:
    reader = QueueReader()
    assert plan_workspace(workspace, None, None, reader).max_parallel == 5  # no config: the default
    assert plan_workspace(workspace, ".agent/queue", 2, reader).run_now == ["001"]
    with pytest.raises(UsageError, match=r"^max_parallel must be between 1 and 64, not 0$"):
        plan_workspace(workspace, None, 0, reader)
    with pytest.raises(UsageError, match=r"^max_parallel must be between 1 and 64, not 65$"):
        plan_workspace(workspace, None, 65, reader)
    with pytest.raises(PathOutsideWorkspace, match=r"^queue_dir '\.\./\.\.' resolves outside"):
        plan_workspace(workspace, "../..", None, reader)
    with pytest.raises(QueueError, match=r"^queue directory 'missing' does not exist"):
        plan_workspace(workspace, "missing", None, reader)


def test_plan_workspace_reports_config_warnings_and_errors(workspace: Path) -> None:
    (workspace / ".agent" / "config.yaml").write_text("autonomy:\n  max_parallel: 99\n")
    plan = plan_workspace(workspace, None, None, QueueReader())
    assert plan.max_parallel == 64
    assert plan.warnings == [Diagnostic(kind="config", file=".agent/config.yaml",
                                        message="max_parallel 99 is outside 1..64; using 64")]
    (workspace / ".agent" / "config.yaml").write_text("autonomy: [\n")
    with pytest.raises(QueueError, match=r"^\.agent/config\.yaml: is not valid YAML"):
        plan_workspace(workspace, None, None, QueueReader())


def test_an_unchanged_queue_is_neither_parsed_nor_planned_again(workspace: Path) -> None:
    reader = QueueReader()
    first = plan_workspace(workspace, None, 3, reader)
    assert plan_workspace(workspace, None, 3, reader) is first and reader.parse_count == 7
    assert plan_workspace(workspace, None, 2, reader) is not first
    path = workspace / ".agent" / "queue" / "001-pending-setup-workspace.md"
    path.rename(path.with_name("001-completed-setup-workspace.md"))
    second = plan_workspace(workspace, None, 3, reader)
    assert reader.parse_count == 8 and second.run_now == ["002", "003"]


def test_plan_table_and_dot(workspace: Path) -> None:
    plan = plan_workspace(workspace, None, None, QueueReader())
    console = Console(record=True, width=150)
    console.print(plan_table(plan))
    text = console.export_text()
    for expected in ("7 items (7 pending)", "run now: 001", "Build the frontend", "critical path: 001 -> 002",
                     "fork-join: 001 -> [002, 003, 004] -> 005", "pipeline: 005 -> 006 -> 007", "api",
                     "predicted 8s (lower bound 8s)"):
        assert expected in text
    dot = to_dot(plan)
    assert dot.startswith("digraph queue {\n") and '"001" -> "002";' in dot and "style=dashed" in dot


def test_a_long_plan_table_lists_what_needs_attention_and_counts_the_rest() -> None:
    """300 items in a chain (each waits on the one before: 300 waves and one 300-item pipeline), the
    first 150 completed, two more that failed or are blocked far down, 150 sharing one component: the
    table keeps 100 items (the failed and blocked ones, the one that runs now, then the waiting ones
    in id order), 20 waves and 100 conflicting pairs, and counts the rest; every_row lists them all."""
    items = [item(n, "completed" if n <= 150 else "pending", deps=(n - 1,) if n > 151 else (),
                  components=("db",) if n > 150 else ()) for n in range(1, 301)]
    items += [item(301, "failed"), item(302, "blocked")]
    plan = plan_of(*items)
    console = Console(record=True, width=200)
    console.print(plan_table(plan))
    text = console.export_text()
    listed = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│ ") and line.count("│") == 8]
    assert listed[:3] == ["151", "152", "153"] and listed[-2:] == ["301", "302"] and len(listed) == 100
    assert ("… 202 more items (52 pending, 150 completed) not listed; `agent-parallel plan --all` lists every row, "
            "`--format json` gives every field") in text
    assert "… 130 more waves not listed" in text and "… 11,075 more conflicting pairs not listed (11,175 in all); " \
        "`agent-parallel plan --format json` groups them by what they share (conflict_groups)" in text
    console = Console(record=True, width=200)
    console.print(plan_table(plan, every_row=True))
    text = console.export_text()
    assert "more items" not in text and "more waves" not in text and "│ 001 " in text and "│ 150 │" in text
    assert text.count("more conflicting pairs") == 1  # the plan itself holds 200 of them


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (0, "0s"), (2.5, "2.5s"), (45, "45s"), (60, "1m"),
                                               (3725, "1h 2m 5s"), (7200, "2h")])
def test_format_seconds(seconds, text) -> None:
    assert format_seconds(seconds) == text


@pytest.mark.usefixtures("ready_kept")
def test_a_better_twin_is_checked_at_once_when_its_class_waits_behind_a_freed_counter() -> None:
    """1 holds x; 6 (x and y: not a twin) and 2 (x) wait for it, parked; 1 ends and the freed counter
    wakes 6, the best parked, which no slot takes yet; then 3 (x, a twin of 2 ranked above 6) becomes
    ready. 3 must start first, as any new item would: its class waited behind a counter already at
    zero, and listing 3 there would leave it behind 6 (a scan of every ready item starts 3)."""
    graph = build_graph([item(1, components=("x",)), item(2, components=("x",)), item(3, deps=(5,), components=("x",)),
                         item(5), item(6, components=("x", "y")), item(7, deps=(2,), components=("y",))])
    assert graph.conflict_index.twin_class(6) != graph.conflict_index.twin_class(2)
    scheduler = Scheduler(graph, rank={1: 0, 3: 1, 6: 2, 2: 3, 5: 4, 7: 5})
    assert scheduler.start_next(1) == [1] and scheduler.start_next(1) == [5]  # 6 and 2 parked behind 1
    scheduler.finished(1, ok=True)
    assert scheduler.start_next(0) == []  # wakes 6 (the freed counter's best), which waits for a slot
    scheduler.finished(5, ok=True)  # 3 is ready: a better twin of the parked 2
    assert scheduler.start_next(1) == [3] and scheduler.start_next(1) == []
    scheduler.finished(3, ok=True)
    assert scheduler.start_next(2) == [6] and scheduler.ready() == [2]


@pytest.mark.usefixtures("ready_kept")
def test_scheduler_ignores_ends_of_items_that_are_not_running() -> None:
    graph = build_graph([item(1), item(2, deps=(1,))])
    scheduler = Scheduler(graph)
    assert scheduler.finished(1, ok=True) == []  # never started
    assert scheduler.start_next(2) == [1]
    scheduler.finished(1, ok=True)
    scheduler.finished(1, ok=True)  # reported twice
    assert scheduler.start_next(2) == [2]
