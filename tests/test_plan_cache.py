"""The queue reader's cache and the re-plan of a changed queue never serve stale data.

A reader re-parses only files whose name, size, timestamps or inode changed, and a plan is reused
(or patched, for a title) when nothing it depends on changed. Whatever happens to the files (an
edit of any field, an edit of the same size at once, a rename = a status change, a removal, an
addition), the plan a long-lived reader gives must be the plan a new reader gives.
"""

from __future__ import annotations

import gc
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent_parallel.queue import items as items_module
from agent_parallel.queue.items import QueueReader
from agent_parallel.queue.plan import plan_workspace
from queue_helpers import write_item


def fresh_plan(root: Path) -> dict:
    return plan_workspace(root, None, 3, QueueReader()).model_dump()


def queue_file(root: Path, item_id: int) -> Path:
    return next((root / ".agent/queue").glob(f"{item_id:03d}-*.md"))


def test_an_unchanged_queue_is_not_read_again(workspace: Path) -> None:
    for number in range(1, 6):
        write_item(workspace, number, f"item-{number}", files=[f"f{number}.py"], blocked_by=[number - 1] if number > 1 else [])
    reader = QueueReader()
    first = plan_workspace(workspace, None, 3, reader)
    parsed = reader.parse_count
    assert plan_workspace(workspace, None, 3, reader) is first
    assert reader.parse_count == parsed


@pytest.mark.parametrize("edit", ["body", "title", "estimate", "blocked_by", "files", "priority", "status field"])
def test_an_edit_of_the_same_size_at_once_shows(workspace: Path, edit: str) -> None:
    """Rewritten right after a plan, same length: the timestamps may not have moved; the plan must."""
    write_item(workspace, 1, "first", files=["a.py"])
    write_item(workspace, 2, "second", files=["b.py"])
    before = {"body": "Body A.", "title": "Title A", "estimate": "10m", "blocked_by": "[ ]", "files": "[a.py]",
              "priority": "low", "status field": "pending"}[edit]
    after = {"body": "Body B.", "title": "Title B", "estimate": "20m", "blocked_by": "[2]", "files": "[b.py]",
             "priority": "top", "status field": "blocked"}[edit]
    assert len(before) == len(after)
    reader = QueueReader()
    for value in (before, after, before, after):
        text = (f"---\ntitle: {value if edit == 'title' else 'T'}\nestimate: {value if edit == 'estimate' else '5m'}\n"
                f"blocked_by: {value if edit == 'blocked_by' else '[]'}\nfiles: {value if edit == 'files' else '[a.py]'}\n"
                f"priority: {value if edit == 'priority' else 'low'}\nstatus: "
                f"{value if edit == 'status field' else 'pending'}\n---\n{value if edit == 'body' else 'Body.'}\n")
        path = queue_file(workspace, 1)
        path.write_text(text)
        assert plan_workspace(workspace, None, 3, reader).model_dump() == fresh_plan(workspace)
        assert reader.snapshot(workspace, ".agent/queue").items[0].body == (value if edit == "body" else "Body.") + "\n"


def test_renamed_removed_and_added_files_show(workspace: Path) -> None:
    for number in range(1, 4):
        write_item(workspace, number, f"item-{number}", files=["shared.py"], blocked_by=[1] if number > 1 else [])
    reader = QueueReader()
    plan = plan_workspace(workspace, None, 3, reader)
    assert plan.run_now == ["001"]
    path = queue_file(workspace, 1)
    path.rename(path.with_name(path.name.replace("-pending-", "-completed-")))  # what update_item does
    plan = plan_workspace(workspace, None, 3, reader)
    assert [item.status for item in plan.items] == ["completed", "pending", "pending"]
    assert plan.run_now == ["002"]  # 002 and 003 share a file: one at a time
    assert plan.model_dump() == fresh_plan(workspace)
    queue_file(workspace, 2).unlink()
    plan = plan_workspace(workspace, None, 3, reader)
    assert [item.id for item in plan.items] == ["001", "003"]
    assert plan.model_dump() == fresh_plan(workspace)
    write_item(workspace, 4, "late", files=["other.py"])
    plan = plan_workspace(workspace, None, 3, reader)
    assert [item.id for item in plan.items] == ["001", "003", "004"]
    assert sorted(plan.run_now) == ["003", "004"]
    assert plan.model_dump() == fresh_plan(workspace)


def test_a_file_replaced_by_another_with_the_same_stat_is_read_again(workspace: Path, monkeypatch) -> None:
    """Timestamps frozen (a coarse clock, or a file system keeping seconds only): while they are
    recent, the reader compares the bytes, so a rewrite of the same size is still seen."""
    write_item(workspace, 1, "first", title="Title A")
    path = queue_file(workspace, 1)
    real_stat = os.stat
    frozen = time.time_ns()

    def coarse_stat(target, *args, **kwargs):
        info = real_stat(target, *args, **kwargs)
        if str(target) != str(path):
            return info
        return SimpleNamespace(st_mode=info.st_mode, st_size=info.st_size, st_ino=info.st_ino,
                               st_mtime_ns=frozen, st_ctime_ns=frozen)

    monkeypatch.setattr(items_module.os, "stat", coarse_stat)
    reader = QueueReader()
    assert plan_workspace(workspace, None, 3, reader).items[0].title == "Title A"
    path.write_text(path.read_text().replace("Title A", "Title B"))
    assert plan_workspace(workspace, None, 3, reader).items[0].title == "Title B"
    parsed = reader.parse_count
    assert plan_workspace(workspace, None, 3, reader).items[0].title == "Title B"
    assert reader.parse_count == parsed  # compared, equal: not parsed again


def test_plans_of_a_long_lived_reader_follow_every_change(workspace: Path) -> None:
    """Random edits of every kind, one after another; after each the long-lived reader's plan (reused,
    patched or planned again) equals the plan of a new reader."""
    rng = random.Random(11)
    for number in range(1, 31):
        write_item(workspace, number, f"item-{number}", title=f"Item {number}", files=[f"f{number % 7}.py"],
                   blocked_by=[rng.randrange(1, number)] if number > 1 and rng.random() < 0.7 else [],
                   estimate=rng.choice(["5m", "1h"]), body="Do it.")
    reader = QueueReader()
    plan_workspace(workspace, None, 3, reader)
    next_id = 31
    for step in range(60):
        files = sorted((workspace / ".agent/queue").glob("*.md"))
        path = rng.choice(files)
        text = path.read_text()
        kind = rng.choice(["body", "body", "title", "title", "estimate", "deps", "rename", "remove", "add", "bad"])
        if kind == "body":
            path.write_text(text + f"More notes {step}.\n")
        elif kind == "title":
            path.write_text(text.replace("# ", f"# Renamed {step} ", 1) if "title:" not in text
                            else text.replace("title: ", f"title: T{step} ", 1))
        elif kind == "estimate":
            path.write_text(text.replace("estimate: ", "estimate: 1", 1))
        elif kind == "deps":
            path.write_text(text.replace("files:", f"blocked_by: [{rng.randrange(1, next_id)}]\nfiles:", 1)
                            if "blocked_by" not in text else text.replace("blocked_by:", "blocks:", 1))
        elif kind == "rename":
            status = rng.choice(["pending", "completed", "failed", "in_progress"])
            name = path.name.split("-", 2)
            path.rename(path.with_name(f"{name[0]}-{status}-{name[2]}"))
        elif kind == "remove" and len(files) > 5:
            path.unlink()
        elif kind == "add":
            write_item(workspace, next_id, f"item-{next_id}", title=f"Item {next_id}", files=["f1.py"],
                       blocked_by=[rng.randrange(1, next_id)])
            next_id += 1
        elif kind == "bad":
            path.write_text("---\ntitle: [unclosed\n---\n")
        assert plan_workspace(workspace, None, 3, reader).model_dump() == fresh_plan(workspace), (step, kind)


def test_planning_restores_the_garbage_collector(workspace: Path) -> None:
    write_item(workspace, 1, "first")
    assert gc.isenabled()
    plan_workspace(workspace, None, 3, QueueReader())
    assert gc.isenabled()
    gc.disable()
    try:
        plan_workspace(workspace, None, 3, QueueReader())
        assert not gc.isenabled()  # paused by someone else: left as it was
    finally:
        gc.enable()
