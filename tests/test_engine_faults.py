"""The task engine under faults and attacks: whatever goes wrong in one task fails that task (with
the reason) and nothing else; nothing a task starts outlives it; nothing read from .agent/runs is
trusted; nothing blocks the event loop; no file descriptor leaks."""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from agent_parallel.tasks.fake import FakeExecutor, FakeOutcome
from agent_parallel.errors import QueueError, ResourceLimitError, UsageError
from agent_parallel.tasks import registry as registry_module
from agent_parallel.tasks.executor import LaunchSpec, LocalExecutor, SpawnError
from agent_parallel.tasks.logs import LogWriter
from agent_parallel.tasks.processes import process_start_time
from agent_parallel.tasks.records import ProcessRef, Running, TaskRecord, load_records, save_record
from agent_parallel.tasks.registry import RegistrySettings, Task, open_registry
from agent_parallel.server import ServerSettings, build_server
from conftest import RawServer, alive, call, call_error, read_pids

pytestmark = pytest.mark.anyio

GRACE = RegistrySettings(kill_grace_s=0.5)


def runs_of(workspace: Path) -> Path:
    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True, exist_ok=True)
    return runs


def fixed_ids(*ids: str):
    it = iter(ids)
    return lambda: next(it)


async def wait_for_pids(path: Path, n: int = 1, timeout: float = 10) -> list[int]:
    with anyio.fail_after(timeout):
        while len(read_pids(path)) < n:
            await anyio.sleep(0.02)
    return read_pids(path)


def kill_leftovers(pids: list[int]) -> None:
    """Test hygiene: a failing test must not leave its sleepers behind."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def still_works(registry) -> None:
    task = await registry.launch(command="echo still-ok", cwd=registry.root)
    with anyio.fail_after(10):
        await task.done.wait()
    assert task.record.status == "completed" and task.record.last_line == "still-ok"


# ------------------------------------------------------------------ 1. supervision failures


@pytest.mark.fault("an executor's start raises something other than SpawnError (QueueError, OSError, a bug): "
                   "that task fails with the reason, the server goes on")
@pytest.mark.parametrize("exc, reason", [
    (QueueError("the queue directory .agent/queue does not exist; create it"),
     "the queue directory .agent/queue does not exist; create it"),
    (OSError(errno.ENOSPC, "No space left on device"),
     "an operating-system error stopped the task: No space left on device"),
    (RuntimeError("boom"),
     "supervising the task failed: RuntimeError('boom') [this is a bug in agent-parallel: please report it]"),
])
async def test_any_executor_failure_fails_only_that_task(workspace, exc, reason):
    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        with anyio.fail_after(10):
            task = await registry.launch(command="true", cwd=workspace, executor=FakeExecutor(default=FakeOutcome(start_error=exc)))
            await task.done.wait()
        assert task.record.status == "failed" and task.record.reason == reason
        assert registry.has_room() and registry._active == 0
        await still_works(registry)


@pytest.mark.fault("run_queue in a workspace without .agent/queue: the server answers, and keeps running tasks")
async def test_run_queue_without_a_queue_leaves_the_server_up(client, workspace):
    result = await client.call_tool("run_queue", {})
    if not result.is_error:  # started as a run: it must end failed, with the reason
        out = await call(client, "task_output", task_id=result.structured_content["run_id"], timeout=10)
        assert out["status"] == "failed" and out["reason"]
    out = await call(client, "launch_task", command="echo alive", run_in_background=False)
    assert out["output"] == "alive\n"


@pytest.mark.fault("the server reaches its open-file limit (os.pipe2 fails with EMFILE): the task fails naming "
                   "the limit and the fix, the server answers")
async def test_open_file_limit_fails_the_task_not_the_server(client, workspace):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 64, hard))
    try:
        with pytest.raises(OSError):
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        os.close(fillers.pop())
        os.close(fillers.pop())  # two free: the record (opened, closed) and the log open; the pipe cannot be made
        with anyio.fail_after(10):
            out = await call(client, "launch_task", command="echo never", run_in_background=False)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert out["status"] == "failed"
    assert "too many open files: the server's open-file limit (RLIMIT_NOFILE, ulimit -n) of " in out["reason"]
    assert "raise the limit before starting the server" in out["reason"]
    again = await call(client, "launch_task", command="echo fine", run_in_background=False)
    assert again["status"] == "completed" and again["output"] == "fine\n"


@pytest.mark.fault("a disk with one free page: the first record write fits, the second (running) does not: "
                   "the task fails with the reason and its process is stopped, the server goes on")
async def test_second_record_write_failing_fails_the_task(workspace, tiny_disk):
    runs = tiny_disk / "runs"
    runs.mkdir()
    pid_file = workspace / "pid"
    async with open_registry(workspace, runs, GRACE) as registry:
        st = os.statvfs(tiny_disk)
        (tiny_disk / "filler").write_bytes(b"x" * ((st.f_bavail - 1) * st.f_bsize))  # one free page left
        with anyio.fail_after(20):
            task = await registry.launch(command=f"echo $$ > {pid_file}; exec sleep 300", cwd=workspace)
            await task.done.wait()
        assert task.record.status == "failed"
        assert task.record.reason == (f"could not write the task record in {runs}: No space left on device; "
                                      "free some disk space (or fix the directory's permissions) and launch again")
        if pid_file.exists() and read_pids(pid_file):
            assert not alive(read_pids(pid_file)[0])
        (tiny_disk / "filler").unlink()
        await still_works(registry)


@pytest.mark.fault("the runs directory removed (git clean -fdX) as a task starts, before its running record is "
                   "written: the task goes on to its end, the server goes on")
async def test_runs_dir_gone_before_the_running_record_does_not_stop_the_task(workspace, caplog):
    runs = runs_of(workspace)

    class CleanedAway:
        def __init__(self) -> None:
            self.inner = LocalExecutor()

        async def start(self, spec, log):
            handle = await self.inner.start(spec, log)
            shutil.rmtree(runs)  # after the first record and the log, before the running record
            return handle

        def close(self) -> None:
            self.inner.close()

    async with open_registry(workspace, runs, GRACE) as registry:
        with anyio.fail_after(10):
            task = await registry.launch(command="sleep 0.2; echo done", cwd=workspace, executor=CleanedAway())
            await task.done.wait()
        assert task.record.status == "completed", task.record.reason
        assert "its running record could not be written" in caplog.text and "it goes on" in caplog.text
        runs.mkdir()
        await still_works(registry)


@pytest.mark.fault("the runs directory removed (git clean -fdX) between launches: the next launch and fan-out "
                   "make it again, with its .gitignore, and run")
async def test_a_launch_after_the_runs_dir_was_removed_makes_it_again(workspace):
    from agent_parallel.paths import runs_dir

    runs = runs_dir(workspace)
    async with open_registry(workspace, runs, GRACE) as registry:
        first = await registry.launch(command="echo before", cwd=workspace, answer_at_once=True)
        await first.done.wait()
        shutil.rmtree(runs)
        again = await registry.launch(command="echo after", cwd=workspace, answer_at_once=True)
        _, members = await registry.launch_group(["echo one", "echo two"], max_parallel=2, cwd=workspace)
        with anyio.fail_after(10):
            for task in (again, *members):
                await task.done.wait()
        assert [t.record.status for t in (again, *members)] == ["completed"] * 3
        assert again.record.last_line == "after" and (runs / ".gitignore").read_text().strip() == "*"
        await registry.records_filed()
        assert (runs / f"{again.record.task_id}.json").exists()


@pytest.mark.fault("a launch abandoned while the task is starting (the caller cancelled): the task ends cancelled, "
                   "its slot is given back")
async def test_abandoned_launch_gives_its_slot_back(workspace):
    class SlowStart:
        async def start(self, spec, log):
            await anyio.sleep_forever()

        def close(self) -> None:
            pass

    async with open_registry(workspace, runs_of(workspace), RegistrySettings(max_running=1)) as registry:
        with anyio.move_on_after(0.3):
            await registry.launch(command="true", cwd=workspace, executor=SlowStart())
        [task], _ = registry.list()
        assert task.record.status == "cancelled"
        assert task.record.reason == "the launch was abandoned while the task was starting"
        assert task.done.is_set() and registry.has_room()
        await still_works(registry)


@pytest.mark.fault("cancel_task while the executor is still starting the task (no process yet): the process is "
                   "stopped as soon as it exists, cancel answers at once instead of when the command ends")
async def test_cancel_during_a_slow_start_stops_the_task(workspace):
    class SlowStart:
        def __init__(self) -> None:
            self.inner = LocalExecutor()

        async def start(self, spec, log):
            await anyio.sleep(0.3)  # e.g. a queue run reading its graph in a thread
            return await self.inner.start(spec, log)

        def close(self) -> None:
            self.inner.close()

    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: registry.launch(command="sleep 30", cwd=workspace, executor=SlowStart()))
            await anyio.sleep(0.1)
            [task], _ = registry.list()
            with anyio.fail_after(10):
                assert await registry.cancel(task)
        assert task.record.status == "cancelled" and task.record.reason == "cancelled by cancel_task"


# ------------------------------------------------------------------ 2. strings bound for a process


@pytest.mark.fault("a NUL character in launch_task's command: a clear tool error, nothing started or recorded, "
                   "the server lives")
async def test_nul_in_the_command_is_a_clear_error(client, workspace):
    text = await call_error(client, "launch_task", command="echo a\u0000b")
    assert text == ("Error executing tool launch_task: cannot start the task: command contains a NUL character "
                    "(at byte 6), which cannot be passed to a process; remove it")
    assert not list((workspace / ".agent/runs").glob("*.json"))
    out = await call(client, "launch_task", command="echo fine", run_in_background=False)
    assert out["output"] == "fine\n"


BIG = "x" * (128 * 1024)


@pytest.mark.fault("unusable strings bound for a process (NUL in argv, cwd, env names or values; '=' in a name; "
                   "an argument of 128 KiB): UsageError before anything is registered")
@pytest.mark.parametrize("launch, message", [
    ({"argv": ["echo", "a\0b"]}, "argument 1 of the command contains a NUL character (at byte 1)"),
    ({"argv": ["ec\0ho"]}, "the program name contains a NUL character (at byte 2)"),
    ({"command": "true", "env": {"AGENT_ITEM_TITLE": "x\0y"}},
     "env value of AGENT_ITEM_TITLE contains a NUL character (at byte 1)"),
    ({"command": "true", "env": {"A\0B": "x"}}, "env name 'A\\x00B' contains a NUL character (at byte 1)"),
    ({"command": "true", "env": {"A=B": "x"}}, "env name 'A=B' contains '=', which would set another variable"),
    ({"command": "true", "cwd_suffix": "a\0b"}, "cwd contains a NUL character"),
    ({"command": "echo " + BIG}, "command is 131077 bytes; the kernel refuses a single argument or environment "
                                 "entry of 128 KiB or more: pass long input through a file instead"),
    ({"argv": ["echo", BIG]}, "argument 1 of the command is 131072 bytes"),
    ({"command": "true", "env": {"LONG": BIG[:-4]}}, "env entry LONG=... is 131073 bytes"),
    ({"command": "echo \udc80\ud800"}, "command contains a character that cannot be passed to a process ('\\ud800' at position 6)"),
])
async def test_unusable_launch_strings_are_refused_before_registering(workspace, launch, message):
    runs = runs_of(workspace)
    async with open_registry(workspace, runs, GRACE) as registry:
        cwd = workspace / launch.pop("cwd_suffix") if "cwd_suffix" in launch else workspace
        with pytest.raises(UsageError) as caught:
            await registry.launch(cwd=cwd, **launch)
        assert str(caught.value).startswith(f"cannot start the task: {message}")
        assert registry.list() == ([], 0) and registry.has_room()
        assert not list(runs.glob("*.json")) and not list(runs.glob("*.log"))
        await still_works(registry)


async def test_the_kernel_limit_is_exactly_where_the_check_puts_it(workspace):
    """One byte under 128 KiB still starts (the check is not stricter than the kernel)."""
    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        task = await registry.launch(argv=["sh", "-c", 'printf %s "$1" | wc -c', "sh", "x" * (128 * 1024 - 1)],
                                     cwd=workspace)
        await task.done.wait()
        assert task.record.status == "completed" and task.record.last_line.strip() == "131071"


async def test_the_executor_checks_strings_as_its_last_guard(workspace):
    writer = LogWriter(runs_of(workspace), "guard0000001", 1 << 20)
    try:
        with pytest.raises(SpawnError, match=r"^cannot start the task: env value of X contains a NUL character"):
            await LocalExecutor().start(LaunchSpec(task_id="guard0000001", cwd=workspace,
                                                   command=f"touch {workspace}/started", env={"X": "\0"}), writer)
    finally:
        writer.close()
    assert not (workspace / "started").exists()


# ------------------------------------------------------------------ 3. nothing blocks the event loop


@pytest.mark.fault("list_tasks on finished tasks reads no log: the last line is kept in the record")
async def test_finished_tasks_last_line_comes_from_the_record(client, workspace):
    tid = (await call(client, "launch_task", command="echo one; echo two", run_in_background=False))["task_id"]
    (workspace / f".agent/runs/{tid}.log").write_text("tampered-after-the-end\n")
    listed = await call(client, "list_tasks")
    assert listed["tasks"][0]["task_id"] == tid and listed["tasks"][0]["last_line"] == "two"


@pytest.mark.fault("a task record write blocks (a hung disk): other calls go on meanwhile")
async def test_a_hung_record_write_does_not_block_the_loop(workspace, monkeypatch):
    from agent_parallel.tasks import group_commit

    runs = runs_of(workspace)
    real_write = group_commit.write_atomic
    hung = threading.Event()

    def hung_disk(path, data, **kw):  # the first write hangs until released
        if not hung.is_set():
            hung.set()
            time.sleep(1.5)
        real_write(path, data, **kw)

    monkeypatch.setattr(group_commit, "write_atomic", hung_disk)
    async with open_registry(workspace, runs, GRACE) as registry:
        task = await registry.launch(command="sleep 0.3", cwd=workspace)  # its running record hangs
        started = time.monotonic()
        while not hung.is_set():
            await anyio.sleep(0.01)
        await anyio.sleep(0.1)
        assert time.monotonic() - started < 1.0, "the event loop was blocked by the record write"
        await task.done.wait()
        assert task.record.status == "completed"
        await still_works(registry)


# ------------------------------------------------------------------ 4. escaped descendants

ESCAPES = {
    "setsid": "setsid sh -c 'echo $$ > {p}; exec sleep 300' &",
    "double-fork": "( ( sh -c 'echo $$ > {p}; exec sleep 300' & ) & )",
    "double-fork-setsid": "( ( setsid sh -c 'echo $$ > {p}; exec sleep 300' & ) & )",
}
needs_setsid = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs the setsid utility")


@needs_setsid
@pytest.mark.fault("a task's child escapes its group (setsid, double fork): cancel, timeout and the command's own "
                   "end all stop it before the task is reported ended")
@pytest.mark.parametrize("shape", sorted(ESCAPES))
@pytest.mark.parametrize("ending", ["cancel", "timeout", "exit"])
async def test_escaped_descendants_end_with_their_task(client, workspace, shape, ending):
    pid_file = workspace / "escaped.pid"
    escape = ESCAPES[shape].format(p=pid_file)
    if ending == "exit":
        command = f"{escape}\nwhile [ ! -s {pid_file} ]; do sleep 0.02; done"
    else:
        command = f"{escape}\nexec sleep 300"
    args = {"timeout_s": 1} if ending == "timeout" else {}
    tid = (await call(client, "launch_task", command=command, **args))["task_id"]
    [pid] = await wait_for_pids(pid_file)
    try:
        if ending == "cancel":
            out = (await call(client, "cancel_task", task_id=tid))["tasks"][0]
        else:
            out = await call(client, "task_output", task_id=tid, timeout=20)
        assert out["status"] == {"cancel": "cancelled", "timeout": "timed_out", "exit": "completed"}[ending]
        assert not alive(pid), f"{shape} child {pid} outlived its task ({ending})"
    finally:
        kill_leftovers([pid])


@needs_setsid
@pytest.mark.fault("the server is the child subreaper: an orphaned task process is reparented to it and reaped "
                   "(no zombie left)")
async def test_orphans_are_reparented_to_the_server_and_reaped(client, workspace):
    pid_file = workspace / "orphan.pid"
    tid = (await call(client, "launch_task", command=f"( sh -c 'echo $$ > {pid_file}; exec sleep 1' & ); exec sleep 300"))["task_id"]
    [pid] = await wait_for_pids(pid_file)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(fields[1]) == os.getpid()  # its parent subshell is gone: it is ours now, not init's
        with anyio.fail_after(10):
            while alive(pid):
                await anyio.sleep(0.05)
        await call(client, "cancel_task", task_id=tid)
        assert not Path(f"/proc/{pid}").exists(), "the orphan was left a zombie"
    finally:
        kill_leftovers([pid])


def _watchdog_of(server_pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and b"agent_parallel.tasks.watchdog" in cmdline:
                return int(entry.name)
    raise AssertionError("no watchdog found")


@needs_setsid
@pytest.mark.fault("the server is SIGKILLed while a task's escaped children (setsid, double fork) run: the "
                   "watchdog stops them too")
async def test_server_sigkill_stops_escaped_children(workspace):
    files = [workspace / f"{name}.pid" for name in sorted(ESCAPES)]
    pids: list[int] = []
    try:
        with RawServer(workspace) as server:
            for path, shape in zip(files, sorted(ESCAPES)):
                server.call_tool("launch_task", {"command": ESCAPES[shape].format(p=path) + "\nexec sleep 300"})
            for path in files:
                pids += await wait_for_pids(path)
            server.process.kill()
        with anyio.fail_after(10):
            while any(alive(p) for p in pids):
                await anyio.sleep(0.05)
    finally:
        kill_leftovers(pids)


_KILLED_AT_START = """
import os, signal, sys, time
from pathlib import Path
import anyio
from agent_parallel.tasks import processes
from agent_parallel.tasks.executor import LaunchSpec, LocalExecutor
from agent_parallel.tasks.logs import LogWriter

runs, pid_file, tid = Path(sys.argv[1]), Path(sys.argv[2]), "early0000001"
executor = LocalExecutor(guard=True)
spawn = processes.spawn
def spawn_then_die(start):  # the task runs and escapes; the server dies before its start is handed back
    started = spawn(start)
    if "agent_parallel.tasks.watchdog" in started.args:  # the guard, started with the first task
        return started
    deadline = time.monotonic() + 10
    while len(pid_file.read_text().split() if pid_file.exists() else []) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
processes.spawn = spawn_then_die
command = f"setsid sh -c 'echo $$ >> {pid_file}; exec sleep 300' & echo $$ >> {pid_file}; exec sleep 300"
anyio.run(executor.start, LaunchSpec(task_id=tid, cwd=runs, command=command, env={"AGENT_TASK_ID": tid}),
          LogWriter(runs, tid, 1 << 20))
"""


@needs_setsid
@pytest.mark.fault("the server is SIGKILLed while starting a task, after its process runs (and escaped) but before "
                   "the start was handed back: the watchdog stops the task and its escaped children")
async def test_server_sigkill_during_a_start_stops_the_task(workspace):
    pid_file = workspace / "early.pid"
    server = subprocess.Popen([sys.executable, "-c", _KILLED_AT_START, str(runs_of(workspace)), str(pid_file)],
                              stderr=subprocess.PIPE)
    pids: list[int] = []
    try:
        _, err = await anyio.to_thread.run_sync(lambda: server.communicate(timeout=20))
        pids = read_pids(pid_file)
        assert server.returncode == -signal.SIGKILL and len(pids) == 2, err.decode()
        with anyio.fail_after(10):
            while any(alive(p) for p in pids):
                await anyio.sleep(0.05)
    finally:
        server.kill()
        server.wait()
        kill_leftovers(pids or read_pids(pid_file))


def _watchdogs_of(server_pid: int) -> int:
    try:
        _watchdog_of(server_pid)
    except AssertionError:
        return 0
    return 1


def test_serve_starts_its_watchdog_with_the_server_and_keeps_one(workspace):
    """`serve` starts the guard process in the background as it starts (its first task neither waits
    for it nor shares the CPU with its start-up, some 50 ms): one per server, for every task."""
    with RawServer(workspace) as server:
        server.call_tool("list_tasks", {})
        deadline = time.monotonic() + 10
        while not _watchdogs_of(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        guard = _watchdog_of(server.process.pid)  # before any task
        tid = server.call_tool("launch_task", {"command": "true"})["task_id"]
        assert server.call_tool("task_output", {"task_id": tid})["status"] == "completed"
        server.call_tool("launch_task", {"command": "true"})
        assert _watchdog_of(server.process.pid) == guard  # one per server


async def test_a_server_built_in_process_starts_its_watchdog_with_the_first_task(workspace):
    """``build_server`` without ``start_guard`` (tests, embedding) starts no guard process until a task
    runs (a test suite builds thousands of servers); the first task starts it, before its process."""
    executor = LocalExecutor(guard=True)
    try:
        async with Client(build_server(workspace, ServerSettings(min_free_memory=0), executor=executor)) as c:
            await call(c, "list_tasks")
            await anyio.sleep(0.2)
            assert executor._watchdog is None
            out = await call(c, "launch_task", command="true", run_in_background=False)
            assert out["status"] == "completed" and executor._watchdog is not None
    finally:
        executor.close()


_GUARD_FAILS_ONCE = """
import errno, json, sys
from pathlib import Path
import anyio
from agent_parallel.tasks import processes
from agent_parallel.tasks.executor import LaunchSpec, LocalExecutor, SpawnError
from agent_parallel.tasks.logs import LogWriter

runs, marker = Path(sys.argv[1]), Path(sys.argv[2])
spawn, failed = processes.spawn, []
def guard_fails_once(start):
    if not failed:
        failed.append(True)
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
    return spawn(start)
processes.spawn = guard_fails_once

async def main():
    executor = LocalExecutor(guard=True)
    spec = lambda tid: LaunchSpec(task_id=tid, cwd=runs, command=f"echo {tid} >> {marker}", env={"AGENT_TASK_ID": tid})
    try:
        await executor.start(spec("first0000001"), LogWriter(runs, "first0000001", 1 << 20))
        first = "started"
    except SpawnError as exc:
        first = str(exc)
    handle = await executor.start(spec("second000001"), LogWriter(runs, "second000001", 1 << 20))
    second = (await handle.wait()).exit_code
    executor.close()
    print(json.dumps({"first": first, "second": second}))
anyio.run(main)
"""


@pytest.mark.fault("the watchdog cannot be started (no process left): the task is not started, with a clear reason; "
                   "the next start tries again")
def test_a_task_never_runs_unguarded(workspace, tmp_path):
    runs = runs_of(workspace)
    marker = tmp_path / "ran"
    done = subprocess.run([sys.executable, "-c", _GUARD_FAILS_ONCE, str(runs), str(marker)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["first"] == ("could not start the watchdog process that stops the task if the server dies "
                               "(Resource temporarily unavailable); the task was not started, launch it again")
    assert answer["second"] == 0
    assert marker.read_text() == "second000001\n"  # the first command never ran


@needs_setsid
@pytest.mark.fault("server and watchdog both SIGKILLed: the next server's start-up kills the escaped leftovers "
                   "(found by AGENT_TASK_ID) and records the task interrupted")
async def test_startup_sweep_kills_escaped_leftovers(workspace):
    pid_file = workspace / "escaped.pid"
    pids: list[int] = []
    try:
        with RawServer(workspace) as server:
            tid = server.call_tool("launch_task", {"command": ESCAPES["setsid"].format(p=pid_file) + "\nexec sleep 300"})["task_id"]
            pids = await wait_for_pids(pid_file)
            os.kill(_watchdog_of(server.process.pid), signal.SIGKILL)
            server.process.kill()
        time.sleep(0.2)
        assert alive(pids[0])  # nobody stopped it yet
        async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as c:
            assert not alive(pids[0])
            out = await call(c, "task_output", task_id=tid, block=False)
            assert out["status"] == "interrupted" and out["reason"] == "the server stopped while this task was live"
    finally:
        kill_leftovers(pids)


def _freezer() -> Path | None:
    root = Path("/sys/fs/cgroup/freezer")
    if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
        return None
    return root


@pytest.mark.fault("a task process survives SIGKILL (frozen in a cgroup): cancel_task answers, and the reason "
                   "names the survivor instead of claiming nothing is left")
async def test_a_process_that_survives_kill_is_reported(client, workspace):
    freezer = _freezer()
    if freezer is None:
        pytest.skip("needs a writable cgroup v1 freezer")
    group = freezer / f"agent-parallel-test-{os.getpid()}"
    group.mkdir()
    pid_file = workspace / "frozen.pid"
    pid = None
    try:
        tid = (await call(client, "launch_task", command=f"echo $$ > {pid_file}; exec sleep 300"))["task_id"]
        [pid] = await wait_for_pids(pid_file)
        (group / "cgroup.procs").write_text(str(pid))
        (group / "freezer.state").write_text("FROZEN")
        with anyio.fail_after(5):
            while (group / "freezer.state").read_text().strip() != "FROZEN":
                await anyio.sleep(0.02)
        with anyio.fail_after(30):
            out = (await call(client, "cancel_task", task_id=tid))["tasks"][0]
        assert out["status"] == "cancelled"
        assert out["reason"] == (f"cancelled by cancel_task; 1 of its processes could not be stopped: still alive after "
                                 f"SIGKILL (pid {pid}); they may be stuck in the kernel (e.g. on a hung filesystem or "
                                 "frozen cgroup)")
    finally:
        (group / "freezer.state").write_text("THAWED")
        if pid is not None:
            kill_leftovers([pid])
            with anyio.fail_after(10):
                while alive(pid):
                    await anyio.sleep(0.02)
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                await anyio.sleep(0.05)


# ------------------------------------------------------------------ 5. pipelines get the whole kept output


@pytest.mark.fault("a pipeline step after a predecessor whose log was cut: AGENT_UPSTREAM_LOGS holds the head, "
                   "one line marking the dropped middle, and the kept tail")
async def test_pipeline_successor_reads_head_marker_and_tail(workspace):
    runs = runs_of(workspace)
    full = "".join(f"{i}\n" for i in range(1, 30001)).encode()
    async with open_registry(workspace, runs, RegistrySettings(log_cap_bytes=16384, kill_grace_s=0.5)) as registry:
        first = await registry.launch(command="seq 1 30000", cwd=workspace)
        second = await registry.launch(command='cp "$AGENT_UPSTREAM_LOGS" got.txt; echo "$AGENT_UPSTREAM_LOGS"',
                                       cwd=workspace, after=[first.record.task_id])
        with anyio.fail_after(20):
            await second.done.wait()
        rec = first.record
        assert second.record.status == "completed" and rec.output_bytes == len(full) and rec.dropped_bytes > 0
        head = full[:8192]
        marker = b"" if head.endswith(b"\n") else b"\n"
        marker += f"[agent-parallel: {rec.dropped_bytes} bytes dropped here]\n".encode()
        assert (workspace / "got.txt").read_bytes() == head + marker + full[rec.tail_segments[0]:]
        assert second.record.last_line == str(runs / f"{rec.task_id}.upstream.log")

        small = await registry.launch(command="echo short", cwd=workspace)
        third = await registry.launch(command='echo "$AGENT_UPSTREAM_LOGS"', cwd=workspace, after=[small.record.task_id])
        await third.done.wait()
        assert third.record.last_line == str(runs / f"{small.record.task_id}.log")  # nothing cut: the log itself


@pytest.mark.fault("a fan-in of thousands of items: AGENT_UPSTREAM_LOGS went over the kernel's 128 KiB limit for one "
                   "environment entry and the task could not start; such a list now goes to a file named by "
                   "AGENT_UPSTREAM_LOGS_FILE, one per line")
async def test_an_upstream_list_too_long_for_the_environment_goes_to_a_file(workspace):
    runs = runs_of(workspace)
    paths = [f"{workspace}/.agent/runs/{i:012d}.log" for i in range(3000)]
    command = 'echo "${AGENT_UPSTREAM_LOGS-unset}"; wc -l < "$AGENT_UPSTREAM_LOGS_FILE"; head -n 1 "$AGENT_UPSTREAM_LOGS_FILE"'
    async with open_registry(workspace, runs, RegistrySettings(max_records=2)) as registry:
        task = await registry.launch(command=command, cwd=workspace, env={"AGENT_UPSTREAM_LOGS": os.pathsep.join(paths)})
        with anyio.fail_after(20):
            await task.done.wait()
        listed = runs / f"{task.record.task_id}.upstream-logs"
        assert task.record.status == "completed", task.record.reason
        assert (runs / f"{task.record.task_id}.log").read_text() == f"unset\n3000\n{paths[0]}\n"
        assert listed.read_text() == "".join(p + "\n" for p in paths)
        for _ in range(3):  # pruned with the task's other files
            await (await registry.launch(command="true", cwd=workspace)).done.wait()
        assert not listed.exists()


# ------------------------------------------------------------------ 6. trust boundaries


def write_record(runs: Path, task_id: str, *, file: str | None = None, **fields) -> None:
    """A finished task's record as a cloned repository could ship it."""
    record = {"task_id": task_id, "command": "true", "cwd": "/", "status": "completed", "created_at": time.time() - 60,
              "started_at": time.time() - 60, "ended_at": time.time() - 59, "exit_code": 0, **fields}
    (runs / f"{file or task_id}.json").write_text(json.dumps(record))


@pytest.mark.fault("forged task records (ids with ../ or /, a '*' id, times of 1e308 or NaN, pid 1, a file name "
                   "that is not the id): skipped with a warning, the server starts and lists the rest")
@pytest.mark.parametrize("name, fields", [
    ("evil", {"task_id": "../../../secret"}),
    ("slash", {"task_id": "a/b", "status": "running"}),
    ("star", {"task_id": "*"}),
    ("future", {"created_at": 1e308}),
    ("nan", {"created_at": math.nan}),
    ("pidone", {"status": "running", "pid": 1, "pid_start": 0}),
    ("other", {"task_id": "good00000001"}),
    ("negative", {"output_bytes": -5}),
    ("segments", {"tail_segments": [10**15]}),
])
async def test_forged_records_are_skipped(workspace, caplog, name, fields):
    runs = runs_of(workspace)
    write_record(runs, "good00000001")
    record = {"task_id": name, "command": "true", "cwd": "/", "status": "completed", "created_at": time.time(),
              **fields}
    (runs / f"{name}.json").write_text(json.dumps(record))
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as c:
        listed = await call(c, "list_tasks")
        assert [t["task_id"] for t in listed["tasks"]] == ["good00000001"]
    assert any(f"skipped the task record {runs / (name + '.json')}" in r.getMessage() for r in caplog.records)
    assert (runs / "good00000001.json").exists()


@pytest.mark.fault("a cloned repository plants a task record as a symlink (to a valid record elsewhere), a FIFO or a "
                   "5 MB file: each skipped with a warning saying which, never read through or waited on")
@pytest.mark.parametrize("kind, why", [("symlink", "a symlink (never followed)"), ("fifo", "not a regular file"),
                                       ("huge", "larger than 4,194,304 bytes")])
async def test_planted_record_files_are_skipped(workspace, tmp_path, caplog, kind, why):
    runs = runs_of(workspace)
    write_record(runs, "good00000001")
    planted = runs / "plnt00000001.json"
    if kind == "symlink":
        write_record(tmp_path, "plnt00000001")  # a record that would load, outside the runs directory
        os.symlink(tmp_path / "plnt00000001.json", planted)
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        write_record(runs, "plnt00000001", description="x" * (5 << 20))
    with anyio.fail_after(20):  # (a FIFO opened for reading without O_NONBLOCK would wait for a writer forever)
        async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as c:
            listed = await call(c, "list_tasks")
    assert [t["task_id"] for t in listed["tasks"]] == ["good00000001"]
    assert f"skipped the task record {planted}: {why}" in caplog.messages


@pytest.mark.fault("a record with task_id '*' and a small max_records: pruning deletes only exactly named files")
async def test_pruning_never_expands_an_id_into_a_pattern(workspace):
    runs = runs_of(workspace)
    (runs / "*.json").write_text(json.dumps({"task_id": "*", "command": "x", "cwd": "/", "status": "completed",
                                             "created_at": 1.0}))
    for i in range(3):
        write_record(runs, f"keep0000000{i}", created_at=time.time() - 10 + i)
        (runs / f"keep0000000{i}.log").write_text("x\n")
    (runs / "unrelated.txt").write_text("keep me")
    async with open_registry(workspace, runs, RegistrySettings(max_records=2)) as registry:
        assert [t.record.task_id for t in registry.newest_first()] == ["keep00000002", "keep00000001"]
    assert not (runs / "keep00000000.json").exists() and not (runs / "keep00000000.log").exists()
    for name in ["keep00000001.json", "keep00000002.log", "unrelated.txt", "*.json"]:
        assert (runs / name).exists(), name


@pytest.mark.fault("a record whose task_id climbs out with ../: list_tasks and task_output never read the file it names")
async def test_dot_dot_task_id_reads_nothing_outside(workspace, tmp_path):
    runs = runs_of(workspace)
    (tmp_path / "secret.log").write_text("TOPSECRET\n")
    write_record(runs, "../../../secret", file="evil", output_bytes=10, last_line=None)
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as c:
        listed = await c.call_tool("list_tasks", {})
        assert "TOPSECRET" not in json.dumps(listed.structured_content)
        text = await call_error(c, "task_output", task_id="../../../secret")
        assert "unknown task_id" in text


@pytest.mark.fault("a valid record whose log is a symlink to a file outside: task_output does not read through it")
async def test_symlinked_log_is_not_followed(workspace, tmp_path):
    runs = runs_of(workspace)
    (tmp_path / "secret.txt").write_text("TOPSECRET\n")
    write_record(runs, "linked000001", output_bytes=10)
    os.symlink(tmp_path / "secret.txt", runs / "linked000001.log")
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as c:
        out = await call(c, "task_output", task_id="linked000001", block=False)
        assert out["status"] == "completed" and "TOPSECRET" not in out["output"]


@pytest.mark.fault("a record forging the pid of a process the server never started: it is never signalled")
async def test_forged_pid_is_never_killed(workspace):
    env = {k: v for k, v in os.environ.items() if k != "AGENT_TASK_ID"}
    victim = subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
    try:
        runs = runs_of(workspace)
        save_record(TaskRecord(task_id="forged000001", command="sleep 300", cwd=str(workspace),
                               state=Running(started_at=time.time(), process=ProcessRef(
                                   pid=victim.pid, start_time=process_start_time(victim.pid)))), runs)
        async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as c:
            out = await call(c, "task_output", task_id="forged000001", block=False)
            assert out["status"] == "interrupted"
        assert victim.poll() is None and alive(victim.pid)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.fault("a restart after a crash that left tasks live, some with cut logs: each is interrupted with its own "
                   "log's extent (tail segments found by one listing for all of them), durably, and its output reads")
async def test_restart_recovers_each_live_tasks_own_log_extent(workspace, caplog):
    runs = runs_of(workspace)
    ids = ["crashcut0001", "crashhead001", "crashnone001"]
    for task_id in ids:  # live when their server died (no server of theirs is running)
        save_record(TaskRecord(task_id=task_id, command="seq 1 999999", cwd=str(workspace), log_cap_bytes=8192,
                               state=Running(started_at=time.time(), process=None)), runs)
    (runs / "crashcut0001.log").write_bytes(b"h" * 4096)  # head cap 4096, then tail segments of 2048
    (runs / "crashcut0001.6144.log").write_bytes(b"x" * 2047 + b"\n")
    (runs / "crashcut0001.8192.log").write_bytes(b"last\n")
    (runs / "crashcut0001.upstream.log").write_bytes(b"not a segment")
    (runs / "crashcut0001.99x.log").write_bytes(b"not a segment")
    (runs / "crashhead001.log").write_bytes(b"one\ntwo\n")
    (runs / "crashhead0019.4096.log").write_bytes(b"no such task")  # another id, one letter longer
    async with open_registry(workspace, runs, RegistrySettings()) as registry:
        cut, head, none = (registry.get(task_id).record for task_id in ids)
        assert (cut.status, cut.output_bytes, cut.tail_segments, cut.dropped_bytes) == ("interrupted", 8197, [6144, 8192], 2048)
        assert (head.status, head.output_bytes, head.tail_segments, head.dropped_bytes) == ("interrupted", 8, [], 0)
        assert (none.status, none.output_bytes, none.tail_segments) == ("interrupted", 0, [])
        said = [m for m in caplog.messages if m.startswith("stopped what was left")]
        assert said == ["stopped what was left of 3 tasks from an earlier server: crashcut0001, crashhead001, "
                        "crashnone001"]  # one line for them all
        assert cut.last_line == "last" and head.last_line == "two"
        chunk = registry.read_output(registry.get("crashcut0001"), cursor=None, max_bytes=100, tail_lines=1, pattern=None)
        assert chunk.text == "last\n"
    on_disk = {r.task_id: r for r in load_records(runs)}
    assert [on_disk[i].status for i in ids] == ["interrupted"] * 3 and on_disk["crashcut0001"].tail_segments == [6144, 8192]


@pytest.mark.fault("a cloned repository ships .agent (or .agent/runs) as a symlink out of the workspace: the server "
                   "refuses to start with a clear error and writes nothing there")
@pytest.mark.parametrize("link", [".agent", ".agent/runs"])
async def test_symlinked_runs_dir_is_refused(workspace, tmp_path, link):
    outside = tmp_path / "other-repo"
    outside.mkdir()
    (workspace / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, workspace / link)
    with pytest.raises(UsageError) as caught:
        build_server(workspace, ServerSettings(min_free_memory=0))
    assert str(caught.value).startswith(f".agent/runs resolves to {outside}")
    assert "outside the workspace root" in str(caught.value) and "remove the link" in str(caught.value)
    assert not any(outside.rglob("*"))  # no .gitignore, no directory: nothing written through the link


@pytest.mark.fault("a cloned repository ships .agent/runs/.gitignore as a symlink: nothing is written through it")
async def test_gitignore_is_never_written_through_a_symlink(workspace, tmp_path):
    runs = runs_of(workspace)
    target = tmp_path / "elsewhere" / "file"
    target.parent.mkdir()
    os.symlink(target, runs / ".gitignore")
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as c:
        await call(c, "list_tasks")
    assert not target.exists()


# ------------------------------------------------------------------ 7. interfaces: async follow-up, has_room


async def test_completed_items_finds_each_items_latest_completed_task_until_it_is_pruned(workspace):
    """What a queue item is handed of the items it waits on (AGENT_UPSTREAM_LOGS): found by item number
    (``007`` is item 7), the latest completed task only, none once it is pruned, and loaded back."""
    runs = runs_of(workspace)

    async def item(registry, item_id: str, command: str) -> Task:
        task = await registry.launch(command=command, cwd=workspace, kind="item", item_id=item_id)
        await task.done.wait()
        return task

    async with open_registry(workspace, runs, RegistrySettings(max_records=4)) as registry:
        first = await item(registry, "007", "true")
        failed = await item(registry, "8", "false")
        assert registry.completed_items([7, 8, 9]) == [first] and failed.record.status == "failed"
        again = await item(registry, "0007", "true")
        assert registry.completed_items([8, 7]) == [again]
        await registry.launch(command="true", cwd=workspace)  # a plain task: never an item's
        kept = await item(registry, "9", "true")
        assert registry.completed_items([9, 7]) == [kept, again]
        for _ in range(3):  # past max_records 4 the oldest go (0007's task among them; 9's stays)
            await (await registry.launch(command="true", cwd=workspace)).done.wait()
        await registry.records_saved()
        assert registry.completed_items([7, 9]) == [kept]
    async with open_registry(workspace, runs, RegistrySettings(max_records=4)) as registry:
        assert [t.record.task_id for t in registry.completed_items([7, 9])] == [kept.record.task_id]


async def test_a_task_that_prints_nothing_makes_no_log_file(workspace):
    """The head log is created with the first byte of output: a silent task leaves no log file (one
    file less per trivial task) and reads as empty; a dependent is still handed an (empty) file."""
    runs = runs_of(workspace)
    async with open_registry(workspace, runs, GRACE) as registry:
        silent = await registry.launch(command="true", cwd=workspace)
        upstream = await registry.launch(command="exit 0", cwd=workspace)
        loud = await registry.launch(command="echo hi", cwd=workspace)
        dependent = await registry.launch(command='echo "[$AGENT_UPSTREAM_LOGS]"', cwd=workspace,
                                          after=[upstream.record.task_id])
        with anyio.fail_after(10):
            for task in (silent, upstream, loud, dependent):
                await task.done.wait()
        assert not (runs / f"{silent.record.task_id}.log").exists()
        assert registry.read_output(silent, cursor=None, max_bytes=100, tail_lines=None, pattern=None).text == ""
        assert silent.record.output_bytes == 0 and silent.record.status == "completed"
        assert (runs / f"{loud.record.task_id}.log").read_text() == "hi\n"
        handed = runs / f"{upstream.record.task_id}.log"
        assert dependent.record.last_line == f"[{handed}]" and handed.read_bytes() == b""


async def test_on_finish_is_awaited_before_waiters_wake(workspace):
    seen = []

    async def follow_up(task: Task) -> None:
        await anyio.sleep(0.2)
        seen.append((task.record.status, task.done.is_set()))

    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        task = await registry.launch(command="true", cwd=workspace, on_finish=follow_up)
        with anyio.fail_after(10):
            await task.done.wait()
        assert seen == [("completed", False)]


@pytest.mark.fault("a task's follow-up (on_finish) raises or hangs: waiters still wake, the reason says so")
@pytest.mark.parametrize("how", ["raises", "hangs"])
async def test_failing_follow_up_still_wakes_waiters(workspace, monkeypatch, how):
    monkeypatch.setattr(registry_module, "FOLLOW_UP_TIMEOUT_S", 0.5)

    async def follow_up(task: Task) -> None:
        if how == "raises":
            raise QueueError("the item file is gone")
        await anyio.sleep_forever()

    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        task = await registry.launch(command="exit 3", cwd=workspace, on_finish=follow_up)
        with anyio.fail_after(10):
            await task.done.wait()
        expected = "its follow-up failed: the item file is gone" if how == "raises" else \
            "its follow-up did not finish within 0.5 s"
        assert task.record.status == "failed" and task.record.reason == f"exit code 3; {expected}"
        await still_works(registry)


class Owner:
    """A ``FollowUps`` owner (a queue run's role) that records its calls, or raises or hangs."""

    def __init__(self, how: str = "notes") -> None:
        self.how, self.calls = how, []

    async def follow_up_many(self, tasks: list[Task]) -> list[str | None]:
        self.calls.append([(t.record.command, t.record.status, t.done.is_set()) for t in tasks])
        if self.how == "raises":
            raise QueueError("the item files are gone")
        if self.how == "hangs":
            await anyio.sleep_forever()
        if self.how == "answers short":
            return []
        return [f"moved {t.record.command}" for t in tasks]

    def follow_up_now(self, tasks: list[Task]) -> list[str | None] | None:
        if not self.how.startswith("now"):
            return None  # follow_up_many makes it
        self.calls.append([(t.record.command, t.record.status, t.done.is_set()) for t in tasks])
        if self.how == "now raises":
            raise QueueError("the item files are gone")
        if self.how == "now answers short":
            return []
        return [f"moved {t.record.command} at once" for t in tasks]


async def test_a_follow_up_made_at_once_answers_before_the_waiters_wake(workspace):
    """An owner that makes the follow-up at once (``follow_up_now``, in the lane's turn) is not asked
    again by ``follow_up_many``: its answer is in the reason, and the waiters wake once the final
    record is on disk."""
    owner = Owner("now")
    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        task = await registry.launch(command="true", cwd=workspace, finish_with=owner, answer_at_once=True)
        with anyio.fail_after(10):
            await task.done.wait()
        # on disk: in the record journal (its file follows a second later, group_commit.py)
        on_disk = {r.task_id: r for r in load_records(runs_of(workspace), journaled=True)}[task.record.task_id]
    assert owner.calls == [[("true", "completed", False)]]
    assert task.record.reason == "moved true at once"
    assert on_disk.status == "completed" and on_disk.reason == "moved true at once"


async def test_tasks_of_one_follow_up_owner_get_their_follow_up_from_it(workspace):
    """Tasks launched with the same ``finish_with`` get their follow-up from ``follow_up_many`` (one
    call for those the lane saw end together), before their waiters wake, each task's answer added
    to its own reason; another owner's tasks are never mixed in."""
    owner, other = Owner(), Owner()
    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        tasks = [await registry.launch(command=c, cwd=workspace, finish_with=owner, answer_at_once=True)
                 for c in ("true", "exit 2")]
        apart = await registry.launch(command="true", cwd=workspace, finish_with=other, answer_at_once=True)
        with anyio.fail_after(10):
            for task in [*tasks, apart]:
                await task.done.wait()
    assert sorted(t for call in owner.calls for t in call) == [("exit 2", "failed", False), ("true", "completed", False)]
    assert other.calls == [[("true", "completed", False)]]
    assert [t.record.reason for t in tasks] == ["moved true", "exit code 2; moved exit 2"]


@pytest.mark.fault("the follow-up of many tasks at once (a run's plain items) raises, hangs or answers for fewer tasks: every waiter wakes, each reason says so")
@pytest.mark.parametrize("how", ["raises", "hangs", "answers short", "now raises", "now answers short"])
async def test_a_failing_shared_follow_up_still_wakes_every_waiter(workspace, monkeypatch, how):
    monkeypatch.setattr(registry_module, "FOLLOW_UP_TIMEOUT_S", 0.5)
    owner = Owner(how)
    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        tasks = [await registry.launch(command=c, cwd=workspace, finish_with=owner, answer_at_once=True)
                 for c in ("true", "exit 3")]
        with anyio.fail_after(10):
            for task in tasks:
                await task.done.wait()
        expected = {"raises": "its follow-up failed: the item files are gone",
                    "hangs": "its follow-up did not finish within 0.5 s",
                    "answers short": "its follow-up failed: 0 answers for {n} tasks [this is a bug in agent-parallel: "
                                     "please report it]"}[how.removeprefix("now ")]
        n = len(owner.calls[0])  # 2 when the lane saw both end together, else 1 (each its own call)
        assert [t.record.reason for t in tasks] == [expected.format(n=n), f"exit code 3; {expected.format(n=n)}"]
        await still_works(registry)


async def test_has_room_follows_queued_and_running_tasks(workspace):
    async with open_registry(workspace, runs_of(workspace), RegistrySettings(max_running=2, kill_grace_s=0.5)) as registry:
        assert registry.has_room()
        a = await registry.launch(command="sleep 30", cwd=workspace)
        b = await registry.launch(command="true", cwd=workspace, after=[a.record.task_id])
        assert not registry.has_room()
        with pytest.raises(ResourceLimitError):
            await registry.launch(command="true", cwd=workspace)
        await registry.cancel(a)
        await b.done.wait()
        assert registry.has_room()


# ------------------------------------------------------------------ 8. tiny log caps


@pytest.mark.fault("a log cap of 1 byte: the log keeps a sane minimum (a few files), never one file per byte")
async def test_tiny_log_cap_does_not_mean_a_file_per_byte(workspace):
    runs = runs_of(workspace)
    async with open_registry(workspace, runs, RegistrySettings(log_cap_bytes=1)) as registry:
        task = await registry.launch(command="head -c 30000 /dev/zero | tr '\\0' x", cwd=workspace)
        with anyio.fail_after(30):
            await task.done.wait()
        assert task.record.status == "completed" and task.record.output_bytes == 30000
    files = list(runs.glob(f"{task.record.task_id}*.log"))
    assert len(files) <= 3 and sum(f.stat().st_size for f in files) <= 4096
    assert (runs / f"{task.record.task_id}.log").stat().st_size == 2048  # the head: half the 4 KiB minimum


# ------------------------------------------------------------------ 9. no descriptor leaks


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.fault("fifty tasks launched and cancelled, timed out, failing to start or escaping: the server's "
                   "open file descriptors are back where they started")
async def test_no_file_descriptor_leaks(workspace):
    async with open_registry(workspace, runs_of(workspace), GRACE) as registry:
        await still_works(registry)
        await registry.records_saved()  # a final record being written holds a descriptor for a moment
        before = open_fds()
        tasks = []
        for i in range(50):
            kind = i % 5
            if kind == 0:
                task = await registry.launch(command="sleep 30", cwd=workspace)
                await registry.cancel(task)
            elif kind == 1:
                task = await registry.launch(command="sleep 30", cwd=workspace, timeout_s=0.2)
            elif kind == 2:
                task = await registry.launch(argv=["/nonexistent/program"], cwd=workspace)
            elif kind == 3:
                task = await registry.launch(command="setsid sleep 30 & echo started", cwd=workspace)
            else:
                task = await registry.launch(command="echo done", cwd=workspace, after=[tasks[-1].record.task_id])
            tasks.append(task)
        with anyio.fail_after(60):
            for task in tasks:
                await task.done.wait()
        assert {t.record.status for t in tasks} == {"cancelled", "timed_out", "failed", "completed"}
        await registry.records_saved()
        steady = 0  # escaped children are reaped in the background: wait for three equal samples in a row
        with anyio.move_on_after(10):
            while steady < 3:
                steady = steady + 1 if open_fds() == before else 0
                await anyio.sleep(0.05)
        assert open_fds() == before


@pytest.mark.fault("a directory, a FIFO or a symlink where the task's log goes: the task fails saying so at once, "
                   "before its command runs; the event loop never waits on it, nothing is written through the link, "
                   "the server goes on")
@pytest.mark.parametrize("plant, error", [
    ("directory", "Is a directory"),
    ("fifo", "No such device or address"),
    ("symlink", "Too many levels of symbolic links"),
])
async def test_a_planted_log_file_fails_the_task_without_blocking(workspace, tmp_path, plant, error):
    runs = runs_of(workspace)
    log = runs / "plant0000001.log"
    target = tmp_path / "elsewhere"
    if plant == "directory":
        log.mkdir()
    elif plant == "fifo":
        os.mkfifo(log)
    else:
        log.symlink_to(target)
    async with open_registry(workspace, runs, GRACE) as registry:
        registry._new_task_id = fixed_ids("plant0000001", "healthy00001")
        with anyio.fail_after(10):
            task = await registry.launch(command="touch started", cwd=workspace)
            await task.done.wait()
        assert task.record.status == "failed"
        assert task.record.reason == f"could not open the task's log {runs}/plant0000001.log: {error}"
        assert not (workspace / "started").exists()
        assert not target.exists()
        await still_works(registry)
