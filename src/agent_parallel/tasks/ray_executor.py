"""``RayExecutor``: tasks run as Ray tasks on a cluster (``agent-parallel[ray]``), behind ``Executor``.

Each task is one Ray streaming-generator task (``ray_worker.run_command``) that runs the command
in its own process group on whichever node Ray picks and streams its output back in chunks,
written here into the task's own capped log (so paging, tails, filters, waits, ``after`` and
``AGENT_UPSTREAM_LOGS`` work as with ``LocalExecutor``); the exit code comes with the last
item. We measured Ray core this way at about 4 ms per launch and 2 ms from a command's end to
the server knowing it; the Jobs API, Dask and Celery were slower or could not kill a tree.

- Concurrency: every task takes one unit of the custom resource ``agent_slot``; the cluster's
  nodes declare how many they run at once, so the limit holds cluster-wide. A task's own
  ``resources`` (``CPU``, ``GPU``, ``memory``, custom ones) go to Ray as they are; a task no node
  could ever hold is refused at start (Ray would hold it forever). Commands take no CPU of Ray's
  by default (they are processes of their own, not Ray work).
- Stopping (cancel, timeout, shutdown): ``ray_worker.stop_task_now`` runs on the task's node
  (TERM to its group and to every process carrying its ``AGENT_TASK_ID``, grace, KILL, verify);
  if the Ray task still has not ended, ``ray.cancel(force=True)`` kills its worker, whose
  watchdog stops what is left. If the server dies, Ray kills the workers it owns the same way.
- A node lost mid-task fails the task with a reason starting "node lost" (never a hang, never a
  success); Ray's own retries are off (``max_retries=0``): a command runs at most once per launch.
- Without an address a local Ray instance is started (and stopped with the executor): bound to
  loopback, usage stats off, no dashboard, token auth on with a fresh token; its processes carry
  a marker in their environment that a watchdog of the server's uses to stop them all if the
  server dies without stopping it.

Ray needs the asyncio backend of anyio (the server's default).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import anyio

from ..errors import UsageError
from . import ray_worker
from .executor import ExecutorError, ExitInfo, LaunchSpec, SpawnError, check_launch_strings
from .logs import LogWriter
from .processes import TASK_ID_VAR
from .watchdog import Watchdog

log = logging.getLogger(__name__)

SLOT = "agent_slot"
RAY_MISSING = ("--executor ray needs Ray, which is not installed: install agent-parallel[ray] "
               "(pip install 'agent-parallel[ray]'), or use the local executor")
STREAM_BACKPRESSURE = 256  # output items a task may have in flight before its worker waits for us
STOP_EXTRA_S = 15.0  # on top of the grace: the longest a stop on the node may take before a force cancel
END_AFTER_STOP_S = 2.0  # after the stop on the node, how long the Ray task gets to end before a force cancel
NODES_TTL_S = 2.0  # how long a look at the cluster's nodes is reused (for the feasibility check)
_RESOURCE_OPTIONS = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


def ray_available() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as none
        return False


def require_ray() -> None:
    """Raise ``UsageError`` saying how to get Ray, before anything starts, when it is missing."""
    if not ray_available():
        raise UsageError(RAY_MISSING)


@dataclass
class NodeInfo:
    node_id: str
    host: str
    resources: dict[str, float]


class RayExecutor:
    """Runs tasks on a Ray cluster: the one at ``address``, the one this process is already connected
    to, or (``address=None``) a local instance with ``slots`` agent slots, started here."""

    def __init__(self, *, address: str | None = None, slots: int = 5) -> None:
        require_ray()
        self._owned = False
        self._guard: Watchdog | None = None
        self._nodes: tuple[float, list[NodeInfo]] = (-math.inf, [])
        _ray_env(local=address is None)
        # untyped on purpose: the same type check with and without Ray installed
        try:
            ray: Any = importlib.import_module("ray")
        except ImportError as exc:
            raise UsageError(f"{RAY_MISSING} ({exc})") from exc
        self.ray = ray
        if not ray.is_initialized():
            if address is None:
                self._start_local(slots)
            else:
                try:
                    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
                except Exception as exc:
                    raise UsageError(f"could not join the Ray cluster at {address}: {exc}; check the address "
                                     "(the head's GCS, e.g. HOST:6379) and that RAY_AUTH_TOKEN (or "
                                     "~/.ray/auth_token) holds the cluster's token") from exc
                self._owned = True
        if not ray.cluster_resources().get(SLOT):
            self.close()
            raise UsageError(f"the Ray cluster has no {SLOT} resource, so no task could start: start each node with "
                             f"`ray start ... --resources='{{\"{SLOT}\": N}}'` (N: the most tasks it runs at once)")
        self._run = ray.remote(num_returns="streaming", max_retries=0, retry_exceptions=False,
                               _generator_backpressure_num_objects=STREAM_BACKPRESSURE)(ray_worker.run_command)
        self._stop = ray.remote(num_cpus=0, max_retries=0)(ray_worker.stop_task_now)

    def _start_local(self, slots: int) -> None:
        """A Ray instance for this server alone: loopback, token auth, no dashboard. Its processes
        carry ``AGENT_TASK_ID=<marker>``, which our watchdog stops if this process dies first."""
        if os.environ.get("RAY_AUTH_MODE", "token") != "token":
            log.warning("RAY_AUTH_MODE is %s: the local Ray instance starts without token authentication",
                        os.environ["RAY_AUTH_MODE"])
        elif not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # Ray turns token auth on for a new local instance
        marker = f"ray-instance-{secrets.token_hex(6)}"
        self._guard = Watchdog()
        self._guard.watch(0, marker)  # group 0 is never signalled: only the processes carrying the marker
        before = os.environ.get(TASK_ID_VAR)
        os.environ[TASK_ID_VAR] = marker
        try:
            self.ray.init(address="local", resources={SLOT: slots}, include_dashboard=False, logging_level=logging.WARNING,
                          log_to_driver=False)
        except Exception as exc:
            self.close()
            raise UsageError(f"could not start a local Ray instance: {exc}") from exc
        finally:
            if before is None:
                os.environ.pop(TASK_ID_VAR, None)
            else:
                os.environ[TASK_ID_VAR] = before
        self._owned = True

    def close(self) -> None:
        if self._owned:
            self._owned = False
            try:
                self.ray.shutdown()
            except Exception:
                log.exception("could not stop Ray cleanly")
        if self._guard is not None:
            self._guard.close()  # stops what is left of the local instance
            self._guard = None

    async def start(self, spec: LaunchSpec, log: LogWriter) -> RayHandle:
        if problem := check_launch_strings(spec):
            raise SpawnError(f"cannot start the task: {problem}")
        options = await self._options(spec.resources)
        payload = {"cwd": str(spec.cwd), "command": spec.command, "argv": spec.argv, "env": dict(spec.env),
                   "stdin_path": str(spec.stdin_path) if spec.stdin_path is not None else None}
        try:
            stream = self._run.options(**options).remote(payload)
        except Exception as exc:  # Ray refused the options or is gone
            raise SpawnError(f"Ray could not take the task: {exc}") from exc
        return RayHandle(self, stream, log, spec.task_id)

    async def _options(self, resources: dict[str, float]) -> dict[str, Any]:
        """Ray options for a task asking for ``resources``; ``SpawnError`` when no node could hold it."""
        options: dict[str, Any] = {"num_cpus": 0, "resources": {SLOT: 1}}
        for name, amount in resources.items():
            if name in _RESOURCE_OPTIONS:
                options[_RESOURCE_OPTIONS[name]] = amount
            else:
                options["resources"][name] = amount
        if resources:
            nodes = await self.nodes()
            want = {**resources, SLOT: 1}
            if not any(all(n.resources.get(k, 0) >= v for k, v in want.items()) for n in nodes):
                shown = ", ".join(f"{k}: {v:g}" for k, v in resources.items())
                offered = "; ".join(f"{n.host}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(n.resources.items())
                                                             if not k.startswith("node:") and k != "object_store_memory")
                                    for n in nodes[:5])
                raise SpawnError(f"no node of the Ray cluster can hold a task asking for {shown} (nodes: {offered}); "
                                 "add a node with those resources, or lower the item's resources")
        return options

    async def nodes(self, *, fresh: bool = False) -> list[NodeInfo]:
        """The cluster's live nodes (a look at most ``NODES_TTL_S`` old unless ``fresh``)."""
        taken, nodes = self._nodes
        if fresh or time.monotonic() - taken > NODES_TTL_S:
            raw = await anyio.to_thread.run_sync(self.ray.nodes)
            nodes = [NodeInfo(n["NodeID"], n.get("NodeManagerHostname") or n.get("NodeManagerAddress", "?"),
                              dict(n.get("Resources", {}))) for n in raw if n.get("Alive")]
            self._nodes = (time.monotonic(), nodes)
        return nodes

    async def stop_on_node(self, node_id: str, task_id: str, pgid: int, since: int | None, grace: float) -> list[int]:
        """Run ``ray_worker.stop_task_now`` on the node: what is left of the task there (pids)."""
        strategies = importlib.import_module("ray.util.scheduling_strategies")
        on_node = strategies.NodeAffinitySchedulingStrategy(node_id, soft=False)
        ref = self._stop.options(scheduling_strategy=on_node).remote(
            task_id, pgid, since, grace)
        result: list[int] = await ref
        return result


def _ray_env(*, local: bool) -> None:
    """Environment Ray reads when imported: no usage statistics sent; for a local instance, the
    loopback address (else Ray binds the machine's external address on Linux)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class RayHandle:
    """A task running (or held) on the cluster, and the stream its output and exit come back on."""

    pid: int | None = None  # the command's pid is one of a remote node: not ours to signal
    start_time: int | None = None

    def __init__(self, executor: RayExecutor, stream: Any, log: LogWriter, task_id: str) -> None:
        self.survivors: list[int] = []
        self.node: str | None = None  # "host (node id)" once the command runs
        self._executor, self._stream, self._log, self.task_id = executor, stream, log, task_id
        self._ref: Any = None  # the stream item being read (kept when a read is cancelled half-way)
        self._exit: ExitInfo | None = None
        self._node_id: str | None = None
        self._pgid: int | None = None
        self._since: int | None = None
        self._stopping = False

    async def wait(self) -> ExitInfo:
        ray = self._executor.ray
        while self._exit is None:
            try:
                if self._ref is None:
                    self._ref = await self._stream.__anext__()
                item = await self._ref
            except StopAsyncIteration:
                raise ExecutorError("the Ray task ended without reporting its exit (a bug)") from None
            except ray.exceptions.RayError as exc:
                self._ref = None
                await self._failed(exc)
                break
            self._ref = None
            self._take(item)
        assert self._exit is not None
        return self._exit

    def _take(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "out":
            try:
                self._log.write(item[1])
            except OSError as exc:  # the log cannot be written: the task fails with this reason when it ends
                if not self._log.error:
                    self._log.error = f"could not write the task's log: {exc.strerror or exc}"
        elif kind == "started":
            _, pid, since, node_id, host = item
            self._pgid, self._since, self._node_id = pid, since, node_id
            self.node = f"{host} ({node_id[:12]})"
        elif kind == "exit":
            _, code, sig, survivors = item
            self.survivors = list(survivors)
            self._exit = ExitInfo(code, sig)
        elif kind == "refused":
            self._exit = ExitInfo(None, None)
            raise SpawnError(item[1])

    async def _failed(self, exc: BaseException) -> None:
        """The Ray task failed (its worker or node died, or it was force-cancelled): how it ended."""
        ray = self._executor.ray
        if self._stopping:  # we stopped it: the registry says cancelled / timed out
            self._exit = ExitInfo(None, "SIGKILL")
            return
        node_lost = isinstance(exc, ray.exceptions.NodeDiedError)
        if not node_lost and self._node_id is not None:
            with anyio.move_on_after(5):
                live = {n.node_id for n in await self._executor.nodes(fresh=True)}
                node_lost = self._node_id not in live
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = self.node or "its node"
        self._exit = ExitInfo(None, None)
        if node_lost:
            raise ExecutorError(f"node lost: Ray node {where} left the cluster while the task ran; it may have "
                                f"been partly done ({type(exc).__name__})")
        raise ExecutorError(f"the Ray task failed on {where}: {type(exc).__name__}: {first}")

    async def terminate(self, grace: float) -> None:
        if self._exit is not None:
            return
        self._stopping = True
        ray = self._executor.ray
        if self._node_id is not None and self._pgid is not None:
            try:
                with anyio.fail_after(grace + STOP_EXTRA_S):
                    self.survivors = await self._executor.stop_on_node(
                        self._node_id, self.task_id, self._pgid, self._since, grace)
            except (TimeoutError, ray.exceptions.RayError) as exc:
                log.warning("task %s: could not stop it on %s: %s; cancelling its Ray task", self.task_id, self.node,
                            exc)
            with anyio.move_on_after(END_AFTER_STOP_S):
                try:
                    await self._stream.completed()  # the Ray task ends once the command is gone
                except ray.exceptions.RayError:
                    pass
                return
        try:
            ray.cancel(self._stream, force=True)
        except Exception as exc:
            raise ExecutorError(f"could not cancel the task's Ray task: {exc}") from exc
