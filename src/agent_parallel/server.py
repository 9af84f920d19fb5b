"""The MCP surface: tools, resources and the lifespan that owns the task registry.

A thin layer: it checks arguments, calls the registry (or the planner) and translates the answer
into the result models of ``results.py``. Every ``AgentParallelError`` becomes a tool error with
its message; nothing here touches a process or a file directly.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import anyio
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import (ResourceError, ResourceNotFoundError, ToolError, UnexpectedResourceError,
                                             UnexpectedToolError)
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated, ServerEvent
from mcp.types import ToolAnnotations
from pydantic import Field, ValidationError

from . import __version__
from .errors import AgentParallelError, UnknownTask, UsageError
from .paths import resolve_inside, runs_dir
from .queue.claims import find_item, move_item, parse_item_id, release_stale_claims
from .config import Config, load_config
from .output_filter import OutputFilter
from .queue.plan import plan_workspace
from .queue.planner import QueuePlan
from .prompt import PARALLEL_EXECUTION
from .queue.items import QueueReader, format_id
from .queue.run import QueueContext, QueueRun, check_ready, launch_item, load_report, start_run
from .results import (CancelResult, ItemMoved, LaunchResult, RunProgress, RunStarted, TaskList, TaskOutputResult,
                      TaskSummary, TaskView)
from .tasks.admission import admission_check
from .tasks.executor import Executor
from .text import cut
from .tasks.records import TaskStatus
from .tasks.registry import RegistrySettings, Task, TaskRegistry, open_registry, wait_any

log = logging.getLogger(__name__)

MAX_PAGE_BYTES = 65536
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_WAIT_CAP_S = 3600.0
"""The longest a blocking call may wait: far above any client's tool-call timeout."""
RESOURCE_OUTPUT_BYTES = 1 << 20
MAX_TASK_IDS = 256
"""Ids in one task_output or cancel_task call (after removing repeats): keeps every answer bounded."""
UPDATE_INTERVAL_S = 0.2
"""How often resource subscribers' tasks are checked for a status change."""
OUTPUT_UPDATE_INTERVAL_S = 1.0
"""At most one resources/updated per task for growing output in this time."""

INSTRUCTIONS = """\
Run shell commands and queue items in the background and wait on them without blocking yourself.
launch_task starts work and answers at once with a task_id; task_output reads progress or blocks
until one, any or all tasks finish; cancel_task stops a task and everything it started;
list_tasks shows recent tasks. Launch independent work together, then wait with task_output
(task_ids=[...], wait="all"); chain dependent steps with launch_task(after=[...]).
For the work queue in .agent/queue/: queue_plan says what can run now and in what order,
run_queue carries it out in the background, update_item records items you do yourself.
The parallel-execution prompt explains the patterns."""


@dataclass
class ServerSettings:
    """Limits of one server; defaults are what a user gets without configuration."""

    wait_cap_s: float = 50.0  # below common client tool-call timeouts
    log_cap_bytes: int = 64 << 20
    kill_grace_s: float = 2.0
    max_running: int = 256
    max_records: int = 10_000
    min_free_memory: int = 0  # bytes; 0: never hold a start for memory
    max_load: float | None = None  # None: never hold a start for load

    def __post_init__(self) -> None:
        self.wait_cap_s = check_wait_cap(self.wait_cap_s)

    def registry_settings(self) -> RegistrySettings:
        return RegistrySettings(log_cap_bytes=self.log_cap_bytes, kill_grace_s=self.kill_grace_s,
                                max_running=self.max_running, max_records=self.max_records,
                                admission=admission_check(self.min_free_memory, self.max_load))

    @classmethod
    def from_config(cls, config: Config) -> ServerSettings:
        return cls(wait_cap_s=config.wait_cap_s, log_cap_bytes=config.log_cap_bytes, max_records=config.max_tasks,
                   min_free_memory=config.min_free_memory, max_load=config.max_load)


def check_wait_cap(value: float) -> float:
    """The wait cap, refused unless finite and in (0, MAX_WAIT_CAP_S]: a bad cap would make a blocking
    launch fail only after its task started (an agent retrying it would run it twice)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 < value <= MAX_WAIT_CAP_S:
        raise UsageError(f"the wait cap must be a number of seconds above 0 and at most {MAX_WAIT_CAP_S:g}, "
                         f"not {value!r}; the default is 50")
    return float(value)


@dataclass
class Workspace:
    """What every tool call needs: the root, the settings, the live registry and the queue cache."""

    root: Path
    settings: ServerSettings
    registry: TaskRegistry
    reader: QueueReader

    def queue(self) -> QueueContext:
        """The queue as configured now (the config is re-read, so edits apply without a restart)."""
        config, _ = load_config(self.root)
        return QueueContext(self.root, self.registry.runs_dir, config, self.registry, self.reader)


P = ParamSpec("P")
R = TypeVar("R")


def _tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn our own errors into tool errors carrying their message."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except AgentParallelError as exc:
            raise ToolError(str(exc)) from exc

    return wrapper


def _ws(ctx: Context) -> Workspace:
    return ctx.request_context.lifespan_context


class AgentParallelServer(MCPServer):
    """The SDK's server with our error rules at the one place every tool call and resource read passes.

    - Arguments that fail the input schema: one short line per argument (its name, what was given,
      what is expected) instead of pydantic's text with URLs.
    - Our own errors reaching a resource: the SDK's resource error with the same text a tool gives.
    - Anything else escaping a tool or resource is a bug: the caller gets the exception's text and
      is told it is a bug; the log gets the traceback. The server goes on serving.
    """

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError as exc:
            cause = _original(exc)
            log.error("tool %s failed with an unexpected exception (a bug)", name, exc_info=cause)
            raise ToolError(f"Error executing tool {name}: {bug_message(cause)}") from cause
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(f"Error executing tool {name}: {describe_arguments_error(exc.__cause__)}") from None
            raise

    async def read_resource(self, uri: Any, context: Context | None = None) -> Any:
        try:
            return await super().read_resource(uri, context)
        except UnexpectedResourceError as exc:
            cause = _original(exc)
            if isinstance(cause, UnknownTask):
                raise ResourceNotFoundError(str(cause)) from cause
            if isinstance(cause, AgentParallelError):
                raise ResourceError(str(cause)) from cause
            log.error("reading %s failed with an unexpected exception (a bug)", uri, exc_info=cause)
            raise ResourceError(f"reading {uri} failed: {bug_message(cause)}") from cause


def _original(exc: BaseException) -> BaseException:
    """The exception the SDK wrapped (through nested ``Unexpected...Error`` wrappers)."""
    while isinstance(exc, UnexpectedToolError | UnexpectedResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def bug_message(exc: BaseException) -> str:
    return (f"unexpected {type(exc).__name__}: {cut(str(exc), 300)}. This is a bug in agent-parallel, "
            "not a problem with your call: please report it (the server log has the traceback). "
            "The server keeps running.")


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
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "invalid arguments: " + "; ".join(problems) + more + " (the tool's input schema lists every argument)"


def _argument_path(loc: Iterable[Any]) -> str:
    parts = list(loc)
    text = str(parts[0]) if parts else "arguments"
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f"[{part!r}]"
    return text


class TaskUpdates(InMemorySubscriptionBus):
    """The subscription bus, plus ``resources/updated`` for ``task://{id}`` and ``task://{id}/output``.

    While at least one ``subscriptions/listen`` stream is open, every task is checked every
    ``UPDATE_INTERVAL_S``: a changed status publishes both URIs; grown output publishes them at most
    once per ``OUTPUT_UPDATE_INTERVAL_S`` per task. (Handshake-era clients are not offered
    ``resources/subscribe``; the SDK serves update events on 2026-07-28 listen streams only.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.listeners = 0

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        unsubscribe = super().subscribe(listener)
        self.listeners += 1
        done = False

        def once() -> None:
            nonlocal done
            if not done:
                done = True
                self.listeners -= 1
                unsubscribe()

        return once

    async def watch(self, registry: TaskRegistry) -> None:
        """Publish task changes until cancelled (runs in the lifespan's task group).

        Each check looks only at tasks created since the last one and tasks that had not finished
        (a finished task never changes), so it costs nothing for the thousands of old records.
        """
        live: dict[str, tuple[str, int]] = {}  # unfinished at the last check -> what subscribers last heard
        newest: str | None = None  # the newest task at the last check; None: nobody was listening
        output_sent: dict[str, float] = {}
        while True:
            await anyio.sleep(UPDATE_INTERVAL_S)
            if not self.listeners:
                live, newest = {}, None
                continue
            taking_stock = newest is None  # the first check after someone listens publishes nothing
            now = time.monotonic()
            changed: dict[str, None] = {}  # ordered, without repeats
            fresh: list[Task] = []
            for task in registry.newest_first():
                if task.record.task_id == newest:
                    break
                fresh.append(task)
            if fresh:
                newest = fresh[0].record.task_id
            elif newest is None:
                newest = ""  # no task yet: every task from now on is new
            for task in fresh:
                if not taking_stock:
                    changed[task.record.task_id] = None
                if not task.record.status.is_done:
                    live[task.record.task_id] = (task.record.status.value, task.output_bytes)
            for task_id, before in list(live.items()):
                try:
                    task = registry.get(task_id)
                except UnknownTask:
                    del live[task_id]
                    continue
                state = (task.record.status.value, task.output_bytes)
                if task.record.status.is_done:
                    del live[task_id]
                elif state == before or (state[0] == before[0]
                                         and now - output_sent.get(task_id, 0.0) < OUTPUT_UPDATE_INTERVAL_S):
                    continue  # unchanged, or only output grew and its last update was too recent
                else:
                    live[task_id] = state
                changed[task_id] = None
            for task_id in changed:
                output_sent[task_id] = now
                await self.publish(ResourceUpdated(uri=f"task://{task_id}"))
                await self.publish(ResourceUpdated(uri=f"task://{task_id}/output"))
            if len(output_sent) > 4 * MAX_TASK_IDS:
                output_sent = {k: v for k, v in output_sent.items() if now - v < OUTPUT_UPDATE_INTERVAL_S}


class StaticTokenVerifier:
    """Accepts exactly one bearer token (compared in constant time): for ``serve --allow-remote``."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="agent-parallel-client", scopes=[])
        return None


def build_server(root: Path | str = ".", settings: ServerSettings | None = None,
                 executor: Executor | None = None, *, handle_signals: bool = False,
                 bearer_token: str | None = None, public_url: str | None = None) -> MCPServer:
    """Create the MCP server for the workspace at ``root``.

    ``handle_signals`` (for the real process, not tests): on SIGTERM, SIGINT or SIGHUP stop every
    task (TERM, grace, KILL) and exit at once, since the stdio reader cannot be interrupted.
    ``bearer_token`` (HTTP only) makes every request carry ``Authorization: Bearer TOKEN``;
    ``public_url`` is the URL clients reach the server at (used in the SDK's auth metadata).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise UsageError(f"workspace root {root} is not a directory; pass --root DIR with an existing directory")
    runs_dir(root)  # refuses a run directory that resolves outside the root, before serving
    if settings is None:
        try:
            settings = ServerSettings.from_config(load_config(root)[0])
        except AgentParallelError as exc:  # a broken queue config must not stop background tasks
            log.warning("%s; using the default settings", exc)
            settings = ServerSettings()
    reader = QueueReader()
    updates = TaskUpdates()

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[Workspace]:
        async with open_registry(root, runs_dir(root), settings.registry_settings(), executor) as registry:
            async with anyio.create_task_group() as tg:
                if handle_signals:
                    tg.start_soon(_exit_on_signal, registry)
                tg.start_soon(updates.watch, registry)
                yield Workspace(root, settings, registry, reader)
                tg.cancel_scope.cancel()

    auth: dict = {}
    if bearer_token is not None:
        url = public_url or "http://127.0.0.1"
        auth = {"token_verifier": StaticTokenVerifier(bearer_token),
                "auth": AuthSettings(issuer_url=url, resource_server_url=f"{url}/mcp", validate_token_resource=False)}
    from .tasks_extension import TasksExtension  # here: that module builds on this one

    server = AgentParallelServer("agent-parallel", title="agent-parallel", version=__version__,
                                 instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING",
                                 extensions=[TasksExtension()], subscriptions=updates, **auth)
    _register_task_tools(server)
    _register_task_resources(server)
    _register_queue_tools(server, root, reader)

    @server.prompt(name="parallel-execution", title="Parallel execution")
    def parallel_execution() -> str:
        """How to run independent work in parallel with these tools: independence checks, fork-join,
        pipelines, the work queue and autonomy levels."""
        return PARALLEL_EXECUTION

    return server


async def _exit_on_signal(registry: TaskRegistry) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            with anyio.CancelScope(shield=True):
                await registry.shutdown(grace=0.5)
            os._exit(128 + signum)


def _register_task_tools(server: MCPServer) -> None:
    @server.tool(title="Launch a background task",
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                             open_world_hint=True))
    @_tool_errors
    async def launch_task(
        ctx: Context,
        command: Annotated[str | None, Field(description="shell command, run with /bin/sh -c")] = None,
        item: Annotated[str | None, Field(description="a queue item id (e.g. '007') to claim and run instead of a command")] = None,
        description: Annotated[str | None, Field(description="a few words saying what the task is for")] = None,
        cwd: Annotated[str | None, Field(description="working directory, relative to the workspace root (default: the root)")] = None,
        env: Annotated[dict[str, str] | None, Field(description="extra environment variables")] = None,
        timeout_s: Annotated[float | None, Field(description="kill the task and everything it started after this many seconds")] = None,
        after: Annotated[list[str] | None, Field(description="task ids that must complete successfully first; if one fails, this task ends as 'skipped'")] = None,
        run_in_background: Annotated[bool, Field(description="false: wait for the end (up to the wait cap) and answer like task_output")] = True,
    ) -> LaunchResult:
        """Start a shell command (or a queue item) in the background and answer at once with its task_id.

        Use it for anything that takes more than a few seconds (builds, test suites, servers,
        long scripts) and to run independent steps in parallel: launch them all, then call
        task_output(task_ids=[...], wait="all"). Chain dependent steps with `after`; each step gets
        its predecessors' log paths in AGENT_UPSTREAM_LOGS. Output (stdout and stderr) goes to a
        log; read it with task_output. stdin is /dev/null, so interactive commands will not wait for input.
        """
        ws = _ws(ctx)
        if (command is None) == (item is None):
            raise UsageError("give exactly one of `command` (a shell command) or `item` (a queue item id), "
                             f"not {'both' if command is not None else 'neither'}")
        if item is not None:
            if cwd is not None or env or after or timeout_s is not None:
                raise UsageError("`cwd`, `env`, `after` and `timeout_s` apply to commands only; an item runs in "
                                 "the workspace root with its own `timeout` and waits on its `blocked_by` items")
            task = await _launch_item(ws, item)
            return await _launch_answer(ws, task, run_in_background)
        # every argument is checked before anything starts: an error after the start invites a retry (a second run);
        # strings bound for the process (command, env) are checked by registry.launch, before it registers anything
        if not command.strip():
            raise UsageError("`command` is empty; give the shell command to run, e.g. \"make test\"")
        timeout_s = _check_timeout(timeout_s, "timeout_s")
        _check_text("cwd", cwd)
        workdir = resolve_inside(ws.root, cwd or ".", "cwd")
        if not workdir.is_dir():
            raise UsageError(f"cwd {cwd!r} is not a directory inside the workspace; create it or pick another")
        if after and len(after) > MAX_TASK_IDS:
            raise UsageError(f"`after` names {len(after)} tasks; at most {MAX_TASK_IDS} are accepted")
        for task_id in after or []:
            ws.registry.get(task_id)
        task = await ws.registry.launch(command=command, cwd=workdir, description=description, env=env,
                                        timeout_s=timeout_s, after=after)
        return await _launch_answer(ws, task, run_in_background)

    @server.tool(title="Read task output / wait for tasks",
                 annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    @_tool_errors
    async def task_output(
        ctx: Context,
        task_id: Annotated[str | None, Field(description="one task id")] = None,
        task_ids: Annotated[list[str] | None, Field(description="several task ids (see `wait`)")] = None,
        block: Annotated[bool, Field(description="wait for the task(s) to finish (up to `timeout`)")] = True,
        timeout: Annotated[float, Field(description="seconds to wait when blocking; clamped to the server's wait cap (default 50)")] = 30,
        wait: Annotated[Literal["all", "any"], Field(description="with several ids: return when all, or any one, have finished")] = "all",
        cursor: Annotated[int | None, Field(description="byte offset to read from (0 = start; pass back next_cursor); omit for the most recent output")] = None,
        max_bytes: Annotated[int, Field(description="at most this many bytes of output per task (1 to 65536)")] = 16384,
        tail_lines: Annotated[int | None, Field(description="only the last N lines of the selected output")] = None,
        filter: Annotated[str | None, Field(description="a regular expression: only output lines that match")] = None,
    ) -> TaskOutputResult:
        """Get the status and output of one or several background tasks, optionally waiting for them.

        With block=true (the default) it waits until the task finishes, or for several ids until
        all (wait="all") or any (wait="any") have finished, at most `timeout` seconds. A timeout
        is not an error: you get the current snapshot with retrieval_status="timeout"; call again
        to keep waiting. With block=false it answers at once (retrieval_status="not_ready" while
        running). By default you see the most recent output; page from the start with cursor=0
        and then the returned next_cursor. With task_id the task's fields are at the top level;
        with task_ids there is one entry per task in `tasks`.
        """
        ws = _ws(ctx)
        if (task_id is None) == (not task_ids):
            raise UsageError("give `task_id` (one task) or `task_ids` (several), not both or neither; "
                             "call list_tasks to see task ids")
        tasks = [ws.registry.get(i) for i in _task_ids(task_id, task_ids)]
        if not 1 <= max_bytes <= MAX_PAGE_BYTES:
            raise UsageError(f"max_bytes must be between 1 and {MAX_PAGE_BYTES} (got {max_bytes}); "
                             "page through longer output with cursor and next_cursor")
        if cursor is not None and cursor < 0:
            raise UsageError(f"cursor must be a byte offset >= 0 (got {cursor}); omit it for the most recent output")
        if tail_lines is not None and tail_lines < 0:
            raise UsageError(f"tail_lines must be >= 0 (got {tail_lines})")
        if math.isnan(timeout) or timeout < 0:
            raise UsageError(f"timeout must be a number of seconds >= 0 (got {timeout})")
        pattern = OutputFilter(filter) if filter is not None else None
        timeout = min(timeout, ws.settings.wait_cap_s)
        if block:
            done = await _wait_reporting_progress(ws, tasks, wait, timeout, ctx)
            status = "success" if done else "timeout"
        else:
            finished = [t.done.is_set() for t in tasks]
            status = "success" if (all(finished) if wait == "all" else any(finished)) else "not_ready"
        several = task_id is None
        live = _live_progress(tasks)

        def read_all() -> list[TaskView]:
            return [view_task(ws, t, cursor=cursor, max_bytes=max_bytes, tail_lines=tail_lines, pattern=pattern,
                              short=several, live_run=live.get(t.record.task_id))
                    for t in tasks]

        # logs are read (and a filter matched, within its time budget) off the event loop: other calls go on
        views = await anyio.to_thread.run_sync(read_all)
        if not several:
            return TaskOutputResult(**views[0].model_dump(), retrieval_status=status)
        return TaskOutputResult(retrieval_status=status, tasks=views)

    @server.tool(title="Cancel tasks",
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                             open_world_hint=False))
    @_tool_errors
    async def cancel_task(
        ctx: Context,
        task_id: Annotated[str | None, Field(description="the task to stop")] = None,
        task_ids: Annotated[list[str] | None, Field(description="several tasks to stop")] = None,
    ) -> CancelResult:
        """Stop a background task and every process it started (TERM, a short grace, then KILL).

        Answers once nothing of the task is left running, with its final status. Cancelling a
        task that already finished changes nothing and says so. A task waiting in a pipeline
        (`after`) is cancelled before it starts.
        """
        ws = _ws(ctx)
        if (task_id is None) == (not task_ids):
            raise UsageError("give `task_id` or `task_ids`, not both or neither; call list_tasks to see task ids")
        tasks = [ws.registry.get(i) for i in _task_ids(task_id, task_ids)]
        stopped: list[bool] = [False] * len(tasks)

        async def stop(i: int) -> None:
            stopped[i] = await ws.registry.cancel(tasks[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(tasks)):
                tg.start_soon(stop, i)
        parts = [f"{t.record.task_id}: {'cancelled' if s else f'already {t.record.status.value}, nothing to do'}"
                 for t, s in zip(tasks, stopped)]
        return CancelResult(tasks=[TaskView.of(t.record, short=len(tasks) > 1) for t in tasks], message="; ".join(parts))

    @server.tool(title="List tasks",
                 annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    @_tool_errors
    async def list_tasks(
        ctx: Context,
        status: Annotated[list[str] | None, Field(description="only tasks in these states, e.g. ['running']")] = None,
        limit: Annotated[int, Field(description="at most this many, newest first (1 to 1000)")] = 50,
        offset: Annotated[int, Field(description="skip this many (the next page: offset + limit)")] = 0,
    ) -> TaskList:
        """List recent background tasks, newest first, with status, exit code, duration and last output line.

        Use it to find task ids you lost track of, or to see what is still running; then read one
        with task_output or stop it with cancel_task.
        """
        ws = _ws(ctx)
        known = {s.value for s in TaskStatus}
        wanted = set(status or [])
        if wanted - known:
            raise UsageError(f"unknown status {sorted(wanted - known)}; use some of: {', '.join(sorted(known))}")
        if not 1 <= limit <= 1000:
            raise UsageError(f"limit must be between 1 and 1000 (got {limit})")
        if offset < 0:
            raise UsageError(f"offset must be >= 0 (got {offset})")
        page, total = ws.registry.list(wanted or None, limit=limit, offset=offset)

        def rows() -> list[TaskSummary]:  # last lines may come from the logs: read off the event loop
            return [TaskSummary.of(t.record, last_line=ws.registry.last_line(t)) for t in page]

        return TaskList(total=total, tasks=await anyio.to_thread.run_sync(rows))


def _register_task_resources(server: MCPServer) -> None:
    @server.resource("task://{task_id}", mime_type="application/json", title="Task record")
    async def task_record(task_id: str, ctx: Context) -> str:
        """A task's record: command, status, times, exit code, output size."""
        ws, task = _ws(ctx), _resource_task(ctx, task_id)
        live = _live_progress([task])
        view = await anyio.to_thread.run_sync(lambda: view_task(ws, task, cursor=None, max_bytes=1, tail_lines=0,
                                                                 pattern=None, live_run=live.get(task_id)))
        return view.model_dump_json(exclude={"output", "cursor", "next_cursor"})

    @server.resource("task://{task_id}/output", mime_type="text/plain", title="Task output")
    async def task_log(task_id: str, ctx: Context) -> str:
        """A task's output (the most recent 1 MiB when it is longer)."""
        reader = _ws(ctx).registry.reader(_resource_task(ctx, task_id))
        return await anyio.to_thread.run_sync(lambda: reader.read(None, RESOURCE_OUTPUT_BYTES).text)


async def _launch_answer(ws: Workspace, task: Task, run_in_background: bool) -> LaunchResult:
    if run_in_background:
        return LaunchResult.of(task.record)
    done = await ws.registry.wait([task], mode="all", timeout=ws.settings.wait_cap_s)
    view = await anyio.to_thread.run_sync(
        lambda: view_task(ws, task, cursor=None, max_bytes=16384, tail_lines=None, pattern=None))
    return LaunchResult(**view.model_dump(), retrieval_status="success" if done else "timeout")


async def _launch_item(ws: Workspace, item: str) -> Task:
    _check_text("item", item)
    item_id = parse_item_id(item)
    queue = await anyio.to_thread.run_sync(ws.queue)
    graph = await anyio.to_thread.run_sync(queue.graph)
    return await launch_item(queue, graph, check_ready(graph, item_id), by="launch_task")


async def _wait_reporting_progress(ws: Workspace, tasks: list[Task], mode: str, timeout: float, ctx: Context) -> bool:
    """Wait like ``registry.wait``; while queue runs are among the tasks, report their progress.

    Progress is the runs' items that have finished out of all their items (the total is fixed
    when a run starts), sent only when it grew: it strictly increases, as clients expect.
    """
    runs = [t.handle for t in tasks if isinstance(t.handle, QueueRun)]
    if not runs:
        return await ws.registry.wait(tasks, mode=mode, timeout=timeout)
    total = sum(len(run.members) for run in runs)
    sent = -1
    with anyio.move_on_after(timeout):
        while True:
            views = [run.progress() for run in runs]
            finished = sum(_items_finished(run, p) for run, p in zip(runs, views))
            if total and finished > sent:
                sent = finished
                message = "; ".join(f"run {p.run_id}: " + ", ".join(f"{n} {k}" for k, n in sorted(p.counts.items()) if n)
                                    for p in views)
                await ctx.report_progress(finished, total, message)
            if _all_or_any_done(tasks, mode):
                return True
            await wait_any([run.changed for run in runs] + [t.done for t in tasks])
    return False


def _items_finished(run: QueueRun, progress: RunProgress) -> int:
    if progress.state == "finished":
        return len(run.members)
    done = sum(n for k, n in progress.counts.items() if k not in ("running", "waiting"))
    return min(done, len(run.members))


def _all_or_any_done(tasks: list[Task], mode: str) -> bool:
    flags = [t.done.is_set() for t in tasks]
    return all(flags) if mode == "all" else any(flags)


def _resource_task(ctx: Context, task_id: str) -> Task:
    try:
        return _ws(ctx).registry.get(task_id)
    except UnknownTask as exc:
        raise ResourceNotFoundError(str(exc)) from exc


def _live_progress(tasks: list[Task]) -> dict[str, RunProgress]:
    """The progress of the live runs among ``tasks``, taken on the event loop (runs change there)."""
    return {t.record.task_id: t.handle.progress() for t in tasks if isinstance(t.handle, QueueRun)}


def view_task(ws: Workspace, task: Task, *, cursor: int | None, max_bytes: int, tail_lines: int | None,
              pattern: OutputFilter | None, short: bool = False, live_run: RunProgress | None = None) -> TaskView:
    """A task as ``task_output`` shows it: state, a page of output and, for a run, its progress.

    Reads files: call it in a worker thread, passing a live run's progress as ``live_run`` (taken
    on the event loop). ``short`` cuts the command and description (one of several tasks).
    """
    chunk = ws.registry.read_output(task, cursor=cursor, max_bytes=max_bytes, tail_lines=tail_lines, pattern=pattern)
    if isinstance(task.handle, QueueRun):
        run = live_run if live_run is not None else task.handle.progress()
    else:  # a run of an earlier server, or not a run
        run = load_report(ws.registry.runs_dir, task.record.task_id) if task.record.kind == "run" else None
    return TaskView.of(task.record, short=short, output=chunk.text, cursor=chunk.start, next_cursor=chunk.next_cursor,
                       output_bytes=task.output_bytes, truncated=chunk.truncated,
                       dropped_bytes=ws.registry.dropped_bytes(task), run=run)


def _register_queue_tools(server: MCPServer, root: Path, reader: QueueReader) -> None:
    @server.tool(title="Plan the work queue",
                 annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    @_tool_errors
    async def queue_plan(
        ctx: Context,
        queue_dir: Annotated[str | None, Field(description="queue directory inside the workspace (default .agent/queue)")] = None,
        max_parallel: Annotated[int | None, Field(description="slots to plan for (default: autonomy.max_parallel, else 5)")] = None,
    ) -> QueuePlan:
        """Read the work queue (.agent/queue/NNN-STATUS-slug.md files) and say what can run now and in what order.

        Checks every item: dependencies (blocked_by/blocks), cycles (printed as paths), references
        to missing ids, duplicate ids, and which items conflict because they touch the same files
        or components (those never run together). Returns `run_now` (ids to start now, best
        first), the predicted `waves`, the `critical_path`, `conflicts`, fork-join and pipeline
        `patterns`, `errors`/`warnings` naming file and field, the predicted makespan beside its
        lower bound, and a Mermaid flowchart. Call it before run_queue, or to pick items to
        launch yourself with launch_task(item=...).
        """
        _check_text("queue_dir", queue_dir)
        return await anyio.to_thread.run_sync(lambda: plan_workspace(root, queue_dir, max_parallel, reader))

    @server.resource("queue://plan", mime_type="application/json", title="Queue plan")
    async def queue_plan_resource() -> str:
        """The current plan of the workspace's queue (what queue_plan returns with its defaults)."""
        # our errors (e.g. no queue directory) reach the client as the SDK's resource error: see AgentParallelServer
        return (await anyio.to_thread.run_sync(lambda: plan_workspace(root, None, None, reader))).model_dump_json()

    @server.tool(title="Run the work queue",
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                             open_world_hint=True))
    @_tool_errors
    async def run_queue(
        ctx: Context,
        max_parallel: Annotated[int | None, Field(description="items at once (default from config; clamped to 1..64)")] = None,
        level: Annotated[Literal["L1", "L2", "L3"] | None, Field(description="autonomy level: L1/L2 stop at the first failure; L3 may continue")] = None,
        continue_on_error: Annotated[bool | None, Field(description="L3 only: keep going past failures, skipping what depends on them")] = None,
        items: Annotated[list[str] | None, Field(description="run only these item ids (and the pending items they need)")] = None,
    ) -> RunStarted:
        """Carry out the work queue in the background: answer at once with a run_id.

        Keeps up to max_parallel items running, starting the best-ranked ready item that
        conflicts with nothing running the moment a slot frees, and moves each item's file
        pending -> in_progress -> completed/failed. Items run their `command` (or the configured
        runner). L1/L2: the first failure stops new starts; L3 with continue_on_error: only what
        depends on a failure is skipped. Follow it with task_output(task_id=run_id): progress
        (counts, running items) while it runs, and at the end the report (completed, failed with
        exit code and last lines, skipped with the failed item they waited on, not started, and
        the makespan achieved beside the plan's lower bound). Stop it with cancel_task(run_id).
        """
        ws = _ws(ctx)
        for item in items or []:
            _check_text("items", item)
        queue = await anyio.to_thread.run_sync(ws.queue)
        task, warnings = await start_run(queue, max_parallel=max_parallel, level=level,
                                         continue_on_error=continue_on_error, items=items)
        run = task.handle
        assert isinstance(run, QueueRun)
        planned = [format_id(i) for i in run.members]
        return RunStarted(
            run_id=task.record.task_id, status=task.record.status, level=run.options.level,
            continue_on_error=run.options.continue_on_error, max_parallel=run.options.max_parallel, items=planned, predicted_makespan=run.predicted, lower_bound=run.lower_bound,
            warnings=warnings,
            message=(f"run {task.record.task_id} started with {len(planned)} item(s) to consider; "
                     f"follow it with task_output(task_id=\"{task.record.task_id}\")") if planned else
                    f"nothing to run: no pending item is ready or waiting (run {task.record.task_id} ends at once)")

    @server.tool(title="Update a queue item's status",
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False))
    @_tool_errors
    async def update_item(
        ctx: Context,
        item: Annotated[str, Field(description="item id, e.g. '007'")],
        status: Annotated[Literal["pending", "in_progress", "completed", "failed", "blocked"], Field(description="the new status")],
        reason: Annotated[str | None, Field(description="why (recorded in the run history)")] = None,
    ) -> ItemMoved:
        """Move a queue item you carry out yourself: claim it (in_progress), then mark it completed, failed or blocked.

        Allowed moves: pending -> in_progress -> completed | failed | blocked, and blocked or
        failed -> pending. Claiming is exclusive: if another agent or run claimed the item first,
        you get an error naming the claimant; pick another item from queue_plan's run_now.
        Renames the file in place; never overwrites a file.
        """
        ws = _ws(ctx)
        _check_text("item", item)
        item_id = parse_item_id(item)

        def move() -> ItemMoved:  # the config, the queue directory and its lock: off the event loop
            queue = ws.queue()
            # claims of servers that no longer run are given back first (planning never moves files)
            released = release_stale_claims(queue.queue_dir, queue.runs_dir)
            _, name = find_item(queue.queue_dir, item_id)
            new = move_item(queue.queue_dir, queue.runs_dir, item_id, status, by="an agent (update_item)", reason=reason)
            return ItemMoved(item=name.id_str, previous_status=name.status, status=status, file=new.name,
                             message=f"item {name.id_str} moved from {name.status} to {status} ({new.name})",
                             warnings=[f"item {item} ({file}): {message}" for item, file, message in released])

        return await anyio.to_thread.run_sync(move)


def _check_timeout(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if math.isnan(value) or value <= 0 or value > MAX_TIMEOUT_S:
        raise UsageError(f"{name} must be a number of seconds between 0 and {MAX_TIMEOUT_S:g} (7 days), got {value}")
    return value


def _check_text(name: str, value: str | None) -> None:
    """A NUL character cannot be in a path or a name: say so, naming the argument."""
    if value is not None and "\0" in value:
        raise UsageError(f"`{name}` {cut(repr(value), 60)} contains a NUL character; remove it")


def _task_ids(task_id: str | None, task_ids: list[str] | None) -> list[str]:
    """The ids of one call, repeats removed (first occurrence kept), at most MAX_TASK_IDS."""
    ids = [task_id] if task_id is not None else list(dict.fromkeys(task_ids or []))
    if len(ids) > MAX_TASK_IDS:
        raise UsageError(f"task_ids names {len(ids):,} different tasks; at most {MAX_TASK_IDS} are accepted per "
                         "call: split them over several calls")
    return ids


__all__ = ["build_server", "ServerSettings", "Workspace"]
