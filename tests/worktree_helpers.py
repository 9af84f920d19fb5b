"""Real git repositories for the worktree tests: made in tmp dirs, agents are shell commands."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from agent_parallel.config import Config
from agent_parallel.worktrees import Lease

LINES = "".join(f"line {n}\n" for n in range(1, 11))


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.rstrip("\n")


def make_repo(root: Path, files: dict[str, str] | None = None) -> Path:
    """A repository on branch main with one commit: a.txt and b.txt (ten lines each), a .gitignore
    ignoring .env, and the queue's item file."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Test User")
    git(root, "config", "user.email", "test@example.com")
    content = {"a.txt": LINES, "b.txt": LINES, ".gitignore": ".env\n",
               ".agent/queue/001-pending-first.md": "---\ntitle: First\n---\nDo it.\n", **(files or {})}
    for name, text in content.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "start")
    return root


def make_empty_queue_repo(root: Path) -> Path:
    """`make_repo` whose queue holds no item (each test writes its own), committed."""
    make_repo(root)
    (root / ".agent/queue/001-pending-first.md").unlink()
    git(root, "commit", "-q", "-am", "no items yet")
    return root


def config(**values: Any) -> Config:
    return Config(isolation="worktree", **values)


def agent(lease: Lease, script: str) -> None:
    """A fake agent: a shell script run in the item's worktree."""
    subprocess.run(["sh", "-c", script], cwd=lease.workdir, check=True, capture_output=True)


def commit_once(repo: Path, marker: Path, commit: str) -> str:
    """An ``integration.verify`` command that, the first time only (``marker`` remembers), runs ``commit``
    in ``repo``'s checkout: the user committing to the target while an integration is verified."""
    return f"if [ ! -e {marker} ]; then touch {marker}; cd {repo} && {commit}; fi"


def head(root: Path, ref: str = "main") -> str:
    return git(root, "rev-parse", ref)


def tracked_snapshot(root: Path) -> tuple[str, str, str]:
    """Refs, status and worktrees of the repository: equal before and after means nothing changed."""
    return (git(root, "for-each-ref", "--format=%(refname) %(objectname)"),
            git(root, "status", "--porcelain", "--untracked-files=all", "--ignored"),
            git(root, "worktree", "list", "--porcelain"))
