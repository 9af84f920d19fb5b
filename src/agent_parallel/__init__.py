"""agent-parallel: background tasks and a dependency-aware parallel work queue over MCP.

The names in ``__all__`` are the library's public API; everything else may change. They are
imported on first use, so ``import agent_parallel`` stays cheap (the watchdog subprocess imports
``agent_parallel.tasks.watchdog`` and must not load the MCP SDK).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    # the MCP server
    "build_server": "server", "ServerSettings": "server",
    # errors (see errors.py for the tree)
    "AgentParallelError": "errors", "UsageError": "errors", "PathOutsideWorkspace": "errors",
    "UnknownTask": "errors", "QueueError": "errors", "ResourceLimitError": "errors", "InternalError": "errors",
    "StorageError": "errors", "ShuttingDown": "errors", "ConfigError": "config",
    # configuration
    "Config": "config", "load_config": "config",
    # the task engine
    "TaskRegistry": "tasks.registry", "RegistrySettings": "tasks.registry", "open_registry": "tasks.registry",
    "Task": "tasks.registry", "TaskRecord": "tasks.records", "TaskStatus": "tasks.records", "TaskState": "tasks.records",
    "Outcome": "tasks.records",
    "Executor": "tasks.executor", "LocalExecutor": "tasks.executor", "TaskHandle": "tasks.executor",
    "LaunchSpec": "tasks.executor", "ExitInfo": "tasks.executor", "SpawnError": "tasks.executor",
    "ExecutorError": "tasks.executor", "Job": "tasks.registry",
    "FakeExecutor": "tasks.fake", "FakeOutcome": "tasks.fake",
    # the work queue
    "QueueReader": "queue.items", "WorkItem": "queue.items", "Diagnostic": "queue.items",
    "make_plan": "queue.planner", "QueuePlan": "queue.planner", "plan_workspace": "queue.plan",
}

__all__ = ["__version__", *_HOMES]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'agent_parallel' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


if TYPE_CHECKING:
    from .config import Config as Config, ConfigError as ConfigError, load_config as load_config
    from .errors import (AgentParallelError as AgentParallelError, InternalError as InternalError,
                         PathOutsideWorkspace as PathOutsideWorkspace, QueueError as QueueError,
                         ResourceLimitError as ResourceLimitError, ShuttingDown as ShuttingDown,
                         StorageError as StorageError, UnknownTask as UnknownTask, UsageError as UsageError)
    from .queue.items import Diagnostic as Diagnostic, QueueReader as QueueReader, WorkItem as WorkItem
    from .queue.plan import plan_workspace as plan_workspace
    from .queue.planner import QueuePlan as QueuePlan, make_plan as make_plan
    from .server import ServerSettings as ServerSettings, build_server as build_server
    from .tasks.executor import (Executor as Executor, ExecutorError as ExecutorError, ExitInfo as ExitInfo,
                                 LaunchSpec as LaunchSpec, LocalExecutor as LocalExecutor, SpawnError as SpawnError,
                                 TaskHandle as TaskHandle)
    from .tasks.fake import FakeExecutor as FakeExecutor, FakeOutcome as FakeOutcome
    from .tasks.records import (Outcome as Outcome, TaskRecord as TaskRecord, TaskState as TaskState,
                                TaskStatus as TaskStatus)
    from .tasks.registry import (Job as Job, RegistrySettings as RegistrySettings, Task as Task,
                                 TaskRegistry as TaskRegistry, open_registry as open_registry)
