"""The lane (tasks/lane.py): background launches and fan-out members are started in batches and
followed on one epoll; every unusual end leaves the lane for the task's own supervision. Each test
checks the lane took the task, then what the task's record says and that nothing is left running."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from agent_parallel.tasks.executor import LaunchSpec
from agent_parallel.tasks.logs import LogWriter
from agent_parallel.tasks.records import TaskRecord
from agent_parallel.tasks.registry import RegistrySettings, Task, TaskRegistry, open_registry
from conftest import all_dead, all_dead_soon, fill_disk, read_pids

pytestmark = pytest.mark.anyio


@pytest.fixture
def workspace(workspace: Path) -> Path:
    (workspace / "runs").mkdir()
    return workspace


def lane_started(registry: TaskRegistry) -> int:
    assert registry._lane is not None
    return registry._lane.started


def lane_registry(workspace: Path, runs: Path | None = None):  # type: ignore[no-untyped-def]
    """The registry a server opens (a guarded local executor, so a lane), with a short kill grace."""
    return open_registry(workspace, runs or workspace / "runs", RegistrySettings(kill_grace_s=0.5))


async def launch_bg(registry: TaskRegistry, workspace: Path, command: str, **kw):  # type: ignore[no-untyped-def]
    return await registry.launch(command=command, cwd=workspace, answer_at_once=True, **kw)


async def finished(*tasks: Task, timeout: float = 10) -> None:
    """Once every one of ``tasks`` has ended (failing the test after ``timeout`` seconds)."""
    with anyio.fail_after(timeout):
        for task in tasks:
            await task.done.wait()


def on_disk(runs: Path, task_id: str) -> str:
    return TaskRecord.model_validate_json((runs / f"{task_id}.json").read_text()).status


async def settled(pidfile: Path, timeout: float = 5.0) -> list[int]:
    """The pids a task wrote, once it wrote them."""
    with anyio.fail_after(timeout):
        while not pidfile.exists() or not pidfile.read_text().endswith("\n"):
            await anyio.sleep(0.01)
    return read_pids(pidfile)


async def test_a_fan_out_goes_through_the_lane_with_every_output_whole(workspace):
    runs = workspace / "runs"
    async with lane_registry(workspace, runs) as registry:
        commands = [f"echo out-{i}; exit {i % 3}" for i in range(20)] + ["head -c 3000000 /dev/zero; echo; echo last"]
        _, members = await registry.launch_group(commands, max_parallel=5, cwd=workspace)
        await finished(*members, timeout=30)
        assert lane_started(registry) == 21
        await registry.records_filed()  # (their files are written a second later otherwise: group_commit.py)
        for i, task in enumerate(members[:20]):
            rec = task.record
            assert rec.exit_code == i % 3 and rec.status == ("completed" if i % 3 == 0 else "failed")
            assert rec.last_line == f"out-{i}" and rec.output_bytes == len(f"out-{i}\n")
            assert on_disk(runs, rec.task_id) == rec.status
        big = members[20].record
        assert big.status == "completed" and big.output_bytes == 3_000_006 and big.last_line == "last"


async def test_a_timeout_stops_a_task_the_lane_follows(workspace):
    async with lane_registry(workspace) as registry:
        task = await launch_bg(registry, workspace, "echo $$ > pid; exec sleep 30", timeout_s=0.5)
        _, members = await registry.launch_group(["sleep 30", "true"], max_parallel=2, cwd=workspace, timeout_s=0.5)
        await finished(task, *members)
        assert lane_started(registry) == 3
        assert task.record.status == "timed_out" and task.record.reason == "killed after its timeout of 0.5 s"
        assert [m.record.status for m in members] == ["timed_out", "completed"]
        assert all_dead(read_pids(workspace / "pid"))


async def test_cancelling_a_task_the_lane_follows_stops_it(workspace):
    async with lane_registry(workspace) as registry:
        task = await launch_bg(registry, workspace, "sleep 30 & echo $! > pid; wait")
        pids = await settled(workspace / "pid")
        assert await registry.cancel(task)
        assert task.record.status == "cancelled" and task.record.reason == "cancelled by cancel_task"
        assert all_dead(pids) and lane_started(registry) == 1


async def test_a_task_cancelled_before_the_lane_started_it_never_runs(workspace):
    async with lane_registry(workspace) as registry:
        task = await launch_bg(registry, workspace, "touch ran")
        with anyio.fail_after(10):
            assert await registry.cancel(task)
        assert task.record.status == "cancelled" and task.record.reason == "cancelled before it started"
        assert not (workspace / "ran").exists() and lane_started(registry) == 0


@pytest.mark.parametrize("command", [
    "sleep 30 > /dev/null 2>&1 & echo $! > pid",  # left in its group, output closed
    "setsid sleep 30 & echo $! > pid",  # left its group, and holds the output pipe open
], ids=["in-group", "escaped-holding-the-pipe"])
@pytest.mark.fault("a task the lane follows exits leaving a process behind (also one that escaped its group and "
                   "holds the output pipe): the task completes, the process is stopped")
async def test_what_a_lane_task_leaves_running_is_stopped(workspace, command):
    async with lane_registry(workspace) as registry:
        task = await launch_bg(registry, workspace, command)
        await finished(task)
        assert task.record.status == "completed" and lane_started(registry) == 1
        assert all_dead_soon(read_pids(workspace / "pid"))  # killed; gone a moment later on a loaded machine


async def test_one_start_failing_in_a_batch_fails_only_that_task(workspace):
    async with lane_registry(workspace) as registry:
        bad = await registry.launch(argv=["/nonexistent/program"], cwd=workspace, answer_at_once=True)
        good = await launch_bg(registry, workspace, "echo fine")
        await finished(bad, good)
        assert bad.record.status == "failed" and bad.record.started_at is None  # it never ran
        assert bad.record.reason is not None and bad.record.reason.startswith(
            f"could not start '/nonexistent/program' in {workspace}: ")
        assert good.record.status == "completed" and good.record.last_line == "fine"


async def test_lane_tasks_running_at_shutdown_end_interrupted_on_disk(workspace):
    runs = workspace / "runs"
    async with lane_registry(workspace, runs) as registry:
        _, members = await registry.launch_group(["echo $$ >> pids; exec sleep 30"] * 3, max_parallel=3, cwd=workspace)
        with anyio.fail_after(10):
            while len(read_pids(workspace / "pids")) < 3 or any(m.record.status != "running" for m in members):
                await anyio.sleep(0.01)
        assert lane_started(registry) == 3
    for task in members:
        assert on_disk(runs, task.record.task_id) == "interrupted"
    assert all_dead(read_pids(workspace / "pids"))


@pytest.mark.fault("disk full while the lane moves a task's output into its log: that task fails visibly, "
                   "the others and the server go on")
async def test_a_log_failing_in_the_lane_fails_only_its_task(workspace, tiny_disk):
    runs = tiny_disk / "runs"
    runs.mkdir()
    async with lane_registry(workspace, runs) as registry:
        go = workspace / "go"
        flood = await launch_bg(registry, workspace, f"while [ ! -e {go} ]; do sleep 0.01; done; yes")
        with anyio.fail_after(10):
            while not (runs / f"{flood.record.task_id}.json").exists() \
                    or '"running"' not in (runs / f"{flood.record.task_id}.json").read_text():
                await anyio.sleep(0.01)
            fill_disk(tiny_disk, pages_left=8)
            go.touch()
            await flood.done.wait()
        assert flood.record.status == "failed"
        assert flood.record.reason == "could not write the task's log: No space left on device"
        (tiny_disk / "filler").unlink()
        healthy = await launch_bg(registry, workspace, "echo fine")
        await finished(healthy)
        assert healthy.record.status == "completed" and lane_started(registry) == 2


@pytest.mark.fault("a bug while the lane follows one task (its output or its exit cannot be taken): that task goes "
                   "on under its own supervision, the lane and the server go on")
@pytest.mark.parametrize("where", ["lane_output", "lane_exit"])
async def test_a_fault_following_one_task_hands_it_over_and_the_lane_goes_on(workspace, monkeypatch, where):
    from agent_parallel.tasks.executor import LocalHandle

    real = getattr(LocalHandle, where)
    faults: list[str] = []

    def faulty(self):  # type: ignore[no-untyped-def]
        if self.task_id == first.record.task_id and not faults:
            faults.append(self.task_id)
            raise RuntimeError("injected")
        return real(self)

    monkeypatch.setattr(LocalHandle, where, faulty)
    async with lane_registry(workspace) as registry:
        first = await launch_bg(registry, workspace, "echo first-output; sleep 0.2")
        second = await launch_bg(registry, workspace, "echo second")
        await finished(first, second)
        assert faults == [first.record.task_id]
        assert first.record.status == "completed" and first.record.last_line == "first-output"
        assert second.record.status == "completed" and second.record.last_line == "second"
        third = await launch_bg(registry, workspace, "echo third")
        await finished(third)
        assert third.record.status == "completed" and lane_started(registry) == 3


@pytest.mark.fault("the server reaches its open-file limit while the lane starts a batch: each task that cannot "
                   "start fails naming the limit and the fix, the lane and the server go on")
async def test_the_open_file_limit_fails_lane_starts_not_the_lane(workspace):
    import os
    import resource

    async with lane_registry(workspace) as registry:
        await finished(await launch_bg(registry, workspace, "true"))  # (the journal of first records is open)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
        try:
            with pytest.raises(OSError):
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            os.close(fillers.pop())  # one free: the first record is journaled, no log can be made
            tasks = [await launch_bg(registry, workspace, f"echo never-{i}") for i in range(3)]
            await finished(*tasks)
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for task in tasks:
            assert task.record.status == "failed" and task.record.started_at is None
            assert "too many open files: the server's open-file limit (RLIMIT_NOFILE, ulimit -n) of " \
                in (task.record.reason or "")
        again = await launch_bg(registry, workspace, "echo fine")
        await finished(again)
        assert again.record.status == "completed" and again.record.last_line == "fine"


async def test_output_ending_before_the_exit_and_a_signal_are_reported(workspace):
    async with lane_registry(workspace) as registry:
        closed = await launch_bg(registry, workspace, "echo bye; exec >/dev/null 2>&1; sleep 0.3; exit 4")
        killed = await launch_bg(registry, workspace, "echo about to; kill -KILL $$")
        await finished(closed, killed)
        assert (closed.record.status, closed.record.exit_code, closed.record.reason) == ("failed", 4, "exit code 4")
        assert closed.record.last_line == "bye"
        assert (killed.record.status, killed.record.signal, killed.record.reason) == \
            ("failed", "SIGKILL", "killed by SIGKILL")
        assert lane_started(registry) == 2


async def test_small_batches_in_the_root_start_on_the_loop_others_in_a_worker_thread(workspace):
    """A start holds its thread until the child has exec'd: on the event loop only for a shell command in the
    workspace's root (whose file system the loop touches anyway) submitted as others ended (nobody waits for an
    answer), a few at a time, once the watchdog runs."""
    import threading

    from agent_parallel.tasks.executor import INLINE_STARTS

    elsewhere = workspace / "sub"
    elsewhere.mkdir()
    async with lane_registry(workspace) as registry:
        loop_thread = threading.get_ident()
        real = registry.executor._start_sync  # type: ignore[attr-defined]
        on_loop: list[bool] = []

        def spy(spec, watchdog=None):  # type: ignore[no-untyped-def]
            on_loop.append(threading.get_ident() == loop_thread)
            return real(spec, watchdog)

        registry.executor._start_sync = spy  # type: ignore[attr-defined]
        _, members = await registry.launch_group(["true"] * 12, max_parallel=2, cwd=workspace)
        await finished(*members)
        assert len(on_loop) == 12 and not on_loop[0] and any(on_loop)  # (the first batch started the watchdog)
        on_loop.clear()
        _, members = await registry.launch_group(["true"] * 12, max_parallel=2, cwd=elsewhere)
        await finished(*members)
        assert on_loop == [False] * 12
        for size, where in ((2, True), (INLINE_STARTS + 1, False)):  # a batch over the limit goes to a thread
            on_loop.clear()
            specs = [LaunchSpec(task_id=f"batch{size:02d}{i:02d}", cwd=workspace, command="true") for i in range(size)]
            started = await registry.executor.start_batch(  # type: ignore[attr-defined]
                [(spec, lambda spec=spec: LogWriter(workspace / "runs", spec.task_id, 1 << 20)) for spec in specs],
                inline=True)
            assert on_loop == [where] * size
            for handle, _ in started:
                assert (await handle.wait()).exit_code == 0
        on_loop.clear()
        task = await launch_bg(registry, workspace, "true")  # a launch_task's answer must not wait for the start
        await finished(task)
        assert on_loop == [False] and task.record.status == "completed"
