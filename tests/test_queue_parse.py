"""Parsing queue items: both syntaxes, every alias, and an exact diagnostic for every bad input.

The reader tests use real files in tmp_path: symlinks, a 50 MB file, binary and non-UTF-8 text,
a FIFO; the cache is checked through the reader's public `parse_count`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent_parallel.errors import PathOutsideWorkspace, QueueError
from agent_parallel.queue.items import Diagnostic, QueueReader, parse_file_name, parse_item
from agent_parallel.queue.names import ItemName

NAME_HELP = ("file name does not match NNN-STATUS-slug.md (NNN: 3 or more digits; STATUS: pending, in_progress, "
             "completed, blocked or failed; slug: lower-case words joined by -)")


# --- file names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "parts"), [
    ("007-pending-add-login.md", (7, "007", "pending", "add-login")),
    ("001-in_progress-x.md", (1, "001", "in_progress", "x")),
    ("120-completed-v2-api.md", (120, "120", "completed", "v2-api")),
    ("0042-blocked-a.md", (42, "0042", "blocked", "a")),
    ("999999999-failed-last.md", (999999999, "999999999", "failed", "last")),
])
def test_valid_file_names(name: str, parts: tuple) -> None:
    parsed = parse_file_name(name)
    assert isinstance(parsed, ItemName)
    assert (parsed.id, parsed.id_str, parsed.status, parsed.slug) == parts


@pytest.mark.parametrize(("name", "item", "message"), [
    ("notes.md", None, NAME_HELP),
    ("README.md", None, NAME_HELP),
    ("001-pending.md", None, NAME_HELP),
    ("7-pending-x.md", "7", "file name does not match NNN-STATUS-slug.md: the id must have at least 3 digits "
                            "(007, not 7)"),
    ("1" * 40 + "-pending-x.md", "1" * 40, "file name does not match NNN-STATUS-slug.md: the id has 40 digits, "
                                           "more than the 9 allowed"),
    ("001-done-x.md", "001", "file name has unknown status 'done'; use one of pending, in_progress, completed, "
                             "blocked or failed"),
    ("001-in-progress-x.md", "001", "file name has status in-progress; write it in_progress"),
    ("001-Pending-x.md", "001", "file name has unknown status 'Pending'; use one of pending, in_progress, "
                                "completed, blocked or failed"),
    ("001-pending-Foo_Bar.md", "001", "file name slug 'Foo_Bar' must be lower-case words joined by - "
                                      "(letters and digits only)"),
    ("001-pending-two--dashes.md", "001", "file name slug 'two--dashes' must be lower-case words joined by - "
                                          "(letters and digits only)"),
])
def test_bad_file_names(name: str, item: str | None, message: str) -> None:
    assert parse_file_name(name) == Diagnostic(kind="bad_name", item=item, file=name, message=message)
    assert parse_item(name, "# anything\n") == (None, [parse_file_name(name)])


# --- fields in both syntaxes -----------------------------------------------------------------------------

FRONT = """---
title: Build the API
blocked_by: [001, "#2", 010]
blocks: 12
files:
  - src/api/
  - ./src/shared/models.py
components: [backend, Auth]
priority: High
estimate: 1h30m
command: make api
timeout: 2h
---
# Heading that is not the title

Body text.
"""

BOLD = """# Build the API

**BlockedBy**: 001, #2, 010 (after the UI)
**Blocks**: 12
**Files**: `src/api/`, ./src/shared/models.py
**Components**: backend, Auth
**Priority**: high
**Estimate**: 90
**Command**: `make api`
**Timeout**: 2h

Body text.
"""

EXPECTED = {
    "title": "Build the API", "blocked_by": [1, 2, 10], "blocks": [12],
    "files": ["src/api", "src/shared/models.py"], "components": ["backend", "Auth"], "priority": "high",
    "estimate_s": 5400.0, "command": "make api", "timeout_s": 7200.0,
}


@pytest.mark.parametrize("text", [FRONT, BOLD], ids=["front-matter", "bold-labels"])
def test_both_syntaxes_give_the_same_item(text: str) -> None:
    item, diagnostics = parse_item("003-pending-build-api.md", text, path=".agent/queue/003-pending-build-api.md")
    assert diagnostics == []
    assert item is not None
    assert item.model_dump(include=set(EXPECTED)) == EXPECTED
    assert (item.id, item.id_str, item.status, item.slug) == (3, "003", "pending", "build-api")
    assert (item.file, item.path) == ("003-pending-build-api.md", ".agent/queue/003-pending-build-api.md")
    assert "Body text." in item.body


@pytest.mark.parametrize(("text", "field", "value"), [
    # every alias of blocked_by, in both syntaxes
    ("**BlockedBy**: 1, 2", "blocked_by", [1, 2]),
    ("**blockedBy**: 1", "blocked_by", [1]),
    ("**Depends On**: 1", "blocked_by", [1]),
    ("**Dependencies**: 1", "blocked_by", [1]),
    ("**Blocked-By:** 4", "blocked_by", [4]),
    ("- **BlockedBy**: 4", "blocked_by", [4]),
    ("---\nBlockedBy: [1]\n---\n", "blocked_by", [1]),
    ("---\nblockedBy: '1 2'\n---\n", "blocked_by", [1, 2]),
    ("---\ndepends_on: 5\n---\n", "blocked_by", [5]),
    ("---\ndependencies: [5, 6]\n---\n", "blocked_by", [5, 6]),
    # what a reference may look like
    ("**BlockedBy**: 002, 2, #2", "blocked_by", [2]),
    ("**BlockedBy**: 001 (needs the skeleton), 003", "blocked_by", [1, 3]),
    ("**BlockedBy**: 001 and 002; 003 & 004", "blocked_by", [1, 2, 3, 4]),
    ("**BlockedBy**: 001-pending-setup.md", "blocked_by", [1]),
    ("**BlockedBy**: none", "blocked_by", []),
    ("**BlockedBy**: None (first item)", "blocked_by", []),
    ("**BlockedBy**: -", "blocked_by", []),
    ("**BlockedBy**:", "blocked_by", []),
    ("**BlockedBy**:\n- 001\n- 002 (schema)\n\nText", "blocked_by", [1, 2]),
    ("---\nblocked_by: [010, 008]\n---\n", "blocked_by", [10, 8]),  # 010 is ten, not YAML 1.1 octal
    ("---\nblocked_by: []\n---\n", "blocked_by", []),
    ("---\nblocked_by:\n---\n", "blocked_by", []),
    # the other fields
    ("**Blocks**: 7, 8", "blocks", [7, 8]),
    ("**Files**: a.py b.py, c.py", "files", ["a.py", "b.py", "c.py"]),
    ("**Files**: app/(auth)/page.tsx (the login page)", "files", ["app/(auth)/page.tsx"]),
    ("**Files**:\n- `src/a.py`\n- src/b/\n", "files", ["src/a.py", "src/b"]),
    ("---\nfiles: [docs/My File.md, 'src/*.py']\n---\n", "files", ["docs/My File.md", "src/*.py"]),
    ("**Components**: auth service, billing", "components", ["auth service", "billing"]),
    ("**Priority**: Critical", "priority", "critical"),
    ("", "priority", "medium"),
    ("**Estimate**: 45s", "estimate_s", 45.0),
    ("**Estimate**: 2h", "estimate_s", 7200.0),
    ("---\nestimate: 30\n---\n", "estimate_s", 1800.0),
    ("---\nestimate: '1:30'\n---\n", "estimate_s", 5400.0),
    ("---\nestimate: 1:30\n---\n", "estimate_s", 5400.0),  # not YAML 1.1 sexagesimal 90
    ("**Timeout**: 10m", "timeout_s", 600.0),
    ("---\ncommand: |\n  make a\n  make b\n---\n", "command", "make a\nmake b"),
    ("**Command**: `sleep 1 && echo hi`", "command", "sleep 1 && echo hi"),
    # titles
    ("---\ntitle: From front matter\n---\n# Heading\n", "title", "From front matter"),
    ("**Title**: From a label\n# Heading\n", "title", "From a label"),
    ("Intro\n\n# The heading ##\n## Sub\n", "title", "The heading"),
    ("No heading at all", "title", "the-slug"),
    ("```\n# not a heading\n```\n", "title", "the-slug"),
    # labels inside code fences are examples, not fields
    ("```md\n**BlockedBy**: 001\n```\n**BlockedBy**: 002", "blocked_by", [2]),
    ("~~~\n**Files**: x\n~~~\n", "files", []),
    # front matter wins over a label; the first label wins over a later one
    ("---\nblocked_by: [1]\n---\n**BlockedBy**: 2\n", "blocked_by", [1]),
    ("---\npriority: low\n---\n**Priority**: high\n", "priority", "low"),
    ("**Priority**: low\n**Priority**: high\n", "priority", "low"),
    # Windows line ends and a byte order mark
    ("\ufeff---\r\nblocked_by: [3]\r\n---\r\n# T\r\n", "blocked_by", [3]),
    # unknown labels are prose
    ("**Note**: 001 is flaky\n", "blocked_by", []),
])
def test_fields(text: str, field: str, value: object) -> None:
    item, diagnostics = parse_item("050-pending-the-slug.md", text)
    assert [d for d in diagnostics if d.is_error] == []
    assert getattr(item, field) == value


# --- diagnostics inside a file -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind", "message"), [
    ("---\n- a\n- b\n---\n", "bad_front_matter",
     "front matter must be a mapping of fields (key: value lines), not a list"),
    ("---\njust words\n---\n", "bad_front_matter",
     "front matter must be a mapping of fields (key: value lines), not a string"),
    ("---\n42\n---\n", "bad_front_matter", "front matter must be a mapping of fields (key: value lines), not a number"),
    ("---\ntitle: x\n", "bad_front_matter", "front matter starts with --- on line 1 but has no closing --- line"),
    ("---\nblocked_by: {a: 1}\n---\n", "bad_field",
     "blocked_by must be a list of item ids or a comma-separated string, not a mapping"),
    ("**BlockedBy**: 001, abc", "bad_field", "blocked_by: 'abc' is not an item id (write ids like 007, 7 or #7)"),
    ("---\nblocks: [1234567890]\n---\n", "bad_field",
     "blocks: '1234567890' has more than 9 digits, so it cannot be an item id"),
    ("**BlockedBy**: " + "1" * 40, "bad_field", "blocked_by: '" + "1" * 40 + "' has more than 9 digits, "
                                                "so it cannot be an item id"),
    ("---\nblocked_by: [true]\n---\n", "bad_field", "blocked_by: True is not an item id (write ids like 007, 7 or #7)"),
    ("---\nfiles: [[a]]\n---\n", "bad_field", "files: each entry must be a string, not a list"),
    ("**Files**: /etc/passwd", "bad_field",
     "files: '/etc/passwd' is outside the workspace; give paths relative to the workspace root"),
    ("**Files**: src/../../x", "bad_field",
     "files: 'src/../../x' is outside the workspace; give paths relative to the workspace root"),
    ("---\ncomponents: {a: 1}\n---\n", "bad_field",
     "components must be a list of strings or a comma-separated string, not a mapping"),
    ("**Priority**: urgent", "bad_field", "priority: 'urgent' is not one of critical, high, medium, low"),
    ("**Estimate**: soon", "bad_field",
     "estimate: 'soon' is not a duration (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ("**Timeout**: 0", "bad_field", "timeout must be longer than 0"),
    ("---\ncommand: [make, all]\n---\n", "bad_field", "command must be a string (one shell command line), not a list"),
    ("---\ntitle: [a]\n---\n", "bad_field", "title must be a string, not a list"),
    ("---\nblocked_by: [1]\ndepends_on: [2]\n---\n", "bad_field",
     "blocked_by is given twice in the front matter (as blocked_by and depends_on); keep one"),
    ("---\ndependson: [1]\nestimat: 5\n---\n", "unknown_field",
     "unknown key front matter field estimat ignored; did you mean estimate?"),
    ("**Status**: completed", "status_mismatch",
     "the **Status** line says 'completed' but the file name says 'pending'; the file name is what counts "
     "(rename the file to change the status)"),
    ("---\nstatus: done\n---\n", "status_mismatch",
     "the front matter field status says 'done' but the file name says 'pending'; the file name is what counts "
     "(rename the file to change the status)"),
])
def test_diagnostics(text: str, kind: str, message: str) -> None:
    item, diagnostics = parse_item("005-pending-x.md", text)
    assert item is not None  # the item is still known, so what waits on it can say why it is stuck
    assert diagnostics == [Diagnostic(kind=kind, item="005", file="005-pending-x.md", message=message)]


def test_repeated_entries_are_kept_once_in_first_seen_order() -> None:
    """`files`, `components` and `blocked_by` drop repeats, keeping the first of each in its place (done with
    a set beside the list: `in` on the list made an item of 60,000 files take 33 s to parse)."""
    files = ", ".join(["b.py", "a.py", "./b.py", "c.py", "a.py"] + [f"f{i}" for i in range(20_000)] * 2)
    text = (f"---\nfiles: [{files}]\ncomponents: api, db, api\nblocked_by: [9, 3, 009, 3, 4]\n---\n# Item\n")
    item, diagnostics = parse_item("001-pending-x.md", text)
    assert diagnostics == [] and item is not None
    assert item.files[:3] == ["b.py", "a.py", "c.py"] and len(item.files) == 3 + 20_000
    assert item.files[3:] == [f"f{i}" for i in range(20_000)]
    assert (item.components, item.blocked_by) == (["api", "db"], [9, 3, 4])


def test_invalid_yaml_says_where() -> None:
    item, [diagnostic] = parse_item("005-pending-x.md", "---\ntitle: ok\nfiles: [a\n---\n")
    assert diagnostic.kind == "bad_front_matter"
    assert diagnostic.message.startswith("front matter is not valid YAML: ")
    assert diagnostic.message.endswith("(line 4, column 1)")  # counted in the file, the --- line is line 1


@pytest.mark.parametrize("status", ["pending", "Pending", "in progress"])
def test_a_status_line_agreeing_with_the_name_is_fine(status: str) -> None:
    name = "005-in_progress-x.md" if " " in status else "005-pending-x.md"
    assert parse_item(name, f"**Status**: {status}\n")[1] == []


def test_warnings_are_not_errors() -> None:
    _, diagnostics = parse_item("005-pending-x.md", "**Status**: completed\n")
    assert [d.is_error for d in diagnostics] == [False]
    _, diagnostics = parse_item("005-pending-x.md", "**Priority**: urgent\n")
    assert [d.is_error for d in diagnostics] == [True]


def test_yaml_alias_bomb_is_a_diagnostic_not_a_hang() -> None:
    bomb = "---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n" \
           "files: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n---\n"
    item, diagnostics = parse_item("005-pending-x.md", bomb)
    assert item is not None and item.files == []
    assert {d.kind for d in diagnostics} == {"unknown_field", "bad_field"}


def test_deeply_nested_yaml_is_a_diagnostic() -> None:
    item, [diagnostic] = parse_item("005-pending-x.md", "---\nfiles: " + "[" * 5000 + "]" * 5000 + "\n---\n")
    assert diagnostic.kind in ("bad_front_matter", "bad_field")


# --- the reader ------------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    (workspace / ".agent" / "queue").mkdir(parents=True)
    return workspace


def queue(root: Path) -> Path:
    return root / ".agent" / "queue"


def write(root: Path, name: str, text: str | bytes = "# Item\n") -> Path:
    path = queue(root) / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_reader_reads_items_in_name_order_and_skips_what_is_not_markdown(root: Path) -> None:
    write(root, "002-pending-b.md", "**BlockedBy**: 001\n")
    write(root, "001-completed-a.md")
    write(root, "notes.txt", "not an item")
    write(root, ".hidden.md", "editor swap file")
    (queue(root) / "archive").mkdir()
    write(root, "archive/003-pending-old.md")
    items, diagnostics = QueueReader().read(root, ".agent/queue")
    assert [(item.file, item.path) for item in items] == [
        ("001-completed-a.md", ".agent/queue/001-completed-a.md"),
        ("002-pending-b.md", ".agent/queue/002-pending-b.md"),
    ]
    assert items[1].blocked_by == [1]
    assert diagnostics == []


def test_reader_reports_other_markdown_files(root: Path) -> None:
    write(root, "README.md", "# About this queue\n")
    items, diagnostics = QueueReader().read(root, ".agent/queue")
    assert items == []
    assert diagnostics == [Diagnostic(kind="bad_name", file="README.md", message=NAME_HELP)]


def refused(kind: str, name: str, message: str) -> Diagnostic:
    return Diagnostic(kind=kind, item=name[:3], file=name, message=message)


def test_reader_refuses_a_50_mb_file_without_reading_it(root: Path) -> None:
    with open(queue(root) / "001-pending-huge.md", "wb") as stream:
        stream.truncate(50 * 1024 * 1024)
    reader = QueueReader()
    items, diagnostics = reader.read(root, ".agent/queue")
    assert diagnostics == [refused("too_large", "001-pending-huge.md",
                                   "file is 52428800 bytes, over the 1048576-byte limit for a queue item; "
                                   "keep long material in another file and link to it")]
    assert [(item.id, item.title, item.blocked_by) for item in items] == [(1, "huge", [])]  # known by name
    assert reader.parse_count == 0


def test_reader_refuses_binary_and_non_utf8_files(root: Path) -> None:
    write(root, "001-pending-image.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(root, "002-pending-latin.md", "# Caf\xe9\n".encode("latin-1"))
    _, diagnostics = QueueReader().read(root, ".agent/queue")
    assert diagnostics == [
        refused("binary", "001-pending-image.md",
                "file looks binary (it contains NUL bytes); a queue item must be UTF-8 markdown"),
        refused("not_utf8", "002-pending-latin.md",
                "file is not valid UTF-8 (byte 0xe9 at offset 5); save it as UTF-8"),
    ]


def test_reader_refuses_a_symlink_pointing_outside_the_workspace(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.md"
    secret.write_text("**BlockedBy**: 001\n")
    (queue(root) / "001-pending-leak.md").symlink_to(secret)
    items, diagnostics = QueueReader().read(root, ".agent/queue")
    assert diagnostics == [refused("outside_workspace", "001-pending-leak.md",
                                   f"symlink points outside the workspace root (to {secret.resolve()}); refused")]
    assert items[0].blocked_by == []  # nothing of the target was read


def test_reader_follows_a_symlink_inside_the_workspace(root: Path) -> None:
    (root / "docs").mkdir()
    (root / "docs" / "task.md").write_text("**BlockedBy**: 002\n")
    (queue(root) / "001-pending-linked.md").symlink_to(root / "docs" / "task.md")
    items, diagnostics = QueueReader().read(root, ".agent/queue")
    assert diagnostics == [] and items[0].blocked_by == [2]


def test_reader_reports_a_dangling_symlink_and_a_fifo(root: Path) -> None:
    (queue(root) / "001-pending-gone.md").symlink_to(root / "missing.md")
    os.mkfifo(queue(root) / "002-pending-pipe.md")
    _, diagnostics = QueueReader().read(root, ".agent/queue")
    assert diagnostics == [
        refused("unreadable", "001-pending-gone.md", "cannot be read: No such file or directory"),
        refused("unreadable", "002-pending-pipe.md", "is not a regular file (a device, socket or pipe); refused"),
    ]


def test_reader_reports_a_40_digit_id(root: Path) -> None:
    name = "1" * 40 + "-pending-x.md"
    write(root, name)
    items, diagnostics = QueueReader().read(root, ".agent/queue")
    assert items == []
    assert diagnostics == [Diagnostic(kind="bad_name", item="1" * 40, file=name,
                                      message="file name does not match NNN-STATUS-slug.md: the id has 40 digits, "
                                              "more than the 9 allowed")]


def test_queue_dir_outside_the_workspace_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    with pytest.raises(PathOutsideWorkspace, match=r"^queue_dir '\.\./other' resolves outside the workspace root"):
        QueueReader().read(root, "../other")
    with pytest.raises(PathOutsideWorkspace, match=r"^queue_dir '/' resolves outside"):
        QueueReader().read(root, "/")


def test_queue_dir_that_is_a_symlink_pointing_outside_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (root / "q").symlink_to(tmp_path / "other")
    with pytest.raises(PathOutsideWorkspace, match=r"^queue_dir 'q' resolves outside the workspace root"):
        QueueReader().read(root, "q")


def test_missing_queue_dir_names_the_path(root: Path) -> None:
    with pytest.raises(QueueError) as caught:
        QueueReader().read(root, "nowhere")
    assert str(caught.value) == (f"queue directory 'nowhere' does not exist ({root.resolve()}/nowhere); create it "
                                 f"and add one NNN-STATUS-slug.md file per work item, or pass another queue_dir")
    (root / "file").write_text("")
    with pytest.raises(QueueError, match=r"^queue_dir 'file' is not a directory"):
        QueueReader().read(root, "file")


def test_unchanged_files_are_not_parsed_again(root: Path) -> None:
    for number in range(1, 6):
        write(root, f"{number:03d}-pending-item-{number}.md", f"**BlockedBy**: {number - 1}\n" if number > 1 else "")
    reader = QueueReader()
    first = reader.snapshot(root, ".agent/queue")
    assert reader.parse_count == 5
    assert reader.snapshot(root, ".agent/queue") is first  # nothing changed: the same snapshot
    assert reader.parse_count == 5

    path = queue(root) / "003-pending-item-3.md"
    path.write_text("**BlockedBy**: 001\n# Changed\n")
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    second = reader.snapshot(root, ".agent/queue")
    assert reader.parse_count == 6 and second is not first
    assert [item.blocked_by for item in second.items if item.id == 3] == [[1]]

    path.rename(queue(root) / "003-in_progress-item-3.md")  # a status move is a new name
    third = reader.snapshot(root, ".agent/queue")
    assert reader.parse_count == 7
    assert [item.status for item in third.items if item.id == 3] == ["in_progress"]

    (queue(root) / "005-pending-item-5.md").unlink()
    fourth = reader.snapshot(root, ".agent/queue")
    assert reader.parse_count == 7 and len(fourth.items) == 4


def test_refused_files_are_not_re_examined_while_unchanged(root: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.md").write_text("x")
    (queue(root) / "001-pending-leak.md").symlink_to(tmp_path / "secret.md")
    write(root, "002-pending-latin.md", b"\xe9")
    reader = QueueReader()
    first = reader.snapshot(root, ".agent/queue")
    assert reader.snapshot(root, ".agent/queue") is first
