"""Integrating an item's branch into the target, one item at a time, never losing anyone's work.

`integrate` commits what the agent left, then, under a lock in the repository's common git
directory (so two servers on one repository take turns), brings the branch up to the target
(`integration.strategy`), runs `integration.verify` on the combined result, and only if it passes
moves the target with a compare-and-swap (``git update-ref REF NEW OLD``): a commit someone added
meanwhile makes the swap fail, and the bring-up starts again from the new target.

Where the target is checked out (the user's working tree, usually), that checkout moves with it the
way ``git merge --ff-only`` would move it, and before the ref (so a server killed in between leaves
the item's changes staged, never shown reversed): files the user changed are never overwritten (the
ref is left alone and the result names them), other local changes do not matter, and the queue's
own renames under the queue directory never block (their index entries move, the files stay as the
queue has them).

A git repository the agent made inside its worktree (``git init``, ``git clone``) would be committed
as a gitlink, a bare commit id, instead of its files: such a worktree, or a branch adding a gitlink
where the target has no submodule, is refused with the directory named, nothing committed or moved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from ..config import Config
from ..errors import ShellTimedOut, UsageError, WorktreeError
from ._git import ShellStop, git_message, git_out, identity_env, nul_list, rev_exists, rev_id, run_git, run_shell
from .prepare import Lease, rebasing, read_meta, registered_worktrees
from .repo import RepoInfo, check_repository, file_lock

LOCK_FILE = "agent-parallel-integration.lock"
MAX_ATTEMPTS = 5
"""Bring-ups tried when the target keeps moving under us (each one verified again)."""

Phase = Literal["integrated", "conflict", "verify_failed", "local_changes"]


@dataclass(frozen=True)
class Integration:
    """What `integrate` did. ``ok`` only for ``integrated``; otherwise the target did not move and the
    branch and worktree are kept for a fix (after a rebase the branch is the rebased one)."""

    ok: bool
    phase: Phase
    """``integrated``; ``conflict`` (the files are in ``conflicts``); ``verify_failed`` (its output in
    ``output_tail``); ``local_changes``: the target's checkout has uncommitted changes to files the
    integration would change (in ``conflicts``), so nothing was moved."""
    message: str
    """One sentence for the item's reason: what happened and how to go on."""
    conflicts: list[str] = field(default_factory=list)
    output_tail: str = ""
    commit: str | None = None
    """The target's commit after integrating (unchanged when the branch brought nothing new)."""
    seconds: float = 0.0
    """Wall time of the whole integration, lock wait included (for the planner's estimates)."""
    attempts: int = 0


def integrate(root: Path, config: Config, lease: Lease, title: str, author: str | None = None, *,
              log: BinaryIO | None = None, lock_timeout_s: float | None = None,
              stop: ShellStop | None = None) -> Integration:
    """Integrate ``lease``'s branch into the target; see the module docstring for the steps.

    ``title`` is the message of the commit made of the agent's uncommitted work (``author``,
    ``Name <email>``, default `integration.author`, else git's user). ``log`` gets the verify
    command's output as it comes. Returns an `Integration`; raises `WorktreeError` only when git
    itself fails (a broken repository, a worktree left mid-rebase by the agent), and `ShellStopped`
    when ``stop`` (the run's) killed the verify command (the target unchanged).
    """
    started = time.monotonic()
    info = check_repository(root, config)
    if lease.target != info.target:
        raise UsageError(f"the lease's target {lease.target!r} is not the configured target {info.target!r}; "
                         "prepare the item again")
    commit_leftovers(lease.path, title, author or config.integration_author)
    _refuse_new_gitlinks(info, lease)
    with file_lock(info.common_dir / LOCK_FILE, "integration", lock_timeout_s):
        result = _integrate_locked(info, config, lease, title, author or config.integration_author, log, stop)
    return Integration(**{**result.__dict__, "seconds": time.monotonic() - started})


def commit_leftovers(worktree: Path, title: str, author: str | None) -> str | None:
    """Commit everything the agent left in ``worktree`` (tracked changes and new files, not what prepare
    copied or linked there, never ignored files); the new commit, or None when nothing was left."""
    unmerged = sorted(set(nul_list(run_git(worktree, "diff", "--name-only", "--diff-filter=U", "-z").stdout)))
    if unmerged:  # `git add -A` would take the conflict markers as the work, and integrate them
        names = ", ".join(unmerged[:5]) + (f" and {len(unmerged) - 5} more" if len(unmerged) > 5 else "")
        raise WorktreeError(f"worktree {worktree} has unresolved conflicts in {names} (a merge, rebase, cherry-pick "
                            "or stash pop left half-way): nothing was committed nor integrated; resolve them there "
                            f"(edit the files, then git -C {worktree} add them) or undo the operation (git -C "
                            f"{worktree} status names it), then retry the item")
    if rebasing(worktree):  # a commit now would land on the rebase's detached HEAD, not on the branch
        raise WorktreeError(f"a rebase is in progress in worktree {worktree} (its work is kept; git -C {worktree} "
                            f"status shows it): nothing was committed nor integrated; finish it (git -C {worktree} "
                            f"rebase --continue) or undo it (git -C {worktree} rebase --abort), then retry the item")
    meta = read_meta(worktree)
    ours = [*meta.get("copied", []), *meta.get("linked", [])]
    nested = [p for p in _nested_repositories(worktree) if not any(p == o or p.startswith(o + "/") for o in ours)]
    if nested:  # `git add -A` would record each as a gitlink (a commit id of that repository), not its files
        first = worktree / nested[0]
        raise WorktreeError(f"worktree {worktree} holds a git repository of its own in {_few(nested)} (a git init or "
                            "git clone made there): git would commit it as a gitlink, a bare pointer to one of its "
                            "commits, not as its files, so nothing was committed nor integrated (the work is kept "
                            f"there); to make its files part of the item, delete its own history (rm -rf {first}/.git"
                            "), or to leave it out, move it out of the worktree or add it to .gitignore; then retry "
                            "the item")
    run_git(worktree, "add", "-A", "--", ":/", env={"GIT_LITERAL_PATHSPECS": "0"}, step="git add -A")
    if ours:  # what prepare copied or linked is the workspace's, not the agent's work: unstaged again
        run_git(worktree, "reset", "-q", "--", *[f":(top,literal){p}" for p in ours],
                env={"GIT_LITERAL_PATHSPECS": "0"}, ok=(0, 1), step="git reset (copied and linked files)")
    if run_git(worktree, "diff", "--cached", "--quiet", ok=(0, 1)).returncode == 0:
        return None
    env = identity_env(worktree, author)
    run_git(worktree, "commit", "-q", "--no-verify", "-m", title or "agent-parallel: work left uncommitted",
            env=env, step="git commit (the agent's uncommitted work)")
    return git_out(worktree, "rev-parse", "HEAD")


def _nested_repositories(worktree: Path) -> list[str]:
    """Untracked, not ignored directories of ``worktree`` that hold a git repository of their own (``git
    ls-files --others`` names each with a trailing ``/`` instead of listing its files); without the ``/``."""
    out = run_git(worktree, "ls-files", "--others", "--exclude-standard", "-z", step="git ls-files --others").stdout
    return sorted(p.rstrip("/") for p in nul_list(out) if p.endswith("/"))


def _refuse_new_gitlinks(info: RepoInfo, lease: Lease) -> None:
    """Refuse a branch whose commits add a gitlink (mode 160000: a commit of another repository, such as
    the agent's own ``git add`` of a repository it cloned) where the target has no submodule: integrated,
    the target would get a pointer to a commit it cannot reach instead of the files."""
    wt = lease.path
    base = run_git(wt, "merge-base", info.target_ref, "HEAD", ok=(0, 1)).stdout.decode().strip()
    if not base:
        return  # no common history: the bring-up reports it
    out = run_git(wt, "diff", "--raw", "-z", "--no-renames", "--no-abbrev", "--ignore-submodules=none", base, "HEAD",
                  step="git diff --raw").stdout.split(b"\0")
    added = [path.decode(errors="surrogateescape") for meta, path in zip(out[0::2], out[1::2], strict=False)
             if meta.split()[1:2] == [b"160000"] and meta.split()[:1] != [b":160000"]]
    if not added:
        return
    known = run_git(wt, "ls-tree", "-z", "--full-tree", info.target_ref, "--", *[f":(top,literal){p}" for p in added],
                    env={"GIT_LITERAL_PATHSPECS": "0"}).stdout
    submodules = {entry.split("\t", 1)[1] for entry in nul_list(known) if entry.startswith("160000 ")}
    added = [p for p in added if p not in submodules]
    if added:
        first = added[0]
        raise WorktreeError(f"{lease.branch} adds {_few(added)} as a gitlink (a bare pointer to a commit of another "
                            f"repository, mode 160000), not as files, and {info.target} has no submodule there: "
                            f"nothing was integrated, and the work is kept in {wt}; to integrate its files, "
                            f"replace the gitlink by them there (git -C {wt} rm -q --cached {first}, rm -rf "
                            f"{wt / first}/.git, git -C {wt} add {first}, git -C {wt} commit), or add the submodule "
                            f"to {info.target} first; then retry the item")


def _few(paths: list[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _integrate_locked(info: RepoInfo, config: Config, lease: Lease, title: str, author: str | None,
                      log: BinaryIO | None, stop: ShellStop | None) -> Integration:
    strategy = config.integration_strategy
    wt = lease.path
    head = run_git(wt, "symbolic-ref", "-q", "HEAD", ok=(0, 1)).stdout.decode().strip()
    if head != f"refs/heads/{lease.branch}":
        raise WorktreeError(f"worktree {wt} is not on its branch {lease.branch} (HEAD: {head or 'detached'}); "
                            f"check it out again (git -C {wt} checkout {lease.branch}), then integrate")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        old = git_out(info.root, "rev-parse", f"{info.target_ref}^{{commit}}")
        branch_head = git_out(wt, "rev-parse", "HEAD")
        if strategy == "rebase":
            conflicts = _rebase(wt, old)
            new = git_out(wt, "rev-parse", "HEAD")
            if conflicts is None and _is_ancestor(info.root, new, old):
                new = old  # nothing new on the branch
        else:
            conflicts, new = _combine(info, wt, old, branch_head, lease, title, author, strategy)
        if conflicts is not None:
            return Integration(False, "conflict", f"{lease.branch} conflicts with {info.target} in "
                               f"{', '.join(conflicts)}; {info.target} is unchanged and {lease.branch} is kept in "
                               f"{wt}: resolve there (git rebase {info.target}) and retry the item",
                               conflicts, attempts=attempt)
        if new == old:
            return Integration(True, "integrated", f"{lease.branch} brought nothing new; {info.target} is unchanged",
                               commit=old, attempts=attempt)
        if config.integration_verify:
            try:
                code, tail = _verify(config.integration_verify, lease, new, strategy != "rebase", log, stop,
                                     config.integration_verify_timeout_s)
            except ShellTimedOut as exc:
                return Integration(False, "verify_failed", f"{exc}, on {lease.branch} combined with {info.target}; "
                                   f"{info.target} is unchanged: make the verify faster or raise "
                                   f"integration.verify_timeout, then retry the item (its work is in {wt})",
                                   output_tail=exc.output_tail, attempts=attempt)
            if code != 0:
                return Integration(False, "verify_failed", f"integration.verify `{config.integration_verify}` exited "
                                   f"with code {code} on {lease.branch} combined with {info.target}; "
                                   f"{info.target} is unchanged: fix it in {wt} and retry the item",
                                   output_tail=tail, attempts=attempt)
        moved = _advance(info, config, old, new)
        if isinstance(moved, list):
            return Integration(False, "local_changes", f"{info.target} was not moved: its checkout has uncommitted "
                               f"changes to {', '.join(moved)}, which integrating {lease.branch} would overwrite; "
                               "commit or stash them, then retry the item", moved, attempts=attempt)
        if moved:
            if strategy == "merge":  # the branch follows its merge, so it counts as integrated
                run_git(wt, "merge", "-q", "--ff-only", new, step=f"git merge --ff-only in {wt}")
            return Integration(True, "integrated", f"{lease.branch} integrated into {info.target} at {new[:12]}",
                               commit=new, attempts=attempt)
        # the target moved meanwhile (someone committed): bring the branch up to it again
    return Integration(False, "conflict", f"{info.target} kept moving while {lease.branch} was being integrated "
                       f"({MAX_ATTEMPTS} attempts); {info.target} is unchanged: retry the item", attempts=MAX_ATTEMPTS)


def _is_ancestor(cwd: Path, a: str, b: str) -> bool:
    return run_git(cwd, "merge-base", "--is-ancestor", a, b, ok=(0, 1)).returncode == 0


def _rebase(wt: Path, onto: str) -> list[str] | None:
    """Rebase the worktree's branch onto ``onto``; the conflicting files (the rebase aborted, the
    branch as it was) or None."""
    if _is_ancestor(wt, onto, "HEAD"):
        return None
    done = run_git(wt, "-c", "rebase.autoSquash=false", "-c", "rebase.autoStash=false", "-c", "rebase.updateRefs=false",
                   "rebase", "-q", "--no-verify", onto, ok=range(0, 256))
    if done.returncode == 0:
        return None
    conflicts = nul_list(run_git(wt, "diff", "--name-only", "--diff-filter=U", "-z").stdout)
    in_progress = rev_exists(wt, "REBASE_HEAD") or rebasing(wt)
    if in_progress:
        run_git(wt, "rebase", "--abort", step=f"git rebase --abort in {wt}")
    if not conflicts:
        raise WorktreeError(f"git rebase failed in {wt}: {git_message(done)}")
    return conflicts


def _combine(info: RepoInfo, wt: Path, old: str, branch_head: str, lease: Lease, title: str, author: str | None,
             strategy: str) -> tuple[list[str] | None, str]:
    """Merge or squash without touching a working tree: ``git merge-tree`` makes the combined tree,
    ``git commit-tree`` the commit on top of the target. Returns (conflicts, commit)."""
    if _is_ancestor(wt, branch_head, old):
        return None, old
    done = run_git(wt, "merge-tree", "--write-tree", "--name-only", "--no-messages", "-z", old, branch_head,
                   ok=(0, 1), step="git merge-tree")
    names = nul_list(done.stdout)
    if done.returncode == 1:
        return sorted(set(names[1:])), old
    tree = names[0]
    if tree == git_out(wt, "rev-parse", f"{old}^{{tree}}"):
        return None, old  # everything on the branch is in the target already (e.g. squashed before)
    env = identity_env(wt, author)
    if strategy == "merge":
        args = ["-p", old, "-p", branch_head, "-m", f"Merge branch '{lease.branch}'\n\n{title}"]
    else:
        args = ["-p", old, "-m", title or f"Squashed branch '{lease.branch}'"]
    return None, git_out_env(wt, env, "commit-tree", tree, *args)


def git_out_env(cwd: Path, env: dict[str, str], *args: str) -> str:
    return run_git(cwd, *args, env=env, step=f"git {args[0]}").stdout.decode().strip()


def _verify(command: str, lease: Lease, combined: str, detach: bool, log: BinaryIO | None,
            stop: ShellStop | None, timeout_s: float | None) -> tuple[int, str]:
    """Run ``integration.verify`` in the worktree on ``combined``; the worktree is back on its branch after.
    Raises `ShellTimedOut` past ``timeout_s`` (``integration.verify_timeout``)."""
    if detach:
        run_git(lease.path, "checkout", "-q", "--detach", combined, step="git checkout (the combined result)")
    try:
        return run_shell(command, lease.workdir, lease.env(), log, stop=stop, what="integration.verify",
                         timeout_s=timeout_s)
    finally:
        if detach:
            run_git(lease.path, "checkout", "-q", lease.branch, step=f"git checkout {lease.branch}")


def _advance(info: RepoInfo, config: Config, old: str, new: str) -> bool | list[str]:
    """Move the target from ``old`` to ``new`` and its checkout (if any) with it. True when done;
    False when the target is no longer at ``old``; the blocking files when the checkout has local
    changes in the way (nothing changed).

    The checkout moves first and the ref after, as ``git merge --ff-only`` does: a server killed in
    between leaves the item's changes staged in the user's checkout with the target unmoved (a retry
    integrates them; their ``git commit`` would too), never the target moved under a checkout that
    still shows the old files, which ``git status`` then shows as the item's changes reversed."""
    if _target_now(info) != old:  # someone committed while the verify ran: bring the branch up again
        return False
    checkouts = [w.path for w in registered_worktrees(info.root)
                 if w.branch == info.target_ref and not w.prunable]
    queue_dir = _queue_prefix(info, config)
    for checkout in checkouts:
        blockers = _blockers(checkout, old, new, queue_dir)
        if blockers:
            return blockers
    moved: list[Path] = []
    for checkout in checkouts:
        try:
            _move_checkout(checkout, old, new, queue_dir)
        except WorktreeError as exc:  # a file changed since the check: put back those moved, report it
            _move_back(moved, old, new)
            if _target_now(info) != old:
                return False
            return _blockers(checkout, old, new, queue_dir) or [f"(git: {exc})"]
        moved.append(checkout)
    swap = run_git(info.root, "update-ref", "-m", "agent-parallel: integrate", info.target_ref, new, old, ok=(0, 1, 128))
    if swap.returncode != 0:
        if _target_now(info) != old:  # someone committed this very moment: the checkouts keep the item's
            return False              # changes staged (a commit there took them), the next bring-up goes on
        staged = _move_back(moved, old, new)
        raise WorktreeError(f"git update-ref {info.target_ref} failed: {git_message(swap)}" + "".join(
            f"; the checkout {c} keeps the item's changes staged (its branch has them too)" for c in staged))
    return True


def _target_now(info: RepoInfo) -> str:
    return rev_id(info.root, info.target_ref)


def _move_back(checkouts: list[Path], old: str, new: str) -> list[Path]:
    """Undo `_move_checkout` where the target did not move after all, with git's own checks; those git
    will not put back (a file changed meanwhile, a queue file kept) keep the item's changes staged,
    which loses nothing. Returns those."""
    return [c for c in checkouts if run_git(c, "read-tree", "-m", "-u", new, old, ok=range(0, 256)).returncode != 0]


def _queue_prefix(info: RepoInfo, config: Config) -> str:
    """The queue directory relative to the repository's top, ending with ``/``."""
    queue = (info.root / config.queue_dir).resolve()
    try:
        return queue.relative_to(info.toplevel.resolve()).as_posix().rstrip("/") + "/"
    except ValueError:
        return "\0"  # outside the repository: no path is in it


def _changed(cwd: Path, old: str, new: str) -> list[str]:
    return nul_list(run_git(cwd, "diff", "--name-only", "--no-renames", "-z", old, new).stdout)


def _dirty(checkout: Path, paths: list[str]) -> set[str]:
    """Of ``paths`` (and what is under them), those with uncommitted changes or untracked in ``checkout``."""
    run_git(checkout, "update-index", "-q", "--refresh", ok=(0, 1))
    spec = ["--", *[f":(top){p}" for p in paths]] if len(paths) <= 1000 else []
    out = run_git(checkout, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames",
                  "--ignore-submodules=none", *spec, env={"GIT_LITERAL_PATHSPECS": "0"}).stdout
    return {entry[3:] for entry in nul_list(out) if len(entry) > 3}


def _blockers(checkout: Path, old: str, new: str, queue_dir: str) -> list[str]:
    """Files the move from ``old`` to ``new`` would overwrite in ``checkout``: changed between the two
    and changed (or untracked) locally, outside the queue directory, unless index and file already hold
    ``new``'s version (what a move killed before the ref moved left staged: moving loses nothing)."""
    changed = _changed(checkout, old, new)
    if not changed:
        return []
    dirty = _dirty(checkout, changed)
    touched = set(changed)
    for path in dirty:  # an untracked directory is listed with a trailing / (rare with untracked=all)
        if path in touched or any(c.startswith(path.rstrip("/") + "/") for c in touched if path.endswith("/")):
            touched.add(path)
    found = sorted(p for p in dirty & touched if not p.startswith(queue_dir))
    if not found:
        return []
    spec = ["--", *[f":(top,literal){p}" for p in found]]
    differ = set()
    for cached in (["--cached"], []):  # the index, then the files, against new
        differ |= set(nul_list(run_git(checkout, "diff", *cached, "--name-only", "--no-renames", "-z", new, *spec,
                                       env={"GIT_LITERAL_PATHSPECS": "0"}).stdout))
    return [p for p in found if p in differ or p.endswith("/")]


def _move_checkout(checkout: Path, old: str, new: str, queue_dir: str) -> None:
    """``git merge --ff-only``'s update of ``checkout`` from ``old`` to ``new``, except that files under
    ``queue_dir`` the queue changed keep their state (only their index entries move)."""
    changed = _changed(checkout, old, new)
    queue_paths = [p for p in changed if p.startswith(queue_dir)]
    kept = _dirty(checkout, queue_paths) if queue_paths else set()
    if not kept:  # the usual case: git's own two-tree merge, with its own checks
        done = run_git(checkout, "read-tree", "-m", "-u", old, new, ok=(0, 128))
        if done.returncode != 0:
            raise WorktreeError(git_message(done))
        return
    done = run_git(checkout, "read-tree", "-m", old, new, ok=(0, 128))  # the index only
    if done.returncode != 0:
        raise WorktreeError(git_message(done))
    write = [p for p in changed if p not in kept]
    present = set(nul_list(run_git(checkout, "ls-tree", "-r", "-z", "--name-only", "--full-tree", new, "--",
                                   *[f":(top){p}" for p in write], env={"GIT_LITERAL_PATHSPECS": "0"}).stdout)) \
        if write else set()
    if present:
        run_git(checkout, "checkout-index", "-f", "-q", "-z", "--stdin",
                stdin=b"\0".join(p.encode(errors="surrogateescape") for p in sorted(present)) + b"\0",
                step="git checkout-index")
    top = Path(git_out(checkout, "rev-parse", "--show-toplevel"))
    for gone in sorted(set(write) - present):
        file = top / gone
        if file.is_symlink() or file.is_file():
            file.unlink()
            for parent in PurePosixPath(gone).parents:
                if str(parent) == ".":
                    break
                try:
                    (top / parent).rmdir()
                except OSError:
                    break


def predict_conflicts(root: Path, target: str, branches: list[str]) -> dict[str, list[str]]:
    """For each branch, the files that would conflict if it were merged into ``target`` now (empty:
    none), by ``git merge-tree --write-tree``: no working tree or ref is touched."""
    root = root.resolve()
    result: dict[str, list[str]] = {}
    refs: dict[str, str] = {}
    for name in [target, *branches]:  # a branch by its full ref: a tag of the same name (cloned) never shadows it
        full = f"refs/heads/{name}"
        if rev_exists(root, f"{full}^{{commit}}"):
            refs[name] = full
        elif name.startswith("-") or not rev_exists(root, f"{name}^{{commit}}"):
            raise UsageError(f"no branch or commit named {name!r} in {root}; `agent-parallel worktrees` lists the "
                             "items' branches")
        else:
            refs[name] = name
    for branch in branches:
        done = run_git(root, "merge-tree", "--write-tree", "--name-only", "--no-messages", "-z", refs[target],
                       refs[branch], ok=(0, 1), step=f"git merge-tree {target} {branch}")
        result[branch] = sorted(set(nul_list(done.stdout)[1:])) if done.returncode == 1 else []
    return result
