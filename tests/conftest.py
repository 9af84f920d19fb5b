"""Shared fixtures: a workspace directory and an in-memory MCP client on a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from agent_parallel.server import ServerSettings, build_server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    return root


@pytest.fixture
def settings() -> ServerSettings:
    return ServerSettings(kill_grace_s=0.5)


@pytest.fixture
async def client(workspace: Path, settings: ServerSettings):
    async with Client(build_server(workspace, settings), raise_exceptions=True) as c:
        yield c


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """Call a tool that must succeed; return its structured result."""
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def call_error(client: Client, tool: str, **args: Any) -> str:
    """Call a tool that must fail; return the error text shown to the model."""
    result = await client.call_tool(tool, args)
    assert result.is_error, f"expected an error, got {result.structured_content}"
    return result.content[0].text


def alive(pid: int) -> bool:
    """True while ``pid`` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def read_pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def all_dead(pids: list[int]) -> bool:
    return not any(alive(p) for p in pids)


__all__ = ["call", "call_error", "alive", "read_pids", "all_dead"]
