"""Writing queue items and config for tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mcp import Client

from agent_parallel.server import ServerSettings, build_server
from conftest import call


def write_item(root: Path, item_id: int, slug: str, *, status: str = "pending", title: str | None = None,
               body: str = "", **fields: object) -> Path:
    """An item file with YAML front matter holding ``fields`` (e.g. command=..., blocked_by=[1])."""
    queue = root / ".agent/queue"
    queue.mkdir(parents=True, exist_ok=True)
    front = yaml.safe_dump(fields, sort_keys=False) if fields else ""
    text = (f"---\n{front}---\n" if front else "") + f"# {title or slug}\n\n{body}"
    path = queue / f"{item_id:03d}-{status}-{slug}.md"
    path.write_text(text)
    return path


def write_config(root: Path, **sections: dict) -> None:
    (root / ".agent").mkdir(parents=True, exist_ok=True)
    (root / ".agent/config.yaml").write_text(yaml.safe_dump(sections))


def statuses(root: Path) -> dict[str, str]:
    """Item id -> status, from the file names."""
    return {p.name.split("-")[0]: p.name.split("-")[1] for p in (root / ".agent/queue").glob("*.md")}


async def run_queue_to_end(client: Client, timeout: float = 30, **args: object) -> dict:
    """run_queue through ``client``, then its task_output: the run's report (it must have ended)."""
    run = await call(client, "run_queue", **args)
    out = await call(client, "task_output", task_id=run["run_id"], timeout=timeout)
    assert out["retrieval_status"] == "success", f"the run did not end: {out.get('run')}"
    return out


async def run_to_end(root: Path, **args: object) -> dict:
    """``run_queue_to_end`` through a server of its own on ``root`` (a short kill grace, no memory floor)."""
    async with Client(build_server(root, ServerSettings(kill_grace_s=0.5, min_free_memory=0))) as client:
        return await run_queue_to_end(client, timeout=60, **args)


def by_item(report: dict) -> dict[str, dict]:
    """A run report's outcomes by item id."""
    return {o["item"]: o for o in report["run"]["outcomes"]}


def ends_made_at_once(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each call of ``QueueRun.follow_up_now`` from now on (the ends of plain items in the lane's
    turn), whether it made them (True) or left them to the run's loop (False)."""
    from agent_parallel.queue.run import QueueRun
    from agent_parallel.tasks.registry import Task

    made: list[bool] = []
    follow_up_now = QueueRun.follow_up_now

    def counted(self: QueueRun, tasks: list[Task]) -> list[str | None] | None:
        answers = follow_up_now(self, tasks)
        made.append(answers is not None)
        return answers

    monkeypatch.setattr(QueueRun, "follow_up_now", counted)
    return made
