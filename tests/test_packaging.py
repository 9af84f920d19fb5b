"""The package's metadata agrees with itself: pyproject, server.json, README, __version__."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import agent_parallel

TOP = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((TOP / "pyproject.toml").read_text())
SERVER = json.loads((TOP / "server.json").read_text())


def test_versions_agree():
    version = PYPROJECT["project"]["version"]
    assert agent_parallel.__version__ == version
    assert SERVER["version"] == version
    assert [p["version"] for p in SERVER["packages"]] == [version]


def test_server_json_follows_the_registry_rules():
    assert re.fullmatch(r"[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+", SERVER["name"]) and SERVER["name"].count("/") == 1
    assert SERVER["name"].startswith("io.github.")
    assert len(SERVER["description"]) <= 100
    assert SERVER["$schema"].endswith("/2025-12-11/server.schema.json")
    for package in SERVER["packages"]:
        assert package["registryType"] == "pypi" and package["identifier"] == PYPROJECT["project"]["name"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", package["version"])  # exact, never "latest" or a range
        assert package["transport"] == {"type": "stdio"}
    # uvx runs the console script named like the package
    assert PYPROJECT["project"]["name"] in PYPROJECT["project"]["scripts"]

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    assert all(k == "$schema" or re.fullmatch(r"[a-z][a-zA-Z]*", k) for k in keys(SERVER))  # camelCase


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_second():
    readme = (TOP / "README.md").read_text()
    assert f"<!-- mcp-name: {SERVER['name']} -->" in readme
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    first, second = blocks[0].strip(), blocks[1].strip()
    assert "pip install" in first and "agent-parallel" in first
    assert second in (TOP / ".ci/run").read_text()
