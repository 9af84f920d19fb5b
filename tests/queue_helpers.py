"""Writing queue items and config for tests."""

from __future__ import annotations

from pathlib import Path

import yaml


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
