"""The MCP tasks extension (SEP-2663): launch_task(run_in_background=false) and run_queue as tasks,
polled with tasks/get; a background launch_task answers at once whatever the client declares.

Driven by the SDK's own client declaring the extension (a ``ClientExtension`` with a
``ResultClaim("task")`` whose resolver polls ``tasks/get``), in memory and over stdio, with real
processes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client import ClaimContext, ClientExtension, ResultClaim
from mcp.server.runner import serve_dual_era_loop
from mcp.shared.memory import create_client_server_memory_streams
from mcp.types import CallToolResult, TextContent
from mcp_types import Request, RequestParams, Result

from agent_parallel.server import ServerSettings, build_server
from agent_parallel.server.app import summary
from conftest import all_dead, alive, call, read_pids
from queue_helpers import write_item

pytestmark = pytest.mark.anyio
SCRIPT = Path(sys.executable).parent / "agent-parallel"
TASKS = "io.modelcontextprotocol/tasks"


# ----------------------------------------------------------------- the client side of the extension
class TaskIdParams(RequestParams):
    task_id: str


class UpdateParams(TaskIdParams):
    input_responses: dict[str, Any]


class GetTask(Request[TaskIdParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: TaskIdParams
    name_param = "taskId"  # SEP-2663: Mcp-Name carries the task id


class CancelTask(Request[TaskIdParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: TaskIdParams
    name_param = "taskId"


class UpdateTask(Request[UpdateParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    params: UpdateParams
    name_param = "taskId"


class CreatedTask(Result):
    """``CreateTaskResult``: ``Result & Task`` with ``resultType: "task"``."""

    result_type: Literal["task"]
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None


class TaskState(Result):
    """``GetTaskResult``: ``Result & DetailedTask``."""

    result_type: str | None = None
    task_id: str
    status: Literal["working", "input_required", "completed", "failed", "cancelled"]
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class Ack(Result):
    result_type: str | None = None


class TasksClient(ClientExtension):
    """Resolves task results by polling ``tasks/get`` at the server's ``pollIntervalMs``; keeps what it saw."""

    identifier = TASKS

    def __init__(self) -> None:
        self.created: list[CreatedTask] = []
        self.states: list[TaskState] = []

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreatedTask, resolve=self._resolve)]

    async def _resolve(self, created: CreatedTask, ctx: ClaimContext) -> CallToolResult:
        self.created.append(created)
        while True:
            state = await get_task(ctx.session, created.task_id)
            self.states.append(state)
            if state.status == "completed":
                return CallToolResult.model_validate(state.result)
            if state.status == "failed":
                raise MCPError(**state.error)
            if state.status == "cancelled":
                return CallToolResult(content=[TextContent(type="text", text=state.status_message or "cancelled")],
                                      is_error=True)
            await anyio.sleep((state.poll_interval_ms or 1000) / 1000)


async def get_task(session: Any, task_id: str) -> TaskState:
    return await session.send_request(GetTask(params=TaskIdParams(task_id=task_id)), TaskState)


async def cancel_task(session: Any, task_id: str) -> Ack:
    return await session.send_request(CancelTask(params=TaskIdParams(task_id=task_id)), Ack)


async def start(client: Client, tool: str, **args: Any) -> CreatedTask:
    """Call a tool and keep the raw task handle (no transparent resolution); launch_task waits for its result."""
    if tool == "launch_task":
        args.setdefault("run_in_background", False)  # only a call that waits for its result becomes a task
    created = await client.session.call_tool(tool, args, allow_claimed=True)
    assert isinstance(created, CreatedTask), created
    return created


async def poll_until_done(session: Any, task_id: str, timeout: float = 10) -> TaskState:
    with anyio.fail_after(timeout):
        while (state := await get_task(session, task_id)).status == "working":
            await anyio.sleep((state.poll_interval_ms or 1000) / 1000)
    return state


async def wait_for_pids(path: Path, count: int) -> list[int]:
    with anyio.fail_after(5):
        while len(read_pids(path)) < count:
            await anyio.sleep(0.02)
    return read_pids(path)


@pytest.fixture
def server(workspace: Path):
    return build_server(workspace, ServerSettings(kill_grace_s=0.5, min_free_memory=0))


@asynccontextmanager
async def shared_lifespan(server) -> AsyncIterator[Any]:
    """One server lifespan (one registry) and a factory of client transports into it: several callers."""
    low = server._lowlevel_server  # what mcp.Client(server) drives too
    async with low.lifespan(low) as state, anyio.create_task_group() as tg:
        @asynccontextmanager
        async def transport():
            async with create_client_server_memory_streams() as (client_streams, (read, write)):
                tg.start_soon(functools.partial(serve_dual_era_loop, low, read, write, lifespan_state=state))
                yield client_streams

        yield transport
        tg.cancel_scope.cancel()


# ----------------------------------------------------------------- in memory
async def test_launch_task_result_arrives_transparently(server):
    ext = TasksClient()
    async with Client(server, extensions=[ext]) as client:
        assert TASKS in client.server_capabilities.extensions
        result = await client.call_tool("launch_task", {"command": "sleep 0.4; echo hello", "run_in_background": False})
    assert not result.is_error
    out = result.structured_content
    assert out["status"] == "completed" and out["exit_code"] == 0 and out["output"] == "hello\n"
    assert out["retrieval_status"] == "success"
    assert result.content[0].text == summary("launch_task", out)  # the same short text as the tool's own answers
    [created] = ext.created
    assert created.status == "working" and created.task_id.startswith(out["task_id"] + ".")
    assert created.poll_interval_ms == 250 and created.ttl_ms >= 3600 * 1000
    assert ("is running" in created.status_message or "is queued: starting" in created.status_message) \
        and out["task_id"] in created.status_message
    assert [s.status for s in ext.states][-1] == "completed" and ext.states[0].status == "working"
    assert all(s.result_type == "complete" for s in ext.states)


async def test_polling_by_hand_reports_working_then_the_result_inline(server):
    async with Client(server, extensions=[TasksClient()]) as client:
        created = await start(client, "launch_task", command="sleep 0.5; echo done", description="by hand")
        first = await get_task(client.session, created.task_id)
        assert first.status == "working" and first.result is None and first.ttl_ms == created.ttl_ms
        final = await poll_until_done(client.session, created.task_id)
        # our own tools see the same task under the registry id
        registry_id = created.task_id.split(".")[0]
        mirror = await call(client, "task_output", task_id=registry_id)
    assert final.status == "completed" and final.error is None
    assert final.result["structuredContent"]["output"] == "done\n"
    assert final.result["structuredContent"]["description"] == "by hand"
    assert final.result["isError"] is False
    assert {k: final.result["structuredContent"][k] for k in ("status", "exit_code", "output")} == \
           {k: mirror[k] for k in ("status", "exit_code", "output")}
    assert final.last_updated_at >= final.created_at and "completed (exit code 0)" in final.status_message


async def test_failed_and_timed_out_commands_complete_with_is_error(server):
    ext = TasksClient()
    async with Client(server, extensions=[ext]) as client:
        failed, timed_out = [None], [None]

        async def run(slot, **args):
            slot[0] = await client.call_tool("launch_task", args)

        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(run, failed, command="echo oops >&2; exit 3", run_in_background=False))
            tg.start_soon(functools.partial(run, timed_out, command="sleep 30", timeout_s=0.3, run_in_background=False))
    # SEP-2663: `failed` is for JSON-RPC errors only; a tool-level failure is `completed` + isError
    assert {s.status for s in ext.states} <= {"working", "completed"}
    assert failed[0].is_error and timed_out[0].is_error
    assert failed[0].structured_content["status"] == "failed"
    assert failed[0].structured_content["exit_code"] == 3 and failed[0].structured_content["output"] == "oops\n"
    assert timed_out[0].structured_content["status"] == "timed_out"
    messages = {s.status_message for s in ext.states if s.status == "completed"}
    assert any("ended failed: exit code 3" in m for m in messages)
    assert any("ended timed_out: killed after its timeout of 0.3 s" in m for m in messages)


async def test_cancel_kills_the_process_tree(server, workspace):
    pids = workspace / "pids"
    async with Client(server, extensions=[TasksClient()]) as client:
        created = await start(client, "launch_task", command=f"sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait")
        tree = await wait_for_pids(pids, 2)
        assert all(alive(p) for p in tree)
        ack = await cancel_task(client.session, created.task_id)
        assert ack.result_type == "complete"
        assert all_dead(tree)  # the ack comes once nothing of the task is left running
        state = await get_task(client.session, created.task_id)
        assert state.status == "cancelled" and state.result is None and "cancelled" in state.status_message
        registry_id = created.task_id.split(".")[0]
        assert (await call(client, "task_output", task_id=registry_id, block=False))["status"] == "cancelled"
        again = await cancel_task(client.session, created.task_id)  # finished: acknowledged, nothing changes
        assert again.result_type == "complete"
        assert (await get_task(client.session, created.task_id)).status == "cancelled"


async def test_cancel_task_tool_shows_as_cancelled_to_a_transparent_caller(server):
    async with Client(server, extensions=[TasksClient()]) as client:
        async with anyio.create_task_group() as tg:
            results = []

            async def waiter():
                results.append(await client.call_tool("launch_task", {"command": "sleep 60", "run_in_background": False}))

            tg.start_soon(waiter)
            with anyio.fail_after(5):
                while not (running := (await call(client, "list_tasks", status=["running"]))["tasks"]):
                    await anyio.sleep(0.05)
            await call(client, "cancel_task", task_id=running[0]["task_id"])
    assert results[0].is_error and "cancelled" in results[0].content[0].text


async def test_ids_from_another_caller_are_not_found(server, workspace):
    pids = workspace / "pids"
    async with shared_lifespan(server) as transport:
        async with Client(transport(), extensions=[TasksClient()]) as alice, \
                Client(transport(), extensions=[TasksClient()]) as mallory:
            created = await start(alice, "launch_task", command=f"echo $$ > {pids}; sleep 60")
            [pid] = await wait_for_pids(pids, 1)
            # mallory shares the server and its registry: list_tasks shows her the registry id ...
            registry_id = (await call(mallory, "list_tasks"))["tasks"][0]["task_id"]
            assert created.task_id.startswith(registry_id + ".")
            forged = registry_id + "." + "A" * 22
            for guess in (registry_id, forged, created.task_id + "x"):
                for op in (get_task, cancel_task):
                    with pytest.raises(MCPError) as err:
                        await op(mallory.session, guess)
                    assert err.value.error.code == -32602 and "no task" in err.value.error.message
            assert alive(pid)  # ... but cannot reach the task through the extension
            assert (await get_task(alice.session, created.task_id)).status == "working"
            await cancel_task(alice.session, created.task_id)
            assert not alive(pid)


async def test_update_is_acknowledged_with_a_note_and_unknown_ids_are_errors(server):
    async with Client(server, extensions=[TasksClient()]) as client:
        created = await start(client, "launch_task", command="echo hi")
        ack = await client.session.send_request(
            UpdateTask(params=UpdateParams(task_id=created.task_id, input_responses={"k": {"action": "accept"}})), Ack)
        assert ack.result_type == "complete"
        assert "never asks for input" in ack.meta["io.github.agent-parallel/note"]
        with pytest.raises(MCPError) as err:
            await client.session.send_request(UpdateTask(params=UpdateParams(task_id="nope", input_responses={})), Ack)
        assert err.value.error.code == -32602
        with pytest.raises(MCPError) as err:  # a huge id is not sent back whole
            await get_task(client.session, "x" * 200_000)
        assert err.value.error.code == -32602 and len(err.value.error.message) < 400
        assert err.value.error.message.startswith("Failed to retrieve task: no task 'xxx")


async def test_errors_before_the_start_stay_synchronous(server):
    ext = TasksClient()
    async with Client(server, extensions=[ext]) as client:
        bad = await client.call_tool("launch_task", {"command": "echo", "item": "001", "run_in_background": False})
        worse = await client.call_tool("launch_task", {"command": "echo", "run_in_background": "maybe"})
        other = await client.call_tool("list_tasks", {})
    assert bad.is_error and "exactly one of" in bad.content[0].text
    assert worse.is_error and "run_in_background" in worse.content[0].text
    assert not other.is_error
    assert ext.created == []  # none of these became a task


async def test_run_queue_as_a_task_returns_the_report(server, workspace):
    write_item(workspace, 1, "first", command="echo a")
    write_item(workspace, 2, "second", command="sleep 0.2; echo b", blocked_by=[1])
    ext = TasksClient()
    async with Client(server, extensions=[ext]) as client:
        result = await client.call_tool("run_queue", {"level": "L2"})
    out = result.structured_content
    assert not result.is_error and out["status"] == "completed"
    assert out["run_id"] == out["task_id"] and out["items"] == ["001", "002"]  # RunStarted's fields, still valid
    assert [o["outcome"] for o in out["run"]["outcomes"]] == ["completed", "completed"]
    assert out["run"]["state"] == "finished" and "2 completed" in out["message"]
    assert ext.created[0].task_id.startswith(out["run_id"] + ".")


# ----------------------------------------------------------------- clients without the extension
async def test_plain_clients_see_no_change(server):
    async with Client(server) as plain:  # 2026-07-28, extension not declared
        launched = await plain.call_tool("launch_task", {"command": "sleep 0.3"})
        assert launched.structured_content["status"] in ("queued", "running") and launched.result_type == "complete"
        with pytest.raises(MCPError) as err:
            await get_task(plain.session, launched.structured_content["task_id"])
        assert err.value.error.code == -32021  # missing required client capability
        assert err.value.error.data == {"requiredCapabilities": {"extensions": {TASKS: {}}}}
    async with Client(server, mode="legacy", extensions=[TasksClient()]) as legacy:  # 2025-11-25: no tasks at all
        launched = await legacy.call_tool("launch_task", {"command": "echo old"})
        assert launched.structured_content["status"] in ("queued", "running", "completed")
        with pytest.raises(MCPError) as err:
            await get_task(legacy.session, launched.structured_content["task_id"])
        assert err.value.error.code == -32601


# ----------------------------------------------------------------- over stdio
def stdio(root: Path) -> StdioServerParameters:
    return StdioServerParameters(command=str(SCRIPT), args=["serve", "--root", str(root)])


async def test_stdio_task_result_polling_and_cancel(workspace):
    ext = TasksClient()
    pids = workspace / "pids"
    async with Client(stdio(workspace), extensions=[ext]) as client:
        assert TASKS in client.server_capabilities.extensions
        ok = await client.call_tool("launch_task", {"command": "sleep 0.3; echo over-stdio", "run_in_background": False})
        bad = await client.call_tool("launch_task", {"command": "exit 7", "run_in_background": False})
        created = await start(client, "launch_task", command=f"sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait")
        tree = await wait_for_pids(pids, 2)
        await cancel_task(client.session, created.task_id)
        assert all_dead(tree)
        assert (await get_task(client.session, created.task_id)).status == "cancelled"
    assert ok.structured_content["output"] == "over-stdio\n" and not ok.is_error
    assert bad.is_error and bad.structured_content["exit_code"] == 7
    assert ext.created[0].poll_interval_ms == 250 and ext.states[-1].status == "completed"
    # another session (a new server process on the same workspace) does not know the id
    async with Client(stdio(workspace), extensions=[TasksClient()]) as other:
        with pytest.raises(MCPError) as err:
            await get_task(other.session, created.task_id)
        assert err.value.error.code == -32602
