"""The ``agent-parallel`` command: ``serve`` the MCP server, ``plan`` the queue.

Argument parsing and printing only; the work is done by the server, the planner and the runner.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from . import __version__
from .errors import AgentParallelError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="agent-parallel: %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AgentParallelError as exc:
        print(f"agent-parallel: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"agent-parallel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    serve.add_argument("--root", type=Path, default=Path("."), help="workspace root (default: the working directory)")
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP only: address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP only: port (default 8765)")
    serve.add_argument("--wait-cap", type=float, default=None, metavar="SECONDS",
                       help="longest a blocking task_output may wait (default 50)")
    serve.set_defaults(func=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .server import ServerSettings, build_server

    settings = ServerSettings()
    if args.wait_cap is not None:
        settings.wait_cap_s = args.wait_cap
    if args.transport == "http" and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise AgentParallelError(
            f"refusing to serve HTTP on {args.host}: only loopback addresses are allowed in this version "
            "(use --host 127.0.0.1 and an SSH tunnel or a reverse proxy)")
    server = build_server(args.root, settings, handle_signals=True)

    async def run() -> None:
        if args.transport == "stdio":
            await server.run_stdio_async()
        else:
            await server.run_streamable_http_async(host=args.host, port=args.port, streamable_http_path="/mcp")

    anyio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
