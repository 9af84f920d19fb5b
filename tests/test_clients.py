"""Real clients: the Claude Code CLI registers the server and reports it connected, and runs turns against
a stand-in for the Messages API (fake_anthropic.py) whose scripted model calls our tools: what the CLI
shows its model of them is what these tests read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_anthropic import Arguments, FakeModel, fake_messages_api
from queue_helpers import write_item

SCRIPT = Path(sys.executable).parent / "agent-parallel"
CLAUDE = Path(__file__).parent.parent / ".ci/node/node_modules/.bin/claude"


@pytest.fixture
def claude() -> Path:
    if not CLAUDE.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CLAUDE} is missing: .ci/run must install @anthropic-ai/claude-code")
        pytest.skip("Claude Code CLI not installed (run .ci/run once)")
    return CLAUDE


def added_to_claude(claude: Path, home: Path, workspace: Path) -> dict[str, str]:
    """``claude mcp add`` of our server for ``workspace``, with ``home`` as the CLI's home: its environment."""
    home.mkdir()
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    added = subprocess.run([str(claude), "mcp", "add", "agent-parallel", "--", str(SCRIPT), "serve", "--root",
                            str(workspace)], cwd=workspace, env=env, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    return env


def test_claude_code_lists_the_server_as_connected(claude, tmp_path, workspace):
    env = added_to_claude(claude, tmp_path / "home", workspace)
    listed = subprocess.run([str(claude), "mcp", "list"], cwd=workspace, env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("agent-parallel:"))
    assert "Connected" in line and "✔" in line, listed.stdout


def claude_turn(claude: Path, home: Path, workspace: Path, *steps: tuple[str, Arguments]) -> FakeModel:
    """One turn of the real Claude Code CLI in ``workspace`` (the server added to it first), against a
    fake Messages API whose model calls the tools of ``steps``; answers the model, its requests kept."""
    env = added_to_claude(claude, home, workspace)
    allowed = ",".join(sorted({tool for tool, _ in steps}))
    with fake_messages_api(*steps) as (url, model):
        turn = subprocess.run([str(claude), "-p", "go on", "--allowedTools", allowed, "--output-format", "json"],
                              cwd=workspace, capture_output=True, text=True, timeout=180,
                              env={**env, "ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": url,
                                   "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
    assert turn.returncode == 0, turn.stdout[-2000:] + turn.stderr[-2000:]
    assert json.loads(turn.stdout)["num_turns"] == len(steps) + 1, turn.stdout[-2000:]
    return model


def test_claude_code_shows_its_model_a_300_command_fan_out_answer_whole_state_first(claude, tmp_path, workspace):
    """Claude Code saves a tool answer of over 50,000 characters to a file and shows the model its first
    2 KB, unless the tool declares a larger size (``_meta["anthropic/maxResultSizeChars"]``). A turn of the
    real CLI against a fake Messages API: the fan-out's answer (about 85 KB) reaches the model as it is,
    the group's state and counts first. And what the model is told of the tools every turn: their
    descriptions without the docstrings' indentation, the server's instructions (with the fan-out)."""
    arguments = {"commands": ["true"] * 300, "max_parallel": 5, "run_in_background": False}
    model = claude_turn(claude, tmp_path / "home", workspace, ("mcp__agent-parallel__launch_task", arguments))
    offered = {tool["name"]: tool for tool in model.requests[0]["tools"] if "agent-parallel" in tool["name"]}
    assert len(offered) == 7 and not [name for name, tool in offered.items() if "\n " in tool["description"]]
    assert "launch_task(commands=[...], max_parallel=N)" in json.dumps(model.requests[0])  # the instructions
    [shown] = model.tool_results()
    assert len(shown) > 50_000 and not shown.startswith("<persisted-output>"), shown[:300]
    answer = json.loads(shown)
    assert list(answer)[:5] == ["task_id", "group_id", "status", "retrieval_status", "counts"]
    assert answer["status"] == "completed" and answer["counts"] == {"completed": 300}
    assert len(answer["tasks"]) == 300 and all(entry["exit_code"] == 0 for entry in answer["tasks"])


def test_claude_code_plans_runs_and_reads_the_report_of_a_fork_join_queue(claude, tmp_path, workspace):
    """The queue's whole loop through the real CLI (a scripted model): queue_plan, run_queue, then
    task_output on the run: each answer reaches the model as JSON, and the items are done on disk."""
    write_item(workspace, 1, "build", command="echo built")
    for number in (2, 3):
        write_item(workspace, number, f"test-{number}", command=f"echo tested {number}", blocked_by=[1])
    write_item(workspace, 4, "package", command="echo packaged", blocked_by=[2, 3])
    model = claude_turn(
        claude, tmp_path / "home", workspace,
        ("mcp__agent-parallel__queue_plan", {}),
        ("mcp__agent-parallel__run_queue", {}),
        ("mcp__agent-parallel__task_output",
         lambda seen: {"task_id": json.loads(seen[1])["run_id"], "block": True, "timeout": 30}))
    plan, started, report = (json.loads(text) for text in model.tool_results())
    assert plan["run_now"] == ["001"] and plan["waves"] == [["001"], ["002", "003"], ["004"]]
    assert started["run_id"] and report["status"] == "completed", report
    outcomes = {o["item"]: o["outcome"] for o in report["run"]["outcomes"]}
    assert outcomes == dict.fromkeys(["001", "002", "003", "004"], "completed")
    assert sorted(p.name for p in (workspace / ".agent/queue").iterdir()) == [
        "001-completed-build.md", "002-completed-test-2.md", "003-completed-test-3.md", "004-completed-package.md"]
