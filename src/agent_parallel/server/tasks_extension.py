"""Protocol-native background tasks: the MCP tasks extension (SEP-2663) on top of our task registry.

Why: a client that declares ``io.modelcontextprotocol/tasks`` (protocol 2026-07-28) can hand long
work to the server and poll for it with ``tasks/get`` instead of holding a ``tools/call`` open or
learning our own ``task_output`` loop. Only calls that would wait for a result become tasks:
``launch_task(run_in_background=false)`` and ``run_queue`` (whose result is its report). A
background ``launch_task`` answers at once with its ``task_id`` whatever the client declares: made a
task, a client that resolves tasks transparently would wait for the command's end. The extension
adds no second runner: the tool starts the work in the background as usual (a waiting
``launch_task`` is told not to wait), the MCP task is a handle on the registry task it started, and
``tasks/get`` reports the registry's state without waiting (registry waits are event-driven, so
polling is cheap and ``pollIntervalMs`` short).

Mapping, following the SEP's vocabulary:

- queued, running -> ``working``;
- completed -> ``completed``, with the tool's final result inline;
- failed, timed_out, skipped, interrupted -> ``completed`` with ``isError: true`` (and our status in
  the result and the ``statusMessage``). The SEP reserves ``failed`` for JSON-RPC errors and says
  it MUST NOT be used for tool-level errors; a command that exits 1 is one;
- cancelled (by ``tasks/cancel`` or ``cancel_task``) -> ``cancelled``.

Caller scoping: a 2026-07-28 request carries no session or connection id (the SDK builds a fresh
``Connection`` per request), so a task is bound to the authenticated principal when the transport
has one (HTTP with a token) and otherwise to an unguessable MCP task id: ``<registry id>.<128
random bits>``. Knowing a registry id (``list_tasks`` shows them to anyone) does not find the task.

Routing header: over streamable HTTP, ``tasks/get|update|cancel`` must carry ``Mcp-Name: <taskId>``
(SEP-2663, with SEP-2243's rule that the server rejects a header that is missing or disagrees with
the body): anything else is -32020 (HeaderMismatch), which the SDK's HTTP entry sends as HTTP 400,
and nothing is read or changed. The SDK checks ``Mcp-Name`` only for ``tools/call``,
``prompts/get`` and ``resources/read``, so the extension checks its own methods. Over stdio (and in
memory) there are no headers and nothing to check: the header is an HTTP transport rule.

Clients that do not declare the extension, and every handshake-era (2025) connection, see no change.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import anyio
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import require_client_extension
from mcp.server.request_state import authenticated_principal
from mcp.types import CallToolRequestParams, CallToolResult, TextContent
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp_types import HEADER_MISMATCH, INTERNAL_ERROR, INVALID_PARAMS, RequestParams
from pydantic import Field, TypeAdapter, ValidationError

from ..errors import UnknownTask
from ..queue.run import run_of
from ..results import LaunchResult, iso
from ..tasks.records import TaskRecord, TaskStatus
from ..tasks.registry import Task, TaskRegistry
from ..text import short_repr
from .settings import Workspace
from .views import view_task

log = logging.getLogger(__name__)

IDENTIFIER = "io.modelcontextprotocol/tasks"
PROTOCOL_VERSIONS = frozenset({"2026-07-28"})
TASK_TOOLS = {"launch_task": "task_id", "run_queue": "run_id"}  # tool -> the field naming the registry task
NOTE_KEY = "io.github.agent-parallel/note"
RESULT_BYTES = 16384  # output inlined in a finished task's result: what launch_task(run_in_background=false) shows
# tasks/cancel acknowledges once the task has ended, waiting at most this long beyond the kill grace: a task
# that cannot end (a process in uninterruptible sleep survives SIGKILL) must not hold the request forever.
CANCEL_WAIT_S = 60.0


class TaskIdParams(RequestParams):
    """``tasks/get`` and ``tasks/cancel`` params."""

    task_id: str = Field(description="the taskId a tools/call answered with")


class UpdateTaskParams(TaskIdParams):
    """``tasks/update`` params: responses to the task's outstanding ``inputRequests``."""

    input_responses: dict[str, Any]


@dataclass
class _Entry:
    """One MCP task: a handle on a registry task, owned by the principal that created it."""

    mcp_id: str
    task_id: str
    tool: str
    principal: str | None
    started: dict[str, Any]  # the tool's own first answer (run_queue's RunStarted), reused in the final result


class TasksExtension(Extension):
    """Serve ``launch_task`` and ``run_queue`` as MCP tasks to clients that declare the extension."""

    identifier = IDENTIFIER

    def __init__(self, *, poll_interval_ms: int = 250, ttl_ms: int = 24 * 3600 * 1000,
                 retain_after_end_ms: int = 3600 * 1000) -> None:
        self.poll_interval_ms = poll_interval_ms
        self.ttl_ms = ttl_ms
        self.retain_after_end_ms = retain_after_end_ms
        # Per registry (one per lifespan): tasks die with the registry that runs their processes.
        self._tables: WeakKeyDictionary[TaskRegistry, dict[str, _Entry]] = WeakKeyDictionary()

    def methods(self) -> list[MethodBinding]:
        return [MethodBinding("tasks/get", TaskIdParams, self._get, protocol_versions=PROTOCOL_VERSIONS),
                MethodBinding("tasks/update", UpdateTaskParams, self._update, protocol_versions=PROTOCOL_VERSIONS),
                MethodBinding("tasks/cancel", TaskIdParams, self._cancel, protocol_versions=PROTOCOL_VERSIONS)]

    # ------------------------------------------------------------------ tools/call
    async def intercept_tool_call(self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any],
                                  call_next: CallNext) -> HandlerResult:
        """Run the tool as usual; if the call waits for a result and the client declared tasks, answer with a task."""
        if not _wants_task(params, ctx):
            return await call_next(ctx)
        if params.name == "launch_task":
            # The wait moves to tasks/get, so the tool must start the work and answer at once. The SDK invokes the
            # tool with this very params object (see Extension.intercept_tool_call), so the rewrite reaches it.
            params.arguments = {**(params.arguments or {}), "run_in_background": True}
        result = await call_next(ctx)
        # Argument and launch errors stay synchronous: no task exists for work that never started.
        if not isinstance(result, CallToolResult) or result.is_error or not result.structured_content:
            return result
        task_id = result.structured_content.get(TASK_TOOLS[params.name])
        ws = _workspace(ctx)
        try:
            task = ws.registry.get(task_id)
        except UnknownTask:
            log.warning("%s answered with unknown task %r; answering synchronously", params.name, task_id)
            return result
        entry = _Entry(mcp_id=f"{task_id}.{secrets.token_urlsafe(16)}", task_id=task_id, tool=params.name,
                       principal=authenticated_principal(ctx), started=dict(result.structured_content))
        table = self._table(ws.registry)
        self._expire(ws.registry, table)  # here too: a client that never polls must not grow the table for ever
        table[entry.mcp_id] = entry  # stored before answering: tasks/get resolves at once
        return {"resultType": "task", **self._task_fields(entry, task)}

    # ------------------------------------------------------------------ tasks/*
    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        """The task's state now (nothing waits); the tool's result inline once it has finished."""
        _check_mcp_name(ctx, params.task_id)
        require_client_extension(ctx, IDENTIFIER)
        ws = _workspace(ctx)
        entry, task = self._find(ctx, ws, params.task_id, "retrieve")
        fields = self._task_fields(entry, task)
        if fields["status"] == "completed":
            fields["result"] = self._final_result(ws, entry, task)
        return {"resultType": "complete", **fields}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        """Stop the task through the registry (TERM, grace, KILL of its process group); ack once it is over.

        The wait is bounded: past ``CANCEL_WAIT_S`` beyond the kill grace the request is acknowledged (the
        SEP's ack means "cancellation requested") with a note, and ``tasks/get`` keeps telling the truth.
        """
        _check_mcp_name(ctx, params.task_id)
        require_client_extension(ctx, IDENTIFIER)
        ws = _workspace(ctx)
        entry, task = self._find(ctx, ws, params.task_id, "cancel")
        # Shielded: an abandoned request must not leave a half-killed tree. A finished task is left as it is.
        with anyio.CancelScope(shield=True), anyio.move_on_after(ws.settings.kill_grace_s + CANCEL_WAIT_S) as waited:
            await ws.registry.cancel(task)
        if not waited.cancelled_caught:
            return {"resultType": "complete"}
        log.warning("task %s was asked to stop but had not ended %g s later", entry.task_id, CANCEL_WAIT_S)
        return {"resultType": "complete", "_meta": {NOTE_KEY: (
            f"task {entry.mcp_id} was asked to stop (TERM, then KILL of its process group) but had not ended "
            f"{CANCEL_WAIT_S:g} s later; tasks/get shows `working` until it has, then `cancelled`")}}

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> dict[str, Any]:
        """Acknowledge, as the SEP requires; our tasks never ask for input, so there is nothing to apply."""
        _check_mcp_name(ctx, params.task_id)
        require_client_extension(ctx, IDENTIFIER)
        ws = _workspace(ctx)
        entry, _ = self._find(ctx, ws, params.task_id, "update")
        ignored = ", ".join(sorted(params.input_responses)) or "none"
        return {"resultType": "complete", "_meta": {NOTE_KEY: (
            f"task {entry.mcp_id} never asks for input (its commands run with stdin at /dev/null), so there is "
            f"nothing to update; the input responses ({ignored}) were ignored")}}

    # ------------------------------------------------------------------ internals
    def _table(self, registry: TaskRegistry) -> dict[str, _Entry]:
        table = self._tables.get(registry)
        if table is None:
            table = self._tables[registry] = {}
        return table

    def _find(self, ctx: ServerRequestContext[Any, Any], ws: Workspace, mcp_id: str, action: str) -> tuple[_Entry, Task]:
        """The caller's task, or -32602; another principal's task reads exactly like a missing one."""
        table = self._table(ws.registry)
        self._expire(ws.registry, table)
        entry = table.get(mcp_id)
        if entry is None or entry.principal != authenticated_principal(ctx):
            raise MCPError(code=INVALID_PARAMS, message=(
                f"Failed to {action} task: no task {short_repr(mcp_id)} for this caller. Task ids are the taskId a "
                "tools/call answered with; tasks from other callers, servers or earlier server runs are not visible"))
        try:
            return entry, ws.registry.get(entry.task_id)
        except UnknownTask:
            del table[mcp_id]
            raise MCPError(code=INVALID_PARAMS, message=(
                f"Failed to {action} task: task {short_repr(mcp_id)} has expired (its record was pruned)")) from None

    def _expire(self, registry: TaskRegistry, table: dict[str, _Entry]) -> None:
        """Forget finished tasks past their TTL; a task whose work is still live never expires."""
        now = time.time()
        for mcp_id, entry in list(table.items()):
            try:
                rec = registry.get(entry.task_id).record
            except UnknownTask:
                del table[mcp_id]
                continue
            if rec.status.is_done and (now - rec.created_at) * 1000 > self._ttl(rec):
                del table[mcp_id]

    def _ttl(self, rec: TaskRecord) -> int:
        """At least ``ttl_ms`` from creation, and ``retain_after_end_ms`` past the end of the work."""
        end = rec.ended_at if rec.status.is_done and rec.ended_at is not None else time.time()
        return max(self.ttl_ms, int((end - rec.created_at) * 1000) + self.retain_after_end_ms)

    def _task_fields(self, entry: _Entry, task: Task) -> dict[str, Any]:
        rec = task.record
        updated = max(t for t in (rec.created_at, rec.started_at, rec.ended_at) if t is not None)
        return {"taskId": entry.mcp_id, "status": _mcp_status(rec.status), "statusMessage": _status_message(entry, task),
                "createdAt": iso(rec.created_at), "lastUpdatedAt": iso(updated), "ttlMs": self._ttl(rec),
                "pollIntervalMs": self.poll_interval_ms}

    def _final_result(self, ws: Workspace, entry: _Entry, task: Task) -> dict[str, Any]:
        """The ``CallToolResult`` the tool would have given had it waited for the end.

        launch_task: exactly what ``launch_task(run_in_background=false)`` answers (a ``LaunchResult``,
        i.e. ``task_output``'s view of the finished task), without the wait cap. run_queue: its first
        answer (``RunStarted``, so the tool's output schema still holds) updated with the final status,
        a summary ``message`` and ``task_output``'s view of the run, whose ``run`` field is the report.
        ``isError`` is set when the work did not succeed.
        """
        try:
            view = view_task(ws, task, cursor=None, max_bytes=RESULT_BYTES, tail_lines=None, pattern=None)
        except OSError as exc:
            raise MCPError(code=INTERNAL_ERROR, message=(
                f"could not read the output of task {entry.task_id}: {exc.strerror or exc}; try tasks/get again")) from exc
        if entry.tool == "launch_task":
            structured = LaunchResult(**view.model_dump(), retrieval_status="success").model_dump(mode="json")
        else:
            structured = {**entry.started, **view.model_dump(mode="json"), "retrieval_status": "success",
                          "message": _status_message(entry, task)}
        failed = task.record.status != TaskStatus.COMPLETED
        from .app import summary  # the short text every tool answers with (app imports this module)

        result = CallToolResult(content=[TextContent(type="text", text=summary(entry.tool, structured))],
                                structured_content=structured,
                                is_error=failed)
        return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def _wants_task(params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any]) -> bool:
    """A task only for a call that waits for a result, at 2026-07-28, for a client that declared the extension.

    That is ``run_queue`` and ``launch_task(run_in_background=false)``. A background ``launch_task``
    answers at once with its task_id (the SEP lets the server choose): made a task, it would keep a
    client that resolves tasks transparently waiting for the command's end. A fan-out
    (``launch_task(commands=...)``) is answered as a plain tool call: its answer names a group, not
    one task, and ``task_output`` on the group id is how to wait for it.
    """
    if params.name not in TASK_TOOLS or ctx.protocol_version not in PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    if capabilities is None or not capabilities.extensions or IDENTIFIER not in capabilities.extensions:
        return False
    if params.name != "launch_task":
        return True
    arguments = params.arguments or {}
    return arguments.get("commands") is None and _false(arguments.get("run_in_background", True))


def _check_mcp_name(ctx: ServerRequestContext[Any, Any], task_id: str) -> None:
    """Over HTTP, -32020 (HTTP 400) unless the ``Mcp-Name`` header names ``task_id`` (SEP-2663 routing headers).

    A proxy routes on the header and the server acts on the body, so the two must agree; a header
    that is missing or names another task is refused before anything is looked up. No transport
    request (stdio, in memory) means no headers, and nothing to check.
    """
    headers = getattr(ctx.request, "headers", None)
    if headers is None:
        return
    raw = headers.get(MCP_NAME_HEADER)
    if raw is not None and decode_header_value(raw) == task_id:
        return
    found = "it is missing" if raw is None else f"it is {_clip(raw)}"
    raise MCPError(code=HEADER_MISMATCH, message=(
        f"{ctx.method} over HTTP must carry the Mcp-Name header set to params.taskId ({_clip(task_id)}), but {found}; "
        "send `Mcp-Name: <taskId>` (SEP-2663), base64-wrapped as =?base64?...?= if the id is not plain ASCII"))


def _clip(text: str, limit: int = 80) -> str:
    """``repr`` of a client-supplied string, cut so an error never echoes a huge header back."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _false(value: Any) -> bool:
    try:
        return TypeAdapter(bool).validate_python(value) is False
    except ValidationError:
        return False  # the tool reports the bad value itself


def _workspace(ctx: ServerRequestContext[Any, Any]) -> Workspace:
    ws = ctx.lifespan_context
    if not isinstance(ws, Workspace):
        raise MCPError(code=INTERNAL_ERROR, message=(
            "the tasks extension needs agent-parallel's lifespan (a Workspace); build the server with build_server()"))
    return ws


def _mcp_status(status: TaskStatus) -> str:
    if not status.is_done:
        return "working"
    return "cancelled" if status == TaskStatus.CANCELLED else "completed"


def _status_message(entry: _Entry, task: Task) -> str:
    """One line for people and models: our status, why, and how to look closer with our own tools."""
    rec = task.record
    what = f"queue run {rec.task_id}" if entry.tool == "run_queue" else f"task {rec.task_id}"
    if (run := run_of(task)) is not None:
        progress = run.progress().counts_text()
    else:
        progress = None
    if rec.status == TaskStatus.QUEUED:
        why = rec.reason or (f"waiting for {', '.join(rec.after)}" if rec.after else "starting")
        return f"{what} is queued: {why}"
    if rec.status == TaskStatus.RUNNING:
        detail = f": {progress}" if progress else f" for {rec.duration_s or 0:.1f} s" + (f" (pid {rec.process.pid})" if rec.process else "")
        return f"{what} is running{detail}; its output so far: task_output(task_id=\"{rec.task_id}\")"
    if rec.status == TaskStatus.COMPLETED:
        return f"{what} completed" + (f": {progress}" if progress else f" (exit code 0) in {rec.duration_s or 0:.1f} s")
    detail = rec.reason or (f"exit code {rec.exit_code}" if rec.exit_code is not None else "")
    return f"{what} ended {rec.status.value}" + (f": {detail}" if detail else "") + (f" ({progress})" if progress else "")


__all__ = ["TasksExtension", "IDENTIFIER"]
