"""The task record's state machine: each state holds only its own data, the outcome is apart from
the lifecycle, only the registry's transitions move a record, and old flat records still load."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.anyio

from agent_parallel.errors import InternalError
from agent_parallel.tasks.records import (Cancelled, Ended, Failed, FailedToStart, Interrupted, NotRun, ProcessRef,
                                          Queued, Running, Skipped, Succeeded, TaskRecord, TaskStatus, TimedOut,
                                          load_records, save_record)


def record(**fields) -> TaskRecord:
    return TaskRecord(task_id="t00000000001", command="make", cwd="/w", **fields)


def test_a_task_that_ran_has_a_start_an_end_and_an_outcome():
    rec = record()
    assert rec.status == TaskStatus.QUEUED and rec.started_at is None and rec.ended_at is None
    rec.start(100.0, ProcessRef(pid=4242, start_time=7))
    assert rec.status == TaskStatus.RUNNING and rec.started_at == 100.0 and rec.process == ProcessRef(pid=4242, start_time=7)
    rec.end(Failed(exit_code=3, reason="exit code 3"), 102.5)
    assert isinstance(rec.state, Ended) and rec.status == TaskStatus.FAILED
    assert (rec.exit_code, rec.signal, rec.reason, rec.duration_s) == (3, None, "exit code 3", 2.5)
    assert rec.process is None  # an ended task holds no process


@pytest.mark.parametrize("outcome, status", [
    (FailedToStart(reason="no such directory"), TaskStatus.FAILED),
    (Skipped(because="predecessor x ended failed"), TaskStatus.SKIPPED),
    (Cancelled(reason="cancelled while waiting"), TaskStatus.CANCELLED),
    (Interrupted(reason="the server stopped"), TaskStatus.INTERRUPTED),
])
def test_a_task_that_never_started_has_no_start_time_and_no_exit_code(outcome, status):
    rec = record()
    rec.end(outcome, 50.0)
    assert isinstance(rec.state, NotRun) and rec.status == status
    assert rec.started_at is None and rec.duration_s is None and rec.exit_code is None and rec.ended_at == 50.0
    assert rec.reason and rec.reason in (getattr(outcome, "reason", None), getattr(outcome, "because", None))


@pytest.mark.parametrize("outcome", [Succeeded(), Failed(exit_code=1, reason="exit code 1"),
                                     TimedOut(reason="killed after its timeout of 1 s")])
def test_an_outcome_that_needs_a_start_is_refused_for_a_queued_task(outcome):
    rec = record()
    with pytest.raises(InternalError, match="cannot end queued as"):
        rec.end(outcome, 1.0)
    assert isinstance(rec.state, Queued)


def test_no_transition_out_of_a_final_state():
    rec = record()
    rec.start(1.0, None)
    rec.end(Succeeded(), 2.0)
    with pytest.raises(InternalError, match="cannot start a task that is ended"):
        rec.start(3.0, None)
    with pytest.raises(InternalError, match="cannot end ended"):
        rec.end(Cancelled(reason="late"), 3.0)
    with pytest.raises(InternalError, match="cannot hold a task that is ended"):
        rec.hold("low memory")
    assert rec.status == TaskStatus.COMPLETED and rec.exit_code == 0


def test_notes_follow_the_reason_and_a_held_start_is_the_queued_reason():
    rec = record()
    rec.hold("start held: low memory")
    assert rec.reason == "start held: low memory" and rec.status == TaskStatus.QUEUED
    rec.hold(None)
    rec.start(1.0, None)
    with pytest.raises(InternalError, match="a note on a task that is running"):
        rec.note("too early")
    rec.end(Succeeded(), 2.0)
    rec.note("1 process left the task's group and was killed")
    assert rec.status == TaskStatus.COMPLETED and rec.reason == "1 process left the task's group and was killed"


def test_a_saved_record_loads_back_equal(tmp_path):
    rec = record(kind="item", item_id="007")
    rec.start(time.time() - 2, ProcessRef(pid=4242, start_time=9))
    rec.end(TimedOut(exit_code=None, signal="SIGKILL", reason="killed after its timeout of 1 s"), time.time())
    rec.note("a follow-up note")
    save_record(rec, tmp_path)
    assert load_records(tmp_path) == [rec]


def test_a_compacted_record_is_the_same_record(tmp_path):
    """``compact`` (what a server does to every final record it keeps) changes how it is held, never
    what it says: the same JSON, equal to the original, and still a record its owner can note on."""
    workdir = "".join(["/wo", "rk"])  # built at run time: not a constant two records would share anyway
    rec = TaskRecord(task_id="t00000000001", command="make", cwd=workdir, description="shard 3", env_keys=["A"],
                     usage={"cost_usd": 0.5})
    rec.start(100.0, ProcessRef(pid=4242, start_time=7))
    rec.end(Failed(exit_code=3, reason="exit code 3"), 102.5)
    before, twin = rec.model_dump_json(), TaskRecord.model_validate_json(rec.model_dump_json())
    rec.compact()
    other = TaskRecord(task_id="t00000000002", command="make", cwd="".join(["/wor", "k"]))
    other.end(Cancelled(reason="cancelled while waiting"), 5.0)
    other.compact()
    assert rec.model_dump_json() == before and rec == twin and rec.cwd is other.cwd
    rec.note("its follow-up failed")
    assert rec.reason == "exit code 3; its follow-up failed" and other.reason == "cancelled while waiting"
    save_record(rec, tmp_path)
    assert load_records(tmp_path)[0].model_dump_json() == rec.model_dump_json()


def test_a_kind_outside_the_closed_set_is_refused(tmp_path, caplog):
    (tmp_path / "t00000000002.json").write_text(json.dumps(
        {**record().model_dump(mode="json"), "task_id": "t00000000002", "kind": "rocket"}))
    assert load_records(tmp_path) == []
    assert "skipped the task record" in caplog.text and "kind" in caplog.text


@pytest.mark.parametrize("flat, state, status, exit_code", [
    ({"status": "completed", "started_at": 10.0, "ended_at": 11.0, "exit_code": 0}, Ended, "completed", 0),
    ({"status": "failed", "started_at": 10.0, "ended_at": 11.0, "exit_code": 2, "reason": "exit code 2"}, Ended,
     "failed", 2),
    ({"status": "failed", "started_at": None, "ended_at": 11.0, "reason": "could not open the log"}, NotRun, "failed",
     None),
    ({"status": "skipped", "ended_at": 11.0, "reason": "predecessor a ended failed"}, NotRun, "skipped", None),
    ({"status": "running", "started_at": 10.0, "pid": 4242, "pid_start": 5}, Running, "running", None),
    ({"status": "queued"}, Queued, "queued", None),
])
def test_records_of_earlier_versions_load_in_the_new_shape(tmp_path, flat, state, status, exit_code):
    old = {"task_id": "old000000001", "kind": "command", "command": "make", "cwd": "/w", "created_at": 9.0,
           "signal": None, "pid": None, "pid_start": None, "reason": None, "output_bytes": 0, **flat}
    (tmp_path / "old000000001.json").write_text(json.dumps(old))
    [rec] = load_records(tmp_path)
    assert isinstance(rec.state, state) and rec.status == status and rec.exit_code == exit_code
    assert rec.started_at == flat.get("started_at") and rec.reason == flat.get("reason")


async def test_launch_task_publishes_its_always_present_fields_as_required_and_not_nullable(tmp_path):
    from mcp import Client

    from agent_parallel.server import ServerSettings, build_server

    async with Client(build_server(tmp_path, ServerSettings(min_free_memory=0))) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    schema = tools["launch_task"].output_schema
    assert schema is not None
    for name in ("task_id", "status", "command", "cwd", "created_at"):
        assert name in schema["required"], name
        assert not nullable(schema["properties"][name]), (name, schema["properties"][name])
    assert nullable(schema["properties"]["started_at"])  # absent until the task starts
    row = tools["list_tasks"].output_schema["$defs"]["TaskSummary"]
    for name in ("task_id", "status", "command", "created_at"):
        assert name in row["required"] and not nullable(row["properties"][name]), name


def nullable(prop: dict) -> bool:
    return {"type": "null"} in prop.get("anyOf", []) or "null" in (prop.get("type") or [])
