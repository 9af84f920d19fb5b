"""Finding, stopping and reaping every process of a task, including those that left its group.

A task's process group is not enough to find what it started: a child that calls ``setsid`` or
double-forks leaves it. So every task process carries ``AGENT_TASK_ID=<task id>`` in its
environment (inherited by everything it starts), and a task's processes are: its process group,
every process whose ``/proc/PID/environ`` holds that entry, and their descendants. Only
processes of our own uid are considered, never this process or its ancestors, and a signal is
sent through a pidfd after checking the start time again, so a reused pid is never hit.

The server is the child subreaper (``PR_SET_CHILD_SUBREAPER``) while a guarded executor is open:
escaped descendants whose parents exit are reparented to it instead of to init. It reaps those
orphans itself, by pid, never with ``waitpid(-1)`` (which would take the exit codes of its own
``Popen`` children): a zombie child is an orphan when this module did not start it and it is in
another session than ours (every task process is in its task's session or one it made).

This module only uses the standard library: the watchdog process imports it too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

TASK_ID_VAR = "AGENT_TASK_ID"
_ENTRY = TASK_ID_VAR.encode() + b"="
PR_SET_CHILD_SUBREAPER = 36
KILL_WAIT_S = 2.0  # how long processes get to vanish after SIGKILL before the check that counts survivors
KILL_ROUNDS = 4  # KILL, wait, look again: catches processes forked while the others were being killed

_spawns = threading.Condition()  # guards _spawning; held while reaping orphans: no reap of a child not yet listed
_spawning = 0  # children being started (several threads may start children at once)
ORPHAN_REAP_WAIT_S = 1.0  # how long reaping orphans waits for starts in progress before leaving it for later
_reap_lock = threading.Lock()  # held by every reap of a child, and while our children lists are read
_spawned: set[int] = set()  # our own children (Popen): never reaped here
_subreaper_users = 0
_unlocked_waits = 0  # blocking waits for a child in progress outside _reap_lock (see may_have_left_processes)


@dataclass(frozen=True)
class Proc:
    """A live process as seen in /proc."""

    pid: int
    ppid: int
    pgrp: int
    start: int  # start time in clock ticks since boot: (pid, start) names one process for good
    task_id: str | None  # its AGENT_TASK_ID


@dataclass
class Snapshot:
    procs: dict[int, Proc]
    orphans: list[int]  # zombie children of ours that we did not start (reparented to us)


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state [0], ppid [1], pgrp [2], session [3],
    starttime [19])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (to tell a reused pid from ours)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_bracket_trusted: bool | None = None  # None: not yet compared with /proc in this process


def boottime_ns() -> int:
    """The clock a process's start time counts in (``CLOCK_BOOTTIME``, nanoseconds)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def new_child_start_time(pid: int, before_ns: int, after_ns: int) -> int | None:
    """The start time of the child ``pid`` forked between two ``boottime_ns`` readings.

    The kernel stamps a child at its fork with ``CLOCK_BOOTTIME`` and shows it in whole clock ticks
    (``/proc/PID/stat``, rounded down). When both readings fall in one tick (a start takes well under
    a millisecond, a tick is 10 ms), that tick is the start time, without reading ``/proc``: right
    after a start, that read waits for the child's exec to finish (a quarter of a millisecond here).
    Otherwise, and until the first child of this process was checked against ``/proc``, it is read."""
    global _bracket_trusted
    tick = before_ns // _TICK_NS
    if tick != after_ns // _TICK_NS or not _bracket_trusted:
        read = process_start_time(pid)
        if _bracket_trusted is None and read is not None and tick == after_ns // _TICK_NS:
            _bracket_trusted = read == tick
        return read
    return tick


def same_process(pid: int, start: int | None) -> bool:
    """Whether ``pid`` is still the process that had start time ``start`` (not gone, its pid not
    reused). An unknown start time (None) is assumed to be running: it cannot be told apart."""
    return start is None or (pid > 0 and process_start_time(pid) == start)


def _environ_task_id(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    at = data.find(b"\0" + _ENTRY)
    if at >= 0:
        at += 1
    elif data.startswith(_ENTRY):
        at = 0
    else:
        return None
    end = data.find(b"\0", at)
    return data[at + len(_ENTRY): end if end >= 0 else len(data)].decode("ascii", "replace")


def scan(*, mine_only: bool = False) -> Snapshot:
    """Every live process of our uid (with its task id), and the orphaned zombie children to reap.

    ``mine_only``: only our descendants get their environment read (the others get no task id).
    Enough while we are the subreaper: every process a task started is then a descendant of
    ours, escaped or not; it saves reading the environment of every process on a busy machine.
    """
    uid, me = os.getuid(), os.getpid()
    my_session = os.getsid(0)
    stats: dict[int, list[bytes]] = {}
    orphans: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isascii() or not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
        except OSError:
            continue
        fields = _stat_fields(pid)
        if not fields:
            continue
        if fields[0] == b"Z":
            if int(fields[1]) == me and int(fields[3]) != my_session:
                orphans.append(pid)
            continue
        stats[pid] = fields
    wanted = _descendants(me, {pid: int(f[1]) for pid, f in stats.items()}) if mine_only else stats.keys()
    procs = {pid: Proc(pid, int(f[1]), int(f[2]), int(f[19]), _environ_task_id(pid) if pid in wanted else None)
             for pid, f in stats.items()}
    return Snapshot(procs, orphans)


def _descendants(root: int, parents: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def is_subreaper() -> bool:
    return _subreaper_users > 0


def _protected(procs: dict[int, Proc]) -> set[int]:
    """This process and its ancestors: never a victim, whatever their environment says."""
    keep = {0, 1}
    pid = os.getpid()
    while pid > 1 and pid not in keep:
        keep.add(pid)
        pid = procs[pid].ppid if pid in procs else (int(f[1]) if (f := _stat_fields(pid)) else 0)
    return keep


def task_members(snap: Snapshot, task_id: str, pgid: int | None = None, *, since: int | None = None) -> dict[int, int]:
    """The live processes of ``task_id`` in ``snap``: pid -> start time.

    Seeds are the processes carrying ``AGENT_TASK_ID=task_id`` (and members of group ``pgid`` when
    given: pass it only for a group we started); with ``since``, seeds that started earlier are
    not the task's. Descendants of the seeds are included (they started after them).
    """
    procs = snap.procs
    seeds = [p for p in procs.values()
             if (p.task_id == task_id or (pgid is not None and p.pgrp == pgid))
             and (since is None or p.start >= since)]
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    keep = _protected(procs)
    found: dict[int, int] = {}
    stack = [p.pid for p in seeds]
    while stack:
        pid = stack.pop()
        if pid in found or pid in keep:
            continue
        found[pid] = procs[pid].start
        stack.extend(children.get(pid, ()))
    return found


def signal_processes(victims: dict[int, int], sig: signal.Signals) -> None:
    """Send ``sig`` to each (pid, start time) that is still that very process."""
    for pid, start in victims.items():
        fd = None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except (AttributeError, OSError):  # no pidfd (old kernel, or no fd left): check, then kill by pid
            fd = None
        try:
            if process_start_time(pid) != start:
                continue  # gone, and the pid maybe reused: not ours
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        finally:
            if fd is not None:
                os.close(fd)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def still_alive(victims: dict[int, int]) -> dict[int, int]:
    """Those of ``victims`` that are still running (zombies count as gone)."""
    left = {}
    for pid, start in victims.items():
        fields = _stat_fields(pid)
        if fields and fields[0] != b"Z" and int(fields[19]) == start:
            left[pid] = start
    return left


def signal_task(task_id: str, pgid: int | None, since: int | None, sig: signal.Signals, *,
                mine_only: bool) -> dict[int, int]:
    """One round of stopping a task: a fresh look (``scan``, reaping orphans), then ``sig`` to the
    task's process group and to every process carrying its ``AGENT_TASK_ID`` (none older than
    ``since``). Returns the processes signalled; the local executor and the Ray worker both use it."""
    snap = scan(mine_only=mine_only)
    reap_orphans(snap.orphans)
    victims = task_members(snap, task_id, pgid, since=since)
    if pgid is not None and victims:
        signal_group(pgid, sig)
    signal_processes(victims, sig)
    return victims


def wait_gone(victims: dict[int, int], timeout: float) -> bool:
    """Block (polling with back-off) until none of ``victims`` is alive; False after ``timeout``.
    There is no event for the death of processes that are not our children."""
    deadline, delay = time.monotonic() + timeout, 0.005
    while still_alive(victims):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def open_stdin(path: str | os.PathLike[str]) -> int:
    """Open a task's stdin file without ever blocking (a FIFO would): only a regular file will do."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"its stdin file {path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def reap_orphans(orphans: list[int]) -> None:
    """Reap zombie children that were reparented to us (never one this process started)."""
    me, my_session = os.getpid(), os.getsid(0)
    with _spawns:
        if not _spawns.wait_for(lambda: _spawning == 0, ORPHAN_REAP_WAIT_S):
            return  # children keep being started: their zombies are reaped by a later look
        with _reap_lock:
            for pid in orphans:
                fields = _stat_fields(pid)  # look again, under the lock: still a zombie orphan of ours?
                if pid in _spawned or not fields or fields[0] != b"Z" or int(fields[1]) != me \
                        or int(fields[3]) == my_session:
                    continue
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass


def may_have_left_processes(pgid: int, task_id: str) -> bool:
    """Whether a task whose command has exited (and been waited for) may still have processes.

    False only when none can be left, proved without scanning /proc: we are the subreaper, the
    task's process group ``pgid`` is empty, and every child of ours is one we started, one of our
    own session (not a task's), or a live process that carries another task's ``AGENT_TASK_ID``
    (what another task left running: its descendants are that task's). Everything a task starts
    descends from its command; once the command has exited, a process of the task that left the
    group is either below a member of the group or (its parents gone) reparented to us, the
    subreaper, before the command's exit was reported. True otherwise (not the subreaper, a
    member or a zombie or one of ours left, /proc unreadable): the caller then looks properly
    (``stop_task``).

    The children lists are read under ``_reap_lock``, which every reap of our children holds
    (``wait_child``, ``reap_orphans``): a child reaped while its parent's list is being read could
    make the kernel skip the next one. A child being started meanwhile (not yet listed as ours)
    only makes the answer True.
    """
    if not is_subreaper() or _unlocked_waits:
        return True
    try:
        os.killpg(pgid, 0)
        return True  # a member of the group is left (alive, or a zombie not yet reaped)
    except ProcessLookupError:
        pass
    except OSError:
        return True
    my_session = os.getsid(0)
    with _reap_lock:
        children = _my_children()
        if children is None:
            return True
        for pid in children:
            if pid in _spawned:
                continue  # another task's command (or the watchdog)
            fields = _stat_fields(pid)
            if fields is None or fields[0] == b"Z":
                return True  # gone meanwhile, or an orphan to reap
            if int(fields[3]) == my_session:
                continue  # not a task's: every task process is in its task's session or one it made
            owner = _environ_task_id(pid)
            if owner is None or owner == task_id:
                return True  # an escaped process of this task (or of no known task)
    return False


def _my_children() -> list[int] | None:
    """Our children that may be processes a task left: or None where the kernel cannot list them.

    Orphans are reparented to the subreaper's first live thread, the main thread while it runs;
    children another thread started itself are ours (``_spawned``) or of our own session. So while
    the main thread runs its list is enough; otherwise every thread's is read."""
    found: list[int] = []
    if threading.main_thread().is_alive():
        if (listed := _main_children()) is not None:
            return listed
        threads = [str(os.getpid())]
    else:
        try:
            threads = os.listdir("/proc/self/task")
        except OSError:
            return None
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                found.extend(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            if os.path.isdir(f"/proc/self/task/{tid}"):
                return None  # no children file (a kernel without CONFIG_PROC_CHILDREN)
        except (OSError, ValueError):
            return None
    return found


_children_file: tuple[int, int] | None = None  # (our pid, an open fd on the main thread's children list)
CHILDREN_READ = 1 << 16


def _main_children() -> list[int] | None:
    """The main thread's children, read with one ``pread`` of a file kept open (asked once per task
    end: opening and closing it each time cost as much as the rest of the check); None when that
    cannot be done (the caller then reads it the usual way)."""
    global _children_file
    pid = os.getpid()
    if _children_file is None or _children_file[0] != pid:  # (a forked copy of us opens its own)
        try:
            _children_file = (pid, os.open(f"/proc/self/task/{pid}/children", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return None
    try:
        data = os.pread(_children_file[1], CHILDREN_READ, 0)
    except OSError:
        return None
    if len(data) >= CHILDREN_READ:
        return None  # more than one read holds
    try:
        return [int(child) for child in data.split()]
    except ValueError:
        return None


def wait_child(popen: subprocess.Popen[bytes]) -> int:
    """Reap ``popen`` (started with ``spawn``; it has exited: its pidfd was readable) and forget it."""
    with _reap_lock:
        code = popen.wait()
        _spawned.discard(popen.pid)
    return code


class unlocked_wait:
    """Around a blocking wait for a child that cannot hold ``_reap_lock`` (no pidfd): meanwhile
    ``may_have_left_processes`` answers True, as its reading of the children lists is not safe."""

    def __enter__(self) -> None:
        global _unlocked_waits
        with _reap_lock:
            _unlocked_waits += 1

    def __exit__(self, *exc: object) -> None:
        global _unlocked_waits
        with _reap_lock:
            _unlocked_waits -= 1


def spawn(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Start a child with ``start`` and list it as ours, so the orphan reaper never takes its exit code.

    Several threads may start children at once (a fork and exec takes a good part of a millisecond);
    the orphan reaper waits until none is being started."""
    global _spawning
    with _spawns:
        _spawning += 1
    try:
        popen = start()
        _spawned.add(popen.pid)
    finally:
        with _spawns:
            _spawning -= 1
            if not _spawning:
                _spawns.notify_all()
    return popen


def forget_child(pid: int) -> None:
    """``pid`` (started with ``spawn``) has been waited for."""
    _spawned.discard(pid)


def become_subreaper() -> bool:
    """Make this process the child subreaper (Linux); False where it is not supported."""
    global _subreaper_users
    if _subreaper_users == 0 and not _prctl_subreaper(1):
        return False
    _subreaper_users += 1
    return True


def release_subreaper() -> None:
    global _subreaper_users
    _subreaper_users -= 1
    if _subreaper_users == 0:
        _prctl_subreaper(0)


def _prctl_subreaper(on: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, on, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def kill_tasks_now(task_ids: dict[str, int | None], rounds: int = KILL_ROUNDS) -> dict[str, list[int]]:
    """SIGKILL every process of these tasks (task id -> earliest start time allowed, or None) and
    return, per task, the pids still alive afterwards. Blocking: for start-up and the watchdog."""
    killed: dict[int, int] = {}
    for _ in range(rounds):
        snap = scan()
        reap_orphans(snap.orphans)
        everyone = {pid: start for t, since in task_ids.items()
                    for pid, start in task_members(snap, t, since=since).items()}
        if not everyone:
            return {}
        signal_processes(everyone, signal.SIGKILL)
        if everyone.keys() <= killed.keys():
            break  # nothing new since the last KILL: these do not die
        killed.update(everyone)
        wait_gone(everyone, KILL_WAIT_S)
    snap = scan()
    reap_orphans(snap.orphans)
    return {t: sorted(found) for t, since in task_ids.items() if (found := task_members(snap, t, since=since))}


def describe_survivors(pids: list[int]) -> str:
    shown = ", ".join(str(p) for p in pids[:10]) + (", ..." if len(pids) > 10 else "")
    return (f"{len(pids)} of its processes could not be stopped: still alive after SIGKILL (pid {shown}); "
            "they may be stuck in the kernel (e.g. on a hung filesystem or frozen cgroup)")


__all__ = ["Proc", "Snapshot", "scan", "is_subreaper", "task_members", "signal_processes", "signal_group", "still_alive",
           "signal_task", "wait_gone", "open_stdin",
           "reap_orphans", "spawn", "forget_child", "may_have_left_processes", "wait_child", "unlocked_wait",
           "become_subreaper", "release_subreaper", "kill_tasks_now",
           "process_start_time", "new_child_start_time", "boottime_ns", "same_process", "describe_survivors", "TASK_ID_VAR"]
