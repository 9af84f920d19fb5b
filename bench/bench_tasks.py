#!/usr/bin/env python
"""Benchmarks for agent-parallel's background tasks, measured over stdio against the console script.

Run by hand:  python bench/bench_tasks.py [--quick] [--keep]

Everything is measured on this machine in the same run and printed as one table:

1. ``launch_task`` round trip (p50/p99) over stdio, after warm-up calls.
2. completion -> return latency of a blocking ``task_output``: the task prints the wall clock
   right before it exits; we subtract that from the time the client received the answer.
3. N trivial tasks launched then waited through MCP, vs ``seq N | xargs -P5 -n1 sh -c true``
   (sequential launches, and launches sent concurrently by several client coroutines).
4. a task printing 1 GB (with and without newlines): wall time through the server vs the same
   stream ``| cat > /dev/null``; the server's peak RSS (VmHWM) and its log size on disk.
5. (diagnostic) launch round trip and RSS of a server whose workspace already holds thousands of
   finished task records (written to .agent/runs/ before it starts).

Rows marked "diag" explain the headline figures (what the MCP floor is, what the client adds).
If the 1-minute load average is high, the latencies are skewed: a note says so.

The server is started as ``agent-parallel serve --root DIR`` by ``mcp.Client`` over stdio; its pid
is found by its unique ``--root`` path so that /proc/<pid>/status can be read.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator

import anyio
from bench_common import pct, server_env
from mcp import Client, StdioServerParameters
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 180)
SERVER_CMD = "agent-parallel"


# --------------------------------------------------------------------------- helpers
class ToolFailed(Exception):
    pass


@dataclass
class Row:
    section: str
    metric: str
    value: str
    target: str = "-"
    ok: bool | None = None  # None: informational
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.rows.append(Row(*args, **kwargs))


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def iso_to_epoch(s: str | None) -> float | None:
    if not s:
        return None
    from datetime import datetime

    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


LAUNCHED = [0]  # launch_task calls that succeeded, for the memory-per-task figure
SLOW_LAUNCHES: list[float] = []  # launch_task calls that took over SLOW_LAUNCH_S
SLOW_LAUNCH_S = 0.4


async def call(c: Client, name: str, args: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = await c.call_tool(name, args)
    if name == "launch_task" and not res.is_error:
        LAUNCHED[0] += 1
        if (dt := time.perf_counter() - t0) > SLOW_LAUNCH_S:
            SLOW_LAUNCHES.append(dt)
    if res.is_error:
        text = " ".join(getattr(b, "text", "") for b in res.content)
        raise ToolFailed(f"{name}({args}) -> tool error: {text}")
    assert res.structured_content is not None, f"{name}: no structured content"
    return res.structured_content


MAX_IDS_PER_CALL = 256  # task_output's limit on task_ids per call


async def wait_tasks(c: Client, ids: list[str], *, max_bytes: int = 256) -> tuple[dict[str, Any], int]:
    """task_output(wait=all) until success, in calls of at most MAX_IDS_PER_CALL ids; returns (the
    answers merged, number of calls)."""
    if len(ids) > MAX_IDS_PER_CALL:
        merged: dict[str, Any] = {"retrieval_status": "success", "tasks": []}
        calls = 0
        for start in range(0, len(ids), MAX_IDS_PER_CALL):
            r, n = await wait_tasks(c, ids[start:start + MAX_IDS_PER_CALL], max_bytes=max_bytes)
            merged["tasks"] += r.get("tasks", [r])
            calls += n
        return merged, calls
    calls = 0
    while True:
        calls += 1
        if len(ids) == 1:
            r = await call(c, "task_output", {"task_id": ids[0], "block": True, "timeout": 50, "max_bytes": max_bytes})
        else:
            r = await call(c, "task_output", {"task_ids": ids, "wait": "all", "block": True, "timeout": 50,
                                              "max_bytes": max_bytes})
        if r["retrieval_status"] != "timeout":
            return r, calls


def find_server_pid(root: Path) -> int | None:
    """The pid of the python process serving ``root`` (found via pgrep -f on the unique path)."""
    out = subprocess.run(["pgrep", "-f", f"serve --root {root}"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if "python" in os.path.basename(exe) and b"serve" in cmd:
            return pid
    return pids[0] if pids else None


def helper_pids(pid: int) -> list[int]:
    """Children of the server that are not tasks (e.g. its watchdog guard process), by cmdline."""
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "agent_parallel"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def proc_status(pid: int, key: str) -> int | None:
    """A kB field of /proc/<pid>/status, in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of the process, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = stat[stat.rfind(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def server(root: Path) -> AsyncIterator[tuple[Client, int | None]]:
    root.mkdir(parents=True, exist_ok=True)
    params = StdioServerParameters(command=SERVER_CMD, args=["serve", "--root", str(root)], env=server_env())
    async with Client(params, read_timeout_seconds=120) as c:
        await c.list_tools()
        pid = find_server_pid(root)
        yield c, pid


def mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------- 1. launch round trip
async def bench_launch(c: Client, rep: Report, n: int, warmup: int, pid: int | None) -> None:
    ids: list[str] = []
    for _ in range(warmup):
        ids.append((await call(c, "launch_task", {"command": "true"}))["task_id"])
    times: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await call(c, "launch_task", {"command": "true"})
        times.append(time.perf_counter() - t0)
        ids.append(r["task_id"])
    await wait_tasks(c, ids)
    p50 = pct(times, 50)
    rep.add("1 launch RT", f"launch_task round trip p50 ({n} × `true` back to back, {warmup} warm-up)", ms(p50),
            "≤ 3 ms", p50 <= 0.003)
    rep.add("1 launch RT", "launch_task round trip p99", ms(pct(times, 99)), note=f"max {ms(max(times))}")

    # Diagnostics: the same launch when no earlier task is ending meanwhile (each one awaited first),
    # and a tool call that spawns nothing, with the server CPU it costs.
    iso: list[float] = []
    for _ in range(max(n // 4, 10)):
        t0 = time.perf_counter()
        r = await call(c, "launch_task", {"command": "true"})
        iso.append(time.perf_counter() - t0)
        await wait_tasks(c, [r["task_id"]], max_bytes=1)
    rep.add("1 launch RT", "  diag: launch RT p50 with each task awaited before the next launch", ms(pct(iso, 50)),
            note="no earlier task's exit handling (reap, durable record save) competes")
    ref: list[float] = []
    cpu0 = proc_cpu_s(pid) if pid else None
    for _ in range(min(n, 100)):
        t0 = time.perf_counter()
        await call(c, "task_output", {"task_id": ids[-1], "block": False, "max_bytes": 64})
        ref.append(time.perf_counter() - t0)
    cpu1 = proc_cpu_s(pid) if pid else None
    note = f"server CPU {ms((cpu1 - cpu0) / len(ref))}/call" if cpu0 is not None and cpu1 is not None else ""
    rep.add("1 launch RT", "  diag: task_output(block=false) RT p50 / p99 (MCP floor: no spawn)",
            f"{ms(pct(ref, 50))} / {ms(pct(ref, 99))}", note=note)
    # What the stock client adds: it re-validates every structured result against the output schema.
    sess = c.session
    res = await c.call_tool("launch_task", {"command": "true"})
    t0 = time.perf_counter()
    for _ in range(50):
        await type(sess).validate_tool_result(sess, "launch_task", res)
    rep.add("1 launch RT", "  diag: client-side outputSchema validation of one launch_task result",
            ms((time.perf_counter() - t0) / 50), note="part of every round trip above (jsonschema in mcp.Client)")
    await wait_tasks(c, [res.structured_content["task_id"]], max_bytes=1)


# --------------------------------------------------------------------------- 2. completion -> return
async def bench_wake(c: Client, rep: Report, n: int, sleep_s: float) -> None:
    variants = {
        "sh: `sleep; exec date +%s.%N`": f"sleep {sleep_s}; exec date +%s.%N",
        "python: print(time.time()); os._exit(0)": (
            f"{sys.executable} -c \"import os, sys, time; time.sleep({sleep_s}); "
            "sys.stdout.write(repr(time.time()) + chr(10)); sys.stdout.flush(); os._exit(0)\""),
    }
    for label, cmd in variants.items():
        lat: list[float] = []
        detect: list[float] = []
        respond: list[float] = []
        not_blocking = 0
        for _ in range(n):
            tid = (await call(c, "launch_task", {"command": cmd}))["task_id"]
            t_sent = time.time()
            r, _ = await wait_tasks(c, [tid], max_bytes=256)
            t_recv = time.time()
            if r["status"] != "completed":
                rep.anomalies.append(f"wake bench task {tid} ended {r['status']}: {r.get('reason')} {r.get('output')!r}")
                continue
            printed = float(r["output"].strip().splitlines()[-1])
            if printed < t_sent:
                not_blocking += 1  # the task ended before task_output was even sent
            lat.append(t_recv - printed)
            ended = iso_to_epoch(r.get("ended_at"))
            if ended is not None:
                detect.append(ended - printed)
                respond.append(t_recv - ended)
        if not lat:
            rep.add("2 wake", f"completion→return p50 [{label}]", "no data", "≤ 10 ms", False)
            continue
        p50 = pct(lat, 50)
        rep.add("2 wake", f"completion→return p50 ({len(lat)} runs) [{label}]", ms(p50), "≤ 10 ms", p50 <= 0.010,
                note=f"p90 {ms(pct(lat, 90))}, max {ms(max(lat))}")
        if detect:
            rep.add("2 wake", "  split: print→ended_at / ended_at→client (p50; ended_at is truncated to 1 ms)",
                    f"{ms(pct(detect, 50))} / {ms(pct(respond, 50))}")
        if not_blocking:
            rep.anomalies.append(f"wake bench [{label}]: {not_blocking}/{n} tasks ended before task_output was sent")


# --------------------------------------------------------------------------- 3. many trivial tasks
def xargs_baseline(n: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"seq {n} | xargs -P5 -n1 sh -c true", shell=True, check=True)
    return time.perf_counter() - t0


async def mcp_many(c: Client, n: int, concurrency: int) -> tuple[float, float, float, list[str]]:
    """Launch n `true` tasks (with `concurrency` client coroutines) and wait for all.

    Returns (total seconds, launch phase seconds, wait phase seconds, bad statuses)."""
    ids: list[str] = []

    async def launch() -> str:
        """One launch; at the server's cap of live tasks (a slow machine falls behind), wait and retry as
        an agent would (this bench used to fail there now and then)."""
        while True:
            try:
                return (await call(c, "launch_task", {"command": "true"}))["task_id"]
            except ToolFailed as exc:
                if "tasks are already queued or running" not in str(exc):
                    raise
                await anyio.sleep(0.01)

    t0 = time.perf_counter()
    if concurrency <= 1:
        for _ in range(n):
            ids.append(await launch())
    else:
        remaining = [n]

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                ids.append(await launch())

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    t_launched = time.perf_counter()
    r, _ = await wait_tasks(c, ids, max_bytes=1)
    total = time.perf_counter() - t0
    bad = [f"{t['task_id']}:{t['status']}" for t in r["tasks"] if t["status"] != "completed"]
    return total, t_launched - t0, total - (t_launched - t0), bad


async def bench_many(c: Client, rep: Report, n: int, repeats: int, concurrency: int, pid: int | None) -> None:
    base: list[float] = []
    seq: list[tuple[float, float, float]] = []
    conc: list[tuple[float, float, float]] = []
    cpu0 = proc_cpu_s(pid) if pid else None
    for _ in range(repeats):  # interleave, so drift hits both sides alike
        base.append(xargs_baseline(n))
        total, launch, waited, bad = await mcp_many(c, n, 1)
        seq.append((total, launch, waited))
        if bad:
            rep.anomalies.append(f"{n} trivial tasks (sequential): {len(bad)} not completed, e.g. {bad[:3]}")
        try:
            total, launch, waited, bad = await mcp_many(c, n, concurrency)
            conc.append((total, launch, waited))
            if bad:
                rep.anomalies.append(f"{n} trivial tasks (concurrent): {len(bad)} not completed, e.g. {bad[:3]}")
        except ToolFailed as exc:
            rep.anomalies.append(f"{n} trivial tasks with {concurrency} concurrent launches failed: {exc}")
    cpu1 = proc_cpu_s(pid) if pid else None
    b = statistics.median(base)
    s_total = statistics.median(t for t, _, _ in seq)
    s_launch = statistics.median(l for _, l, _ in seq)
    s_wait = statistics.median(w for _, _, w in seq)
    rep.add("3 many tasks", f"`seq {n} | xargs -P5 -n1 sh -c true` (median of {repeats})", f"{b:.3f} s")
    rep.add("3 many tasks", f"{n} × `true` via MCP, sequential launches, then wait all", f"{s_total:.3f} s",
            note=f"launch phase {s_launch:.3f} s ({s_launch / n * 1000:.2f} ms/launch), wait-all call {s_wait:.3f} s")
    rep.add("3 many tasks", "  ratio MCP(sequential) / xargs", f"{s_total / b:.2f}", "≤ 1.5", s_total / b <= 1.5)
    if conc:
        c_total = statistics.median(t for t, _, _ in conc)
        c_launch = statistics.median(l for _, l, _ in conc)
        rep.add("3 many tasks", f"{n} × `true` via MCP, {concurrency} concurrent launchers, then wait all",
                f"{c_total:.3f} s", note=f"launch phase {c_launch:.3f} s")
        rep.add("3 many tasks", "  ratio MCP(concurrent) / xargs", f"{c_total / b:.2f}", "≤ 1.5", c_total / b <= 1.5)
    if cpu0 is not None and cpu1 is not None:
        per = (cpu1 - cpu0) / (repeats * n * (2 if conc else 1))
        rep.add("3 many tasks", "  diag: server CPU time per trivial task (user+sys, launch + exit handling)", ms(per),
                note=f"floor for {n} tasks on one event loop: {per * n:.2f} s")


# --------------------------------------------------------------------------- 4. 1 GB of output
def runs_usage(root: Path, task_id: str) -> tuple[int, int]:
    """(bytes, files) of a task's logs under <root>/.agent/runs/."""
    total = files = 0
    for p in (root / ".agent" / "runs").iterdir():
        if p.name.startswith(task_id) and p.name.endswith(".log"):
            total += p.stat().st_size
            files += 1
    return total, files


async def sample_rss(pid: int, peak: list[int], stop: anyio.Event) -> None:
    while not stop.is_set():
        rss = proc_status(pid, "VmRSS")
        if rss:
            peak[0] = max(peak[0], rss)
        with anyio.move_on_after(0.05):
            await stop.wait()


async def bench_big(root: Path, rep: Report, nbytes: int) -> None:
    variants = {
        "no newlines (`head -c N /dev/zero`)": f"head -c {nbytes} /dev/zero",
        "lines (`yes | head -c N`)": f"yes | head -c {nbytes}",
    }
    async with server(root) as (c, pid):
        if pid is None:
            rep.anomalies.append(f"could not find the server pid for root {root}; no RSS figures")
        hwm0 = proc_status(pid, "VmHWM") if pid else None
        rss0 = proc_status(pid, "VmRSS") if pid else None
        rep.add("4 1 GB output", "server RSS after start (VmRSS / VmHWM)", f"{mb(rss0)} / {mb(hwm0)}")
        for label, cmd in variants.items():
            t0 = time.perf_counter()
            subprocess.run(["/bin/sh", "-c", f"{cmd} | cat > /dev/null"], check=True)
            direct = time.perf_counter() - t0

            peak = [0]
            stop = anyio.Event()
            cpu0 = proc_cpu_s(pid) if pid else None
            async with anyio.create_task_group() as tg:
                if pid:
                    tg.start_soon(sample_rss, pid, peak, stop)
                t0 = time.perf_counter()
                tid = (await call(c, "launch_task", {"command": cmd}))["task_id"]
                r, calls = await wait_tasks(c, [tid], max_bytes=1024)
                via = time.perf_counter() - t0
                stop.set()
            cpu1 = proc_cpu_s(pid) if pid else None
            ok = r["status"] == "completed" and r["output_bytes"] == nbytes
            if not ok:
                rep.anomalies.append(f"1 GB task [{label}] ended {r['status']} with output_bytes={r['output_bytes']} "
                                     f"(expected {nbytes}), reason={r.get('reason')!r}")
            size, files = runs_usage(root, tid)
            rep.add("4 1 GB output", f"{nbytes / 1e9:g} GB, {label}: direct `| cat > /dev/null`", f"{direct:.2f} s")
            rep.add("4 1 GB output", "  through the server (launch → task_output returns)", f"{via:.2f} s",
                    note=f"ratio {via / direct:.2f}; record duration {r.get('duration_s')} s; "
                         f"{calls} task_output call(s); server CPU {(cpu1 or 0) - (cpu0 or 0):.2f} s")
            rep.add("4 1 GB output", "  log on disk under .agent/runs/", f"{size / 2**20:.1f} MiB in {files} file(s)",
                    "≤ 64 MiB", size <= 64 * 2**20,
                    note=f"output_bytes {r['output_bytes']}, dropped_bytes {r.get('dropped_bytes')}, "
                         f"status {r['status']}")
            if pid:
                rep.add("4 1 GB output", "  server VmRSS peak while it ran (sampled every 50 ms)", mb(peak[0]))
        hwm = proc_status(pid, "VmHWM") if pid else None
        rep.add("4 1 GB output", "server peak RSS (VmHWM of the server process)", mb(hwm), "≤ 100 MB",
                None if hwm is None else hwm <= 100e6)
        for hp in helper_pids(pid) if pid else []:
            cmd = Path(f"/proc/{hp}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            name = cmd.split(" -m ", 1)[1] if " -m " in cmd else cmd[-40:]
            rep.add("4 1 GB output", f"  helper process of the server ({name})", mb(proc_status(hp, "VmHWM")),
                    note="VmHWM; not included in the server figure above")


# --------------------------------------------------------------------------- 5. a long history
async def bench_history(root: Path, rep: Report, n_history: int, n: int, *, at_cap: bool = False,
                        crashed: bool = False) -> None:
    """launch_task RT and server RSS when the workspace already holds ``n_history`` finished tasks;
    ``at_cap``: with ``tasks.max_tasks`` set to ``n_history``, so that every launch prunes the oldest;
    ``crashed``: the tasks were left running by a server that died (killed, the machine rebooted), so
    the server interrupts each one as it starts (their processes are looked for, each record rewritten).

    The records are written straight to .agent/runs/ (the server loads them at start-up), using the
    package's own record model so the format stays right; skipped if that model is not importable.
    """
    try:
        from agent_parallel.tasks.records import Ended, Running, Succeeded, TaskRecord, new_task_id
    except ImportError as exc:
        rep.anomalies.append(f"history bench skipped: cannot import the record model ({exc})")
        return
    runs = root / ".agent" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if at_cap:
        (root / ".agent" / "config.yaml").write_text(f"tasks:\n  max_tasks: {n_history}\n")
    now = time.time()
    for i in range(n_history):
        t = now - n_history + i
        state = Running(started_at=t) if crashed else Ended(started_at=t, ended_at=t + 0.001, outcome=Succeeded())
        rec = TaskRecord(task_id=new_task_id(), command="true", cwd=str(root), created_at=t, state=state)
        (runs / f"{rec.task_id}.json").write_text(rec.model_dump_json())
        (runs / f"{rec.task_id}.log").write_bytes(b"")
    t0 = time.perf_counter()
    async with server(root) as (c, pid):
        startup = time.perf_counter() - t0
        ids = [(await call(c, "launch_task", {"command": "true"}))["task_id"] for _ in range(10)]
        times: list[float] = []
        for _ in range(n):
            t1 = time.perf_counter()
            ids.append((await call(c, "launch_task", {"command": "true"}))["task_id"])
            times.append(time.perf_counter() - t1)
        await wait_tasks(c, ids, max_bytes=1)
        t1 = time.perf_counter()
        listed = await call(c, "list_tasks", {"limit": 10})
        list_s = time.perf_counter() - t1
        rss = proc_status(pid, "VmRSS") if pid else None
    if crashed:
        rep.add("5 history", f"server start + connect with {n_history:,} tasks a crashed server left running",
                f"{startup:.2f} s", "-", None, note="each interrupted and its record rewritten durably; "
                f"launch_task RT p50 after it {ms(pct(times, 50))}")
        return
    if at_cap:
        rep.add("5 history", f"  the same at the tasks.max_tasks cap ({n_history}: each launch prunes the oldest)",
                ms(pct(times, 50)), "≤ 3 ms", pct(times, 50) <= 0.003, note=f"p99 {ms(pct(times, 99))}")
        return
    rep.add("5 history", f"launch_task RT p50 with {n_history} finished tasks already recorded", ms(pct(times, 50)),
            "≤ 3 ms", pct(times, 50) <= 0.003, note=f"p99 {ms(pct(times, 99))}; server start + connect {startup:.2f} s")
    rep.add("5 history", "  server RSS with that history", mb(rss), "≤ 100 MB", None if rss is None else rss <= 100e6,
            note=f"list_tasks(limit=10) {ms(list_s)} (total {listed.get('total')})")


# --------------------------------------------------------------------------- main
def print_table(rep: Report, elapsed: float, args: argparse.Namespace) -> None:
    table = Table(title=f"agent-parallel benchmarks ({'quick' if args.quick else 'default'}; "
                        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.release()}; "
                        f"load at end {os.getloadavg()[0]:.2f}; took {elapsed:.0f} s)", show_lines=False)
    table.add_column("section", style="dim")
    table.add_column("metric")
    table.add_column("measured", justify="right")
    table.add_column("target", justify="right")
    table.add_column("result", justify="center")
    table.add_column("notes", style="dim")
    for r in rep.rows:
        result = "" if r.ok is None else ("[green]PASS[/]" if r.ok else "[red]FAIL[/]")
        table.add_row(escape(r.section), escape(r.metric), escape(r.value), escape(r.target), result, escape(r.note))
    console.print(table)
    if rep.anomalies:
        console.print("[yellow]Anomalies:[/]")
        for a in rep.anomalies:
            console.print(f"  - {escape(a)}")


async def amain(args: argparse.Namespace) -> int:
    if shutil.which(SERVER_CMD) is None:
        console.print(f"[red]{SERVER_CMD} is not on PATH; install the package (pip install -e .) first[/]")
        return 2
    q = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="ap-bench-"))
    rep = Report()
    load = os.getloadavg()[0]
    if load > 0.5:
        rep.anomalies.append(f"1-minute load average was {load:.2f} at start: other work on this machine "
                             "skews the latencies (close it and run again for clean figures)")
    t_start = time.perf_counter()
    try:
        async with server(tmp / "root-main") as (c, pid):
            if pid is None:
                rep.anomalies.append("could not find the main server's pid")
            rss_start = proc_status(pid, "VmRSS") if pid else None
            console.print("[dim]1/5 launch_task round trip…[/]")
            await bench_launch(c, rep, n=50 if q else 200, warmup=10 if q else 20, pid=pid)
            console.print("[dim]2/5 completion → return latency…[/]")
            await bench_wake(c, rep, n=15 if q else 50, sleep_s=0.1)
            console.print("[dim]3/5 many trivial tasks vs xargs…[/]")
            await bench_many(c, rep, n=300, repeats=1 if q else 3, concurrency=8, pid=pid)
            if pid:
                rss_end, hwm = proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM")
                n = LAUNCHED[0]
                per = f"{(rss_end - rss_start) / n / 1024:.1f} KB/task" if rss_start and rss_end and n else "?"
                rep.add("misc", f"main server RSS: at start → after its {n} tasks (VmHWM)",
                        f"{mb(rss_start)} → {mb(rss_end)} ({mb(hwm)})", "≤ 100 MB", None if hwm is None else hwm <= 100e6,
                        note=f"growth ≈ {per}; finished tasks stay in memory")
        console.print("[dim]4/5 1 GB of output…[/]")
        await bench_big(tmp / "root-big", rep, nbytes=200_000_000 if q else 1_000_000_000)
        console.print("[dim]5/5 launch with a long task history…[/]")
        await bench_history(tmp / "root-history", rep, n_history=2000 if q else 9000, n=50 if q else 100)
        await bench_history(tmp / "root-history-cap", rep, n_history=2000 if q else 10_000, n=50 if q else 100,
                            at_cap=True)
        await bench_history(tmp / "root-history-crashed", rep, n_history=2000 if q else 9000, n=20, crashed=True)
    finally:
        if args.keep:
            console.print(f"[dim]kept {tmp}[/]")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if SLOW_LAUNCHES:
        rep.anomalies.append(
            f"{len(SLOW_LAUNCHES)} launch_task call(s) took over {SLOW_LAUNCH_S} s (max {max(SLOW_LAUNCHES):.2f} s): "
            "the server may have held the start (admission: load average above resources.max_load, "
            "or low memory), and launch_task waits for the start before answering")
    print_table(rep, time.perf_counter() - t_start, args)
    return 0 if all(r.ok is not False for r in rep.rows) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (and 200 MB instead of 1 GB)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workspace roots (logs, records)")
    return anyio.run(amain, p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
