"""Whether the machine can take another process now: free memory and load average.

Like GNU parallel's ``--memfree`` and ``--load``: a start is held (not refused) while available
memory is below the floor or the 1-minute load average is above the ceiling.
"""

from __future__ import annotations

import os
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


def admission_check(min_free_memory: int, max_load: float | None) -> Callable[[], str | None]:
    """A check for the registry: None to start, or a sentence saying why the start is held."""

    def check() -> str | None:
        free = available_memory()
        if min_free_memory and free is not None and free < min_free_memory:
            return (f"available memory {free / 2**20:.0f} MiB is below autonomy.min_free_memory "
                    f"{min_free_memory / 2**20:.0f} MiB; waiting for it to recover")
        if max_load is not None:
            load = os.getloadavg()[0]
            if load > max_load:
                return f"load average {load:.2f} is above autonomy.max_load {max_load:g}; waiting for it to fall"
        return None

    return check
