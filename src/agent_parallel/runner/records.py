"""The task record: what a task is, where it is in its life, and how it ended.

Lifecycle (the only transitions the registry makes)::

    queued ──► running ──► completed | failed | cancelled | timed_out
      │                    (interrupted: found running after a server restart)
      └──► skipped | cancelled   (a predecessor in ``after`` did not complete, or cancelled while waiting)

Records are plain data, written to ``.agent/runs/<task_id>.json``; handles to processes live
elsewhere (the executor), so a record can always be saved, loaded and shown.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field


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

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else time.time()
        return round(end - self.started_at, 3)


def save_record(record: TaskRecord, runs_dir: Path, *, durable: bool = False) -> None:
    """Write the record atomically: temporary file, (fsync), rename over the old one.

    ``durable`` also fsyncs the file and the directory: used for final states, which must
    survive a crash; intermediate states may be lost and are recomputed on restart.
    """
    path = runs_dir / f"{record.task_id}.json"
    tmp = runs_dir / f".{record.task_id}.json.tmp"
    data = record.model_dump_json().encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        dfd = os.open(runs_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_records(runs_dir: Path) -> list[TaskRecord]:
    """Every readable record in ``runs_dir``; unreadable ones are skipped (and never crash start-up)."""
    records = []
    for path in runs_dir.glob("*.json"):
        try:
            records.append(TaskRecord.model_validate(json.loads(path.read_bytes())))
        except (OSError, ValueError):
            continue
    return records
