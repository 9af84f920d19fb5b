"""The MCP server: ``build_server`` assembles it (settings, the registry's lifespan, signal handling,
auth, the tools, resources, prompt and tasks extension), and ``AgentParallelServer`` translates
errors at the one place every tool call and resource read passes.

A thin layer: it checks arguments, calls the registry (or the planner) and translates the answer
into the result models of ``results.py``; nothing here touches a process or a file directly."""

from __future__ import annotations

import logging
from collections import Counter
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import (ResourceError, ResourceNotFoundError, ToolError, UnexpectedResourceError,
                                             UnexpectedToolError)
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..errors import AgentParallelError, UnknownTask, UsageError
from ..paths import runs_dir
from .prompt import PARALLEL_EXECUTION
from ..queue.items import QueueReader
from ..queue.plan import prepare_plan
from ..tasks.executor import Executor, LocalExecutor
from ..text import cut, first_few
from ..tasks.registry import TaskRegistry, open_registry
from .auth import StaticTokenVerifier
from .resources import TaskUpdates, register_task_resources
from .settings import ServerSettings, Workspace
from .tasks_extension import TasksExtension
from .tools import queue_tools, register_queue_resource, task_tools

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
Run shell commands and queue items in the background and wait on them without blocking yourself.
launch_task starts work and answers at once with a task_id; task_output reads progress or blocks
until one, any or all tasks finish; cancel_task stops a task and everything it started;
list_tasks shows recent tasks. Launch independent work together, then wait with task_output
(task_ids=[...], wait="all"); chain dependent steps with launch_task(after=[...]). Many similar
commands (test shards, files to process) go in one call: launch_task(commands=[...], max_parallel=N).
For the work queue in .agent/queue/: queue_plan says what can run now and in what order,
run_queue carries it out in the background, update_item records items you do yourself.
The parallel-execution prompt explains the patterns."""


class AgentParallelServer(MCPServer):
    """The SDK's server with our error rules at the one place every tool call and resource read passes.

    - Arguments that fail the input schema: one short line per argument (its name, what was given,
      what is expected) instead of pydantic's text with URLs.
    - Our own errors reaching a resource: the SDK's resource error with the same text a tool gives.
    - Anything else escaping a tool or resource is a bug: the caller gets the exception's text and
      is told it is a bug; the log gets the traceback. The server goes on serving.
    """

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        if context is None:
            context = Context(mcp_server=self, subscriptions=self._subscriptions)
        try:
            result = await self._tool_manager.call_tool(name, arguments, context, convert_result=False)
            try:
                return self._answer(name, result)
            except Exception as exc:  # what the SDK's conversion raises as a crash (a bug of the tool)
                raise UnexpectedToolError(f"Error executing tool {name}") from exc
        except UnexpectedToolError as exc:
            cause = _original(exc)
            log.error("tool %s failed with an unexpected exception (a bug)", name, exc_info=cause)
            raise ToolError(f"Error executing tool {name}: {bug_message(cause)}") from cause
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(f"Error executing tool {name}: {describe_arguments_error(exc.__cause__)}") from None
            raise

    def _answer(self, name: str, result: Any) -> Any:
        """The tool's result as the SDK converts it (the same `structured_content`, checked against the
        same output model), with a short text (`summary`) instead of the SDK's indented JSON dump of it.

        That dump doubled every answer on the wire (a 500-row plan page: about 250 KB more) and cost
        as much again to make as the structured content itself, for a text TOOLS.md says is short."""
        tool = self._tool_manager.get_tool(name)
        meta = tool.fn_metadata if tool is not None else None
        if meta is None or meta.output_schema is None or meta.wrap_output:
            return result if meta is None else meta.convert_result(result)
        if isinstance(result, BaseModel) and isinstance(meta.output_model, type) and isinstance(result, meta.output_model):
            structured = result.model_dump(mode="json", by_alias=True)  # what convert_result does for a model
        else:
            converted = meta.convert_result(result)
            if not isinstance(converted, CallToolResult) or converted.is_error or converted.structured_content is None:
                return converted
            structured = converted.structured_content
        return CallToolResult(content=[TextContent(type="text", text=summary(name, structured))],
                              structured_content=structured)

    async def read_resource(self, uri: Any, context: Context | None = None) -> Any:
        try:
            return await super().read_resource(uri, context)
        except ResourceNotFoundError as exc:  # the SDK's "Unknown resource: <uri>" echoes the whole URI (200 KB sent...)
            if len(str(uri)) <= MAX_URI_SHOWN:
                raise
            raise ResourceNotFoundError(f"Unknown resource: {cut(str(uri), MAX_URI_SHOWN)}; the resources are "
                                        "task://<task_id> and task://<task_id>/output") from exc
        except UnexpectedResourceError as exc:
            cause = _original(exc)
            if isinstance(cause, UnknownTask):
                raise ResourceNotFoundError(str(cause)) from cause
            if isinstance(cause, AgentParallelError):
                raise ResourceError(str(cause)) from cause
            log.error("reading %s failed with an unexpected exception (a bug)", uri, exc_info=cause)
            raise ResourceError(f"reading {uri} failed: {bug_message(cause)}") from cause


MAX_URI_SHOWN = 200
"""Characters of a resource URI an error echoes."""


def _original(exc: BaseException) -> BaseException:
    """The exception the SDK wrapped (through nested ``Unexpected...Error`` wrappers)."""
    while isinstance(exc, UnexpectedToolError | UnexpectedResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def bug_message(exc: BaseException) -> str:
    return (f"unexpected {type(exc).__name__}: {cut(str(exc), 300)}. This is a bug in agent-parallel, "
            "not a problem with your call: please report it (the server log has the traceback). "
            "The server keeps running.")


SUMMARY_CHARS = 800
"""A tool answer's text block is at most about this long (`summary`); the answer is its structured content."""


def summary(tool: str, data: dict[str, Any]) -> str:
    """A short text for a tool's structured answer: its `message` if it has one, then each field on one
    line (scalars as they are, long text and lists by their size, short lists of ids in full).

    For people reading the text block; clients and agents read the structured content, which holds
    the whole answer (Claude Code, for one, shows the model only that)."""
    lines = [f"{tool}: {cut(' '.join(data['message'].split()), 300)}" if isinstance(data.get("message"), str)
             else f"{tool}:"]
    for key, value in data.items():
        if key == "message" or value is None:
            continue
        lines.append(f"  {key}: {_brief(value)}")
    text = "\n".join(lines)
    if len(text) > SUMMARY_CHARS:
        text = text[:SUMMARY_CHARS].rsplit("\n", 1)[0] + "\n  ..."
    return text + "\n(the complete answer is the structured content)"


def _brief(value: Any) -> str:
    if isinstance(value, str):
        flat = " ".join(value.split())
        return repr(flat) if len(flat) <= 80 and "\n" not in value.strip() else f"{len(value):,} characters"
    if isinstance(value, list):
        if value and len(value) <= 8 and all(isinstance(v, str | int | float) and len(str(v)) <= 20 for v in value):
            return ", ".join(str(v) for v in value)
        if value and all(isinstance(v, dict) and isinstance(v.get("status"), str) for v in value):
            counts = Counter(v["status"] for v in value)  # tasks: which ended how, for a reader of the text alone
            return f"{len(value):,} entries (" + ", ".join(f"{n:,} {status}" for status, n in counts.most_common()) + ")"
        return f"{len(value):,} entries" if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{key} {len(inner):,}" if isinstance(inner, list | dict) else f"{key} {_brief(inner)}"
                         for key, inner in value.items())
    return "true" if value is True else "false" if value is False else str(value)


_EXPECTED = {"string_type": "must be a string", "int_type": "must be an integer", "int_parsing": "must be an integer",
             "int_from_float": "must be a whole number", "float_type": "must be a number",
             "float_parsing": "must be a number", "bool_type": "must be true or false",
             "bool_parsing": "must be true or false", "list_type": "must be a list", "dict_type": "must be an object",
             "finite_number": "must be a finite number", "missing": "is required"}
_JSON_TYPE = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
              dict: "an object", type(None): "null"}


def describe_arguments_error(exc: ValidationError) -> str:
    """Tool arguments that fail the input schema, for a model to correct: name, given, expected."""
    problems = []
    errors = exc.errors(include_url=False)
    for error in errors[:5]:
        where = _argument_path(error["loc"])
        expected = _EXPECTED.get(error["type"])
        if expected is None:
            message = error["msg"]
            expected = ("must be " + message[len("Input should be "):] if message.startswith("Input should be ")
                        else message[:1].lower() + message[1:])
        if error["type"] == "missing":
            problems.append(f"`{where}` {expected}")
        else:
            value = error.get("input")
            kind = _JSON_TYPE.get(type(value), type(value).__name__)
            problems.append(f"`{where}` {expected}, got {cut(repr(value), 60)} ({kind})")
    return (f"invalid arguments: {first_few(problems, 5, sep='; ', total=len(errors))} "
            "(the tool's input schema lists every argument)")


def _argument_path(loc: Iterable[Any]) -> str:
    parts = list(loc)
    text = str(parts[0]) if parts else "arguments"
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f"[{part!r}]"
    return text


def build_server(root: Path | str = ".", settings: ServerSettings | None = None,
                 executor: Executor | None = None, *, handle_signals: bool = False,
                 bearer_token: str | None = None, public_url: str | None = None,
                 reader: QueueReader | None = None, start_guard: bool = False) -> MCPServer:
    """Create the MCP server for the workspace at ``root``.

    ``handle_signals`` (for the real process, not tests): on SIGTERM, SIGINT or SIGHUP stop every
    task (TERM, grace, KILL) and exit at once, since the stdio reader cannot be interrupted.
    ``bearer_token`` (HTTP only) makes every request carry ``Authorization: Bearer TOKEN``;
    ``public_url`` is the URL clients reach the server at (used in the SDK's auth metadata).
    Without an ``executor``, the settings choose it (``executor: ray`` starts or joins Ray when the
    server starts, and refuses at once when Ray is not installed). ``reader`` (for tests): the queue
    cache to use; the server closes it when it stops. ``start_guard`` (``serve``): the local executor's
    watchdog is started with the server, in the background, not with the first task.

    When the server starts it plans the queue in the background (``plan.prepare_plan``), so the
    first ``queue_plan`` finds its plan made.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise UsageError(f"workspace root {root} is not a directory; pass --root DIR with an existing directory")
    runs_dir(root)  # refuses a run directory that resolves outside the root, before serving
    if settings is None:
        settings = ServerSettings.for_workspace(root)
    if executor is None and settings.executor == "ray":
        from ..tasks.ray_executor import require_ray

        require_ray()
    queue_reader = reader if reader is not None else QueueReader()
    updates = TaskUpdates()

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[Workspace]:
        runner = executor if executor is not None else settings.make_executor()  # Ray starts here (or fails)
        closing = threading.Event()
        try:
            async with open_registry(root, runs_dir(root), settings.registry_settings(), runner) as registry:
                async with anyio.create_task_group() as tg:
                    if handle_signals:
                        tg.start_soon(_exit_on_signal, registry)
                    tg.start_soon(updates.watch, registry)
                    tg.start_soon(_prepare_plan, root, queue_reader, closing)
                    if start_guard and isinstance(registry.executor, LocalExecutor):
                        tg.start_soon(anyio.to_thread.run_sync, registry.executor.start_guard)
                    yield Workspace(root, settings, registry, queue_reader)
                    closing.set()
                    tg.cancel_scope.cancel()
        finally:
            closing.set()  # a plan still being prepared stops within some 256 files
            queue_reader.close()  # its directory watches (made again if the server is started again)

    auth: dict[str, Any] = {}
    if bearer_token is not None:
        url = public_url or "http://127.0.0.1"
        auth = {"token_verifier": StaticTokenVerifier(bearer_token),
                "auth": AuthSettings(issuer_url=url, resource_server_url=f"{url}/mcp", validate_token_resource=False)}

    server = AgentParallelServer("agent-parallel", title="agent-parallel", version=__version__,
                                 instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING",
                                 extensions=[TasksExtension()], subscriptions=updates,
                                 tools=[*task_tools(), *queue_tools(root, queue_reader)], **auth)
    register_task_resources(server)
    register_queue_resource(server, root, queue_reader)

    @server.prompt(name="parallel-execution", title="Parallel execution")
    def parallel_execution() -> str:
        """How to run independent work in parallel with these tools: independence checks, fork-join,
        pipelines, the work queue and autonomy levels."""
        return PARALLEL_EXECUTION

    return server


async def _prepare_plan(root: Path, reader: QueueReader, closing: threading.Event) -> None:
    """`plan.prepare_plan` in a worker thread, once, when the server starts. Nothing it meets may
    stop the server: a problem is logged, and `queue_plan` reports it to whoever asks."""
    started = time.perf_counter()
    try:
        planned = await anyio.to_thread.run_sync(prepare_plan, root, reader, closing.is_set, abandon_on_cancel=True)
    except (AgentParallelError, OSError) as exc:
        log.info("the queue was not planned ahead: %s", exc)
    except Exception:  # a bug: logged with its traceback, the server goes on (queue_plan plans when called)
        log.exception("preparing the queue plan failed")
    else:
        if planned is not None:
            log.info("planned the queue ahead: %d items in %.2f s", planned, time.perf_counter() - started)


async def _exit_on_signal(registry: TaskRegistry) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            with anyio.CancelScope(shield=True):
                await registry.shutdown(grace=0.5)
            os._exit(128 + signum)
