"""An item's task body when it needs more than one process run: retries, and agents that may resume.

``ItemJob`` is a registry ``Job``: the item's one task (one id, one log) runs its attempts one
after the other through the registry's executor, so an attempt is a process like any task's
(its own group, found by ``AGENT_TASK_ID``, stopped with the task, guarded by the watchdog) and
an item never runs twice at once. Each attempt after the first (and the first, when retries are
allowed) opens with a header line in the log. The log is read as it grows (``_follow``: a worker
thread reads the new bytes every ``POLL_S``) into a ``StreamParser`` for agent items.

After an attempt fails:
- an agent that hit a rate limit (or an overload) and said its session: with ``auto_resume`` the
  job holds the profile's ``Gate`` (so runs start no new agent item) until the reset time the CLI
  gave (else an exponential backoff with jitter), waits for it, and resumes *that* session in the
  same working directory; without ``auto_resume`` the item fails, its reason saying until when
  and how to resume by hand;
- otherwise, while retries are left, it waits ``retry_delay * 2**n`` (with jitter) and runs again.
A cancelled task (``stop``) never starts another attempt. Each attempt may take ``timeout_s``.
"""

from __future__ import annotations

import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio

from ..results import AgentUsage, iso
from ..tasks.executor import Executor, ExecutorError, ExitInfo, LaunchSpec, TaskHandle
from ..tasks.logs import LogReader, LogWriter
from . import profiles
from .stream import StreamParser

POLL_S = 0.2
READ_CHUNK = 1 << 20
MAX_RESUMES = 20
"""Resumes of one item after rate limits; past this it fails (a limit that never lifts)."""
MAX_BACKOFF_S = 3600.0


class Gate:
    """One agent profile's rate-limit hold and its ``runner.max_parallel`` cap, shared by every item
    of a server (runs and launch_task): ``running`` counts its attempts running now."""

    def __init__(self) -> None:
        self.until: float | None = None
        self.why: str | None = None
        self.cap: int | None = None
        self.running = 0

    def full(self) -> bool:
        return self.cap is not None and self.running >= self.cap

    async def wait_for_slot(self) -> None:
        """Return once fewer than ``cap`` attempts of this profile run (the caller then counts itself)."""
        while self.full():  # noqa: ASYNC110 -- polled: the cap may change with the config
            await anyio.sleep(0.1)

    def hold(self, until: float, why: str) -> None:
        if self.until is None or until > self.until:
            self.until, self.why = until, why

    def holding(self, now: float | None = None) -> str | None:
        """Why agent items must not start now (and until when), or None."""
        now = time.time() if now is None else now
        if self.until is None or now >= self.until:
            return None
        return f"{self.why}; new agent items wait until {iso(self.until)}"

    async def wait(self) -> None:
        # polled: another item may push `until` later while this one waits
        while self.until is not None and (left := self.until - time.time()) > 0:  # noqa: ASYNC110
            await anyio.sleep(min(left, 5.0))


_GATES: weakref.WeakKeyDictionary[object, dict[str, Gate]] = weakref.WeakKeyDictionary()


def gate_for(owner: object, agent: str) -> Gate:
    """The gate of ``agent`` for ``owner`` (the task registry: one per server)."""
    return _GATES.setdefault(owner, {}).setdefault(agent, Gate())


def backoff(base: float, n: int) -> float:
    """``base * 2**n`` with up to 25 % jitter either way, at most ``MAX_BACKOFF_S``."""
    return min(base * 2.0 ** n, MAX_BACKOFF_S) * random.uniform(0.75, 1.25)


@dataclass
class AttemptPlan:
    """How to run an item: a shell line (``command``) or an argv, and what may follow a failure."""

    executor: Executor
    runs_dir: Path
    cwd: Path
    env: dict[str, str]
    command: str | None = None
    argv: list[str] | None = None
    stdin_path: Path | None = None
    timeout_s: float | None = None
    retries: int = 0
    retry_delay_s: float = 10.0
    agent: str | None = None
    agent_args: tuple[str, ...] = ()
    agent_command: list[str] | None = None
    auto_resume: bool = True
    gate: Gate | None = None
    grace_s: float = 2.0
    notes: list[str] = field(default_factory=list)
    resources: dict[str, float] = field(default_factory=dict)
    """What each attempt needs of a cluster node (``--executor ray``; ``LaunchSpec.resources``)."""
    admission: Callable[[], str | None] | None = None
    """The registry's check before a process starts (low memory, high load): None to go ahead, or why
    to hold the attempt's start (the registry does not check a job's body itself)."""
    admission_retry_s: float = 0.5


class ItemJob:
    """The attempts of one item (see the module docstring); ``usage()`` and ``waiting`` for views."""

    def __init__(self, plan: AttemptPlan) -> None:
        self.plan = plan
        self.attempts = 0
        self.resumes = 0
        self.waiting: str | None = None
        self._done: list[AgentUsage] = []  # finished attempts' usage
        self._parser: StreamParser | None = None
        self._fed = 0  # the log offset the parser has read to (``_read``)
        self._handle: TaskHandle | None = None
        self._stopped = False
        self._sleep: anyio.CancelScope | None = None
        self.last: AgentUsage | None = None
        self.lost: ExecutorError | None = None  # the executor lost the last attempt (a lost node)

    # -- Job
    async def start(self, task_id: str, log: LogWriter) -> None:
        self.task_id, self.log = task_id, log
        self.plan.env["AGENT_TASK_ID"] = task_id

    async def run(self) -> ExitInfo:
        plan = self.plan
        session: str | None = None
        info = ExitInfo(None, None)
        failures = 0
        while not self._stopped:
            info, outcome = await self._attempt(resume=session)
            session = None
            if self._stopped or info.signal == "not started" or (info.exit_code == 0 and (outcome is None or outcome.error is None)):
                break
            if outcome is not None and outcome.error in ("rate_limited", "overloaded") and outcome.session_id:
                if not plan.auto_resume and outcome.error == "rate_limited":
                    until = outcome.resets_at or "an unknown time"
                    plan.notes.append(f"rate_limited until {until} (runner.auto_resume is off); resume it by hand "
                                      f"in {plan.cwd}: {profiles.resume_hint(plan.agent or '', outcome.session_id)}")
                    break
                if plan.auto_resume and self.resumes < MAX_RESUMES:
                    await self._hold_for_limit(outcome)
                    session = outcome.session_id
                    self.resumes += 1
                    continue
            if failures >= plan.retries:
                if self.lost is not None:
                    raise self.lost
                break
            delay = backoff(plan.retry_delay_s, failures)
            failures += 1
            await self._pause(delay, f"attempt {self.attempts} failed; retrying in {delay:.1f}s "
                                     f"({failures} of {plan.retries} retries)")
        if outcome_error := (self.last.error if self.last is not None else None):
            if info.exit_code == 0:
                info = ExitInfo(1, None)  # the stream says it failed, whatever the exit code says
            if not any(n.startswith("rate_limited") for n in plan.notes):
                plan.notes.append(f"agent error: {outcome_error}"
                                  + (f" ({self.last.error_message})" if self.last and self.last.error_message else ""))
        if self.attempts > 1:
            plan.notes.append(f"{self.attempts} attempts" + (f" ({self.resumes} resumed)" if self.resumes else ""))
        return info

    async def stop(self, grace: float, reason: str) -> None:
        self._stopped = True
        if self._sleep is not None:
            self._sleep.cancel()
        if self._handle is not None:
            await self._handle.terminate(grace)

    # -- views
    def usage(self) -> AgentUsage | None:
        """The item's usage over every attempt so far (None for an item that is no agent)."""
        if self.plan.agent is None:
            return None
        parts = [*self._done, *([self._parser.snapshot()] if self._parser is not None else [])]
        total = AgentUsage.total(parts) or AgentUsage()
        latest = parts[-1] if parts else AgentUsage()
        return total.model_copy(update={
            "agent": self.plan.agent, "session_id": next((p.session_id for p in reversed(parts) if p.session_id), None),
            "result": latest.result, "error": latest.error, "error_message": latest.error_message,
            "resets_at": latest.resets_at, "resumes": self.resumes,
            "attempts": self.attempts if self.plan.retries else None})

    # -- one attempt
    async def _attempt(self, *, resume: str | None) -> tuple[ExitInfo, AgentUsage | None]:
        plan = self.plan
        self.attempts += 1
        if plan.gate is not None:
            self.waiting = plan.gate.holding()
            await self._wait_gate(plan.gate)
            if not self._stopped and plan.gate.full():
                self.waiting = f"runner.max_parallel: {plan.gate.cap} agent(s) already running"
                with anyio.CancelScope() as self._sleep:
                    await plan.gate.wait_for_slot()
                self._sleep, self.waiting = None, None
            await self._admit()
            if self._stopped:
                self.attempts -= 1
                return ExitInfo(None, "not started"), None
            plan.gate.running += 1
            try:
                return await self._run_attempt(resume)
            finally:
                plan.gate.running -= 1
        await self._admit()
        if self._stopped:
            self.attempts -= 1
            return ExitInfo(None, "not started"), None
        return await self._run_attempt(resume)

    async def _admit(self) -> None:
        """Hold the attempt's start while the registry's admission check says so (memory, load)."""
        check = self.plan.admission
        with anyio.CancelScope() as self._sleep:
            while check is not None and not self._stopped and (why := check()):
                self.waiting = f"start held: {why}"
                await anyio.sleep(self.plan.admission_retry_s)
        self._sleep, self.waiting = None, None

    async def _run_attempt(self, resume: str | None) -> tuple[ExitInfo, AgentUsage | None]:
        """One attempt. An executor that loses it (a lost Ray node) makes it a failed attempt, to be
        retried like any other; if it is the last, ``run`` raises that error (the task's reason)."""
        plan = self.plan
        self.lost = None
        if plan.retries or self.attempts > 1:
            what = f"resuming session {resume}" if resume else f"attempt {self.attempts} of {plan.retries + 1 + self.resumes}"
            self.log.write(f"\n=== agent-parallel: {what} at {iso(time.time())} ===\n".encode())
        argv, stdin = plan.argv, plan.stdin_path
        if plan.agent is not None:
            how = profiles.resume(plan.agent, resume, plan.agent_args, plan.agent_command) if resume else \
                profiles.first_run(plan.agent, plan.agent_args, plan.agent_command)
            argv, stdin = how.argv, plan.stdin_path if how.item_on_stdin else None
            self._parser = StreamParser(plan.agent)
        self._fed = self.log.total  # the parser reads this attempt's output from here
        spec = LaunchSpec(task_id=self.task_id, cwd=plan.cwd, command=plan.command if argv is None else None,
                          argv=argv, env=dict(plan.env), stdin_path=stdin, resources=dict(plan.resources))
        self._handle = handle = await plan.executor.start(spec, self.log)
        try:
            async with anyio.create_task_group() as tg:
                if self._parser is not None:
                    tg.start_soon(self._follow, self._parser)
                with anyio.move_on_after(plan.timeout_s if plan.timeout_s is not None else float("inf")) as scope:
                    try:
                        info = await handle.wait()
                    except ExecutorError as exc:
                        self.lost, info = exc, ExitInfo(None, None)
                        self.log.write(f"agent-parallel: attempt {self.attempts} failed: {exc}\n".encode())
                if scope.cancelled_caught:
                    await handle.terminate(plan.grace_s)
                    info = await handle.wait()
                    plan.notes.append(f"attempt {self.attempts} was killed after its timeout of {plan.timeout_s:g} s")
                    info = replace(info, timed_out=True)
                tg.cancel_scope.cancel()
            if handle.survivors:
                plan.notes.append(f"attempt {self.attempts} left processes that survived SIGKILL: {handle.survivors}")
        finally:
            self._handle = None
        outcome = None
        if self._parser is not None:
            parser = self._parser
            await self._read(parser, to_end=True)  # (from where the follower stopped)
            outcome = parser.finish(info.exit_code)
            self._done.append(outcome)
            self._parser = None
            self.last = outcome
        return info, outcome

    async def _follow(self, parser: StreamParser) -> None:
        """Feed the attempt's new log bytes to the parser as they arrive (until cancelled)."""
        while True:
            await self._read(parser)
            await anyio.sleep(POLL_S)

    async def _read(self, parser: StreamParser, *, to_end: bool = False) -> None:
        """Feed the parser the log's bytes from ``_fed``, where it stopped (every byte once: a read
        cancelled with the follower still finishes in its thread, so the last read goes on after it)."""
        log = self.log

        def read() -> None:
            while True:
                reader = LogReader(self.plan.runs_dir, self.task_id, log.total, log.head_cap, list(log.segments))
                if self._fed >= reader.total:
                    return
                data, real = reader.read_bytes(self._fed, READ_CHUNK)
                if real > self._fed:
                    parser.gap()
                if not data:
                    self._fed = max(self._fed, real)
                    return
                parser.feed(data)
                self._fed = real + len(data)
                if not to_end and len(data) < READ_CHUNK:
                    return

        await anyio.to_thread.run_sync(read)

    async def _wait_gate(self, gate: Gate) -> None:
        with anyio.CancelScope() as self._sleep:
            await gate.wait()
        self._sleep = None
        self.waiting = None

    async def _pause(self, seconds: float, why: str) -> None:
        self.waiting = why
        self.log.write(f"agent-parallel: {why}\n".encode())
        with anyio.CancelScope() as self._sleep:
            await anyio.sleep(seconds)
        self._sleep = None
        self.waiting = None

    async def _hold_for_limit(self, outcome: AgentUsage) -> None:
        """Hold the profile's gate until the limit resets (the CLI's time, else a backoff), then wait."""
        plan = self.plan
        now = time.time()
        reset = _parse_iso(outcome.resets_at)
        base = max(plan.retry_delay_s, 0.01)
        until = reset + random.uniform(0, 2) if reset is not None and reset > now else now + backoff(base, self.resumes)
        why = (f"{plan.agent} {'rate limited' if outcome.error == 'rate_limited' else 'overloaded'} "
               f"(session {outcome.session_id})")
        if plan.gate is not None:
            plan.gate.hold(until, why)
        self.waiting = f"{why}; resuming it at {iso(until)}"
        self.log.write(f"agent-parallel: {self.waiting}\n".encode())
        with anyio.CancelScope() as self._sleep:
            await anyio.sleep(max(until - time.time(), 0))
        self._sleep = None
        self.waiting = None


def _parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
