"""The shapes the MCP tools answer with (published as each tool's ``outputSchema``).

Times are ISO 8601 strings in UTC; ids and field names follow ``TOOLS.md``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal, Self, overload

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from .fields import omitted_if_empty, omitted_if_none
from .tasks.records import Phase, TaskRecord, TaskStatus
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


AgentError = Literal["rate_limited", "overloaded", "auth", "max_turns", "other"]


class AgentUsage(BaseModel):
    """What an agent item's CLI reported in its event stream (``agents/stream.py`` reads it): its
    session, turns, tokens and cost, its final text and, when it failed, an error class. Summed over
    an item's attempts and resumes, and over a run's items (``total``)."""

    agent: str | None = None
    session_id: str | None = Field(None, description="the CLI's session (thread) id: what a resume continues")
    turns: int = 0
    input_tokens: int = Field(0, description="input tokens not read from a cache")
    output_tokens: int = 0
    cached_tokens: int = Field(0, description="input tokens read from the prompt cache")
    cost_usd: float | None = Field(None, description="as the CLI reports it (Claude Code does; Codex and Gemini do not)")
    result: str | None = Field(None, description="the agent's final text (its last 4000 characters)")
    error: AgentError | None = omitted_if_none()
    error_message: str | None = omitted_if_none()
    resets_at: str | None = omitted_if_none("for rate_limited: when the CLI said the limit resets")
    attempts: int | None = omitted_if_none("runs of the item (retries) when more than one was allowed")
    resumes: int = Field(0, description="times a rate-limited session was resumed")

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cached_tokens

    @classmethod
    def total(cls, parts: Iterable[AgentUsage | None]) -> AgentUsage | None:
        """The sum of ``parts`` (turns, tokens, cost; the rest is per item), None when there are none."""
        kept = [p for p in parts if p is not None]
        if not kept:
            return None
        costs = [p.cost_usd for p in kept if p.cost_usd is not None]
        return cls(turns=sum(p.turns for p in kept), input_tokens=sum(p.input_tokens for p in kept),
                   output_tokens=sum(p.output_tokens for p in kept), cached_tokens=sum(p.cached_tokens for p in kept),
                   cost_usd=round(sum(costs), 6) if costs else None, resumes=sum(p.resumes for p in kept))

    def short(self) -> str:
        """``$0.42, 7 turns, 12.3k tokens``: one line for tables and reports."""
        parts = [f"${self.cost_usd:.2f}"] if self.cost_usd is not None else []
        parts.append(f"{self.turns} turn{'s' if self.turns != 1 else ''}")
        parts.append(f"{_count(self.input_tokens)} in, {_count(self.output_tokens)} out, {_count(self.cached_tokens)} cached")
        if self.attempts and self.attempts > 1:
            parts.append(f"{self.attempts} attempts")
        if self.resumes:
            parts.append(f"resumed {self.resumes}x")
        return ", ".join(parts)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


class Tokens(BaseModel):
    """An agent item's tokens, as TOOLS.md names them (``usage`` has the same figures)."""

    input: int = Field(description="input tokens not read from a cache")
    output: int
    cached: int = Field(description="input tokens read from the prompt cache")


class _Spend(BaseModel):
    """Tokens and cost under the names TOOLS.md gives them: the figures of ``usage`` (which also has the
    agent, its final text, resumes). Derived from ``usage`` when a model is made, so no caller can set
    one without the other (a report kept by an older server gets them when read); left out while unset."""

    tokens: Tokens | None = omitted_if_none()
    cost_usd: float | None = omitted_if_none()

    @model_validator(mode="before")
    @classmethod
    def _from_usage(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("usage") is not None and "tokens" not in data:
            usage = data["usage"]
            if not isinstance(usage, AgentUsage):
                usage = AgentUsage.model_validate(usage)
            derived = {"tokens": Tokens(input=usage.input_tokens, output=usage.output_tokens, cached=usage.cached_tokens),
                       "cost_usd": usage.cost_usd, "session_id": usage.session_id, "turns": usage.turns,
                       "error_class": usage.error, "resets_at": usage.resets_at, "attempts": usage.attempts}
            data = {**{key: value for key, value in derived.items() if key in cls.model_fields}, **data}
        return data


class _AgentFields(_Spend):
    """An agent item's session and usage at the top level, as TOOLS.md names them (see `_Spend`)."""

    session_id: str | None = omitted_if_none()
    turns: int | None = omitted_if_none()
    error_class: AgentError | None = omitted_if_none()
    resets_at: str | None = omitted_if_none()
    attempts: int | None = omitted_if_none()


def usage_from(data: object) -> AgentUsage | None:
    """A record's stored usage (untrusted: a loaded record may hold anything), or None."""
    if not isinstance(data, dict):
        return None
    try:
        return AgentUsage.model_validate(data)
    except ValueError:
        return None


class _TaskDetails(_AgentFields):
    """A task's fields that may be absent (not started yet, not ended yet, no output asked for ...)."""

    description: str | None = None
    item_id: str | None = omitted_if_none()
    item_file: str | None = omitted_if_none()
    branch: str | None = omitted_if_none("an isolated item's branch (runner.isolation: worktree)")
    worktree: str | None = omitted_if_none("an isolated item's worktree, where it runs")
    phase: Phase | None = omitted_if_none("an isolated item's phase, or the last one it reached")
    conflicts: list[str] | None = omitted_if_none("an isolated item's conflicting files (predicted while it runs)")
    started_at: str | None = Field(None, description="absent until the task starts (a task that never ran has none)")
    ended_at: str | None = None
    duration_s: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    reason: str | None = omitted_if_none("why the task ended the way it did, when that is not plain success")
    output: str | None = Field(None, description="output text (stdout and stderr interleaved); invalid UTF-8 replaced")
    cursor: int | None = omitted_if_none("byte offset where `output` starts")
    next_cursor: int | None = Field(None, description="pass back as `cursor` to read what follows")
    output_bytes: int | None = Field(None, description="total bytes the task has produced")
    truncated: bool | None = Field(None, description="true when output exists that `output` does not show")
    dropped_bytes: int | None = Field(None, description="bytes no longer kept because the log cap was reached")
    run: RunProgress | None = omitted_if_none("for a run_queue run: progress, and the report once finished")
    usage: AgentUsage | None = omitted_if_none("an agent item's session, turns, tokens, cost and error class")


class TaskView(_TaskDetails):
    """One task's state and (a page of) its output."""

    task_id: str
    status: TaskStatus
    command: str
    cwd: str
    created_at: str

    @classmethod
    def of(cls, rec: TaskRecord, **extra: object) -> Self:
        """The task whole (one of several is a `TaskEntry`: its command and description cut)."""
        return cls(description=rec.description, command=rec.command, cwd=rec.cwd, created_at=iso(rec.created_at),
                   **_state_of(rec), **extra)


def _state_of(rec: TaskRecord) -> dict[str, Any]:
    """A record's fields every view of the task shows: who it is, where it stands, how it ended."""
    return dict(task_id=rec.task_id, status=rec.status, item_id=rec.item_id, item_file=rec.item_file,
                branch=rec.branch, worktree=rec.worktree, phase=rec.phase,
                conflicts=rec.conflicts if rec.phase is not None else None, started_at=iso(rec.started_at),
                ended_at=iso(rec.ended_at), duration_s=rec.duration_s, exit_code=rec.exit_code, signal=rec.signal,
                reason=rec.reason)


class TaskEntry(_TaskDetails):
    """One of several tasks in an answer (``task_output`` with ``task_ids`` or a group, a fan-out
    waited for at launch, ``cancel_task``): who it is and how it went, those first, then its output.

    A group's answer holds an entry per member, so what an entry repeats, a client pays for as
    many times (an agent reads it all; Claude Code shows the model an answer of over 50,000
    characters only as a 2 KB preview of a file). An entry leaves out what ``TOOLS.md`` does not
    list for ``task_output`` and the launch already said: the working directory, the creation time
    and a null description (``task_output`` on the one id shows them). The command stays, cut to
    ``SHORT_TEXT_CHARS``: it tells the members apart."""

    task_id: str
    status: TaskStatus
    command: str

    @classmethod
    def of(cls, rec: TaskRecord, **extra: object) -> Self:
        description = cut(rec.description, SHORT_TEXT_CHARS) if rec.description is not None else None
        return cls(description=description, command=cut(rec.command, SHORT_TEXT_CHARS), **_state_of(rec), **extra)

    @model_serializer(mode="wrap")
    def _who_first(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("description", "") is None:
            del data["description"]
        return first_keys(data, _ENTRY_FIRST)


_ENTRY_FIRST = ("task_id", "status", "exit_code", "signal", "reason", "command")


def first_keys(data: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``data`` with ``keys`` (those it has) first, in that order: what a reader of the answer, or of
    its first lines only, needs first (Claude Code shows a long answer's first 2 KB)."""
    ordered = {key: data[key] for key in keys if key in data}
    ordered.update((key, value) for key, value in data.items() if key not in ordered)
    return ordered


_ATTENTION_FIRST = {status: rank for rank, status in enumerate(
    [TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.INTERRUPTED, TaskStatus.CANCELLED, TaskStatus.SKIPPED,
     TaskStatus.RUNNING, TaskStatus.QUEUED, TaskStatus.COMPLETED])}


def status_counts(statuses: Iterable[TaskStatus]) -> dict[str, int]:
    """How many tasks are in each status, what needs a look first ("3 failed, 297 completed")."""
    counts = Counter(statuses)
    return {str(status): counts[status] for status in sorted(counts, key=_ATTENTION_FIRST.__getitem__)}


class LaunchResult(TaskView):
    """``launch_task``'s answer. With ``run_in_background=false`` it also carries what ``task_output`` would.

    For a fan-out (``commands``), ``task_id`` is the group's id (``task_output``, ``cancel_task``
    and ``list_tasks`` take it like a task id), ``status`` the group's, and ``task_ids`` its members."""

    retrieval_status: RetrievalStatus | None = omitted_if_none("with run_in_background=false")
    group_id: str | None = omitted_if_none("for `commands`: the group's id (also in task_id)")
    counts: dict[str, int] | None = omitted_if_none("for `commands` with run_in_background=false: members by status")
    task_ids: list[str] | None = omitted_if_none("for `commands`: each command's task id, in the order given")
    tasks: list[TaskEntry] | None = omitted_if_none("for `commands` with run_in_background=false: each member")

    @model_serializer(mode="wrap")
    def _launched(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A background launch answers before its task ran: the fields only ``task_output`` can fill
        (times, exit, output) are left out instead of sent as nulls; ``description`` stays (TOOLS.md).
        A fan-out waited for has its members' fields in ``tasks``: none stands at the top as a null,
        and the group's state comes before its members."""
        data: dict[str, Any] = handler(self)
        if self.retrieval_status is None or self.group_id is not None:
            data = {key: value for key, value in data.items() if value is not None or key == "description"}
        if self.group_id is not None:
            data = first_keys(data, _GROUP_FIRST)
        return data


_GROUP_FIRST = ("task_id", "group_id", "status", "retrieval_status", "counts")


class TaskOutputResult(_TaskDetails):
    """``task_output``'s answer: with ``task_id``, the task's fields at the top level; with
    ``task_ids``, one entry per task in ``tasks`` (and no task fields at the top level)."""

    retrieval_status: RetrievalStatus
    task_id: str | None = omitted_if_none("with `task_id`: the task")
    status: TaskStatus | None = omitted_if_none("with `task_id`: the task's status")
    command: str | None = omitted_if_none()
    cwd: str | None = omitted_if_none()
    created_at: str | None = omitted_if_none()
    tasks: list[TaskEntry] | None = omitted_if_none("with `task_ids`: one entry per task, in the order given "
                                                    "(with `status`: those in these states)")
    group_id: str | None = omitted_if_none("with a group_id as `task_id`: the group (its members in `tasks`)")
    counts: dict[str, int] | None = omitted_if_none("with `task_ids` or a group: how many tasks are in each status")

    @model_serializer(mode="wrap")
    def _several(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """With several tasks, their fields are in ``tasks`` only: none stands at the top level as a
        null, and the answer's state (``retrieval_status``, the group, ``counts``) comes before them."""
        data: dict[str, Any] = handler(self)
        if self.task_id is None:
            data = first_keys({key: value for key, value in data.items() if value is not None}, _SEVERAL_FIRST)
        return data


_SEVERAL_FIRST = ("retrieval_status", "group_id", "status", "counts")


class CancelResult(BaseModel):
    """``cancel_task``'s answer: what happened, then each task's final state (a group's cancel has an
    entry per member: the message comes first)."""

    message: str
    tasks: list[TaskEntry]


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
    cost_usd: float | None = omitted_if_none("an agent item's cost so far, as its CLI reports it")
    turns: int | None = omitted_if_none("an agent item's turns so far")

    @classmethod
    def of(cls, rec: TaskRecord, *, last_line: str | None, usage: AgentUsage | None = None) -> TaskSummary:
        usage = usage if usage is not None else usage_from(rec.usage)
        return cls(task_id=rec.task_id, status=rec.status,
                   description=cut(rec.description, SHORT_TEXT_CHARS) if rec.description is not None else None,
                   command=cut(rec.command, SHORT_TEXT_CHARS), exit_code=rec.exit_code, signal=rec.signal,
                   created_at=iso(rec.created_at), duration_s=rec.duration_s, last_line=last_line,
                   cost_usd=usage.cost_usd if usage else None, turns=usage.turns if usage else None)


class TaskList(BaseModel):
    tasks: list[TaskSummary]
    total: int = Field(description="tasks matching the filter, before `limit`")


class RunningItem(BaseModel):
    item: str
    title: str
    task_id: str | None = Field(description="the item's task; None while an isolated item's worktree is made "
                                            "(phase setup): its task starts after")
    elapsed_s: float
    phase: Phase | None = omitted_if_none("an isolated item's phase (runner.isolation: worktree)")
    branch: str | None = omitted_if_none()
    worktree: str | None = omitted_if_none()
    conflicts: list[str] | None = omitted_if_none("files predicted to conflict with the target as it is now")
    integration_s: float | None = omitted_if_none()
    usage: AgentUsage | None = omitted_if_none("an agent item's usage so far")
    waiting: str | None = omitted_if_none("why it is not running right now (a rate limit, a retry's backoff)")


class ItemOutcome(_AgentFields):
    """How one item of a run ended (fork-join aggregation: every item's result in one place)."""

    item: str
    title: str
    outcome: Literal["completed", "failed", "skipped", "not_started", "claimed_elsewhere"]
    task_id: str | None = None
    exit_code: int | None = None
    reason: str | None = omitted_if_none()
    waited_on: str | None = omitted_if_none("for skipped items: the failed item they (transitively) wait on")
    duration_s: float | None = None
    started_at: float | None = Field(None, description="Unix time the item's task started")
    ended_at: float | None = Field(None, description="Unix time the item's task ended")
    last_lines: list[str] = omitted_if_empty("its last lines of output (a failed item's)")
    notes: list[str] = omitted_if_empty("what happened to the item file during the run")
    phase: Phase | None = omitted_if_none("an isolated item's last phase: integrated, conflict ...")
    branch: str | None = omitted_if_none()
    worktree: str | None = omitted_if_none()
    conflicts: list[str] | None = omitted_if_none("files that conflicted when integrating it")
    integration_s: float | None = omitted_if_none("seconds its integration took")
    usage: AgentUsage | None = omitted_if_none("an agent item's session, turns, tokens, cost and error class")
    attempts: int | None = omitted_if_none("how often it ran, when retries were allowed")


class RunProgress(_Spend):
    """A queue run: live counts while it runs, and the full report at the end."""

    run_id: str
    level: str
    continue_on_error: bool
    max_parallel: int
    state: Literal["running", "stopping", "finished"]
    elapsed_s: float
    counts: dict[str, int] = Field(description="items by outcome so far: running, completed, failed, skipped, not_started ...")
    running: list[RunningItem]
    held: str | None = omitted_if_none("why no new item is starting right now (memory, load), if so")
    stop_reason: str | None = omitted_if_none()
    predicted_makespan: float = Field(description="the plan's predicted makespan (s) at the start of the run")
    lower_bound: float = Field(description="the plan's lower bound (s): no schedule can finish faster")
    makespan: float | None = Field(None, description="achieved: from the first start to the last end (s)")
    unestimated: int = Field(0, description="the run's items without an `estimate`: the prediction and the lower "
                                            "bound count each at the default of 60 s")
    outcomes: list[ItemOutcome] = Field(default_factory=list, description="every item of the run (the report, once finished); "
                                        "in a tool's answer at most 100: those that did not complete first, then "
                                        "the first completed, in id order")
    outcomes_total: int | None = omitted_if_none(
        "how many items have an outcome, when `outcomes` shows only some of them: the whole report is "
        "`agent-parallel report <run_id>` (or .agent/runs/<run_id>.report.json)")
    usage: AgentUsage | None = omitted_if_none("the agent items' usage summed (finished and running)")

    def shown(self, limit: int) -> RunProgress:
        """The progress as a tool answers it: at most ``limit`` outcomes, those that did not complete
        first (what went wrong is what the caller needs), each part in id order, and ``outcomes_total``
        when some were left out: a run of 10,000 items answered 2 MB at every poll."""
        if len(self.outcomes) <= limit:
            return self
        notable = [o.item for o in self.outcomes if o.outcome != "completed"][:limit]
        completed = [o.item for o in self.outcomes if o.outcome == "completed"][:limit - len(notable)]
        kept = {*notable, *completed}
        return self.model_copy(update={"outcomes": [o for o in self.outcomes if o.item in kept],
                                       "outcomes_total": len(self.outcomes)})

    def counts_text(self) -> str:
        """THE counts text, wherever a run is summed up: ``1 completed, 1 failed, 2 running`` (outcomes
        in name order, zeros left out), or ``no items``."""
        return ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()) if n) or "no items"

    def makespan_text(self, seconds: Callable[[float], str]) -> str | None:
        """THE makespan line of a finished run (times written by ``seconds``): achieved against the plan's
        lower bound and prediction, or achieved alone when no item had an estimate (the plan's figures
        then only count default estimates)."""
        if self.makespan is None:
            return None
        if self.outcomes and self.unestimated >= len(self.outcomes):
            return f"makespan {seconds(self.makespan)} (no item has an estimate: nothing to compare it with)"
        ratio = f" = {self.makespan / self.lower_bound:.2f} x" if self.lower_bound else ""
        guessed = f"; {self.unestimated} items without an estimate counted at 60 s" if self.unestimated else ""
        return (f"makespan {seconds(self.makespan)} vs lower bound {seconds(self.lower_bound)}{ratio} "
                f"(the plan predicted {seconds(self.predicted_makespan)}{guessed})")


class RunStarted(BaseModel):
    """``run_queue``'s answer: the run's id (a task id) and what it is about to do."""

    run_id: str
    status: TaskStatus
    level: str
    continue_on_error: bool
    max_parallel: int
    items: list[str] = Field(description="the pending items this run will consider, best-ranked first (at most 100)")
    items_total: int | None = omitted_if_none("how many items it will consider, when `items` shows only the first")
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


for _model in (_TaskDetails, TaskView, TaskEntry, LaunchResult, TaskOutputResult, CancelResult):
    _model.model_rebuild()
