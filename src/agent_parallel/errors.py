"""Errors raised by agent-parallel, split by whose fault they are.

    AgentParallelError
    ├── UsageError            the caller asked for something invalid; the message says what to do instead
    │   ├── PathOutsideWorkspace   a path resolves outside the workspace root
    │   ├── UnknownTask            no task has that id
    │   └── QueueError             the queue or an item cannot be used as asked
    ├── ResourceLimitError    a cap (tasks, registry, log size) was reached
    └── InternalError         a bug in agent-parallel: please report it

The MCP layer turns every ``AgentParallelError`` into a tool error carrying its message; anything
else is a bug and is reported as one.
"""

from __future__ import annotations


class AgentParallelError(Exception):
    """Base class: the message is written for the model or person who made the call."""


class UsageError(AgentParallelError):
    """Raised for invalid arguments; the message names the argument and the fix."""


class PathOutsideWorkspace(UsageError):
    """Raised when a path given for ``what`` resolves outside the workspace root."""

    def __init__(self, what: str, given: str, root: str) -> None:
        super().__init__(
            f"{what} {given!r} resolves outside the workspace root {root}; "
            f"give a path inside it (relative paths are taken from the root)"
        )
        self.what, self.given, self.root = what, given, root


class UnknownTask(UsageError):
    """Raised when a task id is not in the registry."""

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"unknown task_id {task_id!r}; call list_tasks to see the ids of current and recent tasks"
        )
        self.task_id = task_id


class QueueError(UsageError):
    """Raised when the queue or a queue item cannot be used as asked."""


class ResourceLimitError(AgentParallelError):
    """Raised when a configured cap would be exceeded; the message names the cap and how to raise it."""


class InternalError(AgentParallelError):
    """A bug in agent-parallel. If you see this, please file a bug with the message."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} [this is a bug in agent-parallel: please report it]")
