"""A server stopped while an isolated item works in its worktree (or integrates it): the worktree and branch are kept and
reported, `agent-parallel worktrees` lists them as not safe to remove, and moving the item back to
pending reuses both, so the work done before the stop is integrated with the rest.

Two ways to stop: the in-memory server shut down (its items are stopped and recorded as failed), and
the server process SIGKILLed (its item is left in_progress with a claim nobody holds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client

from agent_parallel.server import ServerSettings, build_server
from agent_parallel.worktrees import prepare, release
from conftest import RawServer, call
from queue_helpers import statuses, write_config, write_item
from worktree_helpers import agent, config, git, make_empty_queue_repo

pytestmark = pytest.mark.anyio

WORKTREE = ".agent/worktrees/001-resumable"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_empty_queue_repo(tmp_path / "repo")


def resumable_item(root: Path, marker: Path) -> None:
    """An agent that, the first time, commits some work, leaves more uncommitted, and is stopped while
    it sleeps; run again in the same worktree it finds that work and adds to it."""
    first = (f"echo first > work.txt && git add work.txt && git commit -qm 'first part' && echo draft > notes.txt "
             f"&& echo \"port=$AGENT_PORT\" > {marker}.port && touch {marker} && sleep 60")
    again = (f"test -f work.txt && test -f notes.txt && echo again >> work.txt "
             f"&& echo \"port=$AGENT_PORT\" > {marker}.port2")
    write_item(root, 1, "resumable", title="Resumable", command=f"if [ -f {marker} ]; then {again}; else {first}; fi")


def settings() -> ServerSettings:
    return ServerSettings(kill_grace_s=0.5, min_free_memory=0)


def worktrees_listing(root: Path) -> list[dict]:
    done = subprocess.run([str(Path(sys.executable).parent / "agent-parallel"), "worktrees", "--json", "--root",
                           str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def resume_and_run(root: Path, marker: Path) -> dict:
    """A new server: update_item back to pending, run, and the run's report."""
    async with Client(build_server(root, settings())) as client:
        moved = await call(client, "update_item", item="001", status="pending", reason="resume after the restart")
        assert moved["status"] == "pending"
        run = await call(client, "run_queue")
        out = await call(client, "task_output", task_id=run["run_id"], timeout=60)
        item_task = out["run"]["outcomes"][0]["task_id"]
        log = await call(client, "task_output", task_id=item_task)
    assert out["status"] == "completed", out["output"]
    assert "(reused: the work done so far is kept)" in log["output"]
    return out


def assert_integrated_with_the_earlier_work(root: Path, marker: Path) -> None:
    assert statuses(root) == {"001": "completed"}
    assert (root / "work.txt").read_text() == "first\nagain\n"  # the commit made before the stop, then the rest
    assert (root / "notes.txt").read_text() == "draft\n"  # left uncommitted before the stop: committed and integrated
    assert "first part" in git(root, "log", "--format=%s", "main").splitlines()
    assert Path(f"{marker}.port").read_text() == Path(f"{marker}.port2").read_text() != "port=\n"  # its port again
    assert not (root / WORKTREE).exists() and worktrees_listing(root) == []  # integrated: provably safe, removed


async def wait_for(marker: Path) -> None:
    with anyio.fail_after(30):
        while not marker.exists():
            await anyio.sleep(0.05)


@pytest.mark.fault("the server shuts down while an isolated item works in its worktree: the item fails with its "
                   "worktree and branch kept and reported, listed as not safe to remove; moved back to pending it "
                   "reuses them and the earlier work is integrated")
async def test_a_server_shut_down_mid_item_keeps_its_worktree_for_the_retry(repo: Path, tmp_path: Path):
    write_config(repo, runner={"isolation": "worktree"}, worktree={"ports": "47310-47330"}, autonomy={"level": "L3"})
    marker = tmp_path / "started"
    resumable_item(repo, marker)
    async with Client(build_server(repo, settings())) as client:
        run = await call(client, "run_queue")
        await wait_for(marker)
    assert statuses(repo) == {"001": "failed"}

    async with Client(build_server(repo, settings())) as client:  # after the restart: reported
        report = await call(client, "task_output", task_id=run["run_id"])
        plan = await call(client, "queue_plan")
    row = report["run"]["outcomes"][0]
    assert row["outcome"] == "failed" and row["phase"] == "running" and row["branch"] == "agent/001-resumable"
    assert row["worktree"] == str(repo / WORKTREE)
    assert (f"its worktree {repo / WORKTREE} and branch agent/001-resumable are kept: move item 001 back to pending "
            "with update_item to go on from the work done so far (they are reused)") in row["notes"]
    listed = worktrees_listing(repo)
    assert [(w["item_id"], w["branch"], w["safe"]) for w in listed] == [("001", "agent/001-resumable", False)]
    assert listed[0]["ahead"] == 1 and "notes.txt" in listed[0]["reason"]
    assert {r["id"]: r["integration_estimate"] for r in plan["items"]}["001"] is not None

    await resume_and_run(repo, marker)
    assert_integrated_with_the_earlier_work(repo, marker)


@pytest.mark.fault("the server is SIGKILLed while an isolated item works in its worktree: after the restart the "
                   "plan's stale-claim warning names the kept worktree and branch, the worktree is listed as not safe; "
                   "update_item back to pending reuses them and the earlier work is integrated")
async def test_a_server_killed_mid_item_keeps_its_worktree_for_the_retry(repo: Path, tmp_path: Path):
    write_config(repo, runner={"isolation": "worktree"}, worktree={"ports": "47340-47360"}, autonomy={"level": "L3"})
    marker = tmp_path / "started"
    resumable_item(repo, marker)
    with RawServer(repo) as server:
        server.call_tool("run_queue", {})
        await wait_for(marker)
        server.process.kill()
        server.process.wait()
    assert statuses(repo) == {"001": "in_progress"}  # nobody moved it: the claim's holder is gone

    async with Client(build_server(repo, settings())) as client:
        plan = await call(client, "queue_plan")
    stale = [w for w in plan["warnings"] if w["kind"] == "stale_claim"]
    assert len(stale) == 1 and (f"Its worktree {WORKTREE} and branch agent/001-resumable are kept") in stale[0]["message"]
    assert "moving it back to pending reuses both" in stale[0]["message"]
    row = plan["items"][0]
    assert row["status"] == "in_progress" and row["forecast"] == []  # its branch would merge cleanly now
    listed = worktrees_listing(repo)
    assert [(w["item_id"], w["safe"], w["state"]) for w in listed] == [("001", False, "untracked")]
    assert statuses(repo) == {"001": "in_progress"}  # planning and listing changed nothing

    await resume_and_run(repo, marker)
    assert_integrated_with_the_earlier_work(repo, marker)


@pytest.mark.fault("a crash in the middle of an integration's rebase leaves the item's worktree mid-rebase: the retry "
                   "fails with the rebase named and how to finish or undo it (nothing lost); after rebase --abort the "
                   "retry integrates every commit")
async def test_a_worktree_left_mid_rebase_is_named_and_resumable(repo: Path):
    write_config(repo, runner={"isolation": "worktree"}, autonomy={"level": "L3"})
    write_item(repo, 1, "resumable", title="Resumable", command="echo done >> work.txt")
    lease = prepare(repo, config(), "001", "resumable")  # as the run that crashed had made it
    agent(lease, "echo one > work.txt && git add work.txt && git commit -qm one && echo two > two.txt "
                 "&& git add two.txt && git commit -qm two")
    release(repo, lease)
    (repo / "b.txt").write_text("the target moved\n")
    git(repo, "commit", "-qam", "target moves")
    stopped = subprocess.run(["git", "rebase", "--exec", "false", "main"], cwd=lease.path, capture_output=True)
    assert stopped.returncode != 0  # the rebase stopped half-way, as a SIGKILL during integration leaves it
    tips = git(repo, "rev-parse", "agent/001-resumable")

    async with Client(build_server(repo, settings())) as client:
        run = await call(client, "run_queue")
        out = await call(client, "task_output", task_id=run["run_id"], timeout=60)
    row = out["run"]["outcomes"][0]
    assert row["outcome"] == "failed" and f"a rebase is in progress in worktree {repo / WORKTREE}" in row["reason"]
    assert f"git -C {repo / WORKTREE} rebase --abort" in row["reason"]
    assert git(repo, "rev-parse", "agent/001-resumable") == tips and statuses(repo) == {"001": "failed"}

    git(lease.path, "rebase", "--abort")  # what the message says
    async with Client(build_server(repo, settings())) as client:
        await call(client, "update_item", item="001", status="pending")
        run = await call(client, "run_queue")
        out = await call(client, "task_output", task_id=run["run_id"], timeout=60)
    assert out["status"] == "completed", out["output"]
    assert (repo / "work.txt").read_text() == "one\ndone\n" and (repo / "two.txt").read_text() == "two\n"
    assert (repo / "b.txt").read_text() == "the target moved\n"
