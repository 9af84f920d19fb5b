"""Parsing an agent's event stream as it arrives: a 50 MB recorded Claude Code stream-json stream.

Two queue items in one in-process server (``build_server`` and the SDK's in-memory client), run
one after the other, interleaved ``--repeats`` times: a plain command item ``cat rec.jsonl`` (the
log is written, nothing parsed) and an agent item (``runner.agent: claude``) whose fake ``claude``
on PATH is ``exec cat rec.jsonl``, so its stream is parsed as it arrives and to the end before the
item finishes. Reported: each item's task duration, the ratio (target ≤ 2x), the server's CPU over
the item, and the server's peak RSS (sampled every 10 ms; target ≤ 100 MB), with the parsed usage
as a check that the whole stream was read.

    python bench/bench_agent_stream.py [--mb 50] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import anyio
import yaml
from mcp import Client

from agent_parallel.server import ServerSettings, build_server


def record(path: Path, megabytes: int) -> int:
    """A Claude Code stream-json recording of about ``megabytes`` MB: assistant turns with usage, tool
    results of 100 B to 200 KB (most of the bytes), some non-JSON lines, and the final result."""
    rng = random.Random(7)
    sid = "3f2a8c1e-5b7d-4e2f-9a1c-0d6e8b4f2a71"
    turns = 0
    with path.open("w") as out:
        out.write(json.dumps({"type": "system", "subtype": "init", "session_id": sid, "model": "m"}) + "\n")
        while out.tell() < megabytes * 1_000_000:
            turns += 1
            usage = {"input_tokens": rng.randint(1, 50), "cache_read_input_tokens": rng.randint(0, 9000),
                     "output_tokens": rng.randint(1, 900)}
            message = {"id": f"msg_{turns}", "role": "assistant", "usage": usage,
                       "content": [{"type": "text", "text": "x" * rng.randint(10, 2000)}]}
            out.write(json.dumps({"type": "assistant", "message": message, "session_id": sid}) + "\n")
            body = "y" * int(rng.paretovariate(1.2) * 300) if rng.random() < 0.9 else "z" * 200_000
            out.write(json.dumps({"type": "user", "message": {"content": [{"type": "tool_result", "content": body}]},
                                  "session_id": sid}) + "\n")
            if rng.random() < 0.01:
                out.write("warning: not json\n")
        out.write(json.dumps({"type": "result", "subtype": "success", "is_error": False, "num_turns": turns,
                              "result": "done", "session_id": sid, "total_cost_usd": 12.5,
                              "usage": {"input_tokens": 1, "output_tokens": 2}}) + "\n")
    return turns


class RssPeak:
    """This process's peak resident set while running, sampled every 10 ms from /proc."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.01)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def one(client: Client, item: str) -> tuple[float, float, dict]:
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    launched = await client.call_tool("launch_task", {"item": item})
    task_id = launched.structured_content["task_id"]
    out = (await client.call_tool("task_output", {"task_id": task_id, "timeout": 600, "max_bytes": 100})).structured_content
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert out["status"] == "completed", out
    return out["duration_s"], (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime), out.get("usage") or {}


def write_items(root: Path, rec: Path, n: int) -> tuple[str, str]:
    queue = root / ".agent/queue"
    (queue / f"{2 * n + 1:03d}-pending-cat.md").write_text(f"---\ncommand: cat {rec}\n---\n# cat\n")
    (queue / f"{2 * n + 2:03d}-pending-agent.md").write_text("# agent\n\nReplay the recording.\n")
    return f"{2 * n + 1:03d}", f"{2 * n + 2:03d}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-stream-"))
    root, bin_dir = tmp / "ws", tmp / "bin"
    (root / ".agent/queue").mkdir(parents=True)
    bin_dir.mkdir()
    rec = tmp / "rec.jsonl"
    turns = record(rec, args.mb)
    (bin_dir / "claude").write_text(f"#!/bin/sh\nexec cat {rec}\n")
    (bin_dir / "claude").chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    (root / ".agent/config.yaml").write_text(yaml.safe_dump({"runner": {"agent": "claude"}}))
    rows: list[tuple[float, float, float, float]] = []
    usage: dict = {}

    async def go() -> None:
        nonlocal usage
        async with Client(build_server(root, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
            for n in range(args.repeats):
                cat_item, agent_item = write_items(root, rec, n)
                cat_s, cat_cpu, _ = await one(client, cat_item)
                agent_s, agent_cpu, usage = await one(client, agent_item)
                rows.append((cat_s, agent_s, cat_cpu, agent_cpu))

    with RssPeak() as rss:
        anyio.run(go)
    size = rec.stat().st_size
    print(f"recorded stream: {size / 1e6:.1f} MB, {turns} turns")
    print(f"{'repeat':>6} {'cat (log only)':>15} {'agent (parsed)':>15} {'ratio':>6} {'cpu cat':>8} {'cpu agent':>9}")
    for i, (cat_s, agent_s, cat_cpu, agent_cpu) in enumerate(rows, 1):
        print(f"{i:>6} {cat_s:>14.3f}s {agent_s:>14.3f}s {agent_s / cat_s:>5.2f}x {cat_cpu:>7.3f}s {agent_cpu:>8.3f}s")
    best_cat, best_agent = min(r[0] for r in rows), min(r[1] for r in rows)
    print(f"best: cat {best_cat:.3f}s, agent {best_agent:.3f}s = {best_agent / best_cat:.2f}x (target <= 2x)")
    print(f"server peak RSS {rss.peak / 2**20:.1f} MiB (target <= 100 MiB)")
    print(f"parsed: turns {usage.get('turns')} (recorded {turns}), cost ${usage.get('cost_usd')}, "
          f"session {usage.get('session_id')}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = best_agent / best_cat <= 2 and rss.peak <= 100 * 2**20 and usage.get("turns") == turns
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
