"""Errors raised by agent-parallel, split by whose fault they are.

    AgentParallelError
    ├── UsageError            the caller asked for something invalid; the message says what to do instead
    │   ├── PathOutsideWorkspace   a path resolves outside the workspace root
    │   ├── UnknownTask            no task has that id
    │   └── QueueError             the queue or an item cannot be used as asked
    │       ├── ConfigError        .agent/config.yaml is invalid (config.py)
    │       ├── ClaimLost          an item was moved by someone else (queue/claims.py)
    │       ├── BadTransition      an item cannot move to that status (queue/claims.py)
    │       ├── NotStarted         a run was stopped while it claimed the item (queue/run.py)
    │       └── ReadStopped        a queue read was stopped midway; nothing of it was kept (queue/items.py)
    ├── ResourceLimitError    a cap (tasks queued or running) was reached: wait, then try again
    ├── StorageError          a file the server keeps could not be written: a full disk, permissions
    ├── ShuttingDown          the server is stopping: try again once it runs again
    ├── ExecutorError         a process could not be started, waited for or stopped (tasks/executor.py)
    │   └── SpawnError             it could not be started: a missing cwd, no such program ...
    ├── WorktreeError         git could not prepare, integrate or remove an item's worktree (worktrees/)
    │   ├── SetupFailed            worktree.setup exited non-zero; carries its output's tail
    │   ├── ShellStopped           a setup or verify command was killed: its run was stopped
    │   └── ShellTimedOut          a setup or verify command outlived its timeout and was killed
    └── InternalError         a bug in agent-parallel: please report it

The MCP layer turns every ``AgentParallelError`` into a tool error carrying its message; anything
else is a bug and is reported as one. ``tests/test_public_api.py`` checks that every error class
of the package is in this tree.
"""

from __future__ import annotations

import errno
import os
import resource

from .text import short_repr


class AgentParallelError(Exception):
    """Base class: the message is written for the model or person who made the call."""


class UsageError(AgentParallelError):
    """Raised for invalid arguments; the message names the argument and the fix."""


class PathOutsideWorkspace(UsageError):
    """Raised when a path given for ``what`` resolves outside the workspace root."""

    def __init__(self, what: str, given: str, root: str) -> None:
        super().__init__(
            f"{what} {short_repr(given, 200)} resolves outside the workspace root {root}; "
            f"give a path inside it (relative paths are taken from the root)"
        )
        self.what, self.given, self.root = what, given, root


class UnknownTask(UsageError):
    """Raised when a task id is not in the registry."""

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"unknown task_id {short_repr(task_id)}; call list_tasks to see the ids of current and recent tasks"
        )
        self.task_id = task_id


class QueueError(UsageError):
    """Raised when the queue or a queue item cannot be used as asked."""


class ResourceLimitError(AgentParallelError):
    """Raised when a configured cap would be exceeded; the message names the cap and how to raise it."""


class StorageError(AgentParallelError):
    """Raised when a file the server keeps (a task record, a log) cannot be written; the message
    gives the operating system's reason (a full disk, permissions) and what to free or fix."""


class ShuttingDown(AgentParallelError):
    """Raised for work asked of a server that is stopping."""


class WorktreeError(AgentParallelError):
    """Raised by `agent_parallel.worktrees` when git refuses a step (creating, integrating or removing
    an item's worktree); the message names the step, git's own words and what to do."""


class SetupFailed(WorktreeError):
    """Raised when `worktree.setup` exits non-zero in a new worktree; `output_tail` holds the end of
    its output, which the message repeats so the item's reason shows it."""

    def __init__(self, message: str, output_tail: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.output_tail, self.exit_code = output_tail, exit_code


class ShellStopped(WorktreeError):
    """Raised when a `worktree.setup` or `integration.verify` command was killed because its run was
    stopped (cancel_task, shutdown): the command did not finish, and nothing after it was done."""


class ShellTimedOut(WorktreeError):
    """Raised when a `worktree.setup` or `integration.verify` command ran longer than its timeout
    (`worktree.setup_timeout`, `integration.verify_timeout`) and was killed with everything it
    started; `output_tail` holds the end of its output."""

    def __init__(self, message: str, output_tail: str) -> None:
        super().__init__(message)
        self.output_tail = output_tail


class InternalError(AgentParallelError):
    """A bug in agent-parallel. If you see this, please file a bug with the message."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} [this is a bug in agent-parallel: please report it]")


def os_error_text(exc: OSError) -> str:
    """An OS error as a sentence; running out of file descriptors names the limit and the fix."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        which = f"the server's open-file limit (RLIMIT_NOFILE, ulimit -n) of {soft}" if exc.errno == errno.EMFILE \
            else "the system-wide open-file limit (fs.file-max)"
        return (f"too many open files: {which} is reached; wait for some tasks to end (or cancel some), "
                "or raise the limit before starting the server")
    if exc.errno == errno.E2BIG:
        return (f"{exc.strerror or 'Argument list too long'}: the command, its arguments and its environment "
                f"together pass the kernel's limit for a new process (ARG_MAX, {os.sysconf('SC_ARG_MAX'):,} bytes "
                "here); pass large values through a file instead")
    return exc.strerror or str(exc)


def exception_reason(exc: BaseException) -> str:
    """An exception as the reason a task or item gives: our own errors carry their message, an OS
    error its cause (and the file it was about), anything else is named as a bug."""
    if isinstance(exc, AgentParallelError):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_text(exc) + (f" ({exc.filename})" if exc.filename else "")
    return str(InternalError(repr(exc)))
