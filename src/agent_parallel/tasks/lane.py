"""The lane: one coroutine that starts and follows many local tasks, for the common case.

A task supervised on its own costs a coroutine, a worker-thread hop to start its process and a
wait of its own (``TaskRegistry._supervise``). That is right for anything unusual, and too dear
when 300 short commands go through a fan-out or a queue run: most of the server's CPU per task
went into that machinery, not into the task. The lane does what every such task needs, for all of
them at once, as ``bench/bench_floor.py`` does:

- the tasks submitted in one turn of the event loop are started together, their logs created there
  too (``LocalExecutor.start_batch``): in a worker thread, or, for a few submitted as others ended,
  on the loop's own thread when the registry vouches that their start can wait on nothing the loop
  does not (``inline``);
- one epoll holds every followed task's pidfd and output pipe; output moves into each log as it comes;
- the usual end (the command exited, its output ended, it left nothing running) is taken inline,
  and the tasks ending together go to the owner in one call (``LaneOwner.lane_ended``).

Anything else leaves the lane for the task's own supervision (``LaneOwner.lane_handover``): a stop
begun on the task (cancel, shutdown, a record that cannot be written), its timeout, a failed log,
processes it left behind, no pidfd, an epoll that cannot take it, or any error while following it.
``LocalHandle.wait`` then carries on from where the lane was. The lane runs only while it has
tasks, and does nothing on the event loop that waits.
"""

from __future__ import annotations

import heapq
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup

from ..errors import InternalError
from .executor import ExitInfo, LaunchSpec, LocalExecutor, LocalHandle
from .logs import LogWriter

log = logging.getLogger(__name__)

K = TypeVar("K")


class LaneOwner(Protocol[K]):
    """What the lane tells about its tasks (the registry): every call is made on the event loop."""

    def lane_go(self, key: K) -> bool:
        """About to start ``key``: False when it must not start after all (the owner ends it)."""

    def lane_started(self, key: K, result: LocalHandle | Exception, log: LogWriter | None, at: float) -> None:
        """``key`` started at ``at`` (wall clock) with this handle, or did not (the exception says why);
        ``log`` is its log, when it could be made."""

    def lane_ended(self, ends: list[tuple[K, ExitInfo]]) -> None:
        """These tasks ended the usual way; each handle is spent."""

    def lane_handover(self, key: K, deadline: float | None) -> None:
        """``key`` leaves the lane: its own supervision goes on with ``handle.wait()`` (``deadline``:
        when its timeout expires, on ``anyio.current_time``'s clock)."""


@dataclass(eq=False)
class _Followed(Generic[K]):
    key: K
    handle: LocalHandle
    pidfd: int
    rfd: int  # -1 once the output ended
    deadline: float | None


@dataclass
class _Waiting(Generic[K]):
    key: K
    spec: LaunchSpec
    open_log: Callable[[], LogWriter]
    timeout_s: float | None
    inline: bool  # may be started on the event loop's thread (``LocalExecutor.start_batch``)


@dataclass
class Lane(Generic[K]):
    """Starts and follows tasks (see the module docstring). ``open_lane`` makes one."""

    executor: LocalExecutor
    owner: LaneOwner[K]
    tg: TaskGroup
    _epoll: select.epoll
    _wake_fd: int
    _waiting: list[_Waiting[K]] = field(default_factory=list)
    _by_fd: dict[int, _Followed[K]] = field(default_factory=dict)
    _deadlines: list[tuple[float, int, _Followed[K]]] = field(default_factory=list)
    _running: bool = False
    _asleep: bool = False
    _following_up: bool = False  # in ``lane_ended``: submissions are follow-ups, nobody waits for an answer
    _count: int = 0  # tie-breaker of the deadline heap
    started: int = 0  # processes the lane started (for tests and benchmarks)

    def submit(self, key: K, spec: LaunchSpec, open_log: Callable[[], LogWriter], timeout_s: float | None, *,
               inline: bool = False) -> None:
        """Start ``spec`` and follow it, its output going to the log ``open_log`` makes (in the thread
        that starts it); ``key`` names it to the owner.

        ``inline``: the owner vouches that the start may be made on the event loop's thread (see
        ``LocalExecutor.start_batch``). Taken only for what the owner submits as tasks end (a run's next
        items, a fan-out's next members): a start submitted with a client's call still to be answered
        (``launch_task``) would hold that answer up by the start's half millisecond."""
        self._waiting.append(_Waiting(key, spec, open_log, timeout_s, inline and self._following_up))
        if not self._running:
            self._running = True
            self.tg.start_soon(self._run)
        elif self._asleep:
            self._asleep = False
            os.eventfd_write(self._wake_fd, 1)

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_fd)

    async def _run(self) -> None:
        try:
            while self._waiting or self._by_fd:
                if self._waiting:
                    await self._start_waiting()
                    continue
                self._asleep = True
                wait = anyio.CancelScope(deadline=self._deadlines[0][0] if self._deadlines else float("inf"))
                with wait:
                    await anyio.wait_readable(self._epoll.fileno())
                self._asleep = False
                self._take(self._epoll.poll(0))
                self._expire()
        except Exception:  # a bug here must not take the server down: every task goes its own way
            log.exception("the lane failed; its tasks are supervised on their own")
            for one in list(self._by_fd.values()):
                self._hand_over(one)
            waiting, self._waiting = self._waiting, []
            for left in waiting:
                self.owner.lane_started(left.key, InternalError("the lane that was to start it failed"), None,
                                        time.time())
        finally:
            self._running = self._asleep = False

    async def _start_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        batch = [one for one in batch if self.owner.lane_go(one.key)]
        if not batch:
            return
        at = time.time()
        try:
            results = await self.executor.start_batch([(one.spec, one.open_log) for one in batch],
                                                      inline=all(one.inline for one in batch))
        except Exception as exc:  # (start_batch gives each task's failure as its result: this is a bug)
            log.exception("starting a batch of tasks failed")
            results = [(exc, None)] * len(batch)
        now = anyio.current_time()
        for one, (result, log_writer) in zip(batch, results, strict=True):
            if isinstance(result, LocalHandle):
                self.started += 1
                self._follow(one.key, result, None if one.timeout_s is None else now + one.timeout_s)
            self.owner.lane_started(one.key, result, log_writer, at)  # a stop it begins hands the task over

    def _follow(self, key: K, handle: LocalHandle, deadline: float | None) -> None:
        fds = handle.lane_fds()
        if fds is None:
            self.owner.lane_handover(key, deadline)
            return
        pidfd, rfd = fds
        one = _Followed(key, handle, pidfd, rfd, deadline)
        try:
            self._epoll.register(pidfd, select.EPOLLIN)
            self._by_fd[pidfd] = one
            if rfd >= 0:
                self._epoll.register(rfd, select.EPOLLIN)
                self._by_fd[rfd] = one
        except OSError as exc:  # the epoll is full (fs.epoll.max_user_watches), no memory...
            log.warning("task %s: the lane cannot follow it (%s); it is supervised on its own", handle.task_id, exc)
            if self._by_fd.get(pidfd) is one:
                self._unregister(one)
            self.owner.lane_handover(key, deadline)
            return
        if deadline is not None:
            self._count += 1
            heapq.heappush(self._deadlines, (deadline, self._count, one))
        handle.on_stop = lambda: self._hand_over(one)

    def _take(self, events: list[tuple[int, int]]) -> None:
        """Move output, and take the ends: the usual ones to the owner in one batch, others handed
        over. Whatever goes wrong with one task hands it over (its own supervision says what)."""
        ended: list[tuple[K, ExitInfo]] = []
        for fd, _ in events:
            if fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            one = self._by_fd.get(fd)
            if one is None or fd != one.rfd:
                continue
            try:
                if one.handle.lane_output():
                    self._unregister_output(one)
                    if one.handle.log_failed:  # the log failed: the task is stopped by its own supervision
                        self._hand_over(one)
            except Exception:
                log.exception("task %s: moving its output failed", one.handle.task_id)
                self._hand_over(one)
        for fd, _ in events:
            one = self._by_fd.get(fd)
            if one is None or fd != one.pidfd:
                continue
            self._unregister(one)
            try:
                info = one.handle.lane_exit()
            except Exception:
                log.exception("task %s: taking its exit failed", one.handle.task_id)
                info = None
            if info is not None:
                ended.append((one.key, info))
            else:
                self.owner.lane_handover(one.key, one.deadline)
        if ended:
            self._following_up = True  # what the owner submits now is started in the lane's next step
            try:
                self.owner.lane_ended(ended)
            finally:
                self._following_up = False

    def _expire(self) -> None:
        """Hand over the tasks whose timeout has come (their supervision stops them)."""
        now = anyio.current_time()
        while self._deadlines and self._deadlines[0][0] <= now:
            one = heapq.heappop(self._deadlines)[2]
            if self._by_fd.get(one.pidfd) is one:
                self._hand_over(one)

    def _hand_over(self, one: _Followed[K]) -> None:
        if self._by_fd.get(one.pidfd) is one:
            self._unregister(one)
            self.owner.lane_handover(one.key, one.deadline)

    def _unregister_output(self, one: _Followed[K]) -> None:
        if one.rfd >= 0:
            self._forget_fd(one.rfd)
            one.rfd = -1

    def _unregister(self, one: _Followed[K]) -> None:
        one.handle.on_stop = None
        self._unregister_output(one)
        self._forget_fd(one.pidfd)

    def _forget_fd(self, fd: int) -> None:
        self._by_fd.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # (not registered)
            pass


def open_lane(executor: object, owner: LaneOwner[K], tg: TaskGroup) -> Lane[K] | None:
    """A lane for ``executor`` when it is a ``LocalExecutor`` (None otherwise, or when no epoll or
    eventfd can be made: every task is then supervised on its own)."""
    if not isinstance(executor, LocalExecutor) or not hasattr(os, "eventfd"):
        return None
    try:
        epoll = select.epoll()
    except OSError:
        return None
    try:
        wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        epoll.register(wake_fd, select.EPOLLIN)
    except OSError:
        epoll.close()
        return None
    return Lane(executor, owner, tg, epoll, wake_fd)


__all__ = ["Lane", "LaneOwner", "open_lane"]
