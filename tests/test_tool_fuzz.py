"""Every tool, sent the arguments an attacker or a confused model might send, answers: a result, or an
error whose text says what was wrong. Never a traceback, never an exception out of the server, never
a file outside the workspace, and the server goes on answering.

Arguments are drawn (hypothesis) from each tool's own published input schema: its properties with
values of any JSON type, hostile strings (NUL, 200 KB, path escapes, shell syntax, catastrophic
regular expressions), huge and negative numbers, unknown extra keys; mostly of the type the schema
asks for, so that most calls get past validation into the tool, and with the arguments a tool needs.
Ids are this server's own (finished and running tasks, a group, a run, queue items) or near misses.
Commands come from a harmless set only (a random string given to ``/bin/sh`` could do anything), plus
strings that must be refused before they reach a shell. (Lone surrogates cannot be sent: the SDK's
client cannot encode them, and its stdio transport refuses such a line as invalid JSON.)

One server (the SDK's in-memory client, server exceptions raised into the test) serves every example
of a tool; its wait cap is short, so no wait the fuzzer asks for stalls the suite. The examples are
the same in every run; ``FUZZ_EXAMPLES=2000 python -m pytest tests/test_tool_fuzz.py`` draws that
many new ones per tool instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client, MCPError

from agent_parallel.server import ServerSettings, build_server
from queue_helpers import write_item

HOSTILE_TEXT = ["", " ", "\0", "a\0b", "../..", "../../etc", "/etc/passwd", "/", ".", "~", "x" * 200_000,
                "é" * 50, "007", "#7", "0", "-1", "99999999999999999999", "001-pending-build.md",
                "(a+)+$", "[", "(?P<", "*", "\\", "all", "any", "L9", "pending", "in_progress", "completed",
                "${HOME}", "$(true)", "`true`", "\n", "\r\n", "\t"]
HARMLESS_COMMANDS = ["true", "exit 3", "echo out", "printf x", "echo err >&2; exit 1", ":"]
REFUSED_COMMANDS = ["echo \0 nul", "x" * 140_000]  # a NUL, over the kernel's argument limit

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(HOSTILE_TEXT), st.text(max_size=12),
)
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=6)),
                                             inner, max_size=3), max_leaves=6)
commands = st.one_of(st.sampled_from(HARMLESS_COMMANDS + REFUSED_COMMANDS), st.none(), st.integers(),
                     st.lists(st.integers(), max_size=2))
command_lists = st.one_of(st.lists(st.sampled_from(HARMLESS_COMMANDS + REFUSED_COMMANDS), max_size=4),
                          st.just([]), st.just(["true"] * 1001), st.lists(commands, max_size=3), json_values)


INTEGERS = st.one_of(st.integers(-3, 70), st.sampled_from([-(2**63), -(2**31), 2**31, 2**63, 10**20, 65536, 65537]))
NUMBERS = st.one_of(st.floats(-5, 5, allow_nan=False), st.sampled_from([0.0, -0.0, 1e-300, 1e308, -1e308, 2.5e9]), INTEGERS)


def ids_like(known: list[str]) -> st.SearchStrategy[str]:
    """Ids as a model would give them: real ones of this server (tasks, groups, runs, items), near misses."""
    return st.one_of(st.sampled_from(known), st.sampled_from(HOSTILE_TEXT),
                     st.sampled_from(known).map(lambda text: text[:-1] or "x"), st.text(max_size=12))


def of_schema(name: str, schema: dict[str, Any], known: list[str]) -> st.SearchStrategy[Any]:
    """Mostly a value of the type the schema asks for, with hostile content; sometimes anything at all
    (what fails validation must fail it clearly too)."""
    if name == "command":
        return st.one_of(commands, json_values)
    if name == "commands":
        return command_lists
    if "anyOf" in schema:  # (null, which every optional argument allows, one time in eight)
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        typed = st.one_of(*(of_schema(name, option, known) for option in options))
        if len(options) < len(schema["anyOf"]):
            typed = st.integers(0, 7).flatmap(lambda k, typed=typed: typed if k else st.none())
    elif "enum" in schema:
        typed = st.integers(0, 9).flatmap(lambda k: st.sampled_from(schema["enum"]) if k else st.sampled_from(HOSTILE_TEXT))
    else:
        kind = schema.get("type")
        if kind == "string":
            typed = ids_like(known) if name in ("task_id", "item", "group_id") else \
                st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=16))
        elif kind == "integer":
            typed = INTEGERS
        elif kind == "number":
            typed = NUMBERS
        elif kind == "boolean":
            typed = st.booleans()
        elif kind == "null":
            typed = st.none()
        elif kind == "array":
            item = of_schema(name[:-1] if name.endswith("s") else name, schema.get("items", {}), known)
            typed = st.one_of(st.lists(item, max_size=5), st.lists(item, min_size=257, max_size=300))
        elif kind == "object":
            typed = st.dictionaries(st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=8)),
                                    st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=8)), max_size=4)
        else:
            typed = json_values
    return st.integers(0, 29).flatmap(lambda k: typed if k else json_values)  # one in 30: any JSON value


SHAPES = {  # the arguments a call of the tool needs (one of each set), so that most calls get past them
    "launch_task": [["command"], ["commands"], ["item"]], "task_output": [["task_id"], ["task_ids"]],
    "cancel_task": [["task_id"], ["task_ids"]], "update_item": [["item", "status"]],
}


@st.composite
def arguments(draw: st.DrawFn, tool: str, schema: dict[str, Any], known: list[str]) -> dict[str, Any]:
    """Some of the tool's own arguments (usually those it needs, then others), maybe an unknown one."""
    properties = schema.get("properties", {})
    names = sorted(properties)
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))) if names else []
    if tool in SHAPES and draw(st.integers(0, 3)):
        needed = draw(st.sampled_from(SHAPES[tool]))
        chosen = needed + [n for n in chosen if n not in needed and not any(n in shape for shape in SHAPES[tool])]
    args = {name: draw(of_schema(name, properties[name], known)) for name in chosen}
    if draw(st.integers(0, 19)) == 0:
        args[draw(st.sampled_from(["unknown", "taskId", "__proto__", "\0"]))] = draw(json_values)
    return args


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[tuple[BlockingPortal, Client, Path, dict[str, Any], list[str]]]:
    """One server on a small queue (two harmless items, one waiting on the other), its tools' input
    schemas, and ids for the fuzzer to name."""
    base = tmp_path_factory.mktemp("fuzz")
    workspace = base / "ws"
    workspace.mkdir()
    write_item(workspace, 1, "build", command="true")
    write_item(workspace, 2, "test", command="exit 0", blocked_by=[1])
    settings_ = ServerSettings(kill_grace_s=0.5, min_free_memory=0, wait_cap_s=1.0)
    with start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(Client(build_server(workspace, settings_), raise_exceptions=True)) as client:
            schemas = {tool.name: tool.input_schema for tool in portal.call(client.list_tools).tools}
            known = ["001", "002", "7", "#2", "002-test"] + portal.call(some_tasks, client)
            yield portal, client, workspace, schemas, known


async def some_tasks(client: Client) -> list[str]:
    """Ids of tasks of every kind, for the fuzzer to name: finished ones, a group, a run, a running one."""
    ids = []
    for args in ({"command": "true", "run_in_background": False}, {"command": "exit 3", "run_in_background": False},
                 {"commands": ["true", "echo x"], "max_parallel": 1}, {"command": "sleep 600"}):
        answer = (await client.call_tool("launch_task", args)).structured_content
        ids += [answer["task_id"], *(answer.get("task_ids") or [])]
    ids.append((await client.call_tool("run_queue", {})).structured_content["run_id"])
    return ids


async def answered(client: Client, tool: str, args: dict[str, Any]) -> None:
    """The call answers (within bounds) with a result or a clear error, and the server answers after it."""
    with anyio.fail_after(30):
        try:
            result = await client.call_tool(tool, args)
        except MCPError as exc:  # a protocol-level refusal: it must still say what was wrong
            assert str(exc).strip(), f"{tool}({args!r}): an empty protocol error"
            result = None
        if result is not None and result.is_error:
            text = result.content[0].text if result.content else ""
            assert text.strip(), f"{tool}({args!r}): an error with no text"
            assert "Traceback" not in text and len(text) < 4000, f"{tool}: {text[:500]}"
        elif result is not None:
            assert isinstance(result.structured_content, dict), f"{tool}({args!r}): {result}"
            json.dumps(result.structured_content)  # what goes over the wire must be JSON
        after = await client.call_tool("list_tasks", {"limit": 1})
        assert not after.is_error, after.content[0].text


EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
RANDOM = "FUZZ_EXAMPLES" in os.environ
TOOLS = ["launch_task", "task_output", "cancel_task", "list_tasks", "queue_plan", "run_queue", "update_item"]


@pytest.mark.fault("any tool sent arguments of any type and value, hostile strings and unknown keys: "
                   "a result or a clear error, the server goes on, nothing written outside the workspace")
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_any_arguments_clearly(served, tool: str) -> None:
    portal, client, workspace, schemas, known = served

    @settings(max_examples=EXAMPLES, derandomize=not RANDOM, deadline=None, suppress_health_check=list(HealthCheck))
    @given(args=arguments(tool, schemas[tool], known))
    def check(args: dict[str, Any]) -> None:
        portal.call(answered, client, tool, args)

    check()
    assert sorted(p.name for p in workspace.parent.iterdir()) == ["ws"], "a file was made outside the workspace"
    assert sorted(p.name for p in workspace.iterdir()) == [".agent"], "a file was made outside .agent/"
