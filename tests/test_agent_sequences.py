"""Agent items (fake Claude Code and Codex CLIs replaying their documented event streams) driven
through any sequence of queue runs, item launches, cancels, waits, hand moves and server restarts
(hypothesis' stateful testing), while the CLIs succeed, hit a usage limit that resets a second
later, report overload, or print garbage, in any order.

Besides what every sequence checks (``ServerSequences``: tasks end, on disk too, no process left,
no item left claimed), at the end every finished run's totals are the sums of its items' usage.
``FUZZ_EXAMPLES=N`` runs N new sequences.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize

from agent_fakes import SCRIPT, claude_rate_limited, claude_success, codex_overloaded, codex_success
from queue_helpers import write_config, write_item
from test_tool_sequences import QueueSequences, sequence_settings

GARBAGE = {"lines": ["not json", '{"type": "result"', '{"type": 42}', ""], "tail": "{", "exit": 0}


def steps_for(agent: str, kinds: list[str]) -> list[dict[str, Any]]:
    """The fake CLI's answers to its successive calls (the last one repeats)."""
    made = []
    for kind in kinds:
        if kind == "limit":
            made.append(claude_rate_limited(time.time() + 1) if agent == "claude" else codex_overloaded())
        elif kind == "garbage":
            made.append(GARBAGE)
        else:
            made.append(claude_success(cost=0.25) if agent == "claude" else codex_success())
    return made + [claude_success(cost=0.25) if agent == "claude" else codex_success()]


class AgentSequences(QueueSequences):
    @initialize(agent=st.sampled_from(["claude", "codex"]),
                kinds=st.lists(st.sampled_from(["ok", "limit", "garbage"]), max_size=4),
                retries=st.sampled_from([0, 1]))
    def setup(self, agent: str, kinds: list[str], retries: int) -> None:
        self.make_workspace()
        base = self.root.parent
        bin_dir, scenario = base / "fake-bin", base / "fake-scenario"
        bin_dir.mkdir()
        scenario.mkdir()
        for name in ("claude", "codex"):
            (bin_dir / name).write_text(SCRIPT.format(python=sys.executable))
            (bin_dir / name).chmod(0o755)
        (scenario / "steps.json").write_text(json.dumps(steps_for(agent, kinds)))
        self.saved_env = {k: os.environ.get(k) for k in ("PATH", "FAKE_AGENT_DIR")}
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        os.environ["FAKE_AGENT_DIR"] = str(scenario)
        write_config(self.root, runner={"agent": agent, "retries": retries, "retry_delay": "50ms"},
                     autonomy={"level": "L3", "max_parallel": 2})
        write_item(self.root, 1, "plan", title="Plan the work")
        write_item(self.root, 2, "write", title="Write it")
        write_item(self.root, 3, "lint", title="Lint", command="true")
        write_item(self.root, 4, "review", title="Review", blocked_by=[1])
        self.open_server()

    def more_checks(self) -> None:
        for task_id in sorted(self.ids):
            out = self.call("task_output", task_id=task_id, timeout=0, max_bytes=1)
            run = (out or {}).get("run")
            if not run or run.get("state") != "finished" or run.get("usage") is None:
                continue
            spent = [o["usage"] for o in run["outcomes"] if o.get("usage")]
            costs = [u["cost_usd"] for u in spent if u.get("cost_usd") is not None]  # (Codex reports none)
            assert run["usage"].get("cost_usd") == (pytest.approx(sum(costs)) if costs else None), run["usage"]
            assert run["tokens"]["output"] == sum(u.get("output_tokens", 0) for u in spent), run

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            for name, value in getattr(self, "saved_env", {}).items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


AgentSequences.TestCase.settings = sequence_settings(6)


@pytest.mark.fault("agent items through any sequence of runs, launches, cancels, moves and restarts while the CLI "
                   "succeeds, hits a usage limit, is overloaded or prints garbage: every task ends, no process or "
                   "claim is left, each run's totals are its items' sums")
def test_agent_sequences() -> None:
    AgentSequences.TestCase().runTest()
