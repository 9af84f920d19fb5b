"""Sequences of tool calls a busy agent might make, in any order (hypothesis' stateful testing):
launches, pipelines, fan-outs, cancels, waits on one or several tasks, queue runs and item moves
interleaved on one server, which may also stop and give way to a new one on the same workspace.

After every step the server answers and every answer is a result or a clear error. At the end,
once every task has ended: each one is in a final state, on disk as in memory; no process of any
of them is left running; no queue item is left in_progress but those claimed by hand (update_item);
every item file is still there once.
Commands are harmless (true, exit 2, short sleeps, one that leaves a process behind).
``FUZZ_EXAMPLES=N`` runs N new sequences instead of the fixed ones.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from agent_parallel.server import ServerSettings, build_server
from agent_parallel.tasks.records import load_records
from conftest import alive
from mcp import Client
from queue_helpers import statuses, write_item

COMMANDS = ["true", "exit 2", "sleep 0.05", "sleep 0.3", "echo out; echo err >&2",
            "sleep 30 & echo left", "trap '' TERM; sleep 0.2"]
FINAL = {"completed", "failed", "cancelled", "timed_out", "skipped", "interrupted"}


def task_processes(task_ids: set[str]) -> list[int]:
    """Live processes carrying one of ``task_ids`` in AGENT_TASK_ID."""
    wanted = {f"AGENT_TASK_ID={t}".encode() for t in task_ids}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if env & wanted and alive(int(entry)):
            found.append(int(entry))
    return found


class ServerSequences(RuleBasedStateMachine):
    """What every sequence shares: one server on a workspace ``setup`` makes, its calls checked, the
    rules any agent may apply (cancel a task, restart the server) and the checks at the end
    (``finish_and_check``; a subclass adds its own in ``more_checks``)."""

    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.portal_cm = start_blocking_portal()
        self.portal = self.portal_cm.__enter__()
        self.root = Path()  # the workspace, made in setup
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.ids: set[str] = set()
        self.claimed_by_hand: set[str] = set()  # items an agent claimed with update_item: they stay in_progress
        self.client: Any = None
        self.client_cm: Any = None

    @rule(task=tasks)
    def cancel(self, task: str) -> None:
        self.call("cancel_task", task_id=task)

    @rule()
    def restart(self) -> None:
        """The server stops (its running tasks end interrupted) and a new one opens the same workspace."""
        self.client_cm.__exit__(None, None, None)
        self.client = None
        self.open_server()

    @invariant()
    def server_answers(self) -> None:
        if self.client is not None:
            assert self.call("list_tasks", limit=1) is not None

    def make_workspace(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="sequences-")
        self.root = Path(self.tmp.name) / "ws"
        self.root.mkdir()

    def open_server(self) -> None:
        settings_ = ServerSettings(kill_grace_s=0.3, min_free_memory=0, wait_cap_s=1.0)
        self.client_cm = self.portal.wrap_async_context_manager(Client(build_server(self.root, settings_),
                                                                       raise_exceptions=True))
        self.client = self.client_cm.__enter__()

    def call(self, tool: str, **args: Any) -> dict[str, Any] | None:
        """The tool's structured answer, or None for a clear error (checked)."""
        result = self.portal.call(self.client.call_tool, tool, args)
        if result.is_error:
            text = result.content[0].text
            assert text.startswith(f"Error executing tool {tool}: ") and "Traceback" not in text, text[:500]
            return None
        assert isinstance(result.structured_content, dict)
        return result.structured_content

    def remember(self, answer: dict[str, Any] | None) -> list[str]:
        if answer is None:
            return []
        new = [answer["task_id"], *(answer.get("task_ids") or [])]
        self.ids.update(new)
        return new

    def teardown(self) -> None:
        try:
            if self.client is not None:
                self.finish_and_check()
        finally:
            if self.client_cm is not None:
                self.client_cm.__exit__(None, None, None)
            self.portal_cm.__exit__(None, None, None)
            if self.tmp is not None:
                self.tmp.cleanup()

    def finish_and_check(self) -> None:
        deadline = time.monotonic() + 20
        pending = set(self.ids)
        while pending and time.monotonic() < deadline:
            for task_id in sorted(pending):
                answer = self.call("task_output", task_id=task_id, timeout=1.0, max_bytes=1)
                if answer is None or answer["retrieval_status"] == "success":
                    pending.discard(task_id)
        assert not pending, f"tasks still not ended after 20 s: {sorted(pending)}"
        listed = self.call("list_tasks", limit=1000)
        assert listed is not None
        # on disk: its file, or the record journal (the file of a final record follows a second later)
        durable = {r.task_id: r for r in load_records(self.root / ".agent/runs", journaled=True)}
        for row in listed["tasks"]:
            assert row["status"] in FINAL, row
            on_disk = durable[row["task_id"]]
            assert on_disk.status.value == row["status"], (on_disk.status, row)
        for _ in range(50):  # a process being stopped gets 5 s to go
            left = task_processes({row["task_id"] for row in listed["tasks"]})
            if not left:
                break
            time.sleep(0.1)
        assert not left, f"processes of finished tasks left running: {left}"
        files = sorted(p.name for p in (self.root / ".agent/queue").iterdir())
        assert [name.split("-")[0] for name in files] == ["001", "002", "003", "004"], files
        claimed = {item for item, status in statuses(self.root).items() if status == "in_progress"}
        assert claimed <= self.claimed_by_hand, statuses(self.root)
        self.more_checks()

    def more_checks(self) -> None:
        """What a subclass checks once every task has ended."""



class QueueSequences(ServerSequences):
    """The rules of a queue of four items (``ITEMS``) a subclass writes: runs of all or some of them,
    launches of one, waits, and moves by hand."""

    ITEMS = ["001", "002", "003", "004"]

    @rule(target=ServerSequences.tasks,
          items=st.one_of(st.none(), st.lists(st.sampled_from(ITEMS), min_size=1, max_size=2, unique=True)))
    def run_queue(self, items: list[str] | None) -> str:
        answer = self.call("run_queue", **({"items": items} if items else {}))
        if answer is None:
            return "nosuchtask"
        self.ids.add(answer["run_id"])
        return str(answer["run_id"])

    @rule(target=ServerSequences.tasks, item=st.sampled_from(ITEMS))
    def launch_item(self, item: str) -> str:
        new = self.remember(self.call("launch_task", item=item))
        return new[0] if new else "nosuchtask"

    @rule(task=ServerSequences.tasks)
    def wait(self, task: str) -> None:
        self.call("task_output", task_id=task, timeout=0.5, max_bytes=64)

    @rule(item=st.sampled_from(ITEMS), status=st.sampled_from(["pending", "failed", "completed"]))
    def move(self, item: str, status: str) -> None:
        self.call("update_item", item=item, status=status, reason="by hand")


def sequence_settings(examples: int) -> settings:
    """``examples`` fixed sequences of 8 steps; with FUZZ_EXAMPLES (and FUZZ_STEPS) set, that many new ones."""
    return settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", examples)),
                    stateful_step_count=int(os.environ.get("FUZZ_STEPS", "8")), deadline=None,
                    derandomize="FUZZ_EXAMPLES" not in os.environ, suppress_health_check=list(HealthCheck))


class ToolSequences(ServerSequences):
    tasks = ServerSequences.tasks

    @initialize()
    def setup(self) -> None:
        self.make_workspace()
        write_item(self.root, 1, "build", command="sleep 0.1")
        write_item(self.root, 2, "test", command="exit 1", blocked_by=[1])
        write_item(self.root, 3, "docs", command="true")
        write_item(self.root, 4, "lint", command="sleep 0.2", blocked_by=[3])
        self.open_server()

    @rule(target=tasks, command=st.sampled_from(COMMANDS), timeout=st.sampled_from([None, 0.1, 5.0]),
          background=st.booleans())
    def launch(self, command: str, timeout: float | None, background: bool) -> str:
        args: dict[str, Any] = {"command": command, "run_in_background": background}
        if timeout is not None:
            args["timeout_s"] = timeout
        new = self.remember(self.call("launch_task", **args))
        return new[0] if new else "nosuchtask"

    @rule(target=tasks, before=tasks, command=st.sampled_from(COMMANDS))
    def launch_after(self, before: str, command: str) -> str:
        new = self.remember(self.call("launch_task", command=command, after=[before]))
        return new[0] if new else "nosuchtask"

    @rule(target=tasks, commands=st.lists(st.sampled_from(COMMANDS), min_size=1, max_size=6),
          max_parallel=st.integers(1, 3))
    def fan_out(self, commands: list[str], max_parallel: int) -> str:
        new = self.remember(self.call("launch_task", commands=commands, max_parallel=max_parallel))
        return new[0] if new else "nosuchtask"

    @rule(target=tasks, item=st.sampled_from(["001", "002", "003", "004"]))
    def launch_item(self, item: str) -> str:
        new = self.remember(self.call("launch_task", item=item))
        return new[0] if new else "nosuchtask"

    @rule(target=tasks, items=st.one_of(st.none(), st.lists(st.sampled_from(["001", "002", "003", "004"]),
                                                             min_size=1, max_size=2, unique=True)),
          level=st.sampled_from(["L1", "L3"]))
    def run_queue(self, items: list[str] | None, level: str) -> str:
        args: dict[str, Any] = {"level": level, "max_parallel": 2}
        if items is not None:
            args["items"] = items
        answer = self.call("run_queue", **args)
        if answer is None:
            return "nosuchtask"
        self.ids.add(answer["run_id"])
        return str(answer["run_id"])

    @rule(task=tasks, block=st.booleans())
    def read(self, task: str, block: bool) -> None:
        answer = self.call("task_output", task_id=task, block=block, timeout=0.2, max_bytes=256)
        if answer is not None:
            assert answer["retrieval_status"] in ("success", "timeout", "not_ready")

    @rule(item=st.sampled_from(["001", "002", "003", "004"]),
          status=st.sampled_from(["pending", "in_progress", "completed", "failed", "blocked"]))
    def move(self, item: str, status: str) -> None:
        if self.call("update_item", item=item, status=status, reason="by hand") is not None:
            (self.claimed_by_hand.add if status == "in_progress" else self.claimed_by_hand.discard)(item)

    @rule(tasks=st.lists(tasks, min_size=1, max_size=3), wait=st.sampled_from(["all", "any"]))
    def read_several(self, tasks: list[str], wait: str) -> None:
        self.call("task_output", task_ids=tasks, wait=wait, timeout=0.2, max_bytes=64)


ToolSequences.TestCase.settings = sequence_settings(12)


@pytest.mark.fault("any sequence of launches, pipelines, fan-outs, cancels, waits, queue runs, item moves and "
                   "server restarts: every task ends in a final state (on disk too), none leaves a process, no "
                   "item stays claimed")
def test_tool_sequences() -> None:
    ToolSequences.TestCase().runTest()
