"""The library's public names: importable from ``agent_parallel`` itself, without a heavy import."""

import subprocess
import sys

import pytest

import agent_parallel

PUBLIC = [
    "__version__",
    "build_server", "ServerSettings",
    "AgentParallelError", "UsageError", "PathOutsideWorkspace", "UnknownTask", "QueueError", "ResourceLimitError",
    "InternalError", "ConfigError", "StorageError", "ShuttingDown",
    "Config", "load_config",
    "TaskRegistry", "RegistrySettings", "open_registry", "Task", "TaskRecord", "TaskStatus", "TaskState", "Outcome",
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
    if name not in ("__version__", "TaskState", "Outcome"):  # the last two are type aliases (unions)
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


def test_claiming_items_stays_light() -> None:
    """A process that only claims items (queue.claims, e.g. fifty claimants racing) loads no pydantic or YAML."""
    code = ("import sys, agent_parallel.queue.claims; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'pydantic', 'yaml', 'anyio', 'rich')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_error_class_is_in_the_tree_errors_py_draws() -> None:
    """Each exception class of the package derives from AgentParallelError and is drawn in errors.py's
    docstring, so a reader of that one file knows every error the package raises."""
    import importlib
    import inspect
    import pkgutil

    from agent_parallel import errors

    found = {}
    for info in pkgutil.walk_packages(agent_parallel.__path__, "agent_parallel."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                found[name] = value
    public = {name: cls for name, cls in found.items() if not name.startswith("_")}
    assert len(public) >= 14, sorted(public)
    for name, cls in public.items():
        assert issubclass(cls, errors.AgentParallelError), f"{name} ({cls.__module__}) is outside the error tree"
        drawn = f"── {name} " in errors.__doc__ or f"\n    {name}\n" in errors.__doc__
        assert drawn, f"{name} is not drawn in errors.py's docstring"
