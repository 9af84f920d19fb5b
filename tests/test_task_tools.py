"""The task tools through the SDK's in-memory client, with real processes."""

from __future__ import annotations

import sys
import time

import anyio
import pytest

from conftest import all_dead, call, read_pids

pytestmark = pytest.mark.anyio
PY = sys.executable


async def launch(client, command: str, **args) -> str:
    return (await call(client, "launch_task", command=command, **args))["task_id"]


async def test_launch_answers_at_once_and_output_waits_for_the_end(client):
    started = time.monotonic()
    result = await call(client, "launch_task", command="sleep 1; echo hi; echo err >&2", description="greet")
    assert time.monotonic() - started < 0.8  # long before the command ends (the SDK client's first call of a
    # tool compiles its output schema: 0.28 s of this on a fresh machine)
    # answered once its record is written: queued while its process is being started, or running already
    assert result["status"] in ("queued", "running") and result["description"] == "greet"
    assert len(result["task_id"]) == 12
    out = await call(client, "task_output", task_id=result["task_id"])
    assert out["retrieval_status"] == "success"
    assert out["status"] == "completed" and out["exit_code"] == 0
    assert out["output"] == "hi\nerr\n" and out["output_bytes"] == 7 and out["truncated"] is False
    assert out["duration_s"] >= 1


async def test_task_ids_are_unguessable_and_distinct(client):
    ids = {await launch(client, "true") for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 12 and i.isalnum() for i in ids)


async def test_non_zero_exit_is_failed_with_code(client):
    out = await call(client, "task_output", task_id=await launch(client, "echo no; exit 3"))
    assert (out["status"], out["exit_code"], out["reason"]) == ("failed", 3, "exit code 3")


async def test_non_blocking_read_while_running(client):
    tid = await launch(client, "echo first; sleep 5")
    await anyio.sleep(0.3)
    out = await call(client, "task_output", task_id=tid, block=False)
    assert out["retrieval_status"] == "not_ready" and out["status"] == "running" and out["output"] == "first\n"
    await call(client, "cancel_task", task_id=tid)


async def test_blocking_timeout_returns_snapshot_not_error(client):
    tid = await launch(client, "echo partial; sleep 5")
    started = time.monotonic()
    out = await call(client, "task_output", task_id=tid, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2
    assert out["retrieval_status"] == "timeout" and out["status"] == "running" and out["output"] == "partial\n"
    await call(client, "cancel_task", task_id=tid)


async def test_timeout_is_clamped_to_wait_cap(workspace):
    from mcp import Client

    from agent_parallel.server import ServerSettings, build_server

    async with Client(build_server(workspace, ServerSettings(wait_cap_s=0.3, min_free_memory=0))) as c:
        tid = await launch(c, "sleep 5")
        started = time.monotonic()
        out = await call(c, "task_output", task_id=tid, timeout=1000)
        assert out["retrieval_status"] == "timeout" and time.monotonic() - started < 2
        await call(c, "cancel_task", task_id=tid)


async def test_wait_all_and_any(client):
    fast, slow = await launch(client, "sleep 0.1; echo fast"), await launch(client, "sleep 0.8; echo slow")
    out = await call(client, "task_output", task_ids=[fast, slow], wait="any")
    assert out["retrieval_status"] == "success"
    by_id = {t["task_id"]: t for t in out["tasks"]}
    assert by_id[fast]["status"] == "completed" and by_id[slow]["status"] == "running"
    out = await call(client, "task_output", task_ids=[fast, slow], wait="all")
    assert [t["status"] for t in out["tasks"]] == ["completed", "completed"]
    assert "task_id" not in out  # several ids: per-task fields only in `tasks`


async def test_run_in_background_false_waits_and_answers_like_task_output(client):
    out = await call(client, "launch_task", command="echo done", run_in_background=False)
    assert (out["retrieval_status"], out["status"], out["output"]) == ("success", "completed", "done\n")


async def test_pipeline_after_runs_in_order_and_passes_upstream_logs(client, workspace):
    first = await launch(client, "sleep 0.2; echo produced")
    second = await call(client, "launch_task", command='cat "$AGENT_UPSTREAM_LOGS"', after=[first])
    assert second["status"] == "queued"
    out = await call(client, "task_output", task_id=second["task_id"])
    assert out["status"] == "completed" and out["output"] == "produced\n"


async def test_failed_predecessor_skips_the_rest_of_the_pipeline(client, workspace):
    marker = workspace / "ran"
    first = await launch(client, "exit 1")
    second = await launch(client, f"touch {marker}", after=[first])
    third = await launch(client, f"touch {marker}", after=[second])
    out = await call(client, "task_output", task_ids=[second, third])
    assert [t["status"] for t in out["tasks"]] == ["skipped", "skipped"]
    assert out["tasks"][0]["reason"] == f"predecessor {first} ended failed, so this task did not run"
    assert not marker.exists()


async def test_cancel_queued_task_in_pipeline(client):
    first = await launch(client, "sleep 5")
    second = await launch(client, "echo never", after=[first])
    res = await call(client, "cancel_task", task_id=second)
    assert res["tasks"][0]["status"] == "cancelled"
    await call(client, "cancel_task", task_id=first)


@pytest.mark.fault('a task outliving its timeout: the whole tree is killed, status timed_out')
async def test_timeout_kills_the_whole_tree(client, workspace):
    pids = workspace / "pids"
    cmd = f"sleep 60 & echo $! >> {pids}; sh -c 'trap \"\" TERM; echo $$ >> {pids}; sleep 60' ; sleep 60"
    tid = await launch(client, cmd, timeout_s=0.5)
    out = await call(client, "task_output", task_id=tid)
    assert out["status"] == "timed_out" and out["reason"] == "killed after its timeout of 0.5 s"
    assert len(read_pids(pids)) == 2 and all_dead(read_pids(pids))


@pytest.mark.fault('a child ignoring SIGTERM and a background grandchild: cancel_task kills both')
async def test_cancel_kills_child_ignoring_term_and_background_grandchild(client, workspace):
    pids = workspace / "pids"
    script = f"import os,signal,time,subprocess; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             f"p=subprocess.Popen(['sleep','60']); open({str(pids)!r},'w').write(f'{{os.getpid()}} {{p.pid}}'); " \
             f"print('ready', flush=True); time.sleep(60)"
    tid = await launch(client, f"{PY} -c \"{script}\"")
    with anyio.fail_after(10):
        while "ready" not in (await call(client, "task_output", task_id=tid, block=False))["output"]:
            await anyio.sleep(0.05)
    started = time.monotonic()
    res = await call(client, "cancel_task", task_id=tid)
    assert res["tasks"][0]["status"] == "cancelled" and res["tasks"][0]["signal"] in ("SIGTERM", "SIGKILL")
    assert time.monotonic() - started < 3
    assert len(read_pids(pids)) == 2 and all_dead(read_pids(pids))


async def test_leftover_background_process_is_stopped_when_command_ends(client, workspace):
    pids = workspace / "pids"
    out = await call(client, "task_output", task_id=await launch(client, f"sleep 60 & echo $! > {pids}; echo bye"))
    assert out["status"] == "completed" and out["output"] == "bye\n"
    assert all_dead(read_pids(pids))


async def test_cancel_finished_task_is_a_noop_that_says_so(client):
    tid = await launch(client, "true")
    await call(client, "task_output", task_id=tid)
    res = await call(client, "cancel_task", task_id=tid)
    assert res["message"] == f"{tid}: already completed, nothing to do"


async def test_paging_by_cursor(client):
    tid = await launch(client, "seq 1 2000")
    full = await call(client, "task_output", task_id=tid)
    total = full["output_bytes"]
    assert total == len("".join(f"{i}\n" for i in range(1, 2001)))
    text, cursor = "", 0
    while cursor < total:
        page = await call(client, "task_output", task_id=tid, cursor=cursor, max_bytes=1000)
        assert page["cursor"] == cursor
        text += page["output"]
        cursor = page["next_cursor"]
    assert text == "".join(f"{i}\n" for i in range(1, 2001))
    recent = await call(client, "task_output", task_id=tid, max_bytes=10)
    assert recent["output"] == "1999\n2000\n" and recent["truncated"] is True


async def test_tail_lines_and_filter(client):
    tid = await launch(client, "seq 1 100")
    out = await call(client, "task_output", task_id=tid, tail_lines=3)
    assert out["output"] == "98\n99\n100\n"
    out = await call(client, "task_output", task_id=tid, filter=r"^9\d$")
    assert out["output"] == "".join(f"{i}\n" for i in range(90, 100))
    out = await call(client, "task_output", task_id=tid, filter=r"^9", tail_lines=2)
    assert out["output"] == "98\n99\n"


@pytest.mark.fault('invalid UTF-8 in output: replaced, never a crash')
async def test_invalid_utf8_and_binary_output_never_break_a_response(client):
    tid = await launch(client, r"printf 'ok \377\376 done\n'; head -c 200000 /dev/urandom")
    out = await call(client, "task_output", task_id=tid, cursor=0, max_bytes=20)
    assert out["status"] == "completed" and out["output"].startswith("ok \ufffd\ufffd done\n")
    out = await call(client, "task_output", task_id=tid, max_bytes=65536)
    assert out["output_bytes"] == len(b"ok \377\376 done\n") + 200000 and isinstance(out["output"], str)


async def test_utf8_pages_join_without_replacement_characters(client):
    tid = await launch(client, "printf 'é%.0s' $(seq 1 50)")
    text, cursor = "", 0
    while True:
        page = await call(client, "task_output", task_id=tid, cursor=cursor, max_bytes=7)
        if page["next_cursor"] == cursor:
            break
        text, cursor = text + page["output"], page["next_cursor"]
    assert text == "é" * 50


async def test_list_tasks_newest_first_with_last_line(client):
    a = await launch(client, "echo one; echo two")
    await call(client, "task_output", task_id=a)
    b = await launch(client, "sleep 5", description="sleeper")
    listed = await call(client, "list_tasks")
    assert [t["task_id"] for t in listed["tasks"]] == [b, a]
    assert listed["tasks"][1]["last_line"] == "two" and listed["tasks"][0]["description"] == "sleeper"
    with anyio.fail_after(10):  # launch_task answers while the process is being started
        while (await call(client, "task_output", task_id=b, block=False))["status"] != "running":
            await anyio.sleep(0.01)
    running = await call(client, "list_tasks", status=["running"])
    assert [t["task_id"] for t in running["tasks"]] == [b]
    await call(client, "cancel_task", task_id=b)


async def test_cwd_and_env(client, workspace):
    (workspace / "sub").mkdir()
    out = await call(client, "launch_task", command='pwd; echo "$GREETING"', cwd="sub", env={"GREETING": "hello"},
                     run_in_background=False)
    assert out["output"] == f"{workspace / 'sub'}\nhello\n"


async def test_task_resources(client):
    tid = await launch(client, "echo resource")
    await call(client, "task_output", task_id=tid)
    record = await client.read_resource(f"task://{tid}")
    assert f'"task_id":"{tid}"' in record.contents[0].text and '"status":"completed"' in record.contents[0].text
    output = await client.read_resource(f"task://{tid}/output")
    assert output.contents[0].text == "resource\n"


async def test_log_cap_keeps_head_and_tail_and_reports_dropped(workspace):
    from mcp import Client

    from agent_parallel.server import ServerSettings, build_server

    async with Client(build_server(workspace, ServerSettings(log_cap_bytes=4096, min_free_memory=0))) as c:
        tid = await launch(c, "seq 1 100000")
        out = await call(c, "task_output", task_id=tid, max_bytes=100)
        total = len("".join(f"{i}\n" for i in range(1, 100001)))
        assert out["output_bytes"] == total and out["dropped_bytes"] > total - 4096
        assert out["output"].endswith("99999\n100000\n")
        head = await call(c, "task_output", task_id=tid, cursor=0, max_bytes=8)
        assert head["output"] == "1\n2\n3\n4\n"
        logs = sorted(p.name for p in (workspace / ".agent/runs").glob(f"{tid}*.log"))
        assert len(logs) <= 3 and sum((workspace / ".agent/runs" / n).stat().st_size for n in logs) <= 4096


async def test_run_data_is_gitignored(client, workspace):
    await call(client, "task_output", task_id=await launch(client, "true"))
    assert (workspace / ".agent/runs/.gitignore").read_text() == "*\n"


async def test_parallel_execution_prompt_lists_and_renders(client):
    prompts = (await client.list_prompts()).prompts
    assert [p.name for p in prompts] == ["parallel-execution"]
    rendered = await client.get_prompt("parallel-execution")
    text = rendered.messages[0].content.text
    for phrase in ("Independence check", "Fork-join", 'wait="all"', "after=[", "queue_plan()", "run_queue",
                   "update_item", "L1/L2", "continue_on_error"):
        assert phrase in text


async def test_a_held_start_answers_at_once_and_says_why(workspace):
    """With the machine below its free-memory floor, launch_task answers at once with the task
    queued and the reason; the task starts when the machine recovers, or can be cancelled."""
    from mcp import Client

    from agent_parallel.server import ServerSettings, build_server

    async with Client(build_server(workspace, ServerSettings(min_free_memory=1 << 60))) as c:
        started = time.monotonic()
        held = await call(c, "launch_task", command="echo never")
        assert time.monotonic() - started < 0.5
        assert held["status"] == "queued"
        assert held["reason"].startswith("start held: available memory ")
        assert "MiB is below autonomy.min_free_memory 1099511627776 MiB; waiting for it to recover" in held["reason"]
        res = await call(c, "cancel_task", task_id=held["task_id"])
        assert res["tasks"][0]["status"] == "cancelled" and res["tasks"][0]["reason"] == "cancelled while its start was held"


async def test_a_capped_log_reads_back_after_the_cap_setting_changes(workspace):
    """The head/tail split is read with the cap the log was written with, not today's setting."""
    from mcp import Client

    from agent_parallel.server import ServerSettings, build_server

    async with Client(build_server(workspace, ServerSettings(log_cap_bytes=4096, min_free_memory=0))) as c:
        tid = await launch(c, "seq 1 100000")
        await call(c, "task_output", task_id=tid)
    async with Client(build_server(workspace, ServerSettings(log_cap_bytes=1 << 20, min_free_memory=0))) as c:
        head = await call(c, "task_output", task_id=tid, cursor=0, max_bytes=4096)
        assert head["output"].startswith("1\n2\n3\n") and head["next_cursor"] == 2048
        after_head = await call(c, "task_output", task_id=tid, cursor=head["next_cursor"], max_bytes=100)
        assert after_head["output"] and after_head["cursor"] > 2048  # paging goes on past the dropped gap
        tail = await call(c, "task_output", task_id=tid, max_bytes=13)
        assert tail["output"] == "99999\n100000\n"


_EMIT_LONG_LINE = """
import sys
out = sys.stdout
for i in range(400):
    out.write(f"hit {i}\\n" if i % 3 else f"miss {i}\\n")
    if i == 200:
        out.write("hit big " + "\\u00e9" * 1_500_000 + "\\n")  # one 3 MB line, of two-byte characters
"""


def _expected_hits() -> list[str]:
    lines = []
    for i in range(400):
        if i % 3:
            lines.append(f"hit {i}\n")
        if i == 200:
            lines.append("hit big " + "é" * 1_500_000 + "\n")
    return lines


@pytest.mark.fault("task_output with filter and cursor on a log with a 3 MB line: each page holds at most max_bytes "
                   "(the long line cut, truncated set, paging resuming after it); was the whole log in one answer")
async def test_filtered_pages_stay_within_max_bytes_and_visit_each_match_once(client, workspace):
    (workspace / "emit.py").write_text(_EMIT_LONG_LINE)
    tid = await launch(client, f"{PY} emit.py")
    done = await call(client, "task_output", task_id=tid, max_bytes=10)
    assert done["status"] == "completed" and done["output_bytes"] > 3_000_000
    max_bytes = 1001  # the long line is cut inside a character: the page ends before it
    cut = "hit big " + "é" * 496
    pages, cursor = [], 0
    while cursor < done["output_bytes"]:
        page = await call(client, "task_output", task_id=tid, cursor=cursor, max_bytes=max_bytes, filter="^hit")
        assert len(page["output"].encode()) <= max_bytes and len(str(page)) < 4 * max_bytes
        assert page["next_cursor"] > cursor
        pages.append(page)
        cursor = page["next_cursor"]
    # every matching line once, in order; the long one alone on its page, cut and flagged
    assert [p["truncated"] for p in pages if p["output"] == cut] == [True]
    expected = "".join(cut if line.startswith("hit big") else line for line in _expected_hits())
    assert "".join(p["output"] for p in pages) == expected
    assert not any(p["truncated"] for p in pages[:1])

    # tail_lines with a cursor and a filter: the page's last lines, still within max_bytes
    page = await call(client, "task_output", task_id=tid, cursor=0, max_bytes=max_bytes, filter="^hit", tail_lines=2)
    assert page["output"] == pages[0]["output"].splitlines(keepends=True)[-2] + \
        pages[0]["output"].splitlines(keepends=True)[-1] and page["next_cursor"] == pages[0]["next_cursor"]
    # without a cursor: the last max_bytes of the matches; of the long line, its end
    recent = await call(client, "task_output", task_id=tid, filter="^hit", max_bytes=max_bytes)
    assert len(recent["output"].encode()) <= max_bytes and recent["output"].endswith("hit 397\nhit 398\n")
    assert recent["truncated"] is True
    end = await call(client, "task_output", task_id=tid, filter="big", max_bytes=100)
    assert end["output"] == "é" * 49 + "\n" and end["truncated"] is True


@pytest.mark.fault("a filter scanning a log that is one 30 MB line: memory stays bounded (the line is matched "
                   "on its first MiB), never the whole line held")
def test_a_filter_never_holds_a_whole_long_line(tmp_path):
    import re
    import tracemalloc

    from agent_parallel.tasks.logs import MAX_MATCHED_LINE, LogReader

    with open(tmp_path / "t.log", "wb") as f:
        f.write(b"start ")
        for _ in range(30):
            f.write(b"x" * MAX_MATCHED_LINE)
        f.write(b"END\nstart again\n")
    line_end = len("start END\n") + 30 * MAX_MATCHED_LINE
    reader = LogReader(tmp_path, "t", line_end + len("start again\n"), 1 << 40, [])
    tracemalloc.start()
    try:
        page = reader.grep(re.compile("^start"), 0, 100)
        recent = reader.grep(re.compile("start"), None, 100)
        missed = reader.grep(re.compile("END"), 0, 100)  # past the part of the line the filter sees
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert page.text == "start " + "x" * 94 and page.truncated and page.next_cursor == line_end
    assert recent.text == "x" * 84 + "END\nstart again\n" and recent.truncated
    assert missed.text == "" and missed.next_cursor == reader.total
    assert peak < 8 * MAX_MATCHED_LINE, peak  # a chunk, a line's head and their copies; was twice the line
