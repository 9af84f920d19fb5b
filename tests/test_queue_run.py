"""run_queue, launch_task(item=...) and update_item with real commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from mcp import Client

from agent_parallel.queue import claims
from agent_parallel.config import load_config
from agent_parallel.server import ServerSettings, build_server, views
from agent_parallel.tasks.executor import LaunchSpec
from agent_parallel.tasks.fake import FakeExecutor, FakeOutcome
from agent_parallel.queue.items import MAX_TITLE_CHARS
from agent_parallel.text import cut
from conftest import call, call_error
from queue_helpers import by_item, ends_made_at_once, run_queue_to_end, statuses, write_config, write_item

pytestmark = pytest.mark.anyio


def like_the_shell(spec: LaunchSpec) -> FakeOutcome:
    """What the items' commands here would do, without a process: ``echo X [>&2]``, ``exit N``,
    ``sleep S`` and ``true``, joined by ``;``."""
    outcome = FakeOutcome()
    for part in (spec.command or "").split(";"):
        word, _, rest = part.strip().partition(" ")
        if word == "echo":
            outcome.output += rest.removesuffix(">&2").strip().encode() + b"\n"
        elif word == "exit":
            outcome.exit_code = int(rest)
            break
        elif word == "sleep":
            outcome.delay += float(rest)
        elif word != "true":
            raise AssertionError(f"like_the_shell does not know {part!r}")
    return outcome


@pytest.fixture
async def fake_client(workspace, settings):
    """A client of a server whose item tasks run on a ``FakeExecutor``: for tests of scheduling and
    reporting, where a real process adds nothing."""
    async with Client(build_server(workspace, settings, executor=FakeExecutor(like_the_shell)),
                      raise_exceptions=True) as c:
        yield c



def fork_join(root: Path, *, middle: str = "echo b") -> None:
    """001 -> (002, 003) -> 004; 002's command is ``middle``."""
    write_item(root, 1, "start", command="echo a", files=["a"])
    write_item(root, 2, "left", command=middle, blocked_by=[1], files=["b"])
    write_item(root, 3, "right", command="sleep 0.3; echo c", blocked_by=[1], files=["c"])
    write_item(root, 4, "join", command="echo d", blocked_by=[2, 3], files=["d"])


async def test_successful_run_completes_everything_and_reports(fake_client, workspace):
    fork_join(workspace)
    out = await run_queue_to_end(fake_client, level="L2")
    assert out["status"] == "completed" and out["exit_code"] == 0
    assert statuses(workspace) == {"001": "completed", "002": "completed", "003": "completed", "004": "completed"}
    report = out["run"]
    assert report["state"] == "finished" and report["counts"] == {"running": 0, "completed": 4}
    assert report["makespan"] > 0.3 and report["lower_bound"] > 0
    assert "run " + out["task_id"] + " finished: 4 completed" in out["output"]


async def test_a_plain_item_that_ends_starts_the_next_in_the_same_turn_within_max_parallel(client, workspace,
                                                                                           monkeypatch):
    """A completed plain item's file moves, its slot frees and the next ready items are claimed and
    started in the lane's turn that took the end (``QueueRun.follow_up_now``): never more than
    max_parallel at once, a dependent claimed only once what it waits on moved to completed, an
    item that cannot start that way (it has retries) is started by the run's next turn, and the run's
    log says an item completed before it says what that let start."""
    at_once = ends_made_at_once(monkeypatch)
    spans = workspace / "spans.log"
    command = f'echo "+ $AGENT_ITEM_ID" >> {spans}; sleep 0.05; echo "- $AGENT_ITEM_ID" >> {spans}'
    for number in range(1, 13):
        write_item(workspace, number, f"item-{number}", command=command, files=[f"f{number}"], priority="low")
    write_item(workspace, 13, "after-one", command=command, blocked_by=[1], retries=1, priority="critical")
    write_item(workspace, 14, "after-two", command=command, blocked_by=[2], priority="critical")
    out = await run_queue_to_end(client, max_parallel=3)
    report = out["run"]
    assert report["counts"] == {"running": 0, "completed": 14}
    assert statuses(workspace) == {f"{n:03d}": "completed" for n in range(1, 15)}
    assert any(at_once), "no end was made at once"
    running = peak = 0
    for line in spans.read_text().splitlines():
        running += 1 if line.startswith("+") else -1
        peak = max(peak, running)
    assert peak <= 3
    moves = [json.loads(line) for line in (workspace / ".agent/runs/history.jsonl").read_text().splitlines()]
    order = [(m["item"], m["to"]) for m in moves]
    assert order.index(("001", "completed")) < order.index(("013", "in_progress"))
    assert order.index(("002", "completed")) < order.index(("014", "in_progress"))
    lines = [line.split(" ", 1)[1] for line in out["output"].splitlines() if line[:2].isdigit()]
    ended = [i for i, line in enumerate(lines) if line.startswith("completed 002 ")]
    assert ended and ended[0] < next(i for i, line in enumerate(lines) if line.startswith("started 014 "))


async def test_the_makespan_runs_from_the_first_start_to_the_last_end(client, workspace):
    """Measured from the starts the items recorded, not from their launches (answered while the
    process was still starting)."""
    for number in range(1, 7):
        write_item(workspace, number, f"item-{number}", command="true", files=[f"f{number}"])
    report = (await run_queue_to_end(client, max_parallel=2))["run"]
    outcomes = report["outcomes"]
    assert len(outcomes) == 6 and all(o["outcome"] == "completed" for o in outcomes)
    first, last = min(o["started_at"] for o in outcomes), max(o["ended_at"] for o in outcomes)
    assert report["makespan"] == round(last - first, 3)


@pytest.mark.parametrize("level", ["L1", "L2"])
async def test_l1_l2_stop_on_first_failure_and_let_running_items_finish(fake_client, workspace, level):
    fork_join(workspace, middle="echo broken >&2; exit 4")
    out = await run_queue_to_end(fake_client, level=level, continue_on_error=True)
    report = by_item(out)
    assert out["status"] == "failed"
    assert report["002"]["outcome"] == "failed" and report["002"]["exit_code"] == 4
    assert report["002"]["last_lines"] == ["broken"]
    assert report["003"]["outcome"] == "completed"  # was running: left to finish
    assert report["004"]["outcome"] == "skipped" and report["004"]["waited_on"] == "002"
    assert out["run"]["stop_reason"] == f"item 002 failed and level {level} stops on the first failure; running items were left to finish"
    assert statuses(workspace) == {"001": "completed", "002": "failed", "003": "completed", "004": "pending"}


async def test_l2_failure_leaves_independent_items_not_started(fake_client, workspace):
    write_item(workspace, 1, "fails", command="exit 1", files=["a"], priority="critical")
    write_item(workspace, 2, "later", command="sleep 0.2", files=["a"])
    out = await run_queue_to_end(fake_client, level="L2", max_parallel=1)
    report = by_item(out)
    assert report["002"]["outcome"] == "not_started"
    assert report["002"]["reason"].startswith("item 001 failed and level L2 stops on the first failure")
    assert statuses(workspace)["002"] == "pending"


async def test_items_started_together_keep_their_rank_when_one_cannot_start(fake_client, workspace):
    """A run claims its plain items together (one move of the queue for all the free slots), yet in
    rank order as one at a time did: an item that cannot start (no command and no runner) stops an
    L2 run after the items ranked before it started, and the items ranked after it are never claimed."""
    write_item(workspace, 1, "first", command="sleep 0.2", files=["a"], priority="critical")
    write_item(workspace, 2, "no-command", files=["b"], priority="high")
    write_item(workspace, 3, "third", command="true", files=["c"])
    out = await run_queue_to_end(fake_client, level="L2", max_parallel=3)
    report = by_item(out)
    assert report["001"]["outcome"] == "completed"
    assert report["002"]["outcome"] == "failed" and "no runner is configured" in report["002"]["reason"]
    assert report["003"]["outcome"] == "not_started"
    assert report["003"]["reason"].startswith("item 002 failed and level L2 stops on the first failure")
    assert statuses(workspace) == {"001": "completed", "002": "pending", "003": "pending"}
    moved = [(move["item"], move["to"]) for move in claims.history(workspace / ".agent/runs")]
    assert moved == [("001", "in_progress"), ("001", "completed")]  # 003 never claimed, so never given back


async def test_l3_continue_on_error_skips_only_dependents(fake_client, workspace):
    fork_join(workspace, middle="exit 2")
    write_item(workspace, 5, "independent", command="echo free", files=["e"])
    out = await run_queue_to_end(fake_client, level="L3", continue_on_error=True)
    report = by_item(out)
    assert [report[i]["outcome"] for i in ("001", "002", "003", "004", "005")] == [
        "completed", "failed", "completed", "skipped", "completed"]
    assert "stop_reason" not in out["run"]  # (left out while None)
    assert statuses(workspace)["004"] == "pending"


async def test_a_big_runs_answers_show_a_hundred_items_failures_first_and_the_report_keeps_all(fake_client, workspace):
    """A run of 10,000 items answered run_queue with every id (90 KB) and each task_output with every
    outcome (2 MB at its end): answers show at most 100, what did not complete first, and say how many
    there are; the report on disk keeps them all."""
    for number in range(1, 131):
        fields = {"command": "exit 1" if number in (3, 50) else "true"}
        if number == 51:
            fields["blocked_by"] = [50]
        write_item(workspace, number, f"item-{number}", **fields)
    run = await call(fake_client, "run_queue", level="L3", continue_on_error=True, max_parallel=8)
    assert (len(run["items"]), run["items_total"]) == (100, 130) and "with 130 item(s) to consider" in run["message"]
    out = await call(fake_client, "task_output", task_id=run["run_id"], timeout=30)
    report = out["run"]
    assert out["retrieval_status"] == "success" and report["outcomes_total"] == 130
    assert report["counts"] == {"running": 0, "completed": 127, "failed": 2, "skipped": 1}
    shown = [o["item"] for o in report["outcomes"]]
    assert shown == sorted(shown) and len(shown) == 100
    assert {"003", "050", "051"} <= set(shown) and shown[-1] == "100"  # the three, then the first 97 completed
    on_disk = json.loads((workspace / ".agent/runs" / f"{run['run_id']}.report.json").read_text())
    assert len(on_disk["outcomes"]) == 130 and "outcomes_total" not in on_disk


async def test_l3_without_continue_on_error_stops(fake_client, workspace):
    fork_join(workspace, middle="exit 2")
    out = await run_queue_to_end(fake_client, level="L3", continue_on_error=False)
    assert out["run"]["stop_reason"] == "item 002 failed and continue_on_error is off; running items were left to finish"


async def test_item_timeout_fails_the_item(client, workspace):
    write_item(workspace, 1, "slow", command="sleep 30", timeout="1s", files=["a"])
    started = time.monotonic()
    out = await run_queue_to_end(client, level="L3", continue_on_error=True)
    assert time.monotonic() - started < 10
    assert by_item(out)["001"]["outcome"] == "failed" and by_item(out)["001"]["reason"] == "killed after its timeout of 1 s"
    assert statuses(workspace)["001"] == "failed"


async def test_killed_item_fails(client, workspace):
    write_item(workspace, 1, "killed", command="kill -9 $$", files=["a"])
    out = await run_queue_to_end(client, level="L3", continue_on_error=True)
    assert by_item(out)["001"]["outcome"] == "failed" and by_item(out)["001"]["reason"] == "killed by SIGKILL"


async def test_cancel_a_run_stops_running_items(client, workspace):
    write_item(workspace, 1, "long", command="sleep 30", files=["a"])
    write_item(workspace, 2, "after", command="echo never", blocked_by=[1], files=["b"])
    run = await call(client, "run_queue")
    await anyio.sleep(0.3)
    res = await call(client, "cancel_task", task_id=run["run_id"])
    assert res["tasks"][0]["status"] == "cancelled"
    assert statuses(workspace) == {"001": "failed", "002": "pending"}


async def test_slots_are_refilled_as_soon_as_one_frees(client, workspace):
    """max_parallel 2: a short item ending starts the next at once, not after the long one (no waves)."""
    write_item(workspace, 1, "long", command="sleep 1.2", files=["a"], estimate="2m")
    write_item(workspace, 2, "short", command="sleep 0.2", files=["b"], estimate="1m")
    write_item(workspace, 3, "next", command="sleep 0.2", files=["c"], estimate="1m")
    out = await run_queue_to_end(client, max_parallel=2)
    assert out["run"]["makespan"] < 1.6  # wave by wave would take 1.2 + 0.2


async def test_conflicting_items_never_overlap(client, workspace):
    log = workspace / "overlap.log"
    cmd = f"echo start >> {log}; sleep 0.2; echo end >> {log}"
    write_item(workspace, 1, "one", command=cmd, files=["src/app.py"])
    write_item(workspace, 2, "two", command=cmd, files=["src/*.py"])
    out = await run_queue_to_end(client, max_parallel=5)
    assert out["status"] == "completed"
    assert log.read_text().split() == ["start", "end", "start", "end"]


async def test_pipeline_items_get_upstream_logs_and_ids(client, workspace):
    write_item(workspace, 1, "produce", command="echo artefact-42", files=["a"])
    write_item(workspace, 2, "consume", command='echo "$AGENT_UPSTREAM_ITEMS"; cat "$AGENT_UPSTREAM_LOGS"',
               blocked_by=[1], files=["b"])
    out = await run_queue_to_end(client)
    consumer = await call(client, "task_output", task_id=by_item(out)["002"]["task_id"])
    assert consumer["output"] == "001\nartefact-42\n"


async def test_an_item_is_told_which_upstream_outputs_it_is_not_handed(client, workspace):
    """003 waits on 001 (completed by hand: no output kept) and 002 (run here): AGENT_UPSTREAM_LOGS holds
    002's log only, AGENT_UPSTREAM_MISSING names 001, and the run's log says so."""
    write_item(workspace, 1, "by-hand", status="completed")
    write_item(workspace, 2, "produce", command="echo artefact-2")
    write_item(workspace, 3, "consume", blocked_by=[1, 2],
               command='echo "items=$AGENT_UPSTREAM_ITEMS missing=$AGENT_UPSTREAM_MISSING"; cat "$AGENT_UPSTREAM_LOGS"')
    out = await run_queue_to_end(client)
    consumer = await call(client, "task_output", task_id=by_item(out)["003"]["task_id"])
    assert consumer["output"] == "items=001 002 missing=001\nartefact-2\n"
    assert ("003 is not handed the output of 001: not kept by this server (completed by hand or elsewhere, or "
            "pruned); AGENT_UPSTREAM_MISSING names them") in out["output"]
    assert "not handed" not in out["output"].split("started 003")[0]  # 002 waits on nothing: no such line


@pytest.mark.fault("items named with four digits (0001-pending-a.md, as a queue past 999 items is): a dependent got no "
                   "AGENT_UPSTREAM_LOGS for them (the lookup compared '001' with '0001'); items now match by number")
async def test_upstream_logs_whatever_the_ids_zero_padding(client, workspace):
    def four_digits(path: Path) -> None:
        path.rename(path.with_name("0" + path.name))

    four_digits(write_item(workspace, 1, "produce", command="echo artefact-42"))
    four_digits(write_item(workspace, 2, "consume", command='echo "$AGENT_UPSTREAM_ITEMS"; cat "$AGENT_UPSTREAM_LOGS"',
                           blocked_by=[1]))
    started = await call(client, "run_queue")
    assert started["items"] == ["0001", "0002"]  # spelled as the files spell them, as queue_plan does
    out = await call(client, "task_output", task_id=started["run_id"], timeout=30)
    consumer = await call(client, "task_output", task_id=by_item(out)["0002"]["task_id"])
    assert consumer["output"] == "0001\nartefact-42\n"


async def test_a_run_names_items_as_their_files_do(client, workspace):
    for i, command in ((1, "exit 3"), (2, "true")):
        path = write_item(workspace, i, f"i{i}", command=command, blocked_by=[1] if i == 2 else [])
        path.rename(path.with_name("0" + path.name))
    out = await run_queue_to_end(client)
    assert by_item(out)["0002"]["outcome"] == "skipped" and by_item(out)["0002"]["waited_on"] == "0001"


@pytest.mark.fault("an item whose title is 200 KB: AGENT_ITEM_TITLE went over the kernel's 128 KiB limit for one "
                   "environment entry and the item could not start; the variable now holds its first 1,000 characters")
async def test_a_huge_title_is_cut_in_the_environment_not_refused(client, workspace):
    title = "t" * 200_000
    write_item(workspace, 1, "long", title=title, command='printf %s "$AGENT_ITEM_TITLE" | wc -c; head -c 3 "$AGENT_ITEM_FILE"')
    out = await run_queue_to_end(client)
    assert out["status"] == "completed", out
    item = await call(client, "task_output", task_id=by_item(out)["001"]["task_id"])
    assert item["output"] == f"{len(cut(title, MAX_TITLE_CHARS).encode())}\n---"  # as planned; the file has it whole


async def test_run_only_selected_items_and_what_they_need(client, workspace):
    fork_join(workspace)
    out = await run_queue_to_end(client, items=["002"])
    assert statuses(workspace) == {"001": "completed", "002": "completed", "003": "pending", "004": "pending"}
    assert sorted(by_item(out)) == ["001", "002"]


@pytest.mark.fault("shell injection through an item's title and body: inert")
async def test_runner_gets_item_on_stdin_and_fields_only_in_env(client, workspace):
    """An injection attempt through title and body stays inert: fields never reach a shell line."""
    runner = workspace / "runner.sh"
    runner.write_text('#!/bin/sh\necho "id=$AGENT_ITEM_ID title=$AGENT_ITEM_TITLE"\ncat\n')
    runner.chmod(0o755)
    write_config(workspace, runner={"command": [str(runner)]})
    evil = '"; touch pwned; " $(touch pwned2) `touch pwned3`'
    write_item(workspace, 1, "evil", title=evil, body=f"do it {evil}\n", files=["x"])
    out = await run_queue_to_end(client)
    item_task = await call(client, "task_output", task_id=by_item(out)["001"]["task_id"])
    assert item_task["status"] == "completed"
    assert item_task["output"].startswith(f"id=001 title={evil}\n---\nfiles:\n- x\n---\n# {evil}")
    assert not any((workspace / name).exists() for name in ("pwned", "pwned2", "pwned3"))


@pytest.mark.fault('a queue item file deleted while it runs: no crash, the report says so')
async def test_item_deleted_mid_run_is_reported(client, workspace):
    write_item(workspace, 1, "vanish", command="sleep 0.3", files=["a"])
    run = await call(client, "run_queue")
    await anyio.sleep(0.1)
    (workspace / ".agent/queue/001-in_progress-vanish.md").unlink()
    out = await call(client, "task_output", task_id=run["run_id"])
    notes = by_item(out)["001"]["notes"]
    assert notes[0] == "the item file was deleted or renamed while it ran"
    assert notes[1].startswith("its status could not be recorded in the queue: no queue item has id 001")


@pytest.mark.fault('a queue item file edited while it runs: no crash, the report says so')
async def test_item_edited_mid_run_is_reported(client, workspace):
    path = write_item(workspace, 1, "edited", command="sleep 0.3", files=["a"])
    run = await call(client, "run_queue")
    await anyio.sleep(0.1)
    (path.parent / "001-in_progress-edited.md").write_text("# changed\n")
    out = await call(client, "task_output", task_id=run["run_id"])
    assert by_item(out)["001"]["notes"] == ["the item file was edited while it ran (the run used the version it started with)"]
    assert statuses(workspace)["001"] == "completed"


async def test_launch_task_item_runs_one_ready_item(client, workspace):
    write_item(workspace, 1, "first", command="echo one", files=["a"])
    write_item(workspace, 2, "second", command="echo two", blocked_by=[1], files=["b"])
    text = await call_error(client, "launch_task", item="002")
    assert text == "Error executing tool launch_task: item 002 is not ready: waits on 001"
    out = await call(client, "launch_task", item="1", run_in_background=False)
    assert (out["item_id"], out["output"], out["status"]) == ("001", "one\n", "completed")
    assert statuses(workspace) == {"001": "completed", "002": "pending"}
    text = await call_error(client, "launch_task", item="001")
    assert text == "Error executing tool launch_task: item 001 is completed; only pending items can be launched"


async def test_update_item_transitions_and_exclusive_claim(client, workspace):
    write_item(workspace, 7, "manual", files=["a"])
    moved = await call(client, "update_item", item="007", status="in_progress")
    assert moved == {"item": "007", "previous_status": "pending", "status": "in_progress",
                     "file": "007-in_progress-manual.md",
                     "message": "item 007 moved from pending to in_progress (007-in_progress-manual.md)", "warnings": []}
    text = await call_error(client, "update_item", item="7", status="in_progress")
    assert text == "Error executing tool update_item: item 007 is already claimed by an agent (update_item)"
    await call(client, "update_item", item="#7", status="blocked", reason="needs the API first")
    text = await call_error(client, "update_item", item="007", status="completed")
    assert text == "Error executing tool update_item: item 007 is blocked; it can move to pending, not completed"
    assert statuses(workspace) == {"007": "blocked"}


async def test_queue_errors_are_clear(client, workspace):
    write_item(workspace, 1, "a", command="true")
    assert await call_error(client, "update_item", item="abc", status="completed") == (
        "Error executing tool update_item: item 'abc' is not an item id; give the number from the file name, e.g. \"007\"")
    assert await call_error(client, "run_queue", items=["009"]) == (
        "Error executing tool run_queue: no queue item has id 009; call queue_plan to see the items")
    assert await call_error(client, "launch_task", item="001", cwd="sub") == (
        "Error executing tool launch_task: `cwd`, `env`, `after` and `timeout_s` apply to commands only; an item runs "
        "in the workspace root with its own `timeout` and waits on its `blocked_by` items")


@pytest.mark.fault("run_queue asked for 3,000 item ids none of which exists: the error names five, counts the rest")
async def test_many_unknown_item_ids_are_not_listed_whole(client, workspace):
    write_item(workspace, 1, "a", command="true")
    before = sorted(p.name for p in (workspace / ".agent").rglob("*"))
    text = await call_error(client, "run_queue", items=[str(100000 + i) for i in range(3000)])
    assert text == ("Error executing tool run_queue: no queue item has id 100000, 100001, 100002, 100003, 100004 "
                    "(and 2,995 more); call queue_plan to see the items")
    assert sorted(p.name for p in (workspace / ".agent").rglob("*")) == before  # nothing claimed, run or recorded


@pytest.mark.parametrize("asked", [0, 65, 500])
async def test_max_parallel_out_of_range_is_the_same_error_for_plan_and_run(client, workspace, asked):
    """One rule (config.max_parallel_for): an explicit argument outside 1..64 is refused by both
    tools with the same message (run_queue used to clamp it with a warning, queue_plan refused it)."""
    write_item(workspace, 1, "a", command="true", files=["a"])
    expected = f"max_parallel must be between 1 and 64, not {asked}"
    assert await call_error(client, "queue_plan", max_parallel=asked) == f"Error executing tool queue_plan: {expected}"
    assert await call_error(client, "run_queue", max_parallel=asked) == f"Error executing tool run_queue: {expected}"


async def test_the_config_max_parallel_is_clamped_with_a_warning_for_plan_and_run(client, workspace):
    write_item(workspace, 1, "a", command="true", files=["a"])
    write_config(workspace, autonomy={"max_parallel": 500})
    plan = await call(client, "queue_plan")
    assert plan["max_parallel"] == 64
    assert [w["message"] for w in plan["warnings"]] == ["max_parallel 500 is outside 1..64; using 64"]
    run = await call(client, "run_queue")
    assert run["max_parallel"] == 64
    await call(client, "task_output", task_id=run["run_id"])


async def test_task_cap_reached_mid_run_holds_the_item_until_a_slot_frees(workspace):
    """Issue 9: a limit holds a start, never refuses it (the item used to be reported failed)."""
    from mcp import Client

    from agent_parallel.server import ServerSettings, build_server

    write_item(workspace, 1, "first", command="sleep 0.3", files=["a"])
    write_item(workspace, 2, "second", command="sleep 0.3", files=["b"])
    async with Client(build_server(workspace, ServerSettings(max_running=2, min_free_memory=0))) as c:  # the run + one item
        out = await run_queue_to_end(c, level="L3", continue_on_error=True, max_parallel=2)
        outcomes = by_item(out)
        assert (outcomes["001"]["outcome"], outcomes["002"]["outcome"]) == ("completed", "completed")
        assert statuses(workspace) == {"001": "completed", "002": "completed"}
        assert (await call(c, "launch_task", command="echo alive", run_in_background=False))["output"] == "alive\n"


async def test_an_item_ending_while_others_start_frees_its_slot_at_once(client, workspace):
    """Regression: an end that happened while the run was launching other items went unnoticed
    until some unrelated item ended (found by bench/bench_run.py)."""
    write_item(workspace, 1, "first", command="sleep 0.3", files=["f1"], estimate="0.3s")
    write_item(workspace, 2, "second", command="sleep 0.32", files=["f2"], estimate="0.32s")
    for i in range(3, 15):
        write_item(workspace, i, f"wide-{i}", command="sleep 1", blocked_by=[1], files=[f"w{i}"], estimate="1s")
    write_item(workspace, 15, "quick", command="sleep 0.1", blocked_by=[2], files=["q"], estimate="0.1s")
    out = await run_queue_to_end(client, max_parallel=16)
    outcomes = by_item(out)
    waited = outcomes["015"]["started_at"] - outcomes["002"]["ended_at"]
    # the missed wake-up waited for the wide items (about 1 s); a loaded 2-core machine adds a few 100 ms at most
    assert waited < 0.6, f"015 waited {waited:.3f}s after 002 ended, with free slots"


async def test_blocking_on_a_run_sends_progress_notifications(client, workspace):
    fork_join(workspace)
    run = await call(client, "run_queue")
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    result = await client.call_tool("task_output", {"task_id": run["run_id"]}, progress_callback=on_progress)
    assert result.structured_content["status"] == "completed"
    assert seen and seen[-1][0] == seen[-1][1] == 4
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)
    assert seen[-1][2] == f"run {run['run_id']}: 4 completed"


async def test_what_waits_on_an_item_is_claimed_only_after_its_file_moved(client, workspace):
    """A completed item's end move rides the thread hop of the run's next claim (``Mover``), and its
    slot is freed before the move: in the history, every item still reaches completed before
    anything waiting on it is claimed, and every item ends completed with its own outcome."""
    edges = [(1, 2), (1, 3), (1, 4), (2, 5), (3, 5), (4, 5), (5, 6)]
    for number in range(1, 13):
        waits = [a for a, b in edges if b == number]
        write_item(workspace, number, f"item-{number}", command="true", files=[f"f{number}"],
                   **({"blocked_by": waits} if waits else {}))
    out = await run_queue_to_end(client, max_parallel=3)
    assert out["run"]["counts"].get("completed") == 12, out["run"]["counts"]
    assert set(statuses(workspace).values()) == {"completed"}
    order = [(move["item"], move["to"]) for move in claims.history(workspace / ".agent/runs")]
    for before, after in edges:
        assert order.index((f"{before:03d}", "completed")) < order.index((f"{after:03d}", "in_progress")), order
    assert all(o["outcome"] == "completed" and o["task_id"] for o in out["run"]["outcomes"])


async def test_progress_is_throttled_yet_ends_at_the_total(fake_client, workspace, monkeypatch):
    """At most one notification per PROGRESS_INTERVAL_S (a run of trivial items sent one per item,
    costing more than the items): with an interval longer than the run, only the first count and
    the last (sent when the run ends, the interval cut short) reach the client."""
    monkeypatch.setattr(views, "PROGRESS_INTERVAL_S", 3600.0)
    for number in range(1, 31):
        write_item(workspace, number, f"item-{number}", command="true", files=[f"f{number}"])
    run = await call(fake_client, "run_queue", max_parallel=4)
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    result = await fake_client.call_tool("task_output", {"task_id": run["run_id"], "timeout": 30},
                                         progress_callback=on_progress)
    assert result.structured_content["status"] == "completed"
    progress = [p for p, _, _ in seen]
    assert progress == sorted(set(progress)) and 1 <= len(progress) <= 2, seen  # strictly increasing, throttled
    assert seen[-1][:2] == (30, 30) and seen[-1][2] == f"run {run['run_id']}: 30 completed", seen


async def test_a_wait_that_times_out_still_reports_the_latest_progress(fake_client, workspace, monkeypatch):
    """Progress held back by the throttle is sent when the wait times out: the client's last
    notification matches the answer."""
    monkeypatch.setattr(views, "PROGRESS_INTERVAL_S", 3600.0)
    write_item(workspace, 1, "quick", command="true", files=["a"])
    write_item(workspace, 2, "slow", command="sleep 60", files=["b"])
    run = await call(fake_client, "run_queue", max_parallel=2)
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        assert total == 2
        seen.append(progress)

    result = await fake_client.call_tool("task_output", {"task_id": run["run_id"], "timeout": 2},
                                         progress_callback=on_progress)
    assert result.structured_content["retrieval_status"] == "timeout"
    assert seen[-1] == 1 and seen == sorted(set(seen)), seen
    await call(fake_client, "cancel_task", task_id=run["run_id"])


def test_the_counts_text_is_written_in_one_place():
    """RunProgress.counts_text: the run report, task_output's progress, the MCP task status and the
    CLI all sum a run up with it (an empty run says "no items" everywhere, not an empty string)."""
    from agent_parallel.results import RunProgress
    progress = RunProgress(run_id="7", level="L2", continue_on_error=False, max_parallel=2, state="running",
                           elapsed_s=1.0, counts={"running": 2, "completed": 1, "failed": 0, "waiting": 3},
                           running=[], predicted_makespan=1.0, lower_bound=1.0)
    assert progress.counts_text() == "1 completed, 2 running, 3 waiting"
    assert progress.model_copy(update={"counts": {"running": 0}}).counts_text() == "no items"


@pytest.mark.fault("a run longer than tasks.max_tasks: the oldest item tasks were pruned while it ran, so a late "
                   "item waiting on early ones silently got no AGENT_UPSTREAM_LOGS for them; a run now keeps the "
                   "output its items will read until it ends")
async def test_a_run_keeps_the_upstream_output_its_items_need_past_max_tasks(workspace):
    write_config(workspace, tasks={"max_tasks": 3}, autonomy={"max_parallel": 1})
    write_item(workspace, 1, "early", command="echo from-1")  # done before the run: its output is kept too
    async with Client(build_server(workspace, ServerSettings.from_config(load_config(workspace)[0],
                                                                          kill_grace_s=0.5, min_free_memory=0))) as client:
        await run_queue_to_end(client)
        for i in range(2, 6):
            write_item(workspace, i, f"i{i}", command=f"echo from-{i}")
        write_item(workspace, 6, "join", command='cat $(echo "$AGENT_UPSTREAM_LOGS" | tr : " ") | sort | tr "\\n" " "',
                   blocked_by=[1, 2, 3, 4, 5])
        out = await run_queue_to_end(client)
        join = await call(client, "task_output", task_id=by_item(out)["006"]["task_id"])
        assert join["output"] == "from-1 from-2 from-3 from-4 from-5 "
        await call(client, "launch_task", command="true", run_in_background=False)  # pruned again once it ended
        assert len(list((workspace / ".agent/runs").glob("*.log"))) <= 3
