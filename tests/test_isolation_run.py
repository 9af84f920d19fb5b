"""Isolated queue items end to end (run_queue and launch_task(item=...) with runner.isolation:
worktree), in real git repositories with fake agents: shell commands that edit files in their worktree."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

import pytest
from mcp import Client

from agent_parallel.server import ServerSettings, build_server
from conftest import alive, call
from queue_helpers import by_item, run_to_end, statuses, write_config, write_item
from worktree_helpers import LINES, git, make_empty_queue_repo

pytestmark = pytest.mark.anyio


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_empty_queue_repo(tmp_path / "repo")



def edit_line(path: str, n: int, text: str) -> str:
    return f"sed -i 's/^line {n}$/{text}/' {path}"


async def test_items_run_in_their_own_worktrees_and_are_integrated(repo):
    write_config(repo, runner={"isolation": "worktree"}, autonomy={"level": "L3", "max_parallel": 2})
    write_item(repo, 1, "edit-a", title="Edit a", command=edit_line("a.txt", 1, "A1") + ' && echo "$AGENT_BRANCH"')
    write_item(repo, 2, "edit-b", title="Edit b", command=edit_line("b.txt", 2, "B2") + ' && pwd')
    report = await run_to_end(repo)
    rows = by_item(report)
    assert report["status"] == "completed", rows
    assert [rows[i]["phase"] for i in ("001", "002")] == ["integrated", "integrated"]
    assert rows["001"]["branch"] == "agent/001-edit-a" and rows["001"]["worktree"].endswith(".agent/worktrees/001-edit-a")
    assert (repo / "a.txt").read_text().startswith("A1\n") and "B2\n" in (repo / "b.txt").read_text()
    assert git(repo, "log", "--format=%s", "main").splitlines()[:2] == ["Edit b", "Edit a"] or \
        git(repo, "log", "--format=%s", "main").splitlines()[:2] == ["Edit a", "Edit b"]
    assert statuses(repo) == {"001": "completed", "002": "completed"}
    assert not (repo / ".agent/worktrees/001-edit-a").exists()  # integrated: provably safe, removed


def write_two_items_editing_one_line(repo: Path) -> None:
    """001 and 002 change the same line of a.txt at once: 001 is integrated first, 002 then conflicts."""
    write_config(repo, runner={"isolation": "worktree"}, autonomy={"level": "L3", "max_parallel": 2})
    write_item(repo, 1, "first", title="First", command=edit_line("a.txt", 3, "FIRST") + " && sleep 0.3")
    write_item(repo, 2, "second", title="Second", command=edit_line("a.txt", 3, "SECOND") + " && sleep 1.5")


async def test_a_conflict_fails_the_item_keeps_its_branch_and_skips_its_dependents(repo):
    write_two_items_editing_one_line(repo)
    write_item(repo, 3, "after-second", title="After", command="true", blocked_by=[2])
    report = await run_to_end(repo)
    rows = by_item(report)
    assert rows["001"]["outcome"] == "completed" and rows["001"]["phase"] == "integrated"
    assert rows["002"]["outcome"] == "failed" and rows["002"]["phase"] == "conflict"
    assert rows["002"]["conflicts"] == ["a.txt"] and "a.txt" in rows["002"]["reason"]
    assert rows["003"]["outcome"] == "skipped"
    assert "FIRST" in (repo / "a.txt").read_text() and "SECOND" not in (repo / "a.txt").read_text()
    assert "SECOND" in git(repo, "show", "agent/002-second:a.txt")  # its work is kept on its branch
    assert (repo / ".agent/worktrees/002-second").is_dir()
    assert statuses(repo)["002"] == "failed"


async def test_an_isolated_items_task_shows_its_last_phase_and_conflicts_also_after_a_restart(repo):
    """TOOLS.md: task_output of a queue item's task gives its phase and conflicts, as the run report does."""
    write_two_items_editing_one_line(repo)
    report = await run_to_end(repo)
    rows = by_item(report)
    first, second = rows["001"]["task_id"], rows["002"]["task_id"]
    for _ in range(2):  # the run's server, then a new one reading the records it kept
        async with Client(build_server(repo, ServerSettings(min_free_memory=0))) as client:
            one = await call(client, "task_output", task_id=first)
            two = await call(client, "task_output", task_id=second)
        assert (one["phase"], one["conflicts"]) == ("integrated", []), one  # as the report's row shows it
        assert (two["phase"], two["conflicts"]) == ("conflict", ["a.txt"]), two


async def test_a_running_isolated_items_task_shows_the_conflicts_forecast_for_it(repo, tmp_path):
    """When one item is integrated, the run forecasts what the others would conflict on: their tasks'
    task_output shows it while they run (phase running), as the run's progress does."""
    committed = tmp_path / "second-committed"  # 001 ends (and is integrated) only once 002's change is on its branch
    write_config(repo, runner={"isolation": "worktree"}, autonomy={"level": "L3", "max_parallel": 2})
    write_item(repo, 1, "first", title="First",
               command=f"while [ ! -e {committed} ]; do sleep 0.05; done; " + edit_line("a.txt", 3, "FIRST"))
    write_item(repo, 2, "second", title="Second", command=edit_line("a.txt", 3, "SECOND")
               + f" && git add -A && git commit -qm wip && touch {committed} && sleep 30")
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        run = await call(client, "run_queue")
        with anyio.fail_after(30):
            while True:  # until the forecast made after item 001's integration names the file
                progress = (await call(client, "task_output", task_id=run["run_id"], block=False))["run"]
                row = next((r for r in progress["running"] if r["item"] == "002"), None)
                if row is not None and row.get("conflicts"):
                    break
                await anyio.sleep(0.05)
        second = await call(client, "task_output", task_id=row["task_id"], block=False)
        await call(client, "cancel_task", task_id=run["run_id"])
    assert (second["status"], second["phase"], second["conflicts"]) == ("running", "running", ["a.txt"]), second


async def test_an_isolated_items_task_shows_integrating_while_it_is_integrated(repo, tmp_path):
    started = tmp_path / "verify-started"
    write_config(repo, runner={"isolation": "worktree"}, integration={"verify": f"touch {started}; sleep 2"})
    write_item(repo, 1, "solo", title="Solo", command=edit_line("b.txt", 5, "SOLO"))
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        answer = await call(client, "launch_task", item="001")
        with anyio.fail_after(30):
            while not started.exists():
                await anyio.sleep(0.05)
        during = await call(client, "task_output", task_id=answer["task_id"], block=False)
        out = await call(client, "task_output", task_id=answer["task_id"], timeout=60)
    assert during["phase"] == "integrating", during
    assert out["phase"] == "integrated" and "SOLO" in (repo / "b.txt").read_text(), out


async def test_a_dependent_starts_from_its_predecessors_merged_work(repo):
    write_config(repo, runner={"isolation": "worktree"}, autonomy={"level": "L3"})
    write_item(repo, 1, "make-file", title="Make file", command="echo made > new.txt")
    write_item(repo, 2, "use-file", title="Use file", command="cat new.txt && echo used >> new.txt", blocked_by=[1])
    report = await run_to_end(repo)
    assert report["status"] == "completed", by_item(report)
    assert (repo / "new.txt").read_text() == "made\nused\n"


async def test_setup_output_opens_the_log_and_a_failed_setup_fails_the_item(repo):
    write_config(repo, runner={"isolation": "worktree"}, worktree={"setup": "echo setting up; test -f ok || exit 7"},
                 autonomy={"level": "L3"})
    write_item(repo, 1, "no-setup", title="No setup", command="true")
    report = await run_to_end(repo)
    row = by_item(report)["001"]
    assert row["outcome"] == "failed" and "could not start" in row["reason"] and "setting up" in row["reason"]
    assert statuses(repo)["001"] == "failed"


async def test_not_a_git_repository_fails_the_item_with_the_setting_named(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    write_config(root, runner={"isolation": "worktree"})
    write_item(root, 1, "x", command="true")
    report = await run_to_end(root)
    row = by_item(report)["001"]
    assert row["outcome"] == "failed" and row["reason"] == (
        f"could not start: .agent/config.yaml: runner.isolation is worktree, which needs the workspace {root} to "
        "be a git repository with a working tree; run git init there (and commit once), or set runner.isolation: none")
    assert statuses(root) == {"001": "pending"}  # a setting's problem, not the item's: it is not claimed


async def test_launch_task_item_is_isolated_too(repo):
    write_config(repo, runner={"isolation": "worktree"})
    write_item(repo, 1, "solo", title="Solo", command=edit_line("b.txt", 5, "SOLO") + ' && echo "port=$AGENT_PORT"')
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        out = await call(client, "launch_task", item="001", run_in_background=False)
    assert out["status"] == "completed", out
    assert out["branch"] == "agent/001-solo" and out["worktree"].endswith(".agent/worktrees/001-solo")
    assert "runs in the worktree" in out["output"] and "agent/001-solo" in out["output"]
    assert "integrated into main" in (out["reason"] or "")
    assert "SOLO" in (repo / "b.txt").read_text() and statuses(repo)["001"] == "completed"
    assert (repo / "b.txt").read_text() != LINES


async def test_launch_task_item_answers_before_its_worktree_setup(repo, tmp_path):
    write_config(repo, runner={"isolation": "worktree"}, worktree={"setup": "echo fetch$((0))ing; sleep 3; echo set-$((1 + 1))"})
    write_item(repo, 1, "solo", title="Solo", command=edit_line("b.txt", 5, "SOLO"))
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        started = time.monotonic()
        answer = await call(client, "launch_task", item="001")
        assert time.monotonic() - started < 2.5  # the setup alone takes 3 s: it is the task's first step
        assert answer["item_id"] == "001" and answer["item_file"] == "001-in_progress-solo.md"
        with anyio.fail_after(2.5):  # what the setup prints shows while it runs
            while "fetch0ing" not in (during := await call(client, "task_output", task_id=answer["task_id"],
                                                         block=False))["output"]:
                await anyio.sleep(0.05)
        assert during["status"] == "running" and during["phase"] == "setup" and "set-2" not in during["output"], during
        out = await call(client, "task_output", task_id=answer["task_id"], timeout=60)
    assert out["status"] == "completed" and out["phase"] == "integrated", out
    assert out["branch"] == "agent/001-solo" and out["worktree"].endswith(".agent/worktrees/001-solo")
    assert out["cwd"] == out["worktree"]  # where it ran, once its worktree was made
    assert out["output"].index("gets its worktree") < out["output"].index("fetch0ing") < out["output"].index("set-2")
    assert "integrated into main" in out["reason"] and statuses(repo)["001"] == "completed"
    assert "SOLO" in (repo / "b.txt").read_text()


@pytest.mark.fault("a launch_task(item=...)'s worktree.setup fails: the task fails naming the setup and showing its "
                   "output, the item is failed, its worktree kept")
async def test_launch_task_items_failed_setup_fails_its_task(repo):
    write_config(repo, runner={"isolation": "worktree"}, worktree={"setup": "echo no network; exit 3"})
    write_item(repo, 1, "solo", title="Solo", command="touch ran")
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        answer = await call(client, "launch_task", item="001")
        out = await call(client, "task_output", task_id=answer["task_id"], timeout=60)
    assert out["status"] == "failed" and out["phase"] == "setup", out
    assert out["reason"].startswith("its worktree could not be prepared: ") and "no network" in out["reason"], out
    assert "no network" in out["output"]
    assert statuses(repo) == {"001": "failed"}
    assert (repo / ".agent/worktrees/001-solo").is_dir() and not (repo / ".agent/worktrees/001-solo/ran").exists()


async def test_an_items_own_isolation_field_overrides_the_config(repo):
    write_config(repo, autonomy={"level": "L3"})  # runner.isolation defaults to none
    write_item(repo, 1, "isolated", title="Isolated", isolation="worktree", command='echo "branch=$AGENT_BRANCH"')
    write_item(repo, 2, "in-place", title="In place", command='echo "branch=${AGENT_BRANCH:-none}"; pwd')
    report = await run_to_end(repo)
    rows = by_item(report)
    assert rows["001"]["phase"] == "integrated" and rows["001"]["branch"] == "agent/001-isolated"
    assert "phase" not in rows["002"] and "branch" not in rows["002"]


@pytest.mark.fault("an item whose isolation is neither none nor worktree: a plan error naming the field, the item "
                   "not run")
async def test_a_bad_isolation_value_is_a_plan_error(repo):
    write_item(repo, 1, "odd", isolation="container", command="true")
    async with Client(build_server(repo, ServerSettings(min_free_memory=0))) as client:
        plan = await call(client, "queue_plan")
    assert any(e["message"] == "isolation: 'container' is not none or worktree" for e in plan["errors"]), plan["errors"]
    assert plan["run_now"] == []


async def trace_overlap(repo: Path, allow_overlap: bool) -> bool:
    write_config(repo, runner={"isolation": "worktree"}, integration={"allow_overlap": allow_overlap},
                 autonomy={"level": "L3", "max_parallel": 2})
    trace = repo.parent / f"trace-{repo.name}"
    for n in (1, 2):
        write_item(repo, n, f"shared-{n}", title=f"Shared {n}", files=["a.txt"],
                   command=f"echo start >> {trace}; sleep 0.4; echo end >> {trace}; echo {n} > own-{n}.txt")
    report = await run_to_end(repo)
    assert report["status"] == "completed", by_item(report)
    return trace.read_text().split() == ["start", "start", "end", "end"]


async def test_declared_overlaps_serialize_isolated_items_unless_allowed(repo, tmp_path):
    assert not await trace_overlap(repo, allow_overlap=False)
    other = make_empty_queue_repo(tmp_path / "other")
    assert await trace_overlap(other, allow_overlap=True)


async def test_an_item_ending_while_the_run_prepares_a_worktree_is_moved_meanwhile(repo):
    """A completed item's end move waits for the run's next claim (``Mover``) at most
    ``Mover.PATIENCE_S``: while another item's worktree is prepared (its setup sleeps 1.5 s), the
    item that ended meanwhile moves to completed."""
    listing = repo.parent / "queue-during-setup.txt"
    write_config(repo, worktree={"setup": f"sleep 1.5; ls {repo / '.agent/queue'} > {listing}"},
                 autonomy={"level": "L3", "max_parallel": 2})
    write_item(repo, 1, "quick", title="Quick", command="sleep 0.3", files=["a.txt"], estimate="1h")  # ranked first
    write_item(repo, 2, "isolated", title="Isolated", command="true", files=["b.txt"], isolation="worktree")
    report = await run_to_end(repo)
    assert report["status"] == "completed", by_item(report)
    assert "001-completed-quick.md" in listing.read_text().split(), listing.read_text()
    assert statuses(repo) == {"001": "completed", "002": "completed"}


async def test_worktree_setups_do_not_hold_up_the_run(repo):
    """A slow worktree.setup (an ``npm ci``, say) is made beside the run's loop: the setups of two
    isolated items overlap, and a plain item starts and ends while they run. Each setup waits (at
    most 20 s, then fails) until both setups have begun and the plain item has run, which, made one
    after the other with the loop waiting on each, they never would."""
    marks = repo.parent / "marks"
    marks.mkdir()
    setup = (f'touch "{marks}/$(basename "$AGENT_WORKTREE")"; for i in $(seq 400); do '
             f'[ -f {marks}/001-slow-a ] && [ -f {marks}/002-slow-b ] && [ -f {marks}/plain ] && exit 0; '
             'sleep 0.05; done; echo "the setups did not run beside each other and the plain item"; exit 1')
    write_config(repo, worktree={"setup": setup}, autonomy={"level": "L3", "max_parallel": 3})
    write_item(repo, 1, "slow-a", title="Slow a", command=edit_line("a.txt", 1, "A"), files=["a.txt"],
               isolation="worktree", estimate="1h")  # ranked first: claimed before the plain item
    write_item(repo, 2, "slow-b", title="Slow b", command=edit_line("b.txt", 2, "B"), files=["b.txt"],
               isolation="worktree", estimate="1h")
    write_item(repo, 3, "plain", title="Plain", command=f"touch {marks}/plain", files=["c.txt"])
    report = await run_to_end(repo)
    rows = by_item(report)
    assert report["status"] == "completed", rows
    assert [rows[i]["outcome"] for i in ("001", "002", "003")] == ["completed"] * 3
    assert [rows[i]["phase"] for i in ("001", "002")] == ["integrated", "integrated"]
    assert (repo / "a.txt").read_text().startswith("A\n") and "B\n" in (repo / "b.txt").read_text()
    assert statuses(repo) == {"001": "completed", "002": "completed", "003": "completed"}


async def test_progress_shows_an_item_in_its_worktree_setup(repo):
    """While its worktree.setup runs, an isolated item holds its slot and shows in the run's progress
    with phase ``setup`` (no task yet)."""
    go = repo.parent / "go"
    write_config(repo, worktree={"setup": f"for i in $(seq 400); do [ -f {go} ] && exit 0; sleep 0.05; done; exit 1"},
                 autonomy={"level": "L3", "max_parallel": 1})
    write_item(repo, 1, "isolated", title="Isolated", command="true", isolation="worktree")
    write_item(repo, 2, "plain", title="Plain", command="true")
    async with Client(build_server(repo, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        run_id = (await call(client, "run_queue"))["run_id"]
        for _ in range(400):
            progress = (await call(client, "task_output", task_id=run_id, timeout=0))["run"]
            if progress["running"] and statuses(repo)["001"] == "in_progress":  # claimed (then its setup starts)
                break
            await anyio.sleep(0.05)
        assert [(r["item"], r["phase"], r["task_id"]) for r in progress["running"]] == [("001", "setup", None)]
        assert progress["counts"]["running"] == 1  # its slot is taken: the plain item waits (max_parallel 1)
        assert statuses(repo) == {"001": "in_progress", "002": "pending"}
        go.touch()
        out = await call(client, "task_output", task_id=run_id, timeout=60)
    assert out["retrieval_status"] == "success" and out["status"] == "completed", out["run"]
    assert statuses(repo) == {"001": "completed", "002": "completed"}


def leftover_killed(pid_file: Path) -> bool:
    """Whether the process whose pid the command wrote is gone (killed with its group)."""
    return not alive(int(pid_file.read_text()))


@pytest.mark.fault("worktree.setup hangs (a `sleep 30` in the background it waits for) past worktree.setup_timeout: "
                   "it is killed with what it started, the item fails naming the setting, its worktree is kept")
async def test_a_setup_past_its_timeout_is_killed_and_fails_the_item(repo):
    pid_file = repo.parent / "setup.pid"
    write_config(repo, worktree={"setup": f"echo preparing; sleep 30 & echo $! > {pid_file}; wait",
                                 "setup_timeout": "1s"},
                 runner={"isolation": "worktree"}, autonomy={"level": "L3", "max_parallel": 2})
    write_item(repo, 1, "hangs", title="Hangs", command="true")
    write_item(repo, 2, "after", title="After", command="true", blocked_by=[1])
    report = await run_to_end(repo)
    rows = by_item(report)
    assert rows["001"]["outcome"] == "failed" and rows["002"]["outcome"] == "skipped"
    reason = rows["001"]["reason"]
    assert "worktree.setup `echo preparing; sleep 30" in reason and "did not finish within 1s " \
        "(worktree.setup_timeout); it was killed with everything it started" in reason, reason
    assert "preparing" in reason  # the output's tail
    assert leftover_killed(pid_file)
    assert statuses(repo) == {"001": "failed", "002": "pending"}
    assert (repo / ".agent/worktrees/001-hangs").is_dir()  # kept: retrying reuses it


@pytest.mark.fault("integration.verify hangs past integration.verify_timeout: it is killed with what it started, the "
                   "item fails (verify_failed) naming the setting, the target does not move, the branch is kept")
async def test_a_verify_past_its_timeout_is_killed_and_fails_the_item(repo):
    pid_file = repo.parent / "verify.pid"
    before = git(repo, "rev-parse", "main")
    write_config(repo, integration={"verify": f"sleep 30 & echo $! > {pid_file}; wait", "verify_timeout": "1s"},
                 runner={"isolation": "worktree"}, autonomy={"level": "L3", "max_parallel": 2})
    write_item(repo, 1, "slow-verify", title="Slow verify", command=edit_line("a.txt", 1, "V"))
    report = await run_to_end(repo)
    row = by_item(report)["001"]
    assert (row["outcome"], row["phase"], row["conflicts"]) == ("failed", "conflict", []), row  # (a failed integration)
    assert row["reason"].startswith("integration failed: integration.verify `sleep 30 & echo") and \
        "did not finish within 1s (integration.verify_timeout)" in row["reason"], row["reason"]
    assert leftover_killed(pid_file)
    assert git(repo, "rev-parse", "main") == before
    assert "V" in git(repo, "show", "agent/001-slow-verify:a.txt").splitlines()  # its work is kept on its branch
