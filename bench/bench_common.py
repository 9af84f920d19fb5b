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
