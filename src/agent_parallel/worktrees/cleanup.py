"""Listing the items' worktrees and removing only those whose work is provably in the target.

Provably: the branch (and the worktree's HEAD) is an ancestor of the target; or merging it into
the target would change nothing (``git merge-tree`` gives the target's own tree: a squash merge);
or every commit has an equivalent in the target (``git cherry``: patch-ids, a rebase done
elsewhere). A worktree with uncommitted changes, untracked files (other than what prepare copied
or linked there, unchanged), a rebase or merge in progress, or in use by a live item is never
removed, and nothing is ever removed with ``--force``.
"""

from __future__ import annotations

import filecmp
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import Config
from ..errors import WorktreeError
from . import leases
from ._git import git_out, nul_list, rev_id, run_git
from .prepare import read_meta, registered_worktrees
from .repo import BRANCH_PREFIX, WORKTREES_DIR, RepoInfo, check_repository


@dataclass(frozen=True)
class WorktreeState:
    """One worktree under ``.agent/worktrees`` as it is now."""

    path: Path
    name: str
    item_id: str | None
    branch: str | None
    """``agent/<id>-<slug>``, or None when the worktree has a detached HEAD."""
    head: str | None
    state: str
    """``clean``, ``modified`` (uncommitted changes), ``untracked`` (new files), ``in-progress`` (a
    rebase or merge stopped half-way), ``in-use`` (a live item holds it), ``unreadable`` (git could
    not read it: half made by a prepare under way, or damaged; never removed) or ``missing`` (its
    directory was deleted; git still lists it)."""
    ahead: int
    """Commits on the branch that the target does not have."""
    behind: int
    safe: bool
    reason: str
    """Why it is, or is not, safe to remove."""
    port: int | None = None


def list_worktrees(root: Path, config: Config) -> list[WorktreeState]:
    """Every worktree git knows under ``.agent/worktrees`` of ``root``, with its state and whether
    removing it could lose work (see the module docstring)."""
    info = check_repository(root, config)
    folder = (info.root / WORKTREES_DIR).resolve()
    live = leases.live_leases(info.root) if folder.is_dir() else {}
    states = []
    for entry in registered_worktrees(info.root):
        if not entry.path.resolve().is_relative_to(folder) or entry.path.resolve() == folder:
            continue
        states.append(_state(info, entry.path, entry.branch, entry.head, entry.prunable, live))
    return sorted(states, key=lambda s: s.name)


def is_safe_to_remove(root: Path, config: Config, state: WorktreeState) -> tuple[bool, str]:
    """Look again (the listing may be old): whether ``state``'s worktree can go without losing work, and why."""
    fresh = _fresh(root, config, state)
    return fresh.safe, fresh.reason


def remove(root: Path, config: Config, state: WorktreeState) -> str:
    """Remove a worktree and its branch after checking again that it is safe; a `WorktreeError` saying
    why not otherwise. Never ``--force``: git itself refuses a worktree with changes. The branch is
    deleted only if it still points where it was checked (``git update-ref -d REF OLD``)."""
    info = check_repository(root, config)
    fresh = _fresh(root, config, state)
    if not fresh.safe:
        raise WorktreeError(f"worktree {fresh.path} was not removed: {fresh.reason}")
    if fresh.state == "missing":
        run_git(info.root, "worktree", "prune", step="git worktree prune")
    else:
        meta = read_meta(fresh.path)
        for rel in [*meta.get("copied", []), *meta.get("linked", [])]:  # unchanged copies (checked): ours
            own = _own_path(fresh.path, rel)
            if own is not None:
                _remove_path(own)
        done = run_git(info.root, "worktree", "remove", str(fresh.path), ok=(0, 128))
        if done.returncode != 0:
            raise WorktreeError(f"git worktree remove {fresh.path} refused: "
                                f"{done.stderr.decode(errors='replace').strip()}; nothing else was removed")
    if fresh.branch and fresh.head:
        run_git(info.root, "update-ref", "-d", f"refs/heads/{fresh.branch}", fresh.head, ok=(0, 1, 128))
    return f"removed {fresh.path}" + (f" and branch {fresh.branch}" if fresh.branch else "")


def _fresh(root: Path, config: Config, state: WorktreeState) -> WorktreeState:
    for now in list_worktrees(root, config):
        if now.path.resolve() == state.path.resolve():
            return now
    raise WorktreeError(f"{state.path} is no longer a worktree of this repository; nothing to remove")


def _own_path(worktree: Path, rel: object) -> Path | None:
    """``worktree / rel`` when that names something inside the worktree reached through no symbolic
    link; else None. The record naming what prepare copied there is in the worktree's git directory,
    where the item's process can write: a ``..`` or an absolute path in it, or a directory the agent
    replaced by a link, must never make cleanup delete something outside the worktree."""
    if not isinstance(rel, str) or "\0" in rel:
        return None
    parts = PurePosixPath(rel).parts
    if not parts or parts[0] == "/" or ".." in parts:
        return None
    top = worktree.resolve()
    path = top.joinpath(*parts)
    return path if Path(os.path.realpath(path.parent)) == path.parent else None


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        import shutil

        shutil.rmtree(path)


def _state(info: RepoInfo, path: Path, branch_ref: str | None, head: str | None, prunable: bool,
           live: dict[str, dict[str, object]]) -> WorktreeState:
    name = path.name
    item_id = name.split("-", 1)[0] if name.split("-", 1)[0].isdigit() else None
    branch = branch_ref[len("refs/heads/"):] if branch_ref and branch_ref.startswith("refs/heads/") else None
    lease = live.get(name)
    port = lease.get("port") if lease else None
    tip = None if head is None or head.strip("0") == "" else head  # all zeros: no commit yet (being added)
    ahead = behind = 0
    try:
        if branch:  # the branch's own tip (the worktree's HEAD when it is checked out)
            tip = rev_id(info.root, branch_ref or "") or tip
        if tip:
            counts = git_out(info.root, "rev-list", "--left-right", "--count", f"{info.target_ref}...{tip}").split()
            behind, ahead = int(counts[0]), int(counts[1])
        contained, why = _contained(info, tip, ahead)
    except WorktreeError as exc:  # one worktree git cannot read must not hide (or unlock) the others
        contained, why = False, f"not safe: git could not compare it with {info.target} ({exc})"
    if prunable:
        state = "missing"
        safe, reason = contained, ("its directory is gone; " + why)
    else:
        problem: str | None
        if lease is not None:
            state, problem = "in-use", f"a live item uses it (pid {lease.get('pid')})"
        else:
            try:
                state, problem = _worktree_problem(info, path)
            except WorktreeError as exc:
                if path.is_dir():  # half-made by a prepare under way, or damaged: kept, and said why
                    state, problem = "unreadable", f"git could not read it ({exc})"
                else:
                    state, problem = "missing", "its directory is gone (removed while it was being listed)"
        safe = contained and problem is None
        reason = f"not safe: {problem}" if problem else why
    if branch and not branch.startswith(BRANCH_PREFIX):
        safe, reason = False, f"not safe: it is on {branch}, not an agent/ branch; remove it by hand if you mean to"
    return WorktreeState(path, name, item_id, branch, tip, state, ahead, behind, safe,
                         reason, port if isinstance(port, int) else None)


def _contained(info: RepoInfo, tip: str | None, ahead: int) -> tuple[bool, str]:
    """Whether every change of ``tip`` is in the target, and how that was shown."""
    if not tip:
        return False, "not safe: it has no commit"
    if ahead == 0:
        return True, f"safe: its commits are in {info.target}"
    done = run_git(info.root, "merge-tree", "--write-tree", "--no-messages", info.target_ref, tip, ok=(0, 1))
    if done.returncode == 0:
        tree = done.stdout.decode().split()[0]
        if tree == git_out(info.root, "rev-parse", f"{info.target_ref}^{{tree}}"):
            return True, f"safe: its changes are in {info.target} (squash-merged: merging it would change nothing)"
    cherry = run_git(info.root, "cherry", info.target_ref, tip).stdout.decode().split("\n")
    if all(line.startswith("-") for line in cherry if line.strip()):
        return True, f"safe: each of its commits has an equivalent in {info.target} (git cherry)"
    return False, f"not safe: {ahead} commit{'s' if ahead != 1 else ''} not in {info.target}"


def _worktree_problem(info: RepoInfo, path: Path) -> tuple[str, str | None]:
    """The worktree's state and why it holds work that is not committed (None: it holds none)."""
    gitdir = Path(git_out(path, "rev-parse", "--absolute-git-dir"))
    if any((gitdir / marker).exists() for marker in ("rebase-merge", "rebase-apply", "MERGE_HEAD", "CHERRY_PICK_HEAD")):
        return "in-progress", "a rebase or merge is in progress in it"
    out = run_git(path, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignore-submodules=none").stdout
    entries = nul_list(out)
    meta = read_meta(path)
    modified = [e[3:] for e in entries if not e.startswith("??")]
    untracked = [e[3:] for e in entries if e.startswith("??") and not _unchanged_setup(info, path, e[3:], meta)]
    if modified:
        return "modified", f"{len(modified)} uncommitted change{'s' if len(modified) != 1 else ''} ({_few(modified)})"
    if untracked:
        return "untracked", f"{len(untracked)} untracked file{'s' if len(untracked) != 1 else ''} ({_few(untracked)})"
    return "clean", None


def _unchanged_setup(info: RepoInfo, worktree: Path, rel: str, meta: dict[str, Any]) -> bool:
    """Whether untracked ``rel`` is what prepare put there (a `worktree.copy` file identical to the
    workspace's, or a `worktree.link` link still pointing where it did): not the agent's work."""
    here, there = worktree / rel, info.toplevel / rel
    if rel in meta.get("linked", []):
        return here.is_symlink() and here.resolve() == there.resolve()
    copies = meta.get("copied", [])
    if not any(rel == c or rel.startswith(c.rstrip("/") + "/") for c in copies):
        return False
    if here.is_symlink():
        return there.is_symlink() and os.readlink(here) == os.readlink(there)
    return there.is_file() and not there.is_symlink() and filecmp.cmp(here, there, shallow=False)


def _few(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

