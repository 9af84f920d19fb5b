#!/usr/bin/env python
"""The SDK's own floor: an MCPServer over stdio with one tool that does nothing.

``bench_all.py`` calls its ``noop`` tool interleaved with our ``launch_task`` from the same client,
so the ratio of the two round trips says what our tool adds to what any MCP tool costs. The tool
returns a small structured result, as ``launch_task`` does (the client validates both against
their output schemas).
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel

server = MCPServer("noop")


class Done(BaseModel):
    ok: bool


@server.tool()
def noop() -> Done:
    """Do nothing."""
    return Done(ok=True)


if __name__ == "__main__":
    server.run()
