"""How a task's process is started, awaited and stopped: the one place that touches subprocesses.

The registry talks to an ``Executor`` (start) and the ``TaskHandle`` it returns (wait,
terminate); another execution engine (a container, a remote host) only has to provide these.
``LocalExecutor`` runs ``/bin/sh -c COMMAND`` (or an argv) in its own session and process group,
stdin from /dev/null (or a file), stdout and stderr sharing one pipe that is drained into the
task's log as it is produced. Every string bound for the process is checked first
(``check_launch_strings``), and every way a start can fail is a ``SpawnError`` saying why. No
``OSError`` leaves this interface: ``start``, ``wait`` and ``terminate`` translate each into an
``ExecutorError`` (``SpawnError`` for a start) whose message says what failed. ``fake.py`` has a
``FakeExecutor`` that runs no process, for tests of what lies above.

Stopping a task stops all of its processes, also those that left its group (``setsid``, double
fork): they are found by the ``AGENT_TASK_ID`` in their environment (see ``processes.py``).
TERM, a grace period, KILL, then a fresh look that confirms nothing is left; what survives KILL
is reported (``survivors``), never hidden. When the command itself exits, whatever it left
running is stopped the same way: a task's processes end with the task. Whether it left anything
is first asked cheaply (``processes.may_have_left_processes``: its group, and our children, as
the subreaper), so a task that left nothing costs no look through /proc; such looks happen in a
worker thread, never on the event loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio

from ..errors import AgentParallelError, os_error_text
from . import processes
from .logs import LogWriter
from .processes import process_start_time
from .watchdog import Watchdog

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031
LEFTOVER_GRACE_S = 0.5  # leftovers of a finished command get this long to exit after TERM
DRAIN_AFTER_EXIT_S = 1.0  # how long to wait for an escaped process to release the output pipe
FINAL_CHUNKS = 4  # chunks of output taken at once after the command exits (a pipe holds at most one)
MAX_ARG_BYTES = 128 * 1024  # MAX_ARG_STRLEN: the kernel refuses one argument or NAME=value this long (with its NUL)


class ExecutorError(AgentParallelError):
    """The executor could not do what was asked; the message says why (it becomes the task's reason)."""


class SpawnError(ExecutorError):
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
    resources: dict[str, float] = field(default_factory=dict)
    """What the task needs of a cluster node (``CPU``, ``GPU``, ``memory`` in bytes, custom names): only
    ``RayExecutor`` uses it; ``LocalExecutor`` runs on this machine whatever it asks."""


@dataclass
class ExitInfo:
    exit_code: int | None  # None when killed by a signal
    signal: str | None  # e.g. "SIGKILL"
    timed_out: bool = False  # a job's own timeout stopped it (an item attempt's `timeout`)


class TaskHandle(Protocol):
    pid: int | None
    start_time: int | None  # the process's start time (clock ticks since boot): tells a reused pid from ours
    survivors: list[int]  # pids of the task still alive after SIGKILL; empty once verified gone

    async def wait(self) -> ExitInfo:
        """Return once the process has exited and its output is in the log. Safe to call again.
        Raises ``ExecutorError`` (never a bare ``OSError``) when it cannot find out."""

    async def terminate(self, grace: float) -> None:
        """Stop everything the task started (TERM, ``grace`` seconds, KILL) and confirm it is gone.
        Raises ``ExecutorError`` (never a bare ``OSError``) when it cannot."""


class Executor(Protocol):
    async def start(self, spec: LaunchSpec, log: LogWriter) -> TaskHandle:
        """Start the process; raise ``SpawnError`` if it cannot start."""

    def close(self) -> None:
        """Release what the executor holds (after every task has ended)."""


def check_launch_strings(spec: LaunchSpec) -> str | None:
    """Why a string bound for the process cannot reach it intact, or None when all can.

    A NUL ends a C string (the kernel would see a different command, so it is refused, never
    cut); an env name with ``=`` would set another variable; one argument or ``NAME=value``
    entry of 128 KiB or more is refused by the kernel (E2BIG); text that cannot be encoded for
    the OS cannot be passed at all. Checked once in ``TaskRegistry.launch`` (a usage error) and
    again by the executor as its last guard.
    """

    if _plainly_fine(spec):  # the usual case, known in a few joins instead of a look at each string
        return None

    def bad(text: str, what: str, *, limit: bool = True) -> str | None:
        if text.isascii():  # (the common case, known without a scan) one byte per character: no encoding needed
            at, size = text.find("\0"), len(text)
        else:
            try:
                data = os.fsencode(text)
            except UnicodeEncodeError as exc:
                return (f"{what} contains a character that cannot be passed to a process "
                        f"({text[exc.start]!r} at position {exc.start}); remove it")
            at, size = data.find(b"\0"), len(data)
        if at >= 0:
            return f"{what} contains a NUL character (at byte {at}), which cannot be passed to a process; remove it"
        if limit:
            return too_long(what, size)
        return None

    def encoded_size(text: str) -> int:
        return len(text) if text.isascii() else len(os.fsencode(text))

    def too_long(what: str, size: int) -> str | None:
        if size < MAX_ARG_BYTES:
            return None
        return (f"{what} is {size} bytes; the kernel refuses a single argument or environment entry of "
                "128 KiB or more: pass long input through a file instead")

    def problems() -> Iterator[str | None]:
        """Each check in order; the first problem is the answer (a generator, so the checks after it
        are never run: a list re-scanned by ``any`` per variable made 64k variables take 40 s)."""
        if spec.command is not None:
            yield bad(spec.command, "command")
        for i, arg in enumerate(spec.argv or []):
            yield bad(arg, "the program name" if i == 0 else f"argument {i} of the command")
        yield bad(str(spec.cwd), "cwd", limit=False)
        if spec.stdin_path is not None:
            yield bad(str(spec.stdin_path), "the stdin file's path", limit=False)
        for name, value in spec.env.items():
            if not name:
                yield "an env name is empty; give every variable a name"
            elif "=" in name:
                yield f"env name {name!r} contains '=', which would set another variable; remove it"
            yield bad(name, f"env name {name!r}", limit=False)
            yield bad(value, f"env value of {name}", limit=False)
            yield too_long(f"env entry {name}=...", encoded_size(name) + 1 + encoded_size(value))

    return next((p for p in problems() if p), None)


def _plainly_fine(spec: LaunchSpec) -> bool:
    """True when ``check_launch_strings`` would find nothing, seen at once: every string ASCII (a byte a
    character) without NUL, every env name non-empty and without ``=``, and the longest argument or
    ``NAME=value`` entry under the kernel's limit. False says only "look closer"."""
    env, argv, command = spec.env, spec.argv or (), spec.command or ""
    names = "".join(env)
    joined = "".join((command, *argv, str(spec.cwd), str(spec.stdin_path or ""), names, *env.values()))
    if not joined.isascii() or "\0" in joined or "=" in names or not all(env):
        return False
    longest = max(len(command), max(map(len, argv), default=0),
                  max((len(name) + 1 + len(value) for name, value in env.items()), default=0))
    return longest < MAX_ARG_BYTES


def _environment() -> dict[bytes, bytes]:
    """This process's environment as it is now, in bytes: a copy of the dict behind ``os.environb``
    (which ``os.environ`` changes too). Iterating ``os.environb`` itself checks every name and value
    as it goes, some 180 Python calls for a usual environment: a tenth of a trivial task's spawn."""
    data = getattr(os.environb, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environb)


INLINE_STARTS = 8
"""Most starts ``start_batch(inline=True)`` makes on the event loop's thread in one call. A start there
holds the loop until the child has exec'd (vfork), some 0.3-0.45 ms here, so eight hold it ~3 ms at
most; a bigger batch goes to a worker thread. Why on the loop at all: a trivial queue run's items
start in small batches (the slots its ends freed), and the hop to a worker thread and back (two
context switches, ~0.14 ms of CPU on these VMs) with the worker's `Popen` contending for the GIL
cost more than the starts (``ab_run.py`` on tmpfs, 8 pairs twice, each pair favouring it: CPU per item
0.84 -> 0.74 and 0.64 -> 0.57 ms, makespan 0.345 -> 0.310 and 0.280 -> 0.250 s; a fan-out's CPU
0.44 -> 0.38 ms, 6 of 6 pairs). Only starts submitted as others ended go here (``Lane.submit``):
one made with a ``launch_task`` would hold up its answer."""


class LocalExecutor:
    """Runs tasks as local subprocesses.

    With ``guard=True`` this process becomes the child subreaper (escaped descendants are
    reparented to it, so they can be found and reaped) and a watchdog process stops every live
    task if this process dies without cleaning up (see ``watchdog.py``). The watchdog is started
    with the first task: a server that never runs one (it plans, it answers) needs none, and a
    Python process costs some 50 ms of CPU to start.
    """

    def __init__(self, *, guard: bool = False) -> None:
        self._subreaper = guard and processes.become_subreaper()
        self._guarded = guard
        self._watchdog: Watchdog | None = None
        self._watchdog_lock = threading.Lock()
        self._closed = False
        self._null_fd = -1
        self._null_lock = threading.Lock()

    def _devnull(self) -> int:
        """``/dev/null`` for the tasks' stdin, opened once (Popen's ``DEVNULL`` opens and closes it
        at every start; several worker threads may start tasks at once)."""
        with self._null_lock:
            if self._null_fd < 0:
                self._null_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            return self._null_fd

    def close(self) -> None:
        with self._null_lock:
            if self._null_fd >= 0:
                os.close(self._null_fd)
                self._null_fd = -1
        with self._watchdog_lock:
            watchdog, self._watchdog, self._closed = self._watchdog, None, True
        if watchdog is not None:
            watchdog.close()
        if self._subreaper:
            processes.release_subreaper()
            self._subreaper = False

    def start_guard(self) -> None:
        """Start the watchdog now, not with the first task (``serve``: a server about to serve will run
        tasks, and its first one should neither wait for the guard nor share the CPU with its start-up).
        Blocking (a worker thread); one that cannot start is left to the first task, which then fails
        saying why."""
        try:
            self._guardian()
        except SpawnError as exc:
            log.warning("%s", exc)

    async def start(self, spec: LaunchSpec, log: LogWriter) -> LocalHandle:
        [(started, _)] = await self.start_batch([(spec, lambda: log)])
        if isinstance(started, Exception):
            raise started
        return started

    async def start_batch(self, batch: list[tuple[LaunchSpec, Callable[[], LogWriter]]], *, inline: bool = False,
                          ) -> list[tuple[LocalHandle | Exception, LogWriter | None]]:
        """Start several tasks together (``lane.py``; ``start`` is a batch of one), as a rule in one
        worker thread: one hop for all, one wake-up of the watchdog, and each log created there
        (``open_log``: a new file costs up to half a millisecond on some file systems, which the event
        loop should not pay). Each gets its handle, or the exception that kept it from starting
        (``SpawnError``, or what ``open_log`` raised), with its log if made.

        A worker thread because the caller of fork/exec waits until the child has exec'd (vfork),
        which would hold the event loop for a good part of a millisecond per task. Shielded: a process
        once started is always handed back (a cancelled caller then stops it through its handle).

        The exception, ``inline``: the caller vouches that these starts can wait on nothing the event loop does not
        wait on already (``TaskRegistry._lane_submit``: a shell command in the workspace's root, no
        stdin file, a log made only with the first output); up to ``INLINE_STARTS`` of them are then
        made on the loop's thread, once the watchdog runs (its start is a Python process's)."""

        if inline and len(batch) <= INLINE_STARTS and self._guard_ready():
            started, watchdog = self.start_many_sync(batch)
        else:
            with anyio.CancelScope(shield=True):
                started, watchdog = await anyio.to_thread.run_sync(self.start_many_sync, batch)
        handles: list[tuple[LocalHandle | Exception, LogWriter | None]] = []
        for (one, log), (spec, _) in zip(started, batch, strict=True):
            if isinstance(one, _Started):
                assert log is not None  # (made before the start)
                handles.append((LocalHandle(one, log, spec.task_id, watchdog), log))
            else:
                handles.append((one, log))
        return handles

    def start_many_sync(self, batch: list[tuple[LaunchSpec, Callable[[], LogWriter]]],
                        ) -> tuple[list[tuple[_Started | Exception, LogWriter | None]], Watchdog | None]:
        """``start_batch``'s work, in the calling thread: each task's ``_Started`` or the exception that
        kept it from starting, with its log if made; the watchdog that guards them."""
        out: list[tuple[_Started | Exception, LogWriter | None]] = []
        try:
            watchdog = self._guardian()
        except SpawnError as exc:  # no task runs unguarded: this batch fails, the next one tries again
            return [(exc, None) for _ in batch], None
        if watchdog is not None:  # listed before any runs: a kill before the groups are sent spares none
            for spec, _ in batch:
                watchdog.watch(0, spec.task_id, flush=False)
            watchdog.flush()
        for spec, open_log in batch:
            log = None
            try:
                log = open_log()
                if problem := check_launch_strings(spec):
                    raise SpawnError(f"cannot start the task: {problem}")
                out.append((self._start_sync(spec, watchdog), log))
            except Exception as exc:  # that task fails, the others start
                if watchdog is not None:
                    watchdog.forget(0, spec.task_id)
                out.append((exc, log))
        if watchdog is not None:
            watchdog.flush()
        return out, watchdog

    def _guard_ready(self) -> bool:
        """Nothing is to be started before a task may start: unguarded, or the watchdog runs."""
        return not self._guarded or self._watchdog is not None

    def _guardian(self) -> Watchdog | None:
        """The watchdog, started by the first call (None when not guarded); ``SpawnError`` when it cannot
        be started (no process or file descriptor left...): the task must not run without it."""
        if not self._guarded:
            return None
        with self._watchdog_lock:
            if self._closed:
                raise SpawnError("the server is shutting down; launch the task again after it restarts")
            if self._watchdog is None:
                try:
                    self._watchdog = Watchdog()
                except (OSError, subprocess.SubprocessError) as exc:
                    cause = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
                    raise SpawnError(f"could not start the watchdog process that stops the task if the server "
                                     f"dies ({cause}); the task was not started, launch it again") from exc
            return self._watchdog

    def _start_sync(self, spec: LaunchSpec, watchdog: Watchdog | None = None) -> _Started:
        argv = ["/bin/sh", "-c", spec.command] if spec.command is not None else list(spec.argv or [])
        # bytes throughout: Popen takes them as they are
        env = {**_environment(), **{os.fsencode(k): os.fsencode(v) for k, v in spec.env.items()}}
        env.setdefault(b"PYTHONUNBUFFERED", b"1")
        rfd = wfd = stdin = -1
        try:
            rfd, wfd = os.pipe2(os.O_CLOEXEC)
            try:
                fcntl.fcntl(rfd, F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass  # a bigger pipe only means fewer wake-ups
            if spec.stdin_path is not None:
                stdin = processes.open_stdin(spec.stdin_path)
            before = processes.boottime_ns()
            popen = processes.spawn(lambda: subprocess.Popen(
                argv, cwd=spec.cwd, env=env, stdin=stdin if stdin >= 0 else self._devnull(),
                stdout=wfd, stderr=wfd, start_new_session=True, close_fds=True,
            ))
            after = processes.boottime_ns()
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            if rfd >= 0:
                os.close(rfd)
            cause = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            raise SpawnError(f"could not start {argv[0] if argv else 'the task'!r} in {spec.cwd}: {cause}") from exc
        finally:
            for fd in (wfd, stdin):
                if fd >= 0:
                    os.close(fd)
        try:
            os.set_blocking(rfd, False)
            if watchdog is not None:
                watchdog.watch(popen.pid, spec.task_id, flush=False)  # start_batch flushes
            return _Started(popen, rfd, processes.new_child_start_time(popen.pid, before, after),
                            _pidfd_open(popen.pid))
        except OSError as exc:  # started, but it cannot be followed: stop it rather than lose it
            processes.signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
            processes.forget_child(popen.pid)
            os.close(rfd)
            raise SpawnError(f"started {argv[0]!r} in {spec.cwd} but could not follow it: {os_error_text(exc)}; "
                             "it was killed") from exc


@dataclass
class _Started:
    """What ``LocalExecutor._start_sync`` hands back from the worker thread of ``start_batch``."""

    popen: subprocess.Popen[bytes]
    read_fd: int  # the read end of the output pipe (non-blocking)
    start_time: int | None
    pidfd: int | None


class LocalHandle:
    """A running local process group and the pipe its output arrives on."""

    def __init__(self, started: _Started, log: LogWriter, task_id: str, watchdog: Watchdog | None = None) -> None:
        popen = started.popen
        self.pid: int | None = popen.pid
        self.pgid = popen.pid  # start_new_session: the leader's pid is the group id
        self.task_id = task_id
        self.start_time = started.start_time
        self.survivors: list[int] = []
        self._watchdog = watchdog
        self._popen = popen
        self._rfd = started.read_fd
        self._log = log
        self._eof = anyio.Event()
        self._exit: ExitInfo | None = None
        self._pidfd = started.pidfd
        self._exit_wait: anyio.CancelScope | None = None
        self._leftovers = False  # the command exited and may have left processes: they are still to be stopped
        self._waited = False
        self._stops = 0  # stops in progress
        self._stopped = anyio.Event()  # set while no stop is in progress
        self._stopped.set()
        self._must_stop = False  # the log failed: the task is to be stopped (by the next ``wait``)
        self.on_stop: Callable[[], None] | None = None
        """Called (once) when a stop begins: the lane that follows this handle gives it up then."""

    async def wait(self) -> ExitInfo:
        try:
            return await self._wait()
        except OSError as exc:
            raise ExecutorError(f"could not wait for the task's process {self.pid}: {os_error_text(exc)}") from exc

    async def _wait(self) -> ExitInfo:
        await self._stop_if_log_failed()  # (it failed while the lane followed the task)
        if not self._waited:  # (a wait cancelled half-way, e.g. by a timeout, resumes where it was)
            if self._exit is None and self._pidfd is not None and self._stops == 0 \
                    and (exited := await self._follow()) is not None:
                self._leftovers = exited and self._may_have_left()
            if self._usual_end():
                self._end_usual()
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._drain)
                    if self._exit is None:
                        self._leftovers = await self._wait_exit() and self._may_have_left()
                    if self._leftovers:
                        self._leftovers = False
                        await self._stop(LEFTOVER_GRACE_S)
                    if not self._stopped.is_set():
                        await self._stopped.wait()  # a terminate() still killing: its verdict counts too
                    if self.survivors:  # look once more: the last word is what is alive now
                        self.survivors = await anyio.to_thread.run_sync(self._find_left)
                    if self._watchdog is not None and not self.survivors:
                        self._watchdog.forget(self.pgid, self.task_id)
                    if not self._eof.is_set():
                        with anyio.move_on_after(DRAIN_AFTER_EXIT_S):
                            await self._eof.wait()
                    tg.cancel_scope.cancel()
                self._finish_drain()
                self._waited = True
        assert self._exit is not None
        return self._exit

    def _usual_end(self) -> bool:
        """The command exited, its output ended, nothing of it is left running, and no stop is under way."""
        return self._exit is not None and not self._leftovers and self._eof.is_set() and self._stopped.is_set() \
            and not self.survivors and not self._must_stop

    def _end_usual(self) -> None:
        if self._watchdog is not None:
            self._watchdog.forget(self.pgid, self.task_id)
        self._finish_drain()
        self._waited = True

    # -- what the lane (``lane.py``) calls instead of ``wait``: it follows many handles on one epoll
    def lane_fds(self) -> tuple[int, int] | None:
        """The pidfd and the pipe's read end to watch (-1 once the output ended); None when this
        handle cannot be followed so (no pidfd, or a wait or stop has begun): ``wait`` must follow it."""
        if self._pidfd is None or self._exit is not None or self._stops or self._exit_wait is not None:
            return None
        return self._pidfd, -1 if self._eof.is_set() else self._rfd

    @property
    def log_failed(self) -> bool:
        """The log could not be written, and the task is still to be stopped (``wait`` does it)."""
        return self._must_stop

    def lane_output(self) -> bool:
        """The pipe is readable: move a chunk into the log. True once the output ended, or once the
        log failed (``wait`` then stops the task: the lane must hand it over)."""
        return self._absorb_now(1)

    def lane_exit(self) -> ExitInfo | None:
        """The pidfd is readable: reap the command. Its exit when this is the usual end (the handle is
        then spent, as after ``wait``); None when ``wait`` must finish the job (processes left behind, a
        stop under way, output still coming, a failed log)."""
        if not self._eof.is_set():  # what it wrote just before exiting (at most a pipe's worth)
            self._absorb_now(FINAL_CHUNKS)
        self._leftovers = self._exited(processes.wait_child(self._popen)) and self._may_have_left()
        if not self._usual_end():
            return None
        self._end_usual()
        return self._exit

    def _may_have_left(self) -> bool:
        """Whether the exited command may have left processes running (cheap: no /proc scan when
        none can be left)."""
        return processes.may_have_left_processes(self.pgid, self.task_id)

    async def terminate(self, grace: float) -> None:
        try:
            await self._stop(grace)
        except OSError as exc:
            raise ExecutorError(f"could not stop the task's processes (group {self.pgid}): {os_error_text(exc)}") from exc

    async def _stop(self, grace: float) -> None:
        if self.on_stop is not None:
            on_stop, self.on_stop = self.on_stop, None
            on_stop()
        if self._stops == 0:
            self._stopped = anyio.Event()
        self._stops += 1
        try:
            self.survivors = await stop_task(self.task_id, self.pgid, grace, since=self.start_time)
            if self.pid in self.survivors and self._exit_wait is not None:
                self._exit_wait.cancel()  # the command itself outlives SIGKILL: stop waiting for its exit
        finally:
            self._stops -= 1
            if self._stops == 0:
                self._stopped.set()

    def _find_left(self) -> list[int]:
        snap = processes.scan(mine_only=processes.is_subreaper())
        return sorted(processes.task_members(snap, self.task_id, self.pgid, since=self.start_time))

    async def _follow(self) -> bool | None:
        """Wait for the command to exit while moving its output into the log: one coroutine on one
        epoll over the pidfd and the pipe, instead of ``_wait``'s task group of two (a task whose
        output ends as it exits, the usual case, then needs nothing more). Returns as ``_wait_exit``,
        or None when no epoll could be made (no fd left): ``_wait``'s own way then waits."""
        assert self._pidfd is not None
        try:
            poller = select.epoll(2)
        except OSError:
            return None
        try:
            poller.register(self._pidfd, select.EPOLLIN)
            if not self._eof.is_set():
                poller.register(self._rfd, select.EPOLLIN)
            with anyio.CancelScope() as self._exit_wait:
                while True:
                    if not self._eof.is_set() and await self._absorb_some(1):
                        poller.unregister(self._rfd)
                    if any(fd == self._pidfd for fd, _ in poller.poll(0)):
                        break
                    await anyio.wait_readable(poller.fileno())
            exited = not self._exit_wait.cancelled_caught  # else a stop gave up on it: it outlives SIGKILL
            if exited and not self._eof.is_set():  # what it wrote just before exiting (at most a pipe's worth)
                await self._absorb_some(FINAL_CHUNKS)
        finally:
            self._exit_wait = None
            poller.close()
        return self._exited(processes.wait_child(self._popen) if exited else None)

    async def _absorb_some(self, chunks: int) -> bool:
        """Move up to ``chunks`` chunks of the pipe into the log; True at the end of the output
        (or once the log failed: the task is then stopped, and its reason says why)."""
        if not self._absorb_now(chunks):
            return False
        await self._stop_if_log_failed()
        return True

    async def _stop_if_log_failed(self) -> None:
        """Stop the task once its log could not be written (``_absorb_now`` only marks it)."""
        if self._must_stop:
            self._must_stop = False
            await self._stop(LEFTOVER_GRACE_S)

    def _absorb_now(self, chunks: int) -> bool:
        """``_absorb_some`` without the stop: a failed log sets ``_must_stop`` instead."""
        try:
            for _ in range(chunks):
                if not self._log.absorb(self._rfd):
                    break
            else:
                return False
        except BlockingIOError:
            return False
        except OSError as exc:  # the log cannot be written (disk full...): the task is to be stopped visibly
            self._log.error = f"could not write the task's log: {exc.strerror or exc}"
            self._must_stop = True
        self._eof.set()
        return True

    async def _wait_exit(self) -> bool:
        """Wait for the command to exit; False when a stop gave up on it (it survived SIGKILL)."""
        code = None
        try:
            with anyio.CancelScope() as self._exit_wait:
                if self._pidfd is not None:
                    await anyio.wait_readable(self._pidfd)
                    code = processes.wait_child(self._popen)
                else:  # kernels without pidfd (or no fd left for one): a worker thread waits instead
                    with processes.unlocked_wait():
                        code = await anyio.to_thread.run_sync(self._popen.wait, abandon_on_cancel=True)
                    processes.forget_child(self._popen.pid)
        finally:
            self._exit_wait = None
        return self._exited(code)

    def _exited(self, code: int | None) -> bool:
        """Note the command's exit ``code`` (None: it is still running, unkillable: ``survivors`` says
        so); False then."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if code is None:
            self._exit = ExitInfo(None, None)
            return False
        self._exit = ExitInfo(code, None) if code >= 0 else ExitInfo(None, signal.Signals(-code).name)
        return True

    async def _drain(self) -> None:
        """Move output into the log until its end (or until the log fails), a chunk per turn."""
        while not await self._absorb_some(1):
            await anyio.wait_readable(self._rfd)

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


async def stop_task(task_id: str, pgid: int | None, grace: float, *, since: int | None = None) -> list[int]:
    """Stop every process of a task: TERM, ``grace`` seconds, KILL, and a fresh look to confirm.

    ``pgid`` is the task's process group (one we started); the task's other processes are found
    by ``AGENT_TASK_ID``; ``since`` (the leader's start time) excludes anything older, so a
    reused group id is never hit. Returns the pids still alive after SIGKILL (empty: verified
    gone). Scans of /proc run in a worker thread.
    """

    mine_only = processes.is_subreaper()  # then every process of the task descends from us

    def signal_round(sig: signal.Signals) -> dict[int, int]:
        return processes.signal_task(task_id, pgid, since, sig, mine_only=mine_only)

    run = anyio.to_thread.run_sync
    victims = await run(signal_round, signal.SIGTERM)
    if not victims:
        return []
    if await _wait_gone(victims, grace):
        victims = await run(signal_round, signal.SIGTERM)  # anything started meanwhile gets its TERM too
        if not victims:
            return []
    killed: dict[int, int] = {}
    for _ in range(processes.KILL_ROUNDS):
        victims = await run(signal_round, signal.SIGKILL)
        if not victims:
            return []
        if victims.keys() <= killed.keys():
            break  # nothing new since the last KILL: these do not die, waiting longer will not help
        killed.update(victims)
        await _wait_gone(victims, processes.KILL_WAIT_S)
    left = await run(lambda: sorted(processes.task_members(processes.scan(mine_only=mine_only), task_id, pgid,
                                                            since=since)))
    if left:
        log.error("task %s: %s", task_id, processes.describe_survivors(left))
    return left


async def _wait_gone(victims: dict[int, int], timeout: float) -> bool:
    """Poll (with back-off, in a worker thread) until none of ``victims`` is alive; False on timeout.

    There is no event for the death of processes that are not our children, so this is the one
    place that polls; it only runs while a task is being stopped.
    """
    delay = 0.005
    with anyio.move_on_after(timeout):
        while await anyio.to_thread.run_sync(processes.still_alive, victims):
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return True
    return False


__all__ = ["Executor", "TaskHandle", "LaunchSpec", "ExitInfo", "SpawnError", "LocalExecutor", "stop_task",
           "check_launch_strings", "os_error_text", "process_start_time", "MAX_ARG_BYTES"]
