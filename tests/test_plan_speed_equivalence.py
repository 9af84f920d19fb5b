"""The speed work of issue 11 changed no result: parsing and planning give what they gave before.

`tests/legacy_plan.py` is the parser and planner as they were before (a verbatim copy). Here both
parse generated item files (front matter written every way YAML allows, and ways it refuses) and
plan generated queues (dependencies, `blocks`, cycles, duplicate ids, dangling references, bad
names and fields, conflicting files and components, every status), and every field of the
results must be equal: items, diagnostics and their messages, readiness, waves, conflicts,
bounds, Mermaid.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import legacy_plan as legacy
from agent_parallel.queue import items as new_items
from agent_parallel.queue.items import MAX_TITLE_CHARS, QueueReader, parse_item
from agent_parallel.queue.plan import plan_workspace
from agent_parallel.queue import planner as new_planner
from agent_parallel.queue.planner import make_plan
from agent_parallel.text import cut

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- one file: the front matter fast path against PyYAML ---------------------------------------------------

KEYS = ["title", "Title", "blocked_by", "blockedBy", "Blocked By", "depends-on", "dependencies", "blocks", "files",
        "components", "priority", "estimate", "command", "timeout", "status", "owner", "yes", "no", "null", "~",
        "<<", "=", "123", "0x1f", "1.5", "-key", "?key", "&a key", "*a", "!tag", "k#x", "a #b", "k\tt", "a b", "é", "k ",
        " k", "[k]", "{k}", "'k'", '"k"', "2024-01-01", "on", "OFF", "", "tïtle"]
SCALARS = ["x", "Fix the parser", "yes", "No", "TRUE", "off", "y", "n", "null", "Null", "~", "", "0", "007", "010",
           "08", "-3", "+4", "1_000", "0x1F", "0o17", "0b101", "017", "1:30", "1:30:15", "190:20:30", "1.5", ".5",
           "1e3", "1.0e+3", ".inf", "-.INF", ".nan", "2024-01-01", "2024-01-01 10:00:00", "45s", "5m", "2h",
           "1h30m", "=", "<<", "src/a.py", "src/*.py", "**/x", "a, b", "a; b", "001, 002", "#7", "7 (after)",
           "a # comment", "a:b", "a: b", "a:", "http://x.y/z", "- x", "-x", "?x", ":x", ",x", "[x", "]x", "{x", "}x",
           "&a x", "*a", "!!str 5", "!x", "|", ">", "|-\n  block", "'q'", "'it''s'", "'unterminated", '"dq"',
           '"esc \\n"', '"a\\"b"', '"unterminated', "%x", "@x", "`cmd`", "a`b", "a%b", "x — y", "🎉 party",
           "a\xa0", "\xa0a", "a\x85b", "a\u2028b", "a\ufeffb", "tab\there", "ctl\x07", "del\x7f", "a  b", "a ",
           "[]", "[ ]", "[a, b]", "[a,b]", "[a , b ]", "[001, 2, '3', \"4\"]", "[a, , b]", "[a, b,]", "[, a]",
           "[a, [b]]", "[a, {b: c}]", "[a: b]", "[a b]", "[yes, ~, 0x1, 1.5]", "['a, b', c]", "[*a]", "[&a x]",
           "[-x]", "[x-]", "[a#b]", "[a #b]", "[it's]", "[a", "a]", "{a: 1}", "{}", "9" * 120, "1" * 4300]
"""(Past Python's 4,300-digit limit the legacy reader refused the whole front matter with Python's own
message; the new one names the field: tests/test_queue_faults.py pins that.)"""
LINES = ["", "   ", "# a comment", "  # indented comment", "---", "...", "- item", "  - item", "  nested: x",
         "continued text", "%YAML 1.1", "key: value # comment", "a: &x [1, 2]", "b: *x", "? complex",
         "key:value", "k:  two spaces", "k:\tv"]


@st.composite
def front_lines(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.sampled_from(LINES)))
        elif kind == 1:
            lines.append(draw(st.sampled_from(KEYS)) + ":" + draw(st.text(
                st.sampled_from(" ab:#[],'\"-*&!|>%@`\t\x85\u2028é🎉0123~."), max_size=12)))
        else:
            value = draw(st.sampled_from(SCALARS))
            space = draw(st.sampled_from([" ", " ", "  ", ""]))
            lines.append(f"{draw(st.sampled_from(KEYS))}:{space}{value}{draw(st.sampled_from(['', '', ' ']))}")
    return "\n".join(lines)


ADDED_SINCE = {"isolation": [None, "none"], "allow_overlap": [False], "integration_estimate": [None],
               "integration_samples": [0], "predicted_conflicts": [[]], "predicted_conflicts_total": [0],
               "forecast": [None], "resources": [{}], "retries": [None]}
"""Fields added since the legacy copy, with their values in a queue without isolation."""


def dump(value: object) -> object:
    """``model_dump()`` with every field, also those left out of answers while None (``fields.omitted_if_none``):
    the legacy models dump them all."""
    if isinstance(value, BaseModel):
        return {name: dump(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, list):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    return value


def as_before(value: object) -> object:
    """A dump without what was added since the legacy copy: the isolation fields, `resources` and `retries`
    (`ADDED_SINCE`, at their values when not used), a plan's `waves_total` (checked: the number of its waves)
    and their names in the list of known fields of an unknown-field warning."""
    if isinstance(value, dict) and "waves_total" in value:
        assert value["waves_total"] == len(value["waves"])
        value = {k: v for k, v in value.items() if k != "waves_total"}
    if isinstance(value, dict):
        return {k: as_before(v) for k, v in value.items()
                if v not in ADDED_SINCE.get(k, [])}
    if isinstance(value, list):
        return [as_before(v) for v in value]
    if isinstance(value, str):
        return value.replace(", timeout, isolation, resources, retries)", ", timeout)")
    return value


def same_parse(file_name: str, text: str) -> None:
    item, diagnostics = parse_item(file_name, text, path=f".agent/queue/{file_name}")
    old_item, old_diagnostics = legacy.parse_item(file_name, text, path=f".agent/queue/{file_name}")
    old = old_item and old_item.model_dump()
    if old and len(old["title"]) > MAX_TITLE_CHARS:  # cut since the legacy copy, saying so (long_title)
        old["title"] = cut(old["title"], MAX_TITLE_CHARS)
        assert [d.kind for d in diagnostics].count("long_title") == 1
        diagnostics = [d for d in diagnostics if d.kind != "long_title"]
    assert as_before(item and dump(item)) == old
    assert [as_before(dump(d)) for d in diagnostics] == [d.model_dump() for d in old_diagnostics]


@SETTINGS
@given(front=front_lines(), body=st.sampled_from(["", "Body.\n", "# Heading\n\n**Files**: a.py\n", "**Status**: done\n"]),
       bom=st.booleans(), crlf=st.booleans())
@example(front="title: x\nblocked_by: [001, 002]\nfiles: [src/a.py]\nestimate: 5m", body="", bom=False, crlf=False)
def test_front_matter_reads_as_before(front: str, body: str, bom: bool, crlf: bool) -> None:
    text = f"---\n{front}\n---\n{body}"
    if crlf:
        text = text.replace("\n", "\r\n")
    same_parse("007-pending-some-item.md", ("\ufeff" if bom else "") + text)


@pytest.mark.parametrize("value", SCALARS)
@pytest.mark.parametrize("key", ["title", "blocked_by", "files", "estimate", "status", "command", "yes", "owner",
                                 "title ", "a b", "k#x", "a #b", "~"])
def test_each_scalar_reads_as_before(key: str, value: str) -> None:
    for text in (f"---\n{key}: {value}\n---\n", f"---\n{key}: [{value}]\n---\n", f"---\n{key}:\n  - {value}\n---\n"):
        same_parse("012-pending-x.md", text)
        same_parse("012-pending-x.md", f"---\ntitle: t\n{text[4:]}")


def test_the_fast_path_reads_the_usual_shape() -> None:
    """The usual front matter does not go to PyYAML (else the speed work would be for nothing)."""
    assert new_items._simple_front_matter(
        "title: Add login\nblocked_by: [001, 002]\nfiles: [src/a.py, 'b c.py']\nestimate: 30m\npriority: high\n"
    ) == {"title": "Add login", "blocked_by": [1, 2], "files": ["src/a.py", "b c.py"], "estimate": "30m",
          "priority": "high"}
    assert new_items._simple_front_matter("title: x\nfiles:\n  - a.py\n") is None  # block lists: the loader


def test_a_memoized_line_gives_each_item_its_own_list() -> None:
    """Lines are memoized (`_LINE_MEMO`): a list read from one is never shared by two items."""
    source = "files: [src/memo-test.py, src/other.py]\n"
    first = new_items._simple_front_matter(source)
    assert first is not None
    first["files"].append("changed.py")
    assert new_items._simple_front_matter(source) == {"files": ["src/memo-test.py", "src/other.py"]}


def test_the_memos_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(new_items, "_MEMO_ENTRIES", 10)
    for i in range(50):
        assert new_items._simple_front_matter(f"title: memo bound {i}\n") == {"title": f"memo bound {i}"}
    assert len(new_items._LINE_MEMO) <= 10 and len(new_items._SCALAR_MEMO) <= 10


# --- whole queues: files on disk, planned by both --------------------------------------------------------


FILE_POOL = ["src", "src/a.py", "src/b.py", "src/*.py", "src/c", "docs", "docs/x.md", "*.md", "lib/*.c", "lib/x.c",
             "README.md", "src/**/*.py", "[dl]*/x.*", ".", "../out", "/abs"]
STATUSES = ["pending"] * 6 + ["completed", "completed", "in_progress", "failed", "blocked"]


def random_queue(root: Path, rng: random.Random, size: int, *, cycles: bool) -> None:
    """Item files of every kind: front matter or bold labels, good and bad."""
    queue = root / ".agent" / "queue"
    queue.mkdir(parents=True)
    for number in range(1, size + 1):
        status = rng.choice(STATUSES)
        pool = [n for n in range(1, size + 2) if n != number] if cycles else list(range(1, number)) or [size + 5]
        deps = rng.sample(pool, min(len(pool), rng.randint(0, 3)))
        if rng.random() < 0.05:
            deps.append(number)  # a self reference
        files = rng.sample(FILE_POOL, rng.randint(0, 2))
        fields = {
            "title": rng.choice([f"Item {number}", f"Fix [/x] {number} — \"quoted\"", "", f"'{number}'"]),
            "blocked_by": "[" + ", ".join(f"{d:03d}" for d in deps) + "]" if rng.random() < 0.8
            else ", ".join(f"#{d}" for d in deps),
            "files": "[" + ", ".join(files) + "]",
            "estimate": rng.choice(["45s", "5m", "2h", "10", "1:30", "0", "-5", "soon", "1.5"]),
            "priority": rng.choice(["high", "low", "medium", "critical", "urgent"]),
        }
        if rng.random() < 0.3:
            fields["components"] = rng.choice(["api", "[api, db]", "UI", "ui"])
        if rng.random() < 0.2 and number < size:
            fields["blocks"] = f"[{rng.randint(number + 1, size):03d}]"
        if rng.random() < 0.1:
            fields["status"] = rng.choice(["done", status])
        if rng.random() < 0.05:
            fields["owner"] = "me"
        if rng.random() < 0.6:
            text = "---\n" + "".join(f"{key}: {value}\n" for key, value in fields.items()) + "---\nDo it.\n"
        else:
            labels = {"blocked_by": "BlockedBy", "files": "Files", "estimate": "Estimate", "priority": "Priority",
                      "components": "Components", "blocks": "Blocks", "status": "Status", "owner": "Owner"}
            text = f"# {fields.pop('title') or 'Untitled'}\n\n" + "".join(
                f"**{labels[key]}**: {value.strip('[]')}\n" for key, value in fields.items()) + "\nDo it.\n"
        if rng.random() < 0.03:
            text = "---\ntitle: [unclosed\n---\n"
        slug = rng.choice(["item", "item", "x-y"])
        ident = number if rng.random() > 0.04 else max(1, number - 1)  # a few duplicate ids
        name = f"{ident:03d}-{status}-{slug}-{number}.md"
        if rng.random() < 0.02:
            name = rng.choice([f"{number}-pending-x.md", f"{number:03d}-done-x.md", f"{number:03d}-pending-X.md"])
        (queue / name).write_text(text)


def same_plan(root: Path, max_parallel: int) -> None:
    new = plan_workspace(root, None, max_parallel, QueueReader())
    old = legacy.plan_workspace(root, None, max_parallel, legacy.QueueReader())
    assert as_before(dump(new)) == old.model_dump()


@pytest.mark.parametrize("seed", range(40))
def test_random_queues_plan_as_before(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    random_queue(tmp_path, rng, rng.choice([1, 3, 8, 20, 60]), cycles=seed % 3 == 0)
    same_plan(tmp_path, rng.randint(1, 6))


@pytest.mark.parametrize("seed", range(3))
def test_large_queues_plan_as_before(tmp_path: Path, seed: int) -> None:
    """Large enough for the drawn-in-part Mermaid, many conflict pairs and long waves."""
    rng = random.Random(1000 + seed)
    random_queue(tmp_path, rng, 400, cycles=seed == 2)
    same_plan(tmp_path, 5)


def test_plans_of_items_as_before() -> None:
    """`make_plan` on items built in memory (the run engine's path), with `running` slots taken."""
    rng = random.Random(5)
    for _ in range(30):
        size = rng.randint(1, 40)
        rows = []
        for number in range(1, size + 1):
            rows.append(dict(
                id=number, id_str=f"{number:03d}", file=f"{number:03d}-{rng.choice(STATUSES)}-x.md", path="", slug="x",
                title="x", blocked_by=rng.sample(range(1, size + 1), rng.randint(0, 2)),
                files=rng.sample(FILE_POOL[:13], rng.randint(0, 2)), components=rng.sample(["api", "db"], rng.randint(0, 1)),
                estimate_s=rng.choice([None, 0.0, 30.0, 600.0]), priority=rng.choice(["high", "medium", "low"])))
        for row in rows:
            row["status"] = row["file"].split("-")[1]
        max_parallel, running = rng.randint(1, 5), rng.randint(0, 2)
        new = make_plan([new_items.WorkItem(**row) for row in rows], [], max_parallel, running=running)
        old = legacy.make_plan([legacy.WorkItem(**row) for row in rows], [], max_parallel, running=running)
        assert as_before(dump(new)) == old.model_dump()


def test_plans_with_a_large_group_of_patterns_as_before() -> None:
    """Over 16 patterns with one literal start and end (``docs/*{k}*.md``) are one key in the new index:
    the same conflicts (each pair naming its own patterns), waves and bounds; only the conflict groups
    differ (one group for the merged patterns, named with their number, instead of one per pattern)."""
    rng = random.Random(7)
    pool = [f"docs/*{k}*.md" for k in range(24)] + ["docs/12.md", "docs", "*.md", "docs/*.txt", "lib/*", "docs/a/*b*.md"]
    merged = 0
    for _ in range(12):
        size = rng.randint(30, 60)
        rows = [dict(id=number, id_str=f"{number:03d}", file=f"{number:03d}-pending-x.md", path="", slug="x",
                     status="pending", title="x", blocked_by=rng.sample(range(1, number), min(number - 1, rng.randint(0, 1))),
                     files=rng.sample(pool, rng.randint(1, 2)), estimate_s=rng.choice([None, 30.0, 600.0]))
                for number in range(1, size + 1)]
        new = make_plan([new_items.WorkItem(**row) for row in rows], [], 3)
        old = legacy.make_plan([legacy.WorkItem(**row) for row in rows], [], 3)
        new_dump, old_dump = as_before(dump(new)), old.model_dump()
        assert isinstance(new_dump, dict)
        new_groups, old_groups = new_dump.pop("conflict_groups"), old_dump.pop("conflict_groups")
        assert new_dump == old_dump
        merged += any("more patterns with its literal start and end" in group["name"] for group in new_groups)
        assert len(new_groups) <= len(old_groups)
    assert merged > 6  # most queues drew more than 16 of the patterns


def test_rows_built_without_validation_equal_validated_ones(tmp_path: Path) -> None:
    """`items.trusted` skips validating parsed items and plan rows: each must equal its validated
    twin, down to the fields set and the lists being its own (a plan row's not the item's)."""
    from agent_parallel.queue.items import WorkItem
    from agent_parallel.queue.planner import PlanItem

    random_queue(tmp_path, random.Random(3), 60, cycles=True)
    reader = QueueReader()
    plan = plan_workspace(tmp_path, None, 3, reader)
    items = {item.file: item for item in reader.snapshot(tmp_path, ".agent/queue").items}
    for item in items.values():
        twin = WorkItem.model_validate(item.model_dump(), strict=True)
        assert item == twin and item.model_fields_set == twin.model_fields_set and repr(item) == repr(twin)
    for row in plan.items:
        twin = PlanItem.model_validate(dump(row))
        assert row == twin and row.model_fields_set == twin.model_fields_set
        assert row.model_dump_json() == twin.model_dump_json() and repr(row) == repr(twin)
        assert row.files is not items[row.file].files and row.components is not items[row.file].components


def test_cli_plan_loads_neither_the_mcp_sdk_nor_rich_for_json(tmp_path: Path) -> None:
    """`agent-parallel plan --format json` stays quick: no MCP stack, no anyio, no rich."""
    import subprocess
    import sys

    random_queue(tmp_path, random.Random(4), 10, cycles=False)
    code = ("import contextlib, io, sys\nfrom agent_parallel.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main(['plan', '--format', 'json', '--root', {str(tmp_path)!r}])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mcp', 'anyio', 'rich', 'starlette', 'httpx'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stderr



# --- the scheduler driven through whole runs: starts, successes, failures, outside starts -------------------


def drive(module, rows: list[dict], seed: int) -> list[object]:
    """One run of `module`'s Scheduler: at each step, start what free slots allow, then end a random
    running item (ok or failed), sometimes mark a ready item running from outside (as the run engine's
    retries do). Returns everything it said."""
    rng = random.Random(seed)
    graph = module.build_graph([module.WorkItem(**row) for row in rows], [])
    scheduler = module.Scheduler(graph)
    said: list[object] = [scheduler.ready()]
    slots = rng.randint(1, 6)
    for _ in range(4 * len(rows)):
        said.append(scheduler.start_next(slots - len(scheduler.running)))
        if rng.random() < 0.05 and scheduler.ready():
            outside = rng.choice(scheduler.ready())
            scheduler.running.add(outside)
            said.append(("outside", outside))
        if not scheduler.running:
            break
        ended = rng.choice(sorted(scheduler.running))
        said.append((ended, scheduler.finished(ended, ok=rng.random() > 0.1), scheduler.ready(), scheduler.idle))
    said.append((scheduler.not_started(), sorted(scheduler.done), sorted(scheduler.failed), scheduler.skipped))
    return said


def scheduler_rows(rng: random.Random, size: int, files: list[str], file_counts: list[int], components: list[str],
                   most_components: int, fewest_components: int = 0) -> list[dict]:
    """`size` items, most pending (some in progress or completed), each waiting on up to two earlier ones,
    with a few of `files` (how many: drawn from `file_counts`) and `fewest_components` to `most_components`
    components."""
    rows = []
    for number in range(1, size + 1):
        status = rng.choice(["pending"] * 8 + ["in_progress", "completed"])
        rows.append(dict(
            id=number, id_str=f"{number:03d}", file=f"{number:03d}-{status}-x.md", path="", slug="x", status=status,
            title="x", blocked_by=rng.sample(range(1, number), min(number - 1, rng.choice([0, 0, 1, 2]))),
            files=rng.sample(files, rng.choice(file_counts)),
            components=rng.sample(components, rng.randint(fewest_components, most_components)),
            estimate_s=rng.choice([None, 30.0, 600.0]), priority=rng.choice(["high", "medium", "low"])))
    return rows


@pytest.fixture(params=["chosen", "parked", "bits"])
def ready_kept(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a scheduler test three ways: its ready items kept as the scheduler chooses (`_bit_counters`),
    always parked, and as bits whenever the counters are few enough (`ConflictIndex.counter_bits`)."""
    if request.param == "parked":
        monkeypatch.setattr(new_planner, "_bit_counters", lambda index: None)
    elif request.param == "bits":
        monkeypatch.setattr(new_planner, "_bit_counters", lambda index: index.counter_bits)
    return request.param


def uses_bits(rows: list[dict]) -> bool:
    """Whether the new scheduler keeps these items' ready items as bits."""
    graph = new_planner.build_graph([new_items.WorkItem(**row) for row in rows], [])
    return new_planner.Scheduler(graph)._bits is not None


@pytest.mark.parametrize("seed", range(30))
def test_the_scheduler_runs_queues_as_before(seed: int, ready_kept: str) -> None:
    """Many items drawing the same few components and files (twins, listed once in the new scheduler),
    with dependencies: every start, skip and readiness answer is the one the legacy scheduler gave."""
    rng = random.Random(seed)
    size = rng.choice([5, 30, 120])
    components = ["api", "db", "ui", "cli", "docs", "core"][: rng.randint(1, 6)]
    rows = scheduler_rows(rng, size, FILE_POOL[:13], [0, 0, 1], components, min(2, len(components)))
    assert drive(new_planner, rows, seed) == drive(legacy, rows, seed)


@pytest.mark.parametrize("seed", [*range(20), 242, 352, 827])
def test_the_scheduler_runs_queues_under_a_wide_directory_as_before(seed: int, ready_kept: str) -> None:
    """Items holding ``src``, which overlaps 20 files held by another item (so it is checked through a
    ``held`` counter that starting a twin does not raise, and a freed counter wakes its parked
    listings one after another). Seeds 242, 352 and 827 once caught a twin listed behind a counter
    already at zero, and a wake-up lost when a better twin arrived."""
    rng = random.Random(seed)
    size = rng.choice([10, 40, 100])
    rows = scheduler_rows(rng, size, ["src"] * 5 + [f"src/f{i}.py" for i in range(3)], [0, 1], ["a", "b"], 1)
    rows.append(dict(id=size + 1, id_str=f"{size + 1:03d}", file=f"{size + 1:03d}-pending-y.md", path="", slug="y",
                     status="pending", title="y", files=[f"src/f{i}.py" for i in range(3, 23)]))
    assert drive(new_planner, rows, seed) == drive(legacy, rows, seed)


def dense_rows(rng: random.Random, size: int, pool: int) -> list[dict]:
    """Items drawing 2 to all of `pool` components (nearly each its own key set), a few with a file too."""
    components = [f"c{i}" for i in range(pool)]
    return scheduler_rows(rng, size, FILE_POOL[:13], [0, 0, 0, 1], components, pool, fewest_components=2)


@pytest.mark.parametrize("seed", range(40))
def test_the_scheduler_runs_queues_with_dense_distinct_conflicts_as_before(seed: int, ready_kept: str) -> None:
    """Many of a few components per item: the shape the bits are for (thousands of key sets woke millions
    of parked listings), chosen by the scheduler itself from 60 items on."""
    rng = random.Random(seed)
    size = rng.choice([12, 60, 150])
    rows = dense_rows(rng, size, rng.randint(4, 20))
    if ready_kept == "chosen" and size >= 60:
        assert uses_bits(rows)
    assert drive(new_planner, rows, seed) == drive(legacy, rows, seed)


@pytest.mark.parametrize("seed", range(12))
def test_the_scheduler_runs_queues_with_too_many_counters_for_bits_as_before(seed: int, ready_kept: str) -> None:
    """Past `FEW_COUNTERS` (65 to 90 components, 3 to 12 per item) the ready items stay parked, even when
    bits are asked for."""
    rng = random.Random(seed)
    size = rng.choice([80, 150])
    rows = scheduler_rows(rng, size, [], [0], [f"c{i}" for i in range(rng.randint(65, 90))], 12, fewest_components=3)
    assert not uses_bits(rows)
    assert drive(new_planner, rows, seed) == drive(legacy, rows, seed)


def test_plans_with_dense_distinct_conflicts_as_before() -> None:
    """`make_plan` (waves from `simulate`, `run_now`) over queues of many components per item, some past
    `FEW_COUNTERS`: the same plans as the legacy planner."""
    rng = random.Random(11)
    for _ in range(12):
        rows = dense_rows(rng, rng.randint(40, 120), rng.choice([5, 12, 20, 70]))
        max_parallel, running = rng.randint(1, 6), rng.randint(0, 2)
        new = make_plan([new_items.WorkItem(**row) for row in rows], [], max_parallel, running=running)
        old = legacy.make_plan([legacy.WorkItem(**row) for row in rows], [], max_parallel, running=running)
        assert as_before(dump(new)) == old.model_dump()
