"""Faults from outside our own code that must neither hang a server nor lose work: the user's git
hooks (never run by our git steps), a git step that never ends (killed past its timeout, named), a
git repository the agent made inside its worktree (never integrated as a gitlink), and a server
killed half-way through moving the target and the user's checkout (never left looking reversed)."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import pytest

from agent_parallel.errors import WorktreeError
from agent_parallel.worktrees import integrate, prepare
from agent_parallel.worktrees._git import GIT_TIMEOUT_VAR
from conftest import all_dead_soon, read_pids
from worktree_helpers import LINES, agent, commit_once, config, git, head, make_repo

STRATEGIES = ["rebase", "merge", "squash"]
HOOKS = ["post-checkout", "reference-transaction", "pre-commit", "prepare-commit-msg", "commit-msg", "post-commit",
         "post-merge", "post-rewrite", "pre-rebase", "pre-auto-gc"]

integrate_module = importlib.import_module("agent_parallel.worktrees.integrate")  # (the package shows the function)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "ws")


def commit_in(path: Path, message: str) -> None:
    """A commit made by hand (by the test, standing in for the user), hooks and all."""
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)


# -- 1. hooks and git steps that never end

@pytest.mark.fault("a user's git hook that hangs (post-checkout, reference-transaction, pre-commit, post-merge ...) "
                   "ran inside prepare's and integrate's own git steps, which had no timeout: the item, and a server "
                   "stopping, waited forever; now agent-parallel's own git steps run no hooks")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_hanging_git_hook_never_runs_in_our_git_steps(repo: Path, tmp_path: Path, strategy: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ran, hang = tmp_path / "hooks-ran", tmp_path / "hang"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for name in HOOKS:
        (hooks / name).write_text(f"#!/bin/sh\necho {name} >> {ran}\nif [ -e {hang} ]; then exec sleep 120; fi\n")
        (hooks / name).chmod(0o755)
    git(repo, "config", "core.hooksPath", str(hooks))  # as husky and others set it
    hang.touch()
    monkeypatch.setenv(GIT_TIMEOUT_VAR, "20")  # a hook that did run would fail the test here, not hang it
    cfg = config(integration_strategy=strategy)
    started = time.monotonic()
    lease = prepare(repo, cfg, "001", "first")
    (lease.workdir / "a.txt").write_text(LINES + "agent\n")  # the agent's work, left for integrate to commit
    result = integrate(repo, cfg, lease, "First")
    assert (result.ok, result.phase) == (True, "integrated"), result.message
    assert not ran.exists(), ran.read_text()
    assert time.monotonic() - started < 20
    assert (repo / "a.txt").read_text() == LINES + "agent\n"
    assert git(repo, "status", "--porcelain") == ""
    # the hooks are real: a commit by the user runs them
    hang.unlink()
    git(repo, "commit", "-q", "--allow-empty", "-m", "by hand")
    assert {"pre-commit", "commit-msg", "post-commit"} <= set(ran.read_text().split())


@pytest.mark.fault("a git step that never ends (a smudge filter such as git-lfs hanging in `git worktree add`): "
                   "prepare waited forever; now the step is killed past its timeout with everything it started, "
                   "named with what to look for, and the half-made worktree removed so a retry starts afresh")
def test_a_git_step_that_hangs_is_killed_named_and_leaves_no_half_worktree(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "ws", {".gitattributes": "*.bin filter=slow\n", "data.bin": "payload\n"})
    pids = tmp_path / "filter.pids"
    git(repo, "config", "filter.slow.clean", "cat")
    git(repo, "config", "filter.slow.smudge", f"echo $$ >> {pids}; exec sleep 120")
    before = git(repo, "status", "--porcelain", "--untracked-files=all"), head(repo)
    monkeypatch.setenv(GIT_TIMEOUT_VAR, "1")
    path = repo / ".agent/worktrees/001-first"
    started = time.monotonic()
    with pytest.raises(WorktreeError) as raised:
        prepare(repo, config(), "001", "first")
    assert time.monotonic() - started < 30
    assert str(raised.value) == (
        f"git worktree add -b agent/001-first {path} did not finish within 1s in {repo}, so it was killed with "
        "everything it started (agent-parallel runs git without hooks: look for a clean/smudge filter such as git-lfs "
        "in .gitattributes, or a file system that does not answer); if git then names a lock file it left (such as "
        "index.lock), remove it once no git runs there; for a repository that needs longer, set "
        "AGENT_PARALLEL_GIT_TIMEOUT (seconds), then retry the item")
    assert read_pids(pids) and all_dead_soon(read_pids(pids))  # the filter was killed with git
    assert not path.exists() and str(path) not in git(repo, "worktree", "list", "--porcelain")
    assert (git(repo, "status", "--porcelain", "--untracked-files=all"), head(repo)) == before
    assert sorted(p.name for p in (repo / ".agent/worktrees").iterdir()) == [".gitignore", ".leases.json", ".leases.lock"]
    # the filter fixed, the retry makes the worktree afresh
    git(repo, "config", "filter.slow.smudge", "cat")
    lease = prepare(repo, config(), "001", "first")
    assert (lease.workdir / "data.bin").read_text() == "payload\n"
    assert git(lease.path, "status", "--porcelain") == ""


# -- 2. a git repository made by the agent inside its worktree

def nested_message(worktree: Path, where: str) -> str:
    return (f"worktree {worktree} holds a git repository of its own in {where} (a git init or git clone made there): "
            "git would commit it as a gitlink, a bare pointer to one of its commits, not as its files, so nothing "
            "was committed nor integrated (the work is kept there); to make its files part of the item, delete its "
            f"own history (rm -rf {worktree / where}/.git), or to leave it out, move it out of the worktree or add "
            "it to .gitignore; then retry the item")


@pytest.mark.fault("the agent makes a git repository inside its worktree (git init, git clone) and leaves it "
                   "uncommitted: it was committed as a gitlink (a bare commit id, not its files) and the item "
                   "reported integrated; now nothing is committed, the directory is named with how to keep its files "
                   "or leave it out, and the work stays in the worktree")
@pytest.mark.parametrize("made", ["init", "init-no-commit", "clone"])
def test_a_repository_the_agent_made_in_its_worktree_is_never_integrated_as_a_gitlink(
        repo: Path, tmp_path: Path, made: str) -> None:
    other = make_repo(tmp_path / "other")
    lease = prepare(repo, config(), "001", "first")
    agent(lease, {"init": "git init -q vendor/lib && echo code > vendor/lib/lib.txt && git -C vendor/lib add -A "
                          "&& git -C vendor/lib -c user.name=a -c user.email=a@a commit -qm lib",
                  "init-no-commit": "git init -q vendor/lib && echo code > vendor/lib/lib.txt",
                  "clone": f"mkdir vendor && git clone -q {other} vendor/lib && echo code > vendor/lib/lib.txt"}[made]
          + " && echo mine >> a.txt")
    before = head(repo), head(lease.path, "HEAD"), git(lease.path, "status", "--porcelain", "--untracked-files=all")
    with pytest.raises(WorktreeError) as raised:
        integrate(repo, config(), lease, "First")
    assert str(raised.value) == nested_message(lease.path, "vendor/lib")
    assert (head(repo), head(lease.path, "HEAD"), git(lease.path, "status", "--porcelain",
                                                      "--untracked-files=all")) == before
    assert (lease.path / "vendor/lib/lib.txt").read_text() == "code\n"
    assert (lease.path / "a.txt").read_text() == LINES + "mine\n"
    assert (repo / "a.txt").read_text() == LINES
    # following the advice: its files become the item's
    agent(lease, "rm -rf vendor/lib/.git")
    assert integrate(repo, config(), lease, "First").ok
    assert git(repo, "ls-tree", "main", "vendor/lib/lib.txt").startswith("100644 blob ")
    assert (repo / "vendor/lib/lib.txt").read_text() == "code\n"


def gitlink_message(wt: Path) -> str:
    return (f"agent/001-first adds lib as a gitlink (a bare pointer to a commit of another repository, mode 160000), "
            f"not as files, and main has no submodule there: nothing was integrated, and the work is kept in {wt}; "
            f"to integrate its files, replace the gitlink by them there (git -C {wt} rm -q --cached lib, rm -rf "
            f"{wt}/lib/.git, git -C {wt} add lib, git -C {wt} commit), or add the submodule to main first; then "
            "retry the item")


@pytest.mark.fault("the agent commits a repository it cloned into its worktree (git add lib): its branch carried a "
                   "gitlink, not the files, and was integrated; now the integration is refused naming the path and "
                   "how to turn it into files, the target, branch and worktree unchanged")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_gitlink_the_agent_committed_is_never_integrated(repo: Path, tmp_path: Path, strategy: str) -> None:
    other = make_repo(tmp_path / "other")
    cfg = config(integration_strategy=strategy)
    lease = prepare(repo, cfg, "001", "first")
    agent(lease, f"git clone -q {other} lib && git add lib 2>/dev/null && echo mine >> a.txt && git commit -qam lib")
    assert git(lease.path, "ls-tree", "HEAD", "lib").startswith("160000 commit ")
    before = head(repo), head(repo, lease.branch), git(lease.path, "status", "--porcelain")
    with pytest.raises(WorktreeError) as raised:
        integrate(repo, cfg, lease, "First")
    assert str(raised.value) == gitlink_message(lease.path)
    assert (head(repo), head(repo, lease.branch), git(lease.path, "status", "--porcelain")) == before
    assert (repo / "a.txt").read_text() == LINES and not (repo / "lib").exists()
    # following the advice
    agent(lease, "git rm -q --cached lib && rm -rf lib/.git && git add lib && git commit -qm files")
    assert integrate(repo, cfg, lease, "First").ok
    assert git(repo, "ls-tree", "main", "lib/a.txt").startswith("100644 blob ")
    assert (repo / "lib/a.txt").read_text() == LINES


def test_a_submodule_the_target_has_can_be_moved_by_an_item(repo: Path, tmp_path: Path) -> None:
    """Not a false alarm: an item that moves a submodule of the target to another commit is integrated."""
    other = make_repo(tmp_path / "other")
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(other), "sub")
    git(repo, "commit", "-q", "-m", "submodule")
    (other / "a.txt").write_text("newer\n")
    commit_in(other, "newer")
    newer = head(other)
    lease = prepare(repo, config(), "001", "first")
    agent(lease, f"git update-index --cacheinfo 160000,{newer},sub && git commit -qm bump && echo x >> b.txt")
    result = integrate(repo, config(), lease, "Bump")
    assert result.ok, result.message
    assert git(repo, "ls-tree", "main", "sub") == f"160000 commit {newer}\tsub"


# -- 3. a server killed between moving the target and the user's checkout

class Killed(BaseException):
    """The server dying at that point (a BaseException: nothing catches it on its way out)."""


def die_after(monkeypatch: pytest.MonkeyPatch, repo: Path, command: str) -> None:
    """Make integrate's git ``command`` in the user's checkout (or on its ref) the last thing it does."""
    real = integrate_module.run_git

    def dying(cwd: Path, *args: str, **kwargs: object):  # type: ignore[no-untyped-def]
        done = real(cwd, *args, **kwargs)  # type: ignore[arg-type]
        if args[0] == command and Path(cwd).resolve() == repo.resolve():
            raise Killed(command)
        return done

    monkeypatch.setattr(integrate_module, "run_git", dying)


@pytest.mark.fault("the server is killed while integrating, after moving the target branch and before updating the "
                   "user's checkout: git status there showed the item's changes reversed (a commit would undo them); "
                   "now the checkout moves first and the ref after, so a kill at any step leaves the item's changes "
                   "staged or integrated, never reversed, the user's own changes kept, and a retry finishes it")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("command", "queue_kept"), [("update-ref", False), ("read-tree", False),
                                                     ("update-ref", True), ("checkout-index", True)])
def test_a_kill_between_moving_the_target_and_the_checkout_never_shows_the_work_reversed(
        repo: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, command: str, queue_kept: bool) -> None:
    cfg = config(integration_strategy=strategy)
    lease = prepare(repo, cfg, "001", "first")
    agent(lease, "echo agent >> a.txt" + (" && echo note >> .agent/queue/001-pending-first.md" if queue_kept else ""))
    (repo / "b.txt").write_text(LINES + "user\n")  # the user's own uncommitted work
    queue = repo / ".agent/queue"
    if queue_kept:  # the run's claim: the queue's files are kept as the queue has them
        (queue / "001-pending-first.md").rename(queue / "001-in_progress-first.md")
    old = head(repo)
    die_after(monkeypatch, repo, command)
    with pytest.raises(Killed):
        integrate(repo, cfg, lease, "First")
    monkeypatch.undo()
    # whatever step it died after: the files hold the item's work, and the work is forward of HEAD
    assert (repo / "a.txt").read_text() == LINES + "agent\n"
    assert (repo / "b.txt").read_text() == LINES + "user\n"
    if head(repo) == old:  # died before the ref moved: the item's change is staged
        assert set(git(repo, "diff", "--cached", "--name-only").split()) == (
            {"a.txt", ".agent/queue/001-pending-first.md"} if queue_kept else {"a.txt"})
    else:
        assert git(repo, "diff", "HEAD", "--name-only", "--", "a.txt") == ""
    # the retry finishes it, once, with the user's work and the queue's renames kept
    result = integrate(repo, cfg, lease, "First")
    assert result.ok, result.message
    assert (repo / "a.txt").read_text() == LINES + "agent\n"
    assert (repo / "b.txt").read_text() == LINES + "user\n"
    assert git(repo, "show", "main:a.txt") == (LINES + "agent").rstrip("\n")
    assert git(repo, "diff", "HEAD", "--name-only", "--", "a.txt") == ""
    status = set(git(repo, "status", "--porcelain", "--untracked-files=all").splitlines())
    assert status == ({" M b.txt", " D .agent/queue/001-pending-first.md", "?? .agent/queue/001-in_progress-first.md"}
                      if queue_kept else {" M b.txt"})
    if queue_kept:
        assert "note" not in (queue / "001-in_progress-first.md").read_text()
    assert os.path.exists(lease.path)


def test_a_user_commit_to_the_same_file_during_verify_is_brought_up_not_blocked(repo: Path, tmp_path: Path) -> None:
    """The checkout moves before the ref now: a target moved meanwhile (the user commits while the verify
    runs) must still mean "bring up again", not "local changes", and lose neither commit."""
    cfg = config(integration_verify=commit_once(repo, tmp_path / "intruded",
                                                "sed -i 's/line 1$/user/' a.txt && git commit -qam user"))
    item = prepare(repo, cfg, "001", "first")
    agent(item, "echo agent >> a.txt")
    result = integrate(repo, cfg, item, "Mine")
    assert (result.ok, result.attempts) == (True, 2), result.message
    assert git(repo, "log", "--format=%s", "main").splitlines()[:2] == ["Mine", "user"]
    assert (repo / "a.txt").read_text() == LINES.replace("line 1\n", "user\n") + "agent\n"
    assert git(repo, "status", "--porcelain") == ""


@pytest.mark.fault("the target's ref cannot be updated (a stale refs/heads/main.lock) after the user's checkout was "
                   "moved: the checkout is put back, the error names git's reason, and nothing is lost")
def test_a_ref_that_cannot_be_updated_puts_the_checkout_back(repo: Path) -> None:
    cfg = config()
    item = prepare(repo, cfg, "001", "first")
    agent(item, "echo agent >> a.txt")
    (repo / "b.txt").write_text(LINES + "user\n")
    (repo / ".git/refs/heads/main.lock").write_text("")
    old = head(repo)
    with pytest.raises(WorktreeError, match=r"^git update-ref refs/heads/main failed: .*remove the file manually "
                                            r"to continue\.$"):
        integrate(repo, cfg, item, "Mine")
    assert head(repo) == old and (repo / "a.txt").read_text() == LINES
    assert (repo / "b.txt").read_text() == LINES + "user\n"
    assert git(repo, "status", "--porcelain") == " M b.txt"
    assert "agent" in git(repo, "show", f"{item.branch}:a.txt")
    (repo / ".git/refs/heads/main.lock").unlink()
    assert integrate(repo, cfg, item, "Mine").ok
    assert (repo / "a.txt").read_text() == LINES + "agent\n"


@pytest.mark.fault("`git worktree add` killed half-way (with the server, or the machine: git runs in its own session "
                   "and outlives a server killed alone): its partial checkout was reused as the item's worktree, "
                   "where `git add -A` would record every missing file as deleted by the item; now it is made "
                   "again from its branch, whose commits are kept")
def test_a_worktree_add_killed_half_way_is_made_again(repo: Path, tmp_path: Path) -> None:
    import signal
    import subprocess

    cfg = config()
    lease = prepare(repo, cfg, "001", "first")
    agent(lease, "echo agent >> a.txt && git add -A && git commit -q -m 'the agent, before the crash'")
    kept = head(repo, lease.branch)
    git(repo, "worktree", "remove", "--force", str(lease.path))
    # the next add is killed while it checks out b.txt: a smudge filter that waits, then git's session killed
    (repo / ".git/info/attributes").write_text("b.txt filter=stall\n")
    started = tmp_path / "stalled"
    git(repo, "config", "filter.stall.smudge", f"touch {started}; sleep 60")
    adding = subprocess.Popen(["git", "worktree", "add", str(lease.path), lease.branch], cwd=repo,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline, "the checkout never reached b.txt"
            time.sleep(0.02)
    finally:
        os.killpg(adding.pid, signal.SIGKILL)
        adding.wait()
    git(repo, "config", "--unset", "filter.stall.smudge")
    (repo / ".git/info/attributes").unlink()
    assert "locked initializing" in git(repo, "worktree", "list", "--porcelain")  # what git left
    assert not (lease.path / "b.txt").exists()

    again = prepare(repo, cfg, "001", "first")

    assert again.reused and again.path == lease.path  # (reused: its branch's work goes on)
    assert (again.workdir / "b.txt").read_text() == LINES and (again.workdir / "a.txt").read_text() == LINES + "agent\n"
    assert head(repo, again.branch) == kept  # the branch and its commits are as they were
    assert git(again.workdir, "status", "--porcelain") == ""
    assert "locked" not in git(repo, "worktree", "list", "--porcelain")
