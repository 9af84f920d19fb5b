"""Which worktrees are in use, and by whom: ``.agent/worktrees/.leases.json``, changed only under a file
lock, so two servers on one workspace never hand out one port twice nor remove a worktree in use.

An entry is live while the process that took it (pid and start time, so a reused pid does not
count) runs and has not released it; entries of processes that are gone are dropped on the next
change, which is how a crash gives its ports back.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import WorktreeError
from ..paths import read_regular, write_atomic
from ..tasks.processes import process_start_time, same_process
from .repo import file_lock, worktrees_dir

LEASES_FILE = ".leases.json"
LOCK_FILE = ".leases.lock"
MAX_LEASES_BYTES = 4 << 20  # a lease is about 100 bytes; a bigger file is not ours


def _load(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(read_regular(folder / LEASES_FILE, MAX_LEASES_BYTES))
    except (OSError, ValueError, RecursionError):  # absent, or not ours (a symlink to /dev/zero is never read)
        return {}
    return {name: entry for name, entry in data.items() if isinstance(entry, dict)} if isinstance(data, dict) else {}


def _is_live(entry: dict[str, Any]) -> bool:
    pid, start = entry.get("pid"), entry.get("start")
    return isinstance(pid, int) and (start is None or isinstance(start, int)) and same_process(pid, start)


def live_leases(root: Path) -> dict[str, dict[str, Any]]:
    """Worktree name -> its live lease (``port``, ``pid``); read without the lock (a snapshot)."""
    return {name: entry for name, entry in _load(worktrees_dir(root)).items() if _is_live(entry)}


def take(root: Path, name: str, ports: tuple[int, int] | None, prefer: int | None = None) -> int | None:
    """Record that this process uses worktree ``name``; hand it a port from ``ports`` (None: none) that
    no live lease holds and nothing on this machine listens on, ``prefer`` first. Taking a worktree
    this process already holds returns its port again."""
    folder = worktrees_dir(root)
    me = os.getpid()
    with file_lock(folder / LOCK_FILE, "worktree leases"):
        leases = {n: e for n, e in _load(folder).items() if _is_live(e)}
        held = leases.get(name)
        if held is not None and held.get("pid") != me:
            raise WorktreeError(f"worktree {name} is in use by another agent-parallel process (pid {held.get('pid')}); "
                                "wait for its item to end, or stop that process")
        port: int | None = None
        if ports is not None:
            if held is not None and isinstance(held.get("port"), int) and ports[0] <= held["port"] <= ports[1]:
                port = held["port"]
            else:
                taken = {e.get("port") for n, e in leases.items() if n != name}
                candidates = range(ports[0], ports[1] + 1)
                order = ([prefer] if prefer is not None and prefer in candidates else []) + list(candidates)
                port = next((p for p in order if p not in taken and _free(p)), None)
                if port is None:
                    raise WorktreeError(f"no free port left in worktree.ports {ports[0]}-{ports[1]}: "
                                        f"{len(taken)} live worktrees hold ports and the others are in use on this "
                                        "machine; widen the range in .agent/config.yaml or lower max_parallel")
        leases[name] = {"pid": me, "start": process_start_time(me), "port": port}
        write_atomic(folder / LEASES_FILE, json.dumps(leases, indent=1, sort_keys=True).encode())
    return port


def give_back(root: Path, name: str) -> None:
    """This process no longer uses worktree ``name`` (its port is free again)."""
    folder = worktrees_dir(root)
    with file_lock(folder / LOCK_FILE, "worktree leases"):
        leases = {n: e for n, e in _load(folder).items() if _is_live(e)}
        if name in leases and leases[name].get("pid") == os.getpid():
            del leases[name]
        write_atomic(folder / LEASES_FILE, json.dumps(leases, indent=1, sort_keys=True).encode())


def _free(port: int) -> bool:
    """Whether nothing listens on ``port`` on this machine (an unrelated server, another workspace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to servers
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno not in (errno.EADDRINUSE, errno.EACCES)
    return True
