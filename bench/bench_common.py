"""What the benchmark scripts share (they run as scripts: `python bench/bench_X.py`)."""

from __future__ import annotations

import os


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def server_env() -> dict[str, str] | None:
    """The environment for a server started over stdio: the SDK's default (it passes only a few
    variables), plus PYTHONPATH when set, so that `PYTHONPATH=OTHER/src python bench/X.py` measures
    the code in OTHER (a before/after comparison with the same bench scripts)."""
    if "PYTHONPATH" not in os.environ:
        return None
    from mcp.client.stdio import get_default_environment

    return {**get_default_environment(), "PYTHONPATH": os.environ["PYTHONPATH"]}


def thread_schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of thread ``tid`` of process ``pid``, from
    ``/proc/PID/task/TID/schedstat``; (0, 0) where the kernel does not keep them. The event loop's
    thread of a server is its main thread (tid = pid)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            fields = f.read().split()
    except OSError:
        return 0.0, 0.0
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def machine_idle() -> tuple[int, int]:
    """(idle, all) jiffies of every CPU so far (``/proc/stat``): how much of the machine a run left unused."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait
