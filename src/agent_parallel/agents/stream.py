"""Reading an agent CLI's event stream as it arrives: session, turns, tokens, cost, result, error class.

``StreamParser(agent).feed(bytes)`` takes the log's bytes in whatever pieces they arrive (a line may
be split anywhere, even inside a UTF-8 character); ``snapshot()`` says what is known so far and
``finish(exit_code)`` the attempt's outcome. Memory stays bounded whatever the stream holds: one
partial line of at most ``MAX_LINE`` bytes is kept (a longer line is skipped to its end, counted in
``skipped_lines``), and the result text is cut to ``MAX_RESULT_CHARS``. Lines that are not JSON
objects (a CLI's warnings, our attempt headers, a line cut by a crash) are counted and ignored. A
gap in the log (bytes dropped at the log cap) is ``gap()``: the line it cut is dropped.

Event formats, checked against (August 2026):

- Claude Code 2.1.197 (``claude -p --output-format stream-json --verbose``, run here) and the Claude
  Agent SDK for Python 0.2.143 (``types.py``, ``_internal/message_parser.py``): ``system``/``init``
  (``session_id``), ``assistant`` (``message.id``, ``message.usage``, ``error``: one of
  ``authentication_failed | billing_error | rate_limit | invalid_request | server_error | unknown``),
  ``rate_limit_event`` (``rate_limit_info.status``: ``allowed | allowed_warning | rejected``,
  ``resetsAt``: Unix seconds), ``result`` (``subtype``: ``success | error_max_turns |
  error_during_execution | ...``, ``is_error``, ``num_turns``, ``total_cost_usd``, ``usage``,
  ``result``, ``api_error_status``, ``errors``).
- Codex ``codex exec --json`` (codex-rs/exec ``exec_events.rs`` as typed by the TypeScript SDK's
  ``sdk/typescript/src/events.ts``, commit 08a1f30): ``thread.started`` (``thread_id``),
  ``turn.started``, ``turn.completed`` (``usage``: ``input_tokens``, ``cached_input_tokens``,
  ``output_tokens``), ``turn.failed`` (``error.message``), ``item.completed`` (``item.type``
  ``agent_message`` with ``text``), ``error`` (``message``). Codex reports no cost.
- Gemini CLI 0.56.0-nightly (``packages/core/src/output/types.ts``, ``docs/cli/headless.md``):
  ``init`` (``session_id``), ``message`` (``role``, ``content``, ``delta``), ``tool_use``,
  ``tool_result``, ``error`` (``severity``, ``message``), ``result`` (``status``, ``error``,
  ``stats``: ``input_tokens``, ``output_tokens``, ``cached``, ``input``); exit code 53 means the
  turn limit, 41 an authentication failure. Gemini reports no cost.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from ..results import AgentError, AgentUsage, iso

MAX_LINE = 4 << 20
"""The longest event line parsed (a tool result can hold a whole file); longer lines are skipped."""
MAX_RESULT_CHARS = 4000
_SKIPPED_TYPES = tuple(f'"type":{space}"{kind}"'.encode() for space in ("", " ")
                       for kind in ("user", "stream_event", "item.started", "item.updated"))
"""A line whose head names one of these event types carries nothing we read and is not parsed at all
(Claude's ``user`` lines hold tool results: most of a stream's bytes)."""


def classify(text: str, status: object = None) -> AgentError:
    """The error class of a CLI's error message (and HTTP status, when it gives one)."""
    t = text.lower()
    if status == 429 or any(w in t for w in ("rate limit", "rate_limit", "usage limit", "too many requests",
                                             "hit your limit", "quota", " 429")):
        return "rate_limited"
    if status in (500, 502, 503, 529) or any(w in t for w in ("overloaded", " 529", " 503", "server_error",
                                                                "temporarily unavailable")):
        return "overloaded"
    if status in (401, 403) or any(w in t for w in ("not logged in", "unauthorized", "authentication",
                                                    "api key", "/login", "billing", "401")):
        return "auth"
    if any(w in t for w in ("max turns", "max_turns", "maximum number of turns", "turn limit")):
        return "max_turns"
    return "other"


_EPOCH = re.compile(r"\|\s*([0-9]{10})\b")  # Claude Code: "Claude AI usage limit reached|1756828800"
_IN = re.compile(r"(?:try again|retry|resets?)\s+(?:in|after)\s+((?:[0-9]+(?:\.[0-9]+)?\s*[a-z]+[\s,]*(?:and\s+)?)+)",
                 re.IGNORECASE)
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)", re.IGNORECASE)
_UNIT = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60,
         "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
         "d": 86400, "day": 86400, "days": 86400}


def reset_time(text: str, now: float | None = None) -> float | None:
    """When a rate limit resets, from a message's text (``...|<unix seconds>``, ``try again in 2h 5m``)."""
    now = time.time() if now is None else now
    if match := _EPOCH.search(text):
        at = float(match.group(1))
        return at if now - 86400 < at < now + 8 * 86400 else None
    if match := _IN.search(text):
        seconds = sum(float(n) * _UNIT.get(u.lower(), 0) for n, u in _PART.findall(match.group(1)))
        return now + seconds if 0 < seconds < 8 * 86400 else None
    return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class StreamParser:
    """One attempt's stream of one CLI, parsed incrementally (see the module docstring)."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self._partial = bytearray()
        self._skipping = False  # inside a line longer than MAX_LINE (or cut by a gap): drop to its end
        self.garbage_lines = 0
        self.skipped_lines = 0
        self.session_id: str | None = None
        self.turns = 0
        self.input_tokens = self.output_tokens = self.cached_tokens = 0
        self.cost_usd: float | None = None
        self.result: str | None = None
        self.error: AgentError | None = None
        self.error_message: str | None = None
        self.resets_at: float | None = None
        self._final = False  # a final report (Claude's result, Gemini's stats) replaced the running sums
        self._message_id: str | None = None  # Claude: the assistant message whose usage is counted last
        self._message_usage = (0, 0, 0)
        self._last_role: str | None = None  # Gemini: a new assistant message after anything else is a turn
        self._handlers = {"claude": self._claude, "codex": self._codex, "gemini": self._gemini}
        self._handle = self._handlers.get(agent, self._claude)

    # -- bytes to lines
    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                rest = len(data) - start
                if self._skipping or not rest:
                    return
                if len(self._partial) + rest > MAX_LINE:
                    self._partial.clear()
                    self._skipping = True
                    self.skipped_lines += 1
                else:
                    self._partial += data[start:]
                return
            if self._skipping:
                self._skipping = False
            elif self._partial:
                if len(self._partial) + end - start > MAX_LINE:
                    self.skipped_lines += 1
                else:
                    self._partial += data[start:end]
                    self._line(bytes(self._partial))
                self._partial.clear()
            elif not self._skip(data, start):  # most bytes are in lines we skip: never copied
                self._line(data[start:end])
            start = end + 1

    def gap(self) -> None:
        """Bytes were dropped here (the log cap): the line they cut cannot be read."""
        self._partial.clear()
        self._skipping = True

    @staticmethod
    def _skip(data: bytes, start: int) -> bool:
        """Whether the line at ``start`` is an event that carries nothing we read (by its head)."""
        head = data[start:start + 40]
        return head.startswith(b'{"type"') and any(t in head for t in _SKIPPED_TYPES)

    def _line(self, line: bytes) -> None:
        if self._skip(line, 0):
            return
        line = line.strip()
        if not line.startswith(b"{"):
            if line:
                self.garbage_lines += 1
            return
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):  # also a line cut in the middle of a character, or nested past Python's limit
            self.garbage_lines += 1
            return
        if isinstance(event, dict):
            try:
                self._handle(event)
            except (TypeError, ValueError, AttributeError):  # a field of an unexpected shape: ignore the event
                self.garbage_lines += 1

    # -- events
    def _fail(self, kind: AgentError, message: str, resets_at: float | None = None) -> None:
        self.error, self.error_message = kind, message[:500]
        if kind == "rate_limited":
            self.resets_at = resets_at or reset_time(message) or self.resets_at

    def _claude(self, e: dict[str, Any]) -> None:
        kind = e.get("type")
        if isinstance(e.get("session_id"), str):
            self.session_id = e["session_id"]
        if kind == "assistant":
            message = e.get("message") or {}
            usage = message.get("usage") or {}
            counted = (_int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens")),
                       _int(usage.get("output_tokens")), _int(usage.get("cache_read_input_tokens")))
            if not self._final:
                if message.get("id") != self._message_id:  # a new message: a new turn, its usage added
                    self._message_id = message.get("id")
                    self.turns += 1
                    self._message_usage = (0, 0, 0)
                before = self._message_usage  # the same message again (one line per content block): replace
                self.input_tokens += counted[0] - before[0]
                self.output_tokens += counted[1] - before[1]
                self.cached_tokens += counted[2] - before[2]
                self._message_usage = counted
            if isinstance(e.get("error"), str):
                text = " ".join(b.get("text", "") for b in message.get("content") or [] if isinstance(b, dict))
                error = {"rate_limit": "rate_limited", "authentication_failed": "auth", "billing_error": "auth",
                         "server_error": "overloaded"}.get(e["error"], "other")
                self._fail(error, text or e["error"])  # type: ignore[arg-type]
        elif kind == "rate_limit_event":
            info = e.get("rate_limit_info") or {}
            if info.get("status") == "rejected":
                resets = info.get("resetsAt")
                self._fail("rate_limited", f"{info.get('rateLimitType') or 'usage'} limit reached",
                           float(resets) if isinstance(resets, (int, float)) and not isinstance(resets, bool) else None)
        elif kind == "result":
            self._final = True
            usage = e.get("usage") or {}
            self.input_tokens = _int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens"))
            self.output_tokens = _int(usage.get("output_tokens"))
            self.cached_tokens = _int(usage.get("cache_read_input_tokens"))
            self.turns = _int(e.get("num_turns")) or self.turns
            cost = e.get("total_cost_usd")
            if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
                self.cost_usd = float(cost)
            final = e.get("result")
            if isinstance(final, str):
                self.result = final[-MAX_RESULT_CHARS:]
            if e.get("is_error") or str(e.get("subtype", "")).startswith("error"):
                errors = e.get("errors")
                said: str = final if isinstance(final, str) and final else \
                    "; ".join(str(x) for x in errors) if isinstance(errors, list) else str(e.get("subtype"))
                if e.get("subtype") == "error_max_turns":
                    self._fail("max_turns", said or "the maximum number of turns was reached")
                elif self.error is None or self.error == "other":
                    self._fail(classify(said, e.get("api_error_status")), said)
                elif self.error == "rate_limited":
                    self.resets_at = self.resets_at or reset_time(said)
            elif not e.get("is_error"):
                self.error = self.error_message = None  # an error the CLI recovered from
                self.resets_at = None

    def _codex(self, e: dict[str, Any]) -> None:
        kind = e.get("type")
        if kind == "thread.started" and isinstance(e.get("thread_id"), str):
            self.session_id = e["thread_id"]
        elif kind == "turn.started":
            self.turns += 1
        elif kind == "turn.completed":
            usage = e.get("usage") or {}
            cached = _int(usage.get("cached_input_tokens"))
            self.input_tokens += max(_int(usage.get("input_tokens")) - cached, 0)  # input_tokens includes them
            self.cached_tokens += cached
            self.output_tokens += _int(usage.get("output_tokens"))
            self.error = self.error_message = None
            self.resets_at = None
        elif kind == "turn.failed":
            message = str((e.get("error") or {}).get("message", "the turn failed"))
            self._fail(classify(message), message)
        elif kind == "error":
            message = str(e.get("message", "error"))
            self._fail(classify(message), message)
        elif kind == "item.completed":
            item = e.get("item") or {}
            if item.get("type") == "agent_message" and isinstance(item.get("text"), str):
                self.result = item["text"][-MAX_RESULT_CHARS:]

    def _gemini(self, e: dict[str, Any]) -> None:
        kind = e.get("type")
        if kind == "init" and isinstance(e.get("session_id"), str):
            self.session_id = e["session_id"]
        elif kind == "message":
            role = e.get("role")
            if role == "assistant" and isinstance(e.get("content"), str):
                if self._last_role != "assistant":
                    self.turns += 1
                    self.result = ""
                self.result = ((self.result or "") + e["content"])[-MAX_RESULT_CHARS:]
            self._last_role = role if isinstance(role, str) else None
        elif kind in ("tool_use", "tool_result"):
            self._last_role = kind
        elif kind == "error" and e.get("severity") == "error":
            message = str(e.get("message", "error"))
            self._fail(classify(message), message)
        elif kind == "result":
            stats = e.get("stats") or {}
            if stats:
                self._final = True
                self.cached_tokens = _int(stats.get("cached"))
                self.input_tokens = _int(stats.get("input")) or max(_int(stats.get("input_tokens")) - self.cached_tokens, 0)
                self.output_tokens = _int(stats.get("output_tokens"))
            if e.get("status") == "error":
                error = e.get("error") or {}
                message = str(error.get("message") or error.get("type") or "error")
                self._fail(classify(f"{error.get('type', '')} {message}"), message)
            else:
                self.error = self.error_message = None
                self.resets_at = None

    # -- what is known
    def snapshot(self) -> AgentUsage:
        return AgentUsage(agent=self.agent, session_id=self.session_id, turns=self.turns,
                          input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                          cached_tokens=self.cached_tokens, cost_usd=self.cost_usd, result=self.result,
                          error=self.error, error_message=self.error_message, resets_at=iso(self.resets_at))

    def finish(self, exit_code: int | None) -> AgentUsage:
        """The attempt's outcome once its process exited: a last line without a newline is read, and an
        exit that says more than the stream (Gemini's 53 and 41, a failure with no error event) counts."""
        if self._partial and not self._skipping:
            self._line(bytes(self._partial))
        self._partial.clear()
        if exit_code != 0 and self.error is None:
            if self.agent == "gemini" and exit_code in (53, 41):
                self._fail("max_turns" if exit_code == 53 else "auth", f"gemini exited with code {exit_code}")
            else:
                self._fail("other", f"exit code {exit_code}" if exit_code is not None else "killed by a signal")
        return self.snapshot()
