"""Cleanup that cannot lose work: integrated (also squash-merged) worktrees are safe to remove; an
unintegrated commit, an untracked or modified file, a rebase in progress or a live item never are."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent_parallel.errors import WorktreeError
from agent_parallel.worktrees import integrate, is_safe_to_remove, list_worktrees, prepare, release, remove
from agent_parallel.worktrees.cleanup import WorktreeState
from worktree_helpers import agent, config, git, make_repo


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "ws")


def state(repo: Path, name: str) -> WorktreeState:
    return next(s for s in list_worktrees(repo, config()) if s.name == name)


@pytest.mark.parametrize("strategy", ["rebase", "merge", "squash"])
def test_an_integrated_worktree_is_safe_and_removed_with_its_branch(repo: Path, strategy: str) -> None:
    cfg = config(integration_strategy=strategy)
    lease = prepare(repo, cfg, "001", "first")
    agent(lease, "echo x >> a.txt && git commit -qam one && echo y >> b.txt && git commit -qam two")
    assert integrate(repo, cfg, lease, "First").ok
    release(repo, lease)
    found = state(repo, "001-first")
    assert (found.safe, found.state, found.item_id, found.branch) == (True, "clean", "001", "agent/001-first")
    if strategy == "squash":
        assert found.reason == "safe: its changes are in main (squash-merged: merging it would change nothing)"
        assert (found.ahead, found.behind) == (2, 1)
    else:
        assert found.reason == "safe: its commits are in main"
    assert remove(repo, cfg, found) == f"removed {lease.path} and branch agent/001-first"
    assert not lease.path.exists() and git(repo, "branch", "--list", "agent/*") == ""


def test_a_branch_squash_merged_by_hand_is_recognised_as_safe(repo: Path) -> None:
    lease = prepare(repo, config(), "001", "first")
    agent(lease, "echo x >> a.txt && git commit -qam one")
    release(repo, lease)
    git(repo, "merge", "-q", "--squash", "agent/001-first")
    git(repo, "commit", "-qm", "squashed by the user")
    git(repo, "commit", "-q", "--allow-empty", "-m", "later work")
    assert state(repo, "001-first").safe


def test_a_branch_rebased_elsewhere_is_recognised_by_patch_ids(repo: Path) -> None:
    lease = prepare(repo, config(), "001", "first")
    agent(lease, "echo x >> a.txt && git commit -qam one")
    release(repo, lease)
    git(repo, "cherry-pick", "agent/001-first")
    git(repo, "commit", "-q", "--allow-empty", "-m", "x")
    (repo / "b.txt").write_text("other\n")
    git(repo, "commit", "-qam", "b changed: the merged tree differs")
    assert state(repo, "001-first").safe


def test_an_unintegrated_commit_is_never_removed(repo: Path) -> None:
    lease = prepare(repo, config(), "001", "first")
    agent(lease, "echo x >> a.txt && git commit -qam one")
    release(repo, lease)
    found = state(repo, "001-first")
    assert (found.safe, found.reason, found.ahead) == (False, "not safe: 1 commit not in main", 1)
    assert is_safe_to_remove(repo, config(), found) == (False, "not safe: 1 commit not in main")
    with pytest.raises(WorktreeError, match=r"^worktree .*001-first was not removed: not safe: 1 commit not in main$"):
        remove(repo, config(), found)
    assert lease.path.exists() and git(repo, "rev-parse", "agent/001-first")


@pytest.mark.parametrize(("script", "expected_state", "reason"), [
    ("echo new > untracked.txt", "untracked", "not safe: 1 untracked file (untracked.txt)"),
    ("echo change >> a.txt", "modified", "not safe: 1 uncommitted change (a.txt)"),
])
def test_untracked_or_modified_files_are_never_removed(repo: Path, script: str, expected_state: str,
                                                       reason: str) -> None:
    lease = prepare(repo, config(), "001", "first")
    agent(lease, script)
    release(repo, lease)
    found = state(repo, "001-first")
    assert (found.safe, found.state, found.reason) == (False, expected_state, reason)
    with pytest.raises(WorktreeError):
        remove(repo, config(), found)
    assert lease.path.exists()


def test_a_worktree_in_use_by_a_live_item_is_never_removed(repo: Path) -> None:
    lease = prepare(repo, config(worktree_ports=(5600, 5601)), "001", "first")
    found = state(repo, "001-first")
    assert (found.safe, found.state, found.port) == (False, "in-use", lease.port)
    release(repo, lease)
    assert state(repo, "001-first").safe


def test_the_listing_is_checked_again_before_removing(repo: Path) -> None:
    lease = prepare(repo, config(), "001", "first")
    release(repo, lease)
    listed = state(repo, "001-first")
    assert listed.safe
    agent(lease, "echo late > late.txt")  # work appeared after the listing
    with pytest.raises(WorktreeError, match=r"not safe: 1 untracked file \(late.txt\)$"):
        remove(repo, config(), listed)
    assert (lease.path / "late.txt").exists()


def test_unchanged_copies_and_links_do_not_make_a_worktree_unsafe_but_changed_ones_do(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "ws", {".gitignore": ""})  # .env is NOT ignored here: git sees the copy
    (repo / ".env").write_text("A=1\n")
    (repo / "cache").mkdir()
    cfg = config(worktree_copy=(".env",), worktree_link=("cache",))
    lease = prepare(repo, cfg, "001", "first")
    release(repo, lease)
    assert state(repo, "001-first").safe
    (lease.workdir / ".env").write_text("A=2\n")
    assert state(repo, "001-first").reason == "not safe: 1 untracked file (.env)"
    (lease.workdir / ".env").write_text("A=1\n")
    assert remove(repo, cfg, state(repo, "001-first")).startswith("removed")
    assert (repo / ".env").read_text() == "A=1\n" and (repo / "cache").is_dir()


def test_a_worktree_whose_directory_was_deleted(repo: Path) -> None:
    kept, gone = prepare(repo, config(), "001", "kept"), prepare(repo, config(), "002", "gone")
    agent(kept, "echo x >> a.txt && git commit -qam work")
    release(repo, kept)
    release(repo, gone)
    shutil.rmtree(kept.path)
    shutil.rmtree(gone.path)
    listing = {s.name: s for s in list_worktrees(repo, config())}
    assert (listing["001-kept"].state, listing["001-kept"].safe) == ("missing", False)
    assert (listing["002-gone"].state, listing["002-gone"].safe) == ("missing", True)
    remove(repo, config(), listing["002-gone"])
    assert git(repo, "branch", "--list", "agent/*").split() == ["agent/001-kept"]  # its commit is kept


def test_a_rebase_in_progress_is_never_removed(repo: Path) -> None:
    lease = prepare(repo, config(), "001", "first")
    agent(lease, "sed -i 's/line 1/mine/' a.txt && git commit -qam mine")
    git(repo, "commit", "-q", "--allow-empty", "-m", "x")
    (repo / "a.txt").write_text("theirs\n")
    git(repo, "commit", "-qam", "theirs")
    release(repo, lease)
    agent(lease, "git rebase main || true")
    found = state(repo, "001-first")
    assert (found.safe, found.state) == (False, "in-progress")


@pytest.mark.fault("a worktree whose branch has no commit (a prepare half-way through `git worktree add`, or "
                   "its branch deleted by hand) while others are listed: listed as not safe, the others still "
                   "listed and cleaned")
def test_a_worktree_without_a_commit_is_kept_and_does_not_stop_the_listing(repo: Path) -> None:
    done = prepare(repo, config(), "001", "done")
    release(repo, done)  # nothing done in it: its branch is main's commit, safe to remove
    unborn = prepare(repo, config(), "002", "unborn")
    release(repo, unborn)
    agent(unborn, "echo work > new.txt")
    git(repo, "update-ref", "-d", "refs/heads/agent/002-unborn")  # git now lists its HEAD as 40 zeros
    assert "HEAD 0000000000000000000000000000000000000000" in git(repo, "worktree", "list", "--porcelain")
    listing = {s.name: s for s in list_worktrees(repo, config())}
    assert listing["001-done"].safe
    found = listing["002-unborn"]
    assert (found.safe, found.head, found.ahead) == (False, None, 0)
    assert found.reason.startswith("not safe: ") and "uncommitted changes" in found.reason
    assert remove(repo, config(), listing["001-done"]) == f"removed {done.path} and branch agent/001-done"
    with pytest.raises(WorktreeError, match="was not removed: not safe"):
        remove(repo, config(), found)
    assert (unborn.path / "new.txt").read_text() == "work\n"  # its work is still there


@pytest.mark.fault("a worktree git cannot read (its .git file damaged): listed as unreadable and kept, the others "
                   "still listed")
def test_a_worktree_git_cannot_read_is_kept_and_does_not_stop_the_listing(repo: Path) -> None:
    other = prepare(repo, config(), "001", "other")
    damaged = prepare(repo, config(), "002", "damaged")
    release(repo, other)
    release(repo, damaged)
    (damaged.path / ".git").write_text("gitdir: /nonexistent\n")
    listing = {s.name: s for s in list_worktrees(repo, config())}
    assert listing["001-other"].safe
    found = listing["002-damaged"]
    assert (found.state, found.safe) == ("unreadable", False) and found.reason.startswith("not safe: git could not read it (")
    with pytest.raises(WorktreeError, match="was not removed: not safe: git could not read it"):
        remove(repo, config(), found)
    assert damaged.path.is_dir()


@pytest.mark.fault("the item's process rewrites the record of what prepare copied into its worktree (in the "
                   "worktree's git directory) to name ../.., an absolute path or a path through a link it made: "
                   "cleanup deleted that directory outside the workspace; now it removes only its worktree")
@pytest.mark.parametrize("planted", ["relative", "absolute", "through-a-link"])
def test_cleanup_never_deletes_what_a_forged_copy_record_names_outside(repo: Path, tmp_path: Path,
                                                                        planted: str) -> None:
    import json

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me\n")
    lease = prepare(repo, config(), "001", "first")
    release(repo, lease)
    if planted == "through-a-link":  # .env is ignored: git does not see the link, the worktree stays clean
        (lease.path / ".env").symlink_to(outside)
        names = [".env/precious"]
    else:
        names = [str(outside) if planted == "absolute" else f"../../../../{outside.name}"]
        assert (lease.path / names[0]).resolve() == outside
    record = Path(git(lease.path, "rev-parse", "--absolute-git-dir")) / "agent-parallel.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "copied": names, "linked": [*names, 7]}))
    found = state(repo, "001-first")
    assert (found.state, found.safe) == ("clean", True)
    assert remove(repo, config(), found) == f"removed {lease.path} and branch agent/001-first"
    assert not lease.path.exists()
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert (outside / "precious").read_text() == "keep me\n"
