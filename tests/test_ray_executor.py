"""``--executor ray``: tasks and queue items on a real multi-node Ray cluster on this machine.

One ``ray.cluster_utils.Cluster`` for the session (a head and a worker node, one ``agent_slot``
each; a third node joins only to be lost). The Ray tests skip when Ray is not installed; the
tests of the configuration, the item field and the "install agent-parallel[ray]" refusal run
without it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from agent_parallel.config import ConfigError, load_config
from agent_parallel.queue.items import parse_item
from agent_parallel.server import ServerSettings, build_server
from agent_parallel.tasks import processes
from agent_parallel.tasks.ray_executor import RAY_MISSING, ray_available
from agent_parallel.tasks.registry import RegistrySettings, open_registry

from conftest import alive, call
from queue_helpers import write_config, write_item

needs_ray = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install 'agent-parallel[ray]')")
TOP = Path(__file__).parent.parent
DEADLINE_S = 60  # a bound on waits that should take well under a second: a hang fails, never a slow machine


# ------------------------------------------------------------------ without Ray

def _without_ray(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import ray (a sitecustomize refuses it)."""
    site = tmp_path / "noray"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'ray'\")\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NoRay())\n")
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.mark.fault("--executor ray without Ray installed: refused at once, saying to install agent-parallel[ray]")
@pytest.mark.parametrize("command", [["serve"], ["run"]])
def test_executor_ray_without_ray_is_refused_at_once(tmp_path, command):
    ws = tmp_path / "ws"
    ws.mkdir()
    script = Path(sys.executable).parent / "agent-parallel"
    result = subprocess.run([str(script), *command, "--root", str(ws), "--executor", "ray"], env=_without_ray(tmp_path),
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert f"agent-parallel: error: {RAY_MISSING}" in result.stderr
    assert "install agent-parallel[ray]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (ws / ".agent").exists()  # nothing started, nothing written


def test_executor_from_config_without_ray_is_refused_by_build_server(tmp_path, monkeypatch):
    import agent_parallel.tasks.ray_executor as ray_executor

    monkeypatch.setattr(ray_executor, "ray_available", lambda: False)
    ws = tmp_path / "ws"
    ws.mkdir()
    write_config(ws, executor="ray")
    settings = ServerSettings.for_workspace(ws)
    assert settings.executor == "ray"
    with pytest.raises(Exception, match=r"install agent-parallel\[ray\]"):
        build_server(ws, settings)


# ------------------------------------------------------------------ configuration and the item field

def test_config_executor_and_ray_address(tmp_path):
    write_config(tmp_path, executor="ray", ray={"address": "head:6379"})
    config, warnings = load_config(tmp_path)
    assert (config.executor, config.ray_address, warnings) == ("ray", "head:6379", [])
    settings = ServerSettings.from_config(config)
    assert (settings.executor, settings.ray_address, settings.ray_slots) == ("ray", "head:6379", config.max_parallel)
    assert settings.registry_settings().admission is None  # memory and load: Ray's scheduler decides on the nodes
    assert ServerSettings.from_config(load_config(tmp_path / "none")[0]).executor == "local"


@pytest.mark.fault("config executor: not local or ray, or ray.address not a string: refused naming the key")
def test_config_executor_refuses_bad_values(tmp_path):
    write_config(tmp_path, executor="kubernetes")
    with pytest.raises(ConfigError, match=r"executor must be local or ray, not 'kubernetes'"):
        load_config(tmp_path)
    write_config(tmp_path, ray={"address": ["x"]})
    with pytest.raises(ConfigError, match=r"ray.address must be a non-empty string"):
        load_config(tmp_path)
    write_config(tmp_path, ray={"adress": "x"})
    assert "did you mean address?" in load_config(tmp_path)[1][0]


def test_item_resources_field():
    item, problems = parse_item("001-pending-a.md", "---\nresources: {num_cpus: 2, GPU: 1, memory: 4GiB, ssd: 1}\n---\n")
    assert problems == [] and item is not None
    assert item.resources == {"CPU": 2.0, "GPU": 1.0, "memory": float(4 << 30), "ssd": 1.0}
    item, problems = parse_item("002-pending-b.md", "# B\n\n**Resources**: num_gpus: 0.5, cpus: 1\n")
    assert item is not None and item.resources == {"GPU": 0.5, "CPU": 1.0} and problems == []


@pytest.mark.fault("an item's resources: not a mapping, a negative or non-numeric amount, agent_slot: a clear problem")
def test_item_resources_refuses_bad_values():
    item, problems = parse_item("001-pending-a.md", "---\nresources: {agent_slot: 2, CPU: -1, GPU: yes}\n---\n")
    assert item is not None and item.resources == {}
    assert [p.message for p in problems] == [
        "resources: 'agent_slot' is not a resource name (num_cpus, GPU, memory, or a custom resource of the cluster; "
        "agent_slot is set by agent-parallel)",
        "resources: CPU must be a number from 0 to 1e+06, not -1",
        "resources: GPU must be a number from 0 to 1e+06, not True"]
    item, problems = parse_item("001-pending-a.md", "---\nresources: 3\n---\n")
    assert [p.message for p in problems] == ["resources must be a mapping such as {num_cpus: 2, GPU: 1}, not a number"]


# ------------------------------------------------------------------ on a cluster

@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """A head and one worker node with one agent slot each (so at most two tasks run at once)."""
    if not ray_available():
        pytest.skip("Ray is not installed (pip install 'agent-parallel[ray]')")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray
    from ray.cluster_utils import Cluster

    fast_failure = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                    "health_check_initial_delay_ms": 0}
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"agent_slot": 1}, "include_dashboard": False, "_system_config": fast_failure})
    c.add_node(num_cpus=1, resources={"agent_slot": 1})
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def executor(cluster):
    from agent_parallel.tasks.ray_executor import RayExecutor

    ex = RayExecutor(address=cluster.address)
    yield ex
    ex.close()


@pytest.fixture
async def registry(workspace, executor):
    runs = workspace / ".agent/runs"
    runs.mkdir(parents=True)
    async with open_registry(workspace, runs, RegistrySettings(kill_grace_s=0.5), executor) as reg:
        yield reg


def task_processes(task_id: str) -> dict[int, int]:
    return processes.task_members(processes.scan(), task_id)


async def until(check, what: str, limit: float = DEADLINE_S):
    import anyio

    deadline = time.monotonic() + limit
    while not (value := check()):
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await anyio.sleep(0.02)
    return value


def output(registry, task) -> str:
    return registry.read_output(task, cursor=None, max_bytes=65536, tail_lines=None, pattern=None).text


@needs_ray
@pytest.mark.anyio
async def test_output_streams_live_and_exit_code_comes_back(registry, workspace):
    go = workspace / "go"
    task = await registry.launch(command=f"echo first; while [ ! -e {go} ]; do sleep 0.01; done; echo second; exit 3",
                                 cwd=workspace)
    await until(lambda: "first" in output(registry, task), "the first line while the command runs")
    assert task.record.status == "running" and "second" not in output(registry, task)
    go.touch()
    await task.done.wait()
    assert (task.record.status, task.record.exit_code, task.record.reason) == ("failed", 3, "exit code 3")
    assert output(registry, task) == "first\nsecond\n" and task.record.last_line == "second"


@needs_ray
@pytest.mark.anyio
async def test_through_the_tools_paging_filter_tail_after_and_upstream_logs(workspace, executor, settings):
    async with Client(build_server(workspace, settings, executor), raise_exceptions=True) as client:
        first = await call(client, "launch_task", command="for i in 1 2 3 4 5; do echo line $i; done")
        done = await call(client, "task_output", task_id=first["task_id"], timeout=30)
        assert done["status"] == "completed" and done["exit_code"] == 0
        assert (await call(client, "task_output", task_id=first["task_id"], tail_lines=2))["output"] == "line 4\nline 5\n"
        assert (await call(client, "task_output", task_id=first["task_id"], filter="line [24]"))["output"] == \
            "line 2\nline 4\n"
        page = await call(client, "task_output", task_id=first["task_id"], cursor=0, max_bytes=7)
        assert page["output"] == "line 1\n" and page["next_cursor"] == 7
        second = await call(client, "launch_task", command='cat "$AGENT_UPSTREAM_LOGS" | wc -l', after=[first["task_id"]])
        out = await call(client, "task_output", task_id=second["task_id"], timeout=30)
        assert out["status"] == "completed" and out["output"].strip() == "5"


@needs_ray
@pytest.mark.anyio
@pytest.mark.fault("cancel_task on Ray of a SIGTERM-ignoring tree with a setsid escapee: nothing is left on the node")
async def test_cancel_kills_a_term_ignoring_nested_tree(registry, workspace):
    pids = workspace / "pids"
    script = (f"trap '' TERM; echo $$ >> {pids}; "
              f"sh -c 'trap \"\" TERM; echo $$ >> {pids}; sleep 1000' & "
              f"setsid sh -c 'trap \"\" TERM; echo $$ >> {pids}; sleep 1000' & "
              "echo ready; wait")
    task = await registry.launch(command=script, cwd=workspace)
    await until(lambda: pids.exists() and len(pids.read_text().split()) == 3 and "ready" in output(registry, task),
                "the tree to start")
    assert len(task_processes(task.record.task_id)) >= 5  # three shells, two sleeps
    assert await registry.cancel(task)
    assert task.record.status == "cancelled"
    assert task_processes(task.record.task_id) == {}
    assert not any(alive(int(p)) for p in pids.read_text().split())


@needs_ray
@pytest.mark.anyio
async def test_timeout_kills_the_tree(registry, workspace):
    task = await registry.launch(command="trap '' TERM; sleep 1000 & setsid sleep 1000 & wait", cwd=workspace,
                                 timeout_s=0.5)
    await task.done.wait()
    assert task.record.status == "timed_out"
    assert task_processes(task.record.task_id) == {}


@needs_ray
@pytest.mark.anyio
async def test_what_a_command_leaves_running_ends_with_it(registry, workspace):
    task = await registry.launch(command="setsid sleep 1000 > /dev/null 2>&1 & echo left", cwd=workspace)
    await task.done.wait()
    assert task.record.status == "completed" and output(registry, task) == "left\n"
    assert task_processes(task.record.task_id) == {}


@needs_ray
@pytest.mark.anyio
async def test_agent_slots_hold_the_limit_across_nodes(workspace, executor, settings):
    """Four items, a queue allowing four at once, a cluster with one agent slot on each of two nodes:
    never more than two run at once, and two do run together (so on both nodes). Each item waits (up
    to 10 s) until a second one has started: a fixed sleep missed the overlap when a loaded machine
    took longer to start a Ray worker than the sleep lasted."""
    log = workspace / "spans"
    for i in range(1, 5):
        write_item(workspace, i, f"item-{i}", command=f"echo start $(date +%s.%N) >> {log}; "
                                                      f"for _ in $(seq 100); do [ $(grep -c start {log}) -ge 2 ] && break; "
                                                      f"sleep 0.1; done; sleep 0.3; echo end $(date +%s.%N) >> {log}")
    write_config(workspace, autonomy={"max_parallel": 4, "level": "L3"})
    async with Client(build_server(workspace, settings, executor), raise_exceptions=True) as client:
        run = await call(client, "run_queue")
        out = await call(client, "task_output", task_id=run["run_id"], timeout=DEADLINE_S)
        assert out["status"] == "completed", out
    events = sorted((float(t), 1 if kind == "start" else -1) for kind, t in
                    (line.split() for line in log.read_text().splitlines()))
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2


@needs_ray
@pytest.mark.anyio
@pytest.mark.fault("an item asking for a GPU on a GPU-less Ray cluster: refused at start naming the resource")
async def test_an_item_no_node_can_hold_is_refused(workspace, executor, settings):
    write_item(workspace, 1, "train", command="echo trained", resources={"num_gpus": 1, "num_cpus": 1})
    async with Client(build_server(workspace, settings, executor), raise_exceptions=True) as client:
        run = await call(client, "run_queue")
        out = await call(client, "task_output", task_id=run["run_id"], timeout=DEADLINE_S)
        tasks = (await call(client, "list_tasks"))["tasks"]
        item = await call(client, "task_output", task_id=[t for t in tasks if t["task_id"] != run["run_id"]][0]["task_id"])
    assert out["status"] == "failed"
    assert item["status"] == "failed" and item["started_at"] is None, item
    assert item["reason"].startswith("no node of the Ray cluster can hold a task asking for GPU: 1, CPU: 1 (nodes: ")
    assert (workspace / ".agent/queue/001-failed-train.md").exists()


@needs_ray
@pytest.mark.anyio
@pytest.mark.fault("a cwd missing on the Ray node chosen: the task fails naming the node, nothing runs")
async def test_cwd_missing_on_the_node_names_it(registry, workspace):
    task = await registry.launch(command="echo ran", cwd=workspace / "gone")
    await task.done.wait()
    assert task.record.status == "failed"
    assert task.record.reason is not None
    assert task.record.reason.startswith(f"its cwd {workspace / 'gone'} does not exist on Ray node ")
    assert "shared filesystem" in task.record.reason and "ran" not in output(registry, task)


@needs_ray
@pytest.mark.anyio
@pytest.mark.fault("a Ray node lost while its task runs: the task fails with 'node lost', no hang, nothing left")
async def test_a_node_lost_mid_task_fails_it(registry, workspace, cluster):
    # (retrying elsewhere, for items with `retries`, is the retries issue's: this failure is what it retries on)
    node = cluster.add_node(num_cpus=1, resources={"agent_slot": 1, "doomed": 1})
    cluster.wait_for_nodes()
    task = await registry.launch(command="echo started; sleep 1000", cwd=workspace, resources={"doomed": 1})
    await until(lambda: "started" in output(registry, task), "the command to start on the doomed node")
    cluster.remove_node(node, allow_graceful=False)
    import anyio

    with anyio.fail_after(DEADLINE_S):
        await task.done.wait()
    assert task.record.status == "failed"
    assert task.record.reason is not None and task.record.reason.startswith("node lost: Ray node "), task.record.reason
    await until(lambda: task_processes(task.record.task_id) == {}, "the lost node's command to be gone")


@needs_ray
@pytest.mark.fault("the server (with its local Ray instance) SIGKILLed mid-task: no process of it or its tasks is left")
def test_server_sigkilled_leaves_no_process(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    pidfile = ws / "pid"
    script = Path(sys.executable).parent / "agent-parallel"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    server = subprocess.Popen([str(script), "serve", "--root", str(ws), "--executor", "ray"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert server.stdin is not None and server.stdout is not None

    def request(n: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        server.stdin.write((json.dumps({"jsonrpc": "2.0", "id": n, "method": method, "params": params}) + "\n").encode())
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    try:
        request(1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                  "clientInfo": {"name": "raw-test", "version": "0"}})
        server.stdin.write(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
        server.stdin.flush()
        answer = request(2, "tools/call", {"name": "launch_task", "arguments": {
            "command": f"echo $$ > {pidfile}; setsid sleep 1000 & sleep 1000"}})
        task_id = answer["result"]["structuredContent"]["task_id"]
        deadline = time.monotonic() + DEADLINE_S
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        snap = processes.scan()
        ray_of_server = {p.pid for p in snap.procs.values() if (p.task_id or "").startswith("ray-instance-")
                         and _descends_from(snap, p.pid, server.pid)}
        assert ray_of_server, "the local Ray instance's processes carry its marker"
        assert task_processes(task_id)
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + DEADLINE_S
    while task_processes(task_id) or any(alive(pid) for pid in ray_of_server):
        assert time.monotonic() < deadline, "processes of the killed server are still alive"
        time.sleep(0.1)


def _descends_from(snap: processes.Snapshot, pid: int, ancestor: int) -> bool:
    while pid > 1 and pid in snap.procs:
        if pid == ancestor:
            return True
        pid = snap.procs[pid].ppid
    return False
