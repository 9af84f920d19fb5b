"""Which fields an answer carries: every field TOOLS.md lists for it (null or not), and no other one
while it is null (``fields.omitted_if_none``): a plain command's answers carry no item, branch,
usage or run fields, a run's report no null per item."""

from __future__ import annotations

import json

import pytest

from agent_parallel.results import RunProgress
from conftest import call
from queue_helpers import by_item, run_queue_to_end, write_config, write_item

pytestmark = pytest.mark.anyio

LAUNCH_FIELDS = {"task_id", "status", "description", "command", "cwd", "created_at"}
"""What TOOLS.md says a launch answers (and for an item, its item_id and file name)."""
TASK_OUTPUT_FIELDS = {"task_id", "status", "exit_code", "signal", "started_at", "ended_at", "duration_s", "output",
                      "next_cursor", "output_bytes", "truncated", "dropped_bytes"}
"""What TOOLS.md says task_output answers per task."""


def nulls(data: object, where: str = "") -> list[str]:
    """The paths of every null (and empty list) inside ``data``."""
    if data is None or data == []:
        return [where]
    if isinstance(data, dict):
        return [path for key, value in data.items() for path in nulls(value, f"{where}.{key}")]
    if isinstance(data, list):
        return [path for index, value in enumerate(data) for path in nulls(value, f"{where}[{index}]")]
    return []


async def test_a_background_launch_answers_the_listed_fields_only(client):
    answer = await call(client, "launch_task", command="sleep 5")
    assert set(answer) == LAUNCH_FIELDS
    assert answer["description"] is None  # listed: null, not left out
    described = await call(client, "launch_task", command="true", description="a no-op")
    assert set(described) == LAUNCH_FIELDS and described["description"] == "a no-op"
    await call(client, "cancel_task", task_ids=[answer["task_id"], described["task_id"]])


async def test_task_output_keeps_its_listed_fields_null_or_not_and_drops_the_others(client):
    running = (await call(client, "launch_task", command="echo hi; sleep 5"))["task_id"]
    out = await call(client, "task_output", task_id=running, timeout=0.3)
    assert out["status"] == "running" and TASK_OUTPUT_FIELDS <= set(out)
    assert out["exit_code"] is None and out["ended_at"] is None and out["signal"] is None
    done = await call(client, "task_output", task_id=(await call(client, "launch_task", command="echo ok"))["task_id"])
    assert done["status"] == "completed" and TASK_OUTPUT_FIELDS <= set(done)
    assert done["signal"] is None and done["exit_code"] == 0
    for answer in (out, done):  # a plain command is no item, has no branch, worktree, phase, usage, run or reason
        assert not {"item_id", "item_file", "branch", "worktree", "phase", "conflicts", "usage", "run", "reason",
                    "group_id", "session_id", "turns", "tokens", "cost_usd", "error_class", "resets_at",
                    "attempts"} & set(answer)
    several = await call(client, "task_output", task_ids=[running, done["task_id"]], block=False)
    assert all(TASK_OUTPUT_FIELDS <= set(entry) for entry in several["tasks"])
    assert set(several) == {"retrieval_status", "counts", "tasks"}  # no task's fields at the top level, not even as nulls
    failed = await call(client, "task_output", task_id=(await call(client, "launch_task", command="exit 3"))["task_id"])
    assert failed["reason"] == "exit code 3"  # shown once it says something
    await call(client, "cancel_task", task_id=running)


async def test_a_foreground_launch_answers_what_task_output_would(client):
    answer = await call(client, "launch_task", command="echo done", run_in_background=False)
    assert answer["retrieval_status"] == "success" and TASK_OUTPUT_FIELDS <= set(answer)
    assert answer["signal"] is None and answer["output"] == "done\n"


async def test_an_item_launch_names_its_item_and_file(client, workspace):
    write_item(workspace, 1, "one", command="true")
    answer = await call(client, "launch_task", item="001")
    assert set(answer) == LAUNCH_FIELDS | {"item_id", "item_file"}
    assert answer["item_id"] == "001" and answer["item_file"] == "001-in_progress-one.md"


async def test_a_finished_runs_report_holds_no_nulls_but_the_listed_ones(client, workspace):
    write_config(workspace, runner={"max_parallel": 2})
    write_item(workspace, 1, "ok", command="true")
    write_item(workspace, 2, "bad", command="echo broken; exit 4")
    write_item(workspace, 3, "after-bad", command="true", blocked_by=[2])
    out = await run_queue_to_end(client, level="L3", continue_on_error=True)
    outcomes = by_item(out)
    assert outcomes["001"]["outcome"] == "completed" and outcomes["001"]["exit_code"] == 0
    assert outcomes["002"]["exit_code"] == 4 and outcomes["002"]["last_lines"] == ["broken"]
    assert outcomes["003"]["outcome"] == "skipped" and outcomes["003"]["waited_on"] == "002"
    # a skipped item never ran: its task, exit code and times are listed as null; nothing else is null
    listed = {f".run.outcomes[2].{key}" for key in ("task_id", "exit_code", "duration_s", "started_at", "ended_at")}
    assert set(nulls(out["run"], ".run")) == listed | {".run.running"}
    # and the report read back from its file (a later server's task_output) is the same run
    report = RunProgress.model_validate(out["run"])
    assert report.outcomes[1].last_lines == ["broken"] and report.outcomes[0].usage is None
    assert json.loads(report.model_dump_json()) == out["run"]


async def test_plan_rows_leave_out_isolation_fields_unless_isolated(client, workspace):
    write_item(workspace, 1, "plain", command="true")
    write_item(workspace, 2, "own", command="true", isolation="worktree")
    write_item(workspace, 3, "loop-a", command="true", blocked_by=[4])
    write_item(workspace, 4, "loop-b", command="true", blocked_by=[3])
    plan = await call(client, "queue_plan")
    rows = {row["id"]: row for row in plan["items"]}
    assert not {"isolation", "integration_estimate", "forecast"} & set(rows["001"])
    assert rows["002"]["isolation"] == "worktree" and rows["002"]["integration_estimate"] > 0
    assert rows["001"]["estimate"] is None and "reason" in rows["001"]  # listed by TOOLS.md: kept as null
    cycle = [e for e in plan["errors"] if e["kind"] == "cycle"]
    assert cycle and cycle[0]["path"] and all("path" not in e for e in plan["errors"] if e["kind"] != "cycle")


async def test_an_entry_among_several_says_who_and_how_first_and_leaves_out_what_its_launch_said(client):
    ids = [(await call(client, "launch_task", command=command))["task_id"] for command in ("echo one", "exit 3")]
    several = await call(client, "task_output", task_ids=ids)
    assert list(several)[:2] == ["retrieval_status", "counts"] and several["counts"] == {"completed": 1, "failed": 1}
    assert list(several["counts"]) == ["failed", "completed"]  # what needs a look first
    for entry in several["tasks"]:
        assert TASK_OUTPUT_FIELDS <= set(entry) and list(entry)[:4] == ["task_id", "status", "exit_code", "signal"]
        assert not {"cwd", "created_at", "description"} & set(entry)  # said at launch; task_output on the id has them
    assert [entry["command"] for entry in several["tasks"]] == ["echo one", "exit 3"]
    assert several["tasks"][1]["reason"] == "exit code 3"
    described = (await call(client, "launch_task", command="true", description="a no-op"))["task_id"]
    assert (await call(client, "task_output", task_ids=[described, ids[0]]))["tasks"][0]["description"] == "a no-op"
    one = await call(client, "task_output", task_id=ids[0])  # one task: its fields whole, at the top level
    assert {"cwd", "created_at", "description"} <= set(one) and "counts" not in one


async def test_a_groups_answer_puts_its_state_and_counts_before_its_members_and_no_null_at_the_top(client):
    waited = await call(client, "launch_task", commands=["true", "exit 2", "true"], run_in_background=False)
    assert list(waited)[:5] == ["task_id", "group_id", "status", "retrieval_status", "counts"]
    assert waited["status"] == "failed" and waited["counts"] == {"completed": 2, "failed": 1}
    assert not [key for key, value in waited.items() if value is None and key != "description"]
    assert [entry["task_id"] for entry in waited["tasks"]] == waited["task_ids"]
    out = await call(client, "task_output", task_id=waited["group_id"])
    assert list(out)[:4] == ["retrieval_status", "group_id", "status", "counts"] and out["counts"] == waited["counts"]
    background = await call(client, "launch_task", commands=["true"])  # answered at once: no counts, no tasks yet
    assert set(background) == LAUNCH_FIELDS | {"group_id", "task_ids"}


async def test_a_cancel_answers_what_happened_first_then_an_entry_per_task(client):
    group = await call(client, "launch_task", commands=["sleep 30", "sleep 30", "sleep 30"], max_parallel=1)
    answer = await call(client, "cancel_task", task_id=group["group_id"])
    assert list(answer) == ["message", "tasks"] and len(answer["tasks"]) == 3
    assert all(list(entry)[:2] == ["task_id", "status"] and entry["status"] == "cancelled" for entry in answer["tasks"])
    assert not [entry for entry in answer["tasks"] if {"cwd", "created_at", "description"} & set(entry)]


async def test_a_list_row_of_a_plain_command_carries_no_agent_fields(client):
    await call(client, "launch_task", command="true", run_in_background=False)
    [row] = (await call(client, "list_tasks"))["tasks"]
    assert not {"cost_usd", "turns"} & set(row)  # an agent item's (tests/test_agent_runs.py shows them)
    assert {"task_id", "status", "description", "command", "exit_code", "duration_s", "last_line"} <= set(row)
