"""The console script over stdio, in both protocol eras, and through the MCP Inspector CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client

from conftest import RawServer, all_dead, read_pids

pytestmark = pytest.mark.anyio
SCRIPT = Path(sys.executable).parent / "agent-parallel"
TOOLS = {"launch_task", "task_output", "cancel_task", "list_tasks"}


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def params(root: Path) -> StdioServerParameters:
    return StdioServerParameters(command=str(SCRIPT), args=["serve", "--root", str(root)])


async def test_console_script_2026_era(workspace):
    async with Client(params(workspace)) as client:
        assert TOOLS <= {t.name for t in (await client.list_tools()).tools}
        launched = await client.call_tool("launch_task", {"command": "echo via-stdio"})
        out = await client.call_tool("task_output", {"task_id": launched.structured_content["task_id"]})
        assert out.structured_content["output"] == "via-stdio\n"
        assert out.structured_content["retrieval_status"] == "success"


async def test_console_script_2025_era(workspace):
    async with stdio_client(params(workspace)) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            assert init.protocol_version == "2025-11-25"
            assert TOOLS <= {t.name for t in (await session.list_tools()).tools}
            launched = await session.call_tool("launch_task", {"command": "echo legacy"})
            out = await session.call_tool("task_output", {"task_id": launched.structured_content["task_id"]})
            assert out.structured_content["output"] == "legacy\n"


@pytest.mark.fault('the client closes stdin: tasks are stopped, the record says interrupted')
async def test_closing_stdin_stops_tasks_and_the_server(workspace):
    pids = workspace / "pids"
    async with Client(params(workspace)) as client:
        await client.call_tool("launch_task", {"command": f"sleep 60 & echo $! > {pids}; sleep 60"})
        with anyio.fail_after(5):
            while not read_pids(pids):
                await anyio.sleep(0.02)
    deadline = time.monotonic() + 3
    while not all_dead(read_pids(pids)) and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    assert all_dead(read_pids(pids))
    record = json.loads(next((workspace / ".agent/runs").glob("*.json")).read_text())
    assert record["state"]["state"] == "ended" and record["state"]["outcome"]["type"] == "interrupted"


@pytest.mark.fault('SIGTERM to the server: its tasks are stopped and it exits within 2 s')
def test_sigterm_stops_tasks_within_two_seconds(workspace):
    pids = workspace / "pids"
    with RawServer(workspace) as server:
        server.call_tool("launch_task", {"command": f"echo $$ > {pids}; exec sleep 60"})
        assert _wait_for(lambda: bool(read_pids(pids)))
        started = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=5)
        assert time.monotonic() - started < 2
        assert all_dead(read_pids(pids))


def _inspector() -> list[str]:
    """The Inspector CLI: the copy .ci/run installs, else npx (which may download it)."""
    local = Path(__file__).parent.parent / ".ci/node/node_modules/.bin/mcp-inspector"
    if local.exists():
        return [str(local), "--cli", str(SCRIPT), "serve", "--root"]
    npx = shutil.which("npx")
    if npx is None:
        if os.environ.get("CI"):
            pytest.fail("neither .ci/node's Inspector nor npx is available: .ci/run must install the MCP Inspector CLI")
        pytest.skip("npx not installed")
    return [npx, "-y", "@modelcontextprotocol/inspector@2", "--cli", str(SCRIPT), "serve", "--root"]


def test_inspector_lists_tools_and_launches(workspace):
    base = _inspector()
    listed = subprocess.run([*base, str(workspace), "--method", "tools/list"], capture_output=True, text=True,
                            timeout=180)
    assert listed.returncode == 0, listed.stderr
    assert TOOLS <= {t["name"] for t in json.loads(listed.stdout)["tools"]}
    called = subprocess.run([*base, str(workspace), "--method", "tools/call", "--tool-name", "launch_task",
                             "--tool-arg", "command=echo from-inspector", "--tool-arg", "run_in_background=false"],
                            capture_output=True, text=True, timeout=180)
    assert called.returncode == 0, called.stderr
    result = json.loads(called.stdout)
    assert result["structuredContent"]["output"] == "from-inspector\n"
    bad = subprocess.run([*base, str(workspace), "--method", "tools/call", "--tool-name", "launch_task"],
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode == 5  # the Inspector's exit code for a tool error
    assert "give exactly one of `command` (a shell command), `commands` (several, as one group) or `item` (a queue item id), not none" in bad.stdout


@pytest.mark.fault('the server is SIGKILLed mid-task: no orphan processes, the task shows as interrupted with its output after a restart')
def test_server_killed_with_sigkill_leaves_no_orphans_and_restart_shows_interrupted(workspace):
    pids = workspace / "pids"
    with RawServer(workspace) as server:
        task_id = server.call_tool("launch_task", {"command": (
            f"echo kept-output; sleep 60 & echo $! >> {pids}; sh -c 'echo $$ >> {pids}; trap \"\" TERM; sleep 60'")})["task_id"]
        log = workspace / ".agent" / "runs" / f"{task_id}.log"  # the output the server took before it died
        assert _wait_for(lambda: len(read_pids(pids)) == 2 and log.exists() and log.read_bytes() == b"kept-output\n")
        server.process.kill()
        server.process.wait()
        assert _wait_for(lambda: all_dead(read_pids(pids))), "task processes outlived the SIGKILLed server"

    async def restarted() -> None:
        async with Client(params(workspace)) as client:
            out = (await client.call_tool("task_output", {"task_id": task_id})).structured_content
            assert out["status"] == "interrupted" and out["output"] == "kept-output\n", (out["output"], out["output_bytes"])
            assert out["reason"] == "the server stopped while this task was live"

    anyio.run(restarted)


@pytest.mark.fault('20 concurrent claims of one item from two server processes: exactly one winner')
async def test_twenty_claims_from_two_server_processes_have_one_winner(workspace):
    from queue_helpers import statuses, write_item

    write_item(workspace, 1, "contested", files=["a"])
    outcomes: list[str] = []

    async def claim(client: Client) -> None:
        result = await client.call_tool("update_item", {"item": "001", "status": "in_progress"})
        outcomes.append("error: " + result.content[0].text if result.is_error else "won")

    async with Client(params(workspace)) as first, Client(params(workspace)) as second:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(claim, first if i % 2 else second)
    assert outcomes.count("won") == 1
    assert set(outcomes) - {"won"} == {
        "error: Error executing tool update_item: item 001 is already claimed by an agent (update_item)"}
    assert statuses(workspace) == {"001": "in_progress"}
