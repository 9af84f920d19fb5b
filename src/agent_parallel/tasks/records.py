"""The task record: what a task is, where it is in its life, and how it ended.

A record is two parts: what the task *is* (id, kind, command, cwd, ...: fixed at launch) and its
``state``, where each state carries only its own data (as pueue's ``TaskStatus`` does)::

    Queued ──► Running(started_at, process) ──► Ended(started_at, ended_at, outcome)
      │                                          outcome: Succeeded | Failed(exit_code, signal)
      │                                                   | TimedOut | Cancelled | Interrupted
      └──────────────────────────────────────► NotRun(ended_at, outcome)
                                                 outcome: FailedToStart(reason) | Skipped(because)
                                                          | Cancelled | Interrupted

How a task ended (its ``outcome``) is apart from where it is in its life: a task that never
started has no ``started_at`` and no exit code, by construction. Only the registry moves a record
from state to state, through ``start`` and ``end``, which refuse any other transition. The
``status`` the tools show (``TOOLS.md``: queued, running, completed, failed, ...) is derived from
the state and the outcome, as are ``exit_code``, ``signal`` and ``reason``.

Records are plain data, written to ``.agent/runs/<task_id>.json``; handles to processes live
elsewhere (the executor), so a record can always be saved, loaded and shown.

A loaded record is untrusted (a cloned repository can ship a ``.agent/runs`` of its own):
``load_records`` keeps only records whose id is a plain token equal to the file's name and whose
numbers are sane (``record_problem``), and skips the rest with a warning. Nothing else in a
record is ever used as a path or as a process to signal without a check of its own. Records in
the flat format of earlier versions are read too (``_from_flat``).
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import math
import re
import secrets
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InternalError
from ..paths import read_regular, write_atomic
from .logs import record_path

log = logging.getLogger(__name__)

TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
MAX_RECORD_BYTES = 4 << 20  # a record is a few KB (its command at most 128 KiB); bigger files are not read
FUTURE_SLACK_S = 366 * 86400  # times further ahead than this are not clock skew but nonsense

TaskKind = Literal["command", "item", "run"]
"""A shell command or argv (``launch_task(command=...)``), a queue item's work, or a queue run (a job)."""
Phase = Literal["setup", "running", "integrating", "integrated", "conflict"]
"""Where an isolated item (runner.isolation: worktree) is in its life; its last one once it ended."""


class TaskStatus(StrEnum):
    """The status the tools show: the lifecycle and the outcome folded into one word (``TOOLS.md``)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"

    @property
    def is_done(self) -> bool:
        return self not in (TaskStatus.QUEUED, TaskStatus.RUNNING)


GROUP_PREFIX = "g-"
"""Group ids are ``g-`` and a task id's token: never equal to a task id (task ids hold no ``-`` of their own)."""


def new_group_id() -> str:
    return GROUP_PREFIX + new_task_id()


def is_group_id(text: str) -> bool:
    return text.startswith(GROUP_PREFIX) and TASK_ID.fullmatch(text) is not None


def group_status(members: list[TaskRecord]) -> TaskStatus:
    """A fan-out's status, from its members': queued until one starts, running until all ended, then
    completed when every member completed, else the first member's status that is not completed."""
    statuses = [m.status for m in members]
    if all(s == TaskStatus.QUEUED for s in statuses):
        return TaskStatus.QUEUED
    if not all(s.is_done for s in statuses):
        return TaskStatus.RUNNING
    return next((s for s in statuses if s != TaskStatus.COMPLETED), TaskStatus.COMPLETED)


def new_task_id() -> str:
    """An unguessable short token: 60 random bits, lower-case base32 (12 characters)."""
    return base64.b32encode(secrets.token_bytes(8)).decode().lower()[:12]


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- outcomes: how a task ended ----------------------------------------------------------------

class Succeeded(_Data):
    """It ran and exited 0."""

    type: Literal["succeeded"] = "succeeded"
    status: ClassVar[TaskStatus] = TaskStatus.COMPLETED


class Failed(_Data):
    """It ran and failed: a non-zero exit, a signal, or its supervision failed (``reason``)."""

    type: Literal["failed"] = "failed"
    exit_code: int | None = None
    signal: str | None = None
    reason: str
    status: ClassVar[TaskStatus] = TaskStatus.FAILED


class TimedOut(_Data):
    """It ran past its ``timeout_s`` and its process tree was killed."""

    type: Literal["timed_out"] = "timed_out"
    exit_code: int | None = None
    signal: str | None = None
    reason: str
    status: ClassVar[TaskStatus] = TaskStatus.TIMED_OUT


class Cancelled(_Data):
    """``cancel_task`` (or an abandoned launch) stopped it, running or not yet."""

    type: Literal["cancelled"] = "cancelled"
    exit_code: int | None = None
    signal: str | None = None
    reason: str
    status: ClassVar[TaskStatus] = TaskStatus.CANCELLED


class Interrupted(_Data):
    """The server stopped while the task was live."""

    type: Literal["interrupted"] = "interrupted"
    exit_code: int | None = None
    signal: str | None = None
    reason: str
    status: ClassVar[TaskStatus] = TaskStatus.INTERRUPTED


class FailedToStart(_Data):
    """Its process or job could not be started (or prepared: a log, a record, an upstream log)."""

    type: Literal["failed_to_start"] = "failed_to_start"
    reason: str
    status: ClassVar[TaskStatus] = TaskStatus.FAILED


class Skipped(_Data):
    """It never ran because a predecessor in ``after`` did not complete."""

    type: Literal["skipped"] = "skipped"
    because: str
    status: ClassVar[TaskStatus] = TaskStatus.SKIPPED


RanOutcome = Annotated[Succeeded | Failed | TimedOut | Cancelled | Interrupted, Field(discriminator="type")]
NotRunOutcome = Annotated[FailedToStart | Skipped | Cancelled | Interrupted, Field(discriminator="type")]
Outcome = Succeeded | Failed | TimedOut | Cancelled | Interrupted | FailedToStart | Skipped


# --- states: where a task is in its life -------------------------------------------------------

class ProcessRef(_Data):
    """The task's process: its pid and start time (clock ticks since boot), to recognise it after a crash."""

    pid: int
    start_time: int | None = None


class Queued(_Data):
    """Registered, not started: waiting for its predecessors or for room (``held``: why the start is held)."""

    state: Literal["queued"] = "queued"
    held: str | None = None


class Running(_Data):
    """Its process (``process``) or job (no process) runs."""

    state: Literal["running"] = "running"
    started_at: float
    process: ProcessRef | None = None


class Ended(_Data):
    """It ran and is over. ``notes``: what else happened (processes left behind, a follow-up's problem)."""

    state: Literal["ended"] = "ended"
    started_at: float
    ended_at: float
    outcome: RanOutcome
    notes: tuple[str, ...] = ()


class NotRun(_Data):
    """It is over without having started."""

    state: Literal["not_run"] = "not_run"
    ended_at: float
    outcome: NotRunOutcome
    notes: tuple[str, ...] = ()


TaskState = Annotated[Queued | Running | Ended | NotRun, Field(discriminator="state")]


_SHARED_FIELDS_SET: set[str] = set()
"""``TaskRecord.compact``: the ``model_fields_set`` of every compacted model (it only grows, harmlessly)."""


class TaskRecord(BaseModel):
    """Everything worth keeping about one task. Environment values are never stored (secrets)."""

    task_id: str
    kind: TaskKind = "command"
    command: str
    description: str | None = None
    cwd: str
    env_keys: list[str] = Field(default_factory=list)
    timeout_s: float | None = None
    after: list[str] = Field(default_factory=list)
    item_id: str | None = None
    item_file: str | None = None
    group_id: str | None = None  # the fan-out (``launch_task(commands=...)``) this task is one of
    branch: str | None = None  # an isolated item's branch and worktree (runner.isolation: worktree)
    worktree: str | None = None
    phase: Phase | None = None  # an isolated item's phase, kept by the queue code that carries it out
    conflicts: list[str] = Field(default_factory=list)  # its files predicted to conflict, or that conflicted
    created_at: float = Field(default_factory=time.time)
    server_pid: int | None = None  # the server process that owns the task, and its start time:
    server_start: int | None = None  # another live server's tasks are never touched
    state: TaskState = Field(default_factory=Queued)
    output_bytes: int = 0
    log_cap_bytes: int | None = None  # the cap the log was written with (the config may change later)
    dropped_bytes: int = 0
    tail_segments: list[int] = Field(default_factory=list)
    last_line: str | None = None  # the output's last line, kept at the end so listing never reads a finished log
    usage: dict[str, Any] | None = None  # an agent item's usage (results.AgentUsage), set by its follow-up

    # ------------------------------------------------------------- transitions (the registry's only)
    def hold(self, why: str | None) -> None:
        """Say why a queued task's start is held (None: it no longer is)."""
        self._expect(Queued, "hold")
        self.state = Queued(held=why)

    def start(self, at: float, process: ProcessRef | None) -> None:
        """Queued → Running."""
        self._expect(Queued, "start")
        self.state = Running(started_at=at, process=process)

    def end(self, outcome: Outcome, at: float) -> None:
        """Running → Ended, or Queued → NotRun. An outcome that needs a start (``Succeeded``,
        ``Failed``, ``TimedOut``) for a task that never started is a bug."""
        state = self.state
        if isinstance(state, Running) and not isinstance(outcome, (FailedToStart, Skipped)):
            self.state = Ended(started_at=state.started_at, ended_at=max(at, state.started_at), outcome=outcome)
        elif isinstance(state, Queued) and isinstance(outcome, (FailedToStart, Skipped, Cancelled, Interrupted)):
            self.state = NotRun(ended_at=at, outcome=outcome)
        else:
            raise InternalError(f"task {self.task_id}: cannot end {state.state} as {outcome.type}")

    def compact(self) -> None:
        """Make a final record that stays in memory (a server keeps up to ``tasks.max_tasks``) smaller:
        5.3 KB -> 2.1 KB loaded from its file, measured. Pydantic keeps per model instance the set of field
        names it was given (``model_fields_set``, about 2 KB for a record: a set of 25 names), which only
        ``exclude_unset`` and ``model_copy`` read and nothing here uses: a record, its state and outcome
        share one set instead. ``cwd`` and ``kind``, the same for most tasks, are interned."""
        state = self.state
        for model in (self, state, getattr(state, "outcome", None)):
            if model is not None:
                object.__setattr__(model, "__pydantic_fields_set__", _SHARED_FIELDS_SET)
        self.__dict__["cwd"], self.__dict__["kind"] = sys.intern(self.cwd), sys.intern(self.kind)

    def note(self, text: str) -> None:
        """Add what else happened to an ended task (shown after its reason)."""
        state = self.state
        if not isinstance(state, (Ended, NotRun)):
            raise InternalError(f"task {self.task_id}: a note on a task that is {state.state}")
        self.state = state.model_copy(update={"notes": (*state.notes, text)})

    def _expect(self, state: type[_Data], action: str) -> None:
        if not isinstance(self.state, state):
            raise InternalError(f"task {self.task_id}: cannot {action} a task that is {self.state.state}")

    # ------------------------------------------------------------- what the tools show
    @property
    def outcome(self) -> Outcome | None:
        return self.state.outcome if isinstance(self.state, (Ended, NotRun)) else None

    @property
    def status(self) -> TaskStatus:
        state = self.state
        if isinstance(state, Queued):
            return TaskStatus.QUEUED
        if isinstance(state, Running):
            return TaskStatus.RUNNING
        return state.outcome.status

    @property
    def is_done(self) -> bool:
        return isinstance(self.state, (Ended, NotRun))

    @property
    def started_at(self) -> float | None:
        return self.state.started_at if isinstance(self.state, (Running, Ended)) else None

    @property
    def ended_at(self) -> float | None:
        return self.state.ended_at if isinstance(self.state, (Ended, NotRun)) else None

    @property
    def process(self) -> ProcessRef | None:
        return self.state.process if isinstance(self.state, Running) else None

    @property
    def exit_code(self) -> int | None:
        outcome = self.outcome
        if isinstance(outcome, Succeeded):
            return 0
        return getattr(outcome, "exit_code", None)

    @property
    def signal(self) -> str | None:
        return getattr(self.outcome, "signal", None)

    @property
    def reason(self) -> str | None:
        """Why the task is where it is, when that is not plain success: a held start, how it failed,
        what it was skipped for, and any notes."""
        state = self.state
        if isinstance(state, Queued):
            return state.held
        if isinstance(state, Running):
            return None
        outcome = state.outcome
        first = outcome.because if isinstance(outcome, Skipped) else getattr(outcome, "reason", None)
        return "; ".join(part for part in (first, *state.notes) if part) or None

    @property
    def duration_s(self) -> float | None:
        started = self.started_at
        if started is None:
            return None
        end = self.ended_at if self.ended_at is not None else time.time()
        return round(end - started, 3)


def save_record(record: TaskRecord, runs_dir: Path, *, durable: bool = False) -> None:
    """Write the record atomically (``paths.write_atomic``).

    ``durable`` also fsyncs the file and the directory: used for final states, which must
    survive a crash; intermediate states may be lost and are recomputed on restart.
    """
    write_atomic(record_path(runs_dir, record.task_id), record.model_dump_json().encode(), durable=durable)


def is_task_id(text: str) -> bool:
    return TASK_ID.fullmatch(text) is not None


def record_problem(record: TaskRecord, stem: str, now: float) -> str | None:
    """Why a loaded record cannot be trusted, or None when it can be used."""
    if not is_task_id(record.task_id) or record.task_id != stem:
        return f"task_id {record.task_id[:80]!r} is not a plain id equal to the file name"
    if any(not is_task_id(a) for a in record.after):
        return "`after` holds something that is not a task id"
    if record.group_id is not None and not is_group_id(record.group_id):
        return f"group_id {record.group_id[:80]!r} is not a group id"
    for name, value in (("created_at", record.created_at), ("started_at", record.started_at),
                        ("ended_at", record.ended_at)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= now + FUTURE_SLACK_S):
            return f"{name} {value!r} is not a plausible time"
    if record.timeout_s is not None and not (math.isfinite(record.timeout_s) and record.timeout_s >= 0):
        return f"timeout_s {record.timeout_s!r} is not a number of seconds"
    process = record.process
    for name, pid in (("pid", process.pid if process else None), ("server_pid", record.server_pid)):
        if pid is not None and not 1 < pid <= 1 << 22:
            return f"{name} {pid!r} is not a process id"
    for name, start in (("pid_start", process.start_time if process else None), ("server_start", record.server_start)):
        if start is not None and not 0 <= start < 1 << 62:
            return f"{name} {start!r} is not a start time"
    if record.log_cap_bytes is not None and not 0 < record.log_cap_bytes < 1 << 50:
        return f"log_cap_bytes {record.log_cap_bytes!r} is not a size"
    if not 0 <= record.output_bytes < 1 << 62 or not 0 <= record.dropped_bytes <= record.output_bytes:
        return "output_bytes or dropped_bytes is not a size"
    segs = record.tail_segments
    if len(segs) > 2 or any(not 0 < s <= record.output_bytes for s in segs) or segs != sorted(set(segs)):
        return "tail_segments are not offsets in the output"
    return None


_FLAT_STATE_KEYS = ("status", "started_at", "ended_at", "exit_code", "signal", "pid", "pid_start", "reason")


def _from_flat(data: dict[str, Any]) -> dict[str, Any]:
    """A record in the flat format of versions before the ``state`` field, in today's shape.

    The flat format had one nullable field per fact (``status``, ``started_at``, ``exit_code`` ...);
    a value that makes no sense for its status is dropped, as the state would not hold it."""
    flat = {key: data.pop(key, None) for key in _FLAT_STATE_KEYS}
    status, reason = flat["status"], flat["reason"]
    started, ended = flat["started_at"], flat["ended_at"]
    exits = {"exit_code": flat["exit_code"], "signal": flat["signal"]}
    if status in (None, "queued"):
        data["state"] = {"state": "queued", "held": reason}
    elif status == "running":
        process = {"pid": flat["pid"], "start_time": flat["pid_start"]} if flat["pid"] is not None else None
        data["state"] = {"state": "running", "started_at": started, "process": process}
    elif status == "skipped" or (started is None and status in ("failed", "cancelled", "interrupted")):
        outcome = ({"type": "skipped", "because": reason or "a predecessor did not complete"} if status == "skipped"
                   else {"type": "failed_to_start" if status == "failed" else status, "reason": reason or status})
        data["state"] = {"state": "not_run", "ended_at": ended, "outcome": outcome}
    else:
        outcome = ({"type": "succeeded"} if status == "completed"
                   else {"type": status, "reason": reason or status, **exits})
        data["state"] = {"state": "ended", "started_at": started, "ended_at": ended, "outcome": outcome}
    return data


def journal_replaces(path: Path, data: bytes) -> bool:
    """Whether a record journal's entry ``data`` is to be written back to ``path`` (``journal.recover``):
    when it is a record named by ``path``, and ``path`` is missing or unreadable, or, for a finished
    task's record, not a finished task's record (the crash came before its final record reached the
    disk). A first record (journal of first records) never replaces a record that can be read."""
    try:
        entry = TaskRecord.model_validate_json(data)
        if record_path(path.parent, entry.task_id) != path:
            return False
    except (ValidationError, ValueError):
        return False
    try:
        on_disk = TaskRecord.model_validate_json(read_regular(path, MAX_RECORD_BYTES))
        return entry.is_done and not on_disk.is_done
    except (OSError, ValidationError, ValueError):  # missing (lost), unreadable, not a regular file, too big
        return True


JOURNALED_WINDOW_S = 10.0  # how recent a journaled first record must be to be shown (load_records)


def load_records(runs_dir: Path, *, journaled: bool = False) -> list[TaskRecord]:
    """Every valid record in ``runs_dir``. Unreadable or implausible ones are skipped with a
    warning (and never crash start-up); records are read only from regular files.

    ``journaled``: also the tasks whose record is so far only in their server's journals (``journal.py``:
    a first record, its file following within a second; a final record, its file written a second later,
    ``group_commit.py``), checked the same way (skipped quietly); a final record there wins over a first
    one. From a live server's journal only those launched or ended in the last ``JOURNALED_WINDOW_S``:
    older ones have their file, or had it and were pruned since. From the journal of a server that is
    gone (it crashed before writing the files), every one: what the next server will write back."""
    records = _load_files(runs_dir)
    if journaled:
        from .journal import journaled as journal_entries

        have = {r.task_id for r in records if r.is_done}  # (a file still showing a task live may be older)
        recent: dict[str, TaskRecord] = {}
        now = time.time()
        for name, data, gone in journal_entries(runs_dir):
            stem = name[: -len(".json")]
            if stem in have or ((seen := recent.get(stem)) is not None and seen.is_done):
                continue
            try:
                record = TaskRecord.model_validate_json(data)
            except (ValidationError, ValueError, RecursionError):
                continue
            if (gone or (record.ended_at or record.created_at) > now - JOURNALED_WINDOW_S) \
                    and not record_problem(record, stem, now):
                if record.is_done:
                    record.compact()
                recent[stem] = record
        records = [r for r in records if r.task_id not in recent or not recent[r.task_id].is_done]
        on_file = {r.task_id for r in records}
        records += [r for stem, r in recent.items() if stem not in on_file]
    return records


def _load_files(runs_dir: Path) -> list[TaskRecord]:
    records = []
    now = time.time()
    for path in runs_dir.glob("*.json"):
        stem = path.name[: -len(".json")]
        if "." in stem:
            continue  # another file of a task (e.g. a run's <id>.report.json), not a record
        try:  # (opened as a regular file of a plausible size, never through a symlink: one check, no race)
            data = json.loads(read_regular(path, MAX_RECORD_BYTES))
            if isinstance(data, dict) and "state" not in data:
                data = _from_flat(data)
            record = TaskRecord.model_validate(data)
            if problem := record_problem(record, stem, now):
                raise ValueError(problem)
            if record.is_done:
                record.compact()  # at once: a history of thousands never holds them all at full size
        except ValidationError as exc:
            first = exc.errors()[0]
            log.warning("skipped the task record %s: %s: %s", path, ".".join(map(str, first["loc"])) or "record",
                        first["msg"])
            continue
        except OSError as exc:
            why = "a symlink (never followed)" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            log.warning("skipped the task record %s: %s", path, why)
            continue
        except (ValueError, RecursionError) as exc:
            log.warning("skipped the task record %s: %s", path, str(exc)[:300])
            continue
        records.append(record)
    return records
