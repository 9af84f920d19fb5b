"""``check_launch_strings`` on large environments, and an environment past what the kernel accepts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent_parallel.tasks.executor import MAX_ARG_BYTES, LaunchSpec, check_launch_strings
from conftest import call


def spec_with(env: dict[str, str]) -> LaunchSpec:
    return LaunchSpec(task_id="t", cwd=Path("/tmp"), command="true", env=env)


@pytest.mark.fault("launch_task with an env of 100,000 variables: checked in linear time, the same problem reported "
                   "(was quadratic: 64k variables took 33-52 s, 200k about 5 minutes)")
def test_a_large_env_is_checked_in_linear_time_and_reports_the_first_problem():
    n = 100_000
    env = {f"V{i}": "x" for i in range(n)}
    started = time.monotonic()
    assert check_launch_strings(spec_with(env)) is None
    env[f"V{n - 1}"] = "a\0b"
    assert check_launch_strings(spec_with(env)) == (
        f"env value of V{n - 1} contains a NUL character (at byte 1), which cannot be passed to a process; remove it")
    env[f"V{n - 1}"] = "x" * MAX_ARG_BYTES
    assert check_launch_strings(spec_with(env)) == (
        f"env entry V{n - 1}=... is {MAX_ARG_BYTES + len(f'V{n - 1}=')} bytes; the kernel refuses a single argument "
        "or environment entry of 128 KiB or more: pass long input through a file instead")
    env["V5"] = "é\ud800"  # an earlier problem is the one reported
    assert check_launch_strings(spec_with(env)) == (
        "env value of V5 contains a character that cannot be passed to a process ('\\ud800' at position 1); remove it")
    assert time.monotonic() - started < 30  # a hang guard only: typically well under a second


@pytest.mark.anyio
@pytest.mark.fault("launch_task with an environment larger in all than the kernel accepts (ARG_MAX): the task fails "
                   "at once with the kernel's reason, Argument list too long, the limit and the fix")
async def test_an_environment_past_arg_max_fails_the_task_with_the_kernels_reason(client):
    limit = min(os.sysconf("SC_ARG_MAX"), 6 << 20)  # execve refuses more than 3/4 of 8 MiB whatever the stack limit
    env = {f"V{i}": "x" * 100 for i in range(limit // 100 + 100)}
    started = time.monotonic()
    out = await call(client, "launch_task", command="true", env=env, run_in_background=False)
    assert time.monotonic() - started < 30  # a hang guard only
    assert out["status"] == "failed"
    assert out["reason"].startswith("could not start '/bin/sh' in ") and out["reason"].endswith(
        f": Argument list too long: the command, its arguments and its environment together pass the kernel's limit "
        f"for a new process (ARG_MAX, {os.sysconf('SC_ARG_MAX'):,} bytes here); pass large values through a file instead")
