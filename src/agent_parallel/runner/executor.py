"""How a task's process is started, awaited and stopped: the one place that touches subprocesses.

The registry talks to an ``Executor`` (start) and the ``TaskHandle`` it returns (wait,
terminate); another execution engine (a container, a remote host) only has to provide these.
``LocalExecutor`` runs ``/bin/sh -c COMMAND`` (or an argv) in its own session and process group,
stdin from /dev/null (or a file), stdout and stderr sharing one pipe that is drained into the
task's log as it is produced.

Stopping is always the whole process group: TERM, a grace period, KILL, then a check that no
live process of the group is left. When the command itself exits, whatever it left running in its
group is stopped the same way: a task's processes end with the task, none is left unseen.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
import anyio.lowlevel

from .logs import LogWriter
from .watchdog import Watchdog

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031
LEFTOVER_GRACE_S = 0.5  # leftovers of a finished command get this long to exit after TERM
DRAIN_AFTER_EXIT_S = 1.0  # how long to wait for an escaped process to release the output pipe


class SpawnError(Exception):
    """The process could not be started; the message says why (missing cwd, not executable...)."""


@dataclass
class LaunchSpec:
    """What to run. Exactly one of ``command`` (a shell line) and ``argv`` is set."""

    task_id: str
    cwd: Path
    command: str | None = None
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    stdin_path: Path | None = None  # fed to the process as stdin; /dev/null when None


@dataclass
class ExitInfo:
    exit_code: int | None  # None when killed by a signal
    signal: str | None  # e.g. "SIGKILL"


class TaskHandle(Protocol):
    pid: int | None
    start_time: int | None  # the process's start time (clock ticks since boot): tells a reused pid from ours

    async def wait(self) -> ExitInfo:
        """Return once the process has exited and its output is in the log. Safe to call again."""

    async def terminate(self, grace: float) -> None:
        """Stop everything the task started (TERM, ``grace`` seconds, KILL) and confirm it is gone."""


class Executor(Protocol):
    async def start(self, spec: LaunchSpec, log: LogWriter) -> TaskHandle:
        """Start the process; raise ``SpawnError`` if it cannot start."""

    def close(self) -> None:
        """Release what the executor holds (after every task has ended)."""


class LocalExecutor:
    """Runs tasks as local subprocesses.

    With ``guard=True`` a watchdog process stops every live task group if this process dies
    without cleaning up (see ``watchdog.py``).
    """

    def __init__(self, *, guard: bool = False) -> None:
        self._watchdog = Watchdog() if guard else None

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    async def start(self, spec: LaunchSpec, log: LogWriter) -> LocalHandle:
        argv = ["/bin/sh", "-c", spec.command] if spec.command is not None else list(spec.argv or [])
        env = {**os.environ, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1"), **spec.env}
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(rfd, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # a bigger pipe only means fewer wake-ups
        stdin = open(spec.stdin_path, "rb") if spec.stdin_path else subprocess.DEVNULL
        try:
            popen = subprocess.Popen(
                argv, cwd=spec.cwd, env=env, stdin=stdin, stdout=wfd, stderr=wfd,
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            os.close(rfd)
            raise SpawnError(f"could not start {argv[0]!r} in {spec.cwd}: {exc.strerror or exc}") from exc
        finally:
            os.close(wfd)
            if stdin is not subprocess.DEVNULL:
                stdin.close()
        if self._watchdog is not None:
            self._watchdog.watch(popen.pid)
        os.set_blocking(rfd, False)
        return LocalHandle(popen, rfd, log, self._watchdog)


class LocalHandle:
    """A running local process group and the pipe its output arrives on."""

    def __init__(self, popen: subprocess.Popen[bytes], read_fd: int, log: LogWriter,
                 watchdog: Watchdog | None = None) -> None:
        self.pid: int | None = popen.pid
        self.pgid = popen.pid  # start_new_session: the leader's pid is the group id
        self.start_time = process_start_time(popen.pid)
        self._watchdog = watchdog
        self._popen = popen
        self._rfd = read_fd
        self._log = log
        self._eof = anyio.Event()
        self._exit: ExitInfo | None = None
        self._pidfd = _pidfd_open(popen.pid)
        self._reaped = anyio.Event()

    async def wait(self) -> ExitInfo:
        if self._exit is None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drain)
                await self._wait_exit()
                await stop_group(self.pgid, LEFTOVER_GRACE_S)
                if self._watchdog is not None:
                    self._watchdog.forget(self.pgid)
                with anyio.move_on_after(DRAIN_AFTER_EXIT_S):
                    await self._eof.wait()
                tg.cancel_scope.cancel()
            self._finish_drain()
        assert self._exit is not None
        return self._exit

    async def terminate(self, grace: float) -> None:
        await stop_group(self.pgid, grace)

    async def _wait_exit(self) -> None:
        if self._pidfd is not None:
            await anyio.wait_readable(self._pidfd)
            code = self._popen.wait()
            os.close(self._pidfd)
            self._pidfd = None
        else:  # kernels without pidfd: a worker thread waits instead
            code = await anyio.to_thread.run_sync(self._popen.wait, abandon_on_cancel=True)
        self._exit = ExitInfo(code, None) if code >= 0 else ExitInfo(None, signal.Signals(-code).name)

    async def _drain(self) -> None:
        while True:
            try:
                while self._log.absorb(self._rfd):
                    await anyio.lowlevel.checkpoint()
                self._eof.set()
                return
            except BlockingIOError:
                await anyio.wait_readable(self._rfd)
            except OSError as exc:  # the log cannot be written (disk full...): stop the task visibly
                self._log.error = f"could not write the task's log: {exc.strerror or exc}"
                await stop_group(self.pgid, LEFTOVER_GRACE_S)
                self._eof.set()
                return

    def _finish_drain(self) -> None:
        """Take what is still in the pipe without waiting, then close it."""
        if self._rfd < 0:
            return
        try:
            while self._log.absorb(self._rfd):
                pass
        except OSError:  # empty (BlockingIOError), or the log is failing: already recorded
            pass
        finally:
            os.close(self._rfd)
            self._rfd = -1


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


async def stop_group(pgid: int, grace: float) -> None:
    """TERM the process group, give it ``grace`` seconds, KILL what is left, and confirm it is gone."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    if await _wait_group_gone(pgid, grace):
        return
    _signal_group(pgid, signal.SIGKILL)
    if not await _wait_group_gone(pgid, 5.0):
        log.error("process group %d still has live processes after SIGKILL", pgid)


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to the group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # only zombies or foreign processes: nothing we may signal is left
        return False


async def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Poll (briefly, with back-off) until no live process is in the group.

    There is no event for the death of processes that are not our children, so this is
    the one place that polls; it only runs while a group is being stopped.
    """
    delay = 0.002
    with anyio.move_on_after(timeout):
        while group_alive(pgid):
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True
    return not group_alive(pgid)


def group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process belongs to group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # killpg also succeeds for zombies waiting to be reaped by someone else: look closer.
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] != b"Z":
                return True
    return False


def kill_stale_group(pgid: int, leader_start: int | None) -> bool:
    """After a crash: KILL what is left of a recorded task group, if it is provably ours.

    Ours means the leader is alive with the recorded start time, or (leader gone) members that
    started no earlier than it. A pid reused by someone else is never signalled.
    """
    if leader_start is None:
        return False
    leader = process_start_time(pgid)
    if leader is not None and leader != leader_start:
        return False  # the pid now belongs to another process
    victims = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] != b"Z" and int(fields[19]) >= leader_start:
                victims.append(int(entry.name))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return bool(victims)


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], pgrp [2], starttime [19])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (to tell a reused pid from ours)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


__all__ = ["Executor", "TaskHandle", "LaunchSpec", "ExitInfo", "SpawnError", "LocalExecutor", "stop_group",
           "group_alive", "kill_stale_group", "process_start_time"]
