"""Worktree isolation overhead per item: `prepare` + `integrate` against the same work done by hand
(`git worktree add -b` + `git commit -a` + `git merge`) in the same run, on a generated repository of
10,000 files. Items alternate between the two so both see the same caches.

    python bench/bench_worktrees.py [--quick] [--items N] [--files N] [--keep]

Targets (issue 12): within 1.5x of the hand-done git commands and under 1 s per item.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import pct

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from agent_parallel.config import Config  # noqa: E402
from agent_parallel.worktrees import integrate, prepare, release  # noqa: E402


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(root: Path, files: int) -> None:
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Bench")
    git(root, "config", "user.email", "bench@example.com")
    for n in range(files):
        path = root / f"src/d{n // 100:03d}/f{n:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {n}\n" + "x" * 200 + "\n")
    (root / ".gitignore").write_text(".env\n")
    (root / ".env").write_text("SECRET=1\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "generated")


def edit(worktree: Path, n: int, who: str) -> None:
    """The "agent": a change to one file of its own and a new file."""
    with open(worktree / f"src/d{n % 100:03d}/f{n * 7 % 10000:05d}.txt", "a") as f:
        f.write(f"{who} {n}\n")
    (worktree / f"{who}-{n}.txt").write_text("new\n")


def by_hand(root: Path, n: int) -> tuple[float, float]:
    """(create, integrate) seconds: worktree add; then commit there and merge into main here."""
    path = root / ".agent/worktrees" / f"hand-{n}"
    t0 = time.perf_counter()
    git(root, "worktree", "add", "-q", "-b", f"hand/{n}", str(path), "main")
    shutil.copy2(root / ".env", path / ".env")
    t1 = time.perf_counter()
    edit(path, n, "hand")
    t2 = time.perf_counter()
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", f"hand {n}")
    git(root, "merge", "-q", "--no-edit", f"hand/{n}")
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def ours(root: Path, cfg: Config, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    lease = prepare(root, cfg, str(n), f"{cfg.integration_strategy}-item")
    t1 = time.perf_counter()
    edit(lease.workdir, n, cfg.integration_strategy)
    t2 = time.perf_counter()
    result = integrate(root, cfg, lease, f"item {n}")
    t3 = time.perf_counter()
    assert result.ok, result.message
    release(root, lease)
    return t1 - t0, t3 - t2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="5 items per row instead of 12")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated repository")
    args = parser.parse_args()
    items = args.items or (5 if args.quick else 12)
    base = Path(tempfile.mkdtemp(prefix="bench-worktrees-"))
    root = base / "repo"
    try:
        make_repo(root, args.files)
        (root / ".agent").mkdir()
        (root / ".agent/worktrees").mkdir()
        (root / ".agent/worktrees/.gitignore").write_text("*\n")
        rows: dict[str, list[tuple[float, float]]] = {"by hand (worktree add + commit + merge)": []}
        configs = {f"agent-parallel, {s}": Config(isolation="worktree", integration_strategy=s,
                                                   worktree_copy=(".env",)) for s in ("rebase", "merge", "squash")}
        rows.update({name: [] for name in configs})
        n = 0
        for _ in range(items):
            n += 1
            rows["by hand (worktree add + commit + merge)"].append(by_hand(root, n))
            for name, cfg in configs.items():
                n += 1
                rows[name].append(ours(root, cfg, n))
        hand = [a + b for a, b in rows["by hand (worktree add + commit + merge)"]]
        hand_mean = sum(hand) / len(hand)
        print(f"\n{args.files} files, {items} items per row, git {git(root, 'version').split()[-1]}\n")
        print(f"{'':44} {'create ms':>10} {'integrate ms':>13} {'total ms':>9} {'p95 ms':>7} {'x hand':>7}  target")
        for name, times in rows.items():
            totals = [a + b for a, b in times]
            mean = sum(totals) / len(totals)
            ratio = mean / hand_mean
            ok = "" if name.startswith("by hand") else ("ok" if ratio <= 1.5 and mean < 1 else "MISSED")
            print(f"{name:44} {1000 * sum(a for a, _ in times) / len(times):10.0f} "
                  f"{1000 * sum(b for _, b in times) / len(times):13.0f} {1000 * mean:9.0f} "
                  f"{1000 * pct(totals, 95):7.0f} {ratio:7.2f}  {ok or '-'}")
        print("\ntarget: per item within 1.5x of by hand, and under 1000 ms")
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
