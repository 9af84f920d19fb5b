"""A server plans its queue when it starts (`plan.prepare_plan`), so the first `queue_plan` finds the plan made.

The preparation is work nobody asked for: it must never stop or slow the server's closing, never keep a
half-read queue, never leave a directory watch behind, and a queue it cannot plan (a broken config, no
queue directory, a hostile number of files) is left for `queue_plan` to report when asked.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from agent_parallel.queue import plan as plan_module
from agent_parallel.queue.items import QueueReader
from agent_parallel.queue.plan import plan_page, prepare_plan
from agent_parallel.server import ServerSettings, build_server
from conftest import call, call_error
from queue_helpers import write_item

QUEUE = ".agent/queue"


def write_chain(root: Path, count: int) -> None:
    for number in range(1, count + 1):
        write_item(root, number, f"item-{number}", files=[f"f{number % 7}.py"],
                   blocked_by=[number - 1] if number > 1 else [])


def has_plan(reader: QueueReader, root: Path) -> bool:
    """Whether the reader's snapshot of the queue holds a plan (what `queue_plan` would reuse)."""
    return any(isinstance(key, tuple) and key[0] == "plan" for key in reader.snapshot(root, QUEUE).memo)


def inotify_descriptors() -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd")
               if _link(f"/proc/self/fd/{fd}") == "anon_inode:inotify")


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_prepare_plan_makes_the_plan_queue_plan_reuses(workspace: Path) -> None:
    write_chain(workspace, 5)
    reader = QueueReader(watch=False)
    assert prepare_plan(workspace, reader, lambda: False) == 5
    assert reader.parse_count == 5 and has_plan(reader, workspace)
    page = plan_page(workspace, None, None, reader)
    assert [row.id for row in page.items] == ["001", "002", "003", "004", "005"] and page.run_now == ["001"]
    assert reader.parse_count == 5  # nothing read again


def test_a_stopped_preparation_keeps_nothing_half_read(workspace: Path) -> None:
    write_chain(workspace, 600)
    reader = QueueReader(watch=False)
    looks = [0]

    def stop() -> bool:
        looks[0] += 1
        return looks[0] > 2  # before the read, at file 0, then at file 256: stop

    assert prepare_plan(workspace, reader, stop) is None
    assert reader.parse_count == 256
    assert not reader._cache  # nothing of the stopped read was kept
    page = plan_page(workspace, None, None, reader, limit=1000)
    assert len(page.items) == 600 and reader.parse_count == 256 + 600


def test_a_preparation_stopped_before_it_began_reads_nothing(workspace: Path) -> None:
    write_chain(workspace, 3)
    reader = QueueReader()
    before = inotify_descriptors()
    assert prepare_plan(workspace, reader, lambda: True) is None
    assert reader.parse_count == 0 and inotify_descriptors() == before  # no watch started either


@pytest.mark.fault("a queue directory with more files than the server plans unasked (PREPARE_MAX_FILES): not read at start; queue_plan still plans it when asked")
def test_nothing_to_prepare(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = QueueReader(watch=False)
    assert prepare_plan(workspace, reader, lambda: False) is None  # no queue directory
    write_chain(workspace, 5)
    monkeypatch.setattr(plan_module, "PREPARE_MAX_FILES", 4)
    assert prepare_plan(workspace, reader, lambda: False) is None  # more files than it plans unasked
    assert reader.parse_count == 0
    assert len(plan_page(workspace, None, None, reader).items) == 5  # asked for, it is planned
    monkeypatch.setattr(plan_module, "PREPARE_MAX_FILES", 5)
    assert prepare_plan(workspace, QueueReader(watch=False), lambda: False) == 5


async def wait_until(condition, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_a_started_server_plans_its_queue_before_it_is_asked(workspace: Path) -> None:
    write_chain(workspace, 5)
    reader = QueueReader()
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0), reader=reader)) as client:
        await wait_until(lambda: reader.parse_count == 5, "the queue to be read")
        await wait_until(lambda: has_plan(reader, workspace), "the plan to be made")
        plan = await call(client, "queue_plan")
        assert plan["run_now"] == ["001"] and len(plan["items"]) == 5
        assert reader.parse_count == 5


@pytest.mark.fault("the server closes while it still plans a 3,000-file queue it was not asked about: the preparation stops within 256 files, no directory watch is left behind")
@pytest.mark.anyio
async def test_a_server_closing_while_it_prepares_stops_the_preparation(workspace: Path) -> None:
    """Closed at once over 3,000 files: whatever the preparation had reached, no directory watch is
    left behind (the reader's last watches are closed, and none is started after)."""
    write_chain(workspace, 3000)
    reader = QueueReader()
    before = inotify_descriptors()
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0), reader=reader)):
        pass
    await anyio.sleep(0.3)  # a preparation still running in its thread looks at its stop within 256 files
    assert inotify_descriptors() == before


@pytest.mark.fault("an unusable .agent/config.yaml when the server starts and plans its queue ahead: the server serves; queue_plan names the bad key when asked; nothing is changed")
@pytest.mark.anyio
async def test_a_queue_the_server_cannot_prepare_is_reported_when_asked(workspace: Path) -> None:
    """A broken config at start: the server serves, and `queue_plan` says what is wrong (once asked)."""
    write_chain(workspace, 2)
    config = workspace / ".agent/config.yaml"
    config.write_text("queue:\n  dir: [not, a, path]\n")
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        await anyio.sleep(0.2)
        error = await call_error(client, "queue_plan")
        assert "queue.dir" in error
        assert (await call(client, "list_tasks"))["tasks"] == []  # the server is still serving
    assert config.read_text() == "queue:\n  dir: [not, a, path]\n"


def test_an_item_graph_s_index_follows_the_queue_s_changes(tmp_path: Path) -> None:
    """`plan.item_graph` keeps its index of the items with the snapshot and carries it to the next
    through the files that changed (a launch moves one): the carried index is the one a fresh read
    would build, through renames, edits of `blocks`, duplicates, deletions and a new isolated item."""
    from agent_parallel.config import load_config
    from agent_parallel.queue.planner import ItemIndex

    def files(index: ItemIndex) -> tuple[dict[int, set[str]], dict[int, set[str]]]:
        return ({key: {item.file for item in items} for key, items in index.by_id.items()},
                {key: {item.file for item in items} for key, items in index.blockers.items()})

    write_item(tmp_path, 1, "a", blocks=[3])
    write_item(tmp_path, 2, "b", blocked_by=[1])
    second = write_item(tmp_path, 3, "c", blocked_by=[2])
    reader = QueueReader(watch=False)
    config = load_config(tmp_path)[0]

    def graph_of(item_id: int):
        snapshot = reader.snapshot(tmp_path, QUEUE)
        graph = plan_module.item_graph(tmp_path, config, snapshot, item_id)
        assert files(snapshot.memo["item_index"]) == files(ItemIndex.of(snapshot.items))
        return snapshot, graph

    first, graph = graph_of(3)
    assert graph.waits_on[3] == [1, 2] and graph.reasons[second.name] == "waits on 001, 002"
    assert first.memo["own_isolation"] is False and not graph.isolated
    (tmp_path / QUEUE / "001-pending-a.md").rename(tmp_path / QUEUE / "001-completed-a.md")
    write_item(tmp_path, 2, "b", blocked_by=[], blocks=[3])  # an edit: 3 now waits on 2 through `blocks`
    write_item(tmp_path, 2, "dup")  # a second file with id 2
    snapshot, graph = graph_of(3)
    assert snapshot.base is first and "item_index" in first.memo  # carried, not rebuilt
    assert graph.reasons[second.name] == "waits on 002, which has an error"  # its id is used twice
    (tmp_path / QUEUE / "002-pending-dup.md").unlink()
    write_item(tmp_path, 4, "d", isolation="worktree", blocked_by=[3])
    snapshot, graph = graph_of(4)
    assert snapshot.memo["own_isolation"] is True and graph.waits_on[4] == [3]
    assert graph.reasons["004-pending-d.md"] == "waits on 003"
