"""Fan-out in one call: launch_task(commands=[...], max_parallel=N) starts a group, at most N at once,
answers at once with the group id and every task id; task_output, cancel_task and list_tasks take the
group id; bad input is refused before anything starts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from conftest import all_dead, call, call_error, fill_disk, read_pids
from agent_parallel.server import ServerSettings, build_server

pytestmark = pytest.mark.anyio


def records(workspace: Path) -> set[str]:
    runs = workspace / ".agent/runs"
    return {p.name for p in runs.glob("*.json")} if runs.exists() else set()


def max_overlap(events: list[str]) -> int:
    running = peak = 0
    for event in events:
        running += 1 if event.startswith("start") else -1
        peak = max(peak, running)
    return peak


async def test_a_group_runs_at_most_max_parallel_at_once_and_answers_at_once(client, workspace):
    trace = workspace / "trace"
    commands = [f"echo start {i} >> {trace}; sleep 0.3; echo end {i} >> {trace}; echo out-{i}" for i in range(6)]
    started = time.monotonic()
    out = await call(client, "launch_task", commands=commands, max_parallel=2, description="shards")
    assert time.monotonic() - started < 1.0  # answered before the group could finish (3 rounds of 0.3 s)
    group_id, task_ids = out["task_id"], out["task_ids"]
    assert group_id == out["group_id"] and group_id.startswith("g-") and len(task_ids) == 6
    assert out["status"] in ("running", "queued") and out["command"].endswith("(and 5 more)")
    done = await call(client, "task_output", task_id=group_id, timeout=30)
    assert done["retrieval_status"] == "success" and done["group_id"] == group_id and done["status"] == "completed"
    assert [t["task_id"] for t in done["tasks"]] == task_ids  # in the order given
    assert [t["output"] for t in done["tasks"]] == [f"out-{i}\n" for i in range(6)]
    assert [t["description"] for t in done["tasks"]] == ["shards"] * 6
    assert max_overlap(trace.read_text().splitlines()) == 2


async def test_wait_any_on_a_group_and_a_failed_member(client):
    # the first fails once the other two run (under load a start can take a while)
    out = await call(client, "launch_task", commands=[
        "until [ -e s2 ] && [ -e s3 ]; do sleep 0.01; done; exit 3", "touch s2; sleep 5", "touch s3; sleep 5"],
        max_parallel=3)
    first = await call(client, "task_output", task_id=out["group_id"], wait="any", timeout=10)
    assert first["retrieval_status"] == "success" and first["status"] == "running"
    assert [t["status"] for t in first["tasks"]] == ["failed", "running", "running"]
    assert first["tasks"][0]["exit_code"] == 3
    stopped = await call(client, "cancel_task", task_id=out["group_id"])
    assert [t["status"] for t in stopped["tasks"]] == ["failed", "cancelled", "cancelled"]
    final = await call(client, "task_output", task_id=out["group_id"], block=False)
    assert final["status"] == "failed"  # the first member that did not complete


async def test_cancelling_a_group_stops_running_and_waiting_members(client, workspace):
    pids = workspace / "pids"
    commands = [f"sleep 60 & echo $! >> {pids}; wait"] * 5
    out = await call(client, "launch_task", commands=commands, max_parallel=2)
    with anyio.fail_after(5):
        while len(read_pids(pids)) < 2:
            await anyio.sleep(0.02)
    stopped = await call(client, "cancel_task", task_id=out["task_id"])
    assert [t["status"] for t in stopped["tasks"]] == ["cancelled"] * 5
    assert [t.get("started_at") is not None for t in stopped["tasks"]] == [True, True, False, False, False]
    assert len(read_pids(pids)) == 2 and all_dead(read_pids(pids))  # waiting members never started


async def test_list_tasks_by_group_and_group_ids_mixed_with_task_ids(client):
    other = await call(client, "launch_task", command="true")
    out = await call(client, "launch_task", commands=["true", "true"], max_parallel=1)
    listed = await call(client, "list_tasks", group_id=out["group_id"])
    assert {t["task_id"] for t in listed["tasks"]} == set(out["task_ids"]) and listed["total"] == 2
    both = await call(client, "task_output", task_ids=[out["group_id"], other["task_id"], out["task_ids"][0]])
    assert [t["task_id"] for t in both["tasks"]] == [*out["task_ids"], other["task_id"]]  # each task once


async def test_run_in_background_false_waits_for_every_member(client):
    out = await call(client, "launch_task", commands=["echo a", "echo b"], run_in_background=False)
    assert out["retrieval_status"] == "success" and out["status"] == "completed"
    assert [t["output"] for t in out["tasks"]] == ["a\n", "b\n"]


async def test_a_group_larger_than_the_task_cap_runs_whole(workspace):
    """Members wait for a slot of their group without counting against max_running."""
    settings = ServerSettings(kill_grace_s=0.5, min_free_memory=0, max_running=8)
    async with Client(build_server(workspace, settings)) as client:
        out = await call(client, "launch_task", commands=["true"] * 40, max_parallel=4)
        done = await call(client, "task_output", task_id=out["group_id"], timeout=60)
        assert done["status"] == "completed" and len(done["tasks"]) == 40
        text = await call_error(client, "launch_task", commands=["true"] * 20, max_parallel=9)
        assert "this group would run 9 more (the limit is 8); lower max_parallel" in text


async def test_a_group_survives_a_restart(workspace, settings):
    async with Client(build_server(workspace, settings)) as client:
        out = await call(client, "launch_task", commands=["echo x", "echo y"], run_in_background=False)
    async with Client(build_server(workspace, settings)) as client:
        again = await call(client, "task_output", task_id=out["group_id"], block=False)
        assert [t["task_id"] for t in again["tasks"]] == out["task_ids"] and again["status"] == "completed"


@pytest.mark.fault("fan-out bad input (no commands, an empty command, 1,001 commands, max_parallel 0, max_parallel "
                   "without commands, commands with command, a NUL in one command, an unknown group id): a clear "
                   "error, and nothing started or recorded")
@pytest.mark.parametrize("args, message", [
    ({"commands": []}, "`commands` is empty; give the shell commands to run"),
    ({"commands": ["true", "  "]}, "commands[1] is empty; every command must be a shell command to run"),
    ({"commands": ["true"] * 1001}, "`commands` holds 1,001 commands; at most 1000 start as one group"),
    ({"commands": ["true"], "max_parallel": 0}, "max_parallel must be between 1 and"),
    ({"command": "true", "max_parallel": 2}, "`max_parallel` applies to `commands` (a group) only"),
    ({"command": "true", "commands": ["true"]}, "not command and commands"),
    ({"commands": ["true", "echo a\x00b"]}, "cannot start commands[1]: "),
])
async def test_bad_fan_out_is_refused_and_starts_nothing(client, workspace, args, message):
    before = records(workspace)
    text = await call_error(client, "launch_task", **args)
    assert message in text
    assert records(workspace) == before and (await call(client, "list_tasks"))["total"] == 0


async def test_an_unknown_group_id_is_a_clear_error(client):
    for tool, args in [("task_output", {"task_id": "g-nosuchgroup"}), ("cancel_task", {"task_id": "g-nosuchgroup"}),
                       ("list_tasks", {"group_id": "g-nosuchgroup"})]:
        text = await call_error(client, tool, **args)
        assert "unknown group_id 'g-nosuchgroup'; launch_task(commands=[...]) answers with the group_id" in text


async def test_the_launch_task_schema_offers_commands_and_max_parallel(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    props = tools["launch_task"].input_schema["properties"]
    assert "commands" in props and "max_parallel" in props
    assert json.dumps(tools["list_tasks"].input_schema).count("group_id") >= 1


async def test_ids_naming_more_than_1000_tasks_through_groups_are_refused(workspace):
    settings = ServerSettings(kill_grace_s=0.5, min_free_memory=0)
    async with Client(build_server(workspace, settings)) as client:
        first = await call(client, "launch_task", commands=["sleep 30"] * 600, max_parallel=1)
        second = await call(client, "launch_task", commands=["sleep 30"] * 600, max_parallel=1)
        text = await call_error(client, "task_output", task_ids=[first["group_id"], second["group_id"]], block=False)
        assert "these ids name 1,200 tasks (groups count all their members); at most 1000" in text
        await call(client, "cancel_task", task_ids=[first["group_id"], second["group_id"]])


@pytest.mark.fault("the disk is full when a fan-out journals its members' first records: a clear error, no member "
                   "started and no record of any member left, not even in the journal")
async def test_a_record_that_cannot_be_written_starts_no_member(workspace, tiny_disk):
    from agent_parallel.errors import StorageError
    from agent_parallel.tasks.journal import recover
    from agent_parallel.tasks.records import journal_replaces
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    runs = tiny_disk / "runs"
    runs.mkdir(parents=True)
    async with open_registry(workspace, runs, RegistrySettings()) as registry:
        fill_disk(tiny_disk)
        with pytest.raises(StorageError, match=r"^cannot write the task record in .*: No space left on device"):
            await registry.launch_group([f"touch started{n}" for n in range(40)], max_parallel=2, cwd=workspace)
        assert not list(workspace.glob("started*")) and registry.list() == ([], 0)
        assert sorted(p.name for p in runs.glob("*.json")) == []
    assert recover(runs, journal_replaces) == 0 and sorted(p.name for p in runs.glob("*.json")) == []


@pytest.mark.fault("the disk fills after a fan-out answered, before its members' record files are written: each "
                   "member fails saying why, nothing is left running, the server goes on")
async def test_members_whose_record_files_cannot_be_written_fail_clearly(workspace, tiny_disk):
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    runs = tiny_disk / "runs"
    runs.mkdir(parents=True)
    async with open_registry(workspace, runs, RegistrySettings(kill_grace_s=0.5)) as registry:
        _, members = await registry.launch_group(["sleep 30"] * 3, max_parallel=3, cwd=workspace)
        fill_disk(tiny_disk)  # the running records (written 50 ms after the starts) find no room
        with anyio.fail_after(20):
            for task in members:
                await task.done.wait()
        for task in members:
            assert task.record.status == "failed"
            assert "could not write the task record in" in (task.record.reason or "")
            assert "No space left on device" in (task.record.reason or "")
        (tiny_disk / "filler").unlink()
        [fine] = (await registry.launch_group(["echo fine"], max_parallel=1, cwd=workspace))[1]
        await fine.done.wait()
        assert fine.record.status == "completed"


async def test_cancelling_one_waiting_member_ends_it_at_once_and_the_rest_run(client, workspace):
    out = await call(client, "launch_task", commands=["sleep 0.3", "echo second", "echo third"], max_parallel=1)
    waiting = out["task_ids"][1]
    with anyio.fail_after(2):  # the running member takes 0.3 s: the waiting one ends long before
        stopped = await call(client, "cancel_task", task_id=waiting)
    assert stopped["tasks"][0]["status"] == "cancelled"
    assert stopped["tasks"][0]["reason"] == "cancelled while waiting for a slot in its group"
    done = await call(client, "task_output", task_id=out["group_id"], timeout=20)
    assert [t["status"] for t in done["tasks"]] == ["completed", "cancelled", "completed"]
    assert done["tasks"][2]["output"] == "third\n"


async def test_a_group_after_a_failed_task_is_skipped_whole_and_starts_nothing(client, workspace):
    first = await call(client, "launch_task", command="exit 3")
    out = await call(client, "launch_task", commands=[f"touch {workspace}/ran{i}" for i in range(4)], max_parallel=2,
                     after=[first["task_id"]])
    done = await call(client, "task_output", task_id=out["group_id"], timeout=20)
    assert [t["status"] for t in done["tasks"]] == ["skipped"] * 4
    assert all(t["reason"] == f"predecessor {first['task_id']} ended failed, so this task did not run"
               for t in done["tasks"])
    assert not list(workspace.glob("ran*"))


async def test_members_still_waiting_at_shutdown_end_interrupted_on_disk(workspace):
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True)
    async with open_registry(workspace, runs, RegistrySettings(kill_grace_s=0.5)) as registry:
        _, members = await registry.launch_group(["sleep 30"] * 3, max_parallel=1, cwd=workspace)
        with anyio.fail_after(5):
            while members[0].record.status != "running":
                await anyio.sleep(0.01)
    assert [m.record.status for m in members] == ["interrupted"] * 3
    assert members[1].record.reason == "the server shut down before this task could start"
    from agent_parallel.tasks.records import load_records

    saved = {r.task_id: r for r in load_records(runs)}
    assert [saved[m.record.task_id].status for m in members] == ["interrupted"] * 3  # on disk as well


async def test_a_group_waiting_for_its_predecessor_at_shutdown_ends_interrupted(workspace):
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True)
    async with open_registry(workspace, runs, RegistrySettings(kill_grace_s=0.5)) as registry:
        first = await registry.launch(command="sleep 30", cwd=workspace)
        _, members = await registry.launch_group(["true"] * 3, max_parallel=2, cwd=workspace,
                                                 after=[first.record.task_id])
    assert first.record.status == "interrupted"
    assert [m.record.status for m in members] == ["interrupted"] * 3  # not skipped: the server stopped them
    assert members[0].record.reason == "the server shut down before this task could start"


async def test_an_answer_about_many_tasks_shares_one_output_budget(client):
    """40 shards of 20 KB each: the group's answer (and one about their ids) shows each one's last
    1,228 bytes (48 KiB shared by 40), not 16 KiB each (650 KB, of which Claude Code would show its model
    the start); one task alone still gets 16 KiB, and each shard's start is one page away."""
    out = await call(client, "launch_task", commands=[f"seq -f 'shard {i:02d} line %05g' 1 1000" for i in range(40)],
                     max_parallel=8)
    done = await call(client, "task_output", task_id=out["group_id"], timeout=60)
    assert done["status"] == "completed" and len(done["tasks"]) == 40
    assert [len(t["output"]) for t in done["tasks"]] == [48 * 1024 // 40] * 40
    assert all(t["output"].endswith(f"shard {i:02d} line 01000\n") and t["truncated"] and t["output_bytes"] == 20_000
               for i, t in enumerate(done["tasks"]))
    assert len(json.dumps(done)) < 80_000
    several = await call(client, "task_output", task_ids=out["task_ids"][:20], max_bytes=500)
    assert [len(t["output"]) for t in several["tasks"]] == [500] * 20  # asked for less than the share
    several = await call(client, "task_output", task_ids=out["task_ids"][:20], cursor=0)
    assert [len(t["output"]) for t in several["tasks"]] == [48 * 1024 // 20] * 20
    assert several["tasks"][0]["output"].startswith("shard 00 line 00001\n")
    one = await call(client, "task_output", task_id=out["task_ids"][0])
    assert len(one["output"]) == 16384


async def test_the_text_of_a_group_answer_counts_its_members_by_status(client):
    """A client that shows the model only the text block (not the structured content) learns how the
    members ended, not just how many there are."""
    group = (await call(client, "launch_task", commands=["true", "true", "exit 3"], max_parallel=3))["group_id"]
    result = await client.call_tool("task_output", {"task_id": group, "timeout": 30})
    [block] = result.content
    assert "  tasks: 3 entries (2 completed, 1 failed)\n" in block.text, block.text


async def test_waiting_on_a_group_reports_how_many_members_finished_and_how(client):
    """An agent waiting on many commands (Claude Code shows a call's progress) hears how many have ended:
    at most one notification per interval, counts that only grow, the last one the whole group (what
    needs a look first)."""
    commands = [f"sleep 0.{n % 4}; exit {1 if n == 7 else 0}" for n in range(12)]
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    group = await call(client, "launch_task", commands=commands, max_parallel=4)
    result = await client.call_tool("task_output", {"task_id": group["group_id"], "timeout": 30},
                                    progress_callback=on_progress)
    assert result.structured_content["counts"] == {"completed": 11, "failed": 1}
    assert len(seen) >= 2 and all(total == 12 for _, total, _ in seen)
    assert [p for p, _, _ in seen] == sorted({p for p, _, _ in seen})  # grows, never repeats
    assert seen[-1] == (12, 12, "12 of 12 finished: 1 failed, 11 completed")
    waited = await client.call_tool("launch_task", {"commands": ["sleep 0.2", "sleep 0.4"], "run_in_background": False},
                                    progress_callback=on_progress)  # the same for a fan-out waited for at launch
    assert waited.structured_content["counts"] == {"completed": 2} and seen[-1] == (2, 2, "2 of 2 finished: 2 completed")


async def test_waiting_on_several_tasks_that_time_out_reports_the_latest_count(client):
    ids = [(await call(client, "launch_task", command=command))["task_id"] for command in ("true", "sleep 30")]
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    result = await client.call_tool("task_output", {"task_ids": ids, "timeout": 1}, progress_callback=on_progress)
    assert result.structured_content["retrieval_status"] == "timeout"
    assert seen == [(1, 2, "1 of 2 finished: 1 completed")]
    await call(client, "cancel_task", task_ids=ids)


async def test_a_groups_answer_can_keep_only_the_members_that_did_not_make_it(client):
    """40 shards, 2 failing: status=["failed"] answers their 2 entries (with the output room all 40 shared)
    and counts every member; the wait is still over the whole group."""
    commands = [f"seq -f 'shard {i:02d} line %05g' 1 1000" + ("; exit 1" if i in (5, 31) else "") for i in range(40)]
    group = await call(client, "launch_task", commands=commands, max_parallel=8)
    failed = await call(client, "task_output", task_id=group["group_id"], status=["failed", "timed_out"], timeout=60)
    assert failed["status"] == "failed" and failed["counts"] == {"failed": 2, "completed": 38}
    assert [entry["task_id"] for entry in failed["tasks"]] == [group["task_ids"][5], group["task_ids"][31]]
    assert all(len(entry["output"]) == 16384 and entry["output"].endswith("line 01000\n") for entry in failed["tasks"])
    none = await call(client, "task_output", task_id=group["group_id"], status=["cancelled"])
    assert none["tasks"] == [] and none["counts"] == failed["counts"]


@pytest.mark.fault("task_output's status filter given an unknown state, or with one task: a clear error naming the fix, nothing waited for")
async def test_task_output_status_filter_refuses_what_it_cannot_mean(client):
    group = await call(client, "launch_task", commands=["sleep 30", "true"])
    unknown = await call_error(client, "task_output", task_id=group["group_id"], status=["broken"])
    assert unknown.endswith("unknown status ['broken']; use some of: cancelled, completed, failed, interrupted, "
                            "queued, running, skipped, timed_out")
    started = time.monotonic()
    one = await call_error(client, "task_output", task_id=group["task_ids"][0], status=["failed"], timeout=30)
    assert "`status` picks among several tasks (task_ids or a group_id)" in one and time.monotonic() - started < 10
    assert (await call(client, "task_output", task_id=group["task_ids"][0], block=False))["status"] in ("queued", "running")
    await call(client, "cancel_task", task_id=group["group_id"])
