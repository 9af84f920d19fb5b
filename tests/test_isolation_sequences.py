"""Isolated items (a git worktree each) driven through any sequence of queue runs, item launches,
cancels, hand moves, server restarts and worktree clean-ups (hypothesis' stateful testing), in a
real git repository: no work is ever lost.

Each item's command edits one line of a tracked file to a text of its own (``ITEM<n>``), notes
outside the repository when the edit took (a worktree made after another item's edit of that line
was integrated has nothing to edit), then sleeps a little, so cancels and restarts land before,
during and after its edit; items 001 and 002 edit the same line (when both do, the second to
integrate conflicts). The config varies: a slow or failing ``worktree.setup``, an
``integration.verify`` that refuses item 2's edit, each integration strategy. Besides what every
sequence checks (``ServerSequences``), at the end: every edit an item made is somewhere, on main,
on a branch, or in a worktree's files; main's checkout matches its commit; every worktree git lists
exists. ``FUZZ_EXAMPLES=N`` runs N new sequences (``FUZZ_STEPS``: their length).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule

from agent_parallel.config import load_config
from agent_parallel.errors import WorktreeError
from agent_parallel.worktrees import list_worktrees, remove
from queue_helpers import write_config, write_item
from test_tool_sequences import QueueSequences, sequence_settings
from worktree_helpers import git, make_empty_queue_repo

EDITS = {1: ("a.txt", 3), 2: ("a.txt", 3), 3: ("b.txt", 5), 4: ("b.txt", 7)}  # item -> (file, line)


class IsolatedSequences(QueueSequences):
    @initialize(setup=st.sampled_from([None, "sleep 0.3", "exit 3"]),
                verify=st.sampled_from([None, "true", "! grep -q ITEM2 a.txt"]),
                strategy=st.sampled_from(["rebase", "merge", "squash"]))
    def setup(self, setup: str | None, verify: str | None, strategy: str) -> None:
        """The repository, its items, and a config: a worktree.setup that is slow or fails, an
        integration.verify that refuses item 2's edit, any integration strategy."""
        self.make_workspace()
        self.root = make_empty_queue_repo(self.root)
        self.marks = self.root.parent / "ran"
        self.marks.mkdir()
        write_config(self.root, runner={"isolation": "worktree"}, autonomy={"level": "L3", "max_parallel": 2},
                     worktree={"setup": setup} if setup else {},
                     integration={"strategy": strategy, **({"verify": verify} if verify else {})})
        for n, (path, line) in EDITS.items():
            write_item(self.root, n, f"edit-{n}", title=f"Edit {n}", blocked_by=[3] if n == 4 else [],
                       command=f"sed -i 's/^line {line}$/ITEM{n}/' {path}; grep -q ITEM{n} {path} && "
                               f"echo >> {self.marks}/{n}; sleep {0.1 * n:g}")
        git(self.root, "add", "-A")
        git(self.root, "commit", "-q", "-m", "items")
        self.open_server()

    @rule()
    def clean_worktrees(self) -> None:
        """`agent-parallel worktrees clean` while items may be running: only provably safe ones go."""
        config, _ = load_config(self.root)
        for state in list_worktrees(self.root, config):
            if state.safe:
                try:
                    remove(self.root, config, state)
                except WorktreeError:
                    pass  # it changed since the listing: kept, as it must be

    def more_checks(self) -> None:
        somewhere = self.edits_present()
        for n in EDITS:
            if (self.marks / str(n)).exists():
                assert f"ITEM{n}" in somewhere, f"item {n}'s edit was lost: {somewhere!r}\n" + \
                    git(self.root, "worktree", "list") + "\n" + git(self.root, "branch", "-a")
        assert git(self.root, "status", "--porcelain", "--", "a.txt", "b.txt") == "", "main's checkout changed"
        for line in git(self.root, "worktree", "list", "--porcelain").splitlines():
            if line.startswith("worktree "):
                assert Path(line.removeprefix("worktree ")).is_dir(), line

    def edits_present(self) -> str:
        """Every ITEM<n> text on any branch (main included) or in any worktree's files."""
        found = set()
        for ref in git(self.root, "for-each-ref", "--format=%(refname)", "refs/heads").splitlines():
            for path in ("a.txt", "b.txt"):
                shown = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=self.root, capture_output=True, text=True)
                found.update(word for word in shown.stdout.split() if word.startswith("ITEM"))
        for worktree in (self.root / ".agent/worktrees").glob("*"):
            for path in ("a.txt", "b.txt"):
                if (worktree / path).is_file():
                    found.update(w for w in (worktree / path).read_text().split() if w.startswith("ITEM"))
        return " ".join(sorted(found))


IsolatedSequences.TestCase.settings = sequence_settings(6)


@pytest.mark.fault("isolated items through any sequence of runs, launches, cancels, hand moves, restarts and "
                   "worktree clean-ups: no item's edit is lost, main's checkout stays whole, no worktree dangles")
def test_isolated_sequences_never_lose_work() -> None:
    IsolatedSequences.TestCase().runTest()
