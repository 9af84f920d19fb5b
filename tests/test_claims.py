"""Claims are exclusive across processes, and a move never overwrites a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent_parallel.queue.claims import (BadTransition, ClaimLost, find_item, history, move_item, release_stale_claims,
                                         rename_noreplace)
from agent_parallel.errors import QueueError


@pytest.fixture
def queue(workspace: Path) -> tuple[Path, Path]:
    queue_dir, runs = workspace / ".agent/queue", workspace / ".agent/runs"
    queue_dir.mkdir(parents=True)
    runs.mkdir(parents=True)
    return queue_dir, runs


def test_claim_then_complete(queue):
    queue_dir, runs = queue
    (queue_dir / "007-pending-add-login.md").write_text("# Add login\n")
    assert move_item(queue_dir, runs, 7, "in_progress", by="agent-a").name == "007-in_progress-add-login.md"
    assert move_item(queue_dir, runs, 7, "completed", by="agent-a").name == "007-completed-add-login.md"
    assert (queue_dir / "007-completed-add-login.md").read_text() == "# Add login\n"
    assert [(m["from"], m["to"], m["by"]) for m in history(runs, "007")] == [
        ("pending", "in_progress", "agent-a"), ("in_progress", "completed", "agent-a")]


def test_second_claim_names_the_winner(queue):
    queue_dir, runs = queue
    (queue_dir / "002-pending-x.md").write_text("x")
    move_item(queue_dir, runs, 2, "in_progress", by="run abc")
    with pytest.raises(ClaimLost, match=r"^item 002 is already claimed by run abc$"):
        move_item(queue_dir, runs, 2, "in_progress", by="agent-b")


@pytest.mark.parametrize("start, to, message", [
    ("completed", "pending", "item 003 is completed; it can move to nothing (it is final), not pending"),
    ("pending", "completed", "item 003 is pending; it can move to in_progress, not completed"),
    ("blocked", "in_progress", "item 003 is blocked; it can move to pending, not in_progress"),
])
def test_bad_transitions_change_nothing(queue, start, to, message):
    queue_dir, runs = queue
    (queue_dir / f"003-{start}-x.md").write_text("x")
    with pytest.raises(BadTransition) as info:
        move_item(queue_dir, runs, 3, to, by="a")
    assert str(info.value) == message
    assert [p.name for p in queue_dir.iterdir()] == [f"003-{start}-x.md"]


def test_unknown_and_duplicate_items(queue):
    queue_dir, runs = queue
    with pytest.raises(QueueError, match=r"^no queue item has id 009 in .*; call queue_plan to see the items$"):
        move_item(queue_dir, runs, 9, "in_progress", by="a")
    (queue_dir / "004-pending-a.md").write_text("a")
    (queue_dir / "004-pending-b.md").write_text("b")
    with pytest.raises(QueueError, match=r"^item 004 has several files \(004-pending-a.md, 004-pending-b.md\); remove the duplicates first$"):
        move_item(queue_dir, runs, 4, "in_progress", by="a")


def test_an_item_is_found_by_number_among_names_that_only_look_like_it(queue):
    """`find_item` parses only names whose leading ASCII digits are the id: 0007 and 007 are item 7 (two
    files: refused), while 0070, non-ASCII digits, a bad status and other files never are."""
    queue_dir, runs = queue
    for name in ("0070-pending-a.md", "١٢٣-pending-x.md", "07x-pending-a.md", "007-done-a.md", "007-pending-a.txt",
                 "notes-007.md", "0007-pending-seven.md"):
        (queue_dir / name).write_text("x")
    assert find_item(queue_dir, 7)[0].name == "0007-pending-seven.md"
    assert release_stale_claims(queue_dir, runs) == []
    (queue_dir / "007-pending-b.md").write_text("b")
    with pytest.raises(QueueError, match=r"^item 007 has several files \(0007-pending-seven.md, 007-pending-b.md\)"):
        move_item(queue_dir, runs, 7, "in_progress", by="a")
    assert find_item(queue_dir, 70)[0].name == "0070-pending-a.md"


def test_rename_never_overwrites(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_text() == "a" and (tmp_path / "b").read_text() == "b"


WORKER = """
import json, sys
from pathlib import Path
from agent_parallel.queue.claims import ClaimLost, move_item
queue_dir, runs, me, ids = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
won = []
for i in ids:
    try:
        move_item(queue_dir, runs, i, "in_progress", by=me, expect="pending")
        won.append(i)
    except ClaimLost:
        pass
print(json.dumps(won))
"""


def race(queue, workers: int, ids_for) -> list[list[int]]:
    queue_dir, runs = queue
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(queue_dir), str(runs), f"w{w}", json.dumps(ids_for(w))],
                              stdout=subprocess.PIPE, text=True) for w in range(workers)]
    return [json.loads(p.communicate(timeout=120)[0]) for p in procs]


def test_twenty_claimants_one_item_exactly_one_wins(queue):
    queue_dir, _ = queue
    (queue_dir / "001-pending-contested.md").write_text("x")
    results = race(queue, 20, lambda w: [1])
    assert sorted(len(r) for r in results) == [0] * 19 + [1]
    assert [p.name for p in queue_dir.iterdir()] == ["001-in_progress-contested.md"]


def test_four_processes_over_two_hundred_items_each_claimed_once(queue):
    queue_dir, runs = queue
    for i in range(1, 201):
        (queue_dir / f"{i:03d}-pending-item-{i}.md").write_text(str(i))
    results = race(queue, 4, lambda w: list(range(1, 201)) if w % 2 else list(range(200, 0, -1)))
    claimed = sorted(i for r in results for i in r)
    assert claimed == list(range(1, 201))
    assert sorted(p.name for p in queue_dir.iterdir()) == sorted(f"{i:03d}-in_progress-item-{i}.md" for i in range(1, 201))
    assert len([m for m in history(runs) if m["to"] == "in_progress"]) == 200
