"""What the run-speed work (issue 11) must keep: the cheap paths give the answers the slow ones gave.

* A task's end looks through /proc only when something may be left (``may_have_left_processes``):
  it must say "maybe" whenever a process of the task is left (in its group, escaped with setsid,
  double-forked, orphaned to us), also while many other tasks start and end at once, and every
  such process is still stopped with its task.
* A task's start time (how a reused pid is told from its process) is taken from the clock around its
  start, without reading /proc: it must be the start time /proc shows, and /proc is read whenever the
  clock cannot tell (the start straddles a clock tick).
* The check of the strings bound for a process skips encoding ASCII text: it must refuse exactly
  what it refused, with the same words.
* A queue run skips thread hops it does not need; an item reported done has its file moved
  (the move is on disk before ``run_queue`` reports the item), the history has both moves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import anyio
import pytest

from agent_parallel.config import load_config
from agent_parallel.paths import runs_dir
from agent_parallel.queue import claims
from agent_parallel.queue.items import QueueReader
from agent_parallel.queue.run import QueueContext, run_of, start_run
from agent_parallel.tasks import executor as executor_module, processes
from agent_parallel.tasks.registry import RegistrySettings, open_registry, wait_any
from conftest import alive, read_pids

pytestmark = pytest.mark.anyio
needs_setsid = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs the setsid utility")


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def wait_for_pid(path: Path) -> int:
    with anyio.fail_after(10):
        while not read_pids(path):
            await anyio.sleep(0.02)
    return read_pids(path)[0]


def start_group(command: str, task_id: str = "t") -> subprocess.Popen[bytes]:
    env = {**os.environ, processes.TASK_ID_VAR: task_id}
    return processes.spawn(lambda: subprocess.Popen(["/bin/sh", "-c", command], start_new_session=True,
                                                    stdin=subprocess.DEVNULL, env=env))


@pytest.fixture
def subreaper():
    if not processes.become_subreaper():
        pytest.skip("no child subreaper here")
    yield
    processes.reap_orphans(processes.scan(mine_only=True).orphans)
    processes.release_subreaper()


def test_not_the_subreaper_always_looks():
    assert not processes.is_subreaper()
    assert processes.may_have_left_processes(2**22 + 7, "t")


def test_nothing_left_after_a_plain_command(subreaper):
    popen = start_group("true")
    popen.wait()  # reaped (the executor does this in wait_child)
    processes.forget_child(popen.pid)
    assert not processes.may_have_left_processes(popen.pid, "t")


@needs_setsid
@pytest.mark.parametrize("shape, left_in_group", [
    ("setsid sh -c 'echo $$ > {p}; exec sleep 30' &", False),
    ("( ( setsid sh -c 'echo $$ > {p}; exec sleep 30' & ) & )", False),
    ("( ( sh -c 'echo $$ > {p}; exec sleep 30' & ) & )", True),
    ("sh -c 'echo $$ > {p}; exec sleep 30' &", True),
])
async def test_a_left_process_is_always_seen(subreaper, tmp_path, shape, left_in_group):
    pid_file = tmp_path / "left.pid"
    popen = start_group(shape.format(p=pid_file) + f"\nwhile [ ! -s {pid_file} ]; do sleep 0.01; done")
    pid = await wait_for_pid(pid_file)
    try:
        processes.wait_child(popen)
        assert processes.may_have_left_processes(popen.pid, "t")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert (int(fields[2]) == popen.pid) == left_in_group
        if not left_in_group:  # escaped: reparented to us (the subreaper) before the command's exit was seen
            assert int(fields[1]) == os.getpid()
            # what task "t" left running does not make another task's end look through /proc (once the
            # zombies of the shells in between are reaped)
            with anyio.fail_after(10):
                while processes.may_have_left_processes(popen.pid, "another-task"):
                    processes.reap_orphans(processes.scan(mine_only=True).orphans)
                    await anyio.sleep(0.02)
            assert processes.may_have_left_processes(popen.pid, "t")
    finally:
        kill([pid])
    with anyio.fail_after(10):  # once it is gone and reaped, nothing is left
        while processes.may_have_left_processes(popen.pid, "t"):
            processes.reap_orphans(processes.scan(mine_only=True).orphans)
            await anyio.sleep(0.02)


async def test_a_zombie_orphan_is_seen_until_reaped(subreaper, tmp_path):
    pid_file = tmp_path / "orphan.pid"
    popen = start_group(f"( sh -c 'echo $$ > {pid_file}; exit 0' & ); while [ ! -s {pid_file} ]; do sleep 0.01; done")
    pid = await wait_for_pid(pid_file)
    processes.wait_child(popen)
    with anyio.fail_after(10):
        while processes.scan(mine_only=True).orphans != [pid]:
            await anyio.sleep(0.02)
    assert processes.may_have_left_processes(popen.pid, "t")  # the zombie is ours to reap: look
    processes.reap_orphans([pid])
    assert not processes.may_have_left_processes(popen.pid, "t")


@needs_setsid
async def test_escaped_processes_end_with_their_task_among_many_ending_at_once(workspace, monkeypatch):
    """Three tasks that leave a process behind (setsid, double fork) among twenty plain ones, all
    at once: each left process is stopped before its task is reported. Then, while another task's
    escaped process runs, plain tasks' ends cost no /proc scan; that process ends with its task."""
    scans: list[str] = []
    real_stop = executor_module.stop_task

    async def counting_stop(task_id, *args, **kwargs):
        scans.append(task_id)
        return await real_stop(task_id, *args, **kwargs)

    monkeypatch.setattr(executor_module, "stop_task", counting_stop)
    shapes = ["setsid sh -c 'echo $$ > {p}; exec sleep 300' &",
              "( ( setsid sh -c 'echo $$ > {p}; exec sleep 300' & ) & )",
              "( ( sh -c 'echo $$ > {p}; exec sleep 300' & ) & )"]
    files = [workspace / f"left{i}.pid" for i in range(len(shapes))]
    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True)
    pids: list[int] = []
    try:
        async with open_registry(workspace, runs, RegistrySettings(kill_grace_s=0.5)) as registry:
            leaving = [await registry.launch(command=shape.format(p=f) + f"\nwhile [ ! -s {f} ]; do sleep 0.01; done",
                                             cwd=workspace) for shape, f in zip(shapes, files)]
            plain = [await registry.launch(command="true", cwd=workspace) for _ in range(20)]
            with anyio.fail_after(30):
                for task in leaving + plain:
                    await task.done.wait()
            pids = [read_pids(f)[0] for f in files]
            for task, pid in zip(leaving, pids):
                assert task.record.status == "completed", task.record.reason
                assert not alive(pid), f"{task.record.command!r} left {pid} running"
                assert task.record.task_id in scans
            assert all(t.record.status == "completed" for t in plain)

            daemon_file = workspace / "daemon.pid"
            running = await registry.launch(
                command=shapes[1].format(p=daemon_file) + "\nexec sleep 300", cwd=workspace)
            pids.append(await wait_for_pid(daemon_file))
            with anyio.fail_after(10):  # the shells in between are zombies of ours until a scan reaps them
                while processes.scan(mine_only=True).orphans:
                    processes.reap_orphans(processes.scan(mine_only=True).orphans)
                    await anyio.sleep(0.02)
            scans.clear()
            plain = [await registry.launch(command="true", cwd=workspace) for _ in range(20)]
            with anyio.fail_after(30):
                for task in plain:
                    await task.done.wait()
            assert scans == [], "a plain task's end scanned /proc because of another task's escaped process"
            await registry.cancel(running)
            assert not alive(pids[-1]), "the escaped process outlived its cancelled task"
    finally:
        kill(pids)


async def test_items_reported_done_have_their_files_moved(workspace):
    """A run of trivial items: every item reported completed is completed on disk (file renamed,
    both moves in the history) by the time the run reports it; failures likewise."""
    queue = workspace / ".agent/queue"
    queue.mkdir(parents=True)
    for i in range(1, 31):
        command = "false" if i % 10 == 0 else "true"
        (queue / f"{i:03d}-pending-item-{i}.md").write_text(f'---\ncommand: "{command}"\n---\n# Item {i}\n')
    config, _ = load_config(workspace)
    config = config.model_copy(update={"level": "L3", "continue_on_error": True})
    async with open_registry(workspace, runs_dir(workspace), RegistrySettings()) as registry:
        ctx = QueueContext(workspace, registry.runs_dir, config, registry, QueueReader())
        task, _ = await start_run(ctx, max_parallel=5)
        run = run_of(task)
        assert run is not None
        seen: set[str] = set()
        with anyio.fail_after(60):
            while not task.done.is_set():
                for outcome in run.progress().outcomes:  # each outcome the moment it is reported
                    if outcome.item not in seen:
                        seen.add(outcome.item)
                        n = int(outcome.item)
                        assert (queue / f"{n:03d}-{outcome.outcome}-item-{n}.md").exists(), outcome
                await wait_any([run.changed, task.done])
        shown = run.progress().outcomes
        assert [o.item for o in shown] == sorted((o.item for o in shown), key=int)  # by id, as before the cache
        assert shown is not run.progress().outcomes  # each answer its own list
        outcomes = {o.item: o.outcome for o in shown}
    assert outcomes == {f"{i:03d}": "failed" if i % 10 == 0 else "completed" for i in range(1, 31)}
    moves = claims.history(runs_dir(workspace))
    for i in range(1, 31):
        mine = [(m["from"], m["to"]) for m in moves if m["item"] == f"{i:03d}"]
        assert mine == [("pending", "in_progress"), ("in_progress", "failed" if i % 10 == 0 else "completed")]


def test_last_move_and_claim_is_what_two_lookups_gave(tmp_path):
    """``_locate`` reads the history once: the same answer as the two ``last_moves`` lookups."""
    moves = [("001", "pending", "in_progress"), ("002", "pending", "in_progress"), ("001", "in_progress", "failed"),
             ("001", "failed", "pending"), ("003", "pending", "in_progress"), ("001", "pending", "in_progress"),
             ("001", "in_progress", "completed"), ("002", "in_progress", "blocked"), ("004", "blocked", "pending")]
    for n, (item, old, new) in enumerate(moves):
        claims.record_move(tmp_path, item, old, new, by=f"mover {n}", reason=None, owned=new == "in_progress")
    for item in ("001", "002", "003", "004", "005"):
        expected = (claims.last_moves(tmp_path, {item}).get(item),
                    claims.last_moves(tmp_path, {item}, to="in_progress").get(item))
        assert claims.last_move_and_claim(tmp_path, item) == expected


def test_an_owned_claim_records_this_process(tmp_path):
    claims.record_move(tmp_path, "001", "pending", "in_progress", by="me", reason=None, owned=True)
    [move] = claims.history(tmp_path)
    assert (move["pid"], move["pid_start"]) == (os.getpid(), processes.process_start_time(os.getpid()))


def test_admission_reads_memory_and_load_at_most_once_per_fresh_period(monkeypatch):
    from agent_parallel.tasks import admission

    readings = iter([10 * 2**20, 10 * 2**20, 900 * 2**20])
    monkeypatch.setattr(admission, "available_memory", lambda: next(readings))
    now = [100.0]
    check = admission.admission_check(256 * 2**20, None, clock=lambda: now[0])
    held = check()
    assert held is not None and "below autonomy.min_free_memory" in held
    now[0] += admission.FRESH_S / 2
    assert check() == held  # the same reading answers again
    now[0] += 2 * admission.FRESH_S
    assert check() is not None  # read again: still low
    now[0] += 2 * admission.FRESH_S
    assert check() is None  # read again: recovered


@pytest.mark.parametrize("own", [{}, {"PYTHONUNBUFFERED": "0", "X_ÿ": "välue with spaces"}])
async def test_a_process_gets_the_servers_environment_and_its_own(tmp_path, monkeypatch, own):
    """The environment is built from bytes now: the same entries as {**os.environ, PYTHONUNBUFFERED, **env}."""
    from agent_parallel.tasks.executor import LaunchSpec, LocalExecutor
    from agent_parallel.tasks.logs import LogWriter

    monkeypatch.setenv("SERVER_SIDE", "kept")
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    executor = LocalExecutor()
    log = LogWriter(tmp_path, "envtask", 1 << 20)
    handle = await executor.start(LaunchSpec(task_id="envtask", cwd=tmp_path, argv=["/usr/bin/env", "-0"], env=own), log)
    assert (await handle.wait()).exit_code == 0
    log.close()
    seen = dict(entry.split(b"=", 1) for entry in (tmp_path / "envtask.log").read_bytes().split(b"\0") if entry)
    expected = {os.fsencode(k): os.fsencode(v) for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **own}.items()}
    assert seen == expected


async def test_a_tasks_start_time_is_the_one_proc_shows(tmp_path):
    """Many starts at once (so some straddle a clock tick): each handle's start time is /proc's,
    and the one /dev/null every task reads as stdin stays open across starts."""
    from agent_parallel.tasks.executor import LaunchSpec, LocalExecutor
    from agent_parallel.tasks.logs import LogWriter

    executor = LocalExecutor()
    logs = [LogWriter(tmp_path, f"st{i}", 1 << 20) for i in range(40)]
    started = await executor.start_batch([
        (LaunchSpec(task_id=f"st{i}", cwd=tmp_path, command="read -r line; echo \"[$line]\"; sleep 1"),
         lambda log=log: log) for i, log in enumerate(logs)])
    handles = [handle for handle, _ in started]
    try:
        for handle in handles:
            assert not isinstance(handle, Exception), handle
            assert handle.pid is not None and handle.start_time is not None
            assert handle.start_time == processes.process_start_time(handle.pid)
    finally:
        for handle in handles:
            if not isinstance(handle, Exception):
                await handle.terminate(0.1)
                await handle.wait()
        executor.close()
        for log in logs:
            log.close()
    assert (tmp_path / "st0.log").read_bytes().startswith(b"[]")  # stdin was /dev/null: read got nothing


def test_a_start_straddling_a_clock_tick_reads_proc(monkeypatch):
    child = start_group("sleep 5")
    try:
        real = processes.process_start_time(child.pid)
        assert real is not None
        tick = processes._TICK_NS
        reads: list[int] = []
        monkeypatch.setattr(processes, "process_start_time", lambda pid: reads.append(pid) or real)
        # the readings fall in two ticks: the start time must come from /proc
        assert processes.new_child_start_time(child.pid, real * tick + tick - 1, real * tick + tick + 1) == real
        assert reads == [child.pid]
        # one tick, once trusted: the tick itself, /proc not read
        monkeypatch.setattr(processes, "_bracket_trusted", True)
        assert processes.new_child_start_time(child.pid, real * tick + 5, real * tick + 9) == real
        assert reads == [child.pid]
        # a clock that disagrees with /proc the first time is never trusted again
        monkeypatch.setattr(processes, "_bracket_trusted", None)
        assert processes.new_child_start_time(child.pid, (real + 3) * tick, (real + 3) * tick + 1) == real
        assert processes._bracket_trusted is False
        assert processes.new_child_start_time(child.pid, (real + 3) * tick, (real + 3) * tick + 1) == real
        assert reads == [child.pid] * 3
    finally:
        processes.signal_group(child.pid, signal.SIGKILL)
        child.wait()
        processes.forget_child(child.pid)


def _check_launch_strings_before(spec) -> str | None:
    """check_launch_strings as it was before its ASCII shortcut (every string encoded)."""
    def bad(text, what, *, limit=True):
        try:
            data = os.fsencode(text)
        except UnicodeEncodeError as exc:
            return (f"{what} contains a character that cannot be passed to a process "
                    f"({text[exc.start]!r} at position {exc.start}); remove it")
        if (at := data.find(b"\0")) >= 0:
            return f"{what} contains a NUL character (at byte {at}), which cannot be passed to a process; remove it"
        return too_long(what, len(data)) if limit else None

    def too_long(what, size):
        if size < executor_module.MAX_ARG_BYTES:
            return None
        return (f"{what} is {size} bytes; the kernel refuses a single argument or environment entry of "
                "128 KiB or more: pass long input through a file instead")

    problems = []
    if spec.command is not None:
        problems.append(bad(spec.command, "command"))
    for i, arg in enumerate(spec.argv or []):
        problems.append(bad(arg, "the program name" if i == 0 else f"argument {i} of the command"))
    problems.append(bad(str(spec.cwd), "cwd", limit=False))
    if spec.stdin_path is not None:
        problems.append(bad(str(spec.stdin_path), "the stdin file's path", limit=False))
    for name, value in spec.env.items():
        if not name:
            problems.append("an env name is empty; give every variable a name")
        elif "=" in name:
            problems.append(f"env name {name!r} contains '=', which would set another variable; remove it")
        problems.append(bad(name, f"env name {name!r}", limit=False))
        problems.append(bad(value, f"env value of {name}", limit=False))
        if not any(problems):
            problems.append(too_long(f"env entry {name}=...", len(os.fsencode(name)) + 1 + len(os.fsencode(value))))
    return next((p for p in problems if p), None)


_PIECES = ["a", "é", "\0", "=", "\udcff", "\ud800", "☃", " ", "x" * 70_000, "é" * 40_000]


def test_the_string_check_refuses_what_it_refused_before():
    import random

    from agent_parallel.tasks.executor import LaunchSpec, check_launch_strings

    rng = random.Random(11)

    def text() -> str:
        return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 4)))

    for _ in range(3000):
        spec = LaunchSpec(task_id="t", cwd=Path("/tmp") / text().replace("\0", ""),
                          command=text() if rng.random() < 0.5 else None,
                          argv=[text() for _ in range(rng.randint(0, 3))] or None,
                          env={text(): text() for _ in range(rng.randint(0, 3))})
        assert check_launch_strings(spec) == _check_launch_strings_before(spec), spec
