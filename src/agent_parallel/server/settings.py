"""What one server runs with: its limits (``ServerSettings``, from the config) and the
``Workspace`` every tool call and resource read gets (root, settings, registry, queue cache)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mcp.server.mcpserver import Context

from ..errors import InternalError, UsageError
from ..config import Config, load_config
from ..queue.items import QueueReader
from ..queue.run import QueueContext
from ..tasks.admission import admission_check
from ..tasks.registry import RegistrySettings, TaskRegistry

MAX_WAIT_CAP_S = 3600.0
"""The longest a blocking call may wait: far above any client's tool-call timeout."""


@dataclass
class ServerSettings:
    """Limits of one server; defaults are what a user gets without configuration."""

    wait_cap_s: float = 50.0  # below common client tool-call timeouts
    log_cap_bytes: int = 64 << 20
    kill_grace_s: float = 2.0
    max_running: int = 256
    max_records: int = 10_000
    min_free_memory: int = 0  # bytes; 0: never hold a start for memory
    max_load: float | None = None  # None: never hold a start for load

    def __post_init__(self) -> None:
        self.wait_cap_s = check_wait_cap(self.wait_cap_s)

    def registry_settings(self) -> RegistrySettings:
        return RegistrySettings(log_cap_bytes=self.log_cap_bytes, kill_grace_s=self.kill_grace_s,
                                max_running=self.max_running, max_records=self.max_records,
                                admission=admission_check(self.min_free_memory, self.max_load))

    @classmethod
    def from_config(cls, config: Config) -> ServerSettings:
        return cls(wait_cap_s=config.wait_cap_s, log_cap_bytes=config.log_cap_bytes, max_records=config.max_tasks,
                   min_free_memory=config.min_free_memory, max_load=config.max_load)


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
