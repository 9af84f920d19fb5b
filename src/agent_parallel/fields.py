"""Fields the answer models share: ones left out of an answer while they say nothing.

Answers used to carry every optional field, most of them as nulls: half of a ``launch_task``
answer, most of each item of a finished run's report (130 KB for 300 items), three of a plan row's
sixteen. An agent reads them all, and its client checks each against the output schema, for
nothing. A field TOOLS.md lists for an answer stays in it, null or not (``exit_code`` while a task
runs); the others are left out until they hold something. Output schemas do not change: such a
field was never required.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field


def _is_none(value: object) -> bool:
    return value is None


def _is_empty(value: object) -> bool:
    return not value


def omitted_if_none(description: str | None = None) -> Any:
    """An optional field (default None) left out of dumps while it is None."""
    return Field(None, description=description, exclude_if=_is_none)


def omitted_if_empty(description: str | None = None) -> Any:
    """A list field (default empty) left out of dumps while it is empty."""
    return Field(default_factory=list, description=description, exclude_if=_is_empty)
