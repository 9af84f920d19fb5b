"""The record journals (tasks/journal.py): a batch of final records made durable by one fdatasync,
the first records of launched tasks kept before their files, both written back after a crash;
hostile journals in a cloned workspace are never trusted."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest

from agent_parallel.tasks import journal as journal_module
from agent_parallel.tasks import records as records_module
from agent_parallel.tasks.group_commit import GroupCommit
from agent_parallel.tasks.journal import FirstRecords, Journal, recover
from agent_parallel.tasks.records import Succeeded, TaskRecord, journal_replaces, load_records

pytestmark = pytest.mark.anyio


def record(task_id: str, *, done: bool = True) -> TaskRecord:
    rec = TaskRecord(task_id=task_id, kind="command", command="true", cwd="/tmp")
    rec.start(time.time(), None)
    if done:
        rec.end(Succeeded(), time.time())
    return rec


def data(rec: TaskRecord) -> bytes:
    return rec.model_dump_json().encode()


def journals(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.wal"))


def killed_server(runs: Path, body: str) -> str:
    """Run ``body`` (lines of an async function with ``registry`` open on ``runs``) in a server process
    that then SIGKILLs itself; what it printed."""
    script = textwrap.dedent("""
        import anyio, os, signal
        from pathlib import Path
        from agent_parallel.tasks.registry import RegistrySettings, open_registry
        from agent_parallel.tasks.records import TaskRecord
        async def main():
            runs = Path(RUNS)
            async with open_registry(runs.parent, runs, RegistrySettings()) as registry:
        BODY
                os.kill(os.getpid(), signal.SIGKILL)
        anyio.run(main)
    """).replace("RUNS", repr(str(runs))).replace("BODY", textwrap.indent(textwrap.dedent(body), " " * 8))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done.stdout


async def test_a_batch_is_durable_once_its_journal_line_is_synced(tmp_path, monkeypatch):
    events: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(journal_module.os, "fdatasync", lambda fd: (real_fdatasync(fd), events.append("journal")))
    monkeypatch.setattr(os, "fsync", lambda fd: (real_fsync(fd), events.append(os.readlink(f"/proc/self/fd/{fd}"))))
    commit = GroupCommit(journal=Journal(tmp_path))
    recs = [record(f"task{i:04d}") for i in range(12)]
    errors = await commit.save_all([(tmp_path / f"{r.task_id}.json", data(r)) for r in recs])
    assert errors == [None] * 12
    assert events == [str(tmp_path), "journal"]  # the new journal's directory entry; then one fdatasync for all
    events.clear()
    more = [record(f"more{i:04d}") for i in range(3)]
    assert await commit.save_all([(tmp_path / f"{r.task_id}.json", data(r)) for r in more]) == [None] * 3
    assert events == ["journal"]  # no fsync of each file, nor of the directory
    [wal] = journals(tmp_path)
    lines = wal.read_bytes().splitlines()
    assert lines == [f"{r.task_id}.json".encode() + b"\t" + data(r) for r in recs + more]
    assert {r.task_id for r in load_records(tmp_path)} == {r.task_id for r in recs + more}


@pytest.mark.fault("a crash loses final records the server had reported written (the file gone, empty, or still "
                   "the running record): the journal writes them back at the next start")
async def test_recovery_writes_back_what_a_crash_lost(tmp_path):
    journal = Journal(tmp_path)
    recs = [record(f"lost{i:04d}") for i in range(4)]
    commit = GroupCommit(journal=journal)
    await commit.save_all([(tmp_path / f"{r.task_id}.json", data(r)) for r in recs])
    journal.close()  # the server is gone (its flock with it)
    (tmp_path / "lost0000.json").unlink()
    (tmp_path / "lost0001.json").write_bytes(b"")
    (tmp_path / "lost0002.json").write_bytes(data(record("lost0002", done=False)))
    assert recover(tmp_path, journal_replaces) == 3
    assert {r.task_id: r.status for r in load_records(tmp_path)} == {r.task_id: "completed" for r in recs}
    assert journals(tmp_path) == []  # recovered, then removed


async def test_a_live_servers_journal_is_left_alone(tmp_path):
    journal = Journal(tmp_path)
    await GroupCommit(journal=journal).save_all([(tmp_path / "live0001.json", data(record("live0001")))])
    (tmp_path / "live0001.json").unlink()
    assert recover(tmp_path, journal_replaces) == 0  # its flock is held: not ours to recover
    assert not (tmp_path / "live0001.json").exists() and len(journals(tmp_path)) == 1
    journal.close()
    assert recover(tmp_path, journal_replaces) == 1


@pytest.mark.fault("hostile record journals in a cloned workspace (a symlink, a FIFO, entries naming other paths, "
                   "a running record over a readable one, a cut line, a newer finished record): nothing outside "
                   "is touched, nothing readable is replaced by an unfinished record nor anything finished at all, "
                   "start-up never blocks")
async def test_hostile_journals_are_never_trusted(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    (runs / "journal-1-link.wal").symlink_to(outside)
    os.mkfifo(runs / "journal-2-fifo.wal")
    finished_before = record("done0001")
    (runs / "done0001.json").write_bytes(data(finished_before))
    running_before = record("running1", done=False)
    running_before.description = "the file's version"
    (runs / "running1.json").write_bytes(data(running_before))
    other = record("done0001")
    other.note("a journal's version")
    lines = [
        b"../outside.json\t" + data(record("outside")),
        b"sub/x.json\t" + data(record("x")),
        b".hidden.json\t" + data(record("hidden")),
        b"wrongname.json\t" + data(record("somebody")),  # names another task's record
        b"running1.json\t" + data(record("running1", done=False)),  # never replaces a readable record
        b"done0001.json\t" + data(other),  # never replaces a finished record
        b"garbage1.json\tnot json at all",
        b"good0001.json\t" + data(record("good0001")),
        b"cut00001.json\t" + data(record("cut00001"))[:40],  # no newline: a line cut short
    ]
    (runs / "journal-3-planted.wal").write_bytes(b"\n".join(lines))
    with anyio.fail_after(10):
        restored = await anyio.to_thread.run_sync(recover, runs, journal_replaces)
    assert restored == 1
    assert sorted(p.name for p in runs.iterdir()) == ["done0001.json", "good0001.json", "journal-1-link.wal",
                                                        "journal-2-fifo.wal", "running1.json"]
    assert outside.read_text() == "keep" and (runs / "done0001.json").read_bytes() == data(finished_before)
    assert (runs / "running1.json").read_bytes() == data(running_before)


async def test_a_checkpoint_empties_the_journal_and_keeps_every_record(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "CHECKPOINT_ENTRIES", 5)
    commit = GroupCommit(journal=Journal(tmp_path))
    for i in range(12):
        rec = record(f"cp{i:06d}")
        await commit.save(tmp_path / f"{rec.task_id}.json", data(rec))
    [wal] = journals(tmp_path)
    assert len(wal.read_bytes().splitlines()) == 2  # checkpointed at 5 and 10
    assert len(load_records(tmp_path)) == 12


async def test_a_runs_directory_removed_and_made_again_gets_a_new_journal(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    commit = GroupCommit(journal=Journal(runs))
    await commit.save(runs / "first001.json", data(record("first001")))
    subprocess.run(["rm", "-rf", str(runs)], check=True)  # git clean -fdX
    runs.mkdir()
    await commit.save(runs / "second01.json", data(record("second01")))
    [wal] = journals(runs)
    assert wal.read_bytes().startswith(b"second01.json\t")


async def test_durable_writes_outside_the_journals_directory_are_fsynced_one_by_one(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (real_fsync(fd), synced.append(os.readlink(f"/proc/self/fd/{fd}"))))
    (tmp_path / "runs").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    await GroupCommit(journal=Journal(tmp_path / "runs")).save(other / "else0001.json", data(record("else0001")))
    assert (other / "else0001.json").exists() and journals(other) == journals(tmp_path / "runs") == []
    assert synced == [str(other / ".else0001.json.tmp"), str(other)]  # the file (before its rename), its directory


@pytest.mark.fault("disk full when the record journal is written: each record's write fails clearly (the write "
                   "made on its own fails too), nothing hangs, and writes succeed again once there is room")
async def test_a_full_disk_fails_the_journal_and_the_records_clearly(tiny_disk):
    runs = tiny_disk / "runs"
    runs.mkdir()
    commit = GroupCommit(journal=Journal(runs))
    await commit.save(runs / "before01.json", data(record("before01")))
    from conftest import fill_disk

    fill_disk(tiny_disk)
    big = record("full0001")
    big.note("x" * 8192)
    with anyio.fail_after(10):
        [error] = await commit.save_all([(runs / "full0001.json", data(big))])
    assert isinstance(error, OSError) and error.errno == 28  # ENOSPC
    assert not (runs / "full0001.json").exists()
    (tiny_disk / "filler").unlink()
    await commit.save(runs / "after001.json", data(record("after001")))
    assert {r.task_id for r in load_records(runs)} == {"before01", "after001"}


@pytest.mark.fault("the server is killed (SIGKILL) right after tasks finished, with a final record lost: the next "
                   "server's start-up restores it from the dead server's journal")
async def test_a_killed_server_s_journal_is_recovered_by_the_next_one(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    task_id = killed_server(runs, """
        _, members = await registry.launch_group(["echo one", "echo two"], max_parallel=2, cwd=runs.parent)
        for task in members:
            await task.done.wait()
        lost = members[0].record.model_copy(deep=True)
        lost.state = TaskRecord(task_id="x", kind="command", command="", cwd="/").state  # queued: not done
        (runs / f"{lost.task_id}.json").write_text(lost.model_dump_json())  # as if the page cache was lost
        print(members[0].record.task_id, flush=True)
    """).split()[0]
    assert not TaskRecord.model_validate_json((runs / f"{task_id}.json").read_text()).is_done
    assert len(journals(runs)) == 2  # final records, first records
    for wal in journals(runs):
        fd = os.open(wal, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its owner is dead: the lock is free
        finally:
            os.close(fd)
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    async with open_registry(tmp_path, runs, RegistrySettings()) as registry:
        task = registry.get(task_id)
        assert task.record.status == "completed" and task.record.last_line == "one"
    assert journals(runs) == []


def test_first_records_are_emptied_but_for_those_not_filed(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "CHECKPOINT_ENTRIES", 4)
    firsts = FirstRecords(tmp_path)
    queued = [record(f"fr{i:06d}", done=False) for i in range(9)]
    for rec in queued:
        firsts.append([(tmp_path / f"{rec.task_id}.json", data(rec))])
        if rec.task_id != "fr000001":
            firsts.filed(tmp_path / f"{rec.task_id}.json")  # every file but one was written
    [wal] = journals(tmp_path)
    names = [line.split(b"\t")[0] for line in wal.read_bytes().splitlines()]
    assert b"fr000001.json" in names and len(names) < 9  # emptied on the way, the unfiled one kept
    firsts.close()
    assert recover(tmp_path, journal_replaces) == len(names)  # (none of the files exists here)
    assert {r.task_id for r in load_records(tmp_path)} == {n.decode()[:-5] for n in names}


def test_a_failed_append_keeps_none_of_its_records(tmp_path, monkeypatch):
    firsts = FirstRecords(tmp_path)
    firsts.append([(tmp_path / "kept0001.json", data(record("kept0001", done=False)))])
    real = journal_module.write_all

    def torn(fd, payload):  # half the batch reaches the file, then the disk is full
        real(fd, payload[: len(payload) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module, "write_all", torn)
    with pytest.raises(OSError, match="No space left"):
        firsts.append([(tmp_path / f"lost{i:04d}.json", data(record(f"lost{i:04d}", done=False))) for i in range(4)])
    monkeypatch.setattr(journal_module, "write_all", real)
    firsts.close()
    assert recover(tmp_path, journal_replaces) == 1
    assert [r.task_id for r in load_records(tmp_path)] == ["kept0001"]


@pytest.mark.fault("the server is killed right after a fan-out answered, before its members' record files exist: "
                   "the next server shows every member of the group, interrupted")
async def test_launched_tasks_outlive_a_crash_before_their_files(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    group, *ids = killed_server(runs, """
        group, members = await registry.launch_group(["sleep 60"] * 3, max_parallel=1, cwd=runs.parent)
        print(group, *(t.record.task_id for t in members), flush=True)
    """).split()
    assert not list(runs.glob("*.json"))  # no record file was written before the crash
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    async with open_registry(tmp_path, runs, RegistrySettings()) as registry:
        members = [registry.get(task_id) for task_id in ids]
        assert [t.record.status for t in members] == ["interrupted"] * 3
        assert {t.record.group_id for t in members} == {group}
    # the crashed server's journal was recovered and removed; what is left is this server's record journal,
    # which made the three interrupted records durable with one fdatasync (kept for the next server)
    assert [p.name.split("-")[1] for p in journals(runs)] == [str(os.getpid())]


def test_first_records_whose_files_are_all_written_leave_no_journal_at_a_clean_stop(tmp_path):
    firsts = FirstRecords(tmp_path)
    firsts.append([(tmp_path / "done0001.json", data(record("done0001", done=False)))])
    firsts.filed(tmp_path / "done0001.json")
    firsts.close()
    assert journals(tmp_path) == []
    kept = FirstRecords(tmp_path)
    kept.append([(tmp_path / "keep0001.json", data(record("keep0001", done=False)))])  # its file never written
    kept.close()
    assert len(journals(tmp_path)) == 1 and recover(tmp_path, journal_replaces) == 1


def test_records_an_emptying_could_not_write_again_go_with_the_next_append(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "CHECKPOINT_ENTRIES", 2)
    firsts = FirstRecords(tmp_path)
    firsts.append([(tmp_path / "wait0001.json", data(record("wait0001", done=False)))])  # its file never written
    for i in range(2, 5):  # these have their files: 4 entries, 1 unfiled, the next append empties the journal
        firsts.append([(tmp_path / f"done000{i}.json", data(record(f"done000{i}", done=False)))])
        firsts.filed(tmp_path / f"done000{i}.json")
    real = journal_module.write_all
    calls = []

    def full_once(fd, payload):  # writing the unfiled record again after emptying fails, once
        calls.append(payload)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(fd, payload)

    monkeypatch.setattr(journal_module, "write_all", full_once)
    firsts.append([(tmp_path / "new00005.json", data(record("new00005", done=False)))])
    assert len(calls) == 2 and b"wait0001.json" in calls[1]  # it went again with the append
    firsts.close()
    assert recover(tmp_path, journal_replaces) == 2
    assert sorted(r.task_id for r in load_records(tmp_path)) == ["new00005", "wait0001"]


# -- final records' files written later (GroupCommit(file_delay=...), group_commit.py)


async def test_a_final_records_file_waits_while_the_journal_holds_it(tmp_path):
    written: list[str] = []
    target = tmp_path / "late0001.json"
    rec = record("late0001")
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg, journal=Journal(tmp_path), file_delay=0.3, on_written=lambda p: written.append(p.name))
        await commit.save(target, data(rec))
        # durable at once in the journal, the file not made yet: a reader of the runs directory sees it completed
        assert not target.exists() and commit.unfiled == 1
        [wal] = journals(tmp_path)
        assert wal.read_bytes() == b"late0001.json\t" + data(rec) + b"\n"
        assert {r.task_id: r.status for r in load_records(tmp_path, journaled=True)} == {"late0001": "completed"}
        assert written == []
        with anyio.fail_after(5):
            while not target.exists():
                await anyio.sleep(0.02)
        assert target.read_bytes() == data(rec) and commit.unfiled == 0
        await anyio.sleep(0.05)
        assert written == ["late0001.json"]  # told once, when the file was written
        tg.cancel_scope.cancel()


async def test_a_file_a_running_record_made_is_replaced_at_once_never_left_stale(tmp_path):
    target = tmp_path / "live0001.json"
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg, journal=Journal(tmp_path), file_delay=60)
        commit.save_soon(target, data(record("live0001", done=False)), lambda exc: None, delay=0)
        with anyio.fail_after(5):
            while not target.exists():
                await anyio.sleep(0.01)
        await commit.save(target, data(record("live0001")))
        assert TaskRecord.model_validate_json(target.read_bytes()).status == "completed"  # not "running" for 60 s
        # a file that shows the task live while its final record is only journaled: the journal wins for readers
        (tmp_path / "stale001.json").write_bytes(data(record("stale001", done=False)))
        await commit.save(tmp_path / "stale001.json", data(record("stale001")))
        statuses = {r.task_id: r.status for r in load_records(tmp_path, journaled=True)}
        assert statuses == {"live0001": "completed", "stale001": "completed"}
        tg.cancel_scope.cancel()


async def test_a_checkpoint_writes_the_waiting_files_before_it_empties_the_journal(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "CHECKPOINT_ENTRIES", 5)
    from agent_parallel.tasks import group_commit

    monkeypatch.setattr(group_commit, "CHECKPOINT_ENTRIES", 5)
    recs = [record(f"ckpt{i:04d}") for i in range(7)]
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg, journal=Journal(tmp_path), file_delay=60)
        await commit.save_all([(tmp_path / f"{r.task_id}.json", data(r)) for r in recs[:3]])
        await commit.save_all([(tmp_path / f"{r.task_id}.json", data(r)) for r in recs[3:6]])
        [wal] = journals(tmp_path)
        assert len(wal.read_bytes().splitlines()) == 6 and not list(tmp_path.glob("ckpt*.json"))  # not emptied
        await commit.save(tmp_path / "ckpt0006.json", data(recs[6]))  # the journal is due: every file goes now
        assert wal.read_bytes() == b"" and commit.unfiled == 0
        assert {r.task_id: r.status for r in load_records(tmp_path)} == {r.task_id: "completed" for r in recs}
        tg.cancel_scope.cancel()


async def test_a_pruned_records_waiting_file_is_never_written(tmp_path):
    target = tmp_path / "gone0001.json"
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg, journal=Journal(tmp_path), file_delay=0.1)
        await commit.save(target, data(record("gone0001")))
        commit.forget(target)
        await anyio.sleep(0.4)
        assert not target.exists() and commit.unfiled == 0
        commit.file_now()
        assert not target.exists()
        tg.cancel_scope.cancel()


async def test_a_clean_stop_writes_every_waiting_file(tmp_path):
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    runs = tmp_path / "runs"
    async with open_registry(tmp_path, runs, RegistrySettings()) as registry:
        _, members = await registry.launch_group(["true"] * 5, max_parallel=5, cwd=tmp_path)
        with anyio.fail_after(10):
            for task in members:
                await task.done.wait()
        await registry.records_saved()
    assert {r.task_id: r.status for r in load_records(runs)} == {t.record.task_id: "completed" for t in members}


def long_ended_task_journaled(tmp_path: Path) -> tuple[str, bytes]:
    """Task old00001, its running record's file in ``tmp_path``, and (the pid of a process that has exited,
    the journal line of its final record, an hour old: a live server would have written its file by now)."""
    long_ago = time.time() - 3600
    old = TaskRecord(task_id="old00001", kind="command", command="true", cwd="/tmp", created_at=long_ago)
    old.start(long_ago, None)
    old.end(Succeeded(), long_ago + 1)
    (tmp_path / "old00001.json").write_bytes(data(record("old00001", done=False)))  # the running record's file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    return dead, b"old00001.json\t" + data(old) + b"\n"


def test_status_shows_a_gone_servers_journaled_records_however_old_a_live_servers_only_recent(tmp_path):
    dead, line = long_ended_task_journaled(tmp_path)
    (tmp_path / f"journal-{os.getpid()}-0a1b2c3d.wal").write_bytes(line)  # a live server's (this process)
    assert {r.task_id: r.status for r in load_records(tmp_path, journaled=True)} == {"old00001": "running"}
    (tmp_path / f"journal-{os.getpid()}-0a1b2c3d.wal").rename(tmp_path / f"journal-{dead}-0a1b2c3d.wal")
    assert {r.task_id: r.status for r in load_records(tmp_path, journaled=True)} == {"old00001": "completed"}
    assert recover(tmp_path, journal_replaces) == 1  # what the next server writes back: the same
    assert {r.task_id: r.status for r in load_records(tmp_path)} == {"old00001": "completed"}


def test_status_takes_a_journal_whose_lock_is_held_for_a_live_servers_though_its_pid_is_not_seen(tmp_path):
    """A server in a PID namespace nested in the reader's (a container sharing the workspace, `status` run on
    the host) names its journal with a pid the reader does not see: the flock it holds on the journal says it
    lives, so `status` keeps to the 10 s window."""
    dead, line = long_ended_task_journaled(tmp_path)
    path = tmp_path / f"journal-{dead}-0a1b2c3d.wal"
    path.write_bytes(line)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # its server, alive where its pid cannot be seen from here
        assert {r.task_id: r.status for r in load_records(tmp_path, journaled=True)} == {"old00001": "running"}
    finally:
        os.close(fd)
    assert {r.task_id: r.status for r in load_records(tmp_path, journaled=True)} == {"old00001": "completed"}
    assert path.read_bytes().startswith(b"old00001.json")  # read only: nothing changed


@pytest.mark.fault("record files cannot be made for long (no inodes left) while the journal still takes appends, so it "
                   "grows past its read limit: the next start reads its newest records (those a server still keeps) "
                   "and writes them back; a planted giant journal costs no more")
def test_a_journal_grown_past_the_limit_is_read_from_its_end(tmp_path, monkeypatch, caplog):
    # record files that cannot be made (no inodes left) keep the journal from being emptied: it grows, and its
    # newest records are the ones a server still keeps; a planted giant file costs no more than the limit
    recs = [record(f"many{i:04d}") for i in range(40)]
    lines = [b"%s.json\t%s\n" % (r.task_id.encode(), data(r)) for r in recs]
    monkeypatch.setattr(journal_module, "MAX_JOURNAL_BYTES", sum(map(len, lines[-10:])))  # the last 10 lines exactly
    (tmp_path / "journal-1-0a1b2c3d.wal").write_bytes(b"".join(lines))
    seen = {r.task_id for r in load_records(tmp_path, journaled=True)}
    assert seen == {r.task_id for r in recs[-10:]}
    assert recover(tmp_path, journal_replaces) == 10
    assert {r.task_id for r in load_records(tmp_path)} == {r.task_id for r in recs[-10:]}
    assert not journals(tmp_path) and "only its last" in caplog.text
    (tmp_path / "journal-2-0a1b2c3d.wal").write_bytes(b"x" * 100_000)  # no line at all in its end
    assert recover(tmp_path, journal_replaces) == 0 and not journals(tmp_path)
    assert len(load_records(tmp_path)) == 10


@pytest.mark.fault("the server is killed (SIGKILL) in the second between tasks' ends and their record files (the "
                   "files of final records are written a second later, the journal holding them): the next server "
                   "writes them back, each task completed")
async def test_a_kill_before_the_final_records_files_loses_none(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    ids = killed_server(runs, """
        _, members = await registry.launch_group(["echo one", "echo two", "true"], max_parallel=3, cwd=runs.parent)
        for task in members:
            await task.done.wait()
        await registry.records_saved()
        print(*(t.record.task_id for t in members), flush=True)
    """).split()
    # killed before their files (a task slower than 50 ms to end had a running record's file, replaced at once)
    assert all(not (runs / f"{i}.json").exists() or TaskRecord.model_validate_json((runs / f"{i}.json").read_bytes())
               .is_done for i in ids)
    assert {r.task_id: r.status for r in load_records(runs, journaled=True)} == dict.fromkeys(ids, "completed")
    # read long after (no server started since): the gone server's journal still counts, as recovery will
    monkeypatch.setattr(records_module, "JOURNALED_WINDOW_S", 0.0)
    assert {r.task_id: r.status for r in load_records(runs, journaled=True)} == dict.fromkeys(ids, "completed")
    from agent_parallel.tasks.registry import RegistrySettings, open_registry

    async with open_registry(tmp_path, runs, RegistrySettings()) as registry:
        assert [registry.get(i).record.status for i in ids] == ["completed"] * 3
        assert registry.get(ids[0]).record.last_line == "one"
    assert {r.task_id: r.status for r in load_records(runs) if r.task_id in ids} == dict.fromkeys(ids, "completed")


@pytest.mark.fault("the disk hangs when a stopping server writes the record files still waiting: the server exits "
                   "within the limit, the journal keeps the records, and the next server writes them back")
async def test_a_hung_disk_at_close_does_not_hang_the_exit(tmp_path, monkeypatch):
    from agent_parallel.tasks import group_commit

    release = threading.Event()

    def hung_disk(path, data, **kw):  # hangs, then fails (EIO)
        release.wait(30)
        raise OSError(5, "Input/output error")

    rec = record("hung0001")
    async with anyio.create_task_group() as tg:
        journal = Journal(tmp_path)
        commit = GroupCommit(tg=tg, journal=journal, file_delay=60)
        await commit.save(tmp_path / "hung0001.json", data(rec))
        tg.cancel_scope.cancel()
    monkeypatch.setattr(group_commit, "write_atomic", hung_disk)
    started = time.monotonic()
    try:
        assert commit.file_now(timeout=0.3) is False
        assert time.monotonic() - started < 2
        assert not (tmp_path / "hung0001.json").exists()
    finally:
        release.set()
    journal.close()  # the server is gone: the next one recovers what its journal holds
    assert recover(tmp_path, journal_replaces) == 1
    assert {r.task_id: r.status for r in load_records(tmp_path)} == {"hung0001": "completed"}


@pytest.mark.fault("the runs directory refuses new files while the record journal still takes appends (a record's "
                   "file fails with EIO): each failing batch is one warning, the files are tried again only every "
                   "checkpoint's worth of records (not all of them at every batch), and once files can be made "
                   "again every record gets its file and the journal is emptied")
async def test_files_that_cannot_be_made_are_retried_sparingly_and_none_is_lost(tmp_path, monkeypatch, caplog):
    from agent_parallel.tasks import group_commit

    monkeypatch.setattr(journal_module, "CHECKPOINT_ENTRIES", 5)
    monkeypatch.setattr(group_commit, "CHECKPOINT_ENTRIES", 5)
    real_write, attempts, refusing = group_commit.write_atomic, [], [True]

    def refusing_dir(path, data, **kw):
        attempts.append(path.name)
        if refusing[0]:
            raise OSError(5, "Input/output error")
        real_write(path, data, **kw)

    monkeypatch.setattr(group_commit, "write_atomic", refusing_dir)
    recs = [record(f"eio{i:05d}") for i in range(30)]
    async with anyio.create_task_group() as tg:
        commit = GroupCommit(tg=tg, journal=Journal(tmp_path), file_delay=60)
        for rec in recs[:25]:
            await commit.save(tmp_path / f"{rec.task_id}.json", data(rec))
        assert commit.unfiled == 25 and not list(tmp_path.glob("eio*.json"))
        assert len(attempts) < 80  # tried every few batches: all at every batch would be 5+6+...+25 = 315
        warnings = [r for r in caplog.records if "could not write" in r.getMessage()]
        assert 1 <= len(warnings) <= 5 and "Input/output error" in warnings[0].getMessage()
        refusing[0] = False
        for rec in recs[25:]:
            await commit.save(tmp_path / f"{rec.task_id}.json", data(rec))
        assert commit.unfiled == 0
        [wal] = journals(tmp_path)
        assert wal.read_bytes() == b""  # every file written, then the journal emptied
        assert {r.task_id: r.status for r in load_records(tmp_path)} == {r.task_id: "completed" for r in recs}
        tg.cancel_scope.cancel()
