"""The MCP tools: ``launch_task``, ``task_output``, ``cancel_task``, ``list_tasks`` (the task
registry) and ``queue_plan`` (with the ``queue://plan`` resource), ``run_queue``, ``update_item`` (the
queue). Each checks its arguments, calls the registry or the queue and answers with a model of
``results.py``; every ``AgentParallelError`` becomes a tool error with its message."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import CodeType
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.types import ToolAnnotations
from pydantic import Field

from ..config import load_config, max_parallel_for
from ..errors import AgentParallelError, UsageError
from ..paths import resolve_inside
from ..queue.claims import find_item, move_item, parse_item_id, release_stale_claims
from .output_filter import OutputFilter
from .schemas import drop_titles, simplify
from ..queue.plan import MAX_PAGE_ITEMS, PAGE_ITEMS, plan_page
from ..queue.planner import QueuePlanPage
from ..queue.items import QueueReader
from ..queue.run import check_ready, launch_item, run_of, start_run
from ..results import (CancelResult, ItemMoved, LaunchResult, RunStarted, TaskEntry, TaskList, TaskOutputResult,
                       TaskSummary, TaskView, iso, status_counts)
from ..text import cut, first_few, short_repr
from ..tasks.records import TaskStatus, group_status, is_group_id
from ..tasks.registry import Task
from .settings import Workspace, workspace_of
from .views import (MAX_RUN_ITEMS_SHOWN, Report, fit_pages, live_progress, usage_of, view_task, wait_counting,
                    wait_reporting_progress)

MAX_PAGE_BYTES = 65536
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_TASK_IDS = 256
"""Ids in one task_output or cancel_task call (after removing repeats): keeps every answer bounded."""
MAX_GROUP_COMMANDS = 1000
"""Commands in one fan-out (``launch_task(commands=...)``)."""
SHARED_ANSWER_BYTES = 48 * 1024
"""Output one answer about several tasks (a group, or ``task_ids``) shows over all of them, each at least
`MIN_SHARE_BYTES`, so the answer stays within `INLINE_ANSWER_CHARS`: 40 test shards at 16 KiB each made
650 KB, which Claude Code would show its model only the start of."""
MIN_SHARE_BYTES = 128

INLINE_ANSWER_CHARS = 100_000
"""Up to this many characters, Claude Code is asked to show a tool's answer to its model whole
(``_meta["anthropic/maxResultSizeChars"]`` of the tool in ``tools/list``). Without it, Claude Code
saves an answer of over 50,000 characters to a file and shows the model its first 2 KB: a page of
64 KiB of output the agent asked for, or a 300-command fan-out's answer, reached the model as the
start of a JSON document (a 10,000-item queue's plan page is close, 49 KB; a long list_tasks page or
a group's cancel answer can pass it). These answers are sized by their own arguments (``max_bytes``,
``limit``, a plan's page, the commands given); past this size, a file and a preview serve an agent
better than the whole answer in its context (a group of over about 340 members: Claude Code's
preview then shows the group's status and counts, which come first)."""

ANSWER_FIELDS_CHARS = 2_000
"""Room kept beside an answer's task views for its own fields (retrieval_status, status, counts...):
the views of an answer fit ``INLINE_ANSWER_CHARS`` less this (``views.fit_pages``)."""

LARGE_ANSWERS = {"anthropic/maxResultSizeChars": INLINE_ANSWER_CHARS}
"""The ``meta`` of the tools whose answers can pass Claude Code's 50,000 characters (see above)."""


def shared_page_bytes(asked: int, tasks: int) -> int:
    """Output per task in an answer about several: what was asked, within its share of `SHARED_ANSWER_BYTES`."""
    return min(asked, max(MIN_SHARE_BYTES, SHARED_ANSWER_BYTES // max(tasks, 1)))


P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

_MADE: dict[CodeType, Tool] = {}
"""Each tool as ``Tool.from_function`` made it, by the code of its function (see ``tool``)."""


def tool(into: list[Tool], **options: Any) -> Callable[[F], F]:
    """``MCPServer.tool`` for a server not made yet: the tool goes in ``into`` (the server's ``tools=``).

    ``Tool.from_function`` (the arguments' model, the input and output JSON schemas) costs some 50 ms of
    CPU per tool, for every server built: half a second per server, which a test suite starting
    thousands of servers paid again and again. It runs once per tool per process here; every server
    gets a copy bound to its own function, which has the same code, hence the same schemas. The output
    schemas are ``simplify``-ed, and their titles dropped, once, when made."""

    def register(fn: F) -> F:
        code = inspect.unwrap(fn).__code__
        made = _MADE.get(code)
        if made is None:
            # the docstring's indentation would reach the model on every turn (Claude Code sends each tool's
            # description with every request)
            made = Tool.from_function(fn, description=inspect.cleandoc(fn.__doc__ or ""), **options)
            simplify(made.parameters)
            drop_titles(made.parameters)
            if made.output_schema is not None:  # (the SDK keeps it on the tool's metadata)
                simplify(made.fn_metadata.output_schema)
                drop_titles(made.fn_metadata.output_schema)
            _MADE[code] = made
        into.append(made.model_copy(update={"fn": fn}))
        return fn

    return register


def _tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn our own errors into tool errors carrying their message."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except AgentParallelError as exc:
            raise ToolError(str(exc)) from exc

    return wrapper


def task_tools() -> list[Tool]:
    """launch_task, task_output, cancel_task and list_tasks, for a new server."""
    tools: list[Tool] = []

    @tool(tools, title="Launch a background task", meta=LARGE_ANSWERS,
          annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                      open_world_hint=True))
    @_tool_errors
    async def launch_task(
        ctx: Context,
        command: Annotated[str | None, Field(description="shell command, run with /bin/sh -c")] = None,
        commands: Annotated[list[str] | None, Field(description="several shell commands started as one group (a fan-out), at most `max_parallel` at once; the answer's task_id is the group's id")] = None,
        max_parallel: Annotated[int | None, Field(description="with `commands`: at most this many run at once (default: the config's max_parallel)")] = None,
        item: Annotated[str | None, Field(description="a queue item id (e.g. '007') to claim and run instead of a command")] = None,
        description: Annotated[str | None, Field(description="a few words saying what the task is for")] = None,
        cwd: Annotated[str | None, Field(description="working directory, relative to the workspace root (default: the root)")] = None,
        env: Annotated[dict[str, str] | None, Field(description="extra environment variables")] = None,
        timeout_s: Annotated[float | None, Field(description="kill the task and everything it started after this many seconds")] = None,
        after: Annotated[list[str] | None, Field(description="task ids that must complete successfully first; if one fails, this task ends as 'skipped'")] = None,
        run_in_background: Annotated[bool, Field(description="false: wait for the end (up to the wait cap) and answer like task_output")] = True,
    ) -> LaunchResult:
        """Start a shell command (or a queue item) in the background and answer at once with its task_id
        (status `queued` while its process starts, `running` a moment later).

        Use it for anything that takes more than a few seconds (builds, test suites, servers,
        long scripts) and to run independent steps in parallel: launch them all, then call
        task_output(task_ids=[...], wait="all"). Many similar commands (test shards, files to
        process) go in one call: commands=[...] with max_parallel=N starts them as a group and
        answers with its group_id and task_ids; task_output, cancel_task and list_tasks take the
        group_id like a task id. Chain dependent steps with `after`; each step gets
        its predecessors' log paths in AGENT_UPSTREAM_LOGS. Output (stdout and stderr) goes to a
        log; read it with task_output. stdin is /dev/null, so interactive commands will not wait for input.
        """
        ws = workspace_of(ctx)
        given = [name for name, value in (("command", command), ("commands", commands), ("item", item))
                 if value is not None]
        if len(given) != 1:
            raise UsageError("give exactly one of `command` (a shell command), `commands` (several, as one group) "
                             f"or `item` (a queue item id), not {' and '.join(given) if given else 'none'}")
        if max_parallel is not None and commands is None:
            raise UsageError("`max_parallel` applies to `commands` (a group) only; a queue run takes its own "
                             "(run_queue(max_parallel=...))")
        if item is not None:
            if cwd is not None or env or after or timeout_s is not None:
                raise UsageError("`cwd`, `env`, `after` and `timeout_s` apply to commands only; an item runs in "
                                 "the workspace root with its own `timeout` and waits on its `blocked_by` items")
            task = await _launch_item(ws, item)
            return await _launch_answer(ws, task, run_in_background)
        # every argument is checked before anything starts: an error after the start invites a retry (a second run);
        # strings bound for the process (command, env) are checked by registry.launch, before it registers anything
        if commands is not None:
            _check_commands(commands)
            slots = max_parallel_for(max_parallel, load_config(ws.root)[0])
        elif command is None or not command.strip():
            raise UsageError("`command` is empty; give the shell command to run, e.g. \"make test\"")
        timeout_s = _check_timeout(timeout_s, "timeout_s")
        _check_text("cwd", cwd)
        workdir = resolve_inside(ws.root, cwd, "cwd") if cwd else ws.root  # (the root is resolved already)
        if not workdir.is_dir():
            raise UsageError(f"cwd {short_repr(cwd, 200)} is not a directory inside the workspace; create it or pick another")
        if after and len(after) > MAX_TASK_IDS:
            raise UsageError(f"`after` names {len(after)} tasks; at most {MAX_TASK_IDS} are accepted")
        for task_id in after or []:
            ws.registry.get(task_id)
        if commands is not None:
            group_id, members = await ws.registry.launch_group(
                commands, max_parallel=slots, cwd=workdir, description=description, env=env, timeout_s=timeout_s,
                after=after)
            return await _group_answer(ws, group_id, members, run_in_background, ctx.report_progress)
        # answered once the task's record is written, its start under way (status `queued` for a moment):
        # the answer does not wait for the fork and exec, which cost more than the rest of the call
        task = await ws.registry.launch(command=command, cwd=workdir, description=description, env=env,
                                        timeout_s=timeout_s, after=after, answer_at_once=True)
        return await _launch_answer(ws, task, run_in_background)

    @tool(tools, title="Read task output / wait for tasks", meta=LARGE_ANSWERS,
          annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    @_tool_errors
    async def task_output(
        ctx: Context,
        task_id: Annotated[str | None, Field(description="one task id (or a group_id: its members, as with task_ids)")] = None,
        task_ids: Annotated[list[str] | None, Field(description="several task ids (see `wait`)")] = None,
        block: Annotated[bool, Field(description="wait for the task(s) to finish (up to `timeout`)")] = True,
        timeout: Annotated[float, Field(description="seconds to wait when blocking; clamped to the server's wait cap (default 50)")] = 30,
        wait: Annotated[Literal["all", "any"], Field(description="with several ids: return when all, or any one, have finished")] = "all",
        cursor: Annotated[int | None, Field(description="byte offset to read from (0 = start; pass back next_cursor); omit for the most recent output")] = None,
        max_bytes: Annotated[int, Field(description="at most this many bytes of output per task (1 to 65536); several tasks share 48 KiB in all (each at least 128 bytes); a page comes shorter if its JSON would pass 100,000 characters")] = 16384,
        tail_lines: Annotated[int | None, Field(description="only the last N lines of the selected output")] = None,
        filter: Annotated[str | None, Field(description="a regular expression: only output lines that match")] = None,
        status: Annotated[list[str] | None, Field(description="with several tasks: only the entries of those in these states, e.g. ['failed', 'timed_out'] (`counts` still counts them all)")] = None,
    ) -> TaskOutputResult:
        """Get the status and output of one or several background tasks, optionally waiting for them.

        With block=true (the default) it waits until the task finishes, or for several ids until
        all (wait="all") or any (wait="any") have finished, at most `timeout` seconds. A timeout
        is not an error: you get the current snapshot with retrieval_status="timeout"; call again
        to keep waiting. With block=false it answers at once (retrieval_status="not_ready" while
        running). By default you see the most recent output; page from the start with cursor=0
        and then the returned next_cursor. With task_id the task's fields are at the top level;
        with task_ids (or a group_id) there is one entry per task in `tasks`, after `counts` (how many
        are in each status); status=["failed", "timed_out"] keeps only the entries of those that did not
        make it (and gives their output the room the others had).
        """
        ws = workspace_of(ctx)
        if (task_id is None) == (not task_ids):
            raise UsageError("give `task_id` (one task) or `task_ids` (several), not both or neither; "
                             "call list_tasks to see task ids")
        tasks = ws.registry.resolve(_task_ids(task_id, task_ids))
        if len(tasks) > MAX_GROUP_COMMANDS:
            raise UsageError(f"these ids name {len(tasks):,} tasks (groups count all their members); at most "
                             f"{MAX_GROUP_COMMANDS} are read per call: split them over several calls")
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
        group_id = task_id if task_id is not None and is_group_id(task_id) else None
        several = task_id is None or group_id is not None
        wanted = _statuses(status)
        if wanted and not several:
            raise UsageError("`status` picks among several tasks (task_ids or a group_id); with one task_id, "
                             "leave it out")
        timeout = min(timeout, ws.settings.wait_cap_s)
        if block:
            done = await wait_reporting_progress(ws, tasks, wait, timeout, ctx)
            retrieval = "success" if done else "timeout"
        else:
            finished = [t.done.is_set() for t in tasks]
            retrieval = "success" if (all(finished) if wait == "all" else any(finished)) else "not_ready"
        live = live_progress(tasks)
        shown = [t for t in tasks if t.record.status in wanted] if wanted else tasks
        if several:  # a group may hold up to MAX_GROUP_COMMANDS tasks: the answer stays bounded
            max_bytes = shared_page_bytes(max_bytes, len(shown))

        room = INLINE_ANSWER_CHARS - ANSWER_FIELDS_CHARS

        def read_one() -> TaskView:
            return fit_pages(lambda page: [view_task(ws, tasks[0], cursor=cursor, max_bytes=page, tail_lines=tail_lines,
                                                     pattern=pattern, live_run=live.get(tasks[0].record.task_id))],
                             max_bytes, room)[0]

        def read_all() -> list[TaskEntry]:
            return fit_pages(lambda page: [view_task(ws, t, cursor=cursor, max_bytes=page, tail_lines=tail_lines,
                                                     pattern=pattern, several=True, live_run=live.get(t.record.task_id))
                                           for t in shown],
                             max_bytes, room)

        # logs are read (and a filter matched, within its time budget) off the event loop: other calls go on
        if not several:
            view = await anyio.to_thread.run_sync(read_one)
            return TaskOutputResult(**view.model_dump(), retrieval_status=retrieval)
        entries = await anyio.to_thread.run_sync(read_all)
        return TaskOutputResult(retrieval_status=retrieval, tasks=entries, group_id=group_id,
                                status=group_status([t.record for t in tasks]) if group_id else None,
                                counts=status_counts(t.record.status for t in tasks))

    @tool(tools, title="Cancel tasks", meta=LARGE_ANSWERS,
          annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                      open_world_hint=False))
    @_tool_errors
    async def cancel_task(
        ctx: Context,
        task_id: Annotated[str | None, Field(description="the task to stop (or a group_id: all its members)")] = None,
        task_ids: Annotated[list[str] | None, Field(description="several tasks to stop")] = None,
    ) -> CancelResult:
        """Stop a background task and every process it started (TERM, a short grace, then KILL).

        Answers once nothing of the task is left running, with its final status. Cancelling a
        task that already finished changes nothing and says so. A task waiting in a pipeline
        (`after`) is cancelled before it starts.
        """
        ws = workspace_of(ctx)
        if (task_id is None) == (not task_ids):
            raise UsageError("give `task_id` or `task_ids`, not both or neither; call list_tasks to see task ids")
        tasks = ws.registry.resolve(_task_ids(task_id, task_ids))
        stopped: list[bool] = [False] * len(tasks)

        async def stop(i: int) -> None:
            stopped[i] = await ws.registry.cancel(tasks[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(tasks)):
                tg.start_soon(stop, i)
        parts = [f"{t.record.task_id}: {'cancelled' if s else f'already {t.record.status.value}, nothing to do'}"
                 for t, s in zip(tasks, stopped, strict=True)]
        return CancelResult(message="; ".join(parts), tasks=[TaskEntry.of(t.record) for t in tasks])

    @tool(tools, title="List tasks", meta=LARGE_ANSWERS,
          annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    @_tool_errors
    async def list_tasks(
        ctx: Context,
        status: Annotated[list[str] | None, Field(description="only tasks in these states, e.g. ['running']")] = None,
        limit: Annotated[int, Field(description="at most this many, newest first (1 to 1000)")] = 50,
        offset: Annotated[int, Field(description="skip this many (the next page: offset + limit)")] = 0,
        group_id: Annotated[str | None, Field(description="only the members of this group (launch_task(commands=...))")] = None,
    ) -> TaskList:
        """List recent background tasks, newest first, with status, exit code, duration and last output line.

        Use it to find task ids you lost track of, or to see what is still running; then read one
        with task_output or stop it with cancel_task.
        """
        ws = workspace_of(ctx)
        wanted = _statuses(status)
        if not 1 <= limit <= 1000:
            raise UsageError(f"limit must be between 1 and 1000 (got {limit})")
        if offset < 0:
            raise UsageError(f"offset must be >= 0 (got {offset})")
        members = {t.record.task_id for t in ws.registry.group(group_id)} if group_id is not None else None
        page, total = ws.registry.list(wanted or None, limit=limit, offset=offset, among=members)

        def rows() -> list[TaskSummary]:  # last lines may come from the logs: read off the event loop
            return [TaskSummary.of(t.record, last_line=ws.registry.last_line(t), usage=usage_of(t)) for t in page]

        return TaskList(total=total, tasks=await anyio.to_thread.run_sync(rows))

    return tools


def _statuses(status: list[str] | None) -> set[str]:
    """The task statuses a call names (list_tasks' and task_output's `status`), each checked."""
    known = {s.value for s in TaskStatus}
    wanted = set(status or [])
    if wanted - known:
        unknown = sorted(wanted - known)
        shown = first_few([short_repr(s) for s in unknown[:5]], 5, total=len(unknown))
        raise UsageError(f"unknown status [{shown}]; use some of: {', '.join(sorted(known))}")
    return wanted


def _check_commands(commands: list[str]) -> None:
    if not commands:
        raise UsageError("`commands` is empty; give the shell commands to run, e.g. [\"pytest shard1\", \"pytest shard2\"]")
    if len(commands) > MAX_GROUP_COMMANDS:
        raise UsageError(f"`commands` holds {len(commands):,} commands; at most {MAX_GROUP_COMMANDS} start as one "
                         "group: split them over several calls")
    for i, one in enumerate(commands):
        if not one.strip():
            raise UsageError(f"commands[{i}] is empty; every command must be a shell command to run")


async def _group_answer(ws: Workspace, group_id: str, members: list[Task], run_in_background: bool,
                        report: Report) -> LaunchResult:
    """A fan-out's answer: the group id (as ``task_id`` and ``group_id``), its members' ids, and,
    having waited (reporting how many finished), every member's state and recent output (as
    ``task_output`` on the group)."""
    first = members[0].record
    done: bool | None = None
    tasks: list[TaskEntry] | None = None
    if not run_in_background:
        done = await wait_counting(ws.registry, members, ws.settings.wait_cap_s, report)
        room = INLINE_ANSWER_CHARS - ANSWER_FIELDS_CHARS - sum(len(t.record.task_id) + 3 for t in members)  # task_ids
        tasks = await anyio.to_thread.run_sync(lambda: fit_pages(lambda page: [
            view_task(ws, t, cursor=None, max_bytes=page, tail_lines=None, pattern=None, several=True)
            for t in members], shared_page_bytes(16384, len(members)), room))
    shown = first_few([cut(first.command, 200)], 1, total=len(members))
    return LaunchResult(task_id=group_id, group_id=group_id, task_ids=[t.record.task_id for t in members],
                        status=group_status([t.record for t in members]), command=shown, cwd=first.cwd,
                        description=first.description, created_at=iso(first.created_at), tasks=tasks,
                        counts=None if tasks is None else status_counts(t.record.status for t in members),
                        retrieval_status=None if done is None else "success" if done else "timeout")


async def _launch_answer(ws: Workspace, task: Task, run_in_background: bool) -> LaunchResult:
    if run_in_background:
        return LaunchResult.of(task.record)
    done = await ws.registry.wait([task], mode="all", timeout=ws.settings.wait_cap_s)
    view = await anyio.to_thread.run_sync(lambda: fit_pages(
        lambda page: [view_task(ws, task, cursor=None, max_bytes=page, tail_lines=None, pattern=None)], 16384,
        INLINE_ANSWER_CHARS - ANSWER_FIELDS_CHARS)[0])
    return LaunchResult(**view.model_dump(), retrieval_status="success" if done else "timeout")


async def _launch_item(ws: Workspace, item: str) -> Task:
    _check_text("item", item)
    item_id = parse_item_id(item)
    queue = await anyio.to_thread.run_sync(ws.queue)
    graph = await anyio.to_thread.run_sync(lambda: queue.item_graph(item_id))
    task, _ = await launch_item(queue, graph, check_ready(graph, item_id), by="launch_task")
    return task


def queue_tools(root: Path, reader: QueueReader) -> list[Tool]:
    """queue_plan, run_queue and update_item for a new server of the workspace ``root``."""
    tools: list[Tool] = []

    @tool(tools, title="Plan the work queue", meta=LARGE_ANSWERS,
          annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    @_tool_errors
    async def queue_plan(
        ctx: Context,
        queue_dir: Annotated[str | None, Field(description="queue directory inside the workspace (default .agent/queue)")] = None,
        max_parallel: Annotated[int | None, Field(description="slots to plan for (default: autonomy.max_parallel, else 5)")] = None,
        offset: Annotated[int, Field(description="first row of `items` to return (0 = the first; pass back next_offset for the next page)")] = 0,
        limit: Annotated[int, Field(description=f"at most this many rows of `items` (1 to {MAX_PAGE_ITEMS})")] = PAGE_ITEMS,
    ) -> QueuePlanPage:
        """Read the work queue (.agent/queue/NNN-STATUS-slug.md files) and say what can run now and in what order.

        Checks every item: dependencies (blocked_by/blocks), cycles (printed as paths), references
        to missing ids, duplicate ids, and which items conflict because they touch the same files
        or components (those never run together). Returns `run_now` (ids to start now, best
        first), the predicted `waves`, the `critical_path`, `conflicts`, fork-join and pipeline
        `patterns`, `errors`/`warnings` naming file and field, the predicted makespan beside its
        lower bound, and a Mermaid flowchart. Call it before run_queue, or to pick items to
        launch yourself with launch_task(item=...).

        `items` comes in pages of `limit` rows (default 100; fewer if 100,000 characters would not hold them): `total_items` counts them all and
        `next_offset` (null on the last page) is the `offset` of the next page; `conflicts`,
        `conflict_groups` and `patterns` then cover the page's items, everything else the whole
        queue. `waves` lists the first 100 waves (`waves_total` counts them all).
        """
        _check_text("queue_dir", queue_dir)
        return await anyio.to_thread.run_sync(
            lambda: plan_page(root, queue_dir, max_parallel, reader, offset=offset, limit=limit,
                              fit_chars=INLINE_ANSWER_CHARS))

    @tool(tools, title="Run the work queue",
          annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                      open_world_hint=True))
    @_tool_errors
    async def run_queue(
        ctx: Context,
        max_parallel: Annotated[int | None, Field(description="items at once, 1..64 (default from config)")] = None,
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
        ws = workspace_of(ctx)
        for item in items or []:
            _check_text("items", item)
        queue = await anyio.to_thread.run_sync(ws.queue)
        task, warnings = await start_run(queue, max_parallel=max_parallel, level=level,
                                         continue_on_error=continue_on_error, items=items)
        run = run_of(task)
        assert run is not None
        planned = [run.graph.label(i) for i in run.members[:MAX_RUN_ITEMS_SHOWN]]
        total = len(run.members)
        return RunStarted(
            run_id=task.record.task_id, status=task.record.status, level=run.options.level,
            continue_on_error=run.options.continue_on_error, max_parallel=run.options.max_parallel, items=planned,
            items_total=total if total > len(planned) else None, predicted_makespan=run.predicted,
            lower_bound=run.lower_bound, warnings=warnings,
            message=(f"run {task.record.task_id} started with {total} item(s) to consider; "
                     f"follow it with task_output(task_id=\"{task.record.task_id}\")") if planned else
                    f"nothing to run: no pending item is ready or waiting (run {task.record.task_id} ends at once)")

    @tool(tools, title="Update a queue item's status",
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
        ws = workspace_of(ctx)
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

    return tools


def register_queue_resource(server: MCPServer, root: Path, reader: QueueReader) -> None:
    @server.resource("queue://plan", mime_type="application/json", title="Queue plan")
    async def queue_plan_resource() -> str:
        """The current plan of the workspace's queue (what queue_plan returns with its defaults: the first page of items)."""
        # our errors (e.g. no queue directory) reach the client as the SDK's resource error: see AgentParallelServer
        return (await anyio.to_thread.run_sync(lambda: plan_page(root, None, None, reader))).model_dump_json()


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
