"""The workspace's repository as the worktree engine needs it, checked once with errors that name the
setting to change; the `.agent/worktrees/` directory; file locks shared by every server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError
from ..errors import UsageError, WorktreeError, os_error_text
from ..paths import AGENT_DIR, take_flock
from ._git import rev_id, run_git

WORKTREES_DIR = ".agent/worktrees"
BRANCH_PREFIX = "agent/"


@dataclass(frozen=True)
class RepoInfo:
    """Where the workspace sits in its repository, and the branch items are integrated into."""

    root: Path
    """The workspace root (resolved)."""
    toplevel: Path
    """The top of the working tree holding the root (the root itself, or a parent of it)."""
    prefix: str
    """The root relative to `toplevel` (``""``, or ``"sub/dir/"``): a worktree's copy of the root is there."""
    common_dir: Path
    """The repository's git directory shared by all its worktrees (locks live there)."""
    target: str
    """The integration target's branch name (``main``)."""
    target_commit: str
    """The commit the target pointed to when checked."""

    @property
    def target_ref(self) -> str:
        return f"refs/heads/{self.target}"


def check_repository(root: Path, config: Config) -> RepoInfo:
    """Check that ``root`` can host isolated items: a git working tree with a target branch that has a
    commit. Every refusal is a `ConfigError` naming the setting and the fix; nothing is changed."""
    root = root.resolve()
    done = run_git(root, "rev-parse", "--is-inside-work-tree", "--show-toplevel", "--git-common-dir", "--show-prefix",
                   ok=(0, 128, 129), step="git rev-parse")
    lines = done.stdout.decode(errors="surrogateescape").splitlines()
    if done.returncode != 0 or len(lines) < 3 or lines[0] != "true":
        raise ConfigError("runner.isolation", f"is worktree, which needs the workspace {root} to be a git repository "
                                              "with a working tree; run git init there (and commit once), "
                                              "or set runner.isolation: none")
    toplevel = Path(lines[1])
    common_dir = (root / lines[2]).resolve()
    prefix = lines[3] if len(lines) > 3 else ""
    target = config.integration_target
    if target is None:
        head = run_git(root, "symbolic-ref", "-q", "HEAD", ok=(0, 1)).stdout.decode(errors="surrogateescape").strip()
        if not head.startswith("refs/heads/"):
            raise ConfigError("integration.target", "is not set and the workspace has no branch checked out "
                                                    "(a detached HEAD); set integration.target to the branch to "
                                                    "integrate into (e.g. main), or check out a branch")
        target = head[len("refs/heads/"):]
    commit = rev_id(root, f"refs/heads/{target}^{{commit}}")
    if not commit:
        branches = run_git(root, "for-each-ref", "--count=6", "--format=%(refname:short)", "refs/heads/")
        known = [b for b in branches.stdout.decode(errors="replace").split() if not b.startswith(BRANCH_PREFIX)]
        if config.integration_target is None:
            raise ConfigError("integration.target", f"is not set, and the workspace's branch {target!r} has no "
                                                    "commit yet; commit once (git commit --allow-empty -m start), "
                                                    "or set integration.target")
        hint = f"one of: {', '.join(known)}" if known else "an existing branch"
        raise ConfigError("integration.target", f"names branch {target!r}, which does not exist in {toplevel}; "
                                                f"create it (git branch {target}) or set integration.target to {hint}")
    return RepoInfo(root, toplevel, prefix, common_dir, target, commit)


def worktree_name(item_id: str | int, slug: str) -> str:
    """``<id>-<slug>``, the worktree's directory and (after ``agent/``) its branch; a `UsageError` for
    an id or slug that cannot be both (checked before anything is created)."""
    text_id = str(item_id)
    if isinstance(item_id, bool) or not text_id.isascii() or not text_id.isdigit() or len(text_id) > 12:
        raise UsageError(f"item id {item_id!r} must be digits (like 005): it names the worktree and its branch")
    if not slug or len(slug) > 100 or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in slug) \
            or slug.startswith((".", "-")) or slug.endswith((".", ".lock")) or ".." in slug:
        raise UsageError(f"item slug {slug!r} cannot name a worktree and a git branch: use letters, digits, - _ "
                         "and . (not first or last), at most 100 characters, like fix-login")
    return f"{text_id}-{slug}"


def worktrees_dir(root: Path) -> Path:
    """``.agent/worktrees`` under ``root``, created with a ``.gitignore`` of ``*`` so git never sees
    the worktrees as files of the repository; refused when it resolves outside ``root``."""
    root = root.resolve()
    path = root / WORKTREES_DIR
    (root / AGENT_DIR).mkdir(exist_ok=True)
    if not path.resolve().is_relative_to(root):
        raise UsageError(f"{WORKTREES_DIR} resolves to {path.resolve()}, outside the workspace root {root} "
                         f"(a symbolic link in {AGENT_DIR}?); remove the link and try again")
    path.mkdir(exist_ok=True)
    try:
        fd = os.open(path / ".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return path
    try:
        os.write(fd, b"*\n")
    finally:
        os.close(fd)
    return path


@contextmanager
def file_lock(path: Path, what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, shared with every thread, process and server on this
    machine; a `WorktreeError` naming ``what`` and the file after ``timeout_s`` (None: wait)."""
    try:  # the lock file is ours: a symlink planted at its name is never followed (O_CREAT would make its target)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise WorktreeError(f"cannot open the {what} lock {path}: {os_error_text(exc)}; if it is a symbolic link "
                            "or not a regular file, remove it") from exc
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def still_waiting() -> None:
            if deadline is not None and time.monotonic() >= deadline:
                raise WorktreeError(f"the {what} lock {path} is held by another process after {timeout_s:g} s; "
                                    f"try again, or find the holder with `fuser {path}`") from None

        take_flock(fd, still_waiting, max_pause=0.05)
        yield
    finally:
        os.close(fd)
