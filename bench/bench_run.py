#!/usr/bin/env python
"""Benchmark of real queue runs: run_queue against wave-by-wave execution, and scheduler overhead.

Run by hand:  python bench/bench_run.py [--quick] [--seed N] [--details] [--keep]

Real runs (real processes, real clock) of generated DAGs of ``sleep`` items. Durations are
"seconds scaled down": 0.1 to 0.6 s per item, and each item's ``estimate`` equals its sleep, so
the plan's lower bound (max of critical path, total work / slots, longest serial set) is a real
bound on the achieved makespan, up to process start and exit costs. Random and layered DAGs of
15-30 items, about a fifth of the items sharing one of three files (file conflicts), max_parallel 4.

For each DAG, one ``agent-parallel serve --root WORKSPACE`` over stdio (``mcp.Client`` with
``StdioServerParameters``: the console script, as a client starts it), and in that one session:

1. ``queue_plan`` at the start (all items pending): its ``waves`` and predicted makespan.
2. ``run_queue`` and ``task_output(run_id)`` until done: achieved makespan (first start to last
   end, from the report) / the lower bound.
3. The item files are renamed back to ``pending``; then the plan's waves run one at a time:
   ``launch_task(item=ID)`` for every item of the wave (sent concurrently, as an agent's
   parallel tool calls would be), then ``task_output(task_ids=[...], wait="all")``, then the next
   wave. ``queue_plan``'s waves are the batches its simulation starts at each slot-free event, so
   most are a single item; run behind barriers they are close to serial.
4. Reset again, then "levels": the naive wave-by-wave an agent does by hand. Items grouped by
   dependency level; each level cut into batches of at most max_parallel items that share no
   file (first fit by id); launch a batch, wait for all, next batch. Reported beside (3) because
   it is the fairer baseline.

Scheduler overhead, measured from the run reports' per-item ``started_at``/``ended_at`` (Unix
times taken in the server: just before the process is spawned, and once it has been reaped):

* start delay: for each item of a run_queue run, how long it waited while it could have run:
  the final stretch before its start during which all its dependencies had ended, no item it
  conflicts with was running and fewer than max_parallel items were running (one pass over the
  start and end events). Items the scheduler legitimately held back (slots full, a conflicting
  item running) are not counted as delayed for that time. The first item of a run is the anchor
  (delay 0); the call -> first start latency is reported separately. Mean, p50, p95, max in ms.
  Late starts (> 20 ms) are counted, with how many started right after some later, unrelated
  item end: the signature of a missed wake-up (the end that made them startable went unnoticed).
* item run overhead: (ended_at - started_at) - sleep: spawn, shell, reap, log drain.
* replay gap: achieved makespan minus a zero-overhead replay of the same scheduling rule
  (the product's own ``simulate`` with the plan's ranks) fed with each item's measured duration:
  the time lost between items along the realised critical chain.
* 200 ``true`` items, no dependencies, max_parallel 4, in a fresh workspace: run wall time / N
  (from the report's makespan, and from the client's run_queue call to task_output's answer),
  beside ``xargs -P4`` running the same 200 ``sh -c true`` as the process-spawning floor, and
  the mean number of items running (sum of durations / makespan) to show what limits it.

Targets (issue 4): achieved <= 1.15 x lower bound on average; scheduler overhead <= 5 ms per item.
Takes about 2.5 minutes (``--quick``: about 45 s, 2 DAGs per family of 15-20 items).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator

import anyio
from bench_common import pct, server_env
import yaml
from mcp import Client, StdioServerParameters
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent_parallel.queue.planner import build_graph, simulate
from agent_parallel.queue.items import WorkItem, format_id

console = Console(width=None if sys.stdout.isatty() else 200)
SERVER_CMD = "agent-parallel"
MAX_PARALLEL = 4
SHARED_FILES = 3
CONFLICT_RATE = 0.2
TARGET_RATIO = 1.15
TARGET_OVERHEAD_MS = 5.0
N_TRUE = 200
LATE_S = 0.02


# --------------------------------------------------------------------------- DAGs


@dataclass
class Item:
    id: int
    deps: list[int]
    files: list[str]
    sleep: float

    @property
    def key(self) -> str:
        return format_id(self.id)


@dataclass
class Dag:
    family: str
    index: int
    items: list[Item]

    @property
    def name(self) -> str:
        return f"{self.family}-{self.index}"

    def conflicts(self) -> dict[int, set[int]]:
        by_file: dict[str, set[int]] = {}
        for item in self.items:
            for f in item.files:
                by_file.setdefault(f, set()).add(item.id)
        out: dict[int, set[int]] = {item.id: set() for item in self.items}
        for ids in by_file.values():
            for a in ids:
                out[a] |= ids - {a}
        return out


def _sleep(rng: random.Random) -> float:
    return rng.choice([0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6])


def _files(rng: random.Random, item_id: int) -> list[str]:
    if rng.random() < CONFLICT_RATE:
        return [f"shared/f{rng.randrange(SHARED_FILES)}.py"]
    return [f"own/item{item_id}.py"]


def random_dag(rng: random.Random, index: int, sizes: tuple[int, int]) -> Dag:
    """Each item waits on earlier items with probability ~c/n (c in 1.5..3), at most 3 of them."""
    n = rng.randint(*sizes)
    p = rng.uniform(1.5, 3.0) / n
    items = []
    for i in range(1, n + 1):
        deps = [d for d in range(1, i) if rng.random() < p]
        deps = sorted(rng.sample(deps, 3)) if len(deps) > 3 else deps
        items.append(Item(i, deps, _files(rng, i), _sleep(rng)))
    return Dag("random", index, items)


def layered_dag(rng: random.Random, index: int, sizes: tuple[int, int]) -> Dag:
    """Layers of 2-8 items, each waiting on 1-2 items of the layer before."""
    n = rng.randint(*sizes)
    items: list[Item] = []
    previous: list[int] = []
    while len(items) < n:
        width = min(rng.randint(2, 8), n - len(items))
        layer = []
        for _ in range(width):
            i = len(items) + 1
            deps = sorted(rng.sample(previous, min(len(previous), rng.randint(1, 2)))) if previous else []
            items.append(Item(i, deps, _files(rng, i), _sleep(rng)))
            layer.append(i)
        previous = layer
    return Dag("layered", index, items)


def write_workspace(root: Path, dag_items: list[Item], *, command: str | None = None) -> None:
    """The config (max_parallel) and one item file per item, as a user would write them."""
    (root / ".agent" / "queue").mkdir(parents=True, exist_ok=True)
    (root / ".agent" / "config.yaml").write_text(yaml.safe_dump({"autonomy": {"max_parallel": MAX_PARALLEL}}))
    for item in dag_items:
        front: dict[str, Any] = {"command": command or f"sleep {item.sleep:g}",
                                 "estimate": f"{item.sleep:g}s", "files": item.files}
        if item.deps:
            front["blocked_by"] = [format_id(d) for d in item.deps]
        text = f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n# Item {item.id}\n\nSleep {item.sleep:g} s.\n"
        (root / ".agent" / "queue" / f"{item.key}-pending-item-{item.id}.md").write_text(text)


def reset_to_pending(root: Path) -> int:
    """Rename every item file back to ``pending`` (the bench owns this workspace); returns how many moved."""
    moved = 0
    for path in (root / ".agent" / "queue").glob("*.md"):
        num, status, slug = path.name.split("-", 2)
        if status != "pending":
            path.rename(path.with_name(f"{num}-pending-{slug}"))
            moved += 1
    return moved


def statuses(root: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in (root / ".agent" / "queue").glob("*.md"):
        status = path.name.split("-", 2)[1]
        counts[status] = counts.get(status, 0) + 1
    return counts


def levels(dag: Dag) -> list[list[int]]:
    """Dependency levels, each cut into batches of <= MAX_PARALLEL mutually non-conflicting items (first fit)."""
    level: dict[int, int] = {}
    for item in dag.items:  # ids are topological (deps always earlier)
        level[item.id] = 1 + max((level[d] for d in item.deps), default=-1)
    conflicts = dag.conflicts()
    batches: list[list[int]] = []
    for depth in range(max(level.values()) + 1):
        mine: list[list[int]] = []
        for item_id in sorted(i for i, v in level.items() if v == depth):
            for batch in mine:
                if len(batch) < MAX_PARALLEL and not conflicts[item_id] & set(batch):
                    batch.append(item_id)
                    break
            else:
                mine.append([item_id])
        batches += mine
    return batches


# --------------------------------------------------------------------------- helpers


class ToolFailed(Exception):
    pass


def iso_to_epoch(s: str | None) -> float | None:
    return None if not s else datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


async def call(c: Client, name: str, args: dict[str, Any]) -> dict[str, Any]:
    res = await c.call_tool(name, args)
    if res.is_error:
        text = " ".join(getattr(b, "text", "") for b in res.content)
        raise ToolFailed(f"{name}({args}) -> tool error: {text}")
    assert res.structured_content is not None, f"{name}: no structured content"
    return res.structured_content


async def wait_done(c: Client, args: dict[str, Any]) -> dict[str, Any]:
    while True:
        r = await call(c, "task_output", {**args, "block": True, "timeout": 50, "max_bytes": 256})
        if r["retrieval_status"] != "timeout":
            return r


@asynccontextmanager
async def serve(root: Path) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=SERVER_CMD, args=["serve", "--root", str(root)], env=server_env())
    async with Client(params, read_timeout_seconds=120) as c:
        await c.list_tools()
        yield c


# --------------------------------------------------------------------------- measurements


@dataclass
class Interval:
    start: float
    end: float
    duration: float


@dataclass
class DagResult:
    dag: Dag
    lower_bound: float
    predicted: float
    plan_waves: list[list[str]]
    achieved: float | None = None
    run_intervals: dict[int, Interval] = field(default_factory=dict)
    call_to_first_start: float | None = None
    waves_makespan: float | None = None
    waves_predicted: float | None = None
    waves_gaps: list[float] = field(default_factory=list)
    levels_makespan: float | None = None
    levels_predicted: float | None = None
    levels_gaps: list[float] = field(default_factory=list)
    start_delays: list[tuple[int, float]] = field(default_factory=list)
    replay: float | None = None
    anomalies: list[str] = field(default_factory=list)


def start_delays(dag: Dag, iv: dict[int, Interval]) -> list[tuple[int, float]]:
    """(item, seconds it waited at the end while it could have run); see the module docstring."""
    conflicts = dag.conflicts()
    deps = {item.id: item.deps for item in dag.items}
    anchor = min(v.start for v in iv.values())
    events = sorted({v.start for v in iv.values()} | {v.end for v in iv.values()})
    out = []
    for i, me in iv.items():
        if me.start == anchor:
            out.append((i, 0.0))
            continue
        eligible = max([iv[d].end for d in deps[i]], default=anchor)
        if eligible > me.start:  # started before a dependency ended: should never happen
            out.append((i, float("nan")))
            continue
        times = [eligible] + [t for t in events if eligible < t < me.start]
        free_since: float | None = None
        for t in times:
            running = [j for j, v in iv.items() if j != i and v.start <= t < v.end]
            blocked = len(running) >= MAX_PARALLEL or bool(conflicts[i] & set(running))
            if blocked:
                free_since = None
            elif free_since is None:
                free_since = t
        out.append((i, me.start - free_since if free_since is not None else 0.0))
    return out


def replay_makespan(dag: Dag, iv: dict[int, Interval]) -> float:
    """The product's list scheduling with the plan's ranks, fed the measured durations, zero overhead."""
    def items(duration: dict[int, float]) -> list[WorkItem]:
        return [WorkItem(id=it.id, id_str=it.key, file=f"{it.key}-pending-x.md", path="", slug="x",
                         status="pending", title="x", blocked_by=it.deps, files=it.files,
                         estimate_s=duration[it.id]) for it in dag.items]

    planned = build_graph(items({it.id: it.sleep for it in dag.items}))
    actual = build_graph(items({i: v.duration for i, v in iv.items()}))
    return simulate(actual, MAX_PARALLEL, rank=planned.rank).makespan_ms / 1000


def intervals_from_outcomes(outcomes: list[dict[str, Any]]) -> dict[int, Interval]:
    out = {}
    for o in outcomes:
        if o["started_at"] is not None and o["ended_at"] is not None:
            out[int(o["item"])] = Interval(o["started_at"], o["ended_at"], o["ended_at"] - o["started_at"])
    return out


async def run_barriers(c: Client, root: Path, batches: list[list[str]], res: DagResult, label: str
                       ) -> tuple[float | None, list[float]]:
    """Launch each batch (concurrent launch_task(item=...)), wait for all, next; makespan and barrier gaps."""
    first_start, last_end = None, None
    gaps: list[float] = []
    for batch in batches:
        ids: list[str | None] = [None] * len(batch)
        errors: list[str] = []

        async def launch(k: int, item: str) -> None:
            try:
                ids[k] = (await call(c, "launch_task", {"item": item}))["task_id"]
            except ToolFailed as exc:
                errors.append(str(exc))

        async with anyio.create_task_group() as tg:
            for k, item in enumerate(batch):
                tg.start_soon(launch, k, item)
        if errors:
            res.anomalies.append(f"{label}: launch refused: {errors[0]}")
            return None, gaps
        r = await wait_done(c, {"task_ids": ids, "wait": "all"})
        views = r["tasks"]
        bad = [v for v in views if v["status"] != "completed"]
        if bad:
            res.anomalies.append(f"{label}: item {bad[0]['item_id']} ended {bad[0]['status']}: {bad[0]['reason']}")
            return None, gaps
        starts = [iso_to_epoch(v["started_at"]) for v in views]
        ends = [iso_to_epoch(v["ended_at"]) for v in views]
        if last_end is not None:
            gaps.append(min(starts) - last_end)
        first_start = min(starts) if first_start is None else first_start
        last_end = max(ends)
    left = statuses(root)
    if left.get("completed", 0) != len(res.dag.items):
        res.anomalies.append(f"{label}: queue after the waves: {left}")
    return (last_end - first_start) if first_start is not None else None, gaps


async def bench_dag(dag: Dag, root: Path) -> DagResult:
    write_workspace(root, dag.items)
    sleeps = {it.key: it.sleep for it in dag.items}
    async with serve(root) as c:
        plan = await call(c, "queue_plan", {"max_parallel": MAX_PARALLEL})
        res = DagResult(dag, plan["lower_bound"], plan["predicted_makespan"], plan["waves"])
        if plan["errors"]:
            res.anomalies.append(f"plan errors: {plan['errors'][:2]}")
        # (a) run_queue
        t_call = time.time()
        started = await call(c, "run_queue", {"max_parallel": MAX_PARALLEL})
        if abs(started["lower_bound"] - res.lower_bound) > 1e-6:
            res.anomalies.append(f"run_queue lower bound {started['lower_bound']} != plan's {res.lower_bound}")
        out = await wait_done(c, {"task_id": started["run_id"]})
        run = out["run"]
        res.achieved = run["makespan"]
        res.run_intervals = intervals_from_outcomes(run["outcomes"])
        not_done = [o for o in run["outcomes"] if o["outcome"] != "completed"]
        if not_done or len(run["outcomes"]) != len(dag.items):
            res.anomalies.append(f"run_queue: {run['counts']}; e.g. {not_done[:1]}")
        if res.run_intervals:
            first = min(v.start for v in res.run_intervals.values())
            last = max(v.end for v in res.run_intervals.values())
            res.call_to_first_start = first - t_call
            if res.achieved is not None and abs((last - first) - res.achieved) > 0.002:
                res.anomalies.append(f"run_queue: reported makespan {res.achieved} != last end - first start "
                                     f"{last - first:.3f}")
            if len(res.run_intervals) == len(dag.items):
                res.start_delays = start_delays(dag, res.run_intervals)
                early = [format_id(i) for i, d in res.start_delays if d != d]
                if early:
                    res.anomalies.append(f"run_queue started {early} before a dependency had ended")
                res.replay = replay_makespan(dag, res.run_intervals)
        # (b) the plan's waves, behind barriers
        reset_to_pending(root)
        res.waves_predicted = sum(max(sleeps[i] for i in wave) for wave in res.plan_waves)
        res.waves_makespan, res.waves_gaps = await run_barriers(c, root, res.plan_waves, res, "plan waves")
        # (c) levels, behind barriers
        reset_to_pending(root)
        batches = [[format_id(i) for i in batch] for batch in levels(dag)]
        res.levels_predicted = sum(max(sleeps[i] for i in b) for b in batches)
        res.levels_makespan, res.levels_gaps = await run_barriers(c, root, batches, res, "levels")
    return res


@dataclass
class TrueResult:
    n: int
    makespan: float | None
    client_wall: float
    xargs_wall: float
    busy: float
    anomalies: list[str]


async def bench_true(root: Path, n: int) -> TrueResult:
    items = [Item(i, [], [f"own/t{i}.py"], 0.0) for i in range(1, n + 1)]
    write_workspace(root, items, command="true")
    anomalies: list[str] = []
    async with serve(root) as c:
        t0 = time.perf_counter()
        started = await call(c, "run_queue", {"max_parallel": MAX_PARALLEL})
        out = await wait_done(c, {"task_id": started["run_id"]})
        wall = time.perf_counter() - t0
    run = out["run"]
    if run["counts"].get("completed") != n:
        anomalies.append(f"{n} true items: {run['counts']}")
    iv = intervals_from_outcomes(run["outcomes"])
    t0 = time.perf_counter()
    subprocess.run(f"seq {n} | xargs -P{MAX_PARALLEL} -n1 sh -c true", shell=True, check=True)
    xargs = time.perf_counter() - t0
    return TrueResult(n, run["makespan"], wall, xargs, sum(v.duration for v in iv.values()), anomalies)


# --------------------------------------------------------------------------- report


def f2(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:.1f}"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("[green]PASS[/]" if ok else "[red]FAIL[/]")


def ratios(results: list[DagResult], attr: str) -> list[float]:
    return [getattr(r, attr) / r.lower_bound for r in results if getattr(r, attr) is not None and r.lower_bound]


def mean_worst(values: list[float]) -> str:
    return "-" if not values else f"{statistics.mean(values):.3f} / {max(values):.3f}"


def print_details(results: list[DagResult]) -> None:
    t = Table(title="Per DAG (seconds)", title_justify="left")
    for col in ("DAG", "items", "conflicting", "lower bound", "predicted", "run_queue", "replay",
                "plan waves (n)", "levels (n)", "start delay mean/max ms", f"late starts (> {LATE_S * 1000:.0f} ms)"):
        t.add_column(col, justify="right")
    for r in results:
        conflicting = sum(1 for v in r.dag.conflicts().values() if v)
        d = [x for _, x in r.start_delays if x == x]
        t.add_row(r.dag.name, str(len(r.dag.items)), str(conflicting), f2(r.lower_bound), f2(r.predicted),
                  f2(r.achieved), f2(r.replay), f"{f2(r.waves_makespan)} ({len(r.plan_waves)})",
                  f"{f2(r.levels_makespan)} ({len(levels(r.dag))})",
                  f"{ms(statistics.mean(d)) if d else '-'} / {ms(max(d)) if d else '-'}",
                  ", ".join(f"{format_id(i)} {ms(x)}" for i, x in r.start_delays if x == x and x > LATE_S))
    console.print(t)


def print_table(results: list[DagResult], tr: TrueResult, elapsed: float, load: tuple[float, float]) -> bool:
    t = Table(title=f"agent-parallel real queue runs (max_parallel {MAX_PARALLEL}, {len(results)} DAGs, "
                    f"{sum(len(r.dag.items) for r in results)} items; stdio server; {elapsed:.0f} s)",
              title_justify="left", show_lines=False)
    for col, just in (("section", "left"), ("metric", "left"), ("value", "right"), ("target", "right"),
                      ("result", "center"), ("note", "left")):
        t.add_column(col, justify=just, overflow="fold")
    all_ok = True
    families = sorted({r.dag.family for r in results}, reverse=True)
    for family in families + ["all"]:
        rs = [r for r in results if family == "all" or r.dag.family == family]
        label = f"{family} ({len(rs)} DAGs, {min(len(r.dag.items) for r in rs)}-{max(len(r.dag.items) for r in rs)} items)"
        rq = ratios(rs, "achieved")
        ok = bool(rq) and statistics.mean(rq) <= TARGET_RATIO
        if family == "all":
            all_ok &= ok
        t.add_row(label, "run_queue achieved / lower bound (mean / worst)", mean_worst(rq),
                  f"mean <= {TARGET_RATIO}", verdict(ok),
                  f"plan predicted / LB {mean_worst(ratios(rs, 'predicted'))}")
        ach_pred = [r.achieved / r.predicted for r in rs if r.achieved and r.predicted]
        t.add_row("", "run_queue achieved / predicted (mean / worst)", mean_worst(ach_pred), "-", "",
                  "the runtime's share of the gap: overheads, process start/exit")
        t.add_row("", "plan waves behind barriers / LB (mean / worst)", mean_worst(ratios(rs, "waves_makespan")),
                  "-", "", f"predicted {mean_worst(ratios(rs, 'waves_predicted'))}; "
                  f"{statistics.mean(len(r.plan_waves) for r in rs):.1f} waves per DAG")
        t.add_row("", "levels behind barriers / LB (mean / worst)", mean_worst(ratios(rs, "levels_makespan")),
                  "-", "", f"predicted {mean_worst(ratios(rs, 'levels_predicted'))}")
        speed = [r.levels_makespan / r.achieved for r in rs if r.levels_makespan and r.achieved]
        speed_w = [r.waves_makespan / r.achieved for r in rs if r.waves_makespan and r.achieved]
        t.add_row("", "run_queue speed-up vs levels / vs plan waves (mean)",
                  f"{statistics.mean(speed):.2f}x / {statistics.mean(speed_w):.2f}x" if speed and speed_w else "-",
                  "> 1", verdict(bool(speed) and statistics.mean(speed) > 1), "")
    delays = [d for r in results for i, d in r.start_delays if d == d and not _is_anchor(r, i)]
    ok = bool(delays) and statistics.mean(delays) <= TARGET_OVERHEAD_MS / 1000
    all_ok &= ok
    t.add_row("overhead (run_queue, DAGs)", f"start delay per item, ms: mean / p50 / p95 / max (n={len(delays)})",
              f"{ms(statistics.mean(delays))} / {ms(pct(delays, 50))} / {ms(pct(delays, 95))} / {ms(max(delays))}"
              if delays else "-", f"mean <= {TARGET_OVERHEAD_MS:g}", verdict(ok),
              "time an item waited with its deps ended, a slot free and no conflicting item running")
    late = [(r, i, d) for r in results for i, d in r.start_delays if d == d and d > LATE_S]
    woken_later = sum(1 for r, i, d in late if _woken_by_later_end(r, i, d))
    missed = {(id(r), i) for r, i, d in late if _woken_by_later_end(r, i, d)}
    rest = [d for r in results for i, d in r.start_delays
            if d == d and not _is_anchor(r, i) and (id(r), i) not in missed]
    t.add_row("", f"late starts (delay > {LATE_S * 1000:.0f} ms)", f"{len(late)} of {len(delays)}", "-", "",
              f"{woken_later} of them started within {LATE_S * 1000:.0f} ms of a later, unrelated end: woken by "
              "that end, not by the one that made them startable (a missed wake-up)")
    if missed:
        t.add_row("", "start delay without those missed wake-ups, ms: mean / p95",
                  f"{ms(statistics.mean(rest))} / {ms(pct(rest, 95))}" if rest else "-",
                  f"mean <= {TARGET_OVERHEAD_MS:g}", "", "what the loop costs when it does react to an end")
    first = [r.call_to_first_start for r in results if r.call_to_first_start is not None]
    t.add_row("", "run_queue call -> first item start, ms (mean / max)",
              f"{ms(statistics.mean(first))} / {ms(max(first))}" if first else "-", "-", "",
              "plan the queue, register the run, claim + spawn the first item")
    run_extra = [v.duration - s for r in results for i, v in r.run_intervals.items()
                 for s in [next(it.sleep for it in r.dag.items if it.id == i)]]
    t.add_row("", "item run overhead (duration - sleep), ms: mean / p95",
              f"{ms(statistics.mean(run_extra))} / {ms(pct(run_extra, 95))}" if run_extra else "-", "-", "",
              "spawn + sh + reap + log drain; inside the item, not between items")
    gap = [(r.achieved - r.replay) for r in results if r.achieved is not None and r.replay is not None]
    per_item = [(r.achieved - r.replay) / len(r.dag.items) for r in results if r.achieved and r.replay]
    t.add_row("", "achieved - zero-overhead replay, ms per DAG: mean / max (per item)",
              f"{ms(statistics.mean(gap))} / {ms(max(gap))} ({ms(statistics.mean(per_item))})" if gap else "-",
              "-", "", "replay: same rule, measured durations; the loss between items on the chain")
    bgaps = [g for r in results for g in r.waves_gaps + r.levels_gaps]
    t.add_row("overhead (barriers)", "wave end -> next wave start, ms: mean / p95",
              f"{ms(statistics.mean(bgaps))} / {ms(pct(bgaps, 95))}" if bgaps else "-", "-", "",
              "client round trips: task_output answer, then concurrent launch_task(item) calls")
    if tr.makespan is not None:
        per = tr.makespan / tr.n
        ok = per <= TARGET_OVERHEAD_MS / 1000
        all_ok &= ok
        t.add_row(f"{tr.n} `true` items", "run makespan / N, ms per item", ms(per),
                  f"<= {TARGET_OVERHEAD_MS:g}", verdict(ok), f"first start -> last end, {MAX_PARALLEL} slots")
    t.add_row("", "client wall (run_queue call -> report) / N, ms", ms(tr.client_wall / tr.n), "-", "", "")
    t.add_row("", f"xargs -P{MAX_PARALLEL} sh -c true / N, ms (floor)", ms(tr.xargs_wall / tr.n), "-", "",
              f"net scheduler cost ~{ms(((tr.makespan or tr.client_wall) - tr.xargs_wall) / tr.n)} ms per item")
    if tr.makespan:
        t.add_row("", "mean items running (sum of durations / makespan)", f"{tr.busy / tr.makespan:.2f}",
                  "-", "", f"of {MAX_PARALLEL} slots: below means starts are the bottleneck, not slots")
    t.add_row("machine", "CPUs / load average before -> after", f"{os.cpu_count()} / {load[0]:.2f} -> {load[1]:.2f}",
              "-", "", "sleep items use no CPU, but a busy machine slows every spawn and wake-up")
    console.print(t)
    return all_ok


def _woken_by_later_end(r: DagResult, i: int, delay: float) -> bool:
    """Whether item i, startable since (start - delay), started right after an end that came well after that."""
    start = r.run_intervals[i].start
    ends = [v.end for v in r.run_intervals.values() if start - delay + LATE_S <= v.end <= start]
    return bool(ends) and start - max(ends) <= LATE_S


def _is_anchor(r: DagResult, i: int) -> bool:
    return r.run_intervals[i].start == min(v.start for v in r.run_intervals.values())


# --------------------------------------------------------------------------- main


async def amain(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    per_family = 2 if args.quick else 4
    sizes = (15, 20) if args.quick else (15, 30)
    dags = []
    for k in range(per_family):
        dags.append(random_dag(rng, k + 1, sizes))
        dags.append(layered_dag(rng, k + 1, sizes))
    load0 = os.getloadavg()[0]
    base = Path(tempfile.mkdtemp(prefix="bench-run-"))
    started = time.perf_counter()
    results: list[DagResult] = []
    try:
        for dag in dags:
            t0 = time.perf_counter()
            res = await bench_dag(dag, base / dag.name)
            results.append(res)
            console.print(f"[dim]{dag.name}: {len(dag.items)} items, LB {res.lower_bound:.2f}s, run_queue "
                          f"{f2(res.achieved)}s, plan waves {f2(res.waves_makespan)}s, levels "
                          f"{f2(res.levels_makespan)}s ({time.perf_counter() - t0:.1f}s)[/]")
        tr = await bench_true(base / "true", N_TRUE)
        elapsed = time.perf_counter() - started
        if args.details:
            print_details(results)
        ok = print_table(results, tr, elapsed, (load0, os.getloadavg()[0]))
        anomalies = [f"{r.dag.name}: {a}" for r in results for a in r.anomalies] + tr.anomalies
        for a in anomalies:
            console.print(f"[yellow]anomaly[/] {escape(a)}")
        if args.keep:
            console.print(f"workspaces kept in {base}")
        return 0 if ok and not anomalies else 1
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 DAGs per family of 15-20 items (about 45 s)")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--details", action="store_true", help="also print one row per DAG")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspaces (logs, run reports)")
    return anyio.run(amain, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
