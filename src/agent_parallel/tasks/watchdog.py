"""A guard process that stops a server's tasks if the server dies without cleaning up.

The server starts one watchdog (``python -m agent_parallel.tasks.watchdog``) and keeps a pipe to
its stdin, writing ``+0 TASK_ID`` before a task's process starts (a server killed before it named
the group must not leave the task unguarded), ``+PGID TASK_ID`` once its group exists and
``-PGID TASK_ID`` when it is gone. The watchdog sits in its own session and ignores the usual stop
signals; when its stdin reaches end of file (the server exited, even by SIGKILL) it stops every task
still listed: TERM to its group and to every process carrying its ``AGENT_TASK_ID`` (those that left
the group), a short grace, then KILL until none is left (``processes.py``), and exits. A listed
group is only signalled while one of its members still carries the task's id, so a group id reused
by someone else is never hit. On a clean shutdown the list is already empty.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from . import processes

GRACE_S = 0.5


class Watchdog:
    """The server's end: starts the guard process and tells it which tasks are live."""

    def __init__(self) -> None:
        self._proc = processes.spawn(lambda: subprocess.Popen(
            [sys.executable, "-m", "agent_parallel.tasks.watchdog"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        ))
        self.pid = self._proc.pid

    def _send(self, line: str, *, now: bool) -> None:
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(line.encode())
        except (OSError, ValueError):  # the guard is gone; the start-up sweep remains
            return
        if now:
            self.flush()

    def watch(self, pgid: int, task_id: str, *, flush: bool = True) -> None:
        """List a task's group at once (it may need stopping from now on); carries any forget queued.
        Several started together may be listed with ``flush=False``, then sent in one write (``flush``).
        ``pgid`` 0: the task is about to start (sent before its process runs); its group follows."""
        self._send(f"+{pgid} {task_id}\n", now=flush)

    def flush(self) -> None:
        """Send what is listed so far."""
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.flush()
        except (OSError, ValueError):  # the guard is gone; the start-up sweep remains
            pass

    def forget(self, pgid: int, task_id: str) -> None:
        """Unlist a group; sent with the next ``watch`` (or at close): a group listed a little longer is
        harmless (the guard only signals a group while a member still carries the task's id), and a
        task's end then costs no write and no wake-up of the guard."""
        self._send(f"-{pgid} {task_id}\n", now=False)

    def close(self) -> None:
        """Let the guard exit (it stops whatever is still listed)."""
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        processes.forget_child(self._proc.pid)


def _guard() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    tasks: dict[str, int] = {}  # task id -> its group (0: not known yet)
    for raw in sys.stdin.buffer:
        line = raw.strip()
        try:
            if line[:1] == b"+":
                pgid, task_id = line[1:].split(b" ", 1)
                tasks[task_id.decode("ascii")] = int(pgid)
            elif line[:1] == b"-":  # only as listed: ``-0`` undoes a ``+0`` whose start failed
                pgid, task_id = line[1:].split(b" ", 1)
                if tasks.get(task_id.decode("ascii")) == int(pgid):
                    del tasks[task_id.decode("ascii")]
        except ValueError:
            continue
    if tasks:
        stop_all(tasks)


def stop_all(tasks: dict[str, int]) -> None:
    """TERM every listed task (its group, while provably still its own, and its escaped processes),
    wait ``GRACE_S``, then KILL until none is left."""
    snap = processes.scan()
    for task_id, pgid in tasks.items():
        members = processes.task_members(snap, task_id)
        if pgid and any(snap.procs[pid].pgrp == pgid for pid in members):
            processes.signal_group(pgid, signal.SIGTERM)
        processes.signal_processes(members, signal.SIGTERM)
    time.sleep(GRACE_S)
    snap = processes.scan()
    for task_id, pgid in tasks.items():  # KILL the group while one of its members is provably the task's
        if pgid and any(snap.procs[pid].pgrp == pgid for pid in processes.task_members(snap, task_id)):
            processes.signal_group(pgid, signal.SIGKILL)
    processes.kill_tasks_now({task_id: None for task_id in tasks})


if __name__ == "__main__":
    _guard()
