#!/usr/bin/env python
"""Benchmarks for the queue planner: speed on large queues, and the quality of its schedules.

Run by hand:  python bench/bench_plan.py [--quick] [--seed N]

1. Speed: queues of 1,000 / 5,000 / 10,000 items written to a temporary workspace (about 1.5
   dependencies and one file each, half in YAML front matter and half in the origin's bold label
   lines). ``plan_workspace`` cold (new reader: every file parsed), warm (same reader, nothing
   changed: no file parsed, the plan of the unchanged snapshot reused) and after editing one file
   (one file parsed, the whole plan recomputed). Targets at 10,000: cold <= 2 s, warm <= 0.3 s.
2. Quality: random and layered DAGs with estimates and some file conflicts. For each, the
   predicted makespan of three rules divided by the plan's lower bound: our priority rule (list
   scheduling by critical path, then unblocked count, ...), plain level-by-level waves (every item
   of a level, at most max_parallel at a time, and the next level only when the whole level is
   done), and first-in-first-out by id (list scheduling by id). Target: our mean <= 1.10, and
   better than both others.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent_parallel.queue.planner import build_graph, lower_bound_ms, simulate
from agent_parallel.queue.plan import plan_workspace
from agent_parallel.queue.items import QueueReader, WorkItem, format_id

console = Console(width=None if sys.stdout.isatty() else 160)


# --- 1. speed -------------------------------------------------------------------------------------------


def write_queue(root: Path, size: int, rng: random.Random) -> None:
    """`size` items, ~1.5 dependencies each on earlier items, one file each from a shared pool."""
    queue = root / ".agent" / "queue"
    queue.mkdir(parents=True)
    pool = max(1, size // 2)
    for item_id in range(1, size + 1):
        deps = sorted({rng.randrange(max(1, item_id - 200), item_id) for _ in range(rng.choice((1, 2)))}
                      ) if item_id > 1 else []
        shared = rng.randrange(pool)
        path = f"src/pkg{shared % 50}/mod{shared}.py"
        estimate = rng.choice(("45s", "5m", "30m", "1h", "2h", 20))
        status = "completed" if item_id <= size // 10 else "pending"
        name = f"{item_id:05d}-{status}-item-{item_id}.md"
        dep_text = ", ".join(format_id(dep) for dep in deps) or "none"
        if item_id % 2:
            text = (f"---\ntitle: Item {item_id}\nblocked_by: [{dep_text if deps else ''}]\n"
                    f"files: [{path}]\nestimate: {estimate}\n---\nDo item {item_id}.\n")
        else:
            text = (f"# Item {item_id}\n\n**BlockedBy**: {dep_text} (generated)\n**Files**: {path}\n"
                    f"**Estimate**: {estimate}\n\nDo item {item_id}.\n")
        (queue / name).write_text(text)


def bench_speed(sizes: list[int], rng: random.Random, repeats: int) -> Table:
    table = Table(title="plan_workspace on generated queues (best of the repeats)", title_justify="left")
    for column in ("items", "cold (s)", "warm (s)", "1 file edited (s)", "files parsed cold/warm/edited",
                   "conflicts", "waves", "target at 10,000"):
        table.add_column(column, justify="right")
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_queue(root, size, rng)
            edited = sorted((root / ".agent" / "queue").iterdir())[size // 2]
            colds, warms, edits = [], [], []
            for repeat in range(repeats):
                reader = QueueReader()
                started = time.perf_counter()
                plan = plan_workspace(root, None, 5, reader)
                colds.append(time.perf_counter() - started)
                parsed = [reader.parse_count]
                started = time.perf_counter()
                plan = plan_workspace(root, None, 5, reader)
                warms.append(time.perf_counter() - started)
                parsed.append(reader.parse_count - parsed[0])
                edited.write_text(edited.read_text() + f"\nEdited ({repeat}).\n")
                started = time.perf_counter()
                plan = plan_workspace(root, None, 5, reader)
                edits.append(time.perf_counter() - started)
                parsed.append(reader.parse_count - parsed[0] - parsed[1])
            cold, warm, edit = min(colds), min(warms), min(edits)
            target = ""
            if size == 10_000:
                target = ("cold ok" if cold <= 2 else "COLD SLOW") + ", " + ("warm ok" if warm <= 0.3 else "WARM SLOW")
            table.add_row(f"{size:,}", f"{cold:.3f}", f"{warm:.3f}", f"{edit:.3f}", "/".join(map(str, parsed)),
                          str(len(plan.conflicts)), str(len(plan.waves)), target)
    return table


# --- 2. quality ------------------------------------------------------------------------------------------


def _item(item_id: int, deps: list[int], files: list[str], estimate_s: float) -> WorkItem:
    return WorkItem(id=item_id, id_str=format_id(item_id), file=f"{item_id:03d}-pending-x.md", path="",
                    slug="x", status="pending", title="x", blocked_by=deps, files=files, estimate_s=estimate_s)


def _estimate(rng: random.Random) -> float:
    """Heavy-tailed durations between about 1 and 120 minutes."""
    return round(min(7200.0, 60 * rng.lognormvariate(2.3, 0.9)), 0)


def _files(rng: random.Random, pool: int, conflict_rate: float) -> list[str]:
    if rng.random() < conflict_rate:
        return [f"shared/f{rng.randrange(pool)}.py"]
    return [f"own/{rng.random()}.py"]


def random_dag(rng: random.Random) -> tuple[list[WorkItem], int]:
    size = rng.choice((20, 50, 100, 200))
    edge_probability = rng.choice((1.0, 1.5, 2.5)) / size * 2
    conflict_rate = rng.choice((0.0, 0.1, 0.3))
    items = []
    for item_id in range(1, size + 1):
        deps = [dep for dep in range(1, item_id) if rng.random() < edge_probability]
        items.append(_item(item_id, deps, _files(rng, max(2, size // 5), conflict_rate), _estimate(rng)))
    return items, rng.choice((2, 3, 4, 5, 8))


def layered_dag(rng: random.Random) -> tuple[list[WorkItem], int]:
    layers, width = rng.choice((3, 5, 8)), rng.choice((3, 6, 10, 20))
    conflict_rate = rng.choice((0.0, 0.1, 0.3))
    items, previous, next_id = [], [], 1
    for _ in range(layers):
        layer = []
        for _ in range(rng.randint(max(1, width // 2), width)):
            deps = sorted(rng.sample(previous, min(len(previous), rng.randint(1, 3)))) if previous else []
            items.append(_item(next_id, deps, _files(rng, max(2, width // 2), conflict_rate), _estimate(rng)))
            layer.append(next_id)
            next_id += 1
        previous = layer
    return items, rng.choice((2, 3, 4, 5, 8))


def level_by_level_ms(graph, max_parallel: int) -> int:
    """Plain waves: all items of one dependency level, list-scheduled by id within the level
    (conflicts and max_parallel honoured), and a barrier before the next level."""
    level: dict[int, int] = {}
    for item_id in sorted(graph.position, key=graph.position.__getitem__):
        level[item_id] = 1 + max((level[p] for p in graph.waits_on[item_id] if p in level), default=-1)
    now = 0
    for depth in range(max(level.values(), default=-1) + 1):
        waiting = sorted(item_id for item_id, value in level.items() if value == depth)
        running: list[tuple[int, int]] = []
        while waiting or running:
            for item_id in list(waiting):
                if len(running) >= max_parallel:
                    break
                if all(other not in graph.conflicts.get(item_id, ()) for _, other in running):
                    running.append((now + graph.estimate_ms[item_id], item_id))
                    waiting.remove(item_id)
            running.sort()
            now = running[0][0]
            running = [(end, item_id) for end, item_id in running if end > now]
    return now


def bench_quality(instances: int, rng: random.Random) -> Table:
    table = Table(title="Schedule quality: predicted makespan / lower bound", title_justify="left")
    for column in ("family", "DAGs", "ours mean", "ours worst", "levels mean", "levels worst",
                   "FIFO mean", "FIFO worst", "ours best-or-tied"):
        table.add_column(column, justify="right")
    for family, generate in (("random", random_dag), ("layered", layered_dag)):
        ratios: dict[str, list[float]] = {"ours": [], "levels": [], "fifo": []}
        best_or_tied = 0
        for _ in range(instances):
            items, max_parallel = generate(rng)
            graph = build_graph(items)
            bound = lower_bound_ms(graph, max_parallel)
            ours = simulate(graph, max_parallel).makespan_ms
            fifo = simulate(graph, max_parallel, rank={item_id: item_id for item_id in graph.schedulable}).makespan_ms
            levels = level_by_level_ms(graph, max_parallel)
            for name, value in (("ours", ours), ("levels", levels), ("fifo", fifo)):
                ratios[name].append(value / bound)
            best_or_tied += ours <= min(fifo, levels)
        row = [family, str(instances)]
        for name in ("ours", "levels", "fifo"):
            row += [f"{statistics.mean(ratios[name]):.3f}", f"{max(ratios[name]):.3f}"]
        row.append(f"{best_or_tied}/{instances}")
        table.add_row(*row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 5,000 items only, fewer DAGs")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sizes = [1_000, 5_000] if args.quick else [1_000, 5_000, 10_000]
    console.print(bench_speed(sizes, rng, repeats=1 if args.quick else 3))
    console.print(bench_quality(100 if args.quick else 400, rng))


if __name__ == "__main__":
    main()
