"""The floor for trivial tasks in Python on this machine: what the least a supervisor can do costs.

Issue 11 asks for 300 trivial items at 5 at once within 1.5x of `xargs -P5`. This script measures,
interleaved with `xargs -P5` in the same run, a supervisor that does only what every task of ours
must do and nothing else: one thread, one epoll over every pidfd and output pipe, `subprocess.Popen`
of `/bin/sh -c true` in its own session and working directory, a log file per task that prints (made
with its first output, as ours are), a final record per task as ours are kept since stop 38 (appended to a
journal made durable by one ``fdatasync`` per batch of ends; each record's file written after the burst,
its cost counted in the CPU, not in the wall; a task ending within 50 ms never has a running record written). No event loop, no coroutine, no thread, no MCP, no claims.
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
    finals: list[tuple[str, bytes]] = []  # (task id, final record): files written after the burst
    journal = os.open(runs / "journal.wal", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    started = done = running = 0
    t0, c0 = time.perf_counter(), time.process_time()

    def start(number: int) -> None:
        task_id = f"t{number:05d}"
        extra = {b"AGENT_TASK_ID": task_id.encode()}
        if queue:
            path = move(number, "pending", "in_progress")
            extra.update({b"AGENT_ITEM_ID": f"{number:05d}".encode(), b"AGENT_ITEM_FILE": os.fsencode(path),
                          b"AGENT_ITEM_TITLE": f"Item {number}".encode()})
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        child = subprocess.Popen(["/bin/sh", "-c", "true"], cwd=runs, env={**env, **extra},
                                 stdin=subprocess.DEVNULL, stdout=write_end, stderr=write_end,
                                 start_new_session=True, close_fds=True)
        os.close(write_end)
        pidfd = os.pidfd_open(child.pid)
        task: dict[str, object] = {"id": task_id, "number": number, "child": child, "pidfd": pidfd, "pipe": read_end, "log": -1,
                                   "exit": None, "eof": False}  # the log file is made with the first output, as ours
        live[pidfd] = live[read_end] = task
        poller.register(pidfd, select.EPOLLIN)
        poller.register(read_end, select.EPOLLIN)

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
                    if task["log"] == -1:
                        task["log"] = os.open(runs / f"{task['id']}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    os.write(task["log"], data)  # type: ignore[arg-type]
                    live[fd] = task
                    continue
                task["eof"] = True
            else:
                task["exit"] = task["child"].wait()  # type: ignore[attr-defined]
            poller.unregister(fd)
            os.close(fd)
            if task["eof"] and task["exit"] is not None:
                if task["log"] != -1:
                    os.close(task["log"])  # type: ignore[arg-type]
                running -= 1
                done += 1
                ended.append(task)
                if queue:
                    move(task["number"], "in_progress", "completed")  # type: ignore[arg-type]
        if ended:  # final records: one journal write and one fdatasync for the batch
            records = [(str(t["id"]), json.dumps({"task_id": t["id"], "status": "completed",
                                                  "exit_code": t["exit"]}).encode()) for t in ended]
            os.write(journal, b"".join(f"{i}.json\t".encode() + data + b"\n" for i, data in records))
            os.fdatasync(journal)
            finals += records
            ended.clear()
    wall = time.perf_counter() - t0
    poller.close()
    for task_id, data in finals:  # the files, after the burst (a second later in a server)
        temporary = runs / f".{task_id}.json.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, runs / f"{task_id}.json")
    os.close(journal)
    return wall, (time.process_time() - c0) / n * 1000


def our_parts_supervisor(base: Path, n: int = N, slots: int = SLOTS) -> tuple[float, float]:
    """The same one-thread loop made of agent-parallel's own parts, no event loop: the queue read and
    scheduled by the planner (``QueueReader``, ``build_graph``, ``Scheduler``), claims and end moves by
    ``claims.move_item`` (the end moves of a turn carried by its claims, under one ``queue_lock_now``), each
    task spawned by ``LocalExecutor._start_sync`` (guarded: subreaper and watchdog), its output moved by a
    ``LogWriter``, its exit checked by ``processes.may_have_left_processes``, a ``TaskRecord`` per task
    (its first record journaled, ``FirstRecords``; its final one journaled with the turn's others in one
    ``write_batch`` through the record ``Journal``: one ``fdatasync``; the files after the burst, as the
    registry writes them a second later), an ``ItemOutcome`` per item.
    What a lean engine for plain items would do, minus its bookkeeping for the clients: (wall seconds,
    CPU ms per task)."""
    from agent_parallel.config import load_config
    from agent_parallel.paths import runs_dir
    from agent_parallel.queue.claims import move_item, queue_lock_now
    from agent_parallel.queue.items import QueueReader
    from agent_parallel.queue.plan import isolation_policy
    from agent_parallel.queue.planner import Scheduler, build_graph
    from agent_parallel.results import ItemOutcome
    from agent_parallel.tasks import processes
    from agent_parallel.tasks.executor import LaunchSpec, LocalExecutor
    from agent_parallel.tasks.group_commit import _Write, write_batch
    from agent_parallel.tasks.journal import FirstRecords, Journal
    from agent_parallel.tasks.logs import LogWriter, record_path
    from agent_parallel.tasks.records import Failed, ProcessRef, Succeeded, TaskRecord, new_task_id

    root = base.resolve()
    queue_dir = root / ".agent/queue"
    queue_dir.mkdir(parents=True)
    for number in range(1, n + 1):
        (queue_dir / f"{number:03d}-pending-item-{number}.md").write_text(f'---\ncommand: "true"\n---\n# Item {number}\n')
    runs = runs_dir(root)
    executor = LocalExecutor(guard=True)
    firsts, journal = FirstRecords(runs), Journal(runs)
    poller = select.epoll()
    live: dict[int, dict[str, object]] = {}
    outcomes: dict[int, ItemOutcome] = {}
    end_moves: list[int] = []
    done = running = 0
    unfiled: list[_Write] = []  # final records journaled, their files not written yet
    by = "run floor"
    watchdog = executor._guardian()  # a serving server has its guard running already (started with it)
    time.sleep(0.2)  # its Python start-up is over before the clock starts
    config, _ = load_config(root)  # the run's own set-up: the queue read and planned (before the clock, as a
    items, diagnostics = QueueReader().read(root, config.queue_dir)  # run's makespan starts at its first item)
    graph = build_graph(items, diagnostics, isolation_policy(root, config, items))
    scheduler = Scheduler(graph)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        while done < n:
            batch = scheduler.start_next(slots - running) if running < slots else []
            if batch or end_moves:
                with queue_lock_now(runs) as held:
                    assert held, "the queue lock is held elsewhere"
                    for item_id in end_moves:
                        move_item(queue_dir, runs, item_id, "completed", by=by, expect="in_progress",
                                  known=queue_dir / graph.by_id[item_id].file.replace("-pending-", "-in_progress-"))
                    paths = [move_item(queue_dir, runs, item_id, "in_progress", by=by, expect="pending", owned=True,
                                       known=queue_dir / graph.by_id[item_id].file) for item_id in batch]
                end_moves.clear()
            firsts_now = []
            for item_id, path in zip(batch, paths if batch else [], strict=True):
                item = graph.by_id[item_id]
                task_id = new_task_id()
                env = {"AGENT_ITEM_ID": item.id_str, "AGENT_ITEM_FILE": str(path), "AGENT_ITEM_TITLE": item.title,
                       processes.TASK_ID_VAR: task_id}
                spec = LaunchSpec(task_id=task_id, cwd=root, command=item.command, env=env)
                record = TaskRecord(task_id=task_id, kind="item", command=item.command or "", cwd=str(root),
                                    env_keys=sorted(env), item_id=item.id_str, item_file=path.name)
                firsts_now.append((record_path(runs, task_id), record.model_dump_json().encode()))
                log = LogWriter(runs, task_id, 64 << 20)
                if watchdog is not None:
                    watchdog.watch(0, task_id, flush=False)
                started = executor._start_sync(spec, watchdog)
                record.start(time.time(), ProcessRef(pid=started.popen.pid, start_time=started.start_time))
                task: dict[str, object] = {"item": item, "record": record, "log": log, "started": started,
                                           "exit": None, "eof": False}
                assert started.pidfd is not None
                live[started.pidfd] = live[started.read_fd] = task
                poller.register(started.pidfd, select.EPOLLIN)
                poller.register(started.read_fd, select.EPOLLIN)
                running += 1
            if firsts_now:
                firsts.append(firsts_now)
            if watchdog is not None and batch:
                watchdog.flush()
            ended = []
            for fd, _ in poller.poll():
                task = live.pop(fd, None)
                if task is None:
                    continue
                started = task["started"]  # type: ignore[assignment]
                if fd == started.read_fd:  # type: ignore[attr-defined]
                    try:
                        if task["log"].absorb(fd):  # type: ignore[attr-defined]
                            live[fd] = task
                            continue
                    except BlockingIOError:
                        live[fd] = task
                        continue
                    task["eof"] = True
                else:
                    task["exit"] = processes.wait_child(started.popen)  # type: ignore[attr-defined]
                    processes.may_have_left_processes(started.popen.pid, task["record"].task_id)  # type: ignore[attr-defined]
                poller.unregister(fd)
                os.close(fd)
                if task["eof"] and task["exit"] is not None:
                    ended.append(task)
            writes = []
            for task in ended:
                item, record, log = task["item"], task["record"], task["log"]
                log.close()  # type: ignore[attr-defined]
                code = task["exit"]
                record.end(Succeeded() if code == 0 else Failed(exit_code=code), time.time())  # type: ignore[attr-defined]
                writes.append(_Write(record_path(runs, record.task_id), record.model_dump_json().encode(),  # type: ignore[attr-defined]
                                     file_later=True))
                outcomes[item.id] = ItemOutcome(item=item.id_str, title=item.title, outcome="completed",  # type: ignore[attr-defined]
                                                task_id=record.task_id, exit_code=code)  # type: ignore[attr-defined]
                scheduler.finished(item.id, ok=code == 0)  # type: ignore[attr-defined]
                if watchdog is not None:
                    watchdog.forget(task["started"].popen.pid, record.task_id)  # type: ignore[attr-defined]
                end_moves.append(item.id)  # type: ignore[attr-defined]
                running -= 1
                done += 1
            if writes:
                write_batch(writes, journal)
                unfiled += [w for w in writes if w.deferred]  # (files after the burst, as the registry's)
        with queue_lock_now(runs):
            for item_id in end_moves:
                move_item(queue_dir, runs, item_id, "completed", by=by, expect="in_progress",
                          known=queue_dir / graph.by_id[item_id].file.replace("-pending-", "-in_progress-"))
        wall = time.perf_counter() - t0
        filing = [_Write.filing_of(w.path, w.data) for w in unfiled]
        write_batch(filing, journal)
        for write in filing:
            firsts.filed(write.path)
        cpu = (time.process_time() - c0) / n * 1000
        left = [p.name for p in queue_dir.iterdir() if "-completed-" not in p.name]
        assert not left and len(outcomes) == n, f"not every item completed: {left[:3]}"
        return wall, cpu
    finally:
        poller.close()
        journal.close()
        firsts.close()
        executor.close()


def xargs(n: int = N, slots: int = SLOTS) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"seq {n} | xargs -P{slots} -n1 true", shell=True, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="floor-"))
    walls, cpus, queue_walls, queue_cpus, ours_walls, ours_cpus, baselines = [], [], [], [], [], [], []
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
            wall, cpu = our_parts_supervisor(base / f"ours{repeat}")
            ours_walls.append(wall)
            ours_cpus.append(cpu)
            baselines.append(xargs())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    base_wall = statistics.median(baselines)
    print(f"{N} `/bin/sh -c true`, {SLOTS} at once, median of {args.repeats} (load {os.getloadavg()[0]:.2f}; "
          f"files in {base.parent}, {file_system_type(base.parent) or 'unknown file system'}):")
    print(f"  xargs -P{SLOTS}                      {base_wall:.3f} s")
    for what, times, costs in (("bare one-thread epoll supervisor", walls, cpus),
                               ("  + the queue's claims and moves", queue_walls, queue_cpus),
                               ("  made of agent-parallel's own parts", ours_walls, ours_cpus)):
        wall = statistics.median(times)
        print(f"  {what:<34}  {wall:.3f} s = {wall / base_wall:.2f}x xargs, "
              f"{statistics.median(costs):.2f} ms CPU per task")
    print(f"  (every run: supervisor {', '.join(f'{w:.3f}' for w in walls)}; with the queue "
          f"{', '.join(f'{w:.3f}' for w in queue_walls)}; our parts {', '.join(f'{w:.3f}' for w in ours_walls)}; "
          f"xargs {', '.join(f'{b:.3f}' for b in baselines)})")

if __name__ == "__main__":
    main()
