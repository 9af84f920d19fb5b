"""The `agent-parallel` command: plan formats, run's live display and exit codes, status, demo."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from conftest import all_dead_soon, read_pids
from queue_helpers import statuses, write_item

SCRIPT = Path(sys.executable).parent / "agent-parallel"
TOP = Path(__file__).parent.parent


def cli(*args: str, cwd: Path | None = None, timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(cwd or TOP), **(env or {})})


def test_plan_json_is_the_tool_output(workspace):
    write_item(workspace, 1, "a", command="true", files=["a"])
    write_item(workspace, 2, "b", command="true", blocked_by=[1], files=["b"])
    result = cli("plan", "--root", str(workspace), "--format", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["run_now"] == ["001"] and plan["waves"] == [["001"], ["002"]]


def test_plan_table_mermaid_and_dot(workspace):
    write_item(workspace, 1, "a", command="true", files=["a"])
    table = cli("plan", "--root", str(workspace))
    assert table.returncode == 0 and "run now: 001" in table.stdout
    assert cli("plan", "--root", str(workspace), "--format", "mermaid").stdout.startswith("flowchart LR\n")
    assert cli("plan", "--root", str(workspace), "--format", "dot").stdout.startswith("digraph queue {")


def test_plan_table_of_many_items_is_shortened_unless_all(workspace):
    for number in range(1, 131):
        write_item(workspace, number, f"i{number}", command="true", files=[f"f{number}"])
    short = cli("plan", "--root", str(workspace))
    assert short.returncode == 0 and "… 30 more items (30 pending) not listed; `agent-parallel plan --all`" in short.stdout
    assert "… 6 more waves not listed" in short.stdout  # 26 waves of 5
    every = cli("plan", "--root", str(workspace), "--all")
    assert every.returncode == 0 and "more items" not in every.stdout and "i130" in every.stdout


def test_plan_with_errors_exits_1_and_outside_queue_dir_exits_2(workspace):
    write_item(workspace, 1, "a", command="true", blocked_by=[9])
    assert cli("plan", "--root", str(workspace)).returncode == 1
    outside = cli("plan", "--root", str(workspace), "--queue-dir", "../..")
    assert outside.returncode == 2
    assert "queue_dir '../..' resolves outside the workspace root" in outside.stderr


def test_run_exit_codes_and_summary(workspace):
    write_item(workspace, 1, "good", command="echo fine", files=["a"])
    ok = cli("run", "--root", str(workspace))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "completed" in ok.stdout and "makespan" in ok.stdout
    [first_report] = (workspace / ".agent/runs").glob("*.report.json")
    write_item(workspace, 2, "bad", command="echo oops; exit 3", files=["b"])
    bad = cli("run", "--root", str(workspace), "--level", "L3", "--continue-on-error")
    assert bad.returncode == 1
    assert "failed" in bad.stdout and "exit 3" in bad.stdout and "| oops" in bad.stdout
    assert statuses(workspace) == {"001": "completed", "002": "failed"}
    listed = cli("status", "--root", str(workspace))
    assert listed.returncode == 0 and "item 002: bad" in listed.stdout and "run" in listed.stdout
    run_id = json.loads(first_report.read_text())["run_id"]
    chart = cli("report", run_id, "--root", str(workspace), "--gantt")
    assert chart.returncode == 0 and chart.stdout.startswith("gantt\n") and ":done, i001, " in chart.stdout
    assert f"title Run {run_id}: makespan " in chart.stdout  # the report's line: no estimates, so no lower bound
    assert "(no item has an estimate: nothing to compare it with)" in chart.stdout
    missing = cli("report", "nosuchrun", "--root", str(workspace))
    assert missing.returncode == 2 and "no finished run 'nosuchrun'" in missing.stderr


def test_run_warns_once_about_a_claim_of_a_server_that_no_longer_runs(workspace):
    """`run` moves a dead server's claim to blocked and says so once (start_run does both; the
    command used to scan the queue for stale claims a second time before it)."""
    write_item(workspace, 1, "orphan", status="in_progress", command="true", files=["a"])
    write_item(workspace, 2, "fresh", command="true", files=["b"])
    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True, exist_ok=True)
    claim = {"time": 1.0, "item": "001", "from": "pending", "to": "in_progress", "by": "run gone", "reason": None,
             "pid": 999_999_999, "pid_start": 1}  # no such process
    (runs / "history.jsonl").write_text(json.dumps(claim) + "\n")
    result = cli("run", "--root", str(workspace))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("item 001 (001-blocked-orphan.md) was claimed by run gone") == 1, result.stdout
    assert statuses(workspace) == {"001": "blocked", "002": "completed"}


def test_demo_runs_a_copy_of_the_example_queue_from_anywhere(tmp_path):
    # an editable install (this suite's) copies the checkout's own .agent/, wherever the command runs
    before = sorted(p.name for p in (TOP / ".agent/queue").iterdir())
    result = cli("demo", cwd=tmp_path, timeout=120, env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"(a copy of {TOP / '.agent'})" in result.stdout
    assert "fork-join" in result.stdout and "pipeline" in result.stdout and "makespan" in result.stdout
    assert sorted(p.name for p in (TOP / ".agent/queue").iterdir()) == before  # the example itself is untouched
    [copy] = tmp_path.glob("agent-parallel-demo-*")
    assert sorted(p.name.split("-", 2)[1] for p in (copy / ".agent/queue").iterdir()) == ["completed"] * len(before)


def test_demo_finds_the_example_where_the_wheel_puts_it(tmp_path):
    # a wheel install, laid out by pyproject's force-include (no build backend needed to check it)
    import shutil
    import tomllib

    site = tmp_path / "site"
    shutil.copytree(TOP / "src/agent_parallel", site / "agent_parallel", ignore=shutil.ignore_patterns("__pycache__"))
    included = tomllib.loads((TOP / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "force-include"]
    for source, target in included.items():
        (shutil.copytree if (TOP / source).is_dir() else shutil.copy)(TOP / source, site / target)
    found = subprocess.run([sys.executable, "-c", "from agent_parallel.cli.main import example_agent_dir as f; print(f())"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert found.stdout == f"{site / 'agent_parallel/example'}\n", found.stderr
    assert sorted(p.name for p in (site / "agent_parallel/example/queue").iterdir()) == sorted(
        p.name for p in (TOP / ".agent/queue").iterdir()) and (site / "agent_parallel/example/config.yaml").is_file()


def test_demo_root_without_a_queue_is_refused_before_anything_is_made(tmp_path):
    result = cli("demo", "--root", str(tmp_path), cwd=tmp_path, env={"TMPDIR": str(tmp_path)})
    assert result.returncode != 0
    assert result.stderr.strip() == (f"agent-parallel: error: no queue at {tmp_path / '.agent/queue'}; pass --root with "
                                     "a workspace that has .agent/queue/, or leave --root out to run the example "
                                     "installed with agent-parallel")
    assert list(tmp_path.iterdir()) == []  # no demo workspace made


def test_run_folds_plain_completions_of_a_big_run_and_report_lists_every_item(workspace):
    for i in range(1, 31):
        write_item(workspace, i, f"item-{i}", title=f"item {i}", command="true" if i != 7 else "echo broke; exit 2",
                   files=[f"f{i}"])
    done = cli("run", "--root", str(workspace), "--level", "L3", "--continue-on-error")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "29 more items completed (agent-parallel report " in done.stdout
    assert "| broke" in done.stdout and "exit 2" in done.stdout  # the failure keeps its row
    assert "item 12" not in done.stdout
    assert "(no item has an estimate: nothing to compare it with)" in done.stdout  # no plan figures of 60 s guesses
    [report] = (workspace / ".agent/runs").glob("*.report.json")
    listed = cli("report", json.loads(report.read_text())["run_id"], "--root", str(workspace))
    assert listed.returncode == 0 and all(f"item {i}" in listed.stdout for i in range(1, 31))


def test_run_says_when_queue_errors_keep_items_from_running(workspace):
    write_item(workspace, 1, "good", command="true", files=["a"])
    (workspace / ".agent/queue/002-pending-Bad Name.md").write_text("---\ncommand: \"true\"\n---\n# Bad\n")
    done = cli("run", "--root", str(workspace))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the queue has 1 error(s), and the items they concern do not run: 002-pending-Bad Name.md: " \
        "file name slug" in " ".join((done.stdout + done.stderr).split())
    assert statuses(workspace) == {"001": "completed", "002": "pending"}  # the bad file is left as it was


def test_run_report_says_which_items_had_no_estimate(workspace):
    write_item(workspace, 1, "timed", command="true", files=["a"], estimate="2s")
    write_item(workspace, 2, "untimed", command="true", files=["b"])
    done = cli("run", "--root", str(workspace))
    assert done.returncode == 0, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert "vs lower bound" in text and "1 items without an estimate counted at 60 s)" in text


@pytest.mark.anyio
async def test_status_shows_tasks_launched_a_moment_ago_whose_record_files_are_not_written_yet(workspace):
    """A fan-out's first records are journaled, their files written a second later: `status` (another
    process) reads the journal for them; a journaled first record that is old, or planted with another
    task's id, is not shown."""
    from agent_parallel.tasks.records import TaskRecord
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    runs = workspace / ".agent" / "runs"
    runs.mkdir(parents=True)
    old = TaskRecord(task_id="oldtask00001", kind="command", command="echo pruned long ago", cwd=str(workspace))
    old.created_at -= 3600
    forged = TaskRecord(task_id="forged000001", kind="command", command="echo forged", cwd=str(workspace))
    async with open_registry(workspace, runs, RegistrySettings()) as registry:
        (runs / "journal-1-planted.wal").write_bytes(  # (as if another live server's)
            b"oldtask00001.json\t" + old.model_dump_json().encode() + b"\n"
            + b"somebody0001.json\t" + forged.model_dump_json().encode() + b"\n")
        _, members = await registry.launch_group(["sleep 30", "sleep 30", "echo waiting-member"], max_parallel=1,
                                                     cwd=workspace)
        assert not (runs / f"{members[2].record.task_id}.json").exists()  # its file is not written yet
        listed = await anyio.to_thread.run_sync(lambda: cli("status", "--root", str(workspace)))
        for task in members:
            await registry.cancel(task)
    assert listed.returncode == 0, listed.stderr
    assert "echo waiting-member" in listed.stdout and listed.stdout.count("sleep 30") == 2
    assert "pruned long ago" not in listed.stdout and "forged" not in listed.stdout


@pytest.mark.fault("Ctrl-C on `agent-parallel run` (untested before): the run stops at once, every command it started "
                   "is killed, each item says it was cancelled with its run, and the run says who stopped it")
def test_run_interrupted_with_ctrl_c_stops_everything_and_says_so(workspace):
    pids = workspace / "pids"
    for i in (1, 2):
        write_item(workspace, i, f"slow{i}", command=f"sleep 60 & echo $$ $! >> {pids}; wait", files=[f"f{i}"])
    proc = subprocess.Popen([str(SCRIPT), "run", "--root", str(workspace), "--max-parallel", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(workspace)})
    try:
        deadline = time.monotonic() + 30
        while len(read_pids(pids)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = read_pids(pids)
        assert len(started) == 4
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert "interrupted: stopping the run" in out and "stopped: the run was stopped by Ctrl-C (SIGINT) in the terminal that ran it" in out
    assert out.count("cancelled with its run") == 2
    assert all_dead_soon(started)
    assert statuses(workspace) == {"001": "failed", "002": "failed"}
    [record] = [json.loads(p.read_text()) for p in (workspace / ".agent/runs").glob("*.json")
                if json.loads(p.read_text()).get("kind") == "run"]
    assert record["state"]["outcome"]["reason"] == "stopped by Ctrl-C (SIGINT) in the terminal that ran it"
