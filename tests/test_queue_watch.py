"""The queue reader learns from the kernel which files changed (inotify) and never serves a stale plan.

A watch is made before a directory is read in full; afterwards only the files it reports are looked
at. Whatever happens (an edit of the same size at once, a rename, a touch, the directory or an
ancestor replaced, an edit through a symlink, the kernel's event queue overflowing, no inotify
instance left), a long-lived reader must read what a new reader reads. Real files, real inotify.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client

from agent_parallel.queue.items import QueueReader
from agent_parallel.queue.plan import plan_workspace
from agent_parallel.queue.watch import LOCAL_FILE_SYSTEMS, DirectoryWatch, file_system_type
from agent_parallel.server import ServerSettings, build_server
from conftest import call
from queue_helpers import write_item

inotify_simple = pytest.importorskip("inotify_simple")

QUEUE = ".agent/queue"


def titles(reader: QueueReader, root: Path) -> dict[str, str]:
    items, _ = reader.read(root, QUEUE)
    return {item.id_str: item.title for item in items}


def fresh_titles(root: Path) -> dict[str, str]:
    reader = QueueReader()
    try:
        return titles(reader, root)
    finally:
        reader.close()


TAKES_EVERY_INSTANCE = {"test_without_an_inotify_instance_left_the_reader_stats_every_file"}


@pytest.fixture(autouse=True)
def inotify_lock(request: pytest.FixtureRequest) -> Iterator[None]:
    """The test that takes every inotify instance of this user runs alone, across pytest-xdist's
    workers (the limit is per user, not per process): the others here count on getting a watch."""
    exclusive = request.function.__name__ in TAKES_EVERY_INSTANCE
    with open(Path(tempfile.gettempdir()) / "agent-parallel-tests-inotify.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def inotify_fds() -> int:
    """This process's inotify instances (an fd closing while listed is skipped)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").endswith("inotify")
        except OSError:
            pass
    return count


def test_the_workspace_is_on_a_file_system_a_watch_trusts(workspace: Path) -> None:
    assert file_system_type(workspace) in LOCAL_FILE_SYSTEMS  # else the tests below test nothing new
    assert file_system_type(Path("/proc/sys")) == "proc"
    assert DirectoryWatch.start(Path("/proc/sys")) is None  # a file system without every change in events


def test_a_watch_names_each_changed_file_until_settled(workspace: Path) -> None:
    write_item(workspace, 1, "one")
    write_item(workspace, 2, "two")
    queue = workspace / QUEUE
    watch = DirectoryWatch.start(queue)
    assert watch is not None
    try:
        assert watch.changed() == set()
        (queue / "001-pending-one.md").write_text("---\ntitle: One again\n---\n")
        os.rename(queue / "002-pending-two.md", queue / "002-completed-two.md")
        os.utime(queue / "001-pending-one.md", None)
        assert watch.changed() == {"001-pending-one.md", "002-pending-two.md", "002-completed-two.md"}
        assert watch.changed() == {"001-pending-one.md", "002-pending-two.md", "002-completed-two.md"}  # until settled
        watch.settle({"001-pending-one.md", "002-pending-two.md", "002-completed-two.md"})
        assert watch.changed() == set()
        (queue / "003-pending-new.md").write_text("---\ntitle: New\n---\n")
        (queue / "001-pending-one.md").unlink()
        assert watch.changed() == {"003-pending-new.md", "001-pending-one.md"}
    finally:
        watch.close()


def test_an_edit_of_the_same_size_right_after_each_read_is_seen(workspace: Path) -> None:
    """Within one tick of the file system's clock size and timestamps stay the same: the event tells."""
    write_item(workspace, 1, "one")
    path = next((workspace / QUEUE).glob("001-*.md"))
    reader = QueueReader()
    try:
        for round_ in range(300):
            path.write_text(f"---\ntitle: Title {round_:04d}\n---\n")
            assert titles(reader, workspace) == {"001": f"Title {round_:04d}"}
    finally:
        reader.close()


def test_an_unchanged_queue_gives_the_same_snapshot_and_a_change_only_reads_that_file(workspace: Path) -> None:
    for number in range(1, 51):
        write_item(workspace, number, f"item-{number}")
    reader = QueueReader()
    try:
        first = reader.snapshot(workspace, QUEUE)
        parsed = reader.parse_count
        assert reader.snapshot(workspace, QUEUE) is first and reader.parse_count == parsed
        path = next((workspace / QUEUE).glob("007-*.md"))
        path.write_text(path.read_text().replace("# item-7", "# seven"))
        second = reader.snapshot(workspace, QUEUE)
        assert reader.parse_count == parsed + 1
        assert second is not first and {i.id_str: i.title for i in second.items}["007"] == "seven"
        assert second.changes is not None and list(second.changes) == [path.name]
    finally:
        reader.close()


@pytest.mark.fault("the queue directory, or an ancestor of it, replaced by another while a server watches it: "
                   "the new directory's items are planned (the watched path's inode is checked on every read)")
@pytest.mark.parametrize("replace", ["queue directory", "ancestor"])
def test_a_replaced_directory_is_read_again(workspace: Path, replace: str) -> None:
    """The watch follows the old directory's inode: a new directory at the same path is not what it
    watches, and the reader sees that (the path's inode is checked on every read)."""
    write_item(workspace, 1, "one")
    reader = QueueReader()
    try:
        assert titles(reader, workspace) == {"001": "one"}
        moved = workspace / (QUEUE if replace == "queue directory" else ".agent")
        os.rename(moved, moved.with_name(moved.name + "-old"))
        write_item(workspace, 2, "two")
        assert titles(reader, workspace) == {"002": "two"} == fresh_titles(workspace)
        write_item(workspace, 3, "three")  # and the new directory is watched in turn
        assert titles(reader, workspace) == {"002": "two", "003": "three"}
    finally:
        reader.close()


def test_an_edit_through_a_symlinked_item_is_seen(workspace: Path) -> None:
    """An edit of a symlink's target makes no event in the queue directory: such files are always looked at."""
    (workspace / "notes").mkdir()
    target = workspace / "notes/item.md"
    target.write_text("---\ntitle: Before\n---\n")
    (workspace / QUEUE).mkdir(parents=True)
    (workspace / QUEUE / "001-pending-linked.md").symlink_to(target)
    reader = QueueReader()
    try:
        assert titles(reader, workspace) == {"001": "Before"}
        target.write_text("---\ntitle: Later\n---\n")
        assert titles(reader, workspace) == {"001": "Later"}
    finally:
        reader.close()


@pytest.mark.fault("the kernel's inotify event queue overflows (16,384 events between two plans): the reader "
                   "reads the whole directory again, and an edit among the dropped events is planned")
def test_an_overflowing_event_queue_makes_the_reader_read_everything(workspace: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    for number in range(1, 4):
        write_item(workspace, number, f"item-{number}")
    reader = QueueReader()
    try:
        titles(reader, workspace)
        touched = [next((workspace / QUEUE).glob(f"00{n}-*.md")) for n in (1, 2)]
        for _ in range(limit // 2 + 10):  # more events than the kernel keeps (alternating: none merged)
            for path in touched:
                os.utime(path, None)
        edited = next((workspace / QUEUE).glob("003-*.md"))
        edited.write_text(edited.read_text().replace("# item-3", "# three"))
        assert titles(reader, workspace) == fresh_titles(workspace) == {"001": "item-1", "002": "item-2",
                                                                        "003": "three"}
    finally:
        reader.close()


@pytest.mark.fault("no inotify instance left (fs.inotify.max_user_instances used up): no watch, each queue "
                   "file is stat'ed as before and edits are still planned")
def test_without_an_inotify_instance_left_the_reader_stats_every_file(workspace: Path) -> None:
    """fs.inotify.max_user_instances used up (by other programs): no watch, the same answers."""
    write_item(workspace, 1, "one")
    held = []
    try:
        while True:
            try:
                held.append(inotify_simple.INotify())
            except OSError:
                break
            if len(held) > 4096:
                pytest.skip("no limit on inotify instances here")
        assert DirectoryWatch.start(workspace / QUEUE) is None
        reader = QueueReader()
        assert titles(reader, workspace) == {"001": "one"}
        path = next((workspace / QUEUE).glob("001-*.md"))
        path.write_text(path.read_text().replace("# one", "# One"))
        assert titles(reader, workspace) == {"001": "One"}
        reader.close()
    finally:
        for one in held:
            one.close()


@pytest.mark.anyio
async def test_a_server_plans_an_edit_made_just_before_and_closes_its_watch(workspace: Path) -> None:
    for number in range(1, 4):
        write_item(workspace, number, f"item-{number}")
    before = inotify_fds()
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        first = await call(client, "queue_plan")
        assert inotify_fds() == before + 1
        shutil.move(next((workspace / QUEUE).glob("002-*.md")), workspace / QUEUE / "002-completed-item-2.md")
        second = await call(client, "queue_plan")
    assert [row["status"] for row in first["items"]] == ["pending"] * 3
    assert [row["status"] for row in second["items"]] == ["pending", "completed", "pending"]
    assert second == {**plan_workspace(workspace, None, None, QueueReader()).model_dump(mode="json"),
                      "total_items": 3, "next_offset": None}
    assert inotify_fds() == before


@pytest.mark.parametrize("seed", range(6))
def test_a_watching_reader_splices_changes_into_what_a_new_reader_reads(workspace: Path, seed: int) -> None:
    """Random edits, renames (status changes), new files, deletions, files made bad (a diagnostic) and
    made good again, several between two reads or one: after each read, the watching reader's items
    and diagnostics (spliced into its kept order, or rebuilt when many changed) equal a new reader's."""
    import random

    rng = random.Random(seed)
    queue = workspace / QUEUE
    for number in range(1, 41):
        write_item(workspace, number, f"item-{number}")
    reader = QueueReader()
    try:
        reader.snapshot(workspace, QUEUE)
        for _ in range(40):
            for _ in range(rng.choice([1, 1, 2, 5, 70])):
                files = sorted(queue.iterdir())
                path = rng.choice(files)
                action = rng.choice(["edit", "rename", "new", "delete", "bad", "good", "not an item"])
                if action == "edit":
                    path.write_text(path.read_text() + f"\nmore {rng.random()}\n")
                elif action == "rename" and path.name.count("-") >= 2:
                    status = rng.choice(["pending", "completed", "in_progress", "failed", "wrong"])
                    parts = path.name.split("-", 2)
                    path.rename(queue / f"{parts[0]}-{status}-{parts[2]}")
                elif action == "new":
                    write_item(workspace, rng.randint(1, 80), f"new-{rng.randint(1, 10**6)}")
                elif action == "delete" and len(files) > 5:
                    path.unlink()
                elif action == "bad":
                    path.write_text("---\ntitle: [unclosed\n---\n")
                elif action == "good":
                    path.write_text("---\nblocked_by: [1]\n---\n# fixed\n")
                elif action == "not an item":
                    (queue / f"notes-{rng.randint(1, 5)}.md").write_text("no number\n")
            got = reader.snapshot(workspace, QUEUE)
            fresh = QueueReader(watch=False).snapshot(workspace, QUEUE)
            assert got.items == fresh.items
            assert got.diagnostics == fresh.diagnostics
    finally:
        reader.close()
