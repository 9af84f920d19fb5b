"""Whether the machine can take another process now: free memory and load average.

Like GNU parallel's ``--memfree`` and ``--load``: a start is held (not refused) while available
memory is below the floor or the 1-minute load average is above the ceiling.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo, in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


FRESH_S = 0.02
"""How long one reading of memory and load answers again: a queue run asks before each start and
the registry once more for the same start, and a burst of starts would otherwise read
/proc/meminfo for each (neither figure moves meaningfully in 20 ms; a held start re-asks every
``admission_retry_s``, far longer)."""


def admission_check(min_free_memory: int, max_load: float | None, *,
                    clock: Callable[[], float] = time.monotonic) -> Callable[[], str | None]:
    """A check for the registry: None to start, or a sentence saying why the start is held."""
    last: list[tuple[float, str | None]] = []

    def look() -> str | None:
        if min_free_memory:
            free = available_memory()
            if free is not None and free < min_free_memory:
                return (f"available memory {free / 2**20:.0f} MiB is below autonomy.min_free_memory "
                        f"{min_free_memory / 2**20:.0f} MiB; waiting for it to recover")
        if max_load is not None:
            load = os.getloadavg()[0]
            if load > max_load:
                return f"load average {load:.2f} is above autonomy.max_load {max_load:g}; waiting for it to fall"
        return None

    def check() -> str | None:
        now = clock()
        if last and now - last[0][0] < FRESH_S:
            return last[0][1]
        answer = look()
        last[:] = [(now, answer)]
        return answer

    return check
