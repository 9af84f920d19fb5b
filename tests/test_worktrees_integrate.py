"""Integration into the target: both items in when they touch different files, a conflict named and
kept when they touch the same lines, verify as a gate, the compare-and-swap that loses no commit,
and the user's checkout updated like `git merge --ff-only` (their edits never overwritten, the
queue's renames never in the way)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent_parallel.worktrees import integrate, predict_conflicts, prepare
from worktree_helpers import LINES, agent, commit_once, config, git, head, make_repo

STRATEGIES = ["rebase", "merge", "squash"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "ws")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_items_editing_different_files_are_both_integrated(repo: Path, strategy: str) -> None:
    cfg = config(integration_strategy=strategy)
    first, second = prepare(repo, cfg, "001", "first"), prepare(repo, cfg, "002", "second")
    agent(first, "echo one >> a.txt")  # left uncommitted: integrate commits it
    agent(second, "echo two >> b.txt && git commit -qam 'second edits b'")
    one = integrate(repo, cfg, first, "First item", "Agent One <one@example.com>")
    two = integrate(repo, cfg, second, "Second item")
    assert (one.ok, one.phase, two.ok, two.phase) == (True, "integrated", True, "integrated")
    assert two.commit == head(repo)
    # the user's checkout of main moved with the ref, like git merge --ff-only
    assert (repo / "a.txt").read_text() == LINES + "one\n"
    assert (repo / "b.txt").read_text() == LINES + "two\n"
    assert git(repo, "status", "--porcelain") == ""
    assert one.seconds > 0 and one.attempts == 1
    if strategy != "squash":
        assert "Agent One <one@example.com>" in git(repo, "log", "--format=%an <%ae>", "main")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_lines_one_integrated_the_other_conflicts_with_the_file_named(repo: Path, strategy: str) -> None:
    cfg = config(integration_strategy=strategy)
    first, second = prepare(repo, cfg, "001", "first"), prepare(repo, cfg, "002", "second")
    agent(first, "sed -i 's/line 5/first/' a.txt")
    agent(second, "sed -i 's/line 5/second/' a.txt && git commit -qam 'second'")
    second_tip = head(second.path, "HEAD")
    assert integrate(repo, cfg, first, "First").ok
    target = head(repo)
    result = integrate(repo, cfg, second, "Second")
    assert (result.ok, result.phase, result.conflicts) == (False, "conflict", ["a.txt"])
    assert result.message.startswith("agent/002-second conflicts with main in a.txt; main is unchanged and "
                                     "agent/002-second is kept in ")
    assert head(repo) == target
    assert head(repo, "agent/002-second") == second_tip  # the branch as the agent left it, rebase aborted
    assert git(second.path, "status", "--porcelain") == ""
    assert "second" in (second.path / "a.txt").read_text()


def test_an_item_prepared_after_another_is_integrated_sees_its_change(repo: Path) -> None:
    cfg = config()
    first = prepare(repo, cfg, "001", "first")
    agent(first, "echo from-first > new.txt")
    assert integrate(repo, cfg, first, "First").ok
    later = prepare(repo, cfg, "002", "later")
    assert (later.workdir / "new.txt").read_text() == "from-first\n"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_failed_verify_keeps_the_target_unchanged(repo: Path, strategy: str) -> None:
    cfg = config(integration_strategy=strategy, integration_verify="echo checking; grep -q broken a.txt && exit 3; true")
    item = prepare(repo, cfg, "001", "first")
    agent(item, "echo broken >> a.txt")
    before = head(repo)
    log = io.BytesIO()
    result = integrate(repo, cfg, item, "Break it", log=log)
    assert (result.ok, result.phase, result.output_tail) == (False, "verify_failed", "checking")
    assert result.message.startswith("integration.verify `echo checking; grep -q broken a.txt && exit 3; true` "
                                     "exited with code 3 on agent/001-first combined with main; main is unchanged")
    assert log.getvalue() == b"checking\n"
    assert head(repo) == before and (repo / "a.txt").read_text() == LINES
    assert git(item.path, "symbolic-ref", "HEAD") == "refs/heads/agent/001-first"  # back on its branch
    assert "broken" in (item.path / "a.txt").read_text()


def test_verify_runs_on_the_combined_result(repo: Path) -> None:
    cfg = config(integration_strategy="merge", integration_verify="test -f one.txt && test -f two.txt")
    first, second = prepare(repo, cfg, "001", "first"), prepare(repo, cfg, "002", "second")
    agent(first, "touch one.txt")
    agent(second, "touch two.txt")
    assert integrate(repo, cfg, first, "One").phase == "verify_failed"  # two.txt is not there yet
    cfg_one = config(integration_strategy="merge", integration_verify="test -f one.txt")
    assert integrate(repo, cfg_one, first, "One").ok
    assert integrate(repo, cfg, second, "Two").ok  # one.txt comes from the target, two.txt from the branch


def test_an_item_with_nothing_new_is_integrated_without_moving_the_target(repo: Path) -> None:
    cfg = config()
    item = prepare(repo, cfg, "001", "first")
    before = head(repo)
    result = integrate(repo, cfg, item, "Nothing")
    assert (result.ok, result.commit, head(repo)) == (True, before, before)


def test_the_target_moved_by_someone_else_during_verify_loses_no_commit(repo: Path, tmp_path: Path) -> None:
    """The compare-and-swap: the verify command itself commits to main (once), between the bring-up
    and the ref update; the swap fails, the branch is brought up again, and both commits are kept."""
    cfg = config(integration_verify=commit_once(repo, tmp_path / "intruded", "git commit -q --allow-empty -m intruder"))
    item = prepare(repo, cfg, "001", "first")
    agent(item, "echo mine >> a.txt")
    result = integrate(repo, cfg, item, "Mine")
    assert (result.ok, result.attempts) == (True, 2)
    assert git(repo, "log", "--format=%s", "main").splitlines()[:2] == ["Mine", "intruder"]
    assert (repo / "a.txt").read_text() == LINES + "mine\n"


def test_a_user_edit_to_a_file_the_integration_changes_is_never_overwritten(repo: Path) -> None:
    cfg = config()
    item = prepare(repo, cfg, "001", "first")
    agent(item, "echo agent >> a.txt")
    (repo / "a.txt").write_text(LINES + "user\n")
    before = head(repo)
    result = integrate(repo, cfg, item, "Agent")
    assert (result.ok, result.phase, result.conflicts) == (False, "local_changes", ["a.txt"])
    assert result.message == ("main was not moved: its checkout has uncommitted changes to a.txt, which integrating "
                              "agent/001-first would overwrite; commit or stash them, then retry the item")
    assert head(repo) == before
    assert (repo / "a.txt").read_text() == LINES + "user\n"
    # the user commits their change: the next try conflicts (same line), with the file named
    git(repo, "commit", "-qam", "user")
    assert integrate(repo, cfg, item, "Agent").conflicts == ["a.txt"]


def test_an_untracked_user_file_where_the_integration_adds_one_blocks(repo: Path) -> None:
    cfg = config()
    item = prepare(repo, cfg, "001", "first")
    agent(item, "echo agent > new.txt")
    (repo / "new.txt").write_text("user's own\n")
    result = integrate(repo, cfg, item, "Agent")
    assert (result.phase, result.conflicts) == ("local_changes", ["new.txt"])
    assert (repo / "new.txt").read_text() == "user's own\n"


def test_unrelated_local_changes_and_queue_renames_do_not_block(repo: Path) -> None:
    cfg = config()
    item = prepare(repo, cfg, "001", "first")
    agent(item, "echo agent >> a.txt && echo done >> .agent/queue/001-pending-first.md")
    (repo / "b.txt").write_text(LINES + "user\n")  # unrelated: untouched by the integration
    (repo / "scratch.txt").write_text("notes\n")
    queue = repo / ".agent/queue"
    (queue / "001-pending-first.md").rename(queue / "001-in_progress-first.md")  # the run's claim
    result = integrate(repo, cfg, item, "Agent")
    assert result.ok, result.message
    assert (repo / "a.txt").read_text() == LINES + "agent\n"
    assert (repo / "b.txt").read_text() == LINES + "user\n"
    assert (repo / "scratch.txt").read_text() == "notes\n"
    assert sorted(p.name for p in queue.iterdir()) == ["001-in_progress-first.md"]  # the queue's state stays
    assert "done" not in (queue / "001-in_progress-first.md").read_text()
    status = set(git(repo, "status", "--porcelain", "--untracked-files=all").splitlines())
    assert status == {" M b.txt", " D .agent/queue/001-pending-first.md", "?? .agent/queue/001-in_progress-first.md",
                      "?? scratch.txt"}


def test_queue_renames_do_not_block_when_the_branch_leaves_the_queue_alone(repo: Path) -> None:
    cfg = config()
    item = prepare(repo, cfg, "001", "first")
    agent(item, "echo agent >> a.txt")
    queue = repo / ".agent/queue"
    (queue / "001-pending-first.md").rename(queue / "001-in_progress-first.md")
    assert integrate(repo, cfg, item, "Agent").ok
    assert (repo / "a.txt").read_text() == LINES + "agent\n"
    assert (queue / "001-in_progress-first.md").exists() and not (queue / "001-pending-first.md").exists()


def test_a_deleted_file_is_deleted_in_the_users_checkout(repo: Path) -> None:
    cfg = config()
    item = prepare(repo, cfg, "001", "first")
    agent(item, "git rm -q b.txt")
    (repo / ".agent/queue/001-pending-first.md").rename(repo / ".agent/queue/001-in_progress-first.md")
    agent(item, "echo x >> .agent/queue/001-pending-first.md")  # forces the path that keeps queue files
    assert integrate(repo, cfg, item, "Agent").ok
    assert not (repo / "b.txt").exists()
    assert git(repo, "status", "--porcelain", "--", "b.txt") == ""


def test_predicted_conflicts_name_the_files_without_touching_anything(repo: Path) -> None:
    cfg = config()
    first, second, third = (prepare(repo, cfg, f"00{n}", name) for n, name in ((1, "a"), (2, "b"), (3, "c")))
    agent(first, "sed -i 's/line 2/A/' a.txt && git commit -qam a")
    agent(second, "sed -i 's/line 2/B/' a.txt && git commit -qam b")
    agent(third, "echo c >> b.txt && git commit -qam c")
    assert integrate(repo, cfg, first, "A").ok
    before = git(repo, "for-each-ref"), git(repo, "status", "--porcelain")
    assert predict_conflicts(repo, "main", [second.branch, third.branch]) == {second.branch: ["a.txt"],
                                                                              third.branch: []}
    assert (git(repo, "for-each-ref"), git(repo, "status", "--porcelain")) == before
    from agent_parallel.errors import UsageError

    with pytest.raises(UsageError, match=r"^no branch or commit named 'agent/nope' in .*; `agent-parallel "
                                         r"worktrees` lists the items' branches$"):
        predict_conflicts(repo, "main", ["agent/nope"])


def test_two_servers_integrating_take_turns_through_the_lock(repo: Path) -> None:
    """Two integrations from two threads (standing in for two servers: the lock is a file lock) both
    land, one after the other, whatever the order."""
    import threading

    cfg = config(integration_verify="sleep 0.2")
    items = [prepare(repo, cfg, f"00{n}", f"item{n}") for n in range(1, 4)]
    for n, item in enumerate(items, 1):
        agent(item, f"echo {n} > file{n}.txt")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(integrate(repo, cfg, i, i.name))) for i in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.phase for r in results) == ["integrated"] * 3
    assert all((repo / f"file{n}.txt").exists() for n in range(1, 4))
    assert git(repo, "status", "--porcelain") == ""


@pytest.mark.fault("the agent leaves a conflict unresolved in its worktree (a stash pop, merge or rebase stopped "
                   "half-way): the conflict markers were committed and integrated into the target as the item's "
                   "work; now the integration fails naming the files and how to resolve or undo, nothing committed")
@pytest.mark.parametrize("left", ["stash pop", "merge", "rebase"])
def test_unresolved_conflicts_in_the_worktree_are_never_integrated(repo: Path, left: str) -> None:
    from agent_parallel.errors import WorktreeError

    lease = prepare(repo, config(), "001", "first")
    agent(lease, {"stash pop": "echo mine > a.txt && git stash -q && echo theirs > a.txt && git commit -qam other "
                               "&& (git stash pop -q || true)",
                  "merge": "git checkout -qb side && echo side > a.txt && git commit -qam side && git checkout -q - "
                           "&& echo mine > a.txt && git commit -qam mine && (git merge -q side || true)",
                  "rebase": "git checkout -qb side && echo side > a.txt && git commit -qam side && git checkout -q - "
                            "&& echo mine > a.txt && git commit -qam mine && (git rebase -q side || true)"}[left])
    before = (head(repo), git(lease.path, "rev-parse", "HEAD"), git(lease.path, "status", "--porcelain"))
    assert "UU a.txt" in before[2]
    with pytest.raises(WorktreeError) as raised:
        integrate(repo, config(), lease, "First")
    assert str(raised.value) == (
        f"worktree {lease.path} has unresolved conflicts in a.txt (a merge, rebase, cherry-pick or stash pop left "
        f"half-way): nothing was committed nor integrated; resolve them there (edit the files, then git -C "
        f"{lease.path} add them) or undo the operation (git -C {lease.path} status names it), then retry the item")
    assert (head(repo), git(lease.path, "rev-parse", "HEAD"), git(lease.path, "status", "--porcelain")) == before
    assert git(repo, "show", "main:a.txt") == LINES.rstrip("\n")
    assert "<<<<<<<" in (lease.path / "a.txt").read_text()  # the conflict is left for a person to resolve


@pytest.mark.fault("the agent leaves a rebase stopped (an `edit` step) in its worktree: its leftovers were committed "
                   "onto the rebase's detached HEAD and the error said to check the branch out again (which drops "
                   "those commits); now the rebase is named with how to finish or undo it, nothing committed")
def test_a_rebase_the_agent_left_stopped_is_named_before_anything_is_committed(repo: Path) -> None:
    from agent_parallel.errors import WorktreeError

    lease = prepare(repo, config(), "001", "first")
    agent(lease, "echo one > c.txt && git add c.txt && git commit -qm one && echo two > d.txt && git add d.txt "
                 "&& git commit -qm two && GIT_SEQUENCE_EDITOR='sed -i 1s/^pick/edit/' git rebase -qi HEAD~2 "
                 "&& echo left > e.txt")
    before = (head(repo), git(lease.path, "rev-parse", "HEAD"), git(lease.path, "status", "--porcelain"))
    with pytest.raises(WorktreeError, match=r"^a rebase is in progress in worktree .*: nothing was committed nor "
                                            r"integrated; finish it \(git -C .* rebase --continue\) or undo it"):
        integrate(repo, config(), lease, "First")
    assert (head(repo), git(lease.path, "rev-parse", "HEAD"), git(lease.path, "status", "--porcelain")) == before


@pytest.mark.fault("a cloned repository ships tags named like the target (main) and an item's branch, at its first "
                   "commit: the conflict forecast compared the tags and predicted no conflict; branches now win")
def test_tags_named_like_the_branches_do_not_hide_a_predicted_conflict(repo: Path) -> None:
    lease = prepare(repo, config(), "001", "a")
    agent(lease, "sed -i 's/line 2/A/' a.txt && git commit -qam a")
    git(repo, "tag", "main", "HEAD")
    git(repo, "tag", lease.branch, "HEAD")
    (repo / "a.txt").write_text(LINES.replace("line 2", "B"))
    git(repo, "commit", "-qam", "b")
    before = git(repo, "for-each-ref"), git(repo, "status", "--porcelain")
    assert predict_conflicts(repo, "main", [lease.branch]) == {lease.branch: ["a.txt"]}
    assert (git(repo, "for-each-ref"), git(repo, "status", "--porcelain")) == before
