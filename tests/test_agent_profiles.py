"""Agent profiles and stream parsing: the argv each CLI gets (the real Claude Code CLI accepts it),
the incremental parser (pieces of any size, garbage, truncated and oversized lines, gaps), error
classes and reset times, and the runner.* settings and the item `retries` field."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent_fakes import SID, TID, claude_rate_limited, claude_success, codex_success, gemini_success
from agent_parallel.agents import profiles
from agent_parallel.agents.stream import MAX_LINE, StreamParser, classify, reset_time
from agent_parallel.config import ConfigError, load_config
from agent_parallel.queue.items import QueueReader
from queue_helpers import write_config, write_item

CLAUDE = Path("/work/main/.ci/node/node_modules/.bin/claude")
if not CLAUDE.exists() and (found := shutil.which("claude")):
    CLAUDE = Path(found)


def stream(step: dict) -> bytes:
    lines = [line if isinstance(line, str) else json.dumps(line) for line in step["lines"]]
    return ("\n".join(lines) + "\n" + step.get("tail", "")).encode()


def parse(agent: str, data: bytes, piece: int | None = None, exit_code: int = 0):
    parser = StreamParser(agent)
    size = piece or len(data) or 1
    for i in range(0, len(data), size):
        parser.feed(data[i:i + size])
    return parser, parser.finish(exit_code)


@pytest.mark.parametrize("piece", [1, 7, 4096, None])
def test_claude_stream_in_pieces_of_any_size(piece):
    _, usage = parse("claude", stream(claude_success(cost=0.3, text="ok ✓")), piece)
    assert (usage.session_id, usage.turns, usage.cost_usd, usage.result) == (SID, 2, 0.3, "ok ✓")
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (20, 40, 300)
    assert usage.error is None


def test_claude_usage_while_it_runs_counts_each_message_once():
    parser = StreamParser("claude")
    data = stream(claude_success())
    parser.feed(data[: data.index(b'"type": "result"') - 2])  # everything before the result line
    live = parser.snapshot()
    assert (live.turns, live.input_tokens, live.output_tokens, live.cached_tokens) == (1, 15, 20, 100)


def test_claude_rate_limit_has_its_class_and_reset_time():
    resets = int(time.time()) + 600
    _, usage = parse("claude", stream(claude_rate_limited(resets)), exit_code=1)
    assert usage.error == "rate_limited" and usage.session_id == SID
    assert usage.resets_at is not None and usage.resets_at.startswith(time.strftime("%Y-", time.gmtime(resets)))


def test_codex_and_gemini_streams():
    _, codex = parse("codex", stream(codex_success("fine")), 3)
    assert (codex.session_id, codex.turns, codex.result, codex.cost_usd) == (TID, 1, "fine", None)
    assert (codex.input_tokens, codex.cached_tokens, codex.output_tokens) == (400, 600, 50)
    _, gemini = parse("gemini", stream(gemini_success()), 5)
    assert (gemini.session_id, gemini.turns, gemini.result) == (SID, 2, "finished")
    _, limit = parse("gemini", b'{"type":"init","session_id":"s"}\n', exit_code=53)
    assert limit.error == "max_turns"


def test_garbage_truncated_and_oversized_lines_are_skipped_with_bounded_memory():
    parser = StreamParser("claude")
    parser.feed(b"\xff\xfe not json\n{broken\n[1,2]\n")
    parser.feed(b'{"type":"user","x":"' + b"a" * (MAX_LINE + 10))  # a line past the cap: dropped as it comes
    assert len(parser._partial) <= MAX_LINE
    parser.feed(b'"}\n{"type":"system","subtype":"init","session_id":"s1"}\n')
    parser.feed(b'{"type":"result","num_turns":3,"total_cost_usd":0.5,"usage":{"output_tokens":2}}')  # no newline
    usage = parser.finish(0)
    assert (usage.session_id, usage.turns, usage.cost_usd) == ("s1", 3, 0.5)
    assert parser.garbage_lines == 3 and parser.skipped_lines == 1


def test_a_line_nested_past_pythons_recursion_limit_is_garbage_not_a_crash():
    parser = StreamParser("claude")
    parser.feed(b'{"type":"assistant","message":' + b"[" * 5000 + b"]" * 5000 + b'}\n')  # json.loads: RecursionError
    parser.feed(b'{"type":"system","subtype":"init","session_id":"s1"}\n')
    assert parser.finish(0).session_id == "s1" and parser.garbage_lines == 1


def test_a_gap_drops_the_line_it_cut():
    parser = StreamParser("codex")
    parser.feed(b'{"type":"thread.started","thread_id":"t1"}\n{"type":"turn.comp')
    parser.gap()
    parser.feed(b'leted"}\n{"type":"turn.started"}\n')
    assert parser.finish(0).turns == 1 and parser.garbage_lines == 0


@pytest.mark.parametrize(("text", "status", "kind"), [
    ("Claude AI usage limit reached|1756828800", None, "rate_limited"),
    ("exceeded retry limit, last status: 429 Too Many Requests", None, "rate_limited"),
    ("API Error: Overloaded", 529, "overloaded"),
    ("Not logged in · Please run /login", None, "auth"),
    ("Invalid API key", 401, "auth"),
    ("Reached max turns (3)", None, "max_turns"),
    ("something broke", None, "other"),
])
def test_error_classes(text, status, kind):
    assert classify(text, status) == kind


def test_reset_times():
    now = 1_756_800_000.0
    assert reset_time("Claude AI usage limit reached|1756828800", now) == 1756828800
    assert reset_time("You've hit your usage limit. Try again in 2 hours 5 minutes.", now) == now + 7500
    assert reset_time("rate limited; retry after 30s", now) == now + 30
    assert reset_time("limit reached|1000000000", now) is None  # far in the past: not a reset time
    assert reset_time("no time here", now) is None


def test_profile_argvs_keep_item_text_off_the_command_line():
    assert profiles.first_run("claude", ["--model", "opus"]).argv == [
        "claude", "-p", "--output-format", "stream-json", "--verbose", "--model", "opus"]
    assert profiles.resume("claude", SID, ["--allowedTools", "Read", "Edit"]).argv[:3] == [
        "claude", "-p", profiles.RESUME_PROMPT]  # before a variadic option that would swallow it
    assert profiles.first_run("codex", ["-m", "x"], ["/opt/codex"]).argv == ["/opt/codex", "exec", "--json", "-m", "x", "-"]
    assert profiles.resume("codex", TID, []).argv == ["codex", "exec", "--json", "resume", TID, profiles.RESUME_PROMPT]
    gemini = profiles.resume("gemini", SID, ["-m", "flash"])
    assert gemini.argv[:5] == ["gemini", "--output-format", "stream-json", "--resume", SID] and not gemini.item_on_stdin
    assert profiles.first_run("gemini", []).item_on_stdin


def _run_claude(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC", "CLAUDE"))}
    env.update(HOME=str(home), CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_TELEMETRY="1")
    return subprocess.run(argv, input="say hi", capture_output=True, text=True, env=env, timeout=60, cwd=home)


@pytest.mark.skipif(not CLAUDE.exists(), reason="the Claude Code CLI is not installed")
def test_the_real_claude_cli_accepts_the_profiles_argvs(tmp_path):
    """Not logged in and offline, Claude Code still parses the argv, checks it (stream-json needs
    --verbose) and answers with a stream-json error our parser classifies as auth."""
    args = ["--model", "sonnet", "--permission-mode", "acceptEdits", "--max-turns", "3", "--allowedTools", "Read", "Edit"]
    done = _run_claude(profiles.first_run("claude", args, [str(CLAUDE)]).argv, tmp_path)
    assert "unknown option" not in done.stderr and "error:" not in done.stderr.lower(), done.stderr
    _, usage = parse("claude", done.stdout.encode(), exit_code=done.returncode)
    assert usage.session_id and usage.error == "auth", done.stdout[-2000:]
    resumed = _run_claude(profiles.resume("claude", SID, args, [str(CLAUDE)]).argv, tmp_path)
    assert "unknown option" not in resumed.stderr
    _, usage = parse("claude", resumed.stdout.encode(), exit_code=resumed.returncode)
    assert usage.session_id == SID and "No conversation found" in (usage.error_message or "")
    bogus = _run_claude([*profiles.first_run("claude", [], [str(CLAUDE)]).argv, "--no-such-flag"], tmp_path)
    assert "unknown option '--no-such-flag'" in bogus.stderr  # the control: a bad argv is refused


def test_runner_settings(tmp_path):
    write_config(tmp_path, runner={"agent": "Codex", "args": "--model gpt-x", "auto_resume": False, "max_cost_usd": 2.5,
                                   "max_tokens": 1000, "max_parallel": 2, "retries": 3, "retry_delay": "30s"})
    config, warnings = load_config(tmp_path)
    assert warnings == []
    assert (config.agent, config.agent_args, config.auto_resume, config.max_cost_usd, config.max_tokens,
            config.agent_max_parallel, config.retries, config.retry_delay_s) == (
        "codex", ("--model", "gpt-x"), False, 2.5, 1000, 2, 3, 30.0)


@pytest.mark.fault("bad runner.* agent settings are refused naming the key, and the file is left as it was")
@pytest.mark.parametrize(("runner", "message"), [
    ({"agent": "gpt"}, "runner.agent must be claude, codex or gemini, not 'gpt'"),
    ({"args": {"a": 1}}, "runner.args must be a list of strings (an argv), not a mapping"),
    ({"auto_resume": "yes"}, "runner.auto_resume must be true or false, not 'yes'"),
    ({"max_cost_usd": -1}, "runner.max_cost_usd must be a number above 0, not -1"),
    ({"max_tokens": 0}, "runner.max_tokens must be at least 1, not 0"),
    ({"max_parallel": 0}, "runner.max_parallel must be at least 1, not 0"),
    ({"retries": 101}, "runner.retries must be at most 100, not 101"),
    ({"retry_delay": "soon"}, "runner.retry_delay is not valid: 'soon' is not a duration"),
])
def test_bad_runner_settings(tmp_path, runner, message):
    write_config(tmp_path, runner=runner)
    before = (tmp_path / ".agent/config.yaml").read_bytes()
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert message in str(caught.value)
    assert (tmp_path / ".agent/config.yaml").read_bytes() == before


@pytest.mark.fault("an item's retries field that is not a whole number 0..100 is a clear bad_field diagnostic")
def test_item_retries_field(tmp_path):
    write_item(tmp_path, 1, "ok", retries=2)
    write_item(tmp_path, 2, "bold", body="**Retries**: 4\n")
    write_item(tmp_path, 3, "bad", retries="lots")
    items, diagnostics = QueueReader().read(tmp_path, ".agent/queue")
    by_id = {i.id: i for i in items}
    assert (by_id[1].retries, by_id[2].retries, by_id[3].retries) == (2, 4, None)
    assert [d.message for d in diagnostics if d.kind == "bad_field"] == [
        "retries: 'lots' is not a whole number from 0 to 100"]
