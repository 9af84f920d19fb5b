"""A stand-in for Anthropic's Messages API, so the real Claude Code CLI can run a turn here (no model
is reachable): its answers call the tools of a script, one per answer, each step's arguments made
from the results so far; once the script is done, an answer ends the turn. Every request Claude
Code sends is kept, so a test reads what the model would have been shown, e.g. a tool's result as
Claude Code passed it on (whole, or saved to a file with a preview)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


Arguments = dict[str, Any] | Callable[[list[str]], dict[str, Any]]
"""A step's arguments, or how to make them from the tool results the model has seen so far (their text)."""


@dataclass
class FakeModel:
    steps: list[tuple[str, Arguments]]
    """The tools the model calls, one per answer, in order (as Claude Code names them: mcp__<server>__<tool>)."""
    requests: list[dict[str, Any]] = field(default_factory=list)

    def tool_results(self) -> list[str]:
        """The text of every tool result Claude Code sent back to the model, in order."""
        return _tool_results(self.requests[-1]) if self.requests else []

    def answer(self, request: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The server-sent events of one streamed answer: the script's next step, or the turn's end."""
        results = _tool_results(request)
        offered = {tool.get("name") for tool in request.get("tools", [])}
        message = {"id": f"msg_{len(self.requests)}", "type": "message", "role": "assistant",
                   "model": request.get("model"), "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 10, "output_tokens": 1}}
        step = len(results)
        if step < len(self.steps) and self.steps[step][0] in offered:
            tool, arguments = self.steps[step]
            made = arguments(results) if callable(arguments) else arguments
            block = {"type": "tool_use", "id": f"toolu_{step:02d}", "name": tool, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(made)}
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


def _tool_results(request: dict[str, Any]) -> list[str]:
    """The text of the tool results in a request's messages (each request carries the whole turn)."""
    return [_text(block.get("content")) for message in request.get("messages", [])
            for block in (message.get("content") if isinstance(message.get("content"), list) else [])
            if block.get("type") == "tool_result"]


def _text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content or [])


@contextmanager
def fake_messages_api(*steps: tuple[str, Arguments]) -> Iterator[tuple[str, FakeModel]]:
    """Serve the fake API on a free local port: yields its base URL (for ANTHROPIC_BASE_URL) and the model."""
    model = FakeModel(list(steps))

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
