"""Giving an item its own worktree: created from the integration target's current commit (or, after a
crash or a retry, the one it already has, with its commits and files), set up the way the workspace
says (`worktree.copy`, `worktree.link`, `worktree.ports`, `worktree.setup`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..config import Config
from ..errors import SetupFailed, ShellTimedOut, WorktreeError
from ..paths import read_regular
from . import leases
from ._git import ShellStop, git_message, git_out, nul_list, rev_exists, rev_id, run_git, run_shell
from .repo import BRANCH_PREFIX, RepoInfo, check_repository, file_lock, worktree_name, worktrees_dir

logger = logging.getLogger(__name__)  # (`log` is what prepare streams the setup to)

WORKTREES_LOCK = "agent-parallel-worktrees.lock"
"""In the repository's common git directory: creating worktrees one at a time (``git worktree list``
fails on a worktree another process is half-way through adding)."""
META_FILE = "agent-parallel.json"
"""Kept in the worktree's own git directory (``.git/worktrees/<name>/``): what prepare copied and
linked there, so it is never committed nor counted as the agent's work; removed with the worktree."""
MAX_META_BYTES = 1 << 20  # what prepare writes there is a few hundred bytes


@dataclass(frozen=True)
class Lease:
    """An item's worktree while the item uses it; give it back with `release`."""

    item_id: str
    name: str
    """``<id>-<slug>``: the worktree's directory name and, after ``agent/``, its branch."""
    path: Path
    """The worktree (its top directory)."""
    workdir: Path
    """Where the workspace root is inside the worktree: the item's cwd."""
    branch: str
    port: int | None
    base: str
    """The commit the worktree was at when handed out."""
    target: str
    reused: bool
    """True when the worktree already existed (a crash, a retry): its work was kept."""
    notes: tuple[str, ...] = field(default=())
    """What setup skipped and why (a `worktree.link` directory that does not exist ...), for the log."""

    def env(self) -> dict[str, str]:
        """The variables the item's command gets: AGENT_WORKTREE, AGENT_BRANCH and AGENT_PORT."""
        env = {"AGENT_WORKTREE": str(self.path), "AGENT_BRANCH": self.branch}
        if self.port is not None:
            env["AGENT_PORT"] = str(self.port)
        return env


@dataclass(frozen=True)
class Registered:
    """One entry of ``git worktree list``."""

    path: Path
    head: str | None
    branch: str | None
    """``refs/heads/...``, or None when detached."""
    prunable: bool
    locked: bool
    lock_reason: str | None = None
    """Why it is locked (``initializing``: git is adding it, or was killed while adding it)."""


def registered_worktrees(cwd: Path) -> list[Registered]:
    """Every worktree git knows of in the repository of ``cwd`` (the main one first). Tried again a few
    times when it fails: git fails to list a worktree that another process is half-way through adding."""
    for attempt in range(5):
        done = run_git(cwd, "worktree", "list", "--porcelain", "-z", ok=range(0, 256))
        if done.returncode == 0:
            break
        time.sleep(0.01 * 2 ** attempt)
    else:
        raise WorktreeError(f"git worktree list failed in {cwd}: {git_message(done)}")
    out = done.stdout
    found: list[Registered] = []
    for block in out.split(b"\0\0"):
        fields: dict[str, str] = {}
        for line in nul_list(block):
            key, _, value = line.partition(" ")
            fields[key] = value
        if "worktree" in fields:
            found.append(Registered(Path(fields["worktree"]), fields.get("HEAD"), fields.get("branch"),
                                    "prunable" in fields, "locked" in fields, fields.get("locked")))
    return found


def read_meta(worktree: Path) -> dict[str, Any]:
    """The worktree's `META_FILE` (empty when absent or unreadable)."""
    try:
        gitdir = Path(git_out(worktree, "rev-parse", "--absolute-git-dir"))
        data = json.loads(read_regular(gitdir / META_FILE, MAX_META_BYTES))
    except (OSError, ValueError, RecursionError, WorktreeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_meta(worktree: Path, meta: dict[str, Any]) -> None:
    gitdir = Path(git_out(worktree, "rev-parse", "--absolute-git-dir"))
    (gitdir / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))


def prepare(root: Path, config: Config, item_id: str | int, slug: str, *, log: BinaryIO | None = None,
            stop: ShellStop | None = None) -> Lease:
    """Hand item ``item_id`` its worktree ``.agent/worktrees/<id>-<slug>`` on branch ``agent/<id>-<slug>``.

    A new one starts at the integration target's current commit, so it sees every item integrated
    before (an item blocked by others is prepared once they are integrated). One that exists is
    reused as it is: after a crash or a retry the work done so far is not thrown away. Then
    `worktree.copy` files are copied (never over a file there), `worktree.link` directories
    symlinked, a port taken from `worktree.ports`, and `worktree.setup` run in the worktree, its
    output streamed to ``log``; a setup that fails raises `SetupFailed` with its output's tail and
    keeps the worktree (a retry reuses it). Bad ids and slugs are refused before anything changes.
    ``stop`` (the run's) kills the setup when the run is stopped: `ShellStopped`, the worktree kept.
    """
    name = worktree_name(item_id, slug)
    info = check_repository(root, config)
    folder = worktrees_dir(info.root)
    path, branch = folder / name, BRANCH_PREFIX + name
    meta = read_meta(path) if path.is_dir() else {}
    port = leases.take(info.root, name, config.worktree_ports, prefer=meta.get("port"))
    try:
        with file_lock(info.common_dir / WORKTREES_LOCK, "worktree list"):  # git worktree add/list race otherwise
            reused = _checkout(info, path, branch)
        workdir = path / info.prefix
        meta.update(item=str(item_id), slug=slug, target=info.target, port=port)
        notes = _copy_and_link(info, config, workdir, meta)
        _write_meta(path, meta)
        lease = Lease(str(item_id), name, path, workdir, branch, port, git_out(path, "rev-parse", "HEAD"),
                      info.target, reused, tuple(notes))
        if config.worktree_setup:
            try:
                code, tail = run_shell(config.worktree_setup, workdir, lease.env(), log, stop=stop,
                                       what="worktree.setup", timeout_s=config.worktree_setup_timeout_s)
            except ShellTimedOut as exc:
                raise SetupFailed(f"{exc}, in {workdir} (the worktree is kept: make the setup faster or raise "
                                  f"worktree.setup_timeout, then retry the item); its output ended with:\n"
                                  f"{exc.output_tail}", exc.output_tail, None) from exc
            if code != 0:
                raise SetupFailed(f"worktree.setup `{config.worktree_setup}` exited with code {code} in {workdir} "
                                  f"(the worktree is kept: fix the setup, then retry the item); its output ended "
                                  f"with:\n{tail}", tail, code)
    except BaseException:
        leases.give_back(info.root, name)
        raise
    return lease


def release(root: Path, lease: Lease) -> None:
    """The item is done with its worktree: its port is free for others (the worktree itself stays
    until it is integrated and cleaned)."""
    leases.give_back(root.resolve(), lease.name)


def _checkout(info: RepoInfo, path: Path, branch: str) -> bool:
    """Make ``path`` a worktree on ``branch``; True when it already was one (reused)."""
    known = {w.path.resolve(): w for w in registered_worktrees(info.root)}
    entry = known.get(path.resolve())
    if entry is not None and entry.prunable:  # its directory was deleted: forget it, the branch stays
        run_git(info.root, "worktree", "prune", step="git worktree prune")
        entry = None
    if entry is not None and entry.lock_reason == ADDING:
        # `git worktree add` was killed half-way (with the server, or the machine): a partial checkout that
        # nothing ran in yet (prepare never returned), which `git add -A` would later record as the item
        # deleting every file it lacks. Made again from its branch, which keeps its commits.
        logger.warning("worktree %s was left half-made by an interrupted `git worktree add`; making it again", path)
        _forget_half_made(info, path)
        entry = None
    if entry is not None:
        if entry.branch is None and rebasing(path):  # a crash mid-integration, or the agent's own rebase
            raise WorktreeError(f"a rebase is in progress in worktree {path} (its work is kept; git -C {path} status "
                                f"shows it): finish it (git -C {path} rebase --continue) or undo it (git -C {path} "
                                "rebase --abort, which puts the branch back as it was), then retry the item")
        if entry.branch is None and _detached_by_us(path, branch):  # a crash while verifying a merge or squash
            run_git(path, "checkout", "-q", branch, step=f"git checkout {branch} in {path}")
            return True
        if entry.branch != f"refs/heads/{branch}":
            on = entry.branch[len("refs/heads/"):] if entry.branch else f"a detached HEAD at {(entry.head or '')[:12]}"
            raise WorktreeError(f"worktree {path} is on {on}, not on {branch}; check out {branch} there "
                                f"(git -C {path} checkout {branch}) or remove the worktree, then retry the item")
        return True
    if path.exists() or path.is_symlink():
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()  # an empty directory left by an interrupted `git worktree add`
        else:
            raise WorktreeError(f"{path} exists but is not a git worktree of this repository; move it away "
                                "(nothing was changed), then retry the item")
    has_branch = rev_exists(info.root, f"refs/heads/{branch}")
    if has_branch:  # the branch survived its worktree (deleted by hand, a crash): keep its commits
        _add_worktree(info, path, str(path), branch, step=f"git worktree add {path} {branch}")
    else:
        folder = BRANCH_PREFIX.rstrip("/")  # a branch named `agent` leaves git no room for agent/<name>
        if rev_exists(info.root, f"refs/heads/{folder}"):
            raise WorktreeError(f"the repository has a branch named {folder!r}, so git cannot make the item's branch "
                                f"{branch} (a branch name cannot also be a folder of branches); rename it (git -C "
                                f"{info.root} branch -m {folder} {folder}-work), then retry the item; nothing was "
                                "changed")
        _add_worktree(info, path, "--no-track", "-b", branch, str(path), info.target_commit,
                      step=f"git worktree add -b {branch} {path}")
    return has_branch


def _add_worktree(info: RepoInfo, path: Path, *args: str, step: str) -> None:
    """``git worktree add ARGS``; when it fails or is killed half-way (past its timeout), what it made of
    ``path`` goes and git forgets it: a retry would otherwise reuse a half checkout as the item's work.
    ``path`` did not exist before (checked under the lock), so nothing else is there; the branch stays."""
    try:
        run_git(info.root, "worktree", "add", *args, step=step)
    except WorktreeError:
        _forget_half_made(info, path)
        raise


ADDING = "initializing"
"""The lock reason git gives a worktree while `git worktree add` makes it (removed when it ends, even on
failure: still there, the add was killed)."""


def _forget_half_made(info: RepoInfo, path: Path) -> None:
    """Remove what an unfinished `git worktree add` made of ``path`` (a directory of ours under the
    worktrees folder) and make git forget it; its branch stays."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    run_git(info.root, "worktree", "unlock", str(path), ok=range(0, 256))  # git's own lock while it adds
    run_git(info.root, "worktree", "prune", ok=range(0, 256))


def rebasing(path: Path) -> bool:
    """Whether a rebase stopped half-way in the worktree."""
    gitdir = Path(git_out(path, "rev-parse", "--absolute-git-dir"))
    return (gitdir / "rebase-merge").exists() or (gitdir / "rebase-apply").exists()


def _detached_by_us(path: Path, branch: str) -> bool:
    """Whether a detached worktree is as `integrate` leaves it while verifying a merge or squash: clean,
    at a commit whose parents include the branch's tip or the target (so going back to the branch loses
    nothing)."""
    if run_git(path, "status", "--porcelain", "--untracked-files=all").stdout.strip():
        return False
    tip = rev_id(path, f"refs/heads/{branch}")
    return bool(tip) and run_git(path, "merge-base", "--is-ancestor", tip, "HEAD", ok=(0, 1)).returncode == 0


def _copy_and_link(info: RepoInfo, config: Config, workdir: Path, meta: dict[str, Any]) -> list[str]:
    """`worktree.copy` and `worktree.link` into ``workdir``, recorded in ``meta`` (paths relative to the
    worktree's top); never over anything already there. Returns notes on what was skipped."""
    notes: list[str] = []
    copied: list[str] = list(meta.get("copied", []))
    linked: list[str] = list(meta.get("linked", []))
    for pattern in config.worktree_copy:
        for source in _matches(info.root, pattern):
            rel = source.relative_to(info.root)
            dest = workdir / rel
            if dest.exists() or dest.is_symlink():
                continue  # tracked (checked out by git), or copied before: never overwritten
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                os.symlink(os.readlink(source), dest)
            elif source.is_dir():
                shutil.copytree(source, dest, symlinks=True)
            else:
                shutil.copy2(source, dest)
            copied.append(info.prefix + rel.as_posix())
    for pattern in config.worktree_link:
        sources = _matches(info.root, pattern)
        if not sources:
            notes.append(f"worktree.link {pattern}: nothing by that name in {info.root}; not linked")
        for source in sources:
            rel = source.relative_to(info.root)
            dest = workdir / rel
            if dest.is_symlink() or dest.exists():
                if not dest.is_symlink():
                    notes.append(f"worktree.link {rel.as_posix()}: the worktree has its own (tracked); not linked")
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source, dest, target_is_directory=source.is_dir())
            linked.append(info.prefix + rel.as_posix())
    meta["copied"], meta["linked"] = sorted(set(copied)), sorted(set(linked))
    return notes


def _matches(root: Path, pattern: str) -> list[Path]:
    """The paths under ``root`` matching ``pattern``, outside ``.git`` and ``.agent``."""
    found = []
    for path in sorted(root.glob(pattern)):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] not in (".git", ".agent"):
            found.append(path)
    return found
