#!/usr/bin/env python
"""The Ray executor against the local executor, in the same run (issue 14's targets).

Run by hand (needs agent-parallel[ray]):  python bench/bench_ray.py [--quick]

In this process, the registry opened as the server opens it (no MCP), once with ``LocalExecutor``
and once with ``RayExecutor`` on a local Ray instance (started here; its start-up is shown, not
counted). After warm-up tasks:

1. launch round trip: ``TaskRegistry.launch`` until it returns (the task is running), p50/p95;
2. end-to-wake: the command prints the wall clock as its last act; the time from that to the
   moment its task's ``done`` event fires, p50/p95;
3. 100 trivial tasks (``true``) as one fan-out of at most 5 at once (Ray: 5 agent slots),
   launched then waited: the makespan.

Targets: launch p50 <= 10 ms and end-to-wake p50 <= 10 ms once the cluster is warm; the 100
tasks within 3x of the local executor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from bench_common import pct
from rich.console import Console
from rich.table import Table

from agent_parallel.tasks.executor import Executor, LocalExecutor
from agent_parallel.tasks.registry import RegistrySettings, open_registry

SLOTS = 5


async def measure(executor: Executor, rounds: int, trivial: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    runs = root / ".agent/runs"
    runs.mkdir(parents=True)
    async with open_registry(root, runs, RegistrySettings(max_records=100_000), executor) as registry:
        for _ in range(3):  # warm-up: as many workers as tasks run at once started, code paths loaded
            _, members = await registry.launch_group(["sleep 0.2"] * SLOTS, max_parallel=SLOTS, cwd=root)
            await registry.wait(members, mode="all", timeout=600)
        launches, wakes = [], []
        for _ in range(rounds):
            began = time.perf_counter()
            task = await registry.launch(command="sleep 0.02; date +%s.%N", cwd=root)
            launches.append(time.perf_counter() - began)
            await task.done.wait()
            woke = time.time()
            text = registry.read_output(task, cursor=None, max_bytes=100, tail_lines=None, pattern=None).text
            wakes.append(woke - float(text.strip()))
        began = time.perf_counter()
        _, members = await registry.launch_group(["true"] * trivial, max_parallel=SLOTS, cwd=root)
        await registry.wait(members, mode="all", timeout=600)
        makespan = time.perf_counter() - began
        failed = [t.record.status for t in members if t.record.status != "completed"]
    return {"launch": launches, "wake": wakes, "makespan": makespan, "failed": failed}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 20 if args.quick else 60
    trivial = 100
    from agent_parallel.tasks.ray_executor import RayExecutor, require_ray

    require_ray()
    local = anyio.run(measure, LocalExecutor(guard=True), rounds, trivial)
    began = time.perf_counter()
    ray_executor = RayExecutor(slots=SLOTS)
    startup = time.perf_counter() - began
    try:
        on_ray = anyio.run(measure, ray_executor, rounds, trivial)
    finally:
        ray_executor.close()

    ms = 1000.0
    table = Table(title=f"Ray executor vs local (this machine, {rounds} rounds; Ray instance start {startup:.1f} s)")
    for column in ("measure", "local", "ray", "target", "ok"):
        table.add_column(column)
    for name, key in (("launch round trip", "launch"), ("end-to-wake", "wake")):
        lp50, rp50 = statistics.median(local[key]) * ms, statistics.median(on_ray[key]) * ms
        table.add_row(f"{name} p50", f"{lp50:.2f} ms", f"{rp50:.2f} ms", "ray <= 10 ms", "yes" if rp50 <= 10 else "NO")
        table.add_row(f"{name} p95", f"{pct(local[key], 95) * ms:.2f} ms", f"{pct(on_ray[key], 95) * ms:.2f} ms", "", "")
    ratio = on_ray["makespan"] / local["makespan"]
    table.add_row(f"{trivial} trivial tasks (<= {SLOTS} at once)", f"{local['makespan']:.2f} s",
                  f"{on_ray['makespan']:.2f} s", "ray within 3x", f"{'yes' if ratio <= 3 else 'NO'} ({ratio:.1f}x)")
    Console().print(table)
    if local["failed"] or on_ray["failed"]:
        print(f"tasks not completed: local {local['failed'][:5]}, ray {on_ray['failed'][:5]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
