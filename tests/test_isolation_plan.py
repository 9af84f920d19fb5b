"""The plan of isolated items: integration time measured per item, kept in a bounded file that a cloned
repository cannot use against us, added to the prediction (integrations take turns); allow_overlap
planned as the run schedules it, with the declared overlaps shown as predicted conflicts and, for items
in progress in their worktrees, git's forecast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

from agent_parallel.config import load_config
from agent_parallel.queue.items import QueueReader, WorkItem
from agent_parallel.queue.plan import plan_workspace
from agent_parallel.queue.planner import IsolationPolicy, build_graph, plan_graph
from agent_parallel.queue.run import QueueContext
from agent_parallel.queue.timings import (DEFAULT_INTEGRATION_S, MAX_SAMPLES, TIMES_FILE, integration_estimate,
                                          load_samples, record_integration)
from agent_parallel.server import ServerSettings, build_server
from agent_parallel.worktrees import prepare
from conftest import call
from queue_helpers import write_config, write_item
from worktree_helpers import agent, config as wt_config, git, make_empty_queue_repo

WORKTREE = IsolationPolicy(default="worktree", integration_s=5.0, integration_samples=3)


def item(n: int, *, status: str = "pending", estimate: float = 60.0, files: list[str] | None = None,
         isolation: str | None = None, blocked_by: list[int] | None = None) -> WorkItem:
    return WorkItem(id=n, id_str=f"{n:03d}", file=f"{n:03d}-{status}-x{n}.md", path="", slug=f"x{n}", title=f"Item {n}",
                    status=status, blocked_by=blocked_by or [], files=files or [], estimate_s=estimate,
                    isolation=isolation)  # type: ignore[arg-type]


def plan_of(items: list[WorkItem], policy: IsolationPolicy, max_parallel: int = 2):
    return plan_graph(build_graph(items, [], policy), max_parallel)


# --- the planner (pure) --------------------------------------------------------------------------------


def test_integrations_are_added_to_isolated_items_and_take_turns():
    plan = plan_of([item(1, files=["a"]), item(2, files=["b"]), item(3, files=["c"], isolation="none")], WORKTREE,
                   max_parallel=3)
    rows = {row.id: row for row in plan.items}
    assert [rows[i].integration_estimate for i in ("001", "002", "003")] == [5.0, 5.0, None]
    assert plan.isolation == "worktree" and plan.integration_estimate == 5.0 and plan.integration_samples == 3
    # all three work for 60 s; 001 integrates 60-65, 002 waits for the lock: 65-70
    assert plan.waves == [["001", "002", "003"]] and plan.predicted_makespan == 70.0
    assert plan.lower_bound == 65.0  # the critical path: one item and its integration


def test_a_dependent_starts_after_its_predecessor_is_integrated():
    plan = plan_of([item(1), item(2, blocked_by=[1])], WORKTREE)
    assert plan.waves == [["001"], ["002"]] and plan.predicted_makespan == 130.0 and plan.lower_bound == 130.0
    assert plan.critical_path == ["001", "002"]


def test_the_sum_of_integrations_bounds_the_makespan():
    """Many short isolated items: integrations, one at a time, are the bottleneck."""
    plan = plan_of([item(n, estimate=1.0, files=[f"f{n}"]) for n in range(1, 11)], WORKTREE, max_parallel=10)
    assert plan.lower_bound == 50.0  # ten integrations of 5 s, one after another
    assert plan.predicted_makespan == 51.0 and plan.lower_bound <= plan.predicted_makespan


def test_without_isolation_nothing_is_added():
    plan = plan_of([item(1), item(2)], IsolationPolicy(integration_s=5.0))
    assert plan.predicted_makespan == 60.0 and plan.integration_estimate is None
    assert [row.integration_estimate for row in plan.items] == [None, None] and plan.isolation == "none"
    assert "[[" not in plan.mermaid


def test_declared_overlaps_serialize_isolated_items_unless_overlap_is_allowed():
    items = [item(1, files=["src"]), item(2, files=["src/a.py"]), item(3, files=["src/a.py"], isolation="none"),
             item(4, files=["src/a.py"], isolation="none")]
    serial = plan_of(items, WORKTREE, max_parallel=4)
    assert serial.conflicts_total == 6 and serial.predicted_conflicts == [] and serial.predicted_conflicts_total == 0
    assert len(serial.waves) == 4

    allowed = plan_of(items, IsolationPolicy(default="worktree", allow_overlap=True, integration_s=5.0), max_parallel=4)
    assert [(c.a, c.b) for c in allowed.conflicts] == [("003", "004")]  # in place, both: still never together
    assert [(c.a, c.b, c.files) for c in allowed.predicted_conflicts] == [
        ("001", "002", ["src", "src/a.py"]), ("001", "003", ["src", "src/a.py"]), ("001", "004", ["src", "src/a.py"]),
        ("002", "003", ["src/a.py"]), ("002", "004", ["src/a.py"])]
    assert allowed.predicted_conflicts_total == 5 and allowed.allow_overlap
    assert allowed.waves[0] == ["001", "002", "003"]  # the isolated ones beside anything; 004 waits for 003
    rows = {row.id: row for row in allowed.items}
    assert rows["001"].files == ["src"] and not [w for w in allowed.warnings if w.kind == "no_files"]  # as declared
    assert 'n001[["001: Item 1"]]' in allowed.mermaid and "n001 -. may conflict .- n002" in allowed.mermaid


def test_plan_and_run_see_the_same_conflicts_with_allow_overlap(tmp_path: Path):
    """The run builds its graph through QueueContext.graph (isolation_policy): the plan agrees on what
    is kept apart."""
    write_config(tmp_path, runner={"isolation": "worktree"}, integration={"allow_overlap": True})
    write_item(tmp_path, 1, "iso-a", files=["src"], command="true")
    write_item(tmp_path, 2, "iso-b", files=["src/a.py"], command="true")
    write_item(tmp_path, 3, "here-a", files=["src/a.py"], isolation="none", command="true")
    write_item(tmp_path, 4, "here-b", files=["src"], isolation="none", command="true")
    plan = plan_workspace(tmp_path, None, 4, QueueReader())
    config, _ = load_config(tmp_path)
    run_graph = QueueContext(tmp_path, tmp_path / ".agent/runs", config, None, QueueReader()).graph()  # type: ignore[arg-type]
    run_pairs = run_graph.conflict_index.pairs()
    assert [(c.a, c.b) for c in plan.conflicts] == [(f"{a:03d}", f"{b:03d}") for a, b in run_pairs] == [("003", "004")]
    assert plan.predicted_conflicts_total == 5 and plan.waves[0] == ["001", "002", "003"]


# --- the measured times ----------------------------------------------------------------------------------


def times_file(root: Path) -> Path:
    return root / ".agent/runs" / TIMES_FILE


def test_recorded_times_give_the_median_of_the_recent_ones(tmp_path: Path):
    assert integration_estimate(tmp_path) == (DEFAULT_INTEGRATION_S, 0)
    for seconds in (0.5, 0.7, 30.0):
        record_integration(tmp_path, "001", seconds)
    assert integration_estimate(tmp_path) == (0.7, 3)  # one slow verify does not skew it
    assert (tmp_path / ".agent/runs/.gitignore").read_text() == "*\n"  # created as the runs dir always is


def test_the_file_keeps_only_the_last_samples(tmp_path: Path):
    for n in range(MAX_SAMPLES + 10):
        record_integration(tmp_path, f"{n:03d}", 1.0 + n)
    samples = load_samples(tmp_path)
    assert len(samples) == MAX_SAMPLES and samples[0].item == "010" and samples[-1].item == f"{MAX_SAMPLES + 9:03d}"
    assert len(json.loads(times_file(tmp_path).read_bytes())["integrations"]) == MAX_SAMPLES


def test_the_plan_shows_the_measured_estimate_and_is_replanned_when_it_changes(tmp_path: Path):
    write_config(tmp_path, runner={"isolation": "worktree"})
    write_item(tmp_path, 1, "one", command="true", estimate="10s")
    reader = QueueReader()
    first = plan_workspace(tmp_path, None, 2, reader)
    assert (first.integration_estimate, first.integration_samples) == (DEFAULT_INTEGRATION_S, 0)
    assert first.predicted_makespan == 10 + DEFAULT_INTEGRATION_S
    record_integration(tmp_path, "001", 4.0)
    second = plan_workspace(tmp_path, None, 2, reader)
    assert (second.integration_estimate, second.integration_samples, second.predicted_makespan) == (4.0, 1, 14.0)
    assert second.items[0].integration_estimate == 4.0
    write_config(tmp_path, runner={"isolation": "none"})  # the config's isolation is part of the cache key too
    third = plan_workspace(tmp_path, None, 2, reader)
    assert third.integration_estimate is None and third.predicted_makespan == 10.0 and third.isolation == "none"


HOSTILE = {
    "not json": b"{not json",
    "a list": b"[1, 2, 3]",
    "wrong shapes": json.dumps({"integrations": [1, "x", None, {"item": "001"}, {"item": 1, "seconds": 1, "at": 0},
                                                 {"item": "../x", "seconds": 1, "at": 0},
                                                 {"item": "001", "seconds": True, "at": 0},
                                                 {"item": "001", "seconds": -1, "at": 0},
                                                 {"item": "001", "seconds": 1e9, "at": 0},
                                                 {"item": "001", "seconds": 1, "at": "now"}]}).encode(),
    "NaN": b'{"integrations": [{"item": "001", "seconds": NaN, "at": 0}]}',
    "deep": b"[" * 100_000,
    "huge": b'{"integrations": [' + b" " * (1 << 20) + b"]}",
}


@pytest.mark.fault("a cloned repository ships a hostile integration-times file (bad JSON, wrong shapes, NaN, "
                   "deep nesting, huge): the plan uses the default estimate, the next record replaces it")
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_times_file_counts_as_none(tmp_path: Path, kind: str):
    times_file(tmp_path).parent.mkdir(parents=True)
    times_file(tmp_path).write_bytes(HOSTILE[kind])
    assert load_samples(tmp_path) == [] and integration_estimate(tmp_path) == (DEFAULT_INTEGRATION_S, 0)
    record_integration(tmp_path, "001", 3.0)
    assert integration_estimate(tmp_path) == (3.0, 1)


@pytest.mark.fault("the integration-times file is a symlink to a file outside the workspace: never read through, "
                   "and recording replaces the link, leaving the outside file as it was")
def test_a_symlinked_times_file_is_not_followed(tmp_path: Path):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"integrations": [{"item": "001", "seconds": 99, "at": 0}]}))
    root = tmp_path / "ws"
    times_file(root).parent.mkdir(parents=True)
    times_file(root).symlink_to(outside)
    assert integration_estimate(root) == (DEFAULT_INTEGRATION_S, 0)
    record_integration(root, "002", 1.5)
    assert not times_file(root).is_symlink() and integration_estimate(root) == (1.5, 1)
    assert json.loads(outside.read_text())["integrations"][0]["seconds"] == 99


@pytest.mark.fault("the integration-times file's temporary name is a symlink to a file outside the workspace: "
                   "the write never goes through it")
def test_a_symlinked_temporary_file_is_not_written_through(tmp_path: Path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    root = tmp_path / "ws"
    times_file(root).parent.mkdir(parents=True)
    (times_file(root).parent / f".{TIMES_FILE}.tmp").symlink_to(outside)
    record_integration(root, "001", 2.0)
    assert outside.read_text() == "keep me" and integration_estimate(root) == (2.0, 1)


@pytest.mark.fault("the integration-times file is a FIFO: reading it does not hang, the default estimate is used")
def test_a_fifo_times_file_does_not_hang(tmp_path: Path):
    times_file(tmp_path).parent.mkdir(parents=True)
    os.mkfifo(times_file(tmp_path))
    assert integration_estimate(tmp_path) == (DEFAULT_INTEGRATION_S, 0)


@pytest.mark.fault("the runs directory is a symlink out of the workspace: the integration times there are neither "
                   "read nor written")
def test_a_runs_directory_pointing_outside_is_neither_read_nor_written(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / TIMES_FILE).write_text(json.dumps({"integrations": [{"item": "001", "seconds": 7, "at": 0}]}))
    root = tmp_path / "ws"
    (root / ".agent").mkdir(parents=True)
    (root / ".agent/runs").symlink_to(elsewhere)
    assert integration_estimate(root) == (DEFAULT_INTEGRATION_S, 0)
    with pytest.raises(Exception, match="outside the workspace"):
        record_integration(root, "002", 1.0)
    assert json.loads((elsewhere / TIMES_FILE).read_text())["integrations"][0]["seconds"] == 7


# --- through the tools, in a real repository ----------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_empty_queue_repo(tmp_path / "repo")


@pytest.mark.anyio
async def test_a_run_records_each_integration_and_the_next_plan_uses_it(repo: Path):
    write_config(repo, runner={"isolation": "worktree"}, autonomy={"level": "L3", "max_parallel": 2})
    write_item(repo, 1, "edit-a", title="Edit a", command="echo A > a.txt")
    write_item(repo, 2, "edit-b", title="Edit b", command="echo B > b.txt")
    write_item(repo, 3, "later", title="Later", command="true", blocked_by=[1])
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        before = await call(client, "queue_plan")
        assert before["isolation"] == "worktree" and before["integration_samples"] == 0
        run = await call(client, "run_queue", items=["001", "002"])
        out = await call(client, "task_output", task_id=run["run_id"], timeout=60)
        assert out["status"] == "completed", out["output"]
        measured = {o["item"]: o["integration_s"] for o in out["run"]["outcomes"]}
        plan = await call(client, "queue_plan")
    samples = load_samples(repo)
    assert sorted(s.item for s in samples) == ["001", "002"]
    assert {s.item: s.seconds for s in samples} == {k: round(v, 3) for k, v in measured.items()}
    assert plan["integration_samples"] == 2
    assert abs(plan["integration_estimate"] - sum(s.seconds for s in samples) / 2) < 0.002  # the median of two
    row = {r["id"]: r for r in plan["items"]}["003"]
    assert row["integration_estimate"] == plan["integration_estimate"] and "forecast" not in row


def claim(root: Path, n: int, slug: str) -> None:
    """Mark an item in progress by hand (as a server that crashed would leave it)."""
    path = root / f".agent/queue/{n:03d}-pending-{slug}.md"
    path.rename(path.with_name(f"{n:03d}-in_progress-{slug}.md"))


def test_items_in_progress_get_gits_forecast(repo: Path):
    write_config(repo, runner={"isolation": "worktree"}, integration={"allow_overlap": True})
    for n, slug in ((1, "one"), (2, "two"), (3, "three")):
        write_item(repo, n, slug, files=["a.txt"], command="true")
    config = wt_config(integration_allow_overlap=True)
    one, two = prepare(repo, config, "001", "one"), prepare(repo, config, "002", "two")
    agent(one, "sed -i 's/^line 3$/ONE/' a.txt && git commit -qam one")
    agent(two, "sed -i 's/^line 3$/TWO/' a.txt && git commit -qam two")
    (repo / "a.txt").write_text((repo / "a.txt").read_text().replace("line 3\n", "MAIN\n"))
    git(repo, "commit", "-qam", "the target moves")
    claim(repo, 1, "one")
    claim(repo, 2, "two")
    plan = plan_workspace(repo, None, 3, QueueReader())
    rows = {row.id: row for row in plan.items}
    assert rows["001"].forecast == ["a.txt"] and rows["002"].forecast == ["a.txt"] and rows["003"].forecast is None
    pairs = {(p.a, p.b): p for p in plan.predicted_conflicts}
    assert pairs[("001", "002")].forecast == ["a.txt"] and pairs[("001", "003")].forecast is None
    assert plan.run_now == ["003"]  # allowed beside the others, as the run would start it


def test_a_branch_that_merges_cleanly_is_forecast_without_conflicts(repo: Path):
    write_config(repo, runner={"isolation": "worktree"})
    write_item(repo, 1, "clean", files=["b.txt"], command="true")
    lease = prepare(repo, wt_config(), "001", "clean")
    agent(lease, "echo more >> b.txt && git commit -qam more")
    claim(repo, 1, "clean")
    before = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    plan = plan_workspace(repo, None, 1, QueueReader())
    assert plan.items[0].forecast == [] and plan.items[0].status == "in_progress"
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == before


@pytest.mark.fault("planning a queue with isolated items in progress in a workspace that is not a git repository: a "
                   "forecast warning naming the setting, the plan otherwise whole")
def test_no_forecast_outside_a_git_repository_is_a_warning(tmp_path: Path):
    write_config(tmp_path, runner={"isolation": "worktree"})
    write_item(tmp_path, 1, "busy", status="in_progress", command="true")
    plan = plan_workspace(tmp_path, None, 1, QueueReader())
    warnings = [w for w in plan.warnings if w.kind == "forecast"]
    assert len(warnings) == 1 and "runner.isolation" in warnings[0].message and "git repository" in warnings[0].message
    assert plan.items[0].forecast is None and plan.items[0].integration_estimate == DEFAULT_INTEGRATION_S


def test_the_cli_table_shows_the_isolation_fields(repo: Path):
    write_config(repo, runner={"isolation": "worktree"}, integration={"allow_overlap": True})
    write_item(repo, 1, "one", files=["a.txt"], command="true", estimate="30s")
    write_item(repo, 2, "two", files=["a.txt"], command="true", estimate="30s")
    done = subprocess.run([str(Path(sys.executable).parent / "agent-parallel"), "plan", "--root", str(repo)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "isolation worktree: integration 2s per isolated item (none measured yet), overlaps allowed" in done.stdout
    assert "30s + 2s integration" in done.stdout and "Predicted conflicts" in done.stdout

