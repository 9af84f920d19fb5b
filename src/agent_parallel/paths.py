"""The workspace root and the one rule for paths: everything resolves inside it.

Checks use ``Path.resolve()`` and ``is_relative_to``, never string prefixes, so ``..``,
absolute paths and symlinks pointing out are all caught the same way.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PathOutsideWorkspace

AGENT_DIR = ".agent"
RUNS_DIR = ".agent/runs"
QUEUE_DIR = ".agent/queue"
CONFIG_FILE = ".agent/config.yaml"


def resolve_inside(root: Path, given: str | Path, what: str) -> Path:
    """Resolve ``given`` (relative to ``root``) and refuse it if it lands outside ``root``.

    ``root`` must already be resolved. ``what`` names the argument in the error message.
    """
    path = (root / given).resolve()
    if not path.is_relative_to(root):
        raise PathOutsideWorkspace(what, str(given), str(root))
    return path


def runs_dir(root: Path) -> Path:
    """Where task records and logs live; created with a ``.gitignore`` so run data is never committed."""
    path = root / RUNS_DIR
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
    ignore = path / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return path
