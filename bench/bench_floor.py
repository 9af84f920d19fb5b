"""The floor for trivial tasks in Python on this machine: what the least a supervisor can do costs.

Issue 11 asks for 300 trivial items at 5 at once within 1.5x of `xargs -P5`. This script measures,
interleaved with `xargs -P5` in the same run, a supervisor that does only what every task of ours
must do and nothing else: one thread, one epoll over every pidfd and output pipe, `subprocess.Popen`
of `/bin/sh -c true` in its own session and working directory, a log file per task that its output
is copied into, a record file per task (written when it starts, replaced when it ends, one
directory fsync per batch of ends). No event loop, no coroutine, no thread, no MCP, no claims.
A second line times the same loop keeping a queue run's file protocol as well (each item claimed and
moved at its end by a rename under the queue's lock, each move a history line): the floor for
``run_queue``, where the first line is the floor for a fan-out.

If this bare loop cannot reach 1.5x xargs, nothing built on it can: the figure says how much of the
gap is Python and the kernel, and how much is ours. Its files go where `tempfile` puts them (TMPDIR):
on these VMs that decides most of its cost (tmpfs about 1.0x xargs; ext4 1.3x to over 5x, by how many
files were deleted near there in the last minutes: bench/README.md, "The file system's share"), so run
it with the TMPDIR the compared bench used, and with TMPDIR=/dev/shm for the cost without the disk. Run: `python bench/bench_floor.py [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from agent_parallel.queue.watch import file_system_type

N, SLOTS = 300, 5


def bare_supervisor(runs: Path, n: int = N, slots: int = SLOTS, *, queue: bool = False) -> tuple[float, float]:
    """Run ``n`` trivial tasks, ``slots`` at once; (wall seconds, this process's CPU ms per task).

    ``queue``: the tasks are queue items, and the supervisor keeps the queue's file protocol too, as a
    run does: each start claims its item (the file renamed pending -> in_progress under the queue's
    ``flock``, a JSON line appended to the history), each end moves it (in_progress -> completed, another
    line), and the item's id, file and title go into the task's environment."""
    env = dict(os.environb)
    queue_dir = runs / "queue"
    if queue:
        queue_dir.mkdir()
        for number in range(n):
            (queue_dir / f"{number:05d}-pending-item-{number}.md").write_text(f"---\ncommand: \"true\"\n---\nItem {number}.\n")
    lock_path, history = runs / ".lock", runs / "history.jsonl"

    def move(number: int, old: str, new: str) -> Path:
        """An item's move as ``claims.move_item`` makes it: under the lock, a rename, a history line."""
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            source = queue_dir / f"{number:05d}-{old}-item-{number}.md"
            target = queue_dir / f"{number:05d}-{new}-item-{number}.md"
            os.rename(source, target)
            line = json.dumps({"time": time.time(), "item": f"{number:05d}", "from": old, "to": new, "by": "floor"})
            fd = os.open(history, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.write(fd, (line + "\n").encode())
            os.close(fd)
            return target
        finally:
            os.close(lock)
    poller = select.epoll()
    live: dict[int, dict[str, object]] = {}
    ended: list[dict[str, object]] = []
    started = done = running = 0
    t0, c0 = time.perf_counter(), time.process_time()

    def start(number: int) -> None:
        task_id = f"t{number:05d}"
        extra = {b"AGENT_TASK_ID": task_id.encode()}
        if queue:
            path = move(number, "pending", "in_progress")
            extra.update({b"AGENT_ITEM_ID": f"{number:05d}".encode(), b"AGENT_ITEM_FILE": os.fsencode(path),
                          b"AGENT_ITEM_TITLE": f"Item {number}".encode()})
        log_fd = os.open(runs / f"{task_id}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        child = subprocess.Popen(["/bin/sh", "-c", "true"], cwd=runs, env={**env, **extra},
                                 stdin=subprocess.DEVNULL, stdout=write_end, stderr=write_end,
                                 start_new_session=True, close_fds=True)
        os.close(write_end)
        pidfd = os.pidfd_open(child.pid)
        task: dict[str, object] = {"id": task_id, "number": number, "child": child, "pidfd": pidfd, "pipe": read_end, "log": log_fd,
                                   "exit": None, "eof": False}
        live[pidfd] = live[read_end] = task
        poller.register(pidfd, select.EPOLLIN)
        poller.register(read_end, select.EPOLLIN)
        (runs / f"{task_id}.json").write_text(json.dumps({"task_id": task_id, "status": "running", "pid": child.pid}))

    while done < n:
        while running < slots and started < n:
            start(started)
            started += 1
            running += 1
        for fd, _ in poller.poll():
            task = live.pop(fd, None)
            if task is None:
                continue
            if fd == task["pipe"]:
                data = os.read(fd, 1 << 16)
                if data:
                    os.write(task["log"], data)  # type: ignore[arg-type]
                    live[fd] = task
                    continue
                task["eof"] = True
            else:
                task["exit"] = task["child"].wait()  # type: ignore[attr-defined]
            poller.unregister(fd)
            os.close(fd)
            if task["eof"] and task["exit"] is not None:
                os.close(task["log"])  # type: ignore[arg-type]
                running -= 1
                done += 1
                ended.append(task)
                if queue:
                    move(task["number"], "in_progress", "completed")  # type: ignore[arg-type]
        for task in ended:  # final records: written, renamed over, one directory fsync for the batch
            final = runs / f".{task['id']}.json.tmp"
            final.write_text(json.dumps({"task_id": task["id"], "status": "completed", "exit_code": task["exit"]}))
            os.replace(final, runs / f"{task['id']}.json")
        if ended:
            directory = os.open(runs, os.O_RDONLY)
            os.fsync(directory)
            os.close(directory)
            ended.clear()
    poller.close()
    return time.perf_counter() - t0, (time.process_time() - c0) / n * 1000


def xargs(n: int = N, slots: int = SLOTS) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"seq {n} | xargs -P{slots} -n1 true", shell=True, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="floor-"))
    walls, cpus, queue_walls, queue_cpus, baselines = [], [], [], [], []
    try:
        for repeat in range(args.repeats):  # interleaved: machine noise hits all three alike
            runs = base / f"runs{repeat}"
            runs.mkdir()
            wall, cpu = bare_supervisor(runs)
            walls.append(wall)
            cpus.append(cpu)
            runs = base / f"queue{repeat}"
            runs.mkdir()
            wall, cpu = bare_supervisor(runs, queue=True)
            queue_walls.append(wall)
            queue_cpus.append(cpu)
            baselines.append(xargs())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    base_wall = statistics.median(baselines)
    print(f"{N} `/bin/sh -c true`, {SLOTS} at once, median of {args.repeats} (load {os.getloadavg()[0]:.2f}; "
          f"files in {base.parent}, {file_system_type(base.parent) or 'unknown file system'}):")
    print(f"  xargs -P{SLOTS}                      {base_wall:.3f} s")
    for what, times, costs in (("bare one-thread epoll supervisor", walls, cpus),
                               ("  + the queue's claims and moves", queue_walls, queue_cpus)):
        wall = statistics.median(times)
        print(f"  {what:<34}  {wall:.3f} s = {wall / base_wall:.2f}x xargs, "
              f"{statistics.median(costs):.2f} ms CPU per task")
    print(f"  (every run: supervisor {', '.join(f'{w:.3f}' for w in walls)}; with the queue "
          f"{', '.join(f'{w:.3f}' for w in queue_walls)}; xargs {', '.join(f'{b:.3f}' for b in baselines)})")

if __name__ == "__main__":
    main()
