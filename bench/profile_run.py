#!/usr/bin/env python
"""Profile a queue run of N trivial items in this process (no MCP, no terminal UI).

Run by hand:  python bench/profile_run.py [--items 300] [--slots 5] [--progress | --fan-out] [--profile FILE] [--top 30]

Writes N ``command: "true"`` items to a temporary workspace, opens the registry as the server
does (``open_registry``: guarded executor, subreaper, watchdog) and runs ``start_run`` to its end.
Start-up objects are frozen out of the garbage collector's reach first, as ``agent-parallel serve``
does (``freeze_startup_objects``: otherwise one full collection, ~60 ms, falls in a 300-item run).
Prints the run's makespan, the wall time from the call to the report, and this process's CPU time
(all threads, user+sys) per item; with ``--profile``, cProfile covers only the run (not imports or
set-up) on the event loop thread's CPU time (idle waits do not count), and the top functions by
internal time are printed. ``--progress`` waits for the run as
``task_output`` does for a client that asked for progress (``views.wait_reporting_progress``, the
notifications counted instead of sent), instead of waiting on the task alone. ``--fan-out`` runs the
same commands as one fan-out group instead (the task layer alone: the difference is the queue's cost).
A second line breaks the event loop thread's wall time down (``/proc/self/task/TID/schedstat``): on a
CPU, runnable but waiting for one (a child it just started often takes its CPU), and asleep (in each
start's vfork until the child has exec'd, and waiting for ends), with the share of the machine's CPUs
left idle during the run (``/proc/stat``).
Set ``TMPDIR=/dev/shm`` to leave the file system's cost out (see bench/README.md).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
from bench_common import machine_idle, thread_schedstat

from agent_parallel.cli.main import freeze_startup_objects
from agent_parallel.config import load_config
from agent_parallel.paths import runs_dir
from agent_parallel.queue.items import QueueReader
from agent_parallel.queue.run import QueueContext, run_of, start_run
from agent_parallel.tasks.registry import RegistrySettings, open_registry


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loop_schedstat() -> tuple[float, float]:
    """``bench_common.thread_schedstat`` of the event loop's thread (the main thread) of this process."""
    return thread_schedstat(os.getpid(), threading.main_thread().native_id or os.getpid())


SCHED = [0.0, 0.0, 0.0, 0.0]  # the last run's loop thread: on a CPU, waiting for one, wall (seconds); idle share


def main_thread_cpu() -> float:
    """User+sys of the event loop's thread (the main thread) alone."""
    fields = Path(f"/proc/self/task/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HOPS = [0]


def count_hops() -> None:
    """Count calls of ``anyio.to_thread.run_sync`` (looked up at each call by the code measured): each
    wakes a worker thread and takes the GIL back, a CPU cost the noisy timings here hide."""
    real = anyio.to_thread.run_sync

    async def counted(*args: Any, **kwargs: Any) -> Any:
        HOPS[0] += 1
        return await real(*args, **kwargs)

    anyio.to_thread.run_sync = counted  # type: ignore[assignment]


def write_queue(root: Path, n: int, slots: int) -> None:
    queue = root / ".agent" / "queue"
    queue.mkdir(parents=True)
    (root / ".agent" / "config.yaml").write_text(f"autonomy:\n  max_parallel: {slots}\n")
    for i in range(1, n + 1):
        (queue / f"{i:03d}-pending-item-{i}.md").write_text(f'---\ncommand: "true"\n---\n# Item {i}\n')


async def run(root: Path, slots: int, profiler: cProfile.Profile | None,
              progress: list[float] | None) -> tuple[float | None, float, float, float]:
    config, _ = load_config(root)
    if progress is not None:  # imported before the clock starts (it loads the MCP SDK)
        from agent_parallel.server.views import wait_reporting_progress
    async with open_registry(root, runs_dir(root), RegistrySettings()) as registry:
        ctx = QueueContext(root, registry.runs_dir, config, registry, QueueReader())
        c0, m0, t0, s0 = cpu(), main_thread_cpu(), time.perf_counter(), loop_schedstat()
        i0 = machine_idle()
        HOPS[0] = 0
        if profiler:
            profiler.enable()
        task, _ = await start_run(ctx, max_parallel=slots)
        if progress is None:
            await task.done.wait()
        else:  # as the server's task_output waits, for a client that asked for progress
            async def report(done: float, total: float | None = None, message: str | None = None) -> None:
                progress.append(done)

            ws: Any = SimpleNamespace(registry=registry)  # what the wait uses of a workspace and a request context
            ctx: Any = SimpleNamespace(report_progress=report)
            await wait_reporting_progress(ws, [task], "all", 600, ctx)
        # the final records' files too (written a second later otherwise; an older tree has no records_filed)
        await getattr(registry, "records_filed", registry.records_saved)()
        if profiler:
            profiler.disable()
        wall, used, loop = time.perf_counter() - t0, cpu() - c0, main_thread_cpu() - m0
        s1, i1 = loop_schedstat(), machine_idle()
        SCHED[:] = [s1[0] - s0[0], s1[1] - s0[1], wall, (i1[0] - i0[0]) / max(1, i1[1] - i0[1])]
        run = run_of(task)
        assert run is not None
        progress = run.progress()
        if progress.counts.get("completed") != len(progress.outcomes):
            print("not all completed:", progress.counts, file=sys.stderr)
        return progress.makespan, wall, used, loop


async def run_fan_out(root: Path, n: int, slots: int, profiler: cProfile.Profile | None,
                      ) -> tuple[float | None, float, float, float]:
    """The same N ``true`` as one fan-out (``launch_group``, what ``launch_task(commands=...)`` does): the
    task layer alone, without the queue's claims, plan and follow-ups, to compare with a run."""
    async with open_registry(root, runs_dir(root), RegistrySettings(max_running=max(64, n))) as registry:
        c0, m0, t0, s0 = cpu(), main_thread_cpu(), time.perf_counter(), loop_schedstat()
        i0 = machine_idle()
        HOPS[0] = 0
        if profiler:
            profiler.enable()
        _, tasks = await registry.launch_group(["true"] * n, max_parallel=slots, cwd=root)
        await registry.wait(tasks, mode="all", timeout=600)
        # the final records' files too (written a second later otherwise; an older tree has no records_filed)
        await getattr(registry, "records_filed", registry.records_saved)()
        if profiler:
            profiler.disable()
        wall, used, loop = time.perf_counter() - t0, cpu() - c0, main_thread_cpu() - m0
        s1, i1 = loop_schedstat(), machine_idle()
        SCHED[:] = [s1[0] - s0[0], s1[1] - s0[1], wall, (i1[0] - i0[0]) / max(1, i1[1] - i0[1])]
        if any(t.record.status != "completed" for t in tasks):
            print("not all completed:", sorted({t.record.status.value for t in tasks}), file=sys.stderr)
        starts = [t.record.started_at for t in tasks if t.record.started_at is not None]
        ends = [t.record.ended_at for t in tasks if t.record.ended_at is not None]
        return (round(max(ends) - min(starts), 3) if starts and ends else None), wall, used, loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--profile", default=None, help="write cProfile stats of the run to this file")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--progress", action="store_true", help="wait as task_output does with progress requested")
    parser.add_argument("--fan-out", action="store_true",
                        help="the same commands as one fan-out (launch_group) instead of a queue run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-run-") as tmp:
        root = Path(tmp)
        count_hops()
        freeze_startup_objects()  # as the server does: a full collection would walk every module otherwise
        profiler = cProfile.Profile(time.thread_time) if args.profile else None
        reports: list[float] | None = [] if args.progress and not args.fan_out else None
        if args.fan_out:
            makespan, wall, used, loop = anyio.run(run_fan_out, root, args.items, args.slots, profiler)
        else:
            write_queue(root, args.items, args.slots)
            makespan, wall, used, loop = anyio.run(run, root, args.slots, profiler, reports)
    print(f"{args.items} {'tasks (fan-out)' if args.fan_out else 'items'}, {args.slots} slots: makespan {makespan} s, "
          f"wall {wall:.3f} s, "
          f"CPU {used:.3f} s ({used / args.items * 1000:.2f} ms per item, all threads; "
          f"{loop / args.items * 1000:.2f} ms on the event loop's thread)"
          + f"; {HOPS[0] / args.items:.2f} thread hops per item"
          + (f"; {len(reports)} progress reports" if reports is not None else ""))
    on_cpu, waiting, wall, idle = SCHED
    if on_cpu:
        per = 1e6 / args.items
        print(f"the event loop's thread, per item: {on_cpu * per:.0f} µs on a CPU, {waiting * per:.0f} µs runnable but "
              f"waiting for a CPU, {(wall - on_cpu - waiting) * per:.0f} µs asleep (its starts' vfork waits for each "
              f"child's exec, and waits for ends); the machine's CPUs {idle:.0%} idle")
    if profiler:
        profiler.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
