"""Text from a queue, a task, a record or git never drives the terminal: its control characters are
shown as Python escapes (ESC as ``\\x1b``) in every table, line and diagram the CLI prints."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console, RenderableType

from agent_parallel.text import visible
from agent_parallel.cli.render import plan_table, progress_view, report_view, status_view
from agent_parallel.cli.worktrees import _table as worktrees_table
from agent_parallel.queue.items import Diagnostic
from agent_parallel.results import ItemOutcome, RunProgress, RunningItem
from agent_parallel.tasks.records import TaskRecord
from agent_parallel.worktrees.cleanup import WorktreeState

from queue_helpers import write_item
from test_cli import cli
from test_planner import item, plan_of

LINK = "\x1b]8;;https://evil.example/\x1b\\Fix\x1b]8;;\x1b\\"  # a hyperlink to evil.example shown as "Fix"
HOSTILE = f"{LINK} \x1b[2J\x07 \x9b2J\x7f\r!"  # OSC 8, clear screen, BEL, C1 CSI, DEL, carriage return
SHOWN = "\\x1b]8;;https://evil.example/\\x1b\\Fix\\x1b]8;;\\x1b\\ \\x1b[2J\\x07 \\x9b2J\\x7f\\r!"
SGR = re.compile(r"\x1b\[[0-9;]*m")  # rich's own styling: the only escape sequence allowed out
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # every control character but newline


def raw_controls(output: str) -> list[str]:
    """The control characters in ``output`` other than newline and rich's styling."""
    return CONTROL.findall(SGR.sub("", output))


def printed(renderable: RenderableType, width: int) -> tuple[str, str]:
    """(the text as recorded, the bytes a colour terminal gets)."""
    recorded = Console(record=True, width=width)
    recorded.print(renderable)
    terminal = io.StringIO()
    Console(file=terminal, force_terminal=True, color_system="truecolor", width=width).print(renderable)
    return recorded.export_text(), terminal.getvalue()


def test_visible_writes_control_characters_as_python_escapes() -> None:
    assert visible(HOSTILE) == SHOWN
    assert visible("invoice\u202egnp.exe \u2066x\u2069 é\u00a0—") == "invoice\\u202egnp.exe \\u2066x\\u2069 é\u00a0—"
    assert visible("\x00\x1f\x80\x9f") == "\\x00\\x1f\\x80\\x9f"
    assert visible("a\n\tb") == "a\n\tb"  # layout, not a sequence
    assert visible("Fix [/x] parser ✓ é") == "Fix [/x] parser ✓ é"
    assert visible("\x1b", in_dot=True) == "\\\\x1b"  # dot reads one backslash as an escape


def _hostile_plan():
    files = [f"src/{HOSTILE}.py"]  # the two conflict on a hostile file name
    one = item(1).model_copy(update={"title": HOSTILE, "files": files})
    two = item(2, deps=(1,)).model_copy(update={"title": f"second {HOSTILE}", "files": files})
    bad = Diagnostic(kind="parse", file=f"003-pending-{HOSTILE}.md", message=f"cannot read {HOSTILE}")
    return plan_of(one, two, diagnostics=[bad])


@pytest.mark.parametrize("width", [300, 40])  # narrow: rich cuts and folds the cells
def test_the_plan_table_shows_control_characters_never_sends_them(width: int) -> None:
    text, terminal = printed(plan_table(_hostile_plan()), width)
    assert raw_controls(text) == [] and raw_controls(terminal) == []
    if width == 300:
        assert SHOWN in text and f"second {SHOWN}" in text and f"cannot read {SHOWN}" in text
        assert f"src/{SHOWN}.py" in text and f"003-pending-{SHOWN}.md" in text


def _hostile_run() -> RunProgress:
    failed = ItemOutcome(item="001", title=HOSTILE, outcome="failed", exit_code=3, reason=f"exit 3: {HOSTILE}",
                         duration_s=1.0, last_lines=["\x1b]0;owned\x07\x1b[2J done", "fine"], notes=[HOSTILE])
    running = RunningItem(item="002", title=HOSTILE, task_id="t2", elapsed_s=2.0, waiting=f"rate limit {HOSTILE}")
    return RunProgress(run_id="r\x1b[2J", level="L2", continue_on_error=False, max_parallel=2, state="finished",
                       elapsed_s=3.0, counts={"failed": 1, "running": 1}, running=[running], held=HOSTILE,
                       stop_reason=f"item 001 failed: {HOSTILE}", predicted_makespan=1.0, lower_bound=1.0,
                       outcomes=[failed])


@pytest.mark.parametrize("width", [300, 40])
def test_the_run_views_show_control_characters_never_send_them(width: int) -> None:
    run = _hostile_run()
    for view in (report_view(run), progress_view(run)):
        text, terminal = printed(view, width)
        assert raw_controls(text) == [] and raw_controls(terminal) == []
    if width == 300:
        text, _ = printed(report_view(run), width)
        assert SHOWN in text and "| \\x1b]0;owned\\x07\\x1b[2J done" in text and "| fine" in text
        assert "Run r\\x1b[2J" in text and f"stopped: item 001 failed: {SHOWN}" in text
        text, _ = printed(progress_view(run), width)
        assert f"rate limit {SHOWN}" in text and f"start held: {SHOWN}" in text


def test_status_and_worktrees_show_control_characters_never_send_them() -> None:
    record = TaskRecord(task_id="abc", command=f"printf '{HOSTILE}'", cwd="/")
    described = TaskRecord(task_id="def", command="true", description=HOSTILE, cwd="/")
    worktree = WorktreeState(path=Path("/w"), name=f"001-{HOSTILE}", item_id=None, branch=f"agent/{HOSTILE}",
                             head=None, state="clean", ahead=1, behind=0, safe=False, reason=f"not safe: {HOSTILE}")
    for view in (status_view([record, described]), worktrees_table([worktree])):
        text, terminal = printed(view, 400)
        assert raw_controls(text) == [] and raw_controls(terminal) == []
        assert SHOWN in text


def test_the_plan_command_never_prints_a_control_character(workspace: Path) -> None:
    write_item(workspace, 1, "a", title=HOSTILE, command="true", files=[f"{HOSTILE}.py"])
    write_item(workspace, 2, "b", title="Fix [/x] parser", command="true", files=["b"], blocked_by=[1])
    table = cli("plan", "--root", str(workspace))
    assert table.returncode == 0, table.stderr
    assert raw_controls(table.stdout) == [] and SHOWN in table.stdout and "Fix [/x] parser" in table.stdout
    for fmt in ("mermaid", "dot"):  # files for other tools, but often printed on a terminal first
        diagram = cli("plan", "--root", str(workspace), "--format", fmt)
        assert diagram.returncode == 0 and "\x1b" not in diagram.stdout and "x1b]8;;https" in diagram.stdout
    missing = cli("demo", "--root", str(workspace / "no\x1b[2Jhere"))  # an error quoting a path
    assert missing.returncode == 2 and raw_controls(missing.stderr) == [] and "no\\x1b[2Jhere" in missing.stderr


def test_a_run_and_its_report_never_print_the_output_raw(workspace: Path) -> None:
    write_item(workspace, 1, "a", title=HOSTILE, files=["a"],
               command="printf '\\033]0;owned\\007\\033[2J done\\n'; exit 3")
    run = cli("run", "--root", str(workspace))
    assert run.returncode == 1
    assert raw_controls(run.stdout + run.stderr) == []
    assert SHOWN in run.stdout and "| \\x1b]0;owned\\x07\\x1b[2J done" in run.stdout
    status = cli("status", "--root", str(workspace))
    assert status.returncode == 0 and raw_controls(status.stdout) == [] and "\\x1b]8;;https" in status.stdout
