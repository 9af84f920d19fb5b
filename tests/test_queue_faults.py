"""Faults in the queue's pure core, claims and config (issue 9): hostile or absurd queue files and
settings, unbounded answers, planning that changed files, claims that let an item run twice,
locks that waited forever, moves half done on a full disk, and an unbounded history.

Real files and processes throughout: the full disk is a real tmpfs mounted on `.agent/runs` (the
test is skipped where mounting is not allowed), the lock holder a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp import Client

from agent_parallel.queue.claims import (
    HISTORY_FILE, OLD_HISTORY_FILE, BadTransition, ClaimLost, claimant, history, move_item, parse_item_id,
    release_claim, release_stale_claims)
from agent_parallel.config import ConfigError, load_config, parse_duration, stops_on_first_failure
from agent_parallel.errors import QueueError
from agent_parallel.queue.plan import plan_workspace
from agent_parallel.queue.planner import MAX_CONFLICTS_SHOWN, MAX_WAVES_SHOWN, make_plan
from agent_parallel.queue.items import QueueReader, WorkItem, format_id, parse_item
from agent_parallel.server import ServerSettings, build_server
from agent_parallel.text import short_repr
from conftest import call, call_error
from queue_helpers import statuses, write_item

QUEUE = ".agent/queue"

BOMB = """---
title: laughs
a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
a1: &a1 [*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0]
a2: &a2 [*a1,*a1,*a1,*a1,*a1,*a1,*a1,*a1,*a1]
a3: &a3 [*a2,*a2,*a2,*a2,*a2,*a2,*a2,*a2,*a2]
a4: &a4 [*a3,*a3,*a3,*a3,*a3,*a3,*a3,*a3,*a3]
a5: &a5 [*a4,*a4,*a4,*a4,*a4,*a4,*a4,*a4,*a4]
a6: &a6 [*a5,*a5,*a5,*a5,*a5,*a5,*a5,*a5,*a5]
a7: &a7 [*a6,*a6,*a6,*a6,*a6,*a6,*a6,*a6,*a6]
status: [*a7,*a7,*a7,*a7,*a7,*a7,*a7,*a7,*a7]
---
"""
"""A billion laughs: 9**9 "lol"s from under 500 bytes."""

ALIAS_MESSAGE = ("uses YAML aliases (*a4) that expand to more than 1,000,000 characters; write the values out "
                 "instead of repeating them with &anchors and *aliases")


def write_text(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime: to show that nothing changed."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            info = path.stat()
            found[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return found


def pending_item(number: int, **fields: object) -> WorkItem:
    return WorkItem(id=number, id_str=format_id(number), file=f"{format_id(number)}-pending-x.md", path="",
                    slug="x", status="pending", title=f"item {number}", **fields)


# --- 1. YAML alias bombs ------------------------------------------------------------------------------------


@pytest.mark.fault("a 500-byte YAML alias bomb in an item's front matter: refused at once as a diagnostic naming the file, cached (a re-plan re-parses nothing)")
def test_alias_bomb_in_an_item_is_a_cached_diagnostic(workspace):
    write_text(workspace, f"{QUEUE}/001-pending-laughs.md", BOMB)
    write_item(workspace, 2, "fine", files=["a"])
    reader = QueueReader()
    started = time.monotonic()
    plan = plan_workspace(workspace, None, None, reader)
    assert time.monotonic() - started < 5  # was 28 s, then MemoryError
    [error] = plan.errors
    assert (error.kind, error.item, error.file) == ("bad_front_matter", "001", "001-pending-laughs.md")
    assert error.message == "front matter " + ALIAS_MESSAGE
    assert plan.run_now == ["002"]
    parsed = reader.parse_count
    assert plan_workspace(workspace, None, None, reader) is plan and reader.parse_count == parsed


@pytest.mark.fault("a YAML alias bomb in .agent/config.yaml: a ConfigError naming the file, at once")
def test_alias_bomb_in_the_config_is_a_config_error(workspace):
    write_text(workspace, ".agent/config.yaml", BOMB.replace("---\n", "").replace("title: laughs", "autonomy:"))
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(workspace)
    assert time.monotonic() - started < 5
    assert str(caught.value) == ".agent/config.yaml: " + ALIAS_MESSAGE


def test_small_anchors_and_aliases_still_work(workspace):
    write_text(workspace, ".agent/config.yaml", "runner:\n  command: &argv [claude, -p]\n"
                                                "x_shared: *argv\nautonomy:\n  level: L3\n")
    config, warnings = load_config(workspace)
    assert config.runner_command == ["claude", "-p"] and config.level == "L3"
    item, diagnostics = parse_item("001-pending-x.md", "---\nfiles: &f [src/*.py]\ncomponents: *f\n---\n")
    assert item.files == ["src/*.py"] and item.components == ["src/*.py"] and diagnostics == []


# --- 2. absurd numbers ----------------------------------------------------------------------------------------


NINES = "9" * 400


@pytest.mark.parametrize(("front", "message"), [
    (f"estimate: {NINES}", f"estimate: {NINES[:57]}... is too long: a duration is at most 365 days "
                           "(write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    (f"estimate: '{NINES}m'", f"estimate: '{NINES[:56]}... is too long: a duration is at most 365 days "
                              "(write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    (f"timeout: '{NINES}'", f"timeout: '{NINES[:56]}... is too long: a duration is at most 365 days "
                            "(write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ("estimate: 366d", "estimate: '366d' is too long: a duration is at most 365 days "
                       "(write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ("timeout: 1.0e+400", "timeout: inf is not a duration: it must be a finite number, not negative"),
])
@pytest.mark.anyio
@pytest.mark.fault("an item estimate or timeout of 400 nines (infinity) or over a year: an item diagnostic; queue_plan answers, the server lives")
async def test_absurd_item_durations_are_diagnostics(workspace, front, message):
    write_text(workspace, f"{QUEUE}/001-pending-huge.md", f"---\n{front}\ncommand: 'true'\nfiles: [a]\n---\n")
    write_item(workspace, 2, "after", command="true", blocked_by=[1], files=["b"])
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        plan = await call(client, "queue_plan")
        assert [(e["kind"], e["file"], e["message"]) for e in plan["errors"]] == [
            ("bad_field", "001-pending-huge.md", message)]
        assert plan["run_now"] == [] and plan["predicted_makespan"] == 0
        run = await call(client, "run_queue")
        out = await call(client, "task_output", task_id=run["run_id"], timeout=30)
        assert out["retrieval_status"] == "success"
        assert (await call(client, "list_tasks"))["tasks"]  # the server still answers
    assert statuses(workspace) == {"001": "pending", "002": "pending"}


@pytest.mark.parametrize(("text", "message"), [
    (f"tasks:\n  log_cap: {NINES}\n", f"tasks.log_cap is not valid: {NINES[:57]}... is too large: a size is at most 1 PiB "
                                      f"({1 << 50} bytes)"),
    (f"resources:\n  min_free_memory: '{NINES}GiB'\n", f"resources.min_free_memory is not valid: '{NINES[:56]}... is too "
                                                       f"large: a size is at most 1 PiB ({1 << 50} bytes)"),
    ("tasks:\n  log_cap: 1\n", "tasks.log_cap must be at least 64KiB (65536 bytes), not 1: a smaller cap keeps almost "
                               "nothing of a task's output"),
    ("tasks:\n  wait_cap: 0\n", "tasks.wait_cap must be longer than 0, not 0"),
    ("tasks:\n  wait_cap: 2h\n", "tasks.wait_cap must be at most 3600s (1h), not '2h'"),  # the server's limit, named
    ("tasks:\n  wait_cap: -5s\n", "tasks.wait_cap is not valid: '-5s' is not a duration (write 45s, 30m, 2h, 1h30m, 1:30, "
                                  "or a number of minutes)"),
    ("tasks:\n  wait_cap: .nan\n", "tasks.wait_cap is not valid: nan is not a duration: it must be a finite number, "
                                   "not negative"),
    (f"tasks:\n  wait_cap: {NINES}\n", f"tasks.wait_cap is not valid: {NINES[:57]}... is too long: a duration is at most "
                                       "365 days (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    (f"runner:\n  timeout: '{NINES}h'\n", f"runner.timeout is not valid: '{NINES[:56]}... is too long: a duration is at "
                                          "most 365 days (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    (f"resources:\n  max_load: {NINES}\n", f"resources.max_load must be at most 1e9, not {NINES[:57]}..."),
    (f"tasks:\n  max_tasks: {NINES}\n", f"tasks.max_tasks must be at most 10000000, not {NINES[:57]}..."),
    ("runner:\n  command: [\"echo\", \"a\\0b\"]\n", "runner.command contains a NUL character (\\0), which cannot be "
                                                 "passed to a process; remove it"),
    ("queue:\n  dir: \"q\\0\"\n", "queue.dir contains a NUL character (\\0); remove it"),
])
@pytest.mark.fault("absurd config numbers (400-digit sizes and durations, log_cap 1, wait_cap 0 or nan, NUL in runner.command): a ConfigError naming the key, never OverflowError")
def test_absurd_config_values_are_config_errors(workspace, text, message):
    assert_config_error(workspace, text, message)


def assert_config_error(workspace: Path, text: str, message: str) -> None:
    """A config file holding `text` is refused with exactly `message` (after the file's name)."""
    write_text(workspace, ".agent/config.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(workspace)
    assert str(caught.value) == ".agent/config.yaml: " + message


@pytest.mark.anyio
async def test_a_400_digit_size_is_a_clear_tool_error_and_the_server_lives(workspace):
    write_text(workspace, ".agent/config.yaml", f"tasks:\n  log_cap: {NINES}\n")
    write_item(workspace, 1, "a", command="true")
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        text = await call_error(client, "queue_plan")
        assert "tasks.log_cap is not valid" in text and "at most 1 PiB" in text
        assert "Traceback" not in text and "OverflowError" not in text
        await call(client, "list_tasks")


def test_durations_stay_within_a_year() -> None:
    assert parse_duration("365d") == 365 * 86400
    assert parse_duration(525600) == 365 * 86400  # minutes
    for value in ("366d", 525601, "8761h", "9" * 30 + ":00", 1e300):
        with pytest.raises(ValueError, match="is too long: a duration is at most 365 days"):
            parse_duration(value)


HEX = "0x" + "f" * 4000
"""16,000 bits: 4,817 decimal digits, past the 4,300 Python turns into text (YAML builds it without the limit)."""
DURATION_HELP = "(write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"


def test_numbers_too_long_to_print_are_named_by_their_digits() -> None:
    assert short_repr(int(HEX, 16)) == "a number of 4,817 digits"
    assert short_repr(-10 ** 5000) == "a negative number of 5,001 digits"
    assert (short_repr(10 ** 4300 - 1), short_repr(10 ** 4300)) == (f"{'9' * 57}...", "a number of 4,301 digits")
    assert short_repr(NINES) == f"'{NINES[:56]}..."  # what every earlier message showed, unchanged
    assert short_repr(int("f" * 1_000_000, 16)) == "a number of 1,204,120 digits"


@pytest.mark.parametrize(("text", "message"), [
    (f"autonomy:\n  max_parallel: {HEX}\n", "autonomy.max_parallel must be between 1 and 64, not a number of 4,817 digits"),
    (f"autonomy:\n  l3_settings:\n    max_parallel: {HEX}\n",
     "autonomy.l3_settings.max_parallel must be between 1 and 64, not a number of 4,817 digits"),
    (f"runner:\n  retries: {HEX}\n", "runner.retries must be at most 100, not a number of 4,817 digits"),
    (f"runner:\n  retries: -{HEX}\n", "runner.retries must be at least 0, not a negative number of 4,817 digits"),
    (f"tasks:\n  max_tasks: {HEX}\n", "tasks.max_tasks must be at most 10000000, not a number of 4,817 digits"),
    (f"runner:\n  max_cost_usd: {HEX}\n", "runner.max_cost_usd must be at most 1e9, not a number of 4,817 digits"),
    (f"runner:\n  max_tokens: {HEX}\n",
     "runner.max_tokens must be a whole number of at most 4,300 digits, not a number of 4,817 digits"),
    (f"runner:\n  timeout: {HEX}\n", "runner.timeout is not valid: a number of 4,817 digits is too long: a duration is "
                                     f"at most 365 days {DURATION_HELP}"),
    (f"worktree:\n  setup_timeout: {HEX}\n", "worktree.setup_timeout is not valid: a number of 4,817 digits is too "
                                             f"long: a duration is at most 365 days {DURATION_HELP}"),
    (f"autonomy:\n  min_free_memory: {HEX}\n", "autonomy.min_free_memory is not valid: a number of 4,817 digits is too "
                                               f"large: a size is at most 1 PiB ({1 << 50} bytes)"),
    (f"autonomy:\n  level: {HEX}\n", "autonomy.level must be L1, L2 or L3, not a number of 4,817 digits"),
    ("autonomy:\n  max_parallel: " + "9" * 5000 + "\n",
     "autonomy.max_parallel must be between 1 and 64, not a number of 5,000 digits"),
    ("runner:\n  timeout: " + "9" * 5000 + "\n", "runner.timeout is not valid: a number of 5,000 digits is too long: "
                                                 f"a duration is at most 365 days {DURATION_HELP}"),
    ("runner:\n  timeout: '" + "9" * 5000 + ":00'\n", f"runner.timeout is not valid: '{'9' * 56}... is too long: "
                                                      f"a duration is at most 365 days {DURATION_HELP}"),
])
@pytest.mark.fault("a config number of more than 4,300 digits (0xfff... or 5,000 nines; any key): a ConfigError naming the key "
                   "and the number of digits, never Python's ValueError (Exceeds the limit ... set_int_max_str_digits)")
def test_config_numbers_too_long_to_print_are_config_errors(workspace, text, message):
    assert_config_error(workspace, text, message)


@pytest.mark.anyio
@pytest.mark.fault("a 4,817-digit autonomy.max_parallel: `plan` and `run` exit 2 naming the key (no traceback); `serve` "
                   "starts with the default settings and a warning; queue_plan is a clear tool error")
async def test_a_config_number_too_long_to_print_stops_no_command(workspace, caplog):
    write_text(workspace, ".agent/config.yaml", f"autonomy:\n  max_parallel: {HEX}\n")
    write_item(workspace, 1, "a", command="true")
    message = ".agent/config.yaml: autonomy.max_parallel must be between 1 and 64, not a number of 4,817 digits"
    script = Path(sys.executable).parent / "agent-parallel"
    for command in ("plan", "run"):
        result = subprocess.run([str(script), command, "--root", str(workspace)], capture_output=True, text=True,
                                timeout=60)
        assert (result.returncode, result.stderr.strip()) == (2, f"agent-parallel: error: {message}")
    with caplog.at_level("WARNING"):
        assert ServerSettings.for_workspace(workspace) == ServerSettings()
    assert f"{message}; using the default settings" in caplog.text
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        assert await call_error(client, "queue_plan") == f"Error executing tool queue_plan: {message}"
        await call(client, "list_tasks")
    assert statuses(workspace) == {"001": "pending"}


ITEM_HELP = "an id has at most 9 digits"


@pytest.mark.parametrize(("front", "message"), [
    (f"retries: {HEX}", "retries: a number of 4,817 digits is not a whole number from 0 to 100"),
    (f"priority: {HEX}", "priority: a number of 4,817 digits is not one of critical, high, medium, low"),
    (f"isolation: {HEX}", "isolation: a number of 4,817 digits is not none or worktree"),
    (f"resources: {{num_cpus: {HEX}}}", "resources: CPU must be a number from 0 to 1e+06, not a number of 4,817 digits"),
    (f"title: {HEX}", "title must be a string, not a number of 4,817 digits"),
    (f"files: {HEX}", "files must be a list of strings or a comma-separated string, not a number of 4,817 digits"),
    (f"files: [a, {HEX}]", "files: each entry must be a string, not a number of 4,817 digits"),
    (f"components: {HEX}",
     "components must be a list of strings or a comma-separated string, not a number of 4,817 digits"),
    (f"blocks: {HEX}", f"blocks: a number of 4,817 digits cannot be an item id ({ITEM_HELP})"),
    (f"blocked_by: [1, {HEX}]", f"blocked_by: a number of 4,817 digits cannot be an item id ({ITEM_HELP})"),
    (f"estimate: {HEX}", f"estimate: a number of 4,817 digits is too long: a duration is at most 365 days {DURATION_HELP}"),
    (f"timeout: -{HEX}", "timeout: a negative number of 4,817 digits is not a duration: it must be a finite number, "
                         "not negative"),
    ("title: " + "1" * 5000, "title must be a string, not a number of 5,000 digits"),
    ("retries: '" + "9" * 5000 + "'", f"retries: '{'9' * 56}... is not a whole number from 0 to 100"),
    ("estimate: '" + "9" * 5000 + ":00'", f"estimate: '{'9' * 56}... is too long: a duration is at most 365 days "
                                          f"{DURATION_HELP}"),
    ("resources: 'num_cpus: " + "9" * 5000 + "'", "resources: CPU must be a number from 0 to 1e+06, not a number of "
                                                  "5,000 digits"),
])
@pytest.mark.fault("one item with a number of more than 4,300 digits (0xfff... or 5,000 nines) in any field: a bad_field "
                   "diagnostic naming the file and the field, the other items planned as usual (was a ValueError for "
                   "the whole queue)")
def test_item_numbers_too_long_to_print_are_field_diagnostics(workspace, front, message):
    write_item(workspace, 1, "good", command="true", files=["a"])
    files = "" if front.startswith("files:") else "files: [b]\n"
    write_text(workspace, f"{QUEUE}/002-pending-bad.md", f"---\n{front}\ncommand: 'true'\n{files}---\n# bad\n")
    plan = plan_workspace(workspace, None, None, QueueReader())
    assert [(e.kind, e.item, e.file, e.message) for e in plan.errors] == [
        ("bad_field", "002", "002-pending-bad.md", message)]
    assert plan.run_now == ["001"]


@pytest.mark.anyio
@pytest.mark.fault("queue_plan, launch_task(item=001) and run_queue beside an item whose retries is a 4,817-digit number: "
                   "the item is a bad_field diagnostic, the good item runs (was 'unexpected ValueError ... This is a bug')")
async def test_an_item_number_too_long_to_print_leaves_the_rest_of_the_queue_running(client, workspace):
    write_item(workspace, 1, "good", command="true", files=["a"])
    write_item(workspace, 3, "also-good", command="true", files=["c"])
    write_text(workspace, f"{QUEUE}/002-pending-bad.md", f"---\nretries: {HEX}\ncommand: 'true'\nfiles: [b]\n---\n")
    plan = await call(client, "queue_plan")
    assert [(e["kind"], e["file"], e["message"]) for e in plan["errors"]] == [
        ("bad_field", "002-pending-bad.md", "retries: a number of 4,817 digits is not a whole number from 0 to 100")]
    assert plan["run_now"] == ["001", "003"]
    out = await call(client, "launch_task", item="001", run_in_background=False)
    assert out["status"] == "completed", out
    run = await call(client, "run_queue")
    out = await call(client, "task_output", task_id=run["run_id"], timeout=30)
    assert out["retrieval_status"] == "success"
    assert statuses(workspace) == {"001": "completed", "002": "pending", "003": "completed"}


@pytest.mark.fault("a 1 MiB config holding a YAML 1.1 base-60 number (1:59:59:... 345,000 times; PyYAML builds it in "
                   "quadratic time): read in well under a second as text, an unknown key warned about (was 40-90 s a read)")
def test_a_long_base_60_number_in_the_config_is_read_at_once(workspace):
    write_text(workspace, ".agent/config.yaml", "autonomy:\n  level: L3\nnotes: 1" + ":59" * 345_000 + "\n"
               "more: 1" + ":59" * 1000 + ".5\n")
    assert (workspace / ".agent/config.yaml").stat().st_size < 1024 * 1024
    started = time.monotonic()
    config, warnings = load_config(workspace)
    assert time.monotonic() - started < 15  # a hang guard (it took 40-90 s); typically 0.2 s
    assert config.level == "L3"
    assert [w.split(" (known")[0] for w in warnings] == ["unknown key notes ignored", "unknown key more ignored"]
    write_text(workspace, ".agent/config.yaml", "runner:\n  timeout: 1" + ":59" * 345_000 + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(workspace)
    assert time.monotonic() - started < 15  # a hang guard
    assert str(caught.value) == (".agent/config.yaml: runner.timeout is not valid: '1" + ":59" * 18 + ":... is not a "
                                 f"duration {DURATION_HELP}")


# --- 3. bounded plans -----------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.fault("1,000 items sharing one component: queue_plan answers in seconds with a bounded answer (200 pairs, a total, one group), not 98.6 MB")
async def test_a_thousand_items_sharing_a_component_give_a_bounded_plan(workspace):
    for number in range(1, 1001):
        write_text(workspace, f"{QUEUE}/{number:04d}-pending-item-{number}.md",
                   f"---\ncomponents: [db]\nestimate: 1m\n---\n# item {number}\n")
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        started = time.monotonic()
        result = await client.call_tool("queue_plan", {})
        elapsed = time.monotonic() - started
    assert not result.is_error
    plan = result.structured_content
    size = len(json.dumps(plan))
    assert size < 2_000_000 and elapsed < 15  # was 98.6 MB in 21 s
    assert plan["conflicts_total"] == 1000 * 999 // 2
    assert len(plan["conflicts"]) == MAX_CONFLICTS_SHOWN
    assert plan["conflicts"][0] == {"a": "0001", "b": "0002", "files": [], "components": ["db"]}
    assert plan["conflict_groups"] == [{"kind": "component", "name": "db",
                                        "items": [f"{n:04d}" for n in range(1, 1001)], "overlaps": [],
                                        "overlaps_total": 0}]
    assert plan["waves"] == [[f"{n:04d}"] for n in range(1, MAX_WAVES_SHOWN + 1)]  # one at a time: they all conflict
    assert plan["waves_total"] == 1000
    assert plan["predicted_makespan"] == plan["lower_bound"] == 60_000


@pytest.mark.fault("3,000 items whose patterns all overlap one another (docs/*{i}*.md): planned in seconds, one key "
                   "and one group, each pair naming its two patterns (was 544 s and 1.6 GB)")
def test_thousands_of_overlapping_patterns_plan_in_seconds() -> None:
    items = [pending_item(n, files=[f"docs/*{n}*.md"]) for n in range(1, 3001)]
    started = time.monotonic()
    plan = make_plan(items, [], 5)
    elapsed = time.monotonic() - started
    assert elapsed < 15 and not plan.warnings  # exact: no pattern was left uncompared
    assert plan.conflicts_total == 3000 * 2999 // 2 and plan.waves_total == 3000
    assert plan.conflicts[0].files == ["docs/*1*.md", "docs/*2*.md"]
    [group] = plan.conflict_groups
    assert group.name == "docs/*1*.md and 2,999 more patterns with its literal start and end"
    assert len(group.items) == 3000 and group.overlaps_total == 0


@pytest.mark.fault("1,500 items whose patterns end in ? and all overlap (docs/*{i}*.m?), too many to compare one by one: "
                   "planned in seconds, the uncompared ones taken to overlap every file with a warning naming the fix "
                   "(was 58 s and 207 MB for 1,000)")
def test_patterns_too_many_to_compare_are_taken_to_overlap_everything() -> None:
    items = [pending_item(n, files=[f"docs/*{n}*.m?"]) for n in range(1, 1501)]
    items.append(pending_item(1501, files=["src/a.py"]))
    started = time.monotonic()
    plan = make_plan(items, [], 5)
    elapsed = time.monotonic() - started
    assert elapsed < 15
    assert plan.conflicts_total == 1500 * 1499 // 2 + len(plan.warnings)  # + each assumed one with src/a.py
    assert 0 < len(plan.warnings) < 1500 and {warning.kind for warning in plan.warnings} == {"overlap_assumed"}
    first = plan.warnings[0]
    assert first.message == (
        f"files: {items[int(first.item) - 1].files[0]!r} is taken to overlap every file, so the item never runs beside "
        f"another that declares files: the queue holds too many overlapping patterns to compare one by one "
        f"({len(plan.warnings):,} were not); declare directories, or patterns that start and end with *")
    assert plan.run_now == ["001", "1501"]  # an item compared exactly still runs beside src/a.py


@pytest.mark.fault("2,000 nested paths (a, a/a, a/a/a, ...: 2 million overlapping pairs): planned in seconds, the "
                   "deepest taken to overlap every file with a warning (was 23.9 s and 3.4 GB)")
def test_thousands_of_nested_paths_plan_in_seconds() -> None:
    items = [pending_item(n, files=["/".join(["a"] * n)]) for n in range(1, 2001)]
    started = time.monotonic()
    plan = make_plan(items, [], 5)
    elapsed = time.monotonic() - started
    assert elapsed < 15
    assert plan.conflicts_total == 2000 * 1999 // 2 and plan.waves_total == 2000
    assert 0 < len(plan.warnings) < 2000 and {warning.kind for warning in plan.warnings} == {"overlap_assumed"}
    assert int(plan.warnings[0].item) > 800  # the first ones met exactly, the budget ran out on the deep ones
    first = plan.warnings[0]
    assert first.message == (
        f"files: {short_repr(items[int(first.item) - 1].files[0])} is taken to overlap every file, so the item never "
        f"runs beside another that declares files: the queue holds too many nested paths to compare one by one "
        f"({len(plan.warnings):,} were not); declare the directory they share instead of each path below it")


@pytest.mark.fault("two patterns of 3,000 characters with many stars (x*a*a*...?z, x*b*b*...?z): planned at once, "
                   "taken to conflict (comparing them token by token took 13 s); 2,000 patterns of up to 2,000 "
                   "characters plan in seconds")
def test_long_patterns_are_not_compared_token_by_token() -> None:
    items = [pending_item(1, files=["x" + "*a" * 1500 + "?z"]), pending_item(2, files=["x" + "*b" * 1500 + "?z"]),
             pending_item(3, files=["y" + "*a" * 1500 + "?z"])]
    items += [pending_item(n, files=[f"{n}" + "x" * n + "*"]) for n in range(4, 2004)]
    started = time.monotonic()
    plan = make_plan(items, [], 5)
    elapsed = time.monotonic() - started
    assert elapsed < 15 and not plan.warnings
    assert [(pair.a, pair.b) for pair in plan.conflicts] == [("001", "002")] and plan.conflicts_total == 1


@pytest.mark.fault("a 5,000-item dependency cycle: one cycle error cut after 10 ids, short item reasons, under 2 MB (was 196 MB)")
def test_a_five_thousand_item_cycle_gives_one_short_error() -> None:
    items = [pending_item(n, blocked_by=[n % 5000 + 1], files=[f"f{n}"]) for n in range(1, 5001)]
    started = time.monotonic()
    plan = make_plan(items, [], 5)
    elapsed = time.monotonic() - started
    size = len(plan.model_dump_json())
    assert size < 2_000_000 and elapsed < 15
    [error] = plan.errors
    assert error.message == ("dependency cycle: 001 -> 002 -> 003 -> 004 -> 005 -> 006 -> 007 -> 008 -> 009 -> 010 "
                             "-> … 4990 more -> 001 (each item waits on the next)")
    assert len(error.path) == 5001
    assert {row.reason for row in plan.items} == {"in a dependency cycle of 5000 items (see the cycle error for 001)"}
    assert "%% drawn in part" in plan.mermaid and len(plan.mermaid) < 50_000


def test_conflict_groups_name_overlapping_entries() -> None:
    plan = make_plan([pending_item(1, files=["src"]), pending_item(2, files=["src/a.py"]),
                      pending_item(3, files=["src/a.py"]), pending_item(4, files=["docs/*.md"]),
                      pending_item(5, files=["docs/x.md"]), pending_item(6, files=["lib"])], [], 5)
    assert [(g.kind, g.name, g.items, g.overlaps) for g in plan.conflict_groups] == [
        ("file", "docs/*.md", ["004"], ["docs/x.md"]), ("file", "docs/x.md", ["005"], ["docs/*.md"]),
        ("file", "src", ["001"], ["src/a.py"]), ("file", "src/a.py", ["002", "003"], ["src"])]
    assert plan.conflicts_total == 4
    assert [(c.a, c.b, c.files) for c in plan.conflicts] == [
        ("001", "002", ["src", "src/a.py"]), ("001", "003", ["src", "src/a.py"]), ("002", "003", ["src/a.py"]),
        ("004", "005", ["docs/*.md", "docs/x.md"])]


# --- 4. item ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["١٢٣-pending-x.md", "¹²³-pending-x.md", "１２３-pending-x.md", "0١٢-pending-x.md"])
@pytest.mark.fault("item files named with non-ASCII digits (١٢٣, superscripts): a bad_name diagnostic, never item 123 or a crash")
def test_non_ascii_digits_are_not_item_ids(workspace, name):
    write_text(workspace, f"{QUEUE}/{name}", "# x\n")
    plan = plan_workspace(workspace, None, None, QueueReader())
    assert plan.items == []
    [error] = plan.errors
    assert error.kind == "bad_name" and error.file == name and error.item is None


@pytest.mark.parametrize(("text", "expected"), [
    ("007", 7), ("7", 7), ("#7", 7), (" 007 ", 7), ("007-add-login", 7), ("000000007", 7),
])
def test_parse_item_id_accepts_what_blocked_by_accepts(text, expected):
    assert parse_item_id(text) == expected
    item, diagnostics = parse_item("010-pending-x.md", f"---\nblocked_by: ['{text}']\n---\n")
    assert item.blocked_by == [expected] and diagnostics == []


@pytest.mark.parametrize(("text", "message"), [
    ("١٢٣", "item '١٢٣' is not an item id; give the number from the file name, e.g. \"007\""),
    ("²", "item '²' is not an item id; give the number from the file name, e.g. \"007\""),
    ("1234567890", "item '1234567890' has more than 9 digits; item ids have at most 9 (give the number from the "
                   "file name, e.g. \"007\")"),
    ("", "item '' is not an item id; give the number from the file name, e.g. \"007\""),
])
@pytest.mark.fault("update_item/launch_task ids with non-ASCII digits or 10 digits: refused naming the rule (no crash, no item 123)")
def test_parse_item_id_refuses_with_the_rule(text, message):
    with pytest.raises(QueueError) as caught:
        parse_item_id(text)
    assert str(caught.value) == message
    item, diagnostics = parse_item("010-pending-x.md", f"---\nblocked_by: ['{text}']\n---\n")
    assert item.blocked_by == [] and (diagnostics or not text)


@pytest.mark.anyio
async def test_update_item_takes_a_file_stem_and_blames_the_digit_limit(client, workspace):
    write_item(workspace, 7, "add-login", files=["a"])
    moved = await call(client, "update_item", item="007-add-login", status="in_progress")
    assert moved["file"] == "007-in_progress-add-login.md"
    text = await call_error(client, "update_item", item="1234567890", status="completed")
    assert "has more than 9 digits" in text and "is not an item id" not in text


@pytest.mark.anyio
async def test_launch_task_takes_the_id_form_blocked_by_takes(client, workspace):
    """launch_task(item="007-add-login") was refused while `blocked_by: 007-add-login` was accepted."""
    write_item(workspace, 7, "add-login", command="echo logged-in", files=["a"])
    out = await call(client, "launch_task", item="007-add-login", run_in_background=False)
    assert out["status"] == "completed" and out["output"] == "logged-in\n" and out["item_id"] == "007"


# --- 5. planning changes nothing -------------------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.anyio
@pytest.mark.fault("queue_plan (read-only) with a stale claim: reported as a warning, no file renamed or written; run_queue releases it")
async def test_queue_plan_reports_a_stale_claim_without_moving_it(client, workspace):
    write_item(workspace, 1, "orphan", status="in_progress", command="true", files=["a"])
    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True, exist_ok=True)
    claim = {"time": 1.0, "item": "001", "from": "pending", "to": "in_progress", "by": "run r1", "reason": None,
             "pid": dead_pid(), "pid_start": 12345}
    (runs / HISTORY_FILE).write_text(json.dumps(claim) + "\n")
    before = listing(workspace)
    for _ in range(2):
        plan = await call(client, "queue_plan")
        [warning] = [w for w in plan["warnings"] if w["kind"] == "stale_claim"]
        assert (warning["item"], warning["file"]) == ("001", "001-in_progress-orphan.md")
        assert warning["message"].startswith(f"claimed by run r1 of a server (pid {claim['pid']}) that no longer "
                                             "runs; planning leaves it in_progress")
    assert listing(workspace) == before
    released = release_stale_claims(workspace / QUEUE, runs)  # what run_queue and update_item do
    assert [(item, file) for item, file, _ in released] == [("001", "001-blocked-orphan.md")]


# --- 6. claims -------------------------------------------------------------------------------------------


@pytest.fixture
def queue(workspace: Path) -> tuple[Path, Path]:
    queue_dir, runs = workspace / QUEUE, workspace / ".agent/runs"
    queue_dir.mkdir(parents=True)
    runs.mkdir(parents=True)
    return queue_dir, runs


@pytest.mark.fault("update_item(running item, pending) is refused: the item could otherwise be launched a second time while it runs")
def test_a_running_item_cannot_be_moved_back_to_pending(queue):
    queue_dir, runs = queue
    (queue_dir / "003-pending-x.md").write_text("x")
    move_item(queue_dir, runs, 3, "in_progress", by="run r1", owned=True)
    lines = (runs / HISTORY_FILE).read_text()
    with pytest.raises(BadTransition) as caught:
        move_item(queue_dir, runs, 3, "pending", by="an agent (update_item)")
    assert str(caught.value) == "item 003 is in_progress; it can move to blocked, completed, failed, not pending"
    assert [p.name for p in queue_dir.iterdir()] == ["003-in_progress-x.md"]
    assert (runs / HISTORY_FILE).read_text() == lines
    # a run gives back a claim that never ran, explicitly
    assert release_claim(queue_dir, runs, 3, by="run r1", reason="could not start").name == "003-pending-x.md"
    assert history(runs, "003")[-1]["to"] == "pending"
    with pytest.raises(ClaimLost, match="^item 003 is pending, not in_progress: it was moved by run r1$"):
        release_claim(queue_dir, runs, 3, by="run r1", reason="again")


@pytest.mark.anyio
async def test_update_item_pending_on_a_running_item_is_refused_through_the_tool(client, workspace):
    write_item(workspace, 1, "busy", command="sleep 30", files=["a"])
    await call(client, "update_item", item="001", status="in_progress")
    text = await call_error(client, "update_item", item="001", status="pending")
    assert text.endswith("item 001 is in_progress; it can move to blocked, completed, failed, not pending")
    assert statuses(workspace) == {"001": "in_progress"}


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.fault("another process holds the queue lock forever: a move gives up after LOCK_TIMEOUT_S with an error naming the lock file; nothing moved")
def test_queue_lock_never_waits_forever(queue, monkeypatch):
    queue_dir, runs = queue
    (queue_dir / "001-pending-x.md").write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(runs / "queue.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr("agent_parallel.queue.claims.LOCK_TIMEOUT_S", 0.5)
        started = time.monotonic()
        with pytest.raises(QueueError) as caught:
            move_item(queue_dir, runs, 1, "in_progress", by="agent-a")
        assert 0.4 < time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    assert str(caught.value).startswith(f"the queue lock {runs / 'queue.lock'} has been held by another process for "
                                        "over 0.5 s with no item moved meanwhile; nothing was moved.")
    assert [p.name for p in queue_dir.iterdir()] == ["001-pending-x.md"]
    assert move_item(queue_dir, runs, 1, "in_progress", by="agent-a").name == "001-in_progress-x.md"


BUSY_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
history = sys.argv[2]
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    fcntl.flock(fd, fcntl.LOCK_EX)
    with open(history, "a") as f:
        f.write('{"item": "999", "to": "pending"}\\n')  # a move made: progress
    time.sleep(0.2)
    fcntl.flock(fd, fcntl.LOCK_UN)
    time.sleep(0.0005)
print("done", flush=True)
"""


@pytest.mark.fault("fifty agents share one queue lock: a claimant that waits longer than LOCK_TIMEOUT_S while others keep "
                   "moving items is busy, not stuck, and is never timed out (a 50-claimer race lost an item to it)")
def test_queue_lock_wait_goes_on_while_others_make_progress(queue, monkeypatch):
    queue_dir, runs = queue
    (queue_dir / "001-pending-x.md").write_text("x")
    monkeypatch.setattr("agent_parallel.queue.claims.LOCK_TIMEOUT_S", 0.5)
    holder = subprocess.Popen([sys.executable, "-c", BUSY_HOLDER, str(runs / "queue.lock"), str(runs / "history.jsonl"),
                               "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.1)  # the holder has the lock and keeps it nearly all the time, moving items
        started = time.monotonic()
        assert move_item(queue_dir, runs, 1, "in_progress", by="agent-a").name == "001-in_progress-x.md"
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def full_runs_dir(workspace: Path):
    """`.agent/runs` on a real 64 KiB tmpfs, filled to the last byte after the server started."""
    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(runs)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def fill() -> None:
        fd = os.open(runs / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for size in (4096, 1):
                try:
                    while True:
                        os.write(fd, b"x" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
    try:
        yield runs, fill
    finally:
        subprocess.run(["umount", "-l", str(runs)], check=False)


@pytest.mark.anyio
@pytest.mark.fault("update_item on a full disk (a real full tmpfs on .agent/runs): an error naming the cause and the fix, and the file is not renamed")
async def test_a_move_on_a_full_disk_changes_nothing(workspace, full_runs_dir):
    runs, fill = full_runs_dir
    write_item(workspace, 1, "x", command="true", files=["a"])
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        await call(client, "queue_plan")
        (runs / "queue.lock").touch()
        (runs / HISTORY_FILE).write_text("")
        fill()
        text = await call_error(client, "update_item", item="001", status="in_progress")
        assert text.endswith(f"cannot move item 001 to in_progress: the run history {runs / HISTORY_FILE} cannot be "
                             "written (No space left on device); nothing was changed. Free some disk space and try again")
        assert statuses(workspace) == {"001": "pending"}
        assert (runs / HISTORY_FILE).read_text() == ""
        (runs / "filler").unlink()
        await call(client, "update_item", item="001", status="in_progress")
        assert statuses(workspace) == {"001": "in_progress"}
        assert [m["to"] for m in history(runs)] == ["in_progress"]


# --- 7. a bounded history ------------------------------------------------------------------------------


@pytest.mark.fault("history.jsonl grows without bound: it rotates at 1 MiB (one old file kept), and lookups under the lock read only its end (a 64 GiB sparse history answers at once)")
def test_history_is_rotated_and_read_from_the_end(queue):
    queue_dir, runs = queue
    (queue_dir / "001-pending-x.md").write_text("x")
    claim = b'\n{"item": "001", "from": "pending", "to": "in_progress", "by": "run old"}\n'
    with open(runs / HISTORY_FILE, "wb") as stream:  # an old, enormous history: 64 GiB, sparse
        stream.truncate(64 << 30)
        stream.seek(0, os.SEEK_END)
        stream.write(claim)
    os.rename(queue_dir / "001-pending-x.md", queue_dir / "001-in_progress-x.md")
    started = time.monotonic()
    with pytest.raises(ClaimLost, match="^item 001 is already claimed by run old$"):
        move_item(queue_dir, runs, 1, "in_progress", by="agent-b")
    assert claimant(runs, "001") == "run old"
    assert time.monotonic() - started < 5  # reading 64 GiB would take minutes or run out of memory
    move_item(queue_dir, runs, 1, "completed", by="run old")
    assert (runs / HISTORY_FILE).stat().st_size < 1024
    assert (runs / OLD_HISTORY_FILE).stat().st_size == (64 << 30) + len(claim)
    for number in range(2, 1200):  # about 2.6 MB of moves: the reasons are cut to 2,000 characters
        path = queue_dir / f"{number:04d}-pending-x.md"
        path.write_text("x")
        move_item(queue_dir, runs, number, "in_progress", by="agent-a", reason="r" * 100_000, known=path)
    assert (runs / HISTORY_FILE).stat().st_size <= 1024 * 1024
    assert (runs / OLD_HISTORY_FILE).stat().st_size <= 1024 * 1024
    assert sorted(p.name for p in runs.iterdir() if "history" in p.name) == [OLD_HISTORY_FILE, HISTORY_FILE]
    assert claimant(runs, "1199") == "agent-a"
    assert len(history(runs, "1199")[0]["reason"]) <= 2000


# --- 8. continue_on_error at L3 -------------------------------------------------------------------------


def test_stops_on_first_failure_is_one_rule() -> None:
    assert [stops_on_first_failure(level, coe) for level in ("L1", "L2", "L3") for coe in (None, True, False)] == [
        True, True, True, True, True, True, False, False, True]


def test_level_l3_alone_continues_past_failures(workspace):
    write_text(workspace, ".agent/config.yaml", "autonomy:\n  level: L3\n")
    config, _ = load_config(workspace)
    assert config.continue_on_error is None and not config.stops_on_first_failure
    write_text(workspace, ".agent/config.yaml", "autonomy:\n  level: L3\n  continue_on_error: false\n")
    assert load_config(workspace)[0].stops_on_first_failure


@pytest.mark.anyio
@pytest.mark.fault("run_queue(level=L3) without continue_on_error: continues past a failure (the seed's L3), so an independent item always starts")
async def test_run_queue_at_l3_continues_by_default(client, workspace):
    write_item(workspace, 1, "fails", command="exit 3", files=["a"], estimate="10m")
    write_item(workspace, 2, "later", command="true", files=["b"], blocked_by=[3])
    write_item(workspace, 3, "slow", command="sleep 0.5", files=["c"])
    write_item(workspace, 4, "after-fail", command="true", files=["d"], blocked_by=[1])
    run = await call(client, "run_queue", level="L3", max_parallel=1)
    out = await call(client, "task_output", task_id=run["run_id"], timeout=30)
    assert out["retrieval_status"] == "success"
    assert statuses(workspace) == {"001": "failed", "002": "completed", "003": "completed", "004": "pending"}


# --- 9. NUL characters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("front", "field"), [('title: "x\\0y"', "title"), ('command: "echo a\\0b"', "command")])
@pytest.mark.anyio
@pytest.mark.fault("a NUL in an item's YAML title or command: an item diagnostic at parse time; the item never starts and the server lives")
async def test_nul_in_an_item_field_is_a_diagnostic(client, workspace, front, field):
    write_text(workspace, f"{QUEUE}/001-pending-nul.md", f"---\n{front}\nfiles: [a]\n---\n")
    if field == "title":
        write_text(workspace, f"{QUEUE}/001-pending-nul.md", f"---\n{front}\ncommand: 'true'\nfiles: [a]\n---\n")
    plan = await call(client, "queue_plan")
    assert [(e["kind"], e["message"]) for e in plan["errors"]] == [
        ("bad_field", f"{field} contains a NUL character (\\0), which cannot be passed to a process "
                      "(the item's title and command are); remove it")]
    text = await call_error(client, "launch_task", item="001")
    assert "item 001 is not ready: has an error" in text
    assert statuses(workspace) == {"001": "pending"}
    await call(client, "list_tasks")
