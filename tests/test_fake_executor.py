"""The FakeExecutor (tasks without processes), the Job path of the registry, and the executor's
boundary: no OSError leaves LocalExecutor untranslated."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anyio
import pytest

from agent_parallel.tasks import executor as executor_module
from agent_parallel.tasks.executor import ExecutorError, ExitInfo, LaunchSpec, LocalExecutor, SpawnError
from agent_parallel.tasks.fake import FakeExecutor, FakeOutcome
from agent_parallel.tasks.logs import LogWriter
from agent_parallel.tasks.records import TaskStatus
from agent_parallel.tasks.registry import RegistrySettings, open_registry

pytestmark = pytest.mark.anyio

FAST = RegistrySettings(kill_grace_s=0.1)


def runs(workspace: Path) -> Path:
    path = workspace / "runs"
    path.mkdir(exist_ok=True)
    return path


async def test_scripted_outcomes_are_recorded(workspace):
    fake = FakeExecutor({"build": FakeOutcome(output=b"built\n"), "test": FakeOutcome(exit_code=3, output=b"1 failed\n"),
                         "boom": FakeOutcome(exit_code=None, signal="SIGKILL")})
    async with open_registry(workspace, runs(workspace), FAST, fake) as registry:
        tasks = [await registry.launch(command=c, cwd=workspace) for c in ("build", "test", "boom", "other")]
        with anyio.fail_after(5):
            assert await registry.wait(tasks, mode="all", timeout=5)
        build, test, boom, other = (t.record for t in tasks)
        assert build.status == TaskStatus.COMPLETED and build.last_line == "built" and build.output_bytes == 6
        assert test.status == TaskStatus.FAILED and test.exit_code == 3 and test.reason == "exit code 3"
        assert boom.status == TaskStatus.FAILED and boom.reason == "killed by SIGKILL"
        assert other.status == TaskStatus.COMPLETED and other.exit_code == 0 and other.reason is None
        assert [s.command for s in fake.started] == ["build", "test", "boom", "other"]
        assert all(s.env["AGENT_TASK_ID"] == t.record.task_id for s, t in zip(fake.started, tasks, strict=True))
    assert fake.closed


async def test_a_release_event_holds_the_task_until_the_test_sets_it(workspace):
    release = anyio.Event()
    async with open_registry(workspace, runs(workspace), FAST, FakeExecutor(default=FakeOutcome(release=release))) as registry:
        first = await registry.launch(command="first", cwd=workspace)
        second = await registry.launch(command="second", cwd=workspace, after=[first.record.task_id])
        await anyio.sleep(0.05)
        assert first.record.status == TaskStatus.RUNNING and second.record.status == TaskStatus.QUEUED
        release.set()
        with anyio.fail_after(5):
            await second.done.wait()
        assert first.record.status == second.record.status == TaskStatus.COMPLETED


async def test_a_failed_predecessor_skips_its_successor(workspace):
    fake = FakeExecutor({"fails": FakeOutcome(exit_code=1)})
    async with open_registry(workspace, runs(workspace), FAST, fake) as registry:
        first = await registry.launch(command="fails", cwd=workspace)
        second = await registry.launch(command="next", cwd=workspace, after=[first.record.task_id])
        with anyio.fail_after(5):
            await second.done.wait()
        assert second.record.status == TaskStatus.SKIPPED
        assert second.record.reason == f"predecessor {first.record.task_id} ended failed, so this task did not run"
        assert [s.command for s in fake.started] == ["fails"]


async def test_cancel_and_timeout_stop_a_fake_task(workspace):
    fake = FakeExecutor(default=FakeOutcome(delay=60))
    async with open_registry(workspace, runs(workspace), FAST, fake) as registry:
        cancelled = await registry.launch(command="long", cwd=workspace)
        timed = await registry.launch(command="long", cwd=workspace, timeout_s=0.1)
        with anyio.fail_after(5):
            assert await registry.cancel(cancelled)
            await timed.done.wait()
        assert cancelled.record.status == TaskStatus.CANCELLED and cancelled.record.reason == "cancelled by cancel_task"
        assert timed.record.status == TaskStatus.TIMED_OUT and timed.record.signal == "SIGTERM"
        assert [h.terminated for h in fake.handles] == [[0.1], [0.1]]


@pytest.mark.parametrize("error, reason", [
    (SpawnError("could not start 'x': No such file or directory"), "could not start 'x': No such file or directory"),
    (RuntimeError("bug"), "supervising the task failed: RuntimeError('bug') [this is a bug in agent-parallel: please report it]"),
])
async def test_a_start_error_fails_the_task(workspace, error, reason):
    async with open_registry(workspace, runs(workspace), FAST, FakeExecutor(default=FakeOutcome(start_error=error))) as registry:
        task = await registry.launch(command="x", cwd=workspace)
        with anyio.fail_after(5):
            await task.done.wait()
        assert task.record.status == TaskStatus.FAILED and task.record.reason == reason
        assert registry.has_room()


# ------------------------------------------------------------------ jobs


class CountingJob:
    """A Job that ends when released (exit 0) or stopped (exit 1)."""

    def __init__(self, *, fail_start: Exception | None = None) -> None:
        self.fail_start = fail_start
        self.release, self.stopped = anyio.Event(), anyio.Event()
        self.task_id: str | None = None

    async def start(self, task_id: str, log: LogWriter) -> None:
        if self.fail_start is not None:
            raise self.fail_start
        self.task_id = task_id
        log.write(b"job started\n")

    async def run(self) -> ExitInfo:
        async with anyio.create_task_group() as tg:
            async def on_stop() -> None:
                await self.stopped.wait()
                tg.cancel_scope.cancel()
            tg.start_soon(on_stop)
            await self.release.wait()
            tg.cancel_scope.cancel()
        return ExitInfo(1 if self.stopped.is_set() else 0, None)

    async def stop(self, grace: float, reason: str) -> None:
        self.stopped.set()


async def test_a_job_is_a_task_like_any_other(workspace):
    async with open_registry(workspace, runs(workspace), FAST, FakeExecutor()) as registry:
        job = CountingJob()
        task = await registry.launch(command="a job", cwd=workspace, kind="run", job=job)
        assert task.record.status == TaskStatus.RUNNING and task.job is job and job.task_id == task.record.task_id
        assert task.record.process is None and task.handle is None  # a job is no process
        job.release.set()
        with anyio.fail_after(5):
            await task.done.wait()
        assert task.record.status == TaskStatus.COMPLETED and task.record.last_line == "job started"
        assert task.job is job  # a finished job stays readable

        stopped = CountingJob()
        task = await registry.launch(command="a job", cwd=workspace, kind="run", job=stopped)
        with anyio.fail_after(5):
            assert await registry.cancel(task)
        assert task.record.status == TaskStatus.CANCELLED and stopped.stopped.is_set()

        timed = CountingJob()
        task = await registry.launch(command="a job", cwd=workspace, kind="run", job=timed, timeout_s=0.1)
        with anyio.fail_after(5):
            await task.done.wait()
        assert task.record.status == TaskStatus.TIMED_OUT and timed.stopped.is_set()


async def test_a_job_that_cannot_start_fails_its_task(workspace):
    from agent_parallel.errors import QueueError

    async with open_registry(workspace, runs(workspace), FAST, FakeExecutor()) as registry:
        task = await registry.launch(command="a job", cwd=workspace, kind="run",
                                     job=CountingJob(fail_start=QueueError("the run could not start: no queue")))
        with anyio.fail_after(5):
            await task.done.wait()
        assert task.record.status == TaskStatus.FAILED and task.record.reason == "the run could not start: no queue"
        assert task.job is None


# ------------------------------------------------------------------ the executor's boundary


async def start_local(workspace: Path, spec: LaunchSpec) -> None:
    writer = LogWriter(workspace, spec.task_id, 1024)
    try:
        handle = await LocalExecutor().start(spec, writer)
        await handle.wait()
    finally:
        writer.close()


async def test_enoent_eacces_e2big_become_spawn_errors(workspace):
    with pytest.raises(SpawnError, match=r"^could not start '/bin/sh' in .*gone: No such file or directory$"):
        await start_local(workspace, LaunchSpec(task_id="a", cwd=workspace / "gone", command="true"))
    script = workspace / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(SpawnError, match=r"^could not start '.*not-executable' in .*: Permission denied$"):
        await start_local(workspace, LaunchSpec(task_id="b", cwd=workspace, argv=[str(script)]))
    huge = {f"V{i}": "x" * 100_000 for i in range(200)}  # 20 MB of environment: past any ARG_MAX
    with pytest.raises(SpawnError, match=r"^could not start '/bin/sh' in .*: Argument list too long: the command, its "
                       r"arguments and its environment together pass the kernel's limit for a new process \(ARG_MAX, "
                       r"[0-9,]+ bytes here\); pass large values through a file instead$"):
        await start_local(workspace, LaunchSpec(task_id="c", cwd=workspace, command="true", env=huge))


async def test_emfile_becomes_a_spawn_error_naming_the_limit(workspace, monkeypatch):
    def no_fds(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(executor_module.os, "pipe2", no_fds)
    with pytest.raises(SpawnError, match=r"^could not start '/bin/sh' in .*: too many open files: the server's "
                                         r"open-file limit \(RLIMIT_NOFILE, ulimit -n\) of \d+ is reached"):
        await start_local(workspace, LaunchSpec(task_id="d", cwd=workspace, command="true"))


async def test_wait_and_terminate_translate_os_errors(workspace, monkeypatch):
    writer = LogWriter(workspace, "e", 1024)
    handle = await LocalExecutor().start(LaunchSpec(task_id="e", cwd=workspace, command="sleep 30"), writer)

    async def broken_stop(*args: object, **kwargs: object) -> list[int]:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(executor_module, "stop_task", broken_stop)
        with pytest.raises(ExecutorError, match=r"^could not stop the task's processes \(group \d+\): Input/output error$"):
            await handle.terminate(0.1)
    await handle.terminate(0.1)  # the real stop
    assert (await handle.wait()).signal == "SIGTERM"
    writer.close()
