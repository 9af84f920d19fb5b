"""Real clients: the Claude Code CLI registers the server and reports it connected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "agent-parallel"
CLAUDE = Path(__file__).parent.parent / ".ci/node/node_modules/.bin/claude"


@pytest.fixture
def claude() -> Path:
    if not CLAUDE.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CLAUDE} is missing: .ci/run must install @anthropic-ai/claude-code")
        pytest.skip("Claude Code CLI not installed (run .ci/run once)")
    return CLAUDE


def test_claude_code_lists_the_server_as_connected(claude, tmp_path, workspace):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    added = subprocess.run([str(claude), "mcp", "add", "agent-parallel", "--", str(SCRIPT), "serve", "--root",
                            str(workspace)], cwd=workspace, env=env, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    listed = subprocess.run([str(claude), "mcp", "list"], cwd=workspace, env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("agent-parallel:"))
    assert "Connected" in line and "✔" in line, listed.stdout
