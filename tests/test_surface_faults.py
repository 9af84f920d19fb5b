"""Issue 9, the MCP surface and the CLI: nothing stalls, every answer is bounded, every error is clear.

Each test provokes one fault through the real server (the SDK's in-memory client) or the real
console script, and checks the exact answer and that nothing else was started or changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, MCPError

from agent_parallel.errors import UsageError
from agent_parallel.server import ServerSettings, build_server
from conftest import call, call_error
from queue_helpers import statuses, write_item

SCRIPT = Path(sys.executable).parent / "agent-parallel"
TOP = Path(__file__).parent.parent


def records(workspace: Path) -> set[str]:
    runs = workspace / ".agent/runs"
    return {p.name for p in runs.glob("*.json")} if runs.exists() else set()


async def finished_task(client: Client, command: str) -> str:
    out = await call(client, "launch_task", command=command, run_in_background=False)
    assert out["status"] == "completed", out
    return out["task_id"]


# ------------------------------------------------------------------ 1. filters cannot stall the server

@pytest.mark.anyio
@pytest.mark.fault("a catastrophic task_output filter ((a|aa)+$, (a+)+$): answers a clear error within its 2 s budget "
                   "while other calls go on, instead of freezing every call for 27 s")
async def test_catastrophic_filter_answers_an_error_and_other_calls_go_on(client):
    tid = await finished_task(client, "printf '%s\\n' " + "a" * 28 + "b " + "a" * 44 + "b")

    start = time.monotonic()
    out = await call(client, "task_output", task_id=tid, filter="(a+)+$")  # 27 s with `re`
    assert out["output"] == "" and time.monotonic() - start < 10

    answers: dict[str, object] = {}

    async def catastrophic() -> None:
        began = time.monotonic()
        answers["error"] = await call_error(client, "task_output", task_id=tid, filter="(a|aa)+$")
        answers["filter_s"] = time.monotonic() - began

    async with anyio.create_task_group() as tg:
        tg.start_soon(catastrophic)
        await anyio.sleep(0.5)  # the filter is matching now
        assert "error" not in answers
        began = time.monotonic()
        listed = await call(client, "list_tasks")
        answers["concurrent_s"] = time.monotonic() - began
    assert listed["tasks"][0]["task_id"] == tid
    assert answers["concurrent_s"] < 1.0, answers  # typically a few ms; the filter runs for 2 s
    assert answers["filter_s"] < 10, answers
    assert answers["error"] == (
        "Error executing tool task_output: filter '(a|aa)+$' took too long: matching stopped after 2 s (nested "
        "repeats such as (a|aa)+ or (a+)+ can take exponential time); simplify it, e.g. a plain word or a pattern "
        "without nested repeats")
    out = await call(client, "task_output", task_id=tid, filter="^a{44}b$")  # a sane filter still works
    assert out["output"] == "a" * 44 + "b\n"


@pytest.mark.anyio
@pytest.mark.fault("a filter whose counted repeats the regex compiler would unroll to gigabytes "
                   "(((a{1000}){1000}){1000}) is refused before compiling")
async def test_filter_with_huge_counted_repeats_is_refused(client):
    tid = await finished_task(client, "echo aaa")
    text = await call_error(client, "task_output", task_id=tid, filter="((a{1000}){1000}){1000}")
    assert text == ("Error executing tool task_output: filter '((a{1000}){1000}){1000}' has counted repeats ({m,n}) "
                    "that multiply to more than 10,000; use + or * instead of large counts")
    assert (await call(client, "task_output", task_id=tid, filter="a{3}"))["output"] == "aaa\n"


# ------------------------------------------------------------------ 2. bounded answers

@pytest.mark.anyio
@pytest.mark.fault("task_output(task_ids=[50,000 copies of one id]) answered 58 MB: repeats are removed (one entry)")
async def test_repeated_task_ids_are_answered_once(client):
    tid = await finished_task(client, "echo once")
    out = await call(client, "task_output", task_ids=[tid] * 50_000, block=False)
    assert [t["task_id"] for t in out["tasks"]] == [tid]
    assert out["tasks"][0]["output"] == "once\n"


@pytest.mark.anyio
@pytest.mark.fault("task_output or cancel_task with more than 256 different ids: a clear error naming the limit")
async def test_more_than_256_task_ids_are_refused(client):
    ids = [f"t{i:04d}" for i in range(300)]
    expected = ("names 300 different tasks; at most 256 are accepted per call: split them over several calls")
    assert await call_error(client, "task_output", task_ids=ids) == f"Error executing tool task_output: task_ids {expected}"
    assert await call_error(client, "cancel_task", task_ids=ids) == f"Error executing tool cancel_task: task_ids {expected}"


@pytest.mark.anyio
@pytest.mark.fault("a 100 KB command was echoed whole in every list_tasks row: rows show it cut to 300 characters "
                   "and say so; task_output(task_id) still shows it whole")
async def test_list_rows_cut_long_commands(client):
    command = "true " + "x" * 100_000
    tids = [(await call(client, "launch_task", command=command, description="d" * 5000))["task_id"] for _ in range(3)]
    listed = await call(client, "list_tasks")
    assert len(listed["tasks"]) == 3
    for row in listed["tasks"]:
        assert row["command"] == command[:300] + "... [cut: 99,705 more characters]"
        assert row["description"] == "d" * 300 + "... [cut: 4,700 more characters]"
    assert len(json.dumps(listed)) < 5000
    several = await call(client, "task_output", task_ids=tids)
    assert all(t["command"].endswith("[cut: 99,705 more characters]") for t in several["tasks"])
    assert (await call(client, "task_output", task_id=tids[0]))["command"] == command


@pytest.mark.anyio
@pytest.mark.fault("launch_task with a command or env value over the kernel's 128 KiB argument limit: refused with a "
                   "clear error naming the limit, nothing started or recorded")
async def test_command_over_the_argument_limit_is_refused(client, workspace):
    await finished_task(client, "true")
    before = records(workspace)
    text = await call_error(client, "launch_task", command="echo " + "x" * (200 * 1024))
    assert "128 KiB" in text or "131072" in text or "131,072" in text, text
    assert "command" in text
    text = await call_error(client, "launch_task", command="true", env={"BIG": "y" * (130 * 1024)})
    assert "BIG" in text and ("128 KiB" in text or "131072" in text or "131,072" in text), text
    assert records(workspace) == before


# ------------------------------------------------------------------ 3. clear argument errors, bugs reported as bugs

@pytest.mark.anyio
@pytest.mark.fault("tool arguments of the wrong type (timeout='soon', task_ids=5, max_bytes='x', ...) got pydantic's "
                   "text with URLs: now one short line naming the argument, what was given and what is expected")
@pytest.mark.parametrize("tool, args, expected", [
    ("task_output", {"task_id": "x", "timeout": "soon"}, "`timeout` must be a number, got 'soon' (a string)"),
    ("task_output", {"task_ids": 5}, "`task_ids` must be a list, got 5 (an integer)"),
    ("task_output", {"task_id": "x", "max_bytes": "x"}, "`max_bytes` must be an integer, got 'x' (a string)"),
    ("task_output", {"task_ids": ["a", 3]}, "`task_ids[1]` must be a string, got 3 (an integer)"),
    ("task_output", {"task_id": "x", "wait": "some"}, "`wait` must be 'all' or 'any', got 'some' (a string)"),
    ("launch_task", {"command": "true", "env": {"A": 5}}, "`env['A']` must be a string, got 5 (an integer)"),
    ("launch_task", {"command": "true", "run_in_background": "perhaps"},
     "`run_in_background` must be true or false, got 'perhaps' (a string)"),
    ("update_item", {"item": "001"}, "`status` is required"),
    ("list_tasks", {"status": "running"}, "`status` must be a list, got 'running' (a string)"),
    ("task_output", {"task_ids": list(range(1000))},  # five named, the rest counted
     "; ".join(f"`task_ids[{i}]` must be a string, got {i} (an integer)" for i in range(5)) + " (and 995 more)"),
])
async def test_argument_type_errors_are_short_and_clear(client, workspace, tool, args, expected):
    text = await call_error(client, tool, **args)
    assert text == (f"Error executing tool {tool}: invalid arguments: {expected} "
                    "(the tool's input schema lists every argument)")
    assert "pydantic" not in text and "http" not in text and "For further information" not in text
    assert records(workspace) == set()


@pytest.mark.anyio
@pytest.mark.fault("a NUL character in cwd or queue_dir gave a bare 'Error executing tool': now a clear error naming "
                   "the argument")
async def test_nul_in_paths_names_the_argument(client, workspace):
    assert await call_error(client, "launch_task", command="true", cwd="a\0b") == (
        "Error executing tool launch_task: `cwd` 'a\\x00b' contains a NUL character; remove it")
    assert await call_error(client, "queue_plan", queue_dir="q\0") == (
        "Error executing tool queue_plan: `queue_dir` 'q\\x00' contains a NUL character; remove it")
    assert await call_error(client, "update_item", item="00\x001", status="in_progress") == (
        "Error executing tool update_item: `item` '00\\x001' contains a NUL character; remove it")
    assert records(workspace) == set()


@pytest.mark.anyio
@pytest.mark.fault("a NUL character in an env value was blamed on the variable's name: the message names the value")
async def test_nul_in_env_value_is_blamed_on_the_value(client, workspace):
    text = await call_error(client, "launch_task", command="true", env={"GOOD_NAME": "x\0y"})
    assert "env value of GOOD_NAME contains a NUL character" in text, text
    assert "name" not in text.replace("GOOD_NAME", "")
    assert records(workspace) == set()


@pytest.mark.anyio
@pytest.mark.fault("an unexpected exception escaping a tool or resource (a bug): a clear error saying it is a bug, with "
                   "the exception text; the traceback is logged; the server keeps serving")
async def test_a_bug_in_a_tool_is_reported_as_a_bug_and_logged(workspace, caplog):
    server = build_server(workspace, ServerSettings(kill_grace_s=0.5, min_free_memory=0))

    def broken_tool() -> str:
        """A tool with a bug (the code under test is the server's error boundary, not this tool)."""
        return {}["missing key"]

    def broken_resource() -> str:
        return str(1 / 0)

    server.add_tool(broken_tool)
    server.resource("test://broken")(broken_resource)
    caplog.set_level(logging.ERROR, logger="agent_parallel.server")
    async with Client(server) as client:
        text = await call_error(client, "broken_tool")
        assert text == ("Error executing tool broken_tool: unexpected KeyError: 'missing key'. This is a bug in "
                        "agent-parallel, not a problem with your call: please report it (the server log has the "
                        "traceback). The server keeps running.")
        with pytest.raises(MCPError) as raised:
            await client.read_resource("test://broken")
        assert raised.value.message == ("reading test://broken failed: unexpected ZeroDivisionError: division by zero. "
                                        "This is a bug in agent-parallel, not a problem with your call: please report "
                                        "it (the server log has the traceback). The server keeps running.")
        assert (await call(client, "launch_task", command="echo alive", run_in_background=False))["output"] == "alive\n"
    logged = [r for r in caplog.records if r.exc_info]
    assert [type(r.exc_info[1]) for r in logged] == [KeyError, ZeroDivisionError]
    assert "broken_tool" in logged[0].getMessage()


# ------------------------------------------------------------------ 4. the wait cap

@pytest.mark.fault("--wait-cap nan / inf / 0 / -1 / words: refused when the arguments are parsed (exit 2, a clear "
                   "message), not after a blocking launch has started its task")
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "1e9", "soon"])
def test_bad_wait_cap_is_refused_at_argument_parsing(workspace, value):
    result = subprocess.run([str(SCRIPT), "serve", "--root", str(workspace), "--wait-cap", value],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "argument --wait-cap: " in result.stderr
    assert ("the wait cap must be a number of seconds above 0 and at most 3600" in result.stderr
            or f"the wait cap must be a number of seconds, not {value!r}" in result.stderr), result.stderr
    assert records(workspace) == set()


@pytest.mark.parametrize("value", [math.nan, math.inf, 0, -1.0, 1e9])
def test_bad_wait_cap_is_refused_by_the_settings(value):
    with pytest.raises(UsageError, match="the wait cap must be a number of seconds above 0 and at most 3600"):
        ServerSettings(wait_cap_s=value)


# ------------------------------------------------------------------ 5. progress of a run

@pytest.mark.anyio
@pytest.mark.fault("progress while blocking on a run went 1,1,1,2,3 with totals 2,2,3,3,3: now it strictly increases "
                   "and the total is the run's items, fixed at its start")
async def test_run_progress_strictly_increases_with_a_fixed_total(client, workspace):
    for number in range(1, 5):
        write_item(workspace, number, f"step-{number}", command="sleep 0.3", files=[f"f{number}"],
                   **({"blocked_by": [number - 1]} if number > 1 else {}))
    run_id = (await call(client, "run_queue", max_parallel=2))["run_id"]
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    result = await client.call_tool("task_output", {"task_id": run_id, "timeout": 30}, progress_callback=on_progress)
    assert not result.is_error and result.structured_content["status"] == "completed"
    progress = [p for p, _ in seen]
    assert progress == sorted(set(progress)), seen  # strictly increasing
    assert {t for _, t in seen} == {4}, seen
    assert progress[-1] == 4 and len(progress) >= 3, seen


# ------------------------------------------------------------------ 6. resources answer our errors

@pytest.mark.anyio
@pytest.mark.fault("queue://plan in a workspace without a queue answered -32603 with a traceback logged: now the "
                   "clear message queue_plan gives")
async def test_queue_plan_resource_without_a_queue_gives_the_tool_message(client):
    tool_text = await call_error(client, "queue_plan")
    with pytest.raises(MCPError) as raised:
        await client.read_resource("queue://plan")
    assert raised.value.code == -32603
    assert f"Error executing tool queue_plan: {raised.value.message}" == tool_text
    assert "queue" in raised.value.message and "Error reading resource" not in raised.value.message


# ------------------------------------------------------------------ 7. resources/updated for tasks

@pytest.mark.anyio
@pytest.mark.fault("resources.subscribe was advertised but no update ever came: a listener of task://{id} and "
                   "task://{id}/output now hears of output growth (throttled) and of the status change")
async def test_subscribers_hear_of_task_output_and_status(client):
    script = "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.4; done"
    tid = (await call(client, "launch_task", command=script))["task_id"]
    uris = [f"task://{tid}", f"task://{tid}/output"]
    heard: list[tuple[float, str]] = []
    async with client.listen(resource_subscriptions=uris) as subscription:
        with anyio.fail_after(20):
            async for event in subscription:
                heard.append((time.monotonic(), event.uri))
                view = await call(client, "task_output", task_id=tid, block=False)
                if view["status"] == "completed" and {u for _, u in heard} == set(uris):
                    break
    assert {u for _, u in heard} == set(uris)
    output_times = [t for t, u in heard if u == uris[1]]
    assert len(output_times) >= 2  # growth while running, then the end
    assert len(output_times) <= 8  # throttled: at most about one a second for 2.4 s of output, plus the end


# ------------------------------------------------------------------ 8. rich markup in the CLI

MARKUP_TITLE = "Fix [/x] parser"
LINK = "[link=https://evil.example]click[/link]"


def cli(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "250", "HOME": str(root), "FORCE_COLOR": "1", "TERM": "xterm-256color"}
    return subprocess.run([str(SCRIPT), *args, "--root", str(root)], capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.fault("rich markup in an item title, command or output (Fix [/x] parser, [link=...]) crashed plan, run and "
                   "status or became a terminal hyperlink: printed as text")
def test_cli_prints_markup_as_text(workspace):
    write_item(workspace, 1, "parser", title=MARKUP_TITLE, command="echo '[/x] done'; exit 3", files=["a"])
    write_item(workspace, 2, "link", title=LINK, command=f"echo '{LINK}'", files=["b"])

    plan = cli("plan", root=workspace)
    assert plan.returncode == 0, plan.stderr
    assert MARKUP_TITLE in plain(plan.stdout) and LINK in plain(plan.stdout)

    run = cli("run", "--level", "L3", root=workspace)
    assert run.returncode == 1, run.stderr  # item 001 failed (exit 3), and the report was printed
    report = plain(run.stdout)
    assert MARKUP_TITLE in report and LINK in report and "| [/x] done" in report
    assert statuses(workspace) == {"001": "failed", "002": "completed"}

    status = cli("status", root=workspace)
    assert status.returncode == 0, status.stderr
    assert MARKUP_TITLE in plain(status.stdout) or "[/x] done" in plain(status.stdout)
    for result in (plan, run, status):
        assert "\x1b]8;" not in result.stdout  # no terminal hyperlink
        assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ 9. README set-up on a PEP 668 machine

def test_readme_setup_commands_make_a_virtual_environment():
    readme = (TOP / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    first, second = blocks[0].strip(), blocks[1].strip()
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert first == venv + "pip install -e . && agent-parallel demo"
    assert second.startswith(venv) and "pip install -q -e '.[test]' && python -m pytest -q" in second
    ci = (TOP / ".ci/run").read_text()
    assert second in ci.splitlines(), "the CI script must run the README's test command line verbatim"


# ------------------------------------------------------------------ 10. stale claims: released where work starts

@pytest.mark.anyio
@pytest.mark.fault("queue_plan (read-only) renamed stale in_progress items: planning changes no file; update_item "
                   "gives stale claims back first and says so")
async def test_planning_changes_no_file_and_update_item_releases_stale_claims(client, workspace):
    write_item(workspace, 1, "claimed", status="in_progress", command="true")
    write_item(workspace, 2, "free", command="true")
    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    claim = {"item": "001", "from": "pending", "to": "in_progress", "by": "run r-dead", "pid": dead.pid,
             "pid_start": 1, "at": time.time()}
    (runs / "history.jsonl").write_text(json.dumps(claim) + "\n")

    await call(client, "queue_plan")
    assert statuses(workspace) == {"001": "in_progress", "002": "pending"}

    moved = await call(client, "update_item", item="002", status="in_progress")
    assert moved["status"] == "in_progress"
    assert statuses(workspace) == {"001": "blocked", "002": "in_progress"}
    assert len(moved["warnings"]) == 1 and moved["warnings"][0].startswith("item 001 (001-blocked-claimed.md): claimed by")


# ------------------------------------------------------------------ 11. no file reads on the event loop

@pytest.mark.anyio
@pytest.mark.fault("a task's log replaced by a FIFO (a hostile workspace): reading it never waits on the FIFO "
                   "(logs are opened non-blocking, regular files only), and other calls answer meanwhile")
async def test_log_reads_never_block_the_event_loop(client, workspace):
    tid = await finished_task(client, "echo hello")
    other = await finished_task(client, "echo other")
    log_file = workspace / ".agent/runs" / f"{tid}.log"
    log_file.unlink()
    os.mkfifo(log_file)
    answered: list[float] = []

    def unblock() -> None:  # were the FIFO opened for reading, this would let it go (and the test fail by time)
        try:
            os.close(os.open(log_file, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waits

    watchdog = threading.Timer(5.0, unblock)
    watchdog.start()

    async def read_fifo_log() -> None:
        began = time.monotonic()
        await client.call_tool("task_output", {"task_id": tid, "block": False})
        answered.append(time.monotonic() - began)  # an error or not: the log is the workspace's to fix

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_fifo_log)
            began = time.monotonic()
            out = await call(client, "task_output", task_id=other, block=False)
            assert out["output"] == "other\n" and time.monotonic() - began < 1.0
    finally:
        watchdog.cancel()
        unblock()
    assert len(answered) == 1 and answered[0] < 2.0


@pytest.mark.anyio
@pytest.mark.fault("a directory named like an item (001-pending-a.md/): an `unreadable` error in the plan naming it, "
                   "the other items planned, and update_item refuses to move it (was left out of the plan silently, "
                   "then renamed by update_item)")
async def test_a_directory_named_like_an_item_is_reported_and_never_moved(client, workspace):
    folder = workspace / ".agent/queue/001-pending-a.md"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me\n")
    write_item(workspace, 2, "b", command="true", files=["b"])
    plan = await call(client, "queue_plan")
    assert [(e["kind"], e["item"], e["file"], e["message"]) for e in plan["errors"]] == [(
        "unreadable", "001", "001-pending-a.md", "is a directory, not an item file; refused (an item is one file: "
        "move what it holds elsewhere and give the item a file of its own)")]
    assert plan["run_now"] == ["002"]
    text = await call_error(client, "update_item", item="001", status="in_progress")
    assert text.endswith("item 001's 001-pending-a.md is a directory, not an item file; refused (an item is one "
                         "file: move what it holds elsewhere and give the item a file of its own); it was not moved")
    assert (folder / "notes.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in (workspace / ".agent/queue").iterdir()) == ["001-pending-a.md", "002-pending-b.md"]


@pytest.mark.anyio
@pytest.mark.fault("run_queue(items=...) naming 40,000 ids (one id repeated, or every id of a large queue): the run "
                   "starts, each id once, its record listing 20 ids and counting the rest (was refused as a 160 KB "
                   "process argument); items=[] is refused (was 'nothing to run' beside ready items)")
async def test_a_run_of_many_named_items_starts_and_an_empty_list_is_refused(client, workspace):
    for number in range(1, 27):
        write_item(workspace, number, f"i{number}", command="true", files=[f"f{number}"])
    text = await call_error(client, "run_queue", items=[])
    assert text.endswith("items is an empty list: name the items to run, or leave items out to run the whole queue")
    assert set(statuses(workspace).values()) == {"pending"}
    run_id = (await call(client, "run_queue", items=[str(n) for n in range(1, 26)] * 1600))["run_id"]
    report = await call(client, "task_output", task_id=run_id, timeout=60)
    assert report["status"] == "completed"
    assert statuses(workspace) == {f"{n:03d}": "completed" for n in range(1, 26)} | {"026": "pending"}
    listed = await call(client, "list_tasks", status=["completed"], limit=100)
    [run] = [t for t in listed["tasks"] if t["task_id"] == run_id]
    assert run["command"].endswith(" items=" + ",".join(f"{n:03d}" for n in range(1, 21)) + " (and 5 more)")


@pytest.mark.fault("agent-parallel run --items naming an id that is not in the queue: one clear error line, exit 2 (was "
                   "a traceback of the task group the run starts in)")
def test_cli_run_of_a_missing_item_is_one_clear_line(workspace):
    write_item(workspace, 1, "a", command="true", files=["a"])
    done = cli("run", "--items", "999", root=workspace)
    assert done.returncode == 2 and done.stderr == "agent-parallel: error: no queue item has id 999; call queue_plan " \
        "to see the items\n" and "Traceback" not in done.stdout + done.stderr
