"""`.agent/config.yaml`: the workspace's settings, read into one validated `Config`.

Layout (every key optional; a missing file means every default)::

    autonomy:
      level: L2                 # L1 | L2 | L3
      max_parallel: 5           # clamped to 1..64, with a warning
      continue_on_error: false  # L3 only; at L3 the default is true (keep going), false stops at the first failure
      min_free_memory: 256MiB   # (also accepted under `resources:`) hold new starts below this much free memory
      max_load: 8               # (also under `resources:`) hold new starts above this load; default: no limit
      l3_settings:              # the origin project's spelling, read where the keys above are absent
        max_parallel: 5
        continue_on_error: true
    runner:
      command: ["claude", "-p"] # argv for items without `command` (a string is split like a shell would)
      timeout: 2h
      isolation: worktree       # none (default) | worktree: each item in its own git worktree
      agent: claude             # claude | codex | gemini: a headless profile with structured output
      args: ["--model", "sonnet"]  # extra arguments for the agent profile (model, permission mode ...)
      auto_resume: true         # resume a rate-limited agent's same session when the limit resets
      max_cost_usd: 20          # per run: no new agent item starts once this much is spent
      max_tokens: 5000000       # per run: the same for tokens (input + output)
      max_parallel: 2           # agents at once (below autonomy.max_parallel; commands run beside them)
      retries: 2                # run a failed item again up to N times (an item's `retries` wins)
      retry_delay: 10s          # first wait before a retry (doubles each time, with jitter)
    queue:
      dir: .agent/queue
    resources:
      min_free_memory: 256MiB   # bytes, or a size with a unit (KiB, MiB, GiB, KB, MB, GB)
      max_load: 8               # load average above which no new item starts; default: no limit
    tasks:
      wait_cap: 50s             # longest a blocking task_output call waits (above 0, at most 1h)
      log_cap: 64MiB            # bytes of output kept per task (at least 64KiB)
      max_tasks: 10000          # finished task records (and logs) kept; the oldest go first
    worktree:
      copy: [".env*"]           # globs (from the root) of untracked/ignored files copied into each new worktree
      link: ["node_modules"]    # directories (from the root) symlinked into it
      setup: "npm ci"           # shell command run in the new worktree before the item
      setup_timeout: 20m        # kill the setup (the item fails, its worktree kept) after this; default: no limit
      ports: "4100-4199"        # one port per live worktree, in AGENT_PORT
    integration:
      target: main              # default: the branch checked out in the workspace
      strategy: rebase          # rebase | merge | squash
      verify: "pytest -q"       # shell command that must pass on the combined result before the target moves
      verify_timeout: 30m       # kill the verify (the item fails, its work kept) after this; default: no limit
      allow_overlap: false      # let isolated items with overlapping files run together
      author: "Agent <agent@example.com>"  # author of the commit made of what an agent left uncommitted
    executor: local             # local (default) | ray: tasks and items run on a Ray cluster (agent-parallel[ray])
    ray:
      address: HOST:6379        # join this cluster; without it `executor: ray` starts a local Ray instance

Durations (`runner.timeout`, `tasks.wait_cap`, `worktree.setup_timeout`, `integration.verify_timeout`, and an item's `estimate` and `timeout`) are written
``45s``, ``30m``, ``2h``, ``1h30m``, ``1:30`` (h:mm) or a bare number. A bare number means
**minutes** everywhere, because the spec fixes that for `estimate` and one rule for every duration
in these files is the least surprising. A duration is at most 365 days and a size at most 1 PiB
(a 400-digit number is a mistake, not a setting). ``1:30`` is read as text, not as YAML 1.1's
base-60 number, and a number of more than 4,300 digits as a `HugeNumber` (see `yaml_int`).
Unknown keys are ignored with a warning (typos show up); a wrong type is a `ConfigError` naming
the file and the key. YAML aliases are expanded only within a budget (`alias_problem`), so a few
hundred bytes cannot make gigabytes.
"""

from __future__ import annotations

import difflib
import errno
import math
import re
import shlex
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field

from .errors import QueueError, UsageError
from .text import MAX_INT_DIGITS, HugeNumber, describe, huge_number, short_repr
from .paths import CONFIG_FILE, NOT_REGULAR, QUEUE_DIR, read_regular, resolve_inside

MIB = 1024 * 1024
MAX_PARALLEL_RANGE = (1, 64)
MAX_CONFIG_BYTES = MIB
MAX_DURATION_S = 365 * 86400
"""Longest duration accepted anywhere (an estimate, a timeout, a wait cap): one year."""
MAX_SIZE_BYTES = 1 << 50
"""Largest size accepted (1 PiB): beyond it a number is a typo, and it would overflow later."""
MAX_WAIT_CAP_S = 3600.0
"""Longest `tasks.wait_cap` (and `serve --wait-cap`): far above any client's tool-call timeout."""
MIN_LOG_CAP_BYTES = 64 * 1024
"""Smallest `tasks.log_cap`: a task's log is split in head and tail segments; below this it keeps
almost nothing and rotates a file every few bytes."""
MAX_TASKS = 10_000_000
"""Most finished task records `tasks.max_tasks` may keep."""
ALIAS_BUDGET = 1_000_000
"""Characters YAML aliases may expand to in one file (see `alias_problem`)."""

Level = Literal["L1", "L2", "L3"]
Isolation = Literal["none", "worktree"]
AgentName = Literal["claude", "codex", "gemini"]
AGENTS: tuple[str, ...] = ("claude", "codex", "gemini")
MAX_RETRIES = 100
Strategy = Literal["rebase", "merge", "squash"]
ExecutorName = Literal["local", "ray"]
MAX_PORT = 65535


class ConfigError(QueueError):
    """Raised when `.agent/config.yaml` cannot be used; the message names the file and the key."""

    def __init__(self, key: str | None, problem: str) -> None:
        where = f"{CONFIG_FILE}: {key} " if key else f"{CONFIG_FILE}: "
        super().__init__(where + problem)
        self.key = key


class Config(BaseModel):
    """The settings in force for one workspace; built by `load_config`, immutable afterwards."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    level: Level = "L2"
    max_parallel: int = Field(5, ge=MAX_PARALLEL_RANGE[0], le=MAX_PARALLEL_RANGE[1])
    continue_on_error: bool | None = None
    """As written in the file; None when it is not (see `stops_on_first_failure` for the rule)."""
    min_free_memory: int = Field(256 * MIB, ge=0)
    max_load: float | None = Field(None, gt=0)
    runner_command: list[str] | None = None
    runner_timeout_s: float | None = Field(None, gt=0)
    queue_dir: str = QUEUE_DIR
    wait_cap_s: float = Field(50, gt=0, le=MAX_WAIT_CAP_S)
    log_cap_bytes: int = Field(64 * MIB, ge=MIN_LOG_CAP_BYTES)
    max_tasks: int = Field(10_000, gt=0, le=MAX_TASKS)
    isolation: Isolation = "none"
    agent: AgentName | None = None
    """The agent profile for items without `command` (None: `runner_command` as an opaque argv)."""
    agent_args: tuple[str, ...] = ()
    auto_resume: bool = True
    max_cost_usd: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    agent_max_parallel: int | None = Field(None, ge=1)
    retries: int = Field(0, ge=0, le=MAX_RETRIES)
    retry_delay_s: float = Field(10.0, ge=0)
    worktree_copy: tuple[str, ...] = ()
    worktree_link: tuple[str, ...] = ()
    worktree_setup: str | None = None
    worktree_setup_timeout_s: float | None = Field(None, gt=0)
    """Past this, worktree.setup is killed and the item fails (None: no limit, like runner.timeout)."""
    worktree_ports: tuple[int, int] | None = None
    """First and last port (both included) handed out in AGENT_PORT; None hands out none."""
    integration_target: str | None = None
    """The branch integrated into; None means the branch checked out in the workspace."""
    integration_strategy: Strategy = "rebase"
    integration_verify: str | None = None
    integration_verify_timeout_s: float | None = Field(None, gt=0)
    """Past this, integration.verify is killed and the item fails, its work kept (None: no limit)."""
    integration_allow_overlap: bool = False
    integration_author: str | None = None
    """``Name <email>`` of the commit made of an agent's uncommitted work; None: git's configured user."""
    executor: ExecutorName = "local"
    ray_address: str | None = None
    """The Ray cluster to join with ``executor: ray``; None starts a local Ray instance."""

    @property
    def stops_on_first_failure(self) -> bool:
        """Whether a run at this config's level stops at the first failure (see the function)."""
        return stops_on_first_failure(self.level, self.continue_on_error)


def max_parallel_for(asked: int | None, config: Config) -> int:
    """THE `max_parallel` rule, for `queue_plan` and `run_queue` alike: an explicit argument outside
    `MAX_PARALLEL_RANGE` is a `UsageError` (an agent asked for it and should know); None takes the
    config's value, which `load_config` already clamped into the range with a warning."""
    if asked is None:
        return config.max_parallel
    low, high = MAX_PARALLEL_RANGE
    if isinstance(asked, bool) or not isinstance(asked, int) or not low <= asked <= high:
        raise UsageError(f"max_parallel must be between {low} and {high}, not {short_repr(asked)}")
    return asked


def clamp_max_parallel(written: int) -> tuple[int, str | None]:
    """The config file's `max_parallel` moved into `MAX_PARALLEL_RANGE`, with a warning when it moved."""
    low, high = MAX_PARALLEL_RANGE
    used = min(max(written, low), high)
    return used, None if used == written else f"max_parallel {short_repr(written)} is outside {low}..{high}; using {used}"


def stops_on_first_failure(level: str, continue_on_error: bool | None) -> bool:
    """THE rule: L1/L2 always stop at the first failure; L3 continues unless `continue_on_error`
    is explicitly false (the seed defines L3 as "continue_on_error: true")."""
    return level != "L3" or continue_on_error is False


# --- durations and sizes -------------------------------------------------------------------------

_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
# ASCII digits only: Python's \d and float() also read other scripts' digits (``١٢`` is 12).
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([a-z]+)\s*,?\s*", re.ASCII)
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")
_CLOCK = re.compile(r"([0-9]+):([0-5][0-9])(?::([0-5][0-9]))?")
_DURATION_HELP = "write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes"


def parse_duration(value: object) -> float:
    """Turn ``45s``, ``30m``, ``2h``, ``1h30m``, ``1:30`` or a bare number of minutes into seconds.

    Raises ``ValueError`` with a message saying what to write; callers add the file and field.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration ({_DURATION_HELP})")
    if isinstance(value, HugeNumber):
        if value.negative:
            raise ValueError(f"{value!r} is not a duration: it must be a finite number, not negative")
        return _bounded(math.inf, value)
    if isinstance(value, int):  # compared as an int: a 400-digit number must not reach float()
        if value < 0:
            raise ValueError(f"{short_repr(value)} is not a duration: it must be a finite number, not negative")
        return _bounded(value * 60, value)
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value!r} is not a duration: it must be a finite number, not negative")
        return _bounded(value * 60, value)
    if not isinstance(value, str):
        raise ValueError(f"a duration must be text or a number, not {describe(value)} ({_DURATION_HELP})")
    text = value.strip().lower()
    if _NUMBER.fullmatch(text):
        return _bounded(float(text) * 60, value)  # 400 nines read as float are inf: refused below
    clock = _CLOCK.fullmatch(text)
    if clock:
        hours, minutes, seconds = clock.groups()
        if len(hours.lstrip("0")) > 9:  # over a year (and int() refuses more than 4,300 digits)
            return _bounded(math.inf, value)
        return _bounded(int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0), value)
    total, position = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        unit = _DURATION_UNITS.get(part.group(2))
        if part.start() != position or unit is None:
            break
        total += float(part.group(1)) * unit
        position = part.end()
    if not text or position != len(text):
        raise ValueError(f"{short_repr(value)} is not a duration ({_DURATION_HELP})")
    return _bounded(total, value)


def _bounded(seconds: float, written: object) -> float:
    """`seconds` as a float, or a ValueError when it is over `MAX_DURATION_S` (or not finite)."""
    if not seconds <= MAX_DURATION_S:  # also catches inf and nan
        raise ValueError(f"{short_repr(written)} is too long: a duration is at most 365 days ({_DURATION_HELP})")
    return float(seconds)


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b?)", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": MIB, "mib": MIB, "mb": 10**6,
               "g": 1024**3, "gib": 1024**3, "gb": 10**9, "t": 1024**4, "tib": 1024**4, "tb": 10**12}


def parse_size(value: object) -> int:
    """Turn a number of bytes or ``256MiB`` / ``64MB`` / ``1G`` into bytes (KiB = 1024, KB = 1000)."""
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    elif isinstance(value, HugeNumber) and not value.negative:
        size = math.inf
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match and match.group(2).lower() in _SIZE_UNITS:
            size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size is None:
        raise ValueError(f"{short_repr(value)} is not a size (write a number of bytes, or 256MiB, 64MB, 1GiB)")
    if not size <= MAX_SIZE_BYTES:  # a 400-digit size (inf as a float) would overflow where it is used
        raise ValueError(f"{short_repr(value)} is too large: a size is at most 1 PiB ({MAX_SIZE_BYTES} bytes)")
    return int(size)


def unknown_key_warning(where: str, key: object, known: list[str]) -> str:
    """Say that `key` is ignored, suggesting the closest known key when there is one."""
    text = repr(huge) if isinstance(key, int) and (huge := huge_number(key)) else str(key)  # str() would raise
    shown = text if text.isprintable() and len(text) <= 60 else short_repr(text)  # a key may be huge or hold NUL
    close = difflib.get_close_matches(text[:100], known, n=1, cutoff=0.7)
    hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(known)})"
    return f"unknown key {where}{shown} ignored{hint}"


# --- reading the file ----------------------------------------------------------------------------

_KNOWN = {
    "": ["autonomy", "runner", "queue", "resources", "tasks", "worktree", "integration", "executor", "ray"],
    "autonomy": ["level", "max_parallel", "continue_on_error", "l3_settings", "min_free_memory", "max_load"],
    "autonomy.l3_settings": ["max_parallel", "continue_on_error"],
    "runner": ["command", "timeout", "isolation", "agent", "args", "auto_resume", "max_cost_usd", "max_tokens",
               "max_parallel", "retries", "retry_delay"],
    "queue": ["dir"],
    "resources": ["min_free_memory", "max_load"],
    "tasks": ["wait_cap", "log_cap", "max_tasks"],
    "worktree": ["copy", "link", "setup", "setup_timeout", "ports"],
    "integration": ["target", "strategy", "verify", "verify_timeout", "allow_overlap", "author"],
    "ray": ["address"],
}


def load_config(root: Path) -> tuple[Config, list[str]]:
    """Read `.agent/config.yaml` under `root`; return the config and warnings for people to read.

    Raises `ConfigError` for a file that cannot be used and `PathOutsideWorkspace` for a config
    file that is a symlink pointing out of the workspace.
    """
    root = root.resolve()
    path = resolve_inside(root, CONFIG_FILE, "config file")
    if not path.exists():
        return Config(), []
    data = _read_yaml(path)
    warnings: list[str] = []
    if data is None:
        return Config(), warnings
    if not isinstance(data, dict):
        raise ConfigError(None, f"must be a mapping of settings (key: value lines), not {describe(data)}")

    sections = {name: _section(data, name) for name in _KNOWN if name}
    sections[""] = data
    for name, known in _KNOWN.items():
        prefix = f"{name}." if name else ""
        for key in sections[name]:
            if key not in known:
                warnings.append(unknown_key_warning(prefix, key, known))

    values: dict[str, Any] = {}
    autonomy, l3 = sections["autonomy"], sections["autonomy.l3_settings"]
    if "level" in autonomy:
        values["level"] = _level(autonomy["level"])
    for key, convert in (("max_parallel", _max_parallel), ("continue_on_error", _boolean)):
        if key in autonomy:
            values[key] = convert(f"autonomy.{key}", autonomy[key])
        elif key in l3:
            values[key] = convert(f"autonomy.l3_settings.{key}", l3[key])
    if "max_parallel" in values:
        values["max_parallel"], clamped = clamp_max_parallel(values["max_parallel"])
        warnings += [clamped] if clamped else []
    level = values.get("level", "L2")
    if values.get("continue_on_error") and level != "L3":
        warnings.append(
            f"continue_on_error is true but level is {level}; it is honoured at L3 only, "
            f"so the first failure stops the run (at L3 runs continue past failures unless "
            f"continue_on_error is false)"
        )

    runner = sections["runner"]
    if "command" in runner and runner["command"] is not None:
        values["runner_command"] = _argv("runner.command", runner["command"])
    if "timeout" in runner and runner["timeout"] is not None:
        values["runner_timeout_s"] = _duration("runner.timeout", runner["timeout"])
    if "dir" in sections["queue"]:
        values["queue_dir"] = _text("queue.dir", sections["queue"]["dir"])
    for section in ("autonomy", "resources"):  # the spelling first, then the resources section
        limits = sections[section]
        if "min_free_memory" in limits and "min_free_memory" not in values:
            values["min_free_memory"] = _size(f"{section}.min_free_memory", limits["min_free_memory"])
        if limits.get("max_load") is not None and "max_load" not in values:
            values["max_load"] = _positive_number(f"{section}.max_load", limits["max_load"])
    tasks = sections["tasks"]
    if "wait_cap" in tasks:
        values["wait_cap_s"] = _duration("tasks.wait_cap", tasks["wait_cap"])
        if values["wait_cap_s"] > MAX_WAIT_CAP_S:  # refused here, naming the key, not when the server starts
            raise ConfigError("tasks.wait_cap", f"must be at most {MAX_WAIT_CAP_S:g}s (1h), not {short_repr(tasks['wait_cap'])}")
    if "log_cap" in tasks:
        values["log_cap_bytes"] = _size("tasks.log_cap", tasks["log_cap"], minimum=MIN_LOG_CAP_BYTES)
    if "max_tasks" in tasks:
        values["max_tasks"] = _whole_number("tasks.max_tasks", tasks["max_tasks"], minimum=1, maximum=MAX_TASKS)
    values.update(_isolation_settings(runner, sections["worktree"], sections["integration"]))
    if data.get("executor") is not None:
        values["executor"] = _choice("executor", data["executor"], ("local", "ray"))
    if sections["ray"].get("address") is not None:
        values["ray_address"] = _text("ray.address", sections["ray"]["address"])
    values.update(_agent_settings(runner))
    return Config(**values), warnings


def _agent_settings(runner: dict[str, Any]) -> dict[str, Any]:
    """The agent profile, its budgets and caps, and retries (`runner.*`; a null value means the default)."""
    values: dict[str, Any] = {}
    if runner.get("agent") is not None:
        values["agent"] = _choice("runner.agent", runner["agent"], AGENTS)
    if runner.get("args") is not None:
        values["agent_args"] = tuple(_argv("runner.args", runner["args"]))
    if runner.get("auto_resume") is not None:
        values["auto_resume"] = _boolean("runner.auto_resume", runner["auto_resume"])
    if runner.get("max_cost_usd") is not None:
        values["max_cost_usd"] = _positive_number("runner.max_cost_usd", runner["max_cost_usd"])
    if runner.get("max_tokens") is not None:
        values["max_tokens"] = _whole_number("runner.max_tokens", runner["max_tokens"], minimum=1)
    if runner.get("max_parallel") is not None:
        values["agent_max_parallel"] = _whole_number("runner.max_parallel", runner["max_parallel"], minimum=1,
                                                     maximum=MAX_PARALLEL_RANGE[1])
    if runner.get("retries") is not None:
        values["retries"] = _whole_number("runner.retries", runner["retries"], minimum=0, maximum=MAX_RETRIES)
    if runner.get("retry_delay") is not None:
        try:
            values["retry_delay_s"] = parse_duration(runner["retry_delay"])
        except ValueError as exc:
            raise ConfigError("runner.retry_delay", f"is not valid: {exc}") from exc
    return values


def _isolation_settings(runner: dict[str, Any], worktree: dict[str, Any], integration: dict[str, Any]) -> dict[str, Any]:
    """The `runner.isolation`, `worktree.*` and `integration.*` keys, checked (a null value means the default)."""
    values: dict[str, Any] = {}
    if runner.get("isolation") is not None:
        values["isolation"] = _choice("runner.isolation", runner["isolation"], ("none", "worktree"))
    for key in ("copy", "link"):
        if worktree.get(key) is not None:
            values[f"worktree_{key}"] = _relative_paths(f"worktree.{key}", worktree[key])
    if worktree.get("setup") is not None:
        values["worktree_setup"] = _text("worktree.setup", worktree["setup"])
    if worktree.get("setup_timeout") is not None:
        values["worktree_setup_timeout_s"] = _duration("worktree.setup_timeout", worktree["setup_timeout"])
    if worktree.get("ports") is not None:
        values["worktree_ports"] = _port_range("worktree.ports", worktree["ports"])
    if integration.get("target") is not None:
        values["integration_target"] = _branch_name("integration.target", integration["target"])
    if integration.get("strategy") is not None:
        values["integration_strategy"] = _choice("integration.strategy", integration["strategy"],
                                                 ("rebase", "merge", "squash"))
    if integration.get("verify") is not None:
        values["integration_verify"] = _text("integration.verify", integration["verify"])
    if integration.get("verify_timeout") is not None:
        values["integration_verify_timeout_s"] = _duration("integration.verify_timeout", integration["verify_timeout"])
    if integration.get("allow_overlap") is not None:
        values["integration_allow_overlap"] = _boolean("integration.allow_overlap", integration["allow_overlap"])
    if integration.get("author") is not None:
        values["integration_author"] = _author("integration.author", integration["author"])
    return values


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        raise ConfigError(key, f"must be {listed}, not {short_repr(value)}")
    return value.strip().lower()


def _relative_paths(key: str, value: object) -> tuple[str, ...]:
    """A glob or a list of globs, each relative to the workspace root and staying inside it."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ConfigError(key, f"must be a list of paths or globs relative to the workspace root, not {describe(value)}")
    paths = []
    for item in items:
        text = _text(key, item)
        parts = Path(text).parts
        if Path(text).is_absolute() or ".." in parts:
            raise ConfigError(key, f"{short_repr(text)} must be relative to the workspace root and stay inside it "
                                   f"(no leading / and no ..)")
        if parts and parts[0] in (".git", ".agent"):
            raise ConfigError(key, f"{short_repr(text)} names git's or agent-parallel's own files; "
                                   f"list your project's files instead")
        paths.append(text)
    return tuple(paths)


_PORTS = re.compile(r"([0-9]{1,5})\s*-\s*([0-9]{1,5})", re.ASCII)


def _port_range(key: str, value: object) -> tuple[int, int]:
    """``4100-4199`` (both included), or a single port."""
    help_text = "write a range of ports such as \"4100-4199\""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and (match := _PORTS.fullmatch(value.strip())):
        low, high = int(match.group(1)), int(match.group(2))
    else:
        raise ConfigError(key, f"must be a range of ports, not {short_repr(value)} ({help_text})")
    if not 1 <= low <= high <= MAX_PORT:
        raise ConfigError(key, f"must be a range of ports between 1 and {MAX_PORT}, the first not above the last, "
                               f"not {short_repr(value)} ({help_text})")
    return low, high


# What git refuses in a branch name (git check-ref-format), checked without running git.
_BAD_REF = re.compile(r"(^[-/.])|([/.]$)|(\.\.)|(//)|(@\{)|(\.lock(/|$))|(/\.)|[\x00-\x20\x7f~^:?*\[\\]")


def _branch_name(key: str, value: object) -> str:
    text = _text(key, value)
    if text.startswith("refs/heads/"):
        text = text[len("refs/heads/"):]
    if text == "@" or _BAD_REF.search(text):
        raise ConfigError(key, f"{short_repr(text)} is not a valid git branch name; write a branch name such as main")
    return text


_AUTHOR = re.compile(r"[^<>\n]+ <[^<>\n]*>")


def _author(key: str, value: object) -> str:
    text = _text(key, value)
    if not _AUTHOR.fullmatch(text):
        raise ConfigError(key, f"must be written Name <email>, not {short_repr(text)}")
    return text


def _read_yaml(path: Path) -> object:
    """Load the file's YAML, turning every way it can fail into a `ConfigError`."""
    try:
        raw = read_regular(path, MAX_CONFIG_BYTES)  # a FIFO there would make the read wait forever
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise ConfigError(None, f"is larger than {MAX_CONFIG_BYTES} bytes; it should be a few lines") from exc
        if exc.errno == errno.EINVAL:
            raise ConfigError(None, NOT_REGULAR) from exc
        raise ConfigError(None, f"cannot be read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(None, f"is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from exc
    loader = _ConfigLoader
    problem = alias_problem(text, loader)
    if problem:
        raise ConfigError(None, problem)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(None, f"is not valid YAML: {exc.problem}{where}") from exc
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(None, f"is not valid YAML: {short_repr(str(exc), 200)}") from exc


class _ConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # the C loader where libyaml is built in
    """Safe YAML whose numbers are read by `yaml_int`: ``1:30`` (YAML 1.1 base 60) stays text."""


def yaml_int(text: str, *, octal: bool) -> int | str | HugeNumber:
    """The value of a YAML integer written `text` (underscores removed), as PyYAML reads it, except:

    - base 60 (``1:30``, ``1:59:59``) stays text: PyYAML builds ``1:59:59:...`` in quadratic time
      (a minute for a config file under its cap), and a duration reads ``1:30`` as h:mm itself;
    - past `MAX_INT_DIGITS` digits it is a `HugeNumber`: Python cannot print such an int (every
      message showing it would raise) and reads one from decimal text in quadratic time;
    - ``010`` is octal (eight) only when `octal` (YAML 1.1, as PyYAML; the item loader reads ten).

    Raises ``ValueError`` for text that is no integer (an explicit ``!!int`` tag on a word).
    """
    negative = text[:1] == "-"
    body = text[1:] if text[:1] in ("-", "+") else text
    if ":" in body:
        return text
    base = 16 if body[:2] == "0x" else 2 if body[:2] == "0b" else 8 if octal and body[:1] == "0" and body != "0" else 10
    if base == 10:  # counted first: int() of decimal text is quadratic, and refuses 4,300+ digits
        digits = len(body.lstrip("0"))
        if digits > MAX_INT_DIGITS:
            return HugeNumber(digits, negative)
        value = int(body, 10)
    else:  # linear in the length for these bases
        value = int(body[2:] if base in (2, 16) else body, base)
        huge = huge_number(value)
        if huge:
            return HugeNumber(huge.digits, negative)
    return -value if negative else value


def _construct_config_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    return yaml_int(str(loader.construct_scalar(node)).replace("_", ""), octal=True)


def _construct_config_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    """Base-60 floats (``1:30.5``) stay text like base-60 integers (PyYAML overflows on a long one)."""
    text = str(loader.construct_scalar(node))
    return text.replace("_", "") if ":" in text else yaml.SafeLoader.construct_yaml_float(loader, node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_config_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _construct_config_float)


def alias_problem(text: str, loader: type) -> str | None:
    """Why `text` must not be loaded: YAML aliases that expand past `ALIAS_BUDGET`, else None.

    A billion-laughs file (``a: &a [x, x]``, ``b: &b [*a, *a]``, ...) is a few hundred bytes
    whose aliases expand exponentially; building or printing its values would take minutes and
    all memory. The events are scanned only when the text has both ``&`` (an anchor) and ``*``
    (an alias), so ordinary files keep the C loader's speed. Syntax errors are left to the loader.
    """
    if "&" not in text or "*" not in text:
        return None
    sizes: dict[str, int] = {}
    stack: list[list[Any]] = [[None, 0]]  # per open collection: its anchor, the characters it holds so far
    expanded = 0
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent):
                size = sizes.get(event.anchor or "", 1)
                expanded += size
                if expanded > ALIAS_BUDGET:
                    return (f"uses YAML aliases (*{short_repr(event.anchor, 30)[1:-1]}) that expand to more than "
                            f"{ALIAS_BUDGET:,} characters; write the values out instead of repeating them "
                            f"with &anchors and *aliases")
                stack[-1][1] += size
            elif isinstance(event, yaml.ScalarEvent):
                size = len(event.value) + 1
                if event.anchor:
                    sizes[event.anchor] = size
                stack[-1][1] += size
            elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                stack.append([event.anchor, 1])
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, size = stack.pop()
                if anchor:
                    sizes[anchor] = size
                stack[-1][1] += size
    except (yaml.YAMLError, ValueError, RecursionError):
        return None
    return None


def _section(data: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The mapping at `dotted` (``autonomy.l3_settings``), empty when absent."""
    value: object = data
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(dotted, f"must be a mapping of settings, not {describe(value)}")
    return cast(dict[str, Any], value)  # checked to be a mapping in the loop


def _level(value: object) -> Level:
    text = value.strip().upper() if isinstance(value, str) else ""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 3:  # (never str() a huge int)
        text = str(value)
    if text in ("1", "2", "3"):
        text = "L" + text
    if text not in ("L1", "L2", "L3"):
        raise ConfigError("autonomy.level", f"must be L1, L2 or L3, not {short_repr(value)}")
    return cast(Level, text)  # one of the three, checked above


def _max_parallel(key: str, value: object) -> int:
    """`max_parallel` as written (`clamp_max_parallel` moves it into range); one too long to show is refused."""
    if isinstance(value, HugeNumber):
        low, high = MAX_PARALLEL_RANGE
        raise ConfigError(key, f"must be between {low} and {high}, not {value!r}")
    return _whole_number(key, value)


def _whole_number(key: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, HugeNumber):
        if value.negative and minimum is not None:
            raise ConfigError(key, f"must be at least {minimum}, not {value!r}")
        if not value.negative and maximum is not None:
            raise ConfigError(key, f"must be at most {maximum}, not {value!r}")
        raise ConfigError(key, f"must be a whole number of at most {MAX_INT_DIGITS:,} digits, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be a whole number, not {short_repr(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, not {short_repr(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(key, f"must be at most {maximum}, not {short_repr(value)}")
    return value


def _boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {short_repr(value)}")
    return value


def _positive_number(key: str, value: object) -> float:
    if isinstance(value, HugeNumber) and not value.negative:
        raise ConfigError(key, f"must be at most 1e9, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(key, f"must be a number above 0, not {short_repr(value)}")
    if value > 1e9:  # compared before float(): a 400-digit int would overflow there
        raise ConfigError(key, f"must be at most 1e9, not {short_repr(value)}")
    return float(value)


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"must be a non-empty string, not {short_repr(value)}")
    if "\x00" in value:
        raise ConfigError(key, "contains a NUL character (\\0); remove it")
    return value.strip()


def _argv(key: str, value: object) -> list[str]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ConfigError(key, f"cannot be split into arguments: {exc}") from exc
    elif isinstance(value, list) and all(isinstance(part, (str, int, float)) for part in value):
        argv = [str(part) for part in value]
    else:
        raise ConfigError(key, f"must be a list of strings (an argv), not {describe(value)}")
    if not argv:
        raise ConfigError(key, "must name a program; it is empty")
    if any("\x00" in part for part in argv):
        raise ConfigError(key, "contains a NUL character (\\0), which cannot be passed to a process; remove it")
    return argv


def _duration(key: str, value: object) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(key, f"is not valid: {exc}") from exc
    if seconds <= 0:
        raise ConfigError(key, f"must be longer than 0, not {short_repr(value)}")
    return seconds


def _size(key: str, value: object, minimum: int = 0) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ConfigError(key, f"is not valid: {exc}") from exc
    if size < minimum:
        raise ConfigError(key, f"must be at least {_show_size(minimum)}, not {short_repr(value)}: "
                               f"a smaller cap keeps almost nothing of a task's output")
    return size


def _show_size(size: int) -> str:
    return f"{size // 1024}KiB ({size} bytes)" if size % 1024 == 0 else f"{size} bytes"
