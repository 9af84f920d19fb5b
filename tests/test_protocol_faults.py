"""Protocol faults in the MCP tasks extension (SEP-2663): which calls become tasks, the Mcp-Name routing
header over HTTP, and cancels that are abandoned, repeated, too late or never confirmed.

In memory with the SDK's client declaring the extension (as tests/test_tasks_extension.py does), and
over streamable HTTP against a real ``agent-parallel serve`` with raw JSON-RPC requests, so the
headers and HTTP statuses are the ones on the wire.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, MCPError, StdioServerParameters

from agent_parallel.server import tasks_extension
from agent_parallel.tasks.executor import ExitInfo, LaunchSpec
from agent_parallel.server import ServerSettings, build_server
from conftest import all_dead, alive, call
from test_faults import free_port, wait_for_port
from test_tasks_extension import (TASKS, Ack, TasksClient, cancel_task, get_task, poll_until_done, shared_lifespan,
                                  start, wait_for_pids)

SCRIPT = Path(sys.executable).parent / "agent-parallel"
MODERN = "2026-07-28"
HEADER_MISMATCH = -32020
TERM_IGNORING_TREE = "trap '' TERM; sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait"


@pytest.fixture
def server(workspace: Path):
    return build_server(workspace, ServerSettings(kill_grace_s=0.5, min_free_memory=0))


# ----------------------------------------------------------------- which calls become tasks (in memory)
@pytest.mark.anyio
@pytest.mark.fault("a client declaring the tasks extension launches `sleep 30` in the background: it gets its "
                   "task_id at once (no protocol task that holds the call until the command ends)")
async def test_background_launch_answers_at_once_for_a_tasks_client(server):
    ext = TasksClient()
    async with Client(server, extensions=[ext]) as client:
        with anyio.fail_after(10):  # before the fix the call came back only when `sleep 30` had ended
            result = await client.call_tool("launch_task", {"command": "sleep 30", "description": "slow"})
        out = result.structured_content
        assert not result.is_error and out["status"] in ("queued", "running") and out["description"] == "slow"
        assert ext.created == [] and ext.states == []  # an ordinary answer, never a task
        explicit = await client.call_tool("launch_task", {"command": "sleep 30", "run_in_background": True})
        assert explicit.structured_content["status"] in ("queued", "running") and ext.created == []
        for task_id in (out["task_id"], explicit.structured_content["task_id"]):
            assert (await call(client, "cancel_task", task_id=task_id))["tasks"][0]["status"] == "cancelled"


@pytest.mark.anyio
@pytest.mark.fault("launch_task(run_in_background=false) from a tasks client, longer than the wait cap: a protocol "
                   "task whose result arrives complete (the tool no longer waits, so the cap cannot cut it short)")
async def test_waiting_launch_is_a_task_not_cut_by_the_wait_cap(workspace):
    ext = TasksClient()
    async with Client(build_server(workspace, ServerSettings(wait_cap_s=0.2, min_free_memory=0)), extensions=[ext]) as client:
        result = await client.call_tool("launch_task", {"command": "sleep 0.8; echo late", "run_in_background": False})
    out = result.structured_content
    assert not result.is_error and out["status"] == "completed" and out["output"] == "late\n"
    assert out["retrieval_status"] == "success"
    [created] = ext.created
    assert created.status == "working"  # the tools/call answered before the command ended


# ----------------------------------------------------------------- tasks/cancel (in memory)
@pytest.mark.anyio
@pytest.mark.fault("tasks/cancel on a task that already completed, twice: acknowledged, and its status and result "
                   "stay as they were")
async def test_cancel_of_a_finished_task_changes_nothing(server):
    async with Client(server, extensions=[TasksClient()]) as client:
        created = await start(client, "launch_task", command="echo kept")
        before = await poll_until_done(client.session, created.task_id)
        assert before.status == "completed"
        for _ in range(2):
            ack = await cancel_task(client.session, created.task_id)
            assert ack.result_type == "complete" and tasks_extension.NOTE_KEY not in (ack.meta or {})
        after = await get_task(client.session, created.task_id)
    assert after.status == "completed" and after.result == before.result
    assert after.result["structuredContent"]["output"] == "kept\n" and after.result["isError"] is False


@pytest.mark.anyio
@pytest.mark.fault("two tasks/cancel at once on a TERM-ignoring process tree: both are acknowledged once the whole "
                   "tree is dead, neither hangs")
async def test_two_cancels_at_once_both_return_once_the_tree_is_dead(server, workspace):
    pids = workspace / "pids"
    async with Client(server, extensions=[TasksClient()]) as client:
        created = await start(client, "launch_task", command=TERM_IGNORING_TREE.format(pids=pids))
        tree = await wait_for_pids(pids, 2)
        acks: list[Ack] = []

        async def cancel() -> None:
            acks.append(await cancel_task(client.session, created.task_id))
            assert all_dead(tree)  # each ack comes only once nothing of the task is left

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel)
                tg.start_soon(cancel)
        assert [a.result_type for a in acks] == ["complete", "complete"]
        assert (await get_task(client.session, created.task_id)).status == "cancelled"


@pytest.mark.anyio
@pytest.mark.fault("a client over stdio gives up on tasks/cancel during the kill grace (notifications/cancelled): "
                   "the kill still completes, the tree dies and the task ends cancelled")
async def test_abandoned_cancel_still_kills_the_tree(workspace):
    # Over stdio, not in memory: there the handler runs in the caller's own task, so giving up cannot reach it.
    pids = workspace / "pids"
    params = StdioServerParameters(command=str(SCRIPT), args=["serve", "--root", str(workspace)])
    async with Client(params, extensions=[TasksClient()]) as client:
        created = await start(client, "launch_task", command=TERM_IGNORING_TREE.format(pids=pids))
        tree = await wait_for_pids(pids, 2)
        with anyio.move_on_after(0.3) as gave_up:  # TERM is ignored: the KILL comes only after the 2 s grace
            await cancel_task(client.session, created.task_id)
        assert gave_up.cancelled_caught
        with anyio.fail_after(10):
            while not all_dead(tree):
                await anyio.sleep(0.05)
        state = await poll_until_done(client.session, created.task_id)
    assert state.status == "cancelled"


class _Unkillable:
    """A task handle whose process ignores TERM and KILL (as one in uninterruptible sleep does) until released."""

    pid = None
    start_time = None

    def __init__(self) -> None:
        self.released = anyio.Event()
        self.survivors: list[int] = []  # (the TaskHandle protocol: none reported)

    async def wait(self) -> ExitInfo:
        await self.released.wait()
        return ExitInfo(exit_code=None, signal="SIGKILL")

    async def terminate(self, grace: float) -> None:
        return None  # the signals were sent; the process did not end


class UnkillableExecutor:
    """Starts nothing: every task is an ``_Unkillable`` handle (the fault this simulates is the kernel's, not ours)."""

    def __init__(self) -> None:
        self.handles: list[_Unkillable] = []

    async def start(self, spec: LaunchSpec, log: Any) -> _Unkillable:
        self.handles.append(_Unkillable())
        return self.handles[-1]

    def close(self) -> None:
        pass


@pytest.mark.anyio
@pytest.mark.fault("tasks/cancel on a task whose process survives SIGKILL (uninterruptible sleep): acknowledged "
                   "with a note after a bounded wait, tasks/get still says working, the server keeps answering")
async def test_cancel_of_an_unkillable_task_answers_after_a_bounded_wait(workspace, monkeypatch):
    monkeypatch.setattr(tasks_extension, "CANCEL_WAIT_S", 0.5)
    executor = UnkillableExecutor()
    server = build_server(workspace, ServerSettings(kill_grace_s=0.1, min_free_memory=0), executor=executor)
    async with Client(server, extensions=[TasksClient()]) as client:
        try:
            created = await start(client, "launch_task", command="stuck")
            with anyio.fail_after(10):  # before the fix: never answered
                ack = await cancel_task(client.session, created.task_id)
            note = ack.meta[tasks_extension.NOTE_KEY]
            assert ack.result_type == "complete" and "was asked to stop" in note and "tasks/get shows" in note
            assert (await get_task(client.session, created.task_id)).status == "working"
            assert (await call(client, "list_tasks"))["tasks"][0]["status"] == "running"
            executor.handles[0].released.set()  # the process finally ends: the task is recorded as cancelled
            assert (await poll_until_done(client.session, created.task_id)).status == "cancelled"
        finally:
            for handle in executor.handles:
                handle.released.set()


# ----------------------------------------------------------------- clients that go away, descriptors (in memory)
@pytest.mark.anyio
@pytest.mark.fault("a tasks client disconnects while it waits for a launch_task result: the task runs to its end "
                   "in the registry, another client reads it, nothing is left waiting")
async def test_client_gone_mid_wait_leaves_the_task_to_the_registry(server):
    async with shared_lifespan(server) as transport:
        ext = TasksClient()
        async with Client(transport(), extensions=[ext]) as alice:
            with anyio.move_on_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(functools.partial(alice.call_tool, "launch_task",
                                                    {"command": "sleep 0.6; echo finished", "run_in_background": False}))
                    while not ext.states:  # alice is polling
                        await anyio.sleep(0.02)
                    tg.cancel_scope.cancel()  # ... and gives up: her client closes below
        registry_id = ext.created[0].task_id.split(".")[0]
        async with Client(transport()) as bob:
            out = await call(bob, "task_output", task_id=registry_id, timeout=10)
    assert out["status"] == "completed" and out["output"] == "finished\n"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.anyio
@pytest.mark.fault("40 protocol tasks created, polled and cancelled (half still running): no file descriptor left open")
async def test_protocol_tasks_leave_no_descriptor_open(server, workspace):
    async with Client(server, extensions=[TasksClient()]) as client:
        async def round_trip(n: int) -> None:
            for i in range(n):
                created = await start(client, "launch_task", command="sleep 30" if i % 2 else "echo done")
                await get_task(client.session, created.task_id)
                await cancel_task(client.session, created.task_id)
                await get_task(client.session, created.task_id)

        await round_trip(4)  # warm-up: the first launches open what stays open (executor, logs directory)
        before = open_fds()
        await round_trip(40)
        after = open_fds()
    assert after <= before, f"{after - before} descriptors leaked"


# ----------------------------------------------------------------- over streamable HTTP
@pytest.fixture
def http_port(workspace: Path):
    port = free_port()
    proc = subprocess.Popen([str(SCRIPT), "serve", "--root", str(workspace), "--transport", "http", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def rpc(port: int, method: str, params: dict[str, Any], headers: dict[str, str] | None = None,
        timeout: float = 10) -> tuple[int, dict[str, Any]]:
    """One 2026-07-28 request from a client that declares the tasks extension: (HTTP status, JSON-RPC reply)."""
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {"extensions": {TASKS: {}}},
            "io.modelcontextprotocol/clientInfo": {"name": "protocol-faults", "version": "0"}}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/mcp", data=body, method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN, "Mcp-Method": method, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    if text.startswith("{"):
        return status, json.loads(text)
    data = [line[len("data:"):] for line in text.splitlines() if line.startswith("data:")]  # an SSE response
    return status, json.loads(data[-1])


def http_start(port: int, command: str) -> str:
    """launch_task(run_in_background=false) as a protocol task; its taskId."""
    status, reply = rpc(port, "tools/call", {"name": "launch_task", "arguments": {
        "command": command, "run_in_background": False}}, {"Mcp-Name": "launch_task"})
    assert status == 200 and reply["result"]["resultType"] == "task", reply
    return reply["result"]["taskId"]


@pytest.mark.fault("tasks/get, tasks/update and tasks/cancel over HTTP with the Mcp-Name header missing or naming "
                   "another task: HTTP 400 and -32020 (HeaderMismatch), the task untouched")
def test_tasks_methods_over_http_need_a_matching_mcp_name(http_port, workspace):
    pids = workspace / "pids"
    task_id = http_start(http_port, f"sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait")
    deadline = time.monotonic() + 10
    while len(pids.read_text().split() if pids.exists() else []) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    tree = [int(p) for p in pids.read_text().split()]
    requests = {"tasks/get": {"taskId": task_id}, "tasks/update": {"taskId": task_id, "inputResponses": {}},
                "tasks/cancel": {"taskId": task_id}}
    other = task_id.split(".")[0] + ".sep-2663-wrong-task-id"
    for method, params in requests.items():
        for headers in ({}, {"Mcp-Name": other}, {"Mcp-Name": "=?base64?not base64?="}):
            status, reply = rpc(http_port, method, params, headers)
            assert status == 400 and reply["error"]["code"] == HEADER_MISMATCH, (method, headers, reply)
            message = reply["error"]["message"]
            assert f"{method} over HTTP must carry the Mcp-Name header set to params.taskId" in message
            assert ("it is missing" if not headers else "but it is '") in message
    assert all(alive(p) for p in tree)  # the refused cancels stopped nothing
    status, reply = rpc(http_port, "tasks/get", {"taskId": task_id}, {"Mcp-Name": task_id})
    assert status == 200 and reply["result"]["status"] == "working"
    wrapped = "=?base64?" + base64.b64encode(task_id.encode()).decode() + "?="  # SEP-2243's encoding is accepted too
    status, reply = rpc(http_port, "tasks/cancel", {"taskId": task_id}, {"Mcp-Name": wrapped})
    assert status == 200 and reply["result"]["resultType"] == "complete" and all_dead(tree)
    status, reply = rpc(http_port, "tasks/get", {"taskId": task_id}, {"Mcp-Name": task_id})
    assert status == 200 and reply["result"]["status"] == "cancelled"


@pytest.mark.fault("an Mcp-Name header of 10,000 characters on tasks/get: refused with -32020, the error text "
                   "stays short")
def test_a_huge_mcp_name_is_not_echoed_back(http_port):
    task_id = http_start(http_port, "echo hi")
    status, reply = rpc(http_port, "tasks/get", {"taskId": task_id}, {"Mcp-Name": "x" * 10_000})
    assert status == 400 and reply["error"]["code"] == HEADER_MISMATCH
    assert len(reply["error"]["message"]) < 500 and "(10000 characters)" in reply["error"]["message"]


@pytest.mark.fault("a tasks client over HTTP gives up on tasks/cancel (closes the connection) during the kill "
                   "grace: the TERM-ignoring tree is still killed and the task ends cancelled")
def test_http_client_closing_mid_cancel_does_not_stop_the_kill(http_port, workspace):
    pids = workspace / "pids"
    task_id = http_start(http_port, TERM_IGNORING_TREE.format(pids=pids))
    deadline = time.monotonic() + 10
    while len(pids.read_text().split() if pids.exists() else []) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    tree = [int(p) for p in pids.read_text().split()]
    with pytest.raises(TimeoutError):  # the server's kill grace is 2 s: the client hangs up long before
        rpc(http_port, "tasks/cancel", {"taskId": task_id}, {"Mcp-Name": task_id}, timeout=0.3)
    deadline = time.monotonic() + 15
    while not all_dead(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all_dead(tree)
    while True:  # the processes are gone; the registry records the end a moment later (longer on a loaded machine)
        status, reply = rpc(http_port, "tasks/get", {"taskId": task_id}, {"Mcp-Name": task_id})
        if status != 200 or reply["result"]["status"] != "working" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200 and reply["result"]["status"] == "cancelled"


@pytest.mark.anyio
async def test_sdk_client_over_http_sends_mcp_name_and_gets_its_result(http_port):
    ext = TasksClient()
    async with Client(f"http://127.0.0.1:{http_port}/mcp", extensions=[ext]) as client:
        result = await client.call_tool("launch_task", {"command": "sleep 0.3; echo via-http", "run_in_background": False})
        background = await client.call_tool("launch_task", {"command": "echo at-once"})
        with pytest.raises(MCPError) as err:  # ids are checked after the header: an unknown id is still -32602
            await get_task(client.session, "nope")
    assert not result.is_error and result.structured_content["output"] == "via-http\n"
    assert len(ext.created) == 1 and ext.states[-1].status == "completed"
    assert background.structured_content["status"] in ("queued", "running", "completed")
    assert err.value.error.code == -32602
