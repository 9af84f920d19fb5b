"""Every bad input to the task tools gets a clear tool error, and the server stays healthy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import call, call_error

pytestmark = pytest.mark.anyio


@pytest.fixture
async def healthy(client):
    """After the test, the server must still launch and finish a task."""
    yield client
    out = await call(client, "launch_task", command="echo still-ok", run_in_background=False)
    assert out["output"] == "still-ok\n"


async def runs_before(workspace: Path) -> set[str]:
    return {p.name for p in (workspace / ".agent/runs").glob("*.json")} if (workspace / ".agent/runs").exists() else set()


@pytest.mark.parametrize("args, message", [
    ({}, "give exactly one of `command` (a shell command), `commands` (several, as one group) or `item` (a queue item "
         "id), not none"),
    ({"command": "true", "item": "001"}, "give exactly one of `command` (a shell command), `commands` (several, as one "
                                         "group) or `item` (a queue item id), not command and item"),
    ({"command": "   "}, "`command` is empty; give the shell command to run, e.g. \"make test\""),
    ({"command": "true", "timeout_s": -1}, "timeout_s must be a number of seconds between 0 and 604800 (7 days), got -1.0"),
    ({"command": "true", "timeout_s": 1e12}, "timeout_s must be a number of seconds between 0 and 604800 (7 days), got 1000000000000.0"),
    ({"command": "true", "env": {"A=B": "x"}}, "cannot start the task: env name 'A=B' contains '=', which would set another variable; remove it"),
    ({"command": "true", "after": ["nosuchtask"]}, "unknown task_id 'nosuchtask'; call list_tasks to see the ids of current and recent tasks"),
])
async def test_launch_task_bad_arguments(healthy, workspace, args, message):
    before = await runs_before(workspace)
    assert await call_error(healthy, "launch_task", **args) == f"Error executing tool launch_task: {message}"
    assert await runs_before(workspace) == before  # nothing was started or recorded


@pytest.mark.parametrize("cwd", ["/", "../..", "..", "/etc", "sub/../../x"])
async def test_cwd_outside_the_workspace_is_refused(healthy, workspace, cwd):
    text = await call_error(healthy, "launch_task", command="touch escaped", cwd=cwd)
    assert text == (f"Error executing tool launch_task: cwd {cwd!r} resolves outside the workspace root {workspace}; "
                    "give a path inside it (relative paths are taken from the root)")


async def test_cwd_symlink_pointing_out_is_refused(healthy, workspace, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, workspace / "link")
    text = await call_error(healthy, "launch_task", command="touch escaped", cwd="link")
    assert "cwd 'link' resolves outside the workspace root" in text
    assert not (outside / "escaped").exists()


async def test_cwd_that_is_not_a_directory(healthy, workspace):
    (workspace / "file").write_text("x")
    text = await call_error(healthy, "launch_task", command="true", cwd="file")
    assert text == "Error executing tool launch_task: cwd 'file' is not a directory inside the workspace; create it or pick another"


@pytest.mark.parametrize("tool", ["task_output", "cancel_task"])
async def test_unknown_task_id_says_how_to_list(healthy, tool):
    text = await call_error(healthy, tool, task_id="zzzzzzzzzzzz")
    assert text == f"Error executing tool {tool}: unknown task_id 'zzzzzzzzzzzz'; call list_tasks to see the ids of current and recent tasks"


LONG = "x" * 200_000


@pytest.mark.fault("an id, status or path of 200 KB sent back in an error: the error shows its start, not all of it")
@pytest.mark.parametrize("tool, args, start", [
    ("task_output", {"task_id": LONG}, "unknown task_id 'xxx"),
    ("cancel_task", {"task_ids": [LONG]}, "unknown task_id 'xxx"),
    ("launch_task", {"command": "true", "after": [LONG]}, "unknown task_id 'xxx"),
    ("list_tasks", {"status": [LONG, "bogus", "done"]}, "unknown status ['bogus', 'done', 'xxx"),
    ("list_tasks", {"group_id": "g-" + LONG}, "unknown group_id 'g-xxx"),
    ("launch_task", {"command": "true", "cwd": "/" + LONG}, "cwd '/xxx"),
])
async def test_a_huge_argument_is_not_echoed_whole(healthy, workspace, tool, args, start):
    before = await runs_before(workspace)
    text = await call_error(healthy, tool, **args)
    assert text.startswith(f"Error executing tool {tool}: {start}") and "...'" not in text[:40], text[:200]
    assert len(text) < 700 and "..." in text, text[:200]
    assert await runs_before(workspace) == before


async def test_resource_for_unknown_task(healthy):
    from mcp import MCPError

    with pytest.raises(MCPError, match="unknown task_id 'nope'; call list_tasks"):
        await healthy.read_resource("task://nope")


async def test_an_unknown_resource_of_200_kb_is_not_echoed_whole(healthy):
    """The SDK answers "Unknown resource: <uri>" with the whole URI: 200 KB sent, 200 KB back."""
    from mcp import MCPError

    with pytest.raises(MCPError) as caught:
        await healthy.read_resource("nope://" + "x" * 200_000)
    message = str(caught.value)
    assert message.startswith("Unknown resource: nope://xxx") and len(message) < 600, message[:300]
    assert message.endswith("the resources are task://<task_id> and task://<task_id>/output")
    with pytest.raises(MCPError, match=r"^Unknown resource: nope://short$"):  # a short one as the SDK says it
        await healthy.read_resource("nope://short")


@pytest.mark.parametrize("args, message", [
    ({"max_bytes": -1}, "max_bytes must be between 1 and 65536 (got -1); page through longer output with cursor and next_cursor"),
    ({"max_bytes": 10**12}, "max_bytes must be between 1 and 65536 (got 1000000000000); page through longer output with cursor and next_cursor"),
    ({"timeout": -5}, "timeout must be a number of seconds >= 0 (got -5.0)"),
    ({"cursor": -3}, "cursor must be a byte offset >= 0 (got -3); omit it for the most recent output"),
    ({"tail_lines": -2}, "tail_lines must be >= 0 (got -2)"),
    ({"filter": "("}, "filter '(' is not a valid regular expression: missing ) at position 1"),
])
async def test_task_output_bad_arguments(healthy, args, message):
    tid = (await call(healthy, "launch_task", command="echo x"))["task_id"]
    assert await call_error(healthy, "task_output", task_id=tid, **args) == f"Error executing tool task_output: {message}"


async def test_task_output_needs_exactly_one_of_task_id_and_task_ids(healthy):
    expected = ("Error executing tool task_output: give `task_id` (one task) or `task_ids` (several), "
                "not both or neither; call list_tasks to see task ids")
    assert await call_error(healthy, "task_output") == expected
    assert await call_error(healthy, "task_output", task_id="a", task_ids=["b"]) == expected


async def test_list_tasks_bad_arguments(healthy):
    assert await call_error(healthy, "list_tasks", status=["done"]) == (
        "Error executing tool list_tasks: unknown status ['done']; use some of: cancelled, completed, failed, "
        "interrupted, queued, running, skipped, timed_out")
    assert await call_error(healthy, "list_tasks", limit=0) == "Error executing tool list_tasks: limit must be between 1 and 1000 (got 0)"


async def test_executor_reports_a_process_that_cannot_start(workspace):
    """A cwd removed between the tool's check and the start is a SpawnError with the cause, not a crash."""
    from agent_parallel.tasks.executor import LaunchSpec, LocalExecutor, SpawnError
    from agent_parallel.tasks.logs import LogWriter

    writer = LogWriter(workspace, "x", 1024)
    with pytest.raises(SpawnError, match=r"^could not start '/bin/sh' in .*gone: No such file or directory$"):
        await LocalExecutor().start(LaunchSpec(task_id="x", cwd=workspace / "gone", command="true"), writer)
    writer.close()
