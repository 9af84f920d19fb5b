"""A guard process that stops a server's tasks if the server dies without cleaning up.

The server starts one watchdog (``python -m agent_parallel.runner.watchdog``) and keeps a pipe to
its stdin, writing ``+PGID`` when a task's process group starts and ``-PGID`` when it is gone.
The watchdog sits in its own session and ignores the usual stop signals; when its stdin reaches
end of file (the server exited, even by SIGKILL) it sends TERM to every group still listed, waits
briefly, sends KILL, and exits. On a clean shutdown the list is already empty.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 0.5


class Watchdog:
    """The server's end: starts the guard process and tells it which groups are live."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agent_parallel.runner.watchdog"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        self.pid = self._proc.pid

    def _send(self, line: str) -> None:
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # the guard is gone; the start-up sweep remains
            pass

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """Let the guard exit (it stops whatever is still listed)."""
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _guard() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip()
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
    alive = [g for g in groups if _signal(g, signal.SIGTERM)]
    if alive:
        time.sleep(GRACE_S)
        for g in alive:
            _signal(g, signal.SIGKILL)


def _signal(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


if __name__ == "__main__":
    _guard()
