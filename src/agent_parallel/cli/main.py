"""The ``agent-parallel`` command: ``serve`` the MCP server; ``plan``, ``run``, ``demo``, ``report``,
``status`` and ``worktrees`` for the work queue from a terminal.

Argument parsing and printing only; the work is done by the server, the queue and the task registry.
Text from a queue, a task or git is printed through `visible` (rich cells through `render.shown`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import AgentParallelError, UsageError
from ..text import visible

# Everything else is imported where used: `agent-parallel plan` loads the queue and pydantic,
# not the MCP SDK, anyio or (for json, mermaid and dot) rich.
if TYPE_CHECKING:
    from mcp.server.transport_security import TransportSecuritySettings
    from rich.text import Text


class _VisibleFormatter(logging.Formatter):
    """Log lines quote file names and titles too."""

    def format(self, record: logging.LogRecord) -> str:
        return visible(super().format(record))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_VisibleFormatter("agent-parallel: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        code: int = args.func(args)
        return code
    except AgentParallelError as exc:
        print(f"agent-parallel: error: {visible(str(exc))}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # raised inside a task group (`run`'s registry): shown like any other
        ours, rest = group.split(AgentParallelError)
        if ours is None or rest is not None:
            raise
        for error in _leaves(ours):
            print(f"agent-parallel: error: {visible(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions a (nested) group holds."""
    return [leaf for exc in group.exceptions
            for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-parallel", description=(
        "Background tasks and a dependency-aware parallel work queue for MCP coding agents."))
    parser.add_argument("--version", action="version", version=f"agent-parallel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    serve.add_argument("--root", type=Path, default=Path("."), help="workspace root (default: the working directory)")
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP only: address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP only: port (default 8765)")
    serve.add_argument("--wait-cap", type=_wait_cap, default=None, metavar="SECONDS",
                       help="longest a blocking task_output may wait (default 50, at most 3600)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="HTTP only: allow --host to be a non-loopback address; requires a bearer token in "
                            f"${TOKEN_ENV} (clients send 'Authorization: Bearer TOKEN')")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                       help="with --allow-remote: another Host header value clients use (repeatable)")
    _executor_options(serve)
    serve.set_defaults(func=_serve)

    plan = sub.add_parser("plan", help="show the queue's plan: what can run now, in what order")
    plan.add_argument("--root", type=Path, default=Path("."), help="workspace root (default: the working directory)")
    plan.add_argument("--format", choices=["table", "json", "mermaid", "dot"], default="table")
    plan.add_argument("--queue-dir", default=None, help="queue directory inside the root (default .agent/queue)")
    plan.add_argument("--max-parallel", type=int, default=None)
    plan.add_argument("--all", action="store_true", dest="every_row",
                      help="table: list every item, wave, pattern, conflict and diagnostic (by default the first 100 "
                           "items needing attention or able to run, and 20 waves; slow for thousands of items)")
    plan.set_defaults(func=_plan)

    run = sub.add_parser("run", help="run the queue with live progress; exit code 1 if an item failed")
    run.add_argument("--root", type=Path, default=Path("."), help="workspace root (default: the working directory)")
    run.add_argument("--level", choices=["L1", "L2", "L3"], default=None, help="autonomy level (default from config)")
    run.add_argument("--max-parallel", type=int, default=None)
    run.add_argument("--continue-on-error", action=argparse.BooleanOptionalAction, default=None,
                     help="L3 only: keep going past failures")
    run.add_argument("--items", nargs="+", default=None, metavar="ID", help="only these items and what they need")
    _executor_options(run)
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="copy the example queue to a temporary workspace, plan it and run it")
    demo.add_argument("--root", type=Path, default=None,
                      help="copy this workspace's .agent/ instead (default: the example installed with agent-parallel)")
    demo.set_defaults(func=_demo)

    report = sub.add_parser("report", help="show a finished run's report (or its Gantt chart)")
    report.add_argument("run_id")
    report.add_argument("--root", type=Path, default=Path("."), help="workspace root (default: the working directory)")
    report.add_argument("--gantt", action="store_true", help="print a Mermaid Gantt chart of what ran when")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(func=_report)

    status = sub.add_parser("status", help="list recent tasks and runs of the workspace")
    status.add_argument("--root", type=Path, default=Path("."), help="workspace root (default: the working directory)")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(func=_status)

    from .worktrees import add_parser as add_worktrees_parser
    add_worktrees_parser(sub)
    return parser


def _executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="where tasks run: this machine (local, the default) or a Ray cluster (ray; needs "
                             "agent-parallel[ray]); default from .agent/config.yaml's `executor`")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="with --executor ray: join this cluster (default: start a local Ray instance)")


def _executor_overrides(args: argparse.Namespace) -> dict[str, object]:
    """``--executor`` / ``--ray-address`` as settings; Ray missing is refused here, before anything starts."""
    overrides: dict[str, object] = {}
    if args.executor is not None:
        overrides["executor"] = args.executor
    if args.ray_address is not None:
        overrides["ray_address"] = args.ray_address
        overrides.setdefault("executor", "ray")
    return overrides


def _check_executor(executor: str) -> None:
    if executor == "ray":
        from ..tasks.ray_executor import require_ray

        require_ray()


def _wait_cap(text: str) -> float:
    """``--wait-cap``: refused here, before the server starts, unless a finite number in (0, 3600]."""
    from ..server.settings import check_wait_cap

    try:
        return check_wait_cap(float(text))
    except (ValueError, UsageError) as exc:
        detail = str(exc) if isinstance(exc, UsageError) else f"the wait cap must be a number of seconds, not {text!r}"
        raise argparse.ArgumentTypeError(detail) from None


def _plan(args: argparse.Namespace) -> int:
    from ..queue.plan import plan_workspace
    from ..queue.items import QueueReader

    plan = plan_workspace(args.root.resolve(), args.queue_dir, args.max_parallel, QueueReader(watch=False))  # changes no file
    if args.format == "json":
        print(plan.model_dump_json(indent=2))
    elif args.format == "mermaid":
        print(visible(plan.mermaid), end="")
    elif args.format == "dot":
        from ..queue.diagrams import to_dot

        print(visible(to_dot(plan), in_dot=True), end="")
    else:
        from rich.console import Console

        from .render import plan_table

        Console().print(plan_table(plan, every_row=args.every_row))
    return 1 if plan.errors else 0


def _run(args: argparse.Namespace) -> int:
    import anyio
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from ..config import load_config
    from ..paths import runs_dir
    from ..queue.items import QueueReader
    from ..queue.run import QueueContext, run_of, start_run
    from .render import progress_view, report_view, shown
    from ..tasks.executor import LocalExecutor
    from ..tasks.records import TaskStatus
    from ..tasks.registry import open_registry
    from ..server import ServerSettings

    root = args.root.resolve()
    config, config_warnings = load_config(root)
    console = Console(stderr=False)
    for warning in config_warnings:
        console.print(_warning(warning))

    overrides = _executor_overrides(args)
    if args.max_parallel is not None:
        overrides["ray_slots"] = args.max_parallel
    server_settings = ServerSettings.from_config(config, **overrides)
    _check_executor(server_settings.executor)

    async def main() -> TaskStatus:
        settings = server_settings.registry_settings()
        executor = server_settings.make_executor()
        async with open_registry(root, runs_dir(root), settings, executor) as registry:
            if isinstance(registry.executor, LocalExecutor):  # started before the run: its first items neither wait for it nor share the CPU with its start-up
                await anyio.to_thread.run_sync(registry.executor.start_guard)
            ctx = QueueContext(root, registry.runs_dir, config, registry, QueueReader())
            # start_run first moves claims of servers that no longer run to blocked (planning moves no
            # file) and says so in its warnings
            task, warnings = await start_run(ctx, max_parallel=args.max_parallel, level=args.level,
                                             continue_on_error=args.continue_on_error, items=args.items)
            for warning in warnings:
                console.print(_warning(warning))
            run = run_of(task)
            assert run is not None
            async with anyio.create_task_group() as tg:
                async def cancel_on_interrupt() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            console.print(Text("interrupted: stopping the run", style="red"))
                            how = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
                            await registry.cancel(task, f"stopped by {how} in the terminal that ran it")
                            return

                tg.start_soon(cancel_on_interrupt)
                # Drawn from here 4 times a second, not by rich's refresh thread (a thread waking to take
                # the GIL from the run), and only on a terminal: nothing is shown elsewhere (transient).
                live_view = console.is_terminal
                with Live(progress_view(run.progress()) if live_view else Text(""), console=console,
                          auto_refresh=False, transient=True) as live:
                    while not task.done.is_set():
                        with anyio.move_on_after(0.25):  # no rebuild per change: a run of 300 trivial items has 600
                            await task.done.wait()
                        if live_view:
                            live.update(progress_view(run.progress()), refresh=True)
                tg.cancel_scope.cancel()
            console.print(report_view(run.progress(), fold=True))
            console.print(shown(f"Gantt chart: agent-parallel report {task.record.task_id} --root {root} --gantt",
                                style="dim"))
            return task.record.status

    freeze_startup_objects()
    status = anyio.run(main)
    return 0 if status == "completed" else 1


def _warning(text: str) -> Text:
    """``warning: TEXT`` for rich, TEXT printed as text (a title like ``Fix [/x]`` is not markup)."""
    from rich.text import Text

    from .render import shown

    return Text.assemble(("warning:", "yellow"), " ", shown(text))


EXAMPLE_IN_PACKAGE = "example"
"""Where a wheel carries the repository's example ``.agent/`` (its queue/ and config.yaml) inside the
package: pyproject.toml's ``force-include`` puts it there, so the demo works wherever it was installed."""


def example_agent_dir() -> Path | None:
    """The example ``.agent/`` the demo copies: the one a wheel installed inside the package, or, for an
    editable install (``pip install -e .``, which runs the package from ``src/``), the checkout's own."""
    from ..paths import AGENT_DIR

    package = Path(__file__).resolve().parent.parent
    for candidate in (package / EXAMPLE_IN_PACKAGE, package.parent.parent / AGENT_DIR):
        if (candidate / "queue").is_dir():
            return candidate
    return None


def _demo(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from ..paths import AGENT_DIR, CONFIG_FILE, QUEUE_DIR

    if args.root is not None:
        source = args.root.resolve() / AGENT_DIR
        if not (source / "queue").is_dir():
            raise AgentParallelError(f"no queue at {source / 'queue'}; pass --root with a workspace that has "
                                     f"{QUEUE_DIR}/, or leave --root out to run the example installed with "
                                     "agent-parallel")
    else:
        found = example_agent_dir()
        if found is None:
            raise AgentParallelError("the example queue is not installed with this copy of agent-parallel (a wheel "
                                     f"carries it as agent_parallel/{EXAMPLE_IN_PACKAGE}/); pass --root with a "
                                     f"workspace that has {QUEUE_DIR}/")
        source = found
    workspace = Path(tempfile.mkdtemp(prefix="agent-parallel-demo-"))
    shutil.copytree(source / "queue", workspace / QUEUE_DIR)
    if (source / "config.yaml").is_file():
        shutil.copy(source / "config.yaml", workspace / CONFIG_FILE)
    print(visible(f"demo workspace: {workspace} (a copy of {source})\n"))
    _plan(argparse.Namespace(root=workspace, queue_dir=None, max_parallel=None, format="table", every_row=False))
    code = _run(argparse.Namespace(root=workspace, level=None, max_parallel=None, continue_on_error=None, items=None,
                                   executor=None, ray_address=None))
    print(visible(f"\nthe queue files now carry their final status: ls {workspace / QUEUE_DIR}"))
    return code


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..paths import RUNS_DIR
    from ..queue.run import load_report
    from ..queue.diagrams import gantt
    from .render import report_view

    progress = load_report(args.root.resolve() / RUNS_DIR, args.run_id)
    if progress is None:
        raise AgentParallelError(f"no finished run {args.run_id!r} in {args.root.resolve() / RUNS_DIR}; "
                                 "`agent-parallel status` lists runs (kind 'run')")
    if args.gantt:
        print(visible(gantt(progress)), end="")
    elif args.json:
        print(progress.model_dump_json(indent=2))
    else:
        Console().print(report_view(progress))
    return 0


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..paths import RUNS_DIR
    from .render import status_view
    from ..tasks.records import load_records

    records = sorted(load_records(args.root.resolve() / RUNS_DIR, journaled=True), key=lambda r: r.created_at,
                     reverse=True)
    Console().print(status_view(records[: args.limit]))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import anyio

    security, token, public_url = None, None, None
    if args.transport == "http":  # refused, if it is, before a second goes into loading the server
        security, token, public_url = _http_security(args)

    from ..server import ServerSettings, build_server

    overrides = {} if args.wait_cap is None else {"wait_cap_s": args.wait_cap}
    overrides |= _executor_overrides(args)
    settings = ServerSettings.for_workspace(args.root.resolve(), **overrides)
    _check_executor(settings.executor)
    server = build_server(args.root, settings, handle_signals=True, bearer_token=token, public_url=public_url,
                          start_guard=True)

    async def run() -> None:
        if args.transport == "stdio":
            await server.run_stdio_async()
        else:
            await server.run_streamable_http_async(host=args.host, port=args.port, streamable_http_path="/mcp",
                                                   transport_security=security)

    freeze_startup_objects()
    anyio.run(run)
    return 0


def freeze_startup_objects() -> None:
    """Move what start-up built (modules, the SDK's models and schemas) out of the garbage collector's
    reach (``gc.freeze``): it lives as long as the process, and a full collection walking it took
    55-75 ms with the MCP stack loaded, about once per few hundred tasks."""
    import gc

    gc.freeze()


LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "AGENT_PARALLEL_TOKEN"


def _http_security(args: argparse.Namespace) -> tuple[TransportSecuritySettings | None, str | None, str]:
    """(transport security, bearer token, public URL). Loopback: the SDK's automatic Host/Origin checks.
    Elsewhere: explicit opt-in, a token, our hosts only."""
    import os

    if args.host in LOOPBACK:
        return None, os.environ.get(TOKEN_ENV) or None, f"http://{args.host}:{args.port}"
    if not args.allow_remote:
        raise AgentParallelError(
            f"refusing to serve HTTP on {args.host}: only loopback addresses are served by default; pass "
            f"--allow-remote (and set a bearer token in ${TOKEN_ENV}) to accept connections from other machines")
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        raise AgentParallelError(
            f"refusing to serve HTTP on {args.host} without a bearer token: set ${TOKEN_ENV} to a secret of at "
            "least 16 characters (e.g. `export AGENT_PARALLEL_TOKEN=$(openssl rand -hex 24)`)")
    from mcp.server.transport_security import TransportSecuritySettings

    hosts = [f"{args.host}:{args.port}", *args.allowed_host]
    security = TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=[])
    return security, token, f"http://{hosts[0]}"


if __name__ == "__main__":
    sys.exit(main())
