"""The published output schemas are simplified (server/schemas.py) without changing what they accept."""

from __future__ import annotations

import copy
import json
import random

import jsonschema
import pytest
from mcp import Client

from agent_parallel.results import LaunchResult, TaskList, TaskOutputResult
from agent_parallel.server import ServerSettings, build_server
from agent_parallel.server.schemas import simplify

pytestmark = pytest.mark.anyio

VALUES = [None, 0, 1.5, -3, "", "text", "running", "completed", True, [], ["a"], [1], {}, {"x": 1}]


def mutations(document: dict, rng: random.Random) -> list[dict]:
    """The document, and copies with one top-level field set to a value of another type, or removed."""
    found = [document]
    for _ in range(60):
        changed = copy.deepcopy(document)
        key = rng.choice(sorted(changed))
        if rng.random() < 0.2:
            del changed[key]
        else:
            changed[key] = rng.choice(VALUES)
        found.append(changed)
    return found


@pytest.mark.parametrize("model, document", [
    (LaunchResult, {"task_id": "abc", "status": "running", "command": "true", "cwd": "/w",
                    "created_at": "2026-01-01T00:00:00Z", "exit_code": None, "run": None, "tasks": None}),
    (TaskOutputResult, {"retrieval_status": "success", "tasks": [{"task_id": "a", "status": "failed",
                        "command": "x", "cwd": "/", "created_at": "t", "exit_code": 2}], "group_id": "g-x"}),
    (TaskList, {"tasks": [{"task_id": "a", "status": "queued", "description": None, "command": "c",
                           "exit_code": None, "signal": None, "created_at": "t", "duration_s": None,
                           "last_line": None}], "total": 1}),
])
def test_simplified_schemas_accept_exactly_what_the_originals_accept(model, document):
    original = model.model_json_schema()
    simple = copy.deepcopy(original)
    simplify(simple)
    assert simple != original and '"anyOf": [{"type": "integer"}, {"type": "null"}]' not in json.dumps(simple)
    rng = random.Random(7)
    for doc in mutations(document, rng):
        assert jsonschema.Draft202012Validator(original).is_valid(doc) == \
            jsonschema.Draft202012Validator(simple).is_valid(doc), doc


async def test_every_published_output_schema_is_simplified_and_still_valid(tmp_path):
    async with Client(build_server(tmp_path, ServerSettings(min_free_memory=0))) as client:
        tools = (await client.list_tools()).tools
    for tool in tools:
        assert tool.output_schema is not None, tool.name
        jsonschema.Draft202012Validator.check_schema(tool.output_schema)
        text = json.dumps(tool.output_schema)
        assert '{"type": "string"}, {"type": "null"}' not in text, tool.name


async def test_servers_built_in_one_process_share_schemas_and_keep_their_own_workspace(tmp_path):
    """Tools are made once per process (server/tools.py `tool`) and copied into each server: the schemas
    are the same, and each copy still acts on its own server's workspace."""
    from queue_helpers import write_item

    answers = []
    for name in ("one", "two"):
        root = tmp_path / name
        root.mkdir()
        write_item(root, 1 if name == "one" else 2, f"item-of-{name}")
        async with Client(build_server(root, ServerSettings(min_free_memory=0))) as client:
            listed = {tool.name: (tool.input_schema, tool.output_schema) for tool in (await client.list_tools()).tools}
            plan = (await client.call_tool("queue_plan", {})).structured_content
            launched = (await client.call_tool("launch_task", {"command": "pwd", "run_in_background": False}))
            answers.append((listed, [item["file"] for item in plan["items"]], launched.structured_content["output"]))
    (first, plan_one, pwd_one), (second, plan_two, pwd_two) = answers
    assert first == second and len(first) == 7
    assert plan_one == ["001-pending-item-of-one.md"] and plan_two == ["002-pending-item-of-two.md"]
    assert pwd_one.strip() == str(tmp_path / "one") and pwd_two.strip() == str(tmp_path / "two")


def schema_titles(node: object, where: str = "") -> list[str]:
    """Where a ``title`` keyword stands in a JSON schema (not a property that is named "title")."""
    found: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("title"), str):
            found.append(where or "/")
        for key, value in node.items():
            if key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
                for name, inner in value.items():
                    found += schema_titles(inner, f"{where}/{key}/{name}")
            elif isinstance(value, dict | list):
                found += schema_titles(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += schema_titles(value, f"{where}/{index}")
    return found


async def test_published_schemas_carry_no_titles_made_from_names_and_accept_what_the_arguments_model_does(tmp_path):
    """A model reads every tool's input schema on every turn: pydantic's titles ("Task Id") said the names
    again. Input schemas are simplified too; the server still validates arguments with the pydantic model."""
    from agent_parallel.server.tools import _MADE

    async with Client(build_server(tmp_path, ServerSettings(min_free_memory=0))) as client:
        tools = (await client.list_tools()).tools
    for tool in tools:
        assert schema_titles(tool.input_schema) == [] and schema_titles(tool.output_schema) == [], tool.name
        jsonschema.Draft202012Validator.check_schema(tool.input_schema)
    plan = next(tool for tool in tools if tool.name == "queue_plan").output_schema
    assert plan["$defs"]["PlanItem"]["properties"]["title"]["type"] == "string"  # a property named title stays
    made = {tool.name: tool for tool in _MADE.values()}
    samples = {"launch_task": {"command": "true", "cwd": None, "env": {"A": "1"}, "timeout_s": 2.5, "after": ["x"],
                               "run_in_background": False, "max_parallel": None},
               "task_output": {"task_ids": ["a", "b"], "block": True, "timeout": 1, "wait": "any", "cursor": None,
                               "max_bytes": 100, "filter": None}}
    rng = random.Random(3)
    for name, sample in samples.items():
        published = next(tool for tool in tools if tool.name == name).input_schema
        original = made[name].fn_metadata.arg_model.model_json_schema(by_alias=True)
        assert published != original
        for doc in mutations(sample, rng):
            assert jsonschema.Draft202012Validator(original).is_valid(doc) == \
                jsonschema.Draft202012Validator(published).is_valid(doc), (name, doc)
