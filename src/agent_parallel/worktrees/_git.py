"""Running git and shell commands: one place that sets the environment, reads the output and turns
every failure into a `WorktreeError` naming the step.

git runs with a clean, predictable environment: no ``GIT_DIR``/``GIT_WORK_TREE``/``GIT_INDEX_FILE``
inherited (a server started from a git hook would otherwise act on the wrong repository), the C
locale (messages we parse), no editor and no terminal prompt (nothing ever waits for a person).

Our git steps are bookkeeping done on the agent's behalf, so they run no hooks (``core.hooksPath``
is ``/dev/null``, ``core.fsmonitor`` off): a user's post-checkout, reference-transaction or
post-merge hook that hangs or fails must not hang or fail an item. The user's own checks belong in
`worktree.setup` and `integration.verify`, which have timeouts; the agent's own git commands, in its
worktree, still run every hook. What can still stall git (a clean/smudge filter such as git-lfs, a
file system that does not answer) is bounded by `GIT_TIMEOUT_S`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import ShellStopped, ShellTimedOut, WorktreeError
from ..tasks import processes

TAIL_BYTES = 4000
"""How much of a setup or verify command's output an error or an `Integration` carries."""

_DROPPED = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_OBJECT_DIRECTORY",
            "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_PREFIX", "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES")
NO_HOOKS = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")
"""Options every git command of ours gets (see the module docstring)."""
GIT_TIMEOUT_S = 600.0
"""How long one git step may run before it is killed with everything it started (``GIT_TIMEOUT_VAR``
overrides it): far longer than any step takes without hooks, short of forever."""
GIT_TIMEOUT_VAR = "AGENT_PARALLEL_GIT_TIMEOUT"
FALLBACK_IDENTITY = ("agent-parallel", "agent-parallel@localhost")
"""Who commits when git has no user configured (a fresh CI machine): commits must not fail for it."""


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _DROPPED}
    env.update(LC_ALL="C", LANGUAGE="C", GIT_TERMINAL_PROMPT="0", GIT_EDITOR="true", GIT_SEQUENCE_EDITOR="true",
               GIT_MERGE_AUTOEDIT="no", GIT_LITERAL_PATHSPECS="1", GIT_OPTIONAL_LOCKS="0")
    env.update(extra or {})
    return env


def git_timeout() -> float:
    """`GIT_TIMEOUT_S`, or the seconds in ``$AGENT_PARALLEL_GIT_TIMEOUT`` (ignored unless a positive number)."""
    try:
        value = float(os.environ.get(GIT_TIMEOUT_VAR, ""))
    except ValueError:
        return GIT_TIMEOUT_S
    return value if 0 < value < float("inf") else GIT_TIMEOUT_S


def run_git(cwd: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
            ok: Sequence[int] = (0,), step: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """``git ARGS`` in ``cwd``, without hooks; a `WorktreeError` naming ``step`` (default: the command)
    when the exit code is not in ``ok``. git missing from PATH is a `WorktreeError` too.

    git runs in its own session: past `git_timeout` its whole process group is killed and a
    `WorktreeError` raised, naming the step and what to look for. A run's `ShellStop` does not kill
    a git step: killed half-way, git leaves lock files and half-written checkouts behind, and a step
    without hooks is short (a server stopped by a signal exits at once anyway; its git child, in its
    own session, finishes the step alone).
    """
    what = step or "git " + " ".join(args[:3])
    limit = git_timeout()
    try:
        proc = processes.spawn(lambda: subprocess.Popen(
            ["git", *NO_HOOKS, *args], cwd=cwd, env=git_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, start_new_session=True))
    except FileNotFoundError as exc:
        if not cwd.is_dir():  # removed meanwhile (another item's worktree being cleaned up), not git missing
            raise WorktreeError(f"{what} failed: {cwd} does not exist") from exc
        raise WorktreeError("git is not installed (or not on PATH); install git, or set runner.isolation: none") \
            from exc
    try:
        out, err = proc.communicate(stdin, timeout=limit)
    except subprocess.TimeoutExpired:
        processes.signal_group(proc.pid, signal.SIGKILL)
        _reap(proc)
        raise WorktreeError(f"{what} did not finish within {limit:g}s in {cwd}, so it was killed with everything it "
                            "started (agent-parallel runs git without hooks: look for a clean/smudge filter such as "
                            "git-lfs in .gitattributes, or a file system that does not answer); if git then names a "
                            "lock file it left (such as index.lock), remove it once no git runs there; for a "
                            f"repository that needs longer, set {GIT_TIMEOUT_VAR} (seconds), then retry the item") \
            from None
    except BaseException:  # interrupted: nothing is orphaned
        processes.signal_group(proc.pid, signal.SIGKILL)
        _reap(proc)
        raise
    finally:
        processes.forget_child(proc.pid)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if done.returncode not in ok:
        raise WorktreeError(f"{what} failed in {cwd}: {git_message(done)}")
    return done


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a killed git; a process it started that left its group may hold the pipes: not read."""
    try:
        proc.communicate(timeout=processes.KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def rev_exists(cwd: Path, rev: str) -> bool:
    """Whether ``rev`` names an object (``git rev-parse -q --verify``: a missing one is no error)."""
    return run_git(cwd, "rev-parse", "-q", "--verify", rev, ok=(0, 1)).returncode == 0


def rev_id(cwd: Path, rev: str) -> str:
    """The object id ``rev`` names, or ``""`` when it names none (as `rev_exists`)."""
    return run_git(cwd, "rev-parse", "-q", "--verify", rev, ok=(0, 1)).stdout.decode().strip()


def git_out(cwd: Path, *args: str, step: str | None = None) -> str:
    """The first line of ``git ARGS``'s output (a commit id, a ref name)."""
    return run_git(cwd, *args, step=step).stdout.decode(errors="replace").strip()


def git_message(done: subprocess.CompletedProcess[bytes]) -> str:
    """What git said when it failed: the last lines of its error output (or of its output)."""
    text = (done.stderr or done.stdout or b"").decode(errors="replace").strip()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("hint:")]
    return " / ".join(lines[-4:]) or f"exit code {done.returncode}"


def nul_list(data: bytes) -> list[str]:
    """A ``-z`` list of paths."""
    return [part.decode(errors="surrogateescape") for part in data.split(b"\0") if part]


def identity_env(cwd: Path, author: str | None) -> dict[str, str]:
    """Environment making commits work and carry ``author`` (``Name <email>``): the configured user
    commits, or `FALLBACK_IDENTITY` where git has none."""
    env: dict[str, str] = {}
    if run_git(cwd, "var", "GIT_COMMITTER_IDENT", ok=(0, 128)).returncode != 0:
        env.update(GIT_COMMITTER_NAME=FALLBACK_IDENTITY[0], GIT_COMMITTER_EMAIL=FALLBACK_IDENTITY[1])
        env.update(GIT_AUTHOR_NAME=FALLBACK_IDENTITY[0], GIT_AUTHOR_EMAIL=FALLBACK_IDENTITY[1])
    if author:
        name, _, email = author.rpartition("<")
        env.update(GIT_AUTHOR_NAME=name.strip(), GIT_AUTHOR_EMAIL=email.rstrip(">").strip())
    return env


class Tail:
    """The last `TAIL_BYTES` of a stream, for error messages."""

    def __init__(self) -> None:
        self.data = b""

    def add(self, chunk: bytes) -> None:
        self.data = (self.data + chunk)[-TAIL_BYTES:]

    def text(self) -> str:
        return self.data.decode(errors="replace").strip()


class ShellStop:
    """Lets a run stop the `worktree.setup` and `integration.verify` commands its worker threads are
    running: a worker thread cannot be interrupted, but the command it waits on can be killed, and then
    it returns at once. Without this, cancelling a run (or stopping the server) waited for a setup
    that may never end. Once stopped, it stays stopped: a later command is refused before it starts."""

    def __init__(self, why: str = "its run was stopped") -> None:
        self.why = why
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self, why: str | None = None) -> None:
        """Kill every command running under this stop (each in its own process group), and any started
        later; ``why`` replaces the reason they give (e.g. who stopped the run)."""
        with self._lock:
            if why is not None and not self._stopped:
                self.why = why
            self._stopped = True
            groups = list(self._groups)
        for pgid in groups:
            processes.signal_group(pgid, signal.SIGKILL)

    def _enter(self, pgid: int) -> bool:
        """Count ``pgid`` as running; False (and it is killed) when already stopped."""
        with self._lock:
            if not self._stopped:
                self._groups.add(pgid)
                return True
        processes.signal_group(pgid, signal.SIGKILL)
        return False

    def _leave(self, pgid: int) -> None:
        with self._lock:
            self._groups.discard(pgid)


def run_shell(command: str, cwd: Path, env: dict[str, str], log: BinaryIO | None, *,
              stop: ShellStop | None = None, what: str = "the command",
              timeout_s: float | None = None) -> tuple[int, str]:
    """Run ``sh -c COMMAND`` in ``cwd`` (its own session), its output (stdout and stderr, in order)
    streamed to ``log`` as it comes; return the exit code and the output's tail.

    If the calling thread is interrupted (KeyboardInterrupt), the command's whole process group is
    killed and waited for before the exception goes on: nothing is orphaned. ``stop`` (a run's
    `ShellStop`) may kill it from another thread; it then raises `ShellStopped` naming ``what``.
    Past ``timeout_s`` the whole process group is killed and `ShellTimedOut` raised, naming the
    command and its setting, ``{what}_timeout`` (``worktree.setup_timeout``, ``integration.verify_timeout``).
    """
    if stop is not None and stop.stopped:
        raise ShellStopped(f"{what} `{command}` was not started: {stop.why}")
    full_env = {**os.environ, **env}
    proc = processes.spawn(lambda: subprocess.Popen(
        ["/bin/sh", "-c", command], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True))
    stopped = stop is not None and not stop._enter(proc.pid)
    timer, expired = _expiry(proc.pid, timeout_s)
    tail = Tail()
    try:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            tail.add(chunk)
            if log is not None:
                log.write(chunk)
        code = proc.wait()
    except BaseException:
        processes.signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if stop is not None:
            stop._leave(proc.pid)
            stopped = stopped or stop.stopped
        if proc.stdout is not None:
            proc.stdout.close()
        processes.forget_child(proc.pid)
        if log is not None:
            log.flush()
    if stopped:
        processes.signal_group(proc.pid, signal.SIGKILL)  # what it left running (the group outlives its leader)
        assert stop is not None
        raise ShellStopped(f"{what} `{command}` was killed before it finished: {stop.why}")
    if expired.is_set():
        processes.signal_group(proc.pid, signal.SIGKILL)  # (as above)
        raise ShellTimedOut(f"{what} `{command}` did not finish within {timeout_s:g}s ({what}_timeout); it was "
                            "killed with everything it started", tail.text())
    return code, tail.text()


def _expiry(pgid: int, timeout_s: float | None) -> tuple[threading.Timer | None, threading.Event]:
    """A timer killing process group ``pgid`` once ``timeout_s`` passes, and the event it sets then."""
    expired = threading.Event()
    if timeout_s is None:
        return None, expired

    def expire() -> None:
        expired.set()
        processes.signal_group(pgid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    return timer, expired
