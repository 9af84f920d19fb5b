"""Agent items end to end with fake claude, codex and gemini CLIs on PATH (tests/agent_fakes.py):
usage read from their streams, rate limits that pause and resume the same session, overloads with
backoff, budgets, the per-profile cap, retries of any item, auto_resume off; through run_queue,
launch_task(item=...) and `agent-parallel run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mcp import Client

from agent_fakes import (SID, TID, calls, claude_rate_limited, claude_success, codex_overloaded, codex_success,
                         gemini_success, install)
from agent_parallel.server import ServerSettings, build_server
from conftest import call
from queue_helpers import by_item, run_to_end, statuses, write_config, write_item

pytestmark = pytest.mark.anyio


def settings() -> ServerSettings:
    return ServerSettings(kill_grace_s=0.5, min_free_memory=0)



async def test_claude_success_reports_session_turns_tokens_cost_and_result(workspace, tmp_path, monkeypatch):
    scenario = install(tmp_path, monkeypatch, [claude_success(cost=0.25, text="All tests pass")])
    write_config(workspace, runner={"agent": "claude", "args": ["--model", "sonnet", "--max-turns", "9"]})
    write_item(workspace, 1, "fix", title="Fix the parser", body="Fix `$(rm -rf ~)` in the parser.\n")
    async with Client(build_server(workspace, settings())) as client:
        run = await call(client, "run_queue")
        out = await call(client, "task_output", task_id=run["run_id"], timeout=60)
        row = by_item(out)["001"]
        item_task = await call(client, "task_output", task_id=row["task_id"], timeout=5)
        listed = await call(client, "list_tasks")
    assert out["status"] == "completed" and row["outcome"] == "completed"
    usage = row["usage"]
    assert usage["agent"] == "claude" and usage["session_id"] == SID and usage["turns"] == 2
    assert (usage["input_tokens"], usage["output_tokens"], usage["cached_tokens"]) == (20, 40, 300)
    assert usage["cost_usd"] == 0.25 and usage["result"] == "All tests pass" and usage.get("error") is None
    assert out["run"]["usage"]["cost_usd"] == 0.25 and "$0.25" in out["output"]
    assert item_task["usage"]["session_id"] == SID and '"type":"result"' in item_task["output"].replace(" ", "")
    summary = next(t for t in listed["tasks"] if t["task_id"] == row["task_id"])
    assert (summary["cost_usd"], summary["turns"]) == (0.25, 2)
    # TOOLS.md's names, at the top level of the item's task, its report row, and (summed) the run's progress
    for shown in (item_task, row):
        assert (shown["session_id"], shown["turns"], shown["cost_usd"]) == (SID, 2, 0.25), shown
        assert shown["tokens"] == {"input": 20, "output": 40, "cached": 300} and "error_class" not in shown
    assert (out["run"]["tokens"], out["run"]["cost_usd"]) == ({"input": 20, "output": 40, "cached": 300}, 0.25)
    assert "session_id" not in out["run"]
    (made,) = calls(scenario)
    assert made["argv"][1:] == ["-p", "--output-format", "stream-json", "--verbose", "--model", "sonnet", "--max-turns", "9"]
    assert "Fix `$(rm -rf ~)` in the parser." in made["stdin"]  # the markdown is the prompt, on stdin only
    assert statuses(workspace) == {"001": "completed"}


async def test_a_rate_limit_holds_agents_then_resumes_the_same_session(workspace, tmp_path, monkeypatch):
    resets = time.time() + 4  # leaves room for a slow first start on a loaded machine
    scenario = install(tmp_path, monkeypatch, [claude_rate_limited(resets), claude_success(cost=0.5)])
    write_config(workspace, runner={"agent": "claude"}, autonomy={"max_parallel": 2, "level": "L3"})
    write_item(workspace, 1, "agent-work", title="Agent work")
    write_item(workspace, 2, "plain", title="Plain", command="echo plain")
    async with Client(build_server(workspace, settings())) as client:
        run = await call(client, "run_queue")
        held = None
        for _ in range(160):  # progress says why agents wait and until when
            out = await call(client, "task_output", task_id=run["run_id"], block=False)
            waiting = [r.get("waiting") for r in out["run"]["running"] if r.get("waiting")]
            if waiting:
                held = waiting[0]
                break
            await anyio_sleep(0.05)
        out = await call(client, "task_output", task_id=run["run_id"], timeout=60)
    assert held is not None and "rate limited" in held and "resuming it at" in held
    row = by_item(out)["001"]
    assert out["status"] == "completed" and row["outcome"] == "completed", row
    assert by_item(out)["002"]["outcome"] == "completed"  # commands ran beside the held agent
    first, second = calls(scenario)
    assert "--resume" not in first["argv"] and first["stdin"].startswith("# Agent work")
    assert second["argv"][second["argv"].index("--resume") + 1] == SID and second["stdin"] == ""
    assert second["at"] >= int(resets)  # not before the reset the CLI reported (whole seconds, as Claude Code does)
    assert second["cwd"] == first["cwd"]
    assert row["usage"]["resumes"] == 1 and row["usage"]["cost_usd"] == pytest.approx(0.501)
    log = (workspace / ".agent/runs" / f"{row['task_id']}.log").read_text()
    assert "resuming session " + SID in log and log.count('"type": "system"') == 2  # both streams kept


async def anyio_sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def test_codex_overload_backs_off_then_resumes_the_thread(workspace, tmp_path, monkeypatch):
    scenario = install(tmp_path, monkeypatch, [codex_overloaded(), codex_success("merged")])
    write_config(workspace, runner={"agent": "codex", "args": ["--model", "gpt-x"], "retry_delay": "50ms"})
    write_item(workspace, 1, "work", title="Work")
    out = await run_to_end(workspace)
    row = by_item(out)["001"]
    assert row["outcome"] == "completed", row
    first, second = calls(scenario)
    assert first["argv"][1:] == ["exec", "--json", "--model", "gpt-x", "-"]
    assert second["argv"][1:5] == ["exec", "--json", "--model", "gpt-x"] and second["argv"][5:7] == ["resume", TID]
    usage = row["usage"]
    assert usage["session_id"] == TID and usage["result"] == "merged" and usage["resumes"] == 1
    assert (usage["input_tokens"], usage["cached_tokens"], usage["output_tokens"]) == (400, 600, 50)
    assert usage.get("cost_usd") is None  # codex reports no cost


async def test_gemini_garbage_and_truncated_lines_are_ignored(workspace, tmp_path, monkeypatch):
    step = gemini_success()
    step["lines"] = ["Loaded cached credentials.", '{"type": "message", "role": "assist', "\x00\xff garbage {",
                     *step["lines"], "[]", '{"type":"tool_use"']
    scenario = install(tmp_path, monkeypatch, [step])
    write_config(workspace, runner={"agent": "gemini"})
    write_item(workspace, 1, "work", title="Work")
    out = await run_to_end(workspace)
    usage = by_item(out)["001"]["usage"]
    assert by_item(out)["001"]["outcome"] == "completed"
    assert usage["session_id"] == SID and usage["result"] == "finished" and usage["turns"] == 2
    assert (usage["input_tokens"], usage["output_tokens"], usage["cached_tokens"]) == (60, 60, 40)
    (made,) = calls(scenario)
    assert made["argv"][1:3] == ["--output-format", "stream-json"] and made["argv"][-2] == "-p"
    assert "# Work" in made["stdin"] and "Work" not in " ".join(made["argv"])


async def test_a_stream_read_while_the_agent_runs_is_counted_once(workspace, tmp_path, monkeypatch):
    # the log is followed as it grows (every POLL_S) and read to its end once the CLI exits: that last read
    # goes on from where the follower stopped (it began again at the attempt's start: turns counted twice)
    step = gemini_success()
    step["pause"] = 0.1  # 0.7 s in all: the follower reads while the CLI still runs
    install(tmp_path, monkeypatch, [step])
    write_config(workspace, runner={"agent": "gemini"})
    write_item(workspace, 1, "work", title="Work")
    out = await run_to_end(workspace)
    usage = by_item(out)["001"]["usage"]
    assert usage["turns"] == 2 and usage["result"] == "finished"


async def test_a_codex_stream_read_while_it_runs_sums_its_tokens_once(workspace, tmp_path, monkeypatch):
    step = codex_success()  # Codex reports usage per turn, summed: read twice, the tokens doubled
    step["pause"] = 0.15
    install(tmp_path, monkeypatch, [step])
    write_config(workspace, runner={"agent": "codex"})
    write_item(workspace, 1, "work", title="Work")
    usage = by_item(await run_to_end(workspace))["001"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["turns"]) == (400, 50, 1)


async def test_the_budget_stops_new_agent_items_mid_run(workspace, tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, [claude_success(cost=0.4)])
    write_config(workspace, runner={"agent": "claude", "max_cost_usd": 0.5}, autonomy={"max_parallel": 1, "level": "L3"})
    for n in (1, 2, 3):
        write_item(workspace, n, f"agent-{n}", title=f"Agent {n}")
    out = await run_to_end(workspace)
    by = by_item(out)
    assert [by[i]["outcome"] for i in ("001", "002", "003")] == ["completed", "completed", "not_started"]
    assert "budget" in out["run"]["stop_reason"] and "max_cost_usd" in by["003"]["reason"]
    assert out["run"]["usage"]["cost_usd"] == pytest.approx(0.8)
    assert "the budget stopped the run" in out["output"]
    assert statuses(workspace)["003"] == "pending"  # never claimed


async def test_the_per_profile_cap_limits_agents_while_commands_run_beside_them(workspace, tmp_path, monkeypatch):
    step = claude_success()
    step["sleep"] = 0.4
    scenario = install(tmp_path, monkeypatch, [step])
    write_config(workspace, runner={"agent": "claude", "max_parallel": 1}, autonomy={"max_parallel": 4})
    for n in (1, 2, 3):
        write_item(workspace, n, f"agent-{n}", title=f"Agent {n}")
    marker = workspace / "cmd.txt"
    write_item(workspace, 4, "cmd", title="Cmd", command=f"date +%s.%N > {marker}; sleep 0.2", priority="low")
    out = await run_to_end(workspace)
    assert out["status"] == "completed", out["output"]
    agent_rows = sorted((o for o in out["run"]["outcomes"] if o["item"] != "004"), key=lambda o: o["started_at"])
    for a, b in zip(agent_rows, agent_rows[1:]):
        assert b["started_at"] >= a["ended_at"] - 0.01, (a, b)  # one agent at a time
    cmd = by_item(out)["004"]
    assert cmd["started_at"] < agent_rows[-1]["started_at"]  # the command did not wait for the agents
    assert len(calls(scenario)) == 3


async def test_retries_run_a_failing_command_again_with_headers_and_attempts(workspace):
    counter = workspace / "count"
    write_config(workspace, runner={"retry_delay": "20ms"})
    script = f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; echo "try $n"; [ $n -ge 3 ]'
    write_item(workspace, 1, "flaky", title="Flaky", command=script, retries=2)
    out = await run_to_end(workspace)
    row = by_item(out)["001"]
    assert row["outcome"] == "completed" and row["attempts"] == 3, row
    log = (workspace / ".agent/runs" / f"{row['task_id']}.log").read_text()
    assert [line.split(" at ")[0] for line in log.splitlines() if line.startswith("=== ")] == [
        f"=== agent-parallel: attempt {n} of 3" for n in (1, 2, 3)]
    assert "try 1" in log and "try 2" in log and "try 3" in log
    assert counter.read_text().strip() == "3" and "3 attempts" in out["output"]


async def test_retries_that_run_out_fail_the_item(workspace):
    write_config(workspace, runner={"retries": 1, "retry_delay": "10ms"})
    write_item(workspace, 1, "bad", title="Bad", command="echo nope; exit 3")
    out = await run_to_end(workspace)
    row = by_item(out)["001"]
    assert row["outcome"] == "failed" and row["exit_code"] == 3 and row["attempts"] == 2
    assert "2 attempts" in row["reason"]


@pytest.mark.fault("a user cancels an item waiting to be retried: it is never run again")
async def test_a_cancelled_item_is_never_retried(workspace):
    counter = workspace / "count"
    write_config(workspace, runner={"retry_delay": "30s"})
    write_item(workspace, 1, "fails", title="Fails", command=f"echo x >> {counter}; exit 1", retries=5)
    async with Client(build_server(workspace, settings())) as client:
        task = await call(client, "launch_task", item="001")
        for _ in range(100):
            if counter.exists():
                break
            await anyio_sleep(0.05)
        await anyio_sleep(0.3)
        cancelled = await call(client, "cancel_task", task_id=task["task_id"])
        await anyio_sleep(0.3)
    assert cancelled["tasks"][0]["status"] == "cancelled"
    assert counter.read_text().count("x") == 1
    assert statuses(workspace) == {"001": "failed"}


@pytest.mark.fault("an agent hits its usage limit with runner.auto_resume: false: the item fails, saying until when and how to resume")
async def test_auto_resume_off_fails_the_item_with_how_to_resume(workspace, tmp_path, monkeypatch):
    resets = time.time() + 3600
    scenario = install(tmp_path, monkeypatch, [claude_rate_limited(resets), claude_success()])
    write_config(workspace, runner={"agent": "claude", "auto_resume": False})
    write_item(workspace, 1, "work", title="Work")
    out = await run_to_end(workspace)
    row = by_item(out)["001"]
    assert row["outcome"] == "failed" and row["usage"]["error"] == "rate_limited"
    assert row["error_class"] == "rate_limited" and row["resets_at"] == row["usage"]["resets_at"]
    assert "rate_limited until 20" in row["reason"] and f"claude --resume {SID}" in row["reason"]
    assert len(calls(scenario)) == 1 and statuses(workspace) == {"001": "failed"}


async def test_launch_task_item_resumes_after_a_rate_limit(workspace, tmp_path, monkeypatch):
    scenario = install(tmp_path, monkeypatch, [claude_rate_limited(time.time() + 1), claude_success(cost=0.1)])
    # a loaded machine may take the reset past before the limit is seen: the backoff then, not 10 s by default
    write_config(workspace, runner={"agent": "claude", "retry_delay": "50ms"})
    write_item(workspace, 1, "work", title="Work")
    async with Client(build_server(workspace, settings())) as client:
        task = await call(client, "launch_task", item="001")
        out = await call(client, "task_output", task_id=task["task_id"], timeout=60)
    assert out["status"] == "completed" and out["usage"]["resumes"] == 1 and out["usage"]["session_id"] == SID
    assert [("--resume" in c["argv"]) for c in calls(scenario)] == [False, True]
    assert statuses(workspace) == {"001": "completed"}


def test_agent_parallel_run_and_report_show_usage(workspace, tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, [claude_success(cost=1.5)])
    write_config(workspace, runner={"agent": "claude"})
    write_item(workspace, 1, "work", title="Work")
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "agent_parallel.cli.main", "run", "--root", str(workspace)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "$1.50" in done.stdout
    run_id = next(p.name.split(".")[0] for p in (workspace / ".agent/runs").glob("*.report.json"))
    report = subprocess.run([sys.executable, "-m", "agent_parallel.cli.main", "report", run_id, "--root", str(workspace)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert "$1.50" in report.stdout and "agents in all" in report.stdout


async def test_an_item_whose_attempts_time_out_ends_timed_out(workspace, settings):
    write_config(workspace, runner={"retry_delay": "0.1s"})
    write_item(workspace, 1, "slow", command="echo attempt; sleep 30", timeout="1s", retries=1)
    async with Client(build_server(workspace, settings)) as client:
        out = await call(client, "launch_task", item="001", run_in_background=False)
    assert out["status"] == "timed_out", out
    assert out["reason"].startswith("its last attempt was killed after its timeout")
    assert out["output"].count("attempt\n") == 2 and statuses(workspace)["001"] == "failed"


async def test_the_per_profile_cap_holds_for_launch_task_items_too(workspace, tmp_path, monkeypatch, settings):
    step = claude_success()
    step["sleep"] = 0.5
    scenario = install(tmp_path, monkeypatch, [step])
    write_config(workspace, runner={"agent": "claude", "max_parallel": 1})
    for n in (1, 2):
        write_item(workspace, n, f"agent-{n}", title=f"Agent {n}")
    async with Client(build_server(workspace, settings)) as client:
        first = await call(client, "launch_task", item="001")
        second = await call(client, "launch_task", item="002")
        done = await call(client, "task_output", task_ids=[first["task_id"], second["task_id"]], timeout=30)
    assert [t["status"] for t in done["tasks"]] == ["completed", "completed"], done
    starts = sorted(c["at"] for c in calls(scenario))
    assert len(starts) == 2 and starts[1] - starts[0] >= 0.45  # the second agent waited for the first


@pytest.mark.fault("the executor loses an item's attempt (a Ray node lost): with retries it runs again and "
                   "completes; without, the item fails with the executor's reason")
@pytest.mark.parametrize("retries", [1, 0])
async def test_an_attempt_the_executor_lost_is_retried(workspace, settings, retries):
    from agent_parallel.tasks.executor import ExecutorError, LaunchSpec
    from agent_parallel.tasks.fake import FakeExecutor, FakeOutcome

    starts: list[str] = []

    def outcome(spec: LaunchSpec) -> FakeOutcome:
        starts.append(spec.command or "")
        if len(starts) == 1:
            return FakeOutcome(wait_error=ExecutorError("node lost: Ray node n1 left the cluster while the task ran"))
        return FakeOutcome(output=b"ran\n")

    write_config(workspace, runner={"retry_delay": "0.05s"})
    write_item(workspace, 1, "lost", command="work", retries=retries)
    async with Client(build_server(workspace, settings, executor=FakeExecutor(outcome))) as client:
        out = await call(client, "launch_task", item="001", run_in_background=False)
    if retries:
        assert out["status"] == "completed" and len(starts) == 2 and "node lost" in out["output"], out
        assert statuses(workspace)["001"] == "completed"
    else:
        assert out["status"] == "failed" and out["reason"].startswith("node lost: Ray node n1"), out
        assert len(starts) == 1 and statuses(workspace)["001"] == "failed"


async def test_an_item_with_retries_waits_for_memory_like_any_task(workspace):
    """A job body (retries, agents) is not admitted by the registry: its attempts ask the same check."""
    import anyio

    settings = ServerSettings(kill_grace_s=0.5, min_free_memory=1 << 50)  # never enough free memory
    marker = workspace / "ran"
    write_item(workspace, 1, "held", command=f"touch {marker}", retries=1)
    async with Client(build_server(workspace, settings)) as client:
        started = await call(client, "launch_task", item="001")
        await anyio.sleep(0.5)
        assert not marker.exists()
        stopped = await call(client, "cancel_task", task_id=started["task_id"])
        assert stopped["tasks"][0]["status"] == "cancelled"
    assert not marker.exists()
