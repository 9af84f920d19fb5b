"""The task resources (``task://{id}``, ``task://{id}/output``) and their subscriptions
(``resources/updated`` while a client listens)."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated, ServerEvent

from ..errors import UnknownTask
from ..tasks.registry import Task, TaskRegistry
from .settings import workspace_of
from .tools import MAX_TASK_IDS
from .views import live_progress, view_task

RESOURCE_OUTPUT_BYTES = 1 << 20
UPDATE_INTERVAL_S = 0.2
"""How often resource subscribers' tasks are checked for a status change."""
OUTPUT_UPDATE_INTERVAL_S = 1.0
"""At most one resources/updated per task for growing output in this time."""


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


def register_task_resources(server: MCPServer) -> None:
    @server.resource("task://{task_id}", mime_type="application/json", title="Task record")
    async def task_record(task_id: str, ctx: Context) -> str:
        """A task's record: command, status, times, exit code, output size."""
        ws, task = workspace_of(ctx), _resource_task(ctx, task_id)
        live = live_progress([task])
        view = await anyio.to_thread.run_sync(lambda: view_task(ws, task, cursor=None, max_bytes=1, tail_lines=0,
                                                                 pattern=None, live_run=live.get(task_id)))
        return view.model_dump_json(exclude={"output", "cursor", "next_cursor"})

    @server.resource("task://{task_id}/output", mime_type="text/plain", title="Task output")
    async def task_log(task_id: str, ctx: Context) -> str:
        """A task's output (the most recent 1 MiB when it is longer)."""
        reader = workspace_of(ctx).registry.reader(_resource_task(ctx, task_id))
        return await anyio.to_thread.run_sync(lambda: reader.read(None, RESOURCE_OUTPUT_BYTES).text)


def _resource_task(ctx: Context, task_id: str) -> Task:
    try:
        return workspace_of(ctx).registry.get(task_id)
    except UnknownTask as exc:
        raise ResourceNotFoundError(str(exc)) from exc
