"""Which queue items must not run at the same time, because they touch the same files or components.

A conflict is a mutual exclusion, not an ordering. Two `files` entries overlap when a file could be
matched by both:

* a plain path stands for itself and, if it is a directory, everything under it (``src`` overlaps
  ``src/api/x.py``; ``src`` does not overlap ``src2``);
* a glob uses `fnmatch` rules, so ``*`` and ``?`` also match ``/`` (``src/*`` overlaps
  ``src/a/b.py``), and ``**/`` is read as ``*`` so ``src/**/*.py`` also covers ``src/a.py``;
* two globs overlap when some path matches both (decided exactly on the patterns, e.g.
  ``*.py`` and ``src/*`` overlap, ``src/*.py`` and ``src/*.ts`` do not); two ``[...]`` classes
  are assumed to share a character, which errs toward a conflict;
* ``.`` (the whole workspace) overlaps everything.

Components overlap when their names are equal ignoring case. Plain paths are matched through an
index (exact path and each parent directory), so a queue of 10,000 items with one file each costs
one dictionary look-up per path component; only globs are compared pattern by pattern.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from fnmatch import fnmatchcase
from typing import Iterable, Sequence

from .queue import WorkItem

ConflictMap = dict[tuple[int, int], tuple[set[str], set[str]]]
"""(lower id, higher id) -> (the files entries involved, the shared components)."""

_GLOB_CHARS = frozenset("*?[")


def is_glob(entry: str) -> bool:
    """Whether a `files` entry is a pattern rather than a plain path."""
    return not _GLOB_CHARS.isdisjoint(entry)


def glob_tokens(pattern: str) -> tuple[str, ...]:
    """Split a glob into tokens: ``*``, ``?``, a ``[...]`` class, or one literal character."""
    pattern = pattern.replace("**/", "*").replace("**", "*")
    tokens: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "[":
            end = index + 1
            if end < len(pattern) and pattern[end] == "!":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                end += 1
            while end < len(pattern) and pattern[end] != "]":
                end += 1
            if end < len(pattern):
                tokens.append(pattern[index:end + 1])
                index = end + 1
                continue
            tokens.append("[")  # an unclosed bracket is a literal, as in fnmatch
        elif not (char == "*" and tokens and tokens[-1] == "*"):
            tokens.append(char)
        index += 1
    return tuple(tokens)


def _chars_meet(a: str, b: str) -> bool:
    """Whether two single-character tokens (literal, ``?`` or class) can match the same character."""
    if a == "?" or b == "?":
        return True
    if len(a) == 1 and len(b) == 1:
        return a == b
    if len(a) == 1:
        return fnmatchcase(a, b)
    if len(b) == 1:
        return fnmatchcase(b, a)
    return True


def tokens_meet(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether some string matches both token sequences (a walk over the product of the two automata)."""
    seen: set[tuple[int, int]] = set()
    stack = [(0, 0)]
    end_a, end_b = len(a), len(b)
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j = state
        if i == end_a and j == end_b:
            return True
        token_a = a[i] if i < end_a else None
        token_b = b[j] if j < end_b else None
        if token_a == "*":
            stack.append((i + 1, j))
        if token_b == "*":
            stack.append((i, j + 1))
        if token_a is None or token_b is None or (token_a == "*" and token_b == "*"):
            continue
        if token_a == "*":
            stack.append((i, j + 1))
        elif token_b == "*":
            stack.append((i + 1, j))
        elif _chars_meet(token_a, token_b):
            stack.append((i + 1, j + 1))
    return False


def _plain_meets_glob(plain: str, glob: Sequence[str]) -> bool:
    """A plain path (itself, or anything under it) against a glob's tokens."""
    return tokens_meet(tuple(plain), glob) or tokens_meet(tuple(plain) + ("/", "*"), glob)


def files_overlap(a: str, b: str) -> bool:
    """Whether two normalized `files` entries could name a common file (see the module docstring)."""
    if a == "." or b == ".":
        return True
    glob_a, glob_b = is_glob(a), is_glob(b)
    if not glob_a and not glob_b:
        return a == b or b.startswith(a + "/") or a.startswith(b + "/")
    if glob_a and glob_b:
        return tokens_meet(glob_tokens(a), glob_tokens(b))
    plain, glob = (b, a) if glob_a else (a, b)
    return _plain_meets_glob(plain, glob_tokens(glob))


def _literal_prefix(glob: str) -> str:
    """The part of a glob before its first wildcard."""
    cut = min((glob.index(char) for char in _GLOB_CHARS if char in glob), default=len(glob))
    return glob[:cut]


def find_conflicts(items: Iterable[WorkItem]) -> ConflictMap:
    """Every pair of items whose files or components overlap, with what they share.

    `items` must have distinct ids.
    """
    found: ConflictMap = {}

    def add(first: int, second: int, files: Iterable[str] = (), components: Iterable[str] = ()) -> None:
        if first == second:
            return
        key = (first, second) if first < second else (second, first)
        shared = found.get(key)
        if shared is None:
            shared = found[key] = (set(), set())
        shared[0].update(files)
        shared[1].update(components)

    plain_index: dict[str, list[int]] = defaultdict(list)
    globs: list[tuple[int, str]] = []
    everything: list[int] = []
    component_index: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with_files: list[int] = []
    for item in items:
        if item.files:
            with_files.append(item.id)
        for entry in item.files:
            if entry == ".":
                everything.append(item.id)
            elif is_glob(entry):
                globs.append((item.id, entry))
            else:
                plain_index[entry].append(item.id)
        for component in item.components:
            component_index[component.casefold()].append((item.id, component))

    for path, owners in plain_index.items():
        for index, first in enumerate(owners):
            for second in owners[index + 1:]:
                add(first, second, (path,))
        parent = path.rfind("/")
        while parent > 0:
            directory = path[:parent]
            for holder in plain_index.get(directory, ()):
                for owner in owners:
                    add(holder, owner, (directory, path))
            parent = path.rfind("/", 0, parent)

    sorted_plain = sorted(plain_index)
    glob_token_cache = {glob: glob_tokens(glob) for _, glob in globs}
    for index, (owner, glob) in enumerate(globs):
        tokens = glob_token_cache[glob]
        prefix = _literal_prefix(glob)
        candidates = set()
        start = bisect.bisect_left(sorted_plain, prefix)
        while start < len(sorted_plain) and sorted_plain[start].startswith(prefix):
            candidates.add(sorted_plain[start])
            start += 1
        cut = prefix.find("/")
        while cut > 0:
            if prefix[:cut] in plain_index:
                candidates.add(prefix[:cut])
            cut = prefix.find("/", cut + 1)
        if prefix in plain_index:
            candidates.add(prefix)
        for path in candidates:
            if _plain_meets_glob(path, tokens):
                for other in plain_index[path]:
                    add(owner, other, (glob, path))
        for other, other_glob in globs[index + 1:]:
            if tokens_meet(tokens, glob_token_cache[other_glob]):
                add(owner, other, (glob, other_glob))

    for holder in everything:
        for other in with_files:
            add(holder, other, (".",))

    for owners in component_index.values():
        for index, (first, name) in enumerate(owners):
            for second, _ in owners[index + 1:]:
                add(first, second, (), (name,))
    return found
