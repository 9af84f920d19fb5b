"""What runs on a Ray node for the ``RayExecutor``: one command per task, and the stop of a task.

Imported inside Ray workers (every node needs agent-parallel installed, like Ray itself), never
by the server's own code paths except to hand these functions to ``ray.remote``; it does not
import Ray. ``run_command`` is a streaming generator: it starts the command in its own session
and process group (stdout and stderr on one pipe, stdin from /dev/null or a file) and yields

- ``("refused", text)`` when it cannot start (the cwd is missing on this node...), and nothing more;
- ``("started", pid, start_time, node_id, host)`` once the command runs;
- ``("out", bytes)`` for output, as it is produced (each read of the pipe, at most ``CHUNK``);
- ``("exit", exit_code, signal_name, survivors)`` last, once the command and whatever it left
  running are gone (survivors: pids still alive after SIGKILL).

Like ``LocalExecutor``, the worker is the child subreaper (escaped descendants are reparented to
it, so what a command left running is found cheaply and stopped when the command exits) and a
watchdog process per worker stops every live command if the worker dies (force cancel, a lost
driver): a task's processes end with its Ray task. ``stop_task_now`` is the stop the executor
runs on a task's node (TERM to its group and to every process carrying its ``AGENT_TASK_ID``,
grace, KILL, verify): it reaches descendants that left the group too.
"""

from __future__ import annotations

import importlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import processes
from .watchdog import Watchdog

CHUNK = 64 * 1024  # one streamed item at most: small enough to travel inline with its Ray reference
LEFTOVER_GRACE_S = 0.5
DRAIN_AFTER_EXIT_S = 1.0
HIDDEN_ENV = ("RAY_AUTH_TOKEN",)  # the cluster's secret is not handed to commands

_watchdog: Watchdog | None = None


class _DetachedWatchdog(Watchdog):
    """A ``Watchdog`` that is not our child: when a Ray worker exits, Ray kills its children (this
    guard among them), so it is started through a process that forks it off and exits at once."""

    def __init__(self) -> None:
        self._proc = processes.spawn(lambda: subprocess.Popen(
            [sys.executable, "-m", "agent_parallel.tasks.ray_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True))
        self.pid = self._proc.pid
        self._proc.wait()  # the go-between; the guard itself now belongs to init
        processes.forget_child(self._proc.pid)


def _guard() -> Watchdog:
    """This worker's watchdog (started once per worker process), then its subreaper role (after:
    else the guard would be reparented to this worker)."""
    global _watchdog
    if _watchdog is None:
        _watchdog = _DetachedWatchdog()
        processes.become_subreaper()
    return _watchdog


def run_command(spec: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    """Run one task's command on this node; see the module docstring for what it yields."""
    node_id: str = importlib.import_module("ray").get_runtime_context().get_node_id()  # in a worker: Ray is there
    host = socket.gethostname()
    cwd = spec["cwd"]
    if not os.path.isdir(cwd):
        yield ("refused", f"its cwd {cwd} does not exist on Ray node {host} ({node_id[:12]}); commands run in the "
                          "same path on every node: put the workspace on a shared filesystem at the same path")
        return
    argv = ["/bin/sh", "-c", spec["command"]] if spec.get("command") is not None else list(spec["argv"])
    env = {k: v for k, v in os.environ.items() if k not in HIDDEN_ENV} | spec["env"]
    env.setdefault("PYTHONUNBUFFERED", "1")
    watchdog = _guard()
    task_id = spec["env"].get(processes.TASK_ID_VAR, "")
    watchdog.watch(0, task_id)  # before it runs: a worker killed before the group is sent spares none
    stdin = -1
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        if spec.get("stdin_path") is not None:
            stdin = processes.open_stdin(spec["stdin_path"])
        popen = processes.spawn(lambda: subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=stdin if stdin >= 0 else subprocess.DEVNULL, stdout=wfd, stderr=wfd,
            start_new_session=True, close_fds=True))
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        os.close(rfd)
        watchdog.forget(0, task_id)
        cause = f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
        yield ("refused", f"could not start {argv[0]!r} in {cwd} on Ray node {host} ({node_id[:12]}): {cause}")
        return
    finally:
        os.close(wfd)
        if stdin >= 0:
            os.close(stdin)
    pgid = popen.pid
    since = processes.process_start_time(pgid)
    watchdog.watch(pgid, task_id)
    yield ("started", popen.pid, since, node_id, host)
    survivors: list[int] = []
    try:
        yield from _follow(popen, rfd)
        if processes.may_have_left_processes(pgid, task_id):
            survivors = stop_task_now(task_id, pgid, since, LEFTOVER_GRACE_S)
        yield from _drain(rfd)
    finally:
        os.close(rfd)
        if not survivors:
            watchdog.forget(pgid, task_id)
    code = popen.returncode
    yield ("exit", code if code >= 0 else None, signal.Signals(-code).name if code < 0 else None, survivors)


def _follow(popen: subprocess.Popen[bytes], rfd: int) -> Iterator[tuple[Any, ...]]:
    """Yield output until the command exits (a pidfd says when), then reap it."""
    pidfd = os.pidfd_open(popen.pid)
    with selectors.DefaultSelector() as sel:
        sel.register(rfd, selectors.EVENT_READ, "out")
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "exit":
                        processes.wait_child(popen)
                        return
                    data = os.read(rfd, CHUNK)
                    if data:
                        yield ("out", data)
                    else:  # EOF: everything holding the pipe is gone; the exit comes next
                        sel.unregister(rfd)
        finally:
            os.close(pidfd)


def _drain(rfd: int) -> Iterator[tuple[Any, ...]]:
    """What is left in the pipe once the command exited; escaped holders of it get a bounded wait."""
    deadline = time.monotonic() + DRAIN_AFTER_EXIT_S
    with selectors.DefaultSelector() as sel:
        sel.register(rfd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            data = os.read(rfd, CHUNK)
            if not data:
                return
            yield ("out", data)


def stop_task_now(task_id: str, pgid: int | None, since: int | None, grace: float) -> list[int]:
    """TERM the task's group and every process carrying its ``AGENT_TASK_ID`` on this node, wait up to
    ``grace`` seconds, KILL what is left (in rounds, for anything forked meanwhile); the pids still
    alive after that (empty: verified gone). ``since`` (the command's start) excludes older processes."""
    mine_only = processes.is_subreaper()

    def signal_round(sig: signal.Signals) -> dict[int, int]:
        return processes.signal_task(task_id, pgid, since, sig, mine_only=mine_only)

    victims = signal_round(signal.SIGTERM)
    if victims and not processes.wait_gone(victims, grace):
        killed: dict[int, int] = {}
        for _ in range(processes.KILL_ROUNDS):
            victims = signal_round(signal.SIGKILL)
            if not victims or victims.keys() <= killed.keys():
                break
            killed.update(victims)
            processes.wait_gone(victims, processes.KILL_WAIT_S)
    snap = processes.scan(mine_only=mine_only)
    processes.reap_orphans(snap.orphans)
    return sorted(processes.task_members(snap, task_id, pgid, since=since))


def _fork_guard() -> None:
    """``python -m agent_parallel.tasks.ray_worker``: fork the watchdog's guard off and exit."""
    if os.fork() > 0:
        os._exit(0)
    from .watchdog import _guard as guard

    guard()


if __name__ == "__main__":
    _fork_guard()
