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
