"""``agent-parallel worktrees``: the items' worktrees with their state and whether removing them could
lose work; ``agent-parallel worktrees clean [--dry-run]`` removes only those that cannot.

Argument parsing and printing only; the work is done by `agent_parallel.worktrees`. Paths, branch
names and git's words are printed through `visible` / `render.shown` (control characters made visible).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..text import visible


def add_parser(sub: Any) -> None:
    """Register ``worktrees`` (and its ``clean``) on the main parser's subcommands."""
    parser = sub.add_parser("worktrees", help="list the items' git worktrees (runner.isolation: worktree) and "
                                              "whether each is safe to remove")
    parser.add_argument("--root", type=Path, default=Path("."), help="workspace root (default: the working directory)")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.set_defaults(func=_list)
    actions = parser.add_subparsers(dest="action")
    clean = actions.add_parser("clean", help="remove the worktrees (and branches) whose work is in the target; "
                                             "keep and list the others")
    clean.add_argument("--root", type=Path, default=argparse.SUPPRESS, help="workspace root (default: here)")
    clean.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    clean.set_defaults(func=_clean)


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..config import load_config
    from ..worktrees import list_worktrees

    root = args.root.resolve()
    config, _ = load_config(root)
    states = list_worktrees(root, config)
    if args.json:
        print(json.dumps([{**vars(s), "path": str(s.path)} for s in states], indent=2))
        return 0
    Console().print(_table(states) if states else "no worktrees under .agent/worktrees")
    return 0


def _clean(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import WorktreeError
    from ..worktrees import list_worktrees, remove

    root = args.root.resolve()
    config, _ = load_config(root)
    failed = 0
    for state in list_worktrees(root, config):
        if not state.safe:
            print(visible(f"kept {state.path}: {state.reason.removeprefix('not safe: ')}"))
        elif args.dry_run:
            print(visible(f"would remove {state.path} ({state.reason.removeprefix('safe: ')})"))
        else:
            try:
                print(visible(remove(root, config, state)))
            except WorktreeError as exc:
                failed += 1
                print(visible(f"kept: {exc}"))
    return 1 if failed else 0


def _table(states: list[Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    from .render import add_row, shown

    table = Table(title="worktrees (.agent/worktrees)")
    for column in ("item", "branch", "state", "ahead/behind", "safe to remove", "port"):
        table.add_column(column)
    for s in states:
        safe = Text("yes", style="green") if s.safe else Text("no", style="red")
        add_row(table, s.item_id or s.name, s.branch or "(detached)", s.state, f"{s.ahead}/{s.behind}",
                Text.assemble(safe, " ", shown(s.reason.split(": ", 1)[-1], style="dim")),
                str(s.port) if s.port else "-")
    return table
