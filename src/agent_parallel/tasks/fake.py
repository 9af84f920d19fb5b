"""``FakeExecutor``: an ``Executor`` that runs no process, for tests of what lies above it.

Like httpx's ``MockTransport``, it stands where the real thing would and does what the test
scripted: each task gets an ``FakeOutcome`` (by its command, or from a function of its
``LaunchSpec``): output written to the task's log, an exit code or a signal, a delay (seconds,
or until an ``anyio.Event`` the test sets), or an exception raised at start. Everything the
registry and the queue do around a task (records, waiting, cancelling, timeouts, follow-ups) is
then tested in milliseconds. Tests of process behaviour (kills, escapes, floods of output) use
``LocalExecutor`` and real processes.

    executor = FakeExecutor({"build": FakeOutcome(output=b"ok\\n"), "test": FakeOutcome(exit_code=1)})
    async with open_registry(root, runs, settings, executor) as registry: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from .executor import ExitInfo, LaunchSpec, SpawnError
from .logs import LogWriter


@dataclass
class FakeOutcome:
    """What a fake task does: writes ``output``, then after ``delay`` seconds (and once ``release``
    is set, when given) exits with ``exit_code``, or is killed by ``signal``. With ``start_error``
    the start fails instead (an ``Exception`` other than ``SpawnError`` plays an executor bug); with
    ``wait_error`` waiting for its end raises that (an executor losing the task: a lost node)."""

    exit_code: int | None = 0
    signal: str | None = None
    output: bytes = b""
    delay: float = 0.0
    release: anyio.Event | None = None
    start_error: Exception | None = None
    wait_error: Exception | None = None


@dataclass
class FakeExecutor:
    """An ``Executor`` without processes. ``outcomes`` maps a command (the shell line, or the argv
    joined by spaces) to its ``FakeOutcome``, or is a function of the ``LaunchSpec``; unknown commands
    get ``default``. ``started`` lists every spec started, ``handles`` their handles, in order."""

    outcomes: dict[str, FakeOutcome] | Callable[[LaunchSpec], FakeOutcome] = field(default_factory=dict)
    default: FakeOutcome = field(default_factory=FakeOutcome)
    started: list[LaunchSpec] = field(default_factory=list)
    handles: list[FakeHandle] = field(default_factory=list)
    closed: bool = False

    def outcome_for(self, spec: LaunchSpec) -> FakeOutcome:
        if callable(self.outcomes):
            return self.outcomes(spec)
        shown = spec.command if spec.command is not None else " ".join(spec.argv or [])
        return self.outcomes.get(shown, self.default)

    async def start(self, spec: LaunchSpec, log: LogWriter) -> FakeHandle:
        outcome = self.outcome_for(spec)
        await anyio.lowlevel.checkpoint()
        if outcome.start_error is not None:
            raise outcome.start_error
        self.started.append(spec)
        try:
            log.write(outcome.output)
        except OSError as exc:
            raise SpawnError(f"could not write the fake task's output: {exc}") from exc
        handle = FakeHandle(spec, outcome)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        self.closed = True


class FakeHandle:
    """A ``TaskHandle`` whose "process" is a wait: it ends when its outcome says, or when stopped
    (then as if killed by SIGTERM)."""

    pid: int | None = None
    start_time: int | None = None

    def __init__(self, spec: LaunchSpec, outcome: FakeOutcome) -> None:
        self.spec, self.outcome = spec, outcome
        self.survivors: list[int] = []
        self.terminated: list[float] = []  # the grace of each terminate() call
        self._stopped = anyio.Event()
        self._exit: ExitInfo | None = None

    async def wait(self) -> ExitInfo:
        if self._exit is None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._until_stopped, tg.cancel_scope)
                await anyio.sleep(self.outcome.delay)
                if self.outcome.release is not None:
                    await self.outcome.release.wait()
                tg.cancel_scope.cancel()
            if self.outcome.wait_error is not None and not self._stopped.is_set():
                raise self.outcome.wait_error
            if self._exit is None:
                self._exit = (ExitInfo(None, "SIGTERM") if self._stopped.is_set()
                              else ExitInfo(self.outcome.exit_code, self.outcome.signal))
        return self._exit

    async def _until_stopped(self, scope: anyio.CancelScope) -> None:
        await self._stopped.wait()
        scope.cancel()

    async def terminate(self, grace: float) -> None:
        self.terminated.append(grace)
        if self._exit is None:
            self._stopped.set()
        await anyio.lowlevel.checkpoint()

    @property
    def done(self) -> bool:
        return self._exit is not None


__all__ = ["FakeExecutor", "FakeHandle", "FakeOutcome"]
