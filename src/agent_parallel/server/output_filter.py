"""``task_output``'s ``filter``: a regular expression that cannot stall the server.

Why not ``re``: a catastrophic pattern (``(a+)+$`` on a 29-character line) ran for 27 s holding
the GIL, so even a worker thread froze every other call, and nothing can interrupt it. The
``regex`` package releases the GIL while it matches ``str`` and takes a ``timeout`` per search,
so each search is bounded and a call's searches share one budget. Its compiler unrolls counted
repeats (``((a{1000}){1000}){1000}`` would need gigabytes), so those are bounded before compiling.
A line is matched on its first ``MAX_MATCHED_LINE`` bytes (1 MiB; ``tasks/logs.py``): reading a log
never holds a whole line of unbounded length.
"""

from __future__ import annotations

import re
import time

import regex

from ..errors import UsageError

FILTER_BUDGET_S = 2.0
"""Matching time one call may spend on its filter, over every line of every task it reads."""
MAX_FILTER_CHARS = 1000
MAX_REPEAT_PRODUCT = 10_000
"""Counted repeats (``{m,n}``) multiplied together: what the compiler may unroll."""

_COUNTED = re.compile(r"\{(\d*)(?:,(\d*))?\}")


class OutputFilter:
    """A compiled filter whose searches together take at most ``budget_s`` seconds.

    ``search`` raises ``UsageError`` once the budget is spent; one instance serves one call
    (it may be used from a worker thread, never from two at once).
    """

    def __init__(self, expr: str, budget_s: float = FILTER_BUDGET_S) -> None:
        self.expr = expr
        self._left = budget_s
        self._budget = budget_s
        if len(expr) > MAX_FILTER_CHARS:
            raise UsageError(f"filter is {len(expr)} characters long; at most {MAX_FILTER_CHARS} are accepted: "
                             "use a shorter regular expression")
        product = 1
        for low, high in _COUNTED.findall(expr):
            product *= max(1, int(high or 0), int(low or 0))
            if product > MAX_REPEAT_PRODUCT:
                raise UsageError(f"filter {_shown(expr)} has counted repeats ({{m,n}}) that multiply to more than "
                                 f"{MAX_REPEAT_PRODUCT:,}; use + or * instead of large counts")
        try:
            self._pattern = regex.compile(expr)
        except (regex.error, OverflowError, ValueError) as exc:
            raise UsageError(f"filter {_shown(expr)} is not a valid regular expression: {exc}") from None

    def search(self, text: str) -> bool:
        """Whether ``text`` contains a match (``re.Pattern.search`` in a boolean context)."""
        if self._left <= 0:
            raise self._too_long()
        start = time.monotonic()
        try:
            return self._pattern.search(text, timeout=self._left) is not None
        except TimeoutError:
            self._left = 0
            raise self._too_long() from None
        finally:
            self._left -= time.monotonic() - start

    def _too_long(self) -> UsageError:
        return UsageError(f"filter {_shown(self.expr)} took too long: matching stopped after {self._budget:g} s "
                          "(nested repeats such as (a|aa)+ or (a+)+ can take exponential time); simplify it, "
                          "e.g. a plain word or a pattern without nested repeats")


def _shown(expr: str) -> str:
    return repr(expr if len(expr) <= 80 else expr[:80] + "...")
