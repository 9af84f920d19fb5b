"""How long integrations take here: each isolated item's measured integration time, kept in
``.agent/runs/integration-times.json``, so the planner can add the expected time to isolated items.

The file is small and bounded (the last `MAX_SAMPLES` integrations), written atomically, and read
with suspicion: a cloned repository can ship anything under ``.agent/`` (a symlink, a FIFO, a huge
file, JSON of the wrong shape), and none of it may hang, crash or mislead the planner: what is not a
regular file of sane samples counts as no samples. Two servers recording at the same instant may
lose one sample (a statistic), never tear the file.

No anyio, no git: ``agent-parallel plan`` reads it without loading either.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import NamedTuple

from ..errors import UsageError
from ..paths import RUNS_DIR, read_regular, resolve_inside, runs_dir, write_atomic

TIMES_FILE = "integration-times.json"
MAX_SAMPLES = 50
"""Integrations kept in the file (the oldest are dropped)."""
WINDOW = 20
"""The estimate is the median of this many most recent integrations (one slow verify does not skew it)."""
MAX_FILE_BYTES = 64 << 10
"""A larger file is not ours (or not sane): it counts as no samples, and the next record replaces it."""
MAX_SECONDS = 86_400.0
"""A sample above a day is not believed."""
DEFAULT_INTEGRATION_S = 2.0
"""What an integration is expected to take before any was measured here."""


class Sample(NamedTuple):
    """One measured integration: the item, its wall time (lock wait included), when (epoch seconds)."""

    item: str
    seconds: float
    at: float


def load_samples(root: Path) -> list[Sample]:
    """The recorded integrations of the workspace at ``root`` (resolved), oldest first (in the file:
    ``{"item": "007", "seconds": 0.41, "at": <epoch>}`` each). Anything unreadable or odd counts as none."""
    try:
        path = resolve_inside(root, RUNS_DIR, "the runs directory") / TIMES_FILE
    except UsageError:
        return []  # a runs directory pointing outside the workspace is never read
    try:
        data = read_regular(path, MAX_FILE_BYTES)
    except OSError:
        return []  # absent, a symlink, a FIFO or device (which would hang or never end), unreadable, or too big to be ours
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        return []
    entries = parsed.get("integrations") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        return []
    return [sample for entry in entries[-MAX_SAMPLES:] if (sample := _sample(entry)) is not None]


def _sample(entry: object) -> Sample | None:
    """A well-formed sample, or None."""
    if not isinstance(entry, dict):
        return None
    item, seconds, at = entry.get("item"), entry.get("seconds"), entry.get("at")
    if not isinstance(item, str) or not item.isascii() or not item.isdigit() or len(item) > 12:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) \
            or not 0 <= seconds <= MAX_SECONDS:
        return None
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        return None
    return Sample(item, float(seconds), float(at))


def integration_estimate(root: Path) -> tuple[float, int]:
    """(seconds an isolated item's integration is expected to take, how many measurements that is
    the median of); `DEFAULT_INTEGRATION_S` and 0 before any was measured."""
    recent = sorted(s.seconds for s in load_samples(root)[-WINDOW:])
    if not recent:
        return DEFAULT_INTEGRATION_S, 0
    middle = len(recent) // 2
    median = recent[middle] if len(recent) % 2 else (recent[middle - 1] + recent[middle]) / 2
    return round(median, 3), len(recent)


def record_integration(root: Path, item_id: str, seconds: float) -> None:
    """Add one measured integration (sync: call it in a worker thread). Raises ``OSError`` or
    ``UsageError`` (a runs directory outside the workspace) when it cannot be written."""
    sample = _sample({"item": item_id, "seconds": round(seconds, 3), "at": round(time.time(), 3)})
    if sample is None:
        return  # a negative or absurd duration (a clock jump) teaches nothing
    root = root.resolve()
    folder = runs_dir(root)  # recreated (with its .gitignore) if cleaned away; refused through a symlink
    samples = load_samples(root)[-(MAX_SAMPLES - 1):] + [sample]
    path = folder / TIMES_FILE  # (write_atomic removes whatever a clone planted at its temporary name)
    write_atomic(path, json.dumps({"version": 1, "integrations": [s._asdict() for s in samples]}, indent=0).encode())
