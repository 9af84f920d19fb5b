"""Claude Code shows its model a tool's answer whole up to 50,000 characters, else a file and a 2 KB
preview, unless the tool declares more (``_meta["anthropic/maxResultSizeChars"]``): the tools whose
answers can be larger declare ``INLINE_ANSWER_CHARS``, and the answers the docs size for them fit.
(What Claude Code does with it: tests/test_clients.py, through the real CLI.)"""

from __future__ import annotations

import json

import pytest
from mcp import Client

from agent_parallel.server.tools import INLINE_ANSWER_CHARS
from conftest import call

pytestmark = pytest.mark.anyio

CLAUDE_CODE_INLINE_CHARS = 50_000


def shown(answer: dict) -> int:
    """The answer's size as Claude Code passes it on: its structured content as compact JSON."""
    return len(json.dumps(answer, separators=(",", ":"), ensure_ascii=False))


async def test_the_tools_whose_answers_can_pass_50000_characters_declare_the_size_they_need(client: Client):
    declared = {tool.name: (tool.meta or {}).get("anthropic/maxResultSizeChars") for tool in (await client.list_tools()).tools}
    large = {"launch_task", "task_output", "cancel_task", "list_tasks", "queue_plan"}
    assert {name: declared[name] for name in large} == dict.fromkeys(large, INLINE_ANSWER_CHARS)
    assert not {name: size for name, size in declared.items() if name not in large and size is not None}


async def test_a_300_command_fan_out_40_shards_with_output_and_a_full_page_fit_what_they_declare(client: Client):
    group = await call(client, "launch_task", commands=[f"echo shard {n}" for n in range(300)], max_parallel=20,
                       run_in_background=False)
    assert group["counts"] == {"completed": 300}
    assert CLAUDE_CODE_INLINE_CHARS < shown(group) < INLINE_ANSWER_CHARS
    again = await call(client, "task_output", task_id=group["group_id"])
    assert CLAUDE_CODE_INLINE_CHARS < shown(again) < INLINE_ANSWER_CHARS
    shards = await call(client, "launch_task", commands=[f"seq -f 'shard {i:02d} line %05g' 1 1000" for i in range(40)],
                        max_parallel=8, run_in_background=False)  # issue 11's "40 test shards, 8 at a time"
    assert CLAUDE_CODE_INLINE_CHARS < shown(shards) < INLINE_ANSWER_CHARS
    task = (await call(client, "launch_task", command="yes output | head -c 200000"))["task_id"]
    page = await call(client, "task_output", task_id=task, max_bytes=65536)
    assert len(page["output"]) == 65536 and CLAUDE_CODE_INLINE_CHARS < shown(page) < INLINE_ANSWER_CHARS


CONTROL_BYTES = "head -c {n} /dev/zero | tr '\\0' '\\1'"
"""Output JSON writes six characters a byte (``\\u0001``): 48 KiB of it is an answer of 290,000."""


@pytest.mark.fault("a task prints control characters (six characters a byte in JSON: a 64 KiB page was 390,000): its pages "
                   "come shorter so every answer fits what Claude Code shows whole, and paging with next_cursor reads "
                   "every byte")
async def test_output_that_json_escapes_byte_by_byte_comes_in_shorter_pages_that_fit_and_lose_nothing(client: Client):
    task = (await call(client, "launch_task", command=CONTROL_BYTES.format(n=100_000), run_in_background=False))
    assert task["exit_code"] == 0 and shown(task) <= INLINE_ANSWER_CHARS
    assert 0 < len(task["output"]) < 16384 and task["truncated"] is True
    text, cursor, pages = "", 0, 0
    while cursor < 100_000:  # paged from the start with the largest pages: each fits, together they are all of it
        page = await call(client, "task_output", task_id=task["task_id"], cursor=cursor, max_bytes=65536)
        assert shown(page) <= INLINE_ANSWER_CHARS and page["cursor"] == cursor and page["output"]
        text, cursor, pages = text + page["output"], page["next_cursor"], pages + 1
    assert text == "\1" * 100_000 and pages > 100_000 // 65536 + 1
    latest = await call(client, "task_output", task_id=task["task_id"], max_bytes=65536)  # the most recent output
    assert shown(latest) <= INLINE_ANSWER_CHARS and latest["next_cursor"] == 100_000
    assert set(latest["output"]) == {"\1"} and 10_000 < len(latest["output"]) < 65536


@pytest.mark.fault("256 tasks print control characters: their shared answer (381,000 characters) now fits, each "
                   "task's output whole on its own")
async def test_several_tasks_whose_output_json_escapes_byte_by_byte_share_an_answer_that_fits(client: Client):
    group = await call(client, "launch_task", commands=[CONTROL_BYTES.format(n=400)] * 256, max_parallel=20,
                       run_in_background=False)
    assert group["counts"] == {"completed": 256} and shown(group) <= INLINE_ANSWER_CHARS
    assert all(entry["output"] and set(entry["output"]) == {"\1"} for entry in group["tasks"])
    again = await call(client, "task_output", task_id=group["group_id"])
    assert again["counts"] == {"completed": 256} and len(again["tasks"]) == 256 and shown(again) <= INLINE_ANSWER_CHARS
    one = await call(client, "task_output", task_id=group["tasks"][0]["task_id"], cursor=0)  # each whole on its own
    assert one["output"] == "\1" * 400
