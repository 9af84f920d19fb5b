"""Preparing an item's worktree: where and on which branch, reuse after a crash, `.env` copied and
directories linked (never committed), ports without collisions (also across processes), setup
output and failure, and a clear error that changes nothing for every bad input."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent_parallel.config import ConfigError
from agent_parallel.errors import SetupFailed, UsageError, WorktreeError
from agent_parallel.worktrees import check_repository, integrate, prepare, release
from worktree_helpers import LINES, agent, config, git, head, make_repo, tracked_snapshot


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "ws")


def test_a_worktree_per_item_on_its_own_branch_from_the_target(repo: Path) -> None:
    lease = prepare(repo, config(), "007", "fix-login")
    assert lease.path == repo / ".agent/worktrees/007-fix-login" and lease.workdir == lease.path
    assert (lease.branch, lease.target, lease.reused, lease.port) == ("agent/007-fix-login", "main", False, None)
    assert head(repo, "agent/007-fix-login") == head(repo) == lease.base
    assert lease.env() == {"AGENT_WORKTREE": str(lease.path), "AGENT_BRANCH": "agent/007-fix-login"}
    assert (repo / ".agent/worktrees/.gitignore").read_text() == "*\n"
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""  # git never sees the worktrees


def test_the_integration_target_can_be_another_branch(repo: Path) -> None:
    git(repo, "branch", "develop")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main only")
    lease = prepare(repo, config(integration_target="develop"), "001", "x")
    assert (lease.target, lease.base) == ("develop", head(repo, "develop"))


def test_reuse_after_a_crash_keeps_commits_and_files(repo: Path) -> None:
    cfg = config()
    lease = prepare(repo, cfg, "001", "first")
    agent(lease, "echo committed > c.txt && git add c.txt && git commit -qm wip && echo loose > loose.txt")
    tip = head(lease.path, "HEAD")
    git(repo, "commit", "-q", "--allow-empty", "-m", "target moved meanwhile")
    again = prepare(repo, cfg, "001", "first")  # the server restarted; the item is pending again
    assert (again.reused, again.path, head(again.path, "HEAD")) == (True, lease.path, tip)
    assert (again.workdir / "loose.txt").read_text() == "loose\n"
    assert integrate(repo, cfg, again, "First").ok
    assert (repo / "c.txt").exists() and (repo / "loose.txt").exists()


def test_a_worktree_deleted_by_hand_comes_back_with_its_branch(repo: Path) -> None:
    import shutil

    lease = prepare(repo, config(), "001", "first")
    agent(lease, "echo kept > kept.txt && git add kept.txt && git commit -qm kept")
    shutil.rmtree(lease.path)
    again = prepare(repo, config(), "001", "first")
    assert again.reused and (again.workdir / "kept.txt").read_text() == "kept\n"


def test_env_files_are_copied_and_directories_linked_but_never_committed(repo: Path) -> None:
    (repo / ".env").write_text("SECRET=1\n")
    (repo / ".env.local").write_text("LOCAL=1\n")
    (repo / "node_modules/pkg").mkdir(parents=True)
    (repo / "node_modules/pkg/index.js").write_text("x")
    cfg = config(worktree_copy=(".env*",), worktree_link=("node_modules", "missing_dir"))
    lease = prepare(repo, cfg, "001", "first")
    assert (lease.workdir / ".env").read_text() == "SECRET=1\n"
    assert (lease.workdir / ".env.local").read_text() == "LOCAL=1\n"
    assert (lease.workdir / "node_modules").is_symlink()
    assert (lease.workdir / "node_modules/pkg/index.js").read_text() == "x"
    assert lease.notes == (f"worktree.link missing_dir: nothing by that name in {repo}; not linked",)
    agent(lease, "echo change >> a.txt")
    assert integrate(repo, cfg, lease, "Change").ok
    assert git(repo, "show", "--name-only", "--format=", "main") == "a.txt"  # not .env.local, not node_modules


def test_a_copied_file_never_overwrites_one_in_the_worktree(repo: Path) -> None:
    (repo / ".env").write_text("v1\n")
    cfg = config(worktree_copy=(".env",))
    lease = prepare(repo, cfg, "001", "first")
    (lease.workdir / ".env").write_text("changed by the agent\n")
    (repo / ".env").write_text("v2\n")
    prepare(repo, cfg, "001", "first")
    assert (lease.workdir / ".env").read_text() == "changed by the agent\n"


def test_a_workspace_in_a_subdirectory_of_the_repository(tmp_path: Path) -> None:
    top = make_repo(tmp_path / "top", {"app/main.txt": "app\n"})
    lease = prepare(top / "app", config(), "001", "sub")
    assert lease.path == top / "app/.agent/worktrees/001-sub"
    assert lease.workdir == lease.path / "app" and (lease.workdir / "main.txt").exists()
    agent(lease, "echo more >> main.txt")
    assert integrate(top / "app", config(), lease, "Sub").ok
    assert (top / "app/main.txt").read_text() == "app\nmore\n"


def test_ports_are_never_shared_by_live_leases(repo: Path) -> None:
    cfg = config(worktree_ports=(4100, 4102))
    leases = [prepare(repo, cfg, f"00{n}", f"i{n}") for n in range(1, 4)]
    assert sorted(lease.port for lease in leases) == [4100, 4101, 4102]
    assert leases[0].env()["AGENT_PORT"] == str(leases[0].port)
    with pytest.raises(WorktreeError, match=r"^no free port left in worktree.ports 4100-4102: 3 live worktrees "
                                            r"hold ports"):
        prepare(repo, cfg, "004", "i4")
    release(repo, leases[1])
    assert prepare(repo, cfg, "004", "i4").port == leases[1].port


def test_ports_are_never_shared_across_two_processes(repo: Path) -> None:
    """Two processes (two servers) take ten leases each at once: twenty different ports."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from agent_parallel.config import Config
        from agent_parallel.worktrees import prepare
        cfg = Config(isolation="worktree", worktree_ports=(5200, 5299))
        ports = [prepare(Path({str(repo)!r}), cfg, f"{{sys.argv[1]}}{{n}}", "p").port for n in range(10)]
        print(*ports, flush=True)
        sys.stdin.read()  # stay alive (holding the leases) until the test has both answers
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, prefix], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for prefix in ("1", "2")]
    try:
        answers = [proc.stdout.readline().split() for proc in procs if proc.stdout]
    finally:
        for proc in procs:
            proc.communicate("")
    ports = [int(p) for answer in answers for p in answer]
    assert len(ports) == 20 and len(set(ports)) == 20


def test_setup_runs_in_the_worktree_with_its_output_in_the_log(repo: Path) -> None:
    cfg = config(worktree_setup='echo "setting up in $(pwd) on $AGENT_BRANCH"; touch .setup-done',
                 worktree_ports=(5400, 5410))
    log = io.BytesIO()
    lease = prepare(repo, cfg, "001", "first", log=log)
    assert log.getvalue() == f"setting up in {lease.workdir} on agent/001-first\n".encode()
    assert (lease.workdir / ".setup-done").exists()


def test_a_failing_setup_raises_with_its_output_and_gives_the_port_back(repo: Path) -> None:
    cfg = config(worktree_setup="echo npm ERR missing; exit 7", worktree_ports=(5500, 5500))
    with pytest.raises(SetupFailed) as caught:
        prepare(repo, cfg, "001", "first")
    path = repo / ".agent/worktrees/001-first"
    assert str(caught.value) == (f"worktree.setup `echo npm ERR missing; exit 7` exited with code 7 in {path} (the "
                                 "worktree is kept: fix the setup, then retry the item); its output ended with:\n"
                                 "npm ERR missing")
    assert (caught.value.output_tail, caught.value.exit_code) == ("npm ERR missing", 7)
    assert prepare(repo, config(worktree_ports=(5500, 5500)), "002", "other").port == 5500


# --- bad input: an exact message, and nothing changed ---------------------------------------------------------


def test_not_a_git_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        prepare(tmp_path, config(), "001", "first")
    assert str(caught.value) == (f".agent/config.yaml: runner.isolation is worktree, which needs the workspace "
                                 f"{tmp_path} to be a git repository with a working tree; run git init there (and "
                                 f"commit once), or set runner.isolation: none")
    assert list(tmp_path.iterdir()) == []


def test_a_repository_without_a_commit(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "-b", "main")
    with pytest.raises(ConfigError, match=r"^\.agent/config\.yaml: integration\.target is not set, and the "
                                          r"workspace's branch 'main' has no commit yet; commit once \(git commit "
                                          r"--allow-empty -m start\), or set integration\.target$"):
        check_repository(tmp_path, config())


def test_a_target_branch_that_does_not_exist(repo: Path) -> None:
    before = tracked_snapshot(repo)
    with pytest.raises(ConfigError) as caught:
        prepare(repo, config(integration_target="release"), "001", "first")
    assert str(caught.value) == (f".agent/config.yaml: integration.target names branch 'release', which does not "
                                 f"exist in {repo}; create it (git branch release) or set integration.target to "
                                 f"one of: main")
    assert tracked_snapshot(repo) == before and not (repo / ".agent/worktrees").exists()


def test_a_detached_head_without_a_target(repo: Path) -> None:
    git(repo, "checkout", "-q", "--detach")
    before = tracked_snapshot(repo)
    with pytest.raises(ConfigError, match=r"^\.agent/config\.yaml: integration\.target is not set and the workspace "
                                          r"has no branch checked out \(a detached HEAD\); set integration\.target to "
                                          r"the branch to integrate into \(e\.g\. main\), or check out a branch$"):
        prepare(repo, config(), "001", "first")
    assert tracked_snapshot(repo) == before
    assert prepare(repo, config(integration_target="main"), "001", "first").target == "main"


@pytest.mark.parametrize(("item_id", "slug", "message"), [
    ("1a", "x", "item id '1a' must be digits (like 005): it names the worktree and its branch"),
    ("", "x", "item id '' must be digits (like 005): it names the worktree and its branch"),
    ("001", "../escape", "item slug '../escape' cannot name a worktree and a git branch: use letters, digits, - _ "
                         "and . (not first or last), at most 100 characters, like fix-login"),
    ("001", "a b", "item slug 'a b' cannot name a worktree and a git branch: use letters, digits, - _ "
                   "and . (not first or last), at most 100 characters, like fix-login"),
    ("001", "x.lock", "item slug 'x.lock' cannot name a worktree and a git branch: use letters, digits, - _ "
                      "and . (not first or last), at most 100 characters, like fix-login"),
    ("001", "", "item slug '' cannot name a worktree and a git branch: use letters, digits, - _ "
                "and . (not first or last), at most 100 characters, like fix-login"),
])
def test_bad_ids_and_slugs_are_refused_before_anything_changes(repo: Path, item_id: str, slug: str,
                                                               message: str) -> None:
    before = tracked_snapshot(repo)
    with pytest.raises(UsageError) as caught:
        prepare(repo, config(), item_id, slug)
    assert str(caught.value) == message
    assert tracked_snapshot(repo) == before and not (repo / ".agent/worktrees").exists()


def test_a_stray_directory_where_the_worktree_goes_is_left_alone(repo: Path) -> None:
    stray = repo / ".agent/worktrees/001-first"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine\n")
    with pytest.raises(WorktreeError) as caught:
        prepare(repo, config(), "001", "first")
    assert str(caught.value) == (f"{stray} exists but is not a git worktree of this repository; move it away "
                                 "(nothing was changed), then retry the item")
    assert (stray / "notes.txt").read_text() == "mine\n"
    assert git(repo, "branch", "--list", "agent/*") == ""


def test_a_worktree_switched_to_another_branch_is_not_reused_silently(repo: Path) -> None:
    lease = prepare(repo, config(), "001", "first")
    git(lease.path, "checkout", "-q", "-b", "elsewhere")
    with pytest.raises(WorktreeError, match=r"^worktree .*001-first is on elsewhere, not on agent/001-first; check "
                                            r"out agent/001-first there"):
        prepare(repo, config(), "001", "first")
    assert head(repo, "main") == lease.base and (repo / "a.txt").read_text() == LINES


def test_a_worktree_left_detached_by_a_crash_during_verify_goes_back_to_its_branch(repo: Path) -> None:
    lease = prepare(repo, config(), "001", "first")
    agent(lease, "echo x >> a.txt && git commit -qam one")
    tip = head(lease.path, "HEAD")
    git(lease.path, "checkout", "-q", "--detach", "HEAD")  # where a merge's verify runs
    again = prepare(repo, config(), "001", "first")
    assert git(again.path, "symbolic-ref", "HEAD") == "refs/heads/agent/001-first"
    assert head(again.path, "HEAD") == tip


@pytest.mark.fault("the repository has a branch named `agent` (so no agent/<id>-<slug> branch can exist): git's "
                   "`cannot lock ref` was the whole error; now it names the branch in the way and how to rename it, "
                   "nothing changed")
def test_a_branch_named_agent_is_named_with_how_to_rename_it(repo: Path) -> None:
    git(repo, "branch", "agent")
    before = tracked_snapshot(repo)
    with pytest.raises(WorktreeError) as caught:
        prepare(repo, config(), "001", "first")
    assert str(caught.value) == (f"the repository has a branch named 'agent', so git cannot make the item's branch "
                                 f"agent/001-first (a branch name cannot also be a folder of branches); rename it "
                                 f"(git -C {repo} branch -m agent agent-work), then retry the item; nothing was "
                                 "changed")
    assert git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/") == "refs/heads/agent\nrefs/heads/main"
    assert git(repo, "worktree", "list", "--porcelain") == before[2]
    assert not (repo / ".agent/worktrees/001-first").exists()
    git(repo, "branch", "-m", "agent", "agent-work")  # the fix the error gives works
    assert prepare(repo, config(), "001", "first").branch == "agent/001-first"
