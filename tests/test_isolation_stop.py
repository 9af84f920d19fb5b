"""Stopping a run (or a launch_task(item=...) call) while an isolated item's `worktree.setup` or
`integration.verify` runs: the command is killed (with what it started), cancel_task and shutdown
answer at once instead of waiting for it,
and nothing is lost: a setup's item goes back to pending, a verify's item fails with its work kept
and the target unmoved. Real git repositories; the slow commands are `sleep`s that record their pids."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from agent_parallel.errors import ShellStopped
from agent_parallel.server import ServerSettings, build_server
from agent_parallel.worktrees import ShellStop
from agent_parallel.worktrees._git import run_shell
from conftest import all_dead, all_dead_soon, call, read_pids
from queue_helpers import by_item, statuses, write_config, write_item
from worktree_helpers import git, head, make_empty_queue_repo

pytestmark = pytest.mark.anyio

HANG = 120  # seconds the slow commands would take: far longer than any of these tests may wait


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_empty_queue_repo(tmp_path / "repo")


def slow_command(pids: Path) -> str:
    """A command that records its shell's pid and a child's, then waits on that child for `HANG` s."""
    return f"sleep {HANG} & echo $$ $! >> {pids}; wait"


async def wait_for_pids(pids: Path, count: int = 2) -> list[int]:
    with anyio.fail_after(30):
        while len(read_pids(pids)) < count:
            await anyio.sleep(0.05)
    return read_pids(pids)


async def cancel_run_when_started(client: Client, run_id: str, pids: Path) -> tuple[dict, list[int]]:
    """Cancel the run once the slow command runs; the run's report, which must come well before `HANG`."""
    started = await wait_for_pids(pids)
    with anyio.fail_after(30):  # the bug: cancel_task waited for the whole setup
        await call(client, "cancel_task", task_id=run_id)
        out = await call(client, "task_output", task_id=run_id, timeout=30)
    assert out["retrieval_status"] == "success", out
    return out, started


async def test_cancelling_a_run_kills_a_worktree_setup_and_gives_the_item_back(repo, tmp_path):
    pids = tmp_path / "setup.pids"
    write_config(repo, runner={"isolation": "worktree"}, worktree={"setup": slow_command(pids)},
                 autonomy={"level": "L3"})
    write_item(repo, 1, "a", title="A", command=f"touch {tmp_path / 'ran'}")
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        run = await call(client, "run_queue")
        out, started = await cancel_run_when_started(client, run["run_id"], pids)
    row = by_item(out)["001"]
    assert row["outcome"] == "not_started", row
    assert all_dead(started)  # the setup's shell and the sleep it started
    assert not (tmp_path / "ran").exists()  # the item's command never ran
    assert statuses(repo) == {"001": "pending"}  # the claim was given back: it can run later
    history = (repo / ".agent/runs/history.jsonl").read_text()
    assert "not started: worktree.setup" in history and \
        "was killed before it finished: its run was cancelled by cancel_task" in history
    assert (repo / ".agent/worktrees/001-a").is_dir()  # kept: a later run reuses it


async def test_stopping_the_server_kills_a_worktree_setup_at_once(repo, tmp_path):
    pids = tmp_path / "setup.pids"
    write_config(repo, runner={"isolation": "worktree"}, worktree={"setup": slow_command(pids)},
                 autonomy={"level": "L3"})
    write_item(repo, 1, "a", title="A", command="true")
    with anyio.fail_after(30):  # shutting down waited for the setup too
        async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
            await call(client, "run_queue")
            started = await wait_for_pids(pids)
    assert all_dead(started)
    assert statuses(repo) == {"001": "pending"}


def launched_item_with_a_slow_setup(repo: Path, tmp_path: Path) -> Path:
    """Item 001 (its command would touch `ran`), isolated, whose worktree.setup hangs; the setup's pid file."""
    pids = tmp_path / "setup.pids"
    write_config(repo, runner={"isolation": "worktree"}, worktree={"setup": slow_command(pids)})
    write_item(repo, 1, "a", title="A", command=f"touch {tmp_path / 'ran'}")
    return pids


async def launch_slow_setup(client: Client, pids: Path) -> tuple[dict, list[int]]:
    """launch_task(item="001") whose worktree.setup hangs: the answer comes at once (the setup is the
    task's first step), while the setup runs."""
    with anyio.fail_after(20):  # the call used to last as long as the setup (`HANG` s)
        answer = await call(client, "launch_task", item="001")
    assert answer["status"] in ("queued", "running") and answer["item_id"] == "001", answer
    return answer, await wait_for_pids(pids)


@pytest.mark.fault("the server stops while a launch_task(item=...)'s worktree.setup runs: the setup is killed "
                   "with what it started, the claim is given back, the server exits at once")
async def test_stopping_the_server_kills_a_launch_task_items_setup(repo, tmp_path):
    pids = launched_item_with_a_slow_setup(repo, tmp_path)
    with anyio.fail_after(30):  # the server's exit waited for the whole setup
        async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
            _, started = await launch_slow_setup(client, pids)
    assert all_dead(started)
    assert not (tmp_path / "ran").exists()
    assert statuses(repo) == {"001": "pending"}  # the claim was given back
    history = (repo / ".agent/runs/history.jsonl").read_text()
    assert "not started: worktree.setup" in history and "its task was stopped: the server is shutting down" in history, history


@pytest.mark.fault("cancel_task on a launch_task(item=...) whose worktree.setup runs: the setup is killed at once, "
                   "the item goes back to pending, its worktree stays for the next try")
async def test_cancelling_a_launched_items_task_kills_its_setup_and_gives_the_item_back(repo, tmp_path):
    pids = launched_item_with_a_slow_setup(repo, tmp_path)
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        answer, started = await launch_slow_setup(client, pids)
        during = await call(client, "task_output", task_id=answer["task_id"], block=False)
        assert during["status"] == "running" and "item 001 gets its worktree and runs worktree.setup" in during["output"]
        with anyio.fail_after(20):
            cancelled = await call(client, "cancel_task", task_id=answer["task_id"])
        out = await call(client, "task_output", task_id=answer["task_id"])
    assert cancelled["tasks"][0]["status"] == "cancelled" and out["status"] == "cancelled", out
    assert "not started: worktree.setup" in out["reason"] and "item 001 is pending again" in out["reason"], out
    assert "was killed before it finished: its task was cancelled by cancel_task" in out["reason"], out
    assert all_dead(started)
    assert not (tmp_path / "ran").exists()
    assert statuses(repo) == {"001": "pending"}
    assert (repo / ".agent/worktrees/001-a").is_dir()  # kept: the next launch reuses it


async def test_a_launched_item_cancelled_at_once_is_given_back(repo, tmp_path):
    """cancel_task right after the answer: before or during its setup (whichever it reaches), the item never ran."""
    pids = launched_item_with_a_slow_setup(repo, tmp_path)
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        answer = await call(client, "launch_task", item="001")
        with anyio.fail_after(20):
            await call(client, "cancel_task", task_id=answer["task_id"])
            out = await call(client, "task_output", task_id=answer["task_id"])
    assert out["status"] == "cancelled" and "item 001 is pending again" in out["reason"], out
    assert all_dead(read_pids(pids)) and not (tmp_path / "ran").exists()
    assert statuses(repo) == {"001": "pending"}


async def test_cancelling_a_run_kills_integration_verify_and_keeps_the_work(repo, tmp_path):
    pids = tmp_path / "verify.pids"
    write_config(repo, runner={"isolation": "worktree"}, integration={"verify": slow_command(pids)},
                 autonomy={"level": "L3"})
    write_item(repo, 1, "edit", title="Edit", command="echo changed > a.txt")
    before = head(repo)
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        run = await call(client, "run_queue")
        out, started = await cancel_run_when_started(client, run["run_id"], pids)
    row = by_item(out)["001"]
    assert row["outcome"] == "failed", row
    assert row["reason"].startswith("integration was not finished: integration.verify ") and \
        "was killed before it finished: its run was cancelled by cancel_task" in row["reason"], row["reason"]
    assert all_dead(started)
    assert head(repo) == before  # the target did not move
    assert git(repo, "show", "agent/001-edit:a.txt") == "changed"  # the work is kept on its branch
    assert statuses(repo) == {"001": "failed"}


def test_a_stop_kills_the_command_and_what_it_started(tmp_path):
    pids = tmp_path / "pids"
    stop = ShellStop("the test stopped it")
    caught: list[BaseException] = []

    def run() -> None:
        try:
            run_shell(slow_command(pids), tmp_path, {}, None, stop=stop, what="worktree.setup")
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while len(read_pids(pids)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.stop()
    thread.join(30)
    assert not thread.is_alive()
    assert [str(e) for e in caught] == [
        f"worktree.setup `{slow_command(pids)}` was killed before it finished: the test stopped it"]
    assert all_dead_soon(read_pids(pids))  # (the sleep's output pipe closed as it died: it is going)


def test_a_stopped_stop_starts_nothing(tmp_path):
    stop = ShellStop("its run was stopped")
    stop.stop()
    with pytest.raises(ShellStopped, match=r"^integration.verify `touch x` was not started: its run was stopped$"):
        run_shell("touch x", tmp_path, {}, None, stop=stop, what="integration.verify")
    assert not (tmp_path / "x").exists()


def test_a_command_that_ends_under_a_live_stop_gives_its_code(tmp_path):
    assert run_shell("echo hi; exit 3", tmp_path, {}, None, stop=ShellStop()) == (3, "hi")
    assert os.listdir(tmp_path) == []
