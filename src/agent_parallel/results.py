"""The shapes the MCP tools answer with (published as each tool's ``outputSchema``).

Times are ISO 8601 strings in UTC; ids and field names follow ``TOOLS.md``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, Self, overload

from pydantic import BaseModel, Field

from .tasks.records import TaskRecord, TaskStatus
from .text import cut

RetrievalStatus = Literal["success", "timeout", "not_ready"]


SHORT_TEXT_CHARS = 300
"""A command or description shown among many (list_tasks rows, several tasks) is cut to this."""


@overload
def iso(ts: float) -> str: ...
@overload
def iso(ts: float | None) -> str | None: ...
def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _TaskDetails(BaseModel):
    """A task's fields that may be absent (not started yet, not ended yet, no output asked for ...)."""

    description: str | None = None
    item_id: str | None = None
    item_file: str | None = None
    started_at: str | None = Field(None, description="absent until the task starts (a task that never ran has none)")
    ended_at: str | None = None
    duration_s: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    reason: str | None = Field(None, description="why the task ended the way it did, when that is not plain success")
    output: str | None = Field(None, description="output text (stdout and stderr interleaved); invalid UTF-8 replaced")
    cursor: int | None = Field(None, description="byte offset where `output` starts")
    next_cursor: int | None = Field(None, description="pass back as `cursor` to read what follows")
    output_bytes: int | None = Field(None, description="total bytes the task has produced")
    truncated: bool | None = Field(None, description="true when output exists that `output` does not show")
    dropped_bytes: int | None = Field(None, description="bytes no longer kept because the log cap was reached")
    run: RunProgress | None = Field(None, description="for a run_queue run: progress, and the report once finished")


class TaskView(_TaskDetails):
    """One task's state and (a page of) its output."""

    task_id: str
    status: TaskStatus
    command: str
    cwd: str
    created_at: str

    @classmethod
    def of(cls, rec: TaskRecord, *, short: bool = False, **extra: object) -> Self:
        """``short``: one of several tasks, so the command and description are cut (task_output with
        the one task_id shows them whole)."""
        description, command = rec.description, rec.command
        if short:
            description = cut(description, SHORT_TEXT_CHARS) if description is not None else None
            command = cut(command, SHORT_TEXT_CHARS)
        return cls(task_id=rec.task_id, status=rec.status, description=description, command=command,
                   cwd=rec.cwd, item_id=rec.item_id, item_file=rec.item_file, created_at=iso(rec.created_at),
                   started_at=iso(rec.started_at), ended_at=iso(rec.ended_at), duration_s=rec.duration_s,
                   exit_code=rec.exit_code, signal=rec.signal, reason=rec.reason, **extra)


class LaunchResult(TaskView):
    """``launch_task``'s answer. With ``run_in_background=false`` it also carries what ``task_output`` would.

    For a fan-out (``commands``), ``task_id`` is the group's id (``task_output``, ``cancel_task``
    and ``list_tasks`` take it like a task id), ``status`` the group's, and ``task_ids`` its members."""

    retrieval_status: RetrievalStatus | None = None
    group_id: str | None = Field(None, description="for `commands`: the group's id (also in task_id)")
    task_ids: list[str] | None = Field(None, description="for `commands`: each command's task id, in the order given")
    tasks: list[TaskView] | None = Field(None, description="for `commands` with run_in_background=false: each member")


class TaskOutputResult(_TaskDetails):
    """``task_output``'s answer: with ``task_id``, the task's fields at the top level; with
    ``task_ids``, one entry per task in ``tasks`` (and no task fields at the top level)."""

    retrieval_status: RetrievalStatus
    task_id: str | None = Field(None, description="with `task_id`: the task")
    status: TaskStatus | None = Field(None, description="with `task_id`: the task's status")
    command: str | None = None
    cwd: str | None = None
    created_at: str | None = None
    tasks: list[TaskView] | None = Field(None, description="with `task_ids`: one entry per task, in the order given")
    group_id: str | None = Field(None, description="with a group_id as `task_id`: the group (its members in `tasks`)")


class CancelResult(BaseModel):
    tasks: list[TaskView]
    message: str


class TaskSummary(BaseModel):
    task_id: str
    status: TaskStatus
    description: str | None
    command: str = Field(description=f"cut to {SHORT_TEXT_CHARS} characters (saying so); task_output shows it whole")
    exit_code: int | None
    signal: str | None
    created_at: str
    duration_s: float | None
    last_line: str | None

    @classmethod
    def of(cls, rec: TaskRecord, *, last_line: str | None) -> TaskSummary:
        return cls(task_id=rec.task_id, status=rec.status,
                   description=cut(rec.description, SHORT_TEXT_CHARS) if rec.description is not None else None,
                   command=cut(rec.command, SHORT_TEXT_CHARS), exit_code=rec.exit_code, signal=rec.signal,
                   created_at=iso(rec.created_at), duration_s=rec.duration_s, last_line=last_line)


class TaskList(BaseModel):
    tasks: list[TaskSummary]
    total: int = Field(description="tasks matching the filter, before `limit`")


Phase = Literal["setup", "running", "integrating", "integrated", "conflict"]


class RunningItem(BaseModel):
    item: str
    title: str
    task_id: str
    elapsed_s: float
    phase: Phase | None = Field(None, description="an isolated item's phase (runner.isolation: worktree)")
    branch: str | None = None
    worktree: str | None = None
    conflicts: list[str] | None = Field(None, description="files predicted to conflict with the target as it is now")
    integration_s: float | None = None


class ItemOutcome(BaseModel):
    """How one item of a run ended (fork-join aggregation: every item's result in one place)."""

    item: str
    title: str
    outcome: Literal["completed", "failed", "skipped", "not_started", "claimed_elsewhere"]
    task_id: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    waited_on: str | None = Field(None, description="for skipped items: the failed item they (transitively) wait on")
    duration_s: float | None = None
    started_at: float | None = Field(None, description="Unix time the item's task started")
    ended_at: float | None = Field(None, description="Unix time the item's task ended")
    last_lines: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="what happened to the item file during the run")
    phase: Phase | None = Field(None, description="an isolated item's last phase: integrated, conflict ...")
    branch: str | None = None
    worktree: str | None = None
    conflicts: list[str] | None = Field(None, description="files that conflicted when integrating it")
    integration_s: float | None = Field(None, description="seconds its integration took")


class RunProgress(BaseModel):
    """A queue run: live counts while it runs, and the full report at the end."""

    run_id: str
    level: str
    continue_on_error: bool
    max_parallel: int
    state: Literal["running", "stopping", "finished"]
    elapsed_s: float
    counts: dict[str, int] = Field(description="items by outcome so far: running, completed, failed, skipped, not_started ...")
    running: list[RunningItem]
    held: str | None = Field(None, description="why no new item is starting right now (memory, load), if so")
    stop_reason: str | None = None
    predicted_makespan: float = Field(description="the plan's predicted makespan (s) at the start of the run")
    lower_bound: float = Field(description="the plan's lower bound (s): no schedule can finish faster")
    makespan: float | None = Field(None, description="achieved: from the first start to the last end (s)")
    outcomes: list[ItemOutcome] = Field(default_factory=list, description="every item of the run (the report, once finished)")

    def counts_text(self) -> str:
        """THE counts text, wherever a run is summed up: ``1 completed, 1 failed, 2 running`` (outcomes
        in name order, zeros left out), or ``no items``."""
        return ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()) if n) or "no items"


class RunStarted(BaseModel):
    """``run_queue``'s answer: the run's id (a task id) and what it is about to do."""

    run_id: str
    status: TaskStatus
    level: str
    continue_on_error: bool
    max_parallel: int
    items: list[str] = Field(description="the pending items this run will consider, best-ranked first")
    predicted_makespan: float
    lower_bound: float
    warnings: list[str] = Field(default_factory=list)
    message: str


class ItemMoved(BaseModel):
    """``update_item``'s answer."""

    item: str
    previous_status: str
    status: str
    file: str
    message: str
    warnings: list[str] = Field(default_factory=list, description="claims of servers that no longer run, given back first")


for _model in (_TaskDetails, TaskView, LaunchResult, TaskOutputResult, CancelResult):
    _model.model_rebuild()
