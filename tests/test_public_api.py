"""The library's public names: importable from ``agent_parallel`` itself, without a heavy import."""

import subprocess
import sys

import pytest

import agent_parallel

PUBLIC = [
    "__version__",
    "build_server", "ServerSettings",
    "AgentParallelError", "UsageError", "PathOutsideWorkspace", "UnknownTask", "QueueError", "ResourceLimitError",
    "InternalError", "ConfigError",
    "Config", "load_config",
    "TaskRegistry", "RegistrySettings", "open_registry", "Task", "TaskRecord", "TaskStatus",
    "Executor", "LocalExecutor", "TaskHandle", "LaunchSpec", "ExitInfo", "SpawnError",
    "ExecutorError", "Job", "FakeExecutor", "FakeOutcome",
    "QueueReader", "WorkItem", "Diagnostic", "make_plan", "QueuePlan", "plan_workspace",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_importable_from_the_package(name: str) -> None:
    namespace: dict = {}
    exec(f"from agent_parallel import {name}", namespace)
    value = namespace[name]
    assert value is getattr(agent_parallel, name)
    if name != "__version__":
        assert value.__module__.startswith("agent_parallel.")


def test_all_lists_exactly_the_public_names() -> None:
    assert sorted(agent_parallel.__all__) == sorted(PUBLIC)
    assert set(PUBLIC) <= set(dir(agent_parallel))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        agent_parallel.no_such_name  # noqa: B018


def test_importing_the_package_or_the_watchdog_stays_light() -> None:
    """The watchdog subprocess imports agent_parallel.tasks.watchdog: no MCP SDK, no pydantic."""
    code = ("import sys, agent_parallel, agent_parallel.tasks.watchdog; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'pydantic', 'anyio', 'rich')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
