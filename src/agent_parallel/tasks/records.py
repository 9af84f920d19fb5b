"""The task record: what a task is, where it is in its life, and how it ended.

Lifecycle (the only transitions the registry makes)::

    queued ──► running ──► completed | failed | cancelled | timed_out
      │                    (interrupted: found running after a server restart)
      └──► skipped | cancelled   (a predecessor in ``after`` did not complete, or cancelled while waiting)

Records are plain data, written to ``.agent/runs/<task_id>.json``; handles to processes live
elsewhere (the executor), so a record can always be saved, loaded and shown.

A loaded record is untrusted (a cloned repository can ship a ``.agent/runs`` of its own):
``load_records`` keeps only records whose id is a plain token equal to the file's name and whose
numbers are sane (``record_problem``), and skips the rest with a warning. Nothing else in a
record is ever used as a path or as a process to signal without a check of its own.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import secrets
import stat
import time
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from ..paths import write_atomic

log = logging.getLogger(__name__)

TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
MAX_RECORD_BYTES = 4 << 20  # a record is a few KB (its command at most 128 KiB); bigger files are not read
FUTURE_SLACK_S = 366 * 86400  # times further ahead than this are not clock skew but nonsense


class TaskStatus(StrEnum):
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


def new_task_id() -> str:
    """An unguessable short token: 60 random bits, lower-case base32 (12 characters)."""
    return base64.b32encode(secrets.token_bytes(8)).decode().lower()[:12]


class TaskRecord(BaseModel):
    """Everything worth keeping about one task. Environment values are never stored (secrets)."""

    task_id: str
    kind: str = "command"  # "command" | "item" | "run"
    command: str
    description: str | None = None
    cwd: str
    env_keys: list[str] = Field(default_factory=list)
    timeout_s: float | None = None
    after: list[str] = Field(default_factory=list)
    item_id: str | None = None
    item_file: str | None = None
    status: TaskStatus = TaskStatus.QUEUED
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    pid: int | None = None
    pid_start: int | None = None  # start time of `pid` (clock ticks since boot), to recognise it after a crash
    server_pid: int | None = None  # the server process that owns the task, and its start time:
    server_start: int | None = None  # another live server's tasks are never touched
    output_bytes: int = 0
    log_cap_bytes: int | None = None  # the cap the log was written with (the config may change later)
    dropped_bytes: int = 0
    tail_segments: list[int] = Field(default_factory=list)
    reason: str | None = None  # why it was skipped, failed to start, interrupted ...
    last_line: str | None = None  # the output's last line, kept at the end so listing never reads a finished log

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else time.time()
        return round(end - self.started_at, 3)


def save_record(record: TaskRecord, runs_dir: Path, *, durable: bool = False) -> None:
    """Write the record atomically (``paths.write_atomic``).

    ``durable`` also fsyncs the file and the directory: used for final states, which must
    survive a crash; intermediate states may be lost and are recomputed on restart.
    """
    write_atomic(runs_dir / f"{record.task_id}.json", record.model_dump_json().encode(), durable=durable)


def is_task_id(text: str) -> bool:
    return TASK_ID.fullmatch(text) is not None


def record_problem(record: TaskRecord, stem: str, now: float) -> str | None:
    """Why a loaded record cannot be trusted, or None when it can be used."""
    if not is_task_id(record.task_id) or record.task_id != stem:
        return f"task_id {record.task_id[:80]!r} is not a plain id equal to the file name"
    if any(not is_task_id(a) for a in record.after):
        return "`after` holds something that is not a task id"
    for name in ("created_at", "started_at", "ended_at"):
        value = getattr(record, name)
        if value is not None and not (math.isfinite(value) and 0 <= value <= now + FUTURE_SLACK_S):
            return f"{name} {value!r} is not a plausible time"
    if record.timeout_s is not None and not (math.isfinite(record.timeout_s) and record.timeout_s >= 0):
        return f"timeout_s {record.timeout_s!r} is not a number of seconds"
    for name in ("pid", "server_pid"):
        value = getattr(record, name)
        if value is not None and not 1 < value <= 1 << 22:
            return f"{name} {value!r} is not a process id"
    for name in ("pid_start", "server_start"):
        value = getattr(record, name)
        if value is not None and not 0 <= value < 1 << 62:
            return f"{name} {value!r} is not a start time"
    if record.log_cap_bytes is not None and not 0 < record.log_cap_bytes < 1 << 50:
        return f"log_cap_bytes {record.log_cap_bytes!r} is not a size"
    if not 0 <= record.output_bytes < 1 << 62 or not 0 <= record.dropped_bytes <= record.output_bytes:
        return "output_bytes or dropped_bytes is not a size"
    segs = record.tail_segments
    if len(segs) > 2 or any(not 0 < s <= record.output_bytes for s in segs) or segs != sorted(set(segs)):
        return "tail_segments are not offsets in the output"
    return None


def load_records(runs_dir: Path) -> list[TaskRecord]:
    """Every valid record in ``runs_dir``. Unreadable or implausible ones are skipped with a
    warning (and never crash start-up); records are read only from regular files."""
    records = []
    now = time.time()
    for path in runs_dir.glob("*.json"):
        stem = path.name[: -len(".json")]
        if "." in stem:
            continue  # another file of a task (e.g. a run's <id>.report.json), not a record
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD_BYTES:
                raise ValueError("not a regular file of a plausible size")
            record = TaskRecord.model_validate(json.loads(path.read_bytes()))
            if problem := record_problem(record, stem, now):
                raise ValueError(problem)
        except ValidationError as exc:
            first = exc.errors()[0]
            log.warning("skipped the task record %s: %s: %s", path, ".".join(map(str, first["loc"])) or "record",
                        first["msg"])
            continue
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("skipped the task record %s: %s", path, str(exc)[:300])
            continue
        records.append(record)
    return records
