"""The git engine behind `runner.isolation: worktree`: an item's own worktree (`prepare`), its
integration into the target (`integrate`), conflict forecasts (`predict_conflicts`) and cleanup that
never loses work (`list_worktrees`, `is_safe_to_remove`, `remove`); `ShellStop` lets a run kill the
setup or verify command a worker thread is running.

Everything here is synchronous and drives the ``git`` command (2.38 or later), without the user's
hooks and each step under a timeout (see ``_git``): callers in an event loop run it in a worker thread. Errors: `ConfigError` for a workspace that cannot host worktrees
(naming the setting), `UsageError` for a bad item id or slug, `SetupFailed` for `worktree.setup`,
`WorktreeError` when git refuses a step. An integration that conflicts or fails its verify is a
result (`Integration`), not an error.
"""

from ._git import ShellStop as ShellStop
from .cleanup import WorktreeState as WorktreeState
from .cleanup import is_safe_to_remove as is_safe_to_remove
from .cleanup import list_worktrees as list_worktrees
from .cleanup import remove as remove
from .integrate import Integration as Integration
from .integrate import commit_leftovers as commit_leftovers
from .integrate import integrate as integrate
from .integrate import predict_conflicts as predict_conflicts
from .prepare import Lease as Lease
from .prepare import prepare as prepare
from .prepare import release as release
from .repo import RepoInfo as RepoInfo
from .repo import check_repository as check_repository

__all__ = ["ShellStop", "RepoInfo", "check_repository", "Lease", "prepare", "release", "Integration", "integrate",
           "commit_leftovers", "predict_conflicts", "WorktreeState", "list_worktrees", "is_safe_to_remove", "remove"]
