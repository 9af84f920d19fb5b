#!/usr/bin/env python
"""Benchmarks for the queue planner: speed on large queues against the code before the speed work, and the
quality of its schedules.

Run by hand:  python bench/bench_plan.py [--quick] [--seed N] [--baseline REV] [--no-mcp]

1. Speed, ours beside a baseline (the package at git revision ``--baseline``, default the commit before the
   speed work of issue 11, unpacked with ``git archive`` into a temporary directory), interleaved run by run
   so machine noise hits both alike. Queues of 1,000 / 5,000 / 10,000 items written the way agents write
   them (issue 11): YAML front matter, 0-3 ``blocked_by`` each, one of 400 shared ``files`` each, estimates,
   a tenth completed.
   - ``plan_workspace``, each run in a freshly started Python process (best of the repeats): cold (new
     reader: every file parsed), warm (nothing changed), and after editing one file: its body, its title,
     its estimate (a change the schedule depends on), and renaming one pending item to completed (what
     ``update_item`` does).
   - ``queue_plan`` over stdio against a freshly started ``agent-parallel serve`` (10,000 items): the first
     call (cold), then warm and after a body edit, with the tool's defaults: the first page of 500 items
     (about 300 KB of JSON with the whole waves; before paging, the 10,000-item result was about 4 MB,
     sent twice: as the text block and as structured content). The round trip includes the server's
     serialization and the client's parsing.
   - ``agent-parallel plan --format json`` and ``--format table`` on this repository's example queue
     (``.agent/``): wall time of the whole command (median of the repeats), and whether it imported
     the MCP SDK.
   Targets (issue 11): cold 10,000 <= 1.0 s, warm <= 0.05 s, one file edited <= 0.1 s, CLI plan <= 0.3 s.
2. Quality: random and layered DAGs with estimates and some file conflicts. For each, the
   predicted makespan of three rules divided by the plan's lower bound: our priority rule (list
   scheduling by critical path, then unblocked count, ...), plain level-by-level waves (every item
   of a level, at most max_parallel at a time, and the next level only when the whole level is
   done), and first-in-first-out by id (list scheduling by id). Target: our mean <= 1.10, and
   better than both others.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = "b51dbad"
"""The last commit before the speed work of issue 11."""


# --- the queue issue 11 describes ------------------------------------------------------------------------


def write_queue(root: Path, size: int, seed: int) -> None:
    """`size` items: YAML front matter, 0-3 blocked_by on recent items, one of 400 shared files, estimates."""
    rng = random.Random(seed)
    queue = root / ".agent" / "queue"
    queue.mkdir(parents=True)
    for item_id in range(1, size + 1):
        deps = sorted({rng.randrange(max(1, item_id - 300), item_id) for _ in range(rng.randint(0, 3))}
                      ) if item_id > 1 else []
        path = f"src/pkg{rng.randrange(20)}/module{rng.randrange(400)}.py"
        status = "completed" if item_id <= size // 10 else "pending"
        text = (f"---\ntitle: Item {item_id} of the refactoring\nblocked_by: [{', '.join(f'{d:03d}' for d in deps)}]\n"
                f"files: [{path}]\nestimate: {rng.choice(('45s', '5m', '30m', '1h', '2h'))}\n"
                f"priority: {rng.choice(('high', 'medium', 'medium', 'low'))}\n---\n\n"
                f"Change {path} so that item {item_id} is done; run its tests.\n")
        (queue / f"{item_id:05d}-{status}-item-{item_id}.md").write_text(text)


# --- workers: run in a fresh process with the package of one side on PYTHONPATH -----------------------------


def worker_plan(root: Path) -> dict[str, float]:
    """Timings of plan_workspace on the queue at `root`: cold, warm, and after each kind of edit."""
    from agent_parallel.queue.items import QueueReader
    from agent_parallel.queue.plan import plan_workspace

    files = sorted((root / ".agent" / "queue").iterdir())
    target = files[len(files) // 2]
    reader = QueueReader()
    times: dict[str, float] = {}

    def timed(name: str) -> None:
        started = time.perf_counter()
        plan_workspace(root, None, 5, reader)
        times[name] = time.perf_counter() - started

    timed("cold")
    timed("warm")
    timed("warm")  # the second warm call: the first may still pay for lazy work
    text = target.read_text()
    target.write_text(text + "\nEdited.\n")
    timed("edit body")
    text = target.read_text()
    target.write_text(re.sub(r"title: (.*)", r"title: \1 (edited)", text, count=1))
    timed("edit title")
    text = target.read_text()
    target.write_text(re.sub(r"estimate: .*", "estimate: 4h" if "estimate: 3h" in text else "estimate: 3h", text,
                             count=1))
    timed("edit estimate")
    renamed = target.with_name(target.name.replace("-pending-", "-completed-"))
    target.rename(renamed)
    timed("rename (status)")
    renamed.rename(target)
    times["parsed"] = float(reader.parse_count)
    return times


def worker_cli() -> list[str]:
    """Run `agent-parallel plan --format json` in-process; the top-level packages it imported."""
    import contextlib
    import io

    from agent_parallel.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        main(["plan", "--format", "json", "--root", str(REPO)])
    return sorted({name.split(".")[0] for name in sys.modules if name.split(".")[0] in ("mcp", "rich", "anyio",
                                                                                            "starlette", "httpx")})


# --- the driver -----------------------------------------------------------------------------------------------


def baseline_src(revision: str, into: Path) -> Path | None:
    """The `src` directory of `revision`, unpacked under `into`, or None when git cannot give it."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline: cannot unpack {revision}: {exc}", file=sys.stderr)
        return None
    return into / "src"


def run_worker(src: Path, *args: str) -> object:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, __file__, "--worker", *args], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: min(run[key] for run in runs) for key in runs[0]}


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


async def mcp_round_trips(src: Path, root: Path) -> dict[str, float]:
    """queue_plan over stdio against a fresh server of `src`: the first call, warm calls, after a body edit.

    Timed as a wire round trip (request out, the result read and parsed into a `CallToolResult`), without
    the Python SDK client's own check of the result against the tool's output schema (jsonschema, in
    Python: about 0.3 s for a 500-row page and the whole waves, a cost of that client, not of the
    server); `client call` is the same warm call through `Client.call_tool`, check included.
    """
    from mcp import Client, StdioServerParameters, types

    params = StdioServerParameters(
        command=sys.executable, args=["-c", "import sys; from agent_parallel.cli import main; sys.exit(main())",
                                      "serve", "--root", str(root)],
        env={**os.environ, "PYTHONPATH": str(src)})
    times: dict[str, float] = {}
    request = types.CallToolRequest(params=types.CallToolRequestParams(name="queue_plan", arguments={}))
    async with Client(params, read_timeout_seconds=300) as client:
        await client.list_tools()

        async def timed(name: str) -> None:
            started = time.perf_counter()
            result = await client.session.send_request(request, types.CallToolResult)
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - started)
            assert not result.is_error, result

        await timed("cold")
        for _ in range(3):
            await timed("warm")
        target = sorted((root / ".agent" / "queue").iterdir())[len(list((root / ".agent" / "queue").iterdir())) // 2]
        target.write_text(target.read_text() + "\nEdited.\n")
        await timed("edit body")
        started = time.perf_counter()
        await client.call_tool("queue_plan", {})
        times["client call"] = time.perf_counter() - started
    return times


def cli_walls(src: Path, repeats: int, format: str) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-c", "import sys; from agent_parallel.cli import main; sys.exit(main())", "plan",
               "--format", format, "--root", str(REPO)]
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        walls.append(time.perf_counter() - started)
    return walls


def bench_speed(sizes: list[int], repeats: int, seed: int, revision: str, use_mcp: bool) -> list:
    from rich.table import Table

    tables = []
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        ours = REPO / "src"
        base = baseline_src(revision, Path(tmp)) if revision else None
        sides = [("ours", ours)] + ([(f"baseline {revision}", base)] if base else [])

        table = Table(title="plan_workspace in a fresh process (best of the repeats, same run, interleaved)",
                      title_justify="left")
        for column in ("items", "side", "cold", "warm", "edit body", "edit title", "edit estimate",
                       "rename (status)", "files parsed"):
            table.add_column(column, justify="right")
        for size in sizes:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
            for repeat in range(repeats):
                for name, src in sides if repeat % 2 == 0 else reversed(sides):
                    root = Path(tmp) / f"q{size}-{name.split()[0]}-{repeat}"
                    write_queue(root, size, seed)
                    time.sleep(2.1)  # an agent's queue, not written in the last RACY_NS (see QueueReader)
                    runs[name].append(run_worker(src, "plan", str(root)))  # type: ignore[arg-type]
            for name, _ in sides:
                row = best(runs[name])
                table.add_row(f"{size:,}", name, *(fmt(row[key]) for key in (
                    "cold", "warm", "edit body", "edit title", "edit estimate", "rename (status)")),
                    str(int(runs[name][0]["parsed"])))
        tables.append(table)

        if use_mcp:
            import anyio

            size = max(sizes)
            mcp_table = Table(title=f"queue_plan over stdio, {size:,} items, a freshly started server each run "
                                    "(best of the repeats)", title_justify="left")
            for column in ("side", "first call (cold)", "warm", "edit body", "warm via Client.call_tool"):
                mcp_table.add_column(column, justify="right")
            mcp_runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
            for repeat in range(max(1, repeats - 1)):
                for name, src in sides:
                    root = Path(tmp) / f"mcp{size}-{name.split()[0]}-{repeat}"
                    write_queue(root, size, seed)
                    time.sleep(2.1)
                    mcp_runs[name].append(anyio.run(mcp_round_trips, src, root))  # type: ignore[arg-type]
            for name, _ in sides:
                row = best(mcp_runs[name])
                mcp_table.add_row(name, fmt(row["cold"]), fmt(row["warm"]), fmt(row["edit body"]), fmt(row["client call"]))
            tables.append(mcp_table)

        cli = Table(title="agent-parallel plan on the example queue (.agent/): wall of the whole command",
                    title_justify="left")
        for column in ("side", "--format json (median)", "json (best)", "--format table (median)", "imports"):
            cli.add_column(column, justify="right")
        walls: dict[str, dict[str, list[float]]] = {name: {"json": [], "table": []} for name, _ in sides}
        for _ in range(5):
            for name, src in sides:
                for format in ("json", "table"):
                    walls[name][format] += cli_walls(src, 1, format)  # type: ignore[arg-type]
        for name, src in sides:
            imported = run_worker(src, "cli")  # type: ignore[arg-type]
            cli.add_row(name, fmt(statistics.median(walls[name]["json"])), fmt(min(walls[name]["json"])),
                        fmt(statistics.median(walls[name]["table"])), ", ".join(imported) or "none of mcp/rich/anyio")  # type: ignore[arg-type]
        tables.append(cli)
    return tables


# --- 2. quality ------------------------------------------------------------------------------------------


def _item(item_id: int, deps: list[int], files: list[str], estimate_s: float):  # -> WorkItem
    from agent_parallel.queue.items import WorkItem, format_id

    return WorkItem(id=item_id, id_str=format_id(item_id), file=f"{item_id:03d}-pending-x.md", path="",
                    slug="x", status="pending", title="x", blocked_by=deps, files=files, estimate_s=estimate_s)


def _estimate(rng: random.Random) -> float:
    """Heavy-tailed durations between about 1 and 120 minutes."""
    return round(min(7200.0, 60 * rng.lognormvariate(2.3, 0.9)), 0)


def _files(rng: random.Random, pool: int, conflict_rate: float) -> list[str]:
    if rng.random() < conflict_rate:
        return [f"shared/f{rng.randrange(pool)}.py"]
    return [f"own/{rng.random()}.py"]


def random_dag(rng: random.Random) -> tuple[list, int]:
    size = rng.choice((20, 50, 100, 200))
    edge_probability = rng.choice((1.0, 1.5, 2.5)) / size * 2
    conflict_rate = rng.choice((0.0, 0.1, 0.3))
    items = []
    for item_id in range(1, size + 1):
        deps = [dep for dep in range(1, item_id) if rng.random() < edge_probability]
        items.append(_item(item_id, deps, _files(rng, max(2, size // 5), conflict_rate), _estimate(rng)))
    return items, rng.choice((2, 3, 4, 5, 8))


def layered_dag(rng: random.Random) -> tuple[list, int]:
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


def bench_quality(instances: int, rng: random.Random):
    from rich.table import Table

    from agent_parallel.queue.planner import build_graph, lower_bound_ms, simulate

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
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        result = worker_plan(Path(sys.argv[3])) if sys.argv[2] == "plan" else worker_cli()
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 5,000 items only, fewer repeats and DAGs")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"git revision to compare with (default "
                                                                     f"{DEFAULT_BASELINE}); '' for none")
    parser.add_argument("--no-mcp", action="store_true", help="skip the queue_plan round trips over stdio")
    args = parser.parse_args()

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    sizes = [1_000, 5_000] if args.quick else [1_000, 5_000, 10_000]
    for table in bench_speed(sizes, 2 if args.quick else 3, args.seed, args.baseline, not args.no_mcp):
        console.print(table)
    console.print("targets (issue 11): cold 10,000 <= 1.0 s, warm <= 0.05 s, one file edited <= 0.1 s, "
                  "agent-parallel plan on .agent/ <= 0.3 s")
    console.print(bench_quality(100 if args.quick else 400, random.Random(args.seed)))


if __name__ == "__main__":
    main()
