"""What one server runs with: its limits (``ServerSettings``, from the config) and the
``Workspace`` every tool call and resource read gets (root, settings, registry, queue cache)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from ..errors import AgentParallelError, InternalError, UsageError
from ..config import MAX_WAIT_CAP_S, Config, load_config
from ..queue.items import QueueReader
from ..queue.run import QueueContext
from ..tasks.admission import admission_check
from ..tasks.executor import Executor
from ..tasks.registry import RegistrySettings, TaskRegistry

if TYPE_CHECKING:
    from mcp.server.mcpserver import Context

log = logging.getLogger(__name__)

_CONFIG = Config()  # the one source of defaults for what the config file sets
_REGISTRY = RegistrySettings()  # ... and for what only the engine knows (grace, running cap)


@dataclass
class ServerSettings:
    """Limits of one server. The defaults are exactly what a user gets without a config file (they
    come from ``Config()``), so a test that wants laxer limits says so (``min_free_memory=0``)."""

    wait_cap_s: float = _CONFIG.wait_cap_s  # below common client tool-call timeouts
    log_cap_bytes: int = _CONFIG.log_cap_bytes
    kill_grace_s: float = _REGISTRY.kill_grace_s
    max_running: int = _REGISTRY.max_running
    max_records: int = _CONFIG.max_tasks
    min_free_memory: int = _CONFIG.min_free_memory  # bytes; 0: never hold a start for memory
    max_load: float | None = _CONFIG.max_load  # None: never hold a start for load
    executor: str = _CONFIG.executor  # "local" or "ray"
    ray_address: str | None = _CONFIG.ray_address  # None: a local Ray instance (executor "ray")
    ray_slots: int = _CONFIG.max_parallel  # agent slots of a local Ray instance: tasks it runs at once

    def __post_init__(self) -> None:
        self.wait_cap_s = check_wait_cap(self.wait_cap_s)
        if self.executor not in ("local", "ray"):
            raise UsageError(f"the executor must be local or ray, not {self.executor!r}")

    def registry_settings(self) -> RegistrySettings:
        # on Ray, memory and load are the nodes' business: Ray's scheduler places each task where it fits
        admission = None if self.executor == "ray" else admission_check(self.min_free_memory, self.max_load)
        return RegistrySettings(log_cap_bytes=self.log_cap_bytes, kill_grace_s=self.kill_grace_s,
                                max_running=self.max_running, max_records=self.max_records, admission=admission)

    def make_executor(self) -> Executor | None:
        """The executor these settings ask for: a ``RayExecutor`` (joining ``ray_address``, or starting a
        local Ray instance), or None for the registry's own ``LocalExecutor``. Blocking (Ray starts)."""
        if self.executor != "ray":
            return None
        from ..tasks.ray_executor import RayExecutor

        return RayExecutor(address=self.ray_address, slots=self.ray_slots)

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> ServerSettings:
        """The settings a config gives, with ``overrides`` (a command-line ``--wait-cap``) on top."""
        values: dict[str, Any] = dict(wait_cap_s=config.wait_cap_s, log_cap_bytes=config.log_cap_bytes,
                                      max_records=config.max_tasks, min_free_memory=config.min_free_memory,
                                      max_load=config.max_load, executor=config.executor,
                                      ray_address=config.ray_address, ray_slots=config.max_parallel)
        return cls(**(values | overrides))

    @classmethod
    def for_workspace(cls, root: Path, **overrides: Any) -> ServerSettings:
        """THE way the server and the CLI get their settings: from the workspace's config file, or
        the defaults (with a logged warning) when it cannot be used: a broken queue config must not
        stop background tasks."""
        try:
            config = load_config(root)[0]
        except AgentParallelError as exc:
            log.warning("%s; using the default settings", exc)
            return dataclasses.replace(cls(), **overrides)
        return cls.from_config(config, **overrides)


def check_wait_cap(value: float) -> float:
    """The wait cap, refused unless finite and in (0, MAX_WAIT_CAP_S]: a bad cap would make a blocking
    launch fail only after its task started (an agent retrying it would run it twice)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 < value <= MAX_WAIT_CAP_S:
        raise UsageError(f"the wait cap must be a number of seconds above 0 and at most {MAX_WAIT_CAP_S:g}, "
                         f"not {value!r}; the default is 50")
    return float(value)


@dataclass
class Workspace:
    """What every tool call needs: the root, the settings, the live registry and the queue cache."""

    root: Path
    settings: ServerSettings
    registry: TaskRegistry
    reader: QueueReader

    def queue(self) -> QueueContext:
        """The queue as configured now (the config is re-read, so edits apply without a restart)."""
        config, _ = load_config(self.root)
        return QueueContext(self.root, self.registry.runs_dir, config, self.registry, self.reader)


def workspace_of(ctx: Context) -> Workspace:
    ws = ctx.request_context.lifespan_context
    if not isinstance(ws, Workspace):
        raise InternalError("the server was built without its Workspace lifespan; build it with build_server()")
    return ws
