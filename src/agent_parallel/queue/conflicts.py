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

Components overlap when their names are equal ignoring case. Conflicts are kept by what items
declare (`ConflictIndex`: each entry or component once, with its holders and the entries it
overlaps), never as a list of every pair: 1,000 items sharing one component would be 499,500 pairs.
Distinct plain paths are matched through an index (the path and each parent directory); only globs
are compared pattern by pattern, after a cheap test of their literal starts and ends.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from fnmatch import fnmatchcase
from collections.abc import Iterable, Iterator, Sequence

from .items import WorkItem

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


def _literal_suffix(glob: str) -> str:
    """The part of a glob after its last wildcard or character class."""
    cut = max(glob.rfind("*"), glob.rfind("?"), glob.rfind("]") if "[" in glob else -1)
    return glob[cut + 1:]


def _literal_prefix(glob: str) -> str:
    """The part of a glob before its first wildcard."""
    cut = min((glob.index(char) for char in _GLOB_CHARS if char in glob), default=len(glob))
    return glob[:cut]


Key = tuple[str, str]
"""What an item declares, as the index knows it: ``("file", entry)`` or ``("component", casefolded name)``."""
Mark = tuple[str, Key]
"""A scheduler's counter: ``("near", key)`` or ``("held", key)`` (see `ConflictIndex.checks`)."""
_SPREAD_LIMIT = 16
"""Keys overlapping more entries than this are checked by whoever might start beside them, not spread."""


def entry_overlaps(entries: Iterable[str]) -> dict[str, set[str]]:
    """For distinct `files` entries: entry -> the other entries it overlaps (see `files_overlap`).

    An entry always overlaps itself; that is not listed. Plain paths meet through an index (the
    path and each parent directory); only globs are compared pattern by pattern.
    """
    entries = sorted(set(entries))
    adjacent: dict[str, set[str]] = defaultdict(set)

    def link(first: str, second: str) -> None:
        if first != second:
            adjacent[first].add(second)
            adjacent[second].add(first)

    plain = [entry for entry in entries if entry != "." and not is_glob(entry)]
    plain_set = set(plain)
    globs = [entry for entry in entries if entry != "." and is_glob(entry)]
    for path in plain:
        parent = path.rfind("/")
        while parent > 0:
            if path[:parent] in plain_set:
                link(path[:parent], path)
            parent = path.rfind("/", 0, parent)
    tokens = {glob: glob_tokens(glob) for glob in globs}
    ends = {glob: (_literal_prefix(glob), _literal_suffix(glob)) for glob in globs}
    for index, glob in enumerate(globs):
        prefix = _literal_prefix(glob)
        candidates = set()
        start = bisect.bisect_left(plain, prefix)
        while start < len(plain) and plain[start].startswith(prefix):
            candidates.add(plain[start])
            start += 1
        cut = prefix.find("/")
        while cut > 0:
            if prefix[:cut] in plain_set:
                candidates.add(prefix[:cut])
            cut = prefix.find("/", cut + 1)
        if prefix in plain_set:
            candidates.add(prefix)
        for path in candidates:
            if _plain_meets_glob(path, tokens[glob]):
                link(glob, path)
        head, tail = ends[glob]
        for other in globs[index + 1:]:
            # a cheap filter first: literal starts and ends must agree (src/*1 and src/*2 never meet)
            other_head, other_tail = ends[other]
            if ((head.startswith(other_head) or other_head.startswith(head))
                    and (tail.endswith(other_tail) or other_tail.endswith(tail))
                    and tokens_meet(tokens[glob], tokens[other])):
                link(glob, other)
    if "." in entries:
        for entry in entries:
            link(".", entry)
    return adjacent


class ConflictIndex:
    """Which items must not run at the same time, kept by what they declare rather than by pair.

    Every `files` entry and component is a key held by the items declaring it; two items conflict
    when they hold the same key or two keys that overlap (``src`` and ``src/a.py``). So 1,000 items
    sharing one component cost 1,000 entries here, not 500,000 pairs; pairs are derived on demand.
    """

    def __init__(self, items: Iterable[WorkItem]) -> None:
        self.holders: dict[Key, list[int]] = {}
        """Key -> the ids holding it, in the order given (ascending when items are sorted by id)."""
        self.names: dict[Key, str] = {}
        """Key -> how to show it: the entry, or the component as first written."""
        self.keys: dict[int, tuple[Key, ...]] = {}
        for item in items:
            own: dict[Key, str] = {}
            for entry in item.files:
                own.setdefault(("file", entry), entry)
            for component in item.components:
                own.setdefault(("component", component.casefold()), component)
            for key, name in own.items():
                self.holders.setdefault(key, []).append(item.id)
                self.names.setdefault(key, name)
            if own:
                self.keys[item.id] = tuple(own)
        overlaps = entry_overlaps(name for kind, name in self.holders if kind == "file")
        self.adjacent: dict[Key, tuple[Key, ...]] = {
            ("file", entry): tuple(("file", other) for other in sorted(others)) for entry, others in overlaps.items()}
        """Key -> the other keys overlapping it (files only; components meet only when equal)."""
        self._neighbours: dict[int, frozenset[int]] = {}
        self._key_sets: dict[int, frozenset[Key]] = {}
        self._pair_count: int | None = None
        self._marks: dict[int, tuple[Mark, ...]] = {}
        self._checks: dict[int, tuple[Mark, ...]] = {}
        self._heavy_near: dict[Key, tuple[Mark, ...]] = {}
        self._contested = {key for key, holders in self.holders.items() if len(holders) > 1 or key in self.adjacent}
        """Keys another item could conflict on; the rest (one holder, no overlap) need no counter."""

    def _heavy(self, key: Key) -> bool:
        return len(self.adjacent.get(key, ())) > _SPREAD_LIMIT

    def marks(self, item_id: int) -> tuple[Mark, ...]:
        """Counters a scheduler raises while `item_id` runs (see `checks`)."""
        found = self._marks.get(item_id)
        if found is None:
            marks: list[Mark] = []
            for key in self.keys.get(item_id, ()):
                if key not in self._contested:
                    continue
                marks.append(("near", key))
                if self._heavy(key):
                    marks.append(("held", key))
                else:
                    marks.extend(("near", other) for other in self.adjacent.get(key, ()))
            found = self._marks[item_id] = tuple(marks)
        return found

    def checks(self, item_id: int) -> tuple[Mark, ...]:
        """Counters that must all be zero for `item_id` to start beside what runs.

        ``("near", key)`` counts running items holding `key` or a lightly connected key overlapping
        it; ``("held", key)`` counts running items holding a heavily connected `key` (a directory
        or glob overlapping more than a few entries, or ``.``). Splitting them keeps both starting
        and checking cheap: an item holding ``.`` raises one counter, not one per entry.
        """
        found = self._checks.get(item_id)
        if found is None:
            checks: list[Mark] = []
            for key in self.keys.get(item_id, ()):
                if key not in self._contested:
                    continue
                checks.append(("near", key))
                heavy = self._heavy_near.get(key)
                if heavy is None:
                    heavy = self._heavy_near[key] = tuple(
                        ("held", other) for other in self.adjacent.get(key, ()) if self._heavy(other))
                checks.extend(heavy)
            found = self._checks[item_id] = tuple(checks)
        return found

    def reach(self, item_id: int) -> Iterator[Key]:
        """Every key a running `item_id` makes unavailable: its own and those overlapping them."""
        for key in self.keys.get(item_id, ()):
            yield key
            yield from self.adjacent.get(key, ())

    def neighbours(self, item_id: int) -> frozenset[int]:
        """The items `item_id` must not run beside (computed on demand, then kept)."""
        found = self._neighbours.get(item_id)
        if found is None:
            collected: set[int] = set()
            for key in self.reach(item_id):
                collected.update(self.holders[key])
            collected.discard(item_id)
            found = self._neighbours[item_id] = frozenset(collected)
        return found

    def has_conflict(self, item_id: int) -> bool:
        """Whether `item_id` conflicts with any other item (without building its neighbour set).

        A key it holds with another item is enough; an uncontested key (one holder, no overlap) is
        passed over; an overlapping key counts when some other item holds one of its overlaps (the
        item itself may hold both, as in ``files: [src, src/a.py]``)."""
        for key in self.keys.get(item_id, ()):
            if key not in self._contested:
                continue
            if len(self.holders[key]) > 1:  # (it is one of them)
                return True
            for other in self.adjacent.get(key, ()):
                if any(holder != item_id for holder in self.holders[other]):
                    return True
        return False

    def conflict(self, first: int, second: int) -> bool:
        return first != second and second in self.neighbours(first)

    def pair_count(self) -> int:
        """How many pairs conflict, counted without keeping every pair (once, then kept)."""
        if self._pair_count is None:
            self._pair_count = self._count_pairs()
        return self._pair_count

    def _count_pairs(self) -> int:
        if all(len(keys) == 1 for keys in self.keys.values()):  # then no pair is met through two keys
            total = sum(len(holders) * (len(holders) - 1) // 2 for holders in self.holders.values())
            total += sum(len(self.holders[key]) * len(self.holders[other])
                         for key, others in self.adjacent.items() for other in others if key < other)
            return total
        # Otherwise each item's neighbours, as a bitset over the items: one OR per key it holds.
        bit = {item_id: index for index, item_id in enumerate(self.keys)}
        key_bits = {key: _bitset([bit[holder] for holder in holders], len(bit)) for key, holders in self.holders.items()}
        near: dict[Key, int] = {}
        total = 0
        for keys in self.keys.values():
            mask = 0
            for key in keys:
                if key not in near:
                    near[key] = key_bits[key]
                    for other in self.adjacent.get(key, ()):
                        near[key] |= key_bits[other]
                mask |= near[key]
            total += mask.bit_count() - 1  # less the item itself
        return total // 2

    def pairs(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Conflicting pairs ``(lower id, higher id)`` in order, at most `limit` of them."""
        found: list[tuple[int, int]] = []
        for first in sorted(self.keys):
            if limit is not None and len(found) >= limit:
                break
            if self.has_conflict(first):
                found.extend((first, second) for second in sorted(self.neighbours(first)) if second > first)
        return found if limit is None else found[:limit]

    def shared(self, first: int, second: int) -> tuple[list[str], list[str]]:
        """What makes two items conflict: (the files entries involved, the shared components), sorted."""
        files: set[str] = set()
        components: set[str] = set()
        if len(self.keys.get(first, ())) > len(self.keys.get(second, ())):
            first, second = second, first  # overlap is symmetric: walk the shorter list, look up in the longer
        theirs = self._key_set(second)
        for key in self.keys.get(first, ()):
            met = [key] if key in theirs else []
            met += [other for other in self.adjacent.get(key, ()) if other in theirs]
            for other in met:
                if key[0] == "component":
                    components.add(self.names[key])
                else:
                    files.update((key[1], other[1]))
        return sorted(files), sorted(components)

    def _key_set(self, item_id: int) -> frozenset[Key]:
        """The item's keys as a set, made once (an item of 60,000 files met in 200 listed pairs)."""
        found = self._key_sets.get(item_id)
        if found is None:
            found = self._key_sets[item_id] = frozenset(self.keys.get(item_id, ()))
        return found

    def groups(self) -> list[tuple[Key, list[int], list[Key]]]:
        """Each key that causes a conflict: (key, its holders, the keys overlapping it), in key order."""
        found = []
        for key in sorted(self.holders):
            holders, adjacent = self.holders[key], list(self.adjacent.get(key, ()))
            if len(holders) > 1 or any(holder != holders[0] for other in adjacent for holder in self.holders[other]):
                found.append((key, holders, adjacent))
        return found


def _bitset(indices: list[int], size: int) -> int:
    """An int with the bits at `indices` set, built in linear time."""
    data = bytearray((size + 7) // 8)
    for index in indices:
        data[index >> 3] |= 1 << (index & 7)
    return int.from_bytes(data, "little")


def find_conflicts(items: Iterable[WorkItem]) -> ConflictMap:
    """Every pair of items whose files or components overlap, with what they share.

    `items` must have distinct ids. This lists every pair (quadratic for items sharing one key);
    the planner keeps a `ConflictIndex` instead and lists pairs only up to a cap.
    """
    index = ConflictIndex(items)
    found: ConflictMap = {}
    for pair in index.pairs():
        files, components = index.shared(*pair)
        found[pair] = (set(files), set(components))
    return found
