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
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from fnmatch import fnmatchcase
from collections.abc import Callable, Iterable, Iterator, Sequence

from .items import WorkItem

ConflictMap = dict[tuple[int, int], tuple[set[str], set[str]]]
"""(lower id, higher id) -> (the files entries involved, the shared components)."""

_GLOB_CHARS = frozenset("*?[")


def is_glob(entry: str) -> bool:
    """Whether a `files` entry is a pattern rather than a plain path."""
    return not _GLOB_CHARS.isdisjoint(entry)


_CLASS = re.compile(r"\[!?+\]?+[^\]]*+\]", re.DOTALL)
"""A closed ``[...]`` class, as `fnmatch` reads it (a ``]`` right after ``[`` or ``[!`` belongs to it)."""
_TOKEN = re.compile(_CLASS.pattern + r"|\*+|.", re.DOTALL)
"""A glob's tokens: a class, a run of ``*``, or one character (an unclosed ``[`` is a literal)."""


def _normal_glob(pattern: str) -> str:
    """``**/`` is read as ``*``, so ``src/**/*.py`` also covers ``src/a.py``."""
    return pattern.replace("**/", "*").replace("**", "*")


def glob_tokens(pattern: str) -> tuple[str, ...]:
    """Split a glob into tokens: ``*``, ``?``, a ``[...]`` class, or one literal character (by a
    regular expression: a pattern of 5,000 characters is split in C, not character by character)."""
    pattern = _normal_glob(pattern)
    tokens = _TOKEN.findall(pattern)
    if "**" in pattern:  # a run of three or more stars, or stars in a class: only runs become one *
        tokens = ["*" if token[0] == "*" else token for token in tokens]
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


Key = tuple[str, str]
"""What an item declares, as the index knows it: ``("file", entry)`` or ``("component", casefolded name)``.

A group of patterns that `overlap_groups` merges is one key, named by its first pattern (see
`Overlaps.members`)."""
Mark = tuple[str, Key]
"""A scheduler's counter: ``("near", key)`` or ``("held", key)`` (see `ConflictIndex.checks`)."""
_SPREAD_LIMIT = 16
"""Keys overlapping more entries than this are checked by whoever might start beside them, not spread;
groups of more patterns than this that overlap one another and the same other entries are one key."""
_OVERLAP_BUDGET = 400_000
"""Steps `overlap_groups` may take (a pair of patterns looked at or an overlap recorded: 1; a pattern
compared with another token by token: `_COMPARE_COST`). A queue written by hand needs a few thousand;
what is left when it runs out is taken to overlap every file, so a plan never takes minutes."""
_COMPARE_COST = 20
_MAX_COMPARE_STATES = 250_000
"""Two patterns whose lengths multiply past this are not compared token by token (see `_too_long`)."""
FEW_COUNTERS = 64
"""At most this many counters (in all `ConflictIndex.checks` together) are numbered for bitsets (`counter_bits`)."""


def _ends(glob: str) -> tuple[str, str, bool]:
    """A glob's literal start and end (before its first and after its last wildcard) and whether
    both of those wildcards are ``*`` (then it meets others by its ends alone: see `overlap_groups`).
    A glob with no wildcard (an unclosed ``[``) is all literal. Found with string searches: a ``*``
    or ``?`` inside a class lies within that class's span, so the class comes first (or last)."""
    pattern = _normal_glob(glob)
    spans = [match.span() for match in _CLASS.finditer(pattern)] if "[" in pattern else []
    firsts = [index for index in (pattern.find("*"), pattern.find("?")) if index >= 0]
    lasts = [index for index in (pattern.rfind("*"), pattern.rfind("?")) if index >= 0]
    if spans:
        firsts.append(spans[0][0])
        lasts.append(spans[-1][1] - 1)
    if not firsts:
        return pattern, pattern, False
    first, last = min(firsts), max(lasts)
    return pattern[:first], pattern[last + 1:], pattern[first] == "*" and pattern[last] == "*"


class _OutOfBudget(Exception):
    pass


@dataclass
class Overlaps:
    """Which distinct `files` entries overlap, as `overlap_groups` found it."""

    adjacent: dict[str, set[str]] = field(default_factory=dict)
    """Key entry -> the other key entries it overlaps (an entry always overlaps itself; not listed)."""
    key_of: dict[str, str] = field(default_factory=dict)
    """Entry merged into a group -> the group's key entry (its first); the others are their own key."""
    members: dict[str, list[str]] = field(default_factory=dict)
    """A merged group's key entry -> its entries."""
    assumed: list[str] = field(default_factory=list)
    """Patterns taken to overlap every file because the comparisons ran out of budget."""
    everything: list[str] = field(default_factory=list)
    """Entries that overlap every file: ``.``, ``*`` and the `assumed` ones."""


def entry_overlaps(entries: Iterable[str]) -> dict[str, set[str]]:
    """For distinct `files` entries: entry -> the other entries it overlaps (see `files_overlap`).

    Exact and nothing merged: for tests and small sets (it is quadratic in globs that overlap)."""
    return overlap_groups(entries, merge=False, budget=None).adjacent


def overlap_groups(entries: Iterable[str], *, merge: bool = True,
                   budget: int | None = _OVERLAP_BUDGET) -> Overlaps:
    """Which distinct `files` entries overlap (see `files_overlap`), without comparing every pair.

    A plain path meets the plain paths above it, found in one walk over the paths in tree order. A
    glob whose first and last wildcards are ``*`` (``src/**/*.py``, ``docs/*1*.md``) meets another
    such glob exactly when their literal starts agree (one begins the other) and so do their literal
    ends (one ends the other): the longer start, a match of each middle and the longer end make a
    string both match. It meets a plain path ``p`` exactly when ``p/`` and its start agree. So these
    globs are grouped by their ends and compared by group, only with the globs whose start begins
    theirs; a group of more than `_SPREAD_LIMIT` becomes one key (3,000 items' ``docs/*{i}*.md`` all
    overlap one another and the same other entries: one key, not 4.5 million pairs). Other globs are
    compared token by token with the entries whose starts agree; against a merged group, or when both
    are long (`_MAX_COMPARE_STATES`), agreeing ends count as meeting (erring toward a conflict, like
    two ``[...]`` classes). ``.`` and ``*`` overlap everything.

    Once `budget` steps are spent, the entries not linked yet (plain paths first, in tree order, then
    globs) are taken to overlap everything (`Overlaps.assumed`): erring toward a conflict again, where
    the exact answer could cost minutes and gigabytes (2,000 nested paths: 2 million pairs).
    """
    entries = sorted(set(entries))
    found = Overlaps()
    adjacent: dict[str, set[str]] = defaultdict(set)
    spent = 0

    def charge(cost: int) -> None:
        nonlocal spent
        spent += cost
        if budget is not None and spent > budget:
            raise _OutOfBudget

    def link(first: str, second: str) -> None:
        if first != second:
            adjacent[first].add(second)
            adjacent[second].add(first)

    plain = [entry for entry in entries if entry != "." and not is_glob(entry)]
    plain_set = set(plain)
    everything = ["."] if "." in entries else []
    """Entries that overlap every file."""
    tokens: dict[str, tuple[str, ...]] = {}
    classes: dict[tuple[str, str], list[str]] = defaultdict(list)
    others: list[tuple[str, str, str]] = []
    for glob in entries:
        if glob == "." or glob in plain_set:
            continue
        tokens[glob] = glob_tokens(glob)
        if tokens[glob] == ("*",):
            everything.append(glob)
            continue
        head, tail, star = _ends(glob)
        if star:
            classes[(head, tail)].append(glob)
        else:
            others.append((head, tail, glob))

    # Each group is compared as its keys: a merged class as one, else each of its globs.
    groups: list[_Group] = []
    for (head, tail), globs in classes.items():
        if merge and len(globs) > _SPREAD_LIMIT:
            found.members[globs[0]] = globs
            found.key_of.update((glob, globs[0]) for glob in globs[1:])
            groups.append(_Group(head, tail, [globs[0]], True))
        else:
            groups.append(_Group(head, tail, globs, True))
    groups += [_Group(head, tail, [glob], False) for head, tail, glob in others]
    groups.sort(key=lambda group: (len(group.head), group.head, group.tail, group.keys[0]))
    merged = found.members.keys()
    shorter = _prefix_parents(group.head for group in groups)

    def meets(first: str, second: str) -> bool:
        """Token by token; a merged class stands for all its globs, whose ends already agree."""
        charge(_COMPARE_COST)
        if first in merged or second in merged or _too_long(tokens[first], tokens[second], budget):
            return True
        return tokens_meet(tokens[first], tokens[second])

    by_head: dict[str, list[_Group]] = defaultdict(list)
    """Groups compared so far by start: in start-length order, so a start's prefixes came first."""
    in_tree_order = sorted(plain, key=lambda path: path.split("/"))
    linked = done = 0
    try:
        above: list[str] = []  # the plain paths above this one (each above the next)
        for path in in_tree_order:
            while above and not path.startswith(above[-1] + "/"):
                above.pop()
            for parent in above:
                charge(1)
                link(parent, path)
            above.append(path)
            linked += 1
        for group in groups:
            head, keys = group.head, group.keys
            for index, first in enumerate(keys):
                for second in keys[index + 1:]:
                    charge(1)
                    link(first, second)
            for path in _plain_candidates(plain, plain_set, head, charge):
                for key in keys:
                    charge(1)
                    if group.star:
                        link(key, path)
                    else:
                        charge(_COMPARE_COST)
                        if _too_long(tuple(path), tokens[key], budget) or _plain_meets_glob(path, tokens[key]):
                            link(key, path)
            start: str | None = head
            while start is not None:  # this start, then each shorter start that begins it
                for earlier in by_head.get(start, ()):
                    charge(1)
                    if not (group.tail.endswith(earlier.tail) or earlier.tail.endswith(group.tail)):
                        continue
                    for key in keys:
                        for other in earlier.keys:
                            charge(1)
                            if (group.star and earlier.star) or meets(key, other):
                                link(key, other)
                start = shorter[start]
            by_head[head].append(group)
            done += 1
    except _OutOfBudget:
        found.assumed = in_tree_order[linked:]
        for group in groups[done:]:
            for key in group.keys:
                found.assumed += found.members.pop(key, [key])
        for entry in found.assumed:
            found.key_of.pop(entry, None)
            for other in adjacent.pop(entry, ()):  # what it met so far: all of it, from now on
                adjacent[other].discard(entry)
        everything += found.assumed

    if everything:
        everything.sort(key=lambda entry: (entry != ".", entry))
        found.everything = everything
        if merge and len(everything) > _SPREAD_LIMIT:
            found.members[everything[0]] = everything
            found.key_of.update((entry, everything[0]) for entry in everything[1:])
        wide = everything[:1] if everything[0] in found.members else everything
        for entry in wide:
            for other in entries:
                if other not in found.key_of:
                    link(entry, other)
    found.adjacent = dict(adjacent)
    return found


def _too_long(first: Sequence[str], second: Sequence[str], budget: int | None) -> bool:
    """Whether two token sequences are too long to compare exactly within a budget (their product
    automaton could have millions of states): then they are taken to meet."""
    return budget is not None and len(first) * len(second) > _MAX_COMPARE_STATES


def _prefix_parents(heads: Iterable[str]) -> dict[str, str | None]:
    """For distinct strings: each one -> the longest other one that begins it, or None. In sorted
    order whatever lies between a string and one that begins it also begins with that one, so a
    stack of the strings beginning the current one finds every such parent in one walk."""
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for head in sorted(set(heads)):
        while stack and not head.startswith(stack[-1]):
            stack.pop()
        parents[head] = stack[-1] if stack else None
        stack.append(head)
    return parents


@dataclass
class _Group:
    """Globs `overlap_groups` compares together: one star-bounded class, or one other glob."""

    head: str
    tail: str
    keys: list[str]
    star: bool


def _plain_candidates(plain: list[str], plain_set: set[str], head: str, charge: Callable[[int], None]) -> list[str]:
    """Plain paths a glob starting with `head` may meet: those starting with it and the directories
    above it (`plain` sorted). For a star-bounded glob these are exactly the paths it meets."""
    start = bisect.bisect_left(plain, head)
    found = []
    while start < len(plain) and plain[start].startswith(head):
        found.append(plain[start])
        start += 1
    cut = head.find("/")
    while cut > 0:
        charge(1)
        if head[:cut] in plain_set:
            found.append(head[:cut])
        cut = head.find("/", cut + 1)
    return found


class ConflictIndex:
    """Which items must not run at the same time, kept by what they declare rather than by pair.

    Every `files` entry and component is a key held by the items declaring it; two items conflict
    when they hold the same key or two keys that overlap (``src`` and ``src/a.py``). So 1,000 items
    sharing one component cost 1,000 entries here, not 500,000 pairs; pairs are derived on demand.
    """

    def __init__(self, items: Iterable[WorkItem]) -> None:
        items = list(items)
        self.overlaps = overlap_groups({entry for item in items for entry in item.files})
        """How the entries overlap; `Overlaps.key_of` maps a merged entry to its group's key."""
        key_of, members = self.overlaps.key_of, self.overlaps.members
        self.holders: dict[Key, list[int]] = {}
        """Key -> the ids holding it, in the order given (ascending when items are sorted by id)."""
        self.names: dict[Key, str] = {}
        """Key -> how to show it: the entry, the component as first written, or a merged group's key
        entry and how many more it stands for."""
        self.keys: dict[int, tuple[Key, ...]] = {}
        self._files: dict[int, Sequence[str]] = {}
        """Item -> its entries, kept where one was merged into a group's key (see `shared`)."""
        for item in items:
            own: dict[Key, str] = {}
            for entry in item.files:
                held = key_of.get(entry, entry) if key_of else entry
                own.setdefault(("file", held), held)
            if members and any(key[1] in members for key in own):
                self._files[item.id] = item.files
            for component in item.components:
                own.setdefault(("component", component.casefold()), component)
            for key, name in own.items():
                self.holders.setdefault(key, []).append(item.id)
                self.names.setdefault(key, name)
            if own:
                self.keys[item.id] = tuple(own)
        for first, group in members.items():
            self.names[("file", first)] = (
                f"{first} and {len(group) - 1:,} more entries that cover every file"
                if first in self.overlaps.everything
                else f"{first} and {len(group) - 1:,} more patterns with its literal start and end")
        self.adjacent: dict[Key, tuple[Key, ...]] = {
            ("file", entry): tuple(("file", other) for other in sorted(others))
            for entry, others in self.overlaps.adjacent.items()}
        """Key -> the other keys overlapping it (files only; components meet only when equal)."""
        self._neighbours: dict[int, frozenset[int]] = {}
        self._key_sets: dict[int, frozenset[Key]] = {}
        self._pair_count: int | None = None
        self._marks: dict[int, tuple[Mark, ...]] = {}
        self._checks: dict[int, tuple[Mark, ...]] = {}
        self._heavy_near: dict[Key, tuple[Mark, ...]] = {}
        self._twin: dict[int, int] = {}
        self._twin_classes: dict[Key | frozenset[Key], int] = {}
        self._contested = {key for key, holders in self.holders.items() if len(holders) > 1 or key in self.adjacent}
        """Keys another item could conflict on; the rest (one holder, no overlap) need no counter."""
        self._cliques = self._find_cliques()

    def _heavy(self, key: Key) -> bool:
        return len(self.adjacent.get(key, ())) > _SPREAD_LIMIT

    def _find_cliques(self) -> dict[Key, Key]:
        """Heavy keys that all overlap one another, grouped greedily: key -> its group's first key.

        Items holding keys of one group share one counter (``("clique", first)``) instead of checking
        each other's ``held`` counters: 200 patterns that all overlap make checks of 1 counter, not 200,
        and a finished item frees one counter that wakes one parked item, not 200 that park again."""
        heavy = sorted((key for key in self.adjacent if self._heavy(key)),
                       key=lambda key: (-len(self.adjacent[key]), key))
        clique: dict[Key, Key] = {}
        for first in heavy:
            if first in clique:
                continue
            candidates = {other for other in self.adjacent[first] if other not in clique and self._heavy(other)}
            members = [first]
            for other in self.adjacent[first]:
                if other in candidates:
                    members.append(other)
                    candidates.intersection_update(self.adjacent[other])
            if len(members) > 2:
                clique.update((member, first) for member in members)
        return clique

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
                    if key in self._cliques:
                        marks.append(("clique", self._cliques[key]))
                else:
                    marks.extend(("near", other) for other in self.adjacent.get(key, ()))
            found = self._marks[item_id] = tuple(marks)
        return found

    def checks(self, item_id: int) -> tuple[Mark, ...]:
        """Counters that must all be zero for `item_id` to start beside what runs.

        ``("near", key)`` counts running items holding `key` or a lightly connected key overlapping
        it; ``("held", key)`` counts running items holding a heavily connected `key` (a directory
        or glob overlapping more than a few entries, or ``.``). Splitting them keeps both starting
        and checking cheap: an item holding ``.`` raises one counter, not one per entry. Heavy keys
        that all overlap one another share a ``("clique", first)`` counter (see `_find_cliques`).
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
                    clique = self._cliques.get(key)
                    heavy = self._heavy_near[key] = ((("clique", clique),) if clique else ()) + tuple(
                        ("held", other) for other in self.adjacent.get(key, ())
                        if self._heavy(other) and (clique is None or self._cliques.get(other) != clique))
                checks.extend(heavy)
            found = self._checks[item_id] = tuple(checks)
        return found

    def twin_class(self, item_id: int) -> int:
        """A number shared by exactly the items with the same `checks` (in any order): they may start
        beside exactly the same running items, so a scheduler lists only the best of them."""
        found = self._twin.get(item_id)
        if found is None:  # `checks` follow from the contested keys alone, so those make the class
            own = [key for key in self.keys.get(item_id, ()) if key in self._contested]
            classes = self._twin_classes
            found = self._twin[item_id] = classes.setdefault(own[0] if len(own) == 1 else frozenset(own), len(classes))
        return found

    @cached_property
    def counter_bits(self) -> dict[Mark, int] | None:
        """Each counter some item's `checks` name -> a bit number of its own, or None past
        `FEW_COUNTERS` of them: a scheduler may then keep its ready items as bitsets, one per counter
        (see `planner._ReadyBits`)."""
        if len(self._contested) > FEW_COUNTERS:  # each contested key is a counter: ("near", key)
            return None
        found: dict[Mark, int] = {}
        for item_id in self.keys:
            for mark in self.checks(item_id):
                found.setdefault(mark, len(found))
            if len(found) > FEW_COUNTERS:
                return None
        return found

    def twin_classes(self) -> int:
        """How many twin classes the items holding keys make (see `twin_class`)."""
        for item_id in self.keys:
            self.twin_class(item_id)
        return len(self._twin_classes)

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
        return item_id in self._conflicted

    @cached_property
    def _conflicted(self) -> frozenset[int]:
        """Every item `has_conflict` is true for, found key by key (the planner asks about every item)."""
        found: set[int] = set()
        holders, adjacent = self.holders, self.adjacent
        for key in self._contested:
            held = holders[key]
            if len(held) > 1:  # they conflict with one another
                found.update(held)
            elif held[0] not in found and any(holder != held[0] for other in adjacent.get(key, ())
                                               for holder in holders[other]):
                found.add(held[0])
        return frozenset(found)

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
                    files.update(self._entries(first, key[1]))
                    files.update(self._entries(second, other[1]))
        return sorted(files), sorted(components)

    def _entries(self, item_id: int, key: str) -> Iterable[str]:
        """The item's own entries behind a file key (several when it holds patterns of a merged group)."""
        own = self._files.get(item_id)
        if own is None or key not in self.overlaps.members:
            return (key,)
        key_of = self.overlaps.key_of
        return [entry for entry in own if key_of.get(entry, entry) == key]

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
