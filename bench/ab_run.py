#!/usr/bin/env python
"""Ours against a baseline revision on the same trivial run, interleaved: is a change to the run path
faster, by how much, on a machine whose speed drifts by 10-40 % within minutes?

Run by hand:  python bench/ab_run.py [--baseline REV] [--pairs 15] [--items 300] [--fan-out] [--tmpdir DIR]

Unpacks ``src/`` of ``--baseline`` (default ``HEAD``: the last commit, against the working tree) with
``git archive``, then runs ``bench/profile_run.py`` (this tree's script) once on each side per pair,
alternating which side goes first, with ``TMPDIR`` on tmpfs (``/dev/shm``) when there is one, so the
file system's cost stays out (see README.md; ``--tmpdir`` puts it elsewhere). Prints each side's median CPU per item (all threads, and
the event loop's thread) and makespan, and the median of the per-pair differences with how many pairs
favour ours: a difference smaller than its pairs' spread is noise.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_plan import baseline_src

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LINE = re.compile(r"makespan ([0-9.]+|None) s.*\(([0-9.]+) ms per item, all threads; ([0-9.]+) ms on the event loop")


def one(src: Path, args: argparse.Namespace, tmpdir: str) -> tuple[float, float, float | None]:
    """(CPU ms per item, loop-thread ms per item, makespan s) of one profile_run with ``src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "TMPDIR": tmpdir}
    cmd = [sys.executable, str(HERE / "profile_run.py"), "--items", str(args.items)] + (["--fan-out"] if args.fan_out else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    match = LINE.search(done.stdout)
    if match is None:
        raise SystemExit(f"profile_run printed no figures:\n{done.stdout}\n{done.stderr}")
    makespan = None if match.group(1) == "None" else float(match.group(1))
    return float(match.group(2)), float(match.group(3)), makespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare the working tree with")
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--fan-out", action="store_true", help="the fan-out (task layer) instead of a queue run")
    parser.add_argument("--tmpdir", default=None,
                        help="where the workspaces go (default /dev/shm: the file system's cost left out); a folder on "
                             "ext4 to measure a change to what the run writes")
    args = parser.parse_args()
    tmpdir = args.tmpdir or ("/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
                             else tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="ab-run-") as tmp:
        base = baseline_src(args.baseline, Path(tmp))
        if base is None:
            raise SystemExit(1)
        sides = {"ours": REPO / "src", f"baseline {args.baseline}": base}
        results: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in sides}
        for pair in range(args.pairs):
            order = list(sides) if pair % 2 == 0 else list(reversed(sides))
            for name in order:
                results[name].append(one(sides[name], args, tmpdir))
            print(f"pair {pair + 1}/{args.pairs}: " + ", ".join(f"{n} {results[n][-1][0]:.2f} ms" for n in sides),
                  file=sys.stderr)
    what = "tasks (fan-out)" if args.fan_out else "items (queue run)"
    print(f"{args.items} {what}, {args.pairs} interleaved pairs, files in {tmpdir}:")
    for name, rows in results.items():
        spans = [r[2] for r in rows if r[2] is not None]
        print(f"  {name:24s} CPU {statistics.median(r[0] for r in rows):.2f} ms per item "
              f"(loop thread {statistics.median(r[1] for r in rows):.2f}), makespan "
              f"{statistics.median(spans) if spans else float('nan'):.3f} s (medians)")
    ours, base_rows = results["ours"], results[f"baseline {args.baseline}"]
    diffs = [a[0] - b[0] for a, b in zip(ours, base_rows, strict=True)]
    better = sum(1 for d in diffs if d < 0)
    print(f"  ours - baseline, per pair: median {statistics.median(diffs):+.2f} ms per item "
          f"(spread {min(diffs):+.2f} .. {max(diffs):+.2f}); ours lower in {better} of {len(diffs)} pairs")


if __name__ == "__main__":
    main()
