"""Group commit (tasks/group_commit.py): batched durable writes keep the durability of one write each."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from agent_parallel.tasks import group_commit
from agent_parallel.tasks.group_commit import GroupCommit

pytestmark = pytest.mark.anyio


class SyncLog:
    """Records, in order, every fsync the module makes (of a file or a directory) and every rename."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            target = os.readlink(f"/proc/self/fd/{fd}")
            real_fsync(fd)
            self.events.append(("dir" if os.path.isdir(target) else "file", target))

        def replace(src, dst) -> None:
            real_replace(src, dst)
            self.events.append(("rename", str(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def durable(self, path: Path) -> bool:
        """Whether ``path`` was renamed into place after its data was synced, then its directory synced."""
        try:
            renamed = self.events.index(("rename", str(path)))
        except ValueError:
            return False
        synced_file = any(kind == "file" for kind, _ in self.events[:renamed])
        return synced_file and ("dir", str(path.parent)) in self.events[renamed:]


async def test_one_write_is_atomic_and_durable(tmp_path, monkeypatch):
    log = SyncLog(monkeypatch)
    commit = GroupCommit()
    target = tmp_path / "a.json"
    await commit.save(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'
    assert log.durable(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left


async def test_concurrent_writes_share_batches_and_each_returns_only_once_on_disk(tmp_path, monkeypatch):
    log = SyncLog(monkeypatch)
    commit = GroupCommit()
    targets = [tmp_path / f"r{i}.json" for i in range(40)]
    unsafe: list[Path] = []

    async def save(path: Path) -> None:
        await commit.save(path, path.name.encode())
        if not log.durable(path) or path.read_bytes() != path.name.encode():
            unsafe.append(path)

    async with anyio.create_task_group() as tg:
        for path in targets:
            tg.start_soon(save, path)
    assert unsafe == []
    assert commit.batches < len(targets)  # shared: fewer thread hops ...
    assert sum(1 for kind, _ in log.events if kind == "dir") == commit.batches  # ... and one directory fsync each


async def test_the_same_file_twice_keeps_the_last_write(tmp_path):
    commit = GroupCommit()
    target = tmp_path / "r.json"
    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(commit.save, target, f"v{i}".encode())
            await anyio.lowlevel.checkpoint()
    assert target.read_bytes() == b"v9"


async def test_a_failed_write_fails_only_its_caller(tmp_path):
    commit = GroupCommit()
    good = [tmp_path / f"ok{i}.json" for i in range(5)]
    bad = tmp_path / "missing-dir" / "r.json"
    errors: list[BaseException] = []

    async def save(path: Path) -> None:
        try:
            await commit.save(path, b"x")
        except OSError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for path in good[:2] + [bad] + good[2:]:
            tg.start_soon(save, path)
    assert len(errors) == 1 and isinstance(errors[0], FileNotFoundError)
    assert all(p.read_bytes() == b"x" for p in good)
    assert not bad.parent.exists()


async def test_small_batches_still_write_everything(tmp_path):
    commit = GroupCommit(max_batch=3)
    targets = [tmp_path / f"r{i}.json" for i in range(20)]
    async with anyio.create_task_group() as tg:
        for path in targets:
            tg.start_soon(commit.save, path, b"y")
    assert all(p.read_bytes() == b"y" for p in targets)
    assert commit.batches >= 7


async def test_a_cancelled_writer_leaves_the_others_written(tmp_path):
    commit = GroupCommit()
    first, cancelled, last = tmp_path / "1.json", tmp_path / "2.json", tmp_path / "3.json"
    async with anyio.create_task_group() as tg:
        tg.start_soon(commit.save, first, b"1")
        await anyio.lowlevel.checkpoint()  # the first leads a batch; the next two queue behind it
        with anyio.CancelScope() as scope:
            tg.start_soon(commit.save, last, b"3")
            scope.cancel()
            await commit.save(cancelled, b"2")
    assert first.read_bytes() == b"1" and last.read_bytes() == b"3"
    assert not cancelled.exists()  # cancelled while queued behind the batch: taken back, never half-written
    assert not list(tmp_path.glob(".*.tmp"))


async def test_save_soon_is_written_in_the_background_without_fsync(tmp_path, monkeypatch):
    log = SyncLog(monkeypatch)
    errors: list[OSError] = []
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg)
        target = tmp_path / "running.json"
        commit.save_soon(target, b'{"state": "running"}', errors.append)
        assert not target.exists()  # queued, not yet written
        with anyio.fail_after(5):
            while not target.exists():
                await anyio.sleep(0.005)
    assert target.read_bytes() == b'{"state": "running"}'
    assert not errors
    assert not any(kind in ("file", "dir") for kind, _ in log.events)  # may be lost in a crash, never torn


async def test_a_later_write_of_the_same_file_supersedes_a_queued_save_soon(tmp_path, monkeypatch):
    log = SyncLog(monkeypatch)
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg)
        target = tmp_path / "task.json"
        commit.save_soon(target, b"running", lambda exc: None)
        await commit.save(target, b"final")  # before the background batch took the running record
        await anyio.sleep(group_commit.SOON_DELAY_S * 3)  # the background batch has nothing left to write
    assert target.read_bytes() == b"final"
    assert [dst for kind, dst in log.events if kind == "rename"] == [str(target)]  # written once: the final
    assert log.durable(target)


async def test_save_soon_writes_of_one_file_land_in_order(tmp_path):
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg)
        target = tmp_path / "task.json"
        commit.save_soon(target, b"first", lambda exc: None)
        await anyio.sleep(group_commit.SOON_DELAY_S * 3)
        commit.save_soon(target, b"second", lambda exc: None)
        await commit.save(tmp_path / "other.json", b"x")
    assert target.read_bytes() == b"second"


async def test_a_save_soon_write_waits_its_delay_even_when_other_batches_are_written(tmp_path):
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg)
        running = tmp_path / "running.json"
        queued_at = anyio.current_time()
        commit.save_soon(running, b"running", lambda exc: None)
        await commit.save(tmp_path / "final.json", b"final")  # a durable batch leaves it: not due yet
        if anyio.current_time() - queued_at < group_commit.SOON_DELAY_S:
            assert not running.exists()
        with anyio.fail_after(5):
            while not running.exists():
                await anyio.sleep(0.005)
        assert anyio.current_time() - queued_at >= group_commit.SOON_DELAY_S
    assert running.read_bytes() == b"running"


async def test_a_failed_save_soon_calls_its_on_error_and_others_are_written(tmp_path):
    errors: list[OSError] = []
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg)
        commit.save_soon(tmp_path / "gone" / "a.json", b"a", errors.append)  # its directory does not exist
        commit.save_soon(tmp_path / "b.json", b"b", errors.append)
        await anyio.sleep(group_commit.SOON_DELAY_S * 3)
    assert [type(e) for e in errors] == [FileNotFoundError]
    assert (tmp_path / "b.json").read_bytes() == b"b"


async def test_save_soon_writes_with_different_delays_fall_due_each_at_its_own_time(tmp_path, monkeypatch):
    """A first record waits long (FIRST_RECORD_DELAY_S); a running record queued after it is still
    written SOON_DELAY_S later, and one superseding the long one's file replaces it: written once."""
    log = SyncLog(monkeypatch)
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg)
        slow, quick, replaced = (tmp_path / f"{name}.json" for name in ("slow", "quick", "replaced"))
        queued_at = anyio.current_time()
        commit.save_soon(slow, b"queued", lambda exc: None, delay=30)
        commit.save_soon(replaced, b"queued", lambda exc: None, delay=30)
        commit.save_soon(quick, b"running", lambda exc: None)
        commit.save_soon(replaced, b"running", lambda exc: None)
        with anyio.fail_after(5):
            while not (quick.exists() and replaced.exists()):
                await anyio.sleep(0.005)
        assert anyio.current_time() - queued_at < 5 and not slow.exists()
        assert replaced.read_bytes() == b"running"
        await commit.save(slow, b"final")  # supersedes the long one: it is never written
        tg.cancel_scope.cancel()
    assert [dst for kind, dst in log.events if kind == "rename"].count(str(slow)) == 1
    assert [dst for kind, dst in log.events if kind == "rename"].count(str(replaced)) == 1
    assert slow.read_bytes() == b"final"


async def test_save_soon_data_made_by_a_function_is_made_only_when_written(tmp_path):
    made: list[str] = []

    def maker(name: str) -> Callable[[], bytes]:
        def make() -> bytes:
            made.append(name)
            return name.encode()
        return make

    def broken() -> bytes:
        raise RuntimeError("a bug")

    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg)
        commit.save_soon(tmp_path / "kept.json", maker("kept"), lambda exc: None)
        commit.save_soon(tmp_path / "replaced.json", maker("replaced"), lambda exc: None)
        commit.save_soon(tmp_path / "broken.json", broken, lambda exc: None)
        await commit.save(tmp_path / "replaced.json", b"final")  # supersedes it before it is due
        with anyio.fail_after(5):
            while not (tmp_path / "kept.json").exists():
                await anyio.sleep(0.005)
        await commit.save(tmp_path / "after.json", b"after")  # a bug in one maker stops nothing
    assert made == ["kept"]
    assert (tmp_path / "kept.json").read_bytes() == b"kept" and (tmp_path / "replaced.json").read_bytes() == b"final"
    assert not (tmp_path / "broken.json").exists() and (tmp_path / "after.json").read_bytes() == b"after"
