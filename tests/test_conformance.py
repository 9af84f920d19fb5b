"""The official MCP conformance suite (``@modelcontextprotocol/conformance``) against ``agent-parallel serve``
over streamable HTTP, on a fresh workspace.

Two runs: every server scenario (``--suite all``, each at the wire its applicability picks: the
2025-11-25 handshake for the shared ones, 2026-07-28 for the new ones and the tasks extension), and
what the 2026-07-28 revision requires (``--requirements 2026-07-28``, which runs the shared scenarios
again at the stateless 2026 wire that Claude Code uses). Every check must pass except those in
tests/conformance-skips.json, each with its reason (most need the reference "everything" server's
test tools, prompts and resources); a skipped check that passes everywhere fails the test as stale.

Needs Node 22 and the suite, which .ci/run installs into .ci/conformance/ from npm. Without them the
test is skipped, unless $CI is set: in CI a missing install is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_faults import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / ".ci/conformance"  # what .ci/run installs: `npm install --prefix .ci/conformance node@22 ...`
SKIPS_FILE = Path(__file__).with_name("conformance-skips.json")
SCRIPT = Path(sys.executable).parent / "agent-parallel"
RUNS = {"all": ["--suite", "all"], "2026-07-28": ["--requirements", "2026-07-28"]}
RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d\d-\d\dT[\d-]+Z$")


@dataclass(frozen=True)
class Check:
    run: str
    scenario: str
    id: str
    status: str  # SUCCESS | FAILURE | WARNING | SKIPPED | INFO
    message: str


def in_ci() -> bool:
    return bool(os.environ.get("CI"))  # as tests/test_clients.py and tests/test_stdio.py read it


def node22() -> str | None:
    """A Node 22+ binary: the one .ci/run installed from npm, else ``node`` on PATH if it is recent enough."""
    for candidate in (INSTALL / "node_modules/.bin/node", shutil.which("node")):
        if candidate and Path(candidate).exists():
            version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True).stdout.strip()
            if (m := re.match(r"v(\d+)\.", version)) and int(m.group(1)) >= 22:
                return str(candidate)
    return None


def suite_cli() -> Path | None:
    cli = INSTALL / "node_modules/@modelcontextprotocol/conformance/dist/index.js"
    return cli if cli.exists() else None


def load_skips() -> dict[tuple[str, str], str]:
    """(scenario, check id) -> reason; every entry must say why."""
    skips: dict[tuple[str, str], str] = {}
    for entry in json.loads(SKIPS_FILE.read_text())["skips"]:
        key = (entry["scenario"], entry["check"])
        assert entry.get("reason", "").strip(), f"{SKIPS_FILE.name}: {key} has no reason"
        assert key not in skips, f"{SKIPS_FILE.name}: {key} is listed twice"
        skips[key] = entry["reason"]
    return skips


def read_results(run: str, out_dir: Path) -> list[Check]:
    checks = []
    for result in sorted(out_dir.iterdir()):
        match = RESULT_DIR.match(result.name)
        assert match, f"unexpected result directory {result}"
        for c in json.loads((result / "checks.json").read_text()):
            checks.append(Check(run, match["scenario"], c["id"], c["status"], c.get("errorMessage") or ""))
    return checks


@pytest.fixture
def suite() -> tuple[str, Path]:
    node, cli = node22(), suite_cli()
    if node and cli:
        return node, cli
    missing = "Node 22 (npm: node@22)" if not node else "the conformance suite (npm: @modelcontextprotocol/conformance)"
    message = f"{missing} is not installed in {INSTALL.relative_to(REPO)}/; .ci/run installs it"
    if in_ci():
        pytest.fail(f"CI is set but {message}")
    pytest.skip(message)


@pytest.fixture
def http_server(tmp_path: Path):
    """``agent-parallel serve --transport http`` on a fresh workspace with a one-item queue (so the
    first resource listed, ``queue://plan``, reads as a plan)."""
    root = tmp_path / "ws"
    (root / ".agent/queue").mkdir(parents=True)
    (root / ".agent/queue/001-pending-hello.md").write_text("---\ncommand: echo hello\nfiles: [a]\n---\n# Hello\n")
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([str(SCRIPT), "serve", "--root", str(root), "--transport", "http", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}/mcp", proc, tmp_path / "server.log"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_official_conformance_suite(suite, http_server, tmp_path):
    node, cli = suite
    url, proc, server_log = http_server
    version = json.loads((cli.parent.parent / "package.json").read_text())["version"]
    checks: list[Check] = []
    for run, selection in RUNS.items():
        out_dir = tmp_path / f"results-{run}"
        done = subprocess.run([node, str(cli), "server", "--url", url, *selection, "-o", str(out_dir)],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        announced = set(re.findall(r"=== Running scenario: (\S+) ===", done.stdout))
        found = read_results(run, out_dir) if out_dir.exists() else []
        # The CLI exits 1 on any failure; what counts is that it ran every scenario it announced.
        assert announced and announced == {c.scenario for c in found}, (
            f"conformance {version} ({run}) exited {done.returncode} without results for "
            f"{sorted(announced - {c.scenario for c in found}) or 'any scenario'}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        checks += found
    assert proc.poll() is None, f"the server died during the suite:\n{server_log.read_text()[-3000:]}"

    skips = load_skips()
    scenarios = {c.scenario for c in checks}
    unknown = [key for key in skips if key[0] not in scenarios]
    failed = [c for c in checks if c.status == "FAILURE" and (c.scenario, c.id) not in skips]
    stale = [key for key in skips if key[0] in scenarios and
             not any((c.scenario, c.id) == key and c.status == "FAILURE" for c in checks)]
    counts = {s: sum(c.status == s for c in checks) for s in ("SUCCESS", "FAILURE", "WARNING", "SKIPPED")}
    excused = sum(c.status == "FAILURE" for c in checks) - len(failed)
    summary = (f"conformance {version}, {len(scenarios)} scenarios in {len(RUNS)} runs: {counts['SUCCESS']} checks passed, "
               f"{excused} failures excused by {SKIPS_FILE.name}, {len(failed)} unexpected, "
               f"{counts['WARNING']} warnings, {counts['SKIPPED']} skipped by the suite")
    print(summary)
    for c in checks:
        if c.status == "WARNING":
            print(f"  warning: {c.run}: {c.scenario}:{c.id}: {c.message}")
    problems = [f"FAILED {c.run}: {c.scenario}:{c.id}: {c.message}" for c in failed]
    problems += [f"STALE skip {s}:{i} passes now: remove it from {SKIPS_FILE.name}" for s, i in stale]
    problems += [f"UNKNOWN skip {s}:{i}: the suite has no scenario {s!r} any more" for s, i in unknown]
    assert not problems, summary + "\n" + "\n".join(problems) + f"\nserver log:\n{server_log.read_text()[-3000:]}"
