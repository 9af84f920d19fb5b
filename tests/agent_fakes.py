"""Fake agent CLIs for tests: scripts named claude, codex and gemini on PATH that replay recorded
event streams (in each CLI's documented format) and record how they were called.

Each call appends {"argv", "stdin", "cwd", "at"} to ``calls.jsonl`` in the scenario directory and
plays the next step of ``steps.json`` (the last step repeats): its ``lines`` one by one (flushed),
then ``tail`` without a newline, then exits with ``exit``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SCRIPT = r'''#!{python}
import json, os, sys, time
d = os.environ["FAKE_AGENT_DIR"]
stdin = sys.stdin.read() if not sys.stdin.isatty() else ""
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv, "stdin": stdin, "cwd": os.getcwd(), "at": time.time(),
                         "name": os.path.basename(sys.argv[0])}}) + "\n")
n = sum(1 for _ in open(os.path.join(d, "calls.jsonl"))) - 1
steps = json.load(open(os.path.join(d, "steps.json")))
step = steps[min(n, len(steps) - 1)]
for line in step.get("lines", []):
    sys.stdout.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    sys.stdout.flush()
    time.sleep(step.get("pause", 0))
if step.get("tail"):
    sys.stdout.write(step["tail"])
    sys.stdout.flush()
time.sleep(step.get("sleep", 0))
sys.exit(step.get("exit", 0))
'''


def install(tmp: Path, monkeypatch: Any, steps: list[dict[str, Any]]) -> Path:
    """Put fake claude, codex and gemini first on PATH, playing ``steps``; returns the scenario dir."""
    bin_dir, scenario = tmp / "fake-bin", tmp / "fake-scenario"
    bin_dir.mkdir(exist_ok=True)
    scenario.mkdir(exist_ok=True)
    for name in ("claude", "codex", "gemini"):
        path = bin_dir / name
        path.write_text(SCRIPT.format(python=sys.executable))
        path.chmod(0o755)
    (scenario / "steps.json").write_text(json.dumps(steps))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_AGENT_DIR", str(scenario))
    return scenario


def calls(scenario: Path) -> list[dict[str, Any]]:
    path = scenario / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


SID = "3f2a8c1e-5b7d-4e2f-9a1c-0d6e8b4f2a71"
TID = "0199a213-81c0-7800-8aa1-bbab2a035a53"


def claude_success(cost: float = 0.0123, text: str = "done", sid: str = SID) -> dict[str, Any]:
    """Claude Code 2.1.x stream-json: init, an assistant message (two content-block lines), result."""
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 20}
    return {"lines": [
        {"type": "system", "subtype": "init", "cwd": "/w", "session_id": sid, "tools": ["Bash"], "model": "claude-x"},
        {"type": "assistant", "message": {"id": "msg_1", "role": "assistant", "content": [{"type": "text", "text": "working"}],
                                          "usage": usage}, "session_id": sid},
        {"type": "assistant", "message": {"id": "msg_1", "role": "assistant", "content": [{"type": "tool_use", "name": "Bash"}],
                                          "usage": usage}, "session_id": sid},
        {"type": "user", "message": {"content": [{"type": "tool_result", "content": "x" * 100}]}, "session_id": sid},
        {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 900, "num_turns": 2,
         "result": text, "session_id": sid, "total_cost_usd": cost,
         "usage": {"input_tokens": 12, "cache_creation_input_tokens": 8, "cache_read_input_tokens": 300, "output_tokens": 40}},
    ], "exit": 0}


def claude_rate_limited(resets_at: float, sid: str = SID) -> dict[str, Any]:
    """A usage limit as Claude Code reports it: a rate_limit_event (rejected, resetsAt), the assistant
    error ``rate_limit`` and an error result."""
    return {"lines": [
        {"type": "system", "subtype": "init", "session_id": sid},
        {"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": int(resets_at),
                                                         "rateLimitType": "five_hour"}, "uuid": "u1", "session_id": sid},
        {"type": "assistant", "message": {"id": "msg_9", "content": [{"type": "text", "text": f"Claude AI usage limit reached|{int(resets_at)}"}],
                                          "usage": {"input_tokens": 3, "output_tokens": 1}}, "session_id": sid, "error": "rate_limit"},
        {"type": "result", "subtype": "success", "is_error": True, "num_turns": 1, "session_id": sid,
         "result": f"Claude AI usage limit reached|{int(resets_at)}", "total_cost_usd": 0.001,
         "usage": {"input_tokens": 3, "output_tokens": 1}},
    ], "exit": 1}


def codex_overloaded(tid: str = TID) -> dict[str, Any]:
    return {"lines": [{"type": "thread.started", "thread_id": tid}, {"type": "turn.started"},
                      {"type": "error", "message": "Reconnecting... 1/5"},
                      {"type": "turn.failed", "error": {"message": "stream error: 529 Overloaded: the model is overloaded"}}],
            "exit": 1}


def codex_success(text: str = "all done", tid: str = TID) -> dict[str, Any]:
    return {"lines": [{"type": "thread.started", "thread_id": tid}, {"type": "turn.started"},
                      {"type": "item.completed", "item": {"id": "item_0", "type": "reasoning", "text": "thinking"}},
                      {"type": "item.completed", "item": {"id": "item_1", "type": "agent_message", "text": text}},
                      {"type": "turn.completed", "usage": {"input_tokens": 1000, "cached_input_tokens": 600, "output_tokens": 50}}],
            "exit": 0}


def gemini_success(sid: str = SID) -> dict[str, Any]:
    return {"lines": [
        {"type": "init", "timestamp": "2026-08-01T00:00:00Z", "session_id": sid, "model": "gemini-x"},
        {"type": "message", "timestamp": "t", "role": "user", "content": "do it"},
        {"type": "message", "timestamp": "t", "role": "assistant", "content": "Hel", "delta": True},
        {"type": "message", "timestamp": "t", "role": "assistant", "content": "lo", "delta": True},
        {"type": "tool_use", "timestamp": "t", "tool_name": "ls", "tool_id": "1", "parameters": {}},
        {"type": "tool_result", "timestamp": "t", "tool_id": "1", "status": "success", "output": "a"},
        {"type": "message", "timestamp": "t", "role": "assistant", "content": "finished", "delta": True},
    ], "tail": json.dumps({"type": "result", "timestamp": "t", "status": "success",
                           "stats": {"total_tokens": 160, "input_tokens": 100, "output_tokens": 60, "cached": 40,
                                     "input": 60, "duration_ms": 5, "tool_calls": 1, "models": {}}}),
        "exit": 0}


def wait_until(predicate: Any, timeout: float = 20) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out waiting"
        time.sleep(0.05)
