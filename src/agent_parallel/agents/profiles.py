"""The headless command line of each agent CLI (``runner.agent``), for a first run and for a resume.

Item text never reaches an argv: a first run reads the item's markdown on stdin (as
``runner.command`` does); a resume sends the fixed ``RESUME_PROMPT`` (no item text) to the same
session. ``runner.args`` (model, permission mode, allowed tools, max turns ...) go after the
profile's own flags; ``runner.command``, when also set, names the program (``["/opt/bin/claude"]``).

Flags checked against (August 2026):

- Claude Code 2.1.197 (``claude --help``; a test runs the installed CLI on these argvs): ``-p``
  (``--print``) reads the prompt from stdin when none is given; ``--output-format stream-json``
  needs ``--verbose`` with ``-p``; ``-r``/``--resume <session id>``. The prompt of a resume is put
  right after ``-p`` so that a variadic option in ``runner.args`` (``--allowedTools A B``) cannot
  swallow it.
- Codex (codex-rs/exec/src/cli.rs, commit 0280533): ``codex exec --json [PROMPT]`` reads the
  prompt from stdin when it is ``-``; ``codex exec --json resume <SESSION_ID> [PROMPT]``; ``--json``
  and ``--model`` are global, so ``runner.args`` go before the subcommand.
- Gemini CLI 0.56.0-nightly (packages/cli/src/config/config.ts, docs/cli/headless.md): ``-p``
  (``--prompt``) is appended to what stdin holds; ``--output-format stream-json``;
  ``--resume <session id>`` (``-r``).
"""

from __future__ import annotations

from dataclasses import dataclass

RESUME_PROMPT = ("The usage limit that interrupted you has reset. Continue the task from exactly where you "
                 "left off; do not start over.")
GEMINI_PROMPT = "Carry out the work item given above (on standard input)."


@dataclass(frozen=True)
class Invocation:
    """One run of a CLI: its argv, and whether the item's markdown goes to its stdin."""

    argv: list[str]
    item_on_stdin: bool


def program(agent: str, command: list[str] | None) -> list[str]:
    """The program to run: ``runner.command`` when set (a path, a wrapper), else the CLI's name."""
    return list(command) if command else [agent]


def first_run(agent: str, args: tuple[str, ...] | list[str], command: list[str] | None = None) -> Invocation:
    """A new session for an item, its markdown on stdin."""
    head, extra = program(agent, command), list(args)
    if agent == "claude":
        return Invocation([*head, "-p", "--output-format", "stream-json", "--verbose", *extra], True)
    if agent == "codex":
        return Invocation([*head, "exec", "--json", *extra, "-"], True)
    if agent == "gemini":
        return Invocation([*head, "--output-format", "stream-json", *extra, "-p", GEMINI_PROMPT], True)
    raise ValueError(f"unknown agent {agent!r}")


def resume(agent: str, session_id: str, args: tuple[str, ...] | list[str],
           command: list[str] | None = None) -> Invocation:
    """The same session again (``--resume <id>`` / ``codex exec resume <id>``), told to go on."""
    head, extra = program(agent, command), list(args)
    if agent == "claude":
        return Invocation([*head, "-p", RESUME_PROMPT, "--resume", session_id, "--output-format", "stream-json",
                           "--verbose", *extra], False)
    if agent == "codex":
        return Invocation([*head, "exec", "--json", *extra, "resume", session_id, RESUME_PROMPT], False)
    if agent == "gemini":
        return Invocation([*head, "--output-format", "stream-json", "--resume", session_id, *extra,
                           "-p", RESUME_PROMPT], False)
    raise ValueError(f"unknown agent {agent!r}")


def resume_hint(agent: str, session_id: str) -> str:
    """How a person resumes the session by hand (shown when ``runner.auto_resume`` is off)."""
    if agent == "codex":
        return f"codex exec resume {session_id}"
    return f"{agent} --resume {session_id}"
