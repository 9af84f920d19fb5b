"""The fast paths of item parsing give what the full paths give: the same items (field by field, with
the same types, in the same order), the same diagnostics, for every input.

`items._usual_item` reads the usual item file (simple front matter, each distinct line read once per
queue) and leaves every other file to the full path of `items._parse_named`; `names.parse_name` reads
a valid file name in one match and explains any other the long way. Each is compared here with the
path it shortcuts (the shortcut switched off), on generated input that takes both.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent_parallel.queue import items, names
from agent_parallel.queue.items import WorkItem, parse_item
from agent_parallel.queue.names import ItemName, parse_name

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])

KEYS = ["title", "Title", "blocked_by", "blockedBy", "depends_on", "dependencies", "blocks", "files", "components",
        "priority", "estimate", "command", "timeout", "isolation", "retries", "resources", "status", "Status",
        "owner", "Owner", "id", "yes"]
VALUES = ["", "x", "Fix the parser", "''", "' spaced '", '"quoted"', "[]", "[ ]", "[1, 2]", "[001, 008]",
          "[0, 07, 010]", "[ 7 ,8 ]", "[7,]", "[7, 7]", "[07, 7]", "3", "'4'", "7, 8", "#7", "[#7]", "[x]", "008",
          "[src/a.py]", "[src/a.py, src/a.py]", "['b c.py', src/b.py]", "../x", "[/abs.py]", "[C:/x.py]",
          "[src/*.py, './c.py']", "src/a.py src/b.py", "[a, b, a]", "high", "High", "urgent", "low", "30m", "0",
          "0s", "-1", "1:30", "1.5", "abc", "`make`", "'make test'", "echo hi", "pending", "in_progress",
          "in progress", "done", "Pending", "completed", "worktree", "none", "None", "101", "yes", "no", "~",
          "null", "'{GPU: 1}'", '"num_cpus: 2"', "[1, x]", "[1, [2]]", "{a: 1}", "a # comment", "tab\there",
          "9" * 101, "[" + "9" * 101 + "]"]
OTHER_LINES = ["", "   ", "# a comment", "  - item", "  nested: x", "key: value # comment", "%YAML 1.1", "k:v"]
BODIES = ["", "Body.\n", "# Heading\n", "#  Spaced heading ##\n", "# Heading\n\n**Files**: a.py\n",
          "**Status**: done\n", "text\n---\nmore\n", "...\nafter\n", "```\n# not a heading\n```\n", "#tag\n",
          "a ** b\n"]
CLOSINGS = ["---", "...", "--- \t", "----", "---x", "..", ""]
FILE_NAMES = ["007-pending-some-item.md", "012-in_progress-x.md", "100-completed-y.md", "0042-failed-z.md"]


def shape(value: object) -> object:
    """A value with the type of everything in it: ``1``, ``1.0`` and ``True`` compare equal, their shapes do not."""
    if isinstance(value, dict):
        return ("dict", [(shape(k), shape(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [shape(v) for v in value])
    return (type(value).__name__, value)


def parsed_shape(result: tuple[WorkItem | None, list[Any]]) -> object:
    item, diagnostics = result
    fields = None if item is None else (shape(item.__dict__), sorted(item.model_fields_set))
    return fields, [shape(d.__dict__) for d in diagnostics]


def full_parse(monkeypatch: pytest.MonkeyPatch, file_name: str, text: str) -> tuple[WorkItem | None, list[Any]]:
    """`parse_item` with the usual-file shortcut off: what the full path makes of the file."""
    with monkeypatch.context() as patch:
        patch.setattr(items, "_usual_item", lambda *args: None)
        return parse_item(file_name, text, path=f".agent/queue/{file_name}")


USUAL = {
    "title": ["Add login", "x", "", "''", "Fix: the parser", "'it''s'"],
    "blocked_by": ["[]", "[1, 2]", "[001, 002]", "[ 7 ,010 ]", "[008]", "7", "#7", "007, 8", "[src-7]"],
    "depends_on": ["[3]", ""], "blocks": ["[4, 5]", "9"],
    "files": ["[src/a.py]", "[src/a.py, 'b c.py']", "[./x/../y.py, src/*.py]", "src/a.py, src/b.py", "[a, a]"],
    "components": ["[api, ui]", "api; ui", "[]"], "priority": ["high", "Low", "medium"],
    "estimate": ["30m", "45s", "2h", "0", "90"], "timeout": ["1h", "10"], "command": ["make test", "'pytest -q'"],
    "isolation": ["worktree", "none", "None"], "retries": ["0", "3"],
    "status": ["pending", "in_progress", "in progress", "completed"], "owner": ["me"], "tags": ["[a]"],
}
"""Values each field reads without a problem: items that take the shortcut, warnings and all."""


@st.composite
def item_texts(draw: st.DrawFn) -> str:
    """Item files of every kind, about half of them of the usual shape (a few distinct usual fields)."""
    lines = [f"{key}: {draw(st.sampled_from(USUAL[key]))}"
             for key in draw(st.lists(st.sampled_from(sorted(USUAL)), unique=True, max_size=6))]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # lines of any kind, anywhere
        if draw(st.booleans()):
            line = draw(st.sampled_from(OTHER_LINES))
        else:
            line = f"{draw(st.sampled_from(KEYS))}:{draw(st.sampled_from([' ', '  ', '']))}{draw(st.sampled_from(VALUES))}"
        lines.insert(draw(st.integers(0, len(lines))), line)
    closing = draw(st.sampled_from(CLOSINGS[:2] * 5 + CLOSINGS))
    text = "---\n" + "".join(line + "\n" for line in lines) + (closing + "\n" if closing else "") + draw(
        st.sampled_from(BODIES[:4] * 3 + BODIES))
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    return ("\ufeff" if draw(st.booleans()) else "") + text


@SETTINGS
@given(file_name=st.sampled_from(FILE_NAMES), text=item_texts(), cold=st.booleans())
@example(file_name=FILE_NAMES[0], text="---\ntitle: Add login\nblocked_by: [001, 002]\nfiles: [src/a.py]\n"
                                       "estimate: 30m\npriority: high\nowner: me\nstatus: pending\n---\nBody.\n",
         cold=True)
def test_the_usual_item_reads_as_the_full_path(monkeypatch: pytest.MonkeyPatch, file_name: str, text: str,
                                               cold: bool) -> None:
    if cold:
        items._LINE_MEMO.clear()
        items._SCALAR_MEMO.clear()
    expected = parsed_shape(full_parse(monkeypatch, file_name, text))
    for _ in range(2):  # (the second time from the memo)
        assert parsed_shape(parse_item(file_name, text, path=f".agent/queue/{file_name}")) == expected


@pytest.mark.parametrize("text", [
    "---\ntitle: Add login\nblocked_by: [001, 002]\nfiles: [src/a.py, 'b c.py']\nestimate: 30m\npriority: high\n---\n",
    "---\ntitle: x\nowner: me\nOwner: you\n---\n# Heading\nBody.\n",
    "---\nstatus: pending\nblocks: 7, 8\ncomponents: [api, ui]\ntimeout: 1h\ncommand: make test\n\n# note\n...\n",
    "---\ntitle:\nretries: 2\nisolation: worktree\n---\n#  The heading ##\n",
])
def test_the_usual_item_takes_the_shortcut(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """The usual shapes never reach the full path (else the speed work would be for nothing)."""
    expected = parsed_shape(full_parse(monkeypatch, "007-pending-x.md", text))
    monkeypatch.setattr(items, "_front_matter", lambda text: pytest.fail("the full path was taken"))
    assert parsed_shape(parse_item("007-pending-x.md", text, path=".agent/queue/007-pending-x.md")) == expected


@pytest.mark.parametrize("text", [
    "---\ntitle: x\ntitle: y\n---\n",  # one key twice: the last (no diagnostic)
    "---\nblocked_by: [1]\ndepends_on: [2]\n---\n",  # one field twice: an error
    "---\nowner: a\nowner: b\n---\n",  # one unknown key twice: one warning
    "---\nstatus: done\n---\n",  # status_mismatch
    "---\npriority: urgent\n---\n",  # a bad field
    "---\nresources: '{GPU: 1}'\n---\n",  # a mutable mapping
    "---\n# only a comment\n---\n",  # no entry: the loader decides
    "---\ntitle: x\n---\n**Files**: a.py\n",  # bold label lines
    "title: x\n",  # no front matter
])
def test_the_rest_takes_the_full_path(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    calls = []
    full = items._front_matter
    monkeypatch.setattr(items, "_front_matter", lambda text: calls.append(text) or full(text))
    parse_item("007-pending-x.md", text)
    assert calls


def test_each_item_has_its_own_lists_and_mappings() -> None:
    """Lines are memoized with their fields converted: no list of one item is another's (or the memo's)."""
    text = "---\nblocked_by: [1, 2]\nblocks: [3]\nfiles: [src/own.py]\ncomponents: [api]\n---\n"
    first, _ = parse_item("007-pending-x.md", text)
    second, _ = parse_item("008-pending-y.md", text)
    assert first is not None and second is not None
    for field in ("blocked_by", "blocks", "files", "components", "resources"):
        assert getattr(first, field) is not getattr(second, field)
    first.blocked_by.append(99)
    first.files.append("changed.py")
    third, _ = parse_item("009-pending-z.md", text)
    assert third is not None and (third.blocked_by, third.files) == ([1, 2], ["src/own.py"])


# --- plain integers: read without the resolvers ------------------------------------------------------------

DIGITS = ["0", "00", "000", "007", "010", "017", "08", "0189", "1", "7", "12", "100", "2024", "0" + "7" * 99,
          "0" + "7" * 100, "9" * 100, "9" * 101, "1" * 4300, "1" * 4301, "١٢٣", "1_000", "+1", "-1", "1 2"]


def loaded(source: str) -> object:
    try:
        return shape(yaml.load(source, Loader=items._ItemLoader))
    except yaml.YAMLError:
        return "refused"


@pytest.mark.parametrize("digits", DIGITS)
def test_plain_integers_read_as_the_loader_reads_them(digits: str) -> None:
    for value in (digits, f"[{digits}]", f"[{digits}, {digits}]", f"[ {digits} ,{digits} ]", f"[7, {digits}]"):
        source = f"k: {value}\n"
        fast = items._simple_front_matter(source)
        assert fast is None or shape(fast) == loaded(source), value


@SETTINGS
@given(parts=st.lists(st.from_regex(r"[0-9]{1,5}", fullmatch=True), min_size=1, max_size=4),
       spaces=st.lists(st.sampled_from(["", " ", "  "]), min_size=8, max_size=8))
def test_lists_of_integers_read_as_the_loader_reads_them(parts: list[str], spaces: list[str]) -> None:
    inner = ",".join(f"{spaces[i]}{part}{spaces[-i - 1]}" for i, part in enumerate(parts))
    source = f"blocked_by: [{inner}]\n"
    items._LINE_MEMO.clear()
    items._SCALAR_MEMO.clear()
    assert shape(items._simple_front_matter(source)) == loaded(source)


@pytest.mark.parametrize("comment", ["# plain", "#", "# café ☃", "# bell \x07", "# nul \x00", "# tab\there",
                                     "# esc \x1b[31m", "# del \x7f", "# line \u2028 sep", "# bom \ufeff"])
def test_comment_lines_read_as_the_loader_reads_them(comment: str) -> None:
    """A comment holding a character YAML refuses (a control character) is no blank line: the loader
    decides, and refuses the front matter as it would anywhere else."""
    source = f"title: x\n{comment}\n"
    items._LINE_MEMO.clear()
    fast = items._simple_front_matter(source)
    assert fast is None or shape(fast) == loaded(source), comment


# --- file names --------------------------------------------------------------------------------------------

name_parts = st.tuples(
    st.from_regex(r"[0-9]{0,11}", fullmatch=True),
    st.sampled_from([*names.STATUSES, "in", "done", "Pending", "in-progress", "", "pending_"]),
    st.from_regex(r"[a-z0-9\-_A-Z.]{0,8}", fullmatch=True),
    st.sampled_from([".md", ".md", ".MD", ".md.md", ".md\n", "md", ".mdx"]),
)


@SETTINGS
@given(parts=name_parts)
@example(parts=("007", "in", "progress-x", ".md"))
@example(parts=("999999999", "failed", "last", ".md"))
@example(parts=("0042", "blocked", "a-b-c", ".md"))
@example(parts=("001", "pending", "two--dashes", ".md"))
@example(parts=("001", "pending", "x-", ".md"))
def test_file_names_read_as_the_long_way(monkeypatch: pytest.MonkeyPatch, parts: tuple[str, str, str, str]) -> None:
    digits, status, slug, suffix = parts
    file_name = f"{digits}-{status}-{slug}{suffix}"
    quick = parse_name(file_name)
    with monkeypatch.context() as patch:
        patch.setattr(names, "_VALID_NAME", re.compile(r"(?!)"))  # matches nothing: every name the long way
        long_way = parse_name(file_name)
    assert type(quick) is type(long_way)
    assert quick == long_way
    if isinstance(quick, ItemName):
        assert shape(vars(quick)) == shape(vars(long_way))
        assert hash(quick) == hash(long_way)
