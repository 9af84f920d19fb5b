"""A stand-in for Anthropic's Messages API, so the real Claude Code CLI can run a turn here (no model
is reachable): its first answer calls one tool with given arguments, every later one ends the turn.
Every request Claude Code sends is kept, so a test reads what the model would have been shown,
e.g. a tool's result as Claude Code passed it on (whole, or saved to a file with a preview)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeModel:
    tool: str
    """The tool the model calls in its first answer (as Claude Code names it: mcp__<server>__<tool>)."""
    arguments: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)

    def tool_results(self) -> list[str]:
        """The text of every tool result Claude Code sent back to the model, in order."""
        found = []
        for request in self.requests:
            for message in request.get("messages", [])[-1:]:
                content = message.get("content")
                for block in content if isinstance(content, list) else []:
                    if block.get("type") == "tool_result":
                        inner = block.get("content")
                        found.append(inner if isinstance(inner, str)
                                     else "".join(part.get("text", "") for part in inner or []))
        return found

    def answer(self, request: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The server-sent events of one streamed answer."""
        answered = any(block.get("type") == "tool_result" for message in request.get("messages", [])
                       for block in (message.get("content") if isinstance(message.get("content"), list) else []))
        offered = {tool.get("name") for tool in request.get("tools", [])}
        message = {"id": f"msg_{len(self.requests)}", "type": "message", "role": "assistant",
                   "model": request.get("model"), "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 10, "output_tokens": 1}}
        if not answered and self.tool in offered:
            block = {"type": "tool_use", "id": "toolu_01", "name": self.tool, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(self.arguments)}
            stop = "tool_use"
        else:
            block, delta, stop = {"type": "text", "text": ""}, {"type": "text_delta", "text": "done"}, "end_turn"
        return [("message_start", {"type": "message_start", "message": message}),
                ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                   "usage": {"output_tokens": 5}}),
                ("message_stop", {"type": "message_stop"})]


@contextmanager
def fake_messages_api(tool: str, arguments: dict[str, Any]) -> Iterator[tuple[str, FakeModel]]:
    """Serve the fake API on a free local port: yields its base URL (for ANTHROPIC_BASE_URL) and the model."""
    model = FakeModel(tool, arguments)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
            if not self.path.startswith("/v1/messages") or "count_tokens" in self.path or not body.get("stream"):
                self._send("application/json", json.dumps({"input_tokens": 10}).encode())
                return
            model.requests.append(body)
            events = b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                              for name, data in model.answer(body))
            self._send("text/event-stream", events)

        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

        def _send(self, content_type: str, payload: bytes) -> None:
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", model
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
