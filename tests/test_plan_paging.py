"""`queue_plan` answers one page of `items` and every tool answers a short text beside its structured content.

A queue that fits in a page is answered exactly as the whole plan (plus `total_items` and
`next_offset`); a larger one is paged, with `conflicts`, `conflict_groups` and `patterns` cut to
the page's items, `waves` to the first `MAX_WAVES_SHOWN`, `errors` and `warnings` to `MAX_DIAGNOSTICS_SHOWN` (the
page's own first), and the rest whole; every page comes from the one cached plan. Through the SDK's in-memory
client (the server's real tool path: argument checks, conversion, output schema).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from agent_parallel.queue.conflicts import find_conflicts
from agent_parallel.queue.items import MAX_TITLE_CHARS, QueueReader
from agent_parallel.queue.plan import MAX_PAGE_ITEMS, PAGE_ITEMS, plan_page, plan_workspace
from agent_parallel.queue.planner import MAX_CONFLICTS_SHOWN, MAX_DIAGNOSTICS_SHOWN, MAX_WAVES_SHOWN
from agent_parallel.results import CancelResult, ItemMoved, LaunchResult, RunStarted, TaskList, TaskOutputResult
from agent_parallel.queue.planner import QueuePlanPage
from agent_parallel.server import ServerSettings, build_server
from agent_parallel.server.app import SUMMARY_CHARS
from agent_parallel.server.tools import INLINE_ANSWER_CHARS
from conftest import call, call_error

pytestmark = pytest.mark.anyio


def write_queue(root: Path, size: int, *, seed: int = 3, pool: int = 40) -> None:
    """`size` items: a tenth completed, 0-2 `blocked_by` on recent items, one of `pool` shared files
    (so that many pairs conflict), some with a component too."""
    rng = random.Random(seed)
    queue = root / ".agent/queue"
    queue.mkdir(parents=True)
    for number in range(1, size + 1):
        deps = sorted({rng.randrange(max(1, number - 50), number) for _ in range(rng.randint(0, 2))}) if number > 1 else []
        status = "completed" if number <= size // 10 else "pending"
        component = f"\ncomponents: [c{rng.randrange(5)}]" if rng.random() < 0.1 else ""
        (queue / f"{number:04d}-{status}-item-{number}.md").write_text(
            f"---\ntitle: Item {number}\nblocked_by: [{', '.join(f'{d:04d}' for d in deps)}]\n"
            f"files: [src/m{rng.randrange(pool)}.py]{component}\nestimate: {rng.choice(('1m', '5m', '1h'))}\n---\n")


def whole(root: Path) -> dict[str, Any]:
    """The whole plan, from a reader of its own (what the CLI prints)."""
    return plan_workspace(root, None, None, QueueReader()).model_dump(mode="json")


async def test_a_queue_that_fits_in_a_page_is_answered_as_before(workspace: Path) -> None:
    write_queue(workspace, 60)
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        answer = await call(client, "queue_plan")
    assert answer == {**whole(workspace), "total_items": 60, "next_offset": None}
    assert answer["conflicts"] and answer["conflict_groups"]  # the queue has some: they are all there


async def test_pages_cover_the_items_once_and_keep_the_rest_whole(workspace: Path) -> None:
    write_queue(workspace, 250)
    plan = whole(workspace)
    assert plan["conflicts_total"] > MAX_CONFLICTS_SHOWN  # so a page's conflicts are a choice
    pairs = set(_all_pairs(workspace))
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        pages = [await call(client, "queue_plan", offset=offset, limit=100) for offset in (0, 100, 200)]
    assert [page["next_offset"] for page in pages] == [100, 200, None]
    assert [len(page["items"]) for page in pages] == [100, 100, 50]
    assert [row for page in pages for row in page["items"]] == plan["items"]
    for page in pages:
        assert page["total_items"] == 250
        for field in ("run_now", "waves_total", "critical_path", "conflicts_total", "errors", "warnings",
                      "predicted_makespan", "lower_bound", "mermaid", "max_parallel"):
            assert page[field] == plan[field], field
        # waves: the first MAX_WAVES_SHOWN of the whole schedule
        assert plan["waves_total"] == len(plan["waves"]) > MAX_WAVES_SHOWN
        assert page["waves"] == plan["waves"][:MAX_WAVES_SHOWN]
        shown = {row["id"] for row in page["items"]}
        # patterns: those of the whole plan with an item of the page, whole and in order
        assert page["patterns"]["pipelines"] == [chain for chain in plan["patterns"]["pipelines"] if set(chain) & shown]
        assert page["patterns"]["fork_join"] == [
            fj for fj in plan["patterns"]["fork_join"] if {fj["fork"], fj["join"], *fj["branches"]} & shown]
        # conflicts: pairs of the whole plan, each with an item of the page, sorted, at most the cap
        found = [(c["a"], c["b"]) for c in page["conflicts"]]
        assert found == sorted(found) and len(found) <= MAX_CONFLICTS_SHOWN
        assert all(pair in pairs and (pair[0] in shown or pair[1] in shown) for pair in found)
        touching = {pair for pair in pairs if pair[0] in shown or pair[1] in shown}
        assert len(found) == min(len(touching), MAX_CONFLICTS_SHOWN)
        # conflict groups: those of the whole plan that name an item of the page, whole
        assert page["conflict_groups"] == [group for group in plan["conflict_groups"]
                                           if set(group["items"]) & shown]
    assert pages[0]["conflict_groups"] != plan["conflict_groups"]
    assert pages[0]["patterns"] != plan["patterns"] and any(page["patterns"]["pipelines"] for page in pages)


def _all_pairs(root: Path) -> list[tuple[str, str]]:
    """Every conflicting pair of the queue's pending items (from their declared files and components)."""
    items, _ = QueueReader().read(root, ".agent/queue")
    active = [item for item in items if item.status in ("pending", "in_progress")]
    labels = {item.id: item.id_str for item in active}
    return [(labels[a], labels[b]) for a, b in find_conflicts(active)]


async def test_an_offset_past_the_end_gives_an_empty_last_page(workspace: Path) -> None:
    write_queue(workspace, 30)
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        page = await call(client, "queue_plan", offset=30)
        later = await call(client, "queue_plan", offset=10_000, limit=5)
    for answer in (page, later):
        assert answer["items"] == [] and answer["conflicts"] == [] and answer["conflict_groups"] == []
        assert answer["total_items"] == 30 and answer["next_offset"] is None
        assert answer["run_now"] == whole(workspace)["run_now"]


@pytest.mark.parametrize(("arguments", "message"), [
    ({"limit": 0}, f"limit must be between 1 and {MAX_PAGE_ITEMS} items per page (got 0); page through a larger "
                   "queue with offset and next_offset"),
    ({"limit": MAX_PAGE_ITEMS + 1}, f"limit must be between 1 and {MAX_PAGE_ITEMS} items per page (got "
                                    f"{MAX_PAGE_ITEMS + 1}); page through a larger queue with offset and next_offset"),
    ({"offset": -1}, "offset must be >= 0 (got -1); the first page of items is offset 0, the next one the "
                     "answer's next_offset"),
    ({"offset": "first"}, "invalid arguments: `offset` must be an integer, got 'first' (a string) (the tool's input "
                          "schema lists every argument)"),
])
async def test_bad_page_arguments_are_refused_clearly(workspace: Path, arguments: dict[str, Any], message: str) -> None:
    write_queue(workspace, 5)
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        assert await call_error(client, "queue_plan", **arguments) == f"Error executing tool queue_plan: {message}"


def test_every_page_comes_from_the_one_cached_plan(workspace: Path) -> None:
    write_queue(workspace, 120)
    reader = QueueReader()
    plan = plan_workspace(workspace, None, None, reader)
    parsed = reader.parse_count
    pages = [plan_page(workspace, None, None, reader, offset=offset, limit=50) for offset in (0, 50, 100, 0)]
    assert reader.parse_count == parsed  # nothing read again
    assert len(plan.waves) <= MAX_WAVES_SHOWN
    assert all(page.waves is plan.waves and page.critical_path is plan.critical_path for page in pages)  # nor planned
    assert all(row is cached for page, offset in zip(pages, (0, 50, 100, 0), strict=True)
               for row, cached in zip(page.items, plan.items[offset:offset + 50], strict=True))


def test_pages_of_a_plan_made_without_its_rows_match_the_whole_plan(workspace: Path) -> None:
    """queue_plan plans without the 10,000 rows it does not show: each page builds its own rows from
    the graph; asking for the whole plan later builds them once. Edits in between (a title: the plan
    is patched; a body: reused; an estimate: planned again) show on the pages as in the whole plan."""
    write_queue(workspace, 90)
    reader = QueueReader()

    def check() -> None:
        expected = whole(workspace)["items"]
        pages = [plan_page(workspace, None, None, reader, offset=offset, limit=40) for offset in (0, 40, 80)]
        assert [row.model_dump(mode="json") for page in pages for row in page.items] == expected

    check()
    queue = sorted((workspace / ".agent/queue").iterdir())
    queue[49].write_text(queue[49].read_text().replace("title: Item 50", "title: Renamed 50"))
    check()
    queue[60].write_text(queue[60].read_text() + "More notes.\n")
    check()
    queue[70].write_text(queue[70].read_text().replace("estimate: ", "estimate: 2"))
    check()
    full = plan_workspace(workspace, None, None, reader)
    assert full.model_dump(mode="json")["items"] == whole(workspace)["items"]
    assert plan_workspace(workspace, None, None, reader) is full  # built once, then cached
    check()


async def test_a_large_queue_is_answered_in_a_bounded_page(workspace: Path) -> None:
    write_queue(workspace, 1500, pool=8)  # about 170 pending items per file: some 100,000 conflicting pairs
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        result = await client.call_tool("queue_plan", {"offset": 150})  # past the 150 completed items
    assert not result.is_error
    answer = result.structured_content
    assert len(answer["items"]) == PAGE_ITEMS and answer["total_items"] == 1500
    assert answer["next_offset"] == 150 + PAGE_ITEMS
    assert answer["conflicts_total"] > 50_000 and len(answer["conflicts"]) == MAX_CONFLICTS_SHOWN
    shown = {row["id"] for row in answer["items"]}
    assert all(c["a"] in shown or c["b"] in shown for c in answer["conflicts"])
    assert "%% drawn in part: 200 of 1500 items" in answer["mermaid"]
    assert len(json.dumps(answer)) < 600_000  # the whole plan is about 3 times larger
    assert len(result.content[0].text) <= SUMMARY_CHARS + 100


async def test_errors_and_warnings_are_cut_to_a_bound_the_pages_own_first(workspace: Path) -> None:
    """450 items, 447 without files (a `no_files` warning each) and 3 waiting on an item that does not
    exist (an error each): a page lists 200 warnings, its own items' first, and says how many there
    are; the errors, fewer than the bound, stay whole."""
    queue = workspace / ".agent/queue"
    queue.mkdir(parents=True)
    broken = (7, 320, 321)
    for number in range(1, 451):
        blocked = "\nblocked_by: [999]" if number in broken else ""
        (queue / f"{number:03d}-pending-item-{number}.md").write_text(f"---\ntitle: Item {number}{blocked}\n---\n")
    plan = whole(workspace)
    assert len(plan["warnings"]) == 447 and [e["item"] for e in plan["errors"]] == ["007", "320", "321"]
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        first, later = [await call(client, "queue_plan", offset=offset, limit=100) for offset in (0, 300)]
    for page, own in ((first, range(1, 101)), (later, range(301, 401))):
        warned = [w["item"] for w in page["warnings"]]
        mine = [f"{n:03d}" for n in own if n not in broken]
        assert page["warnings_total"] == 447 and len(warned) == MAX_DIAGNOSTICS_SHOWN
        assert warned[:len(mine)] == mine and not set(warned[len(mine):]) & set(mine)  # the page's own first
        assert page["errors"] == plan["errors"] and "errors_total" not in page
    assert [w["item"] for w in first["warnings"]][99:] == [f"{n:03d}" for n in range(101, 202)]


# --- the text beside every tool's structured answer ---------------------------------------------------------


async def test_every_tool_answers_a_short_text_beside_its_whole_structured_content(workspace: Path) -> None:
    write_queue(workspace, 700)
    (workspace / ".agent/queue/0100-pending-item-100.md").write_text("---\ncommand: echo done\n---\n# Item 100\n")
    models = {"launch_task": LaunchResult, "task_output": TaskOutputResult, "cancel_task": CancelResult,
              "list_tasks": TaskList, "queue_plan": QueuePlanPage, "run_queue": RunStarted, "update_item": ItemMoved}
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0, kill_grace_s=0.5))) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == set(models)
        long_output = "python3 -c \"print('x' * 200000)\""
        task = await call(client, "launch_task", command=long_output, run_in_background=False)
        calls = {
            "launch_task": {"command": long_output, "run_in_background": False},
            "task_output": {"task_id": task["task_id"]},
            "cancel_task": {"task_id": task["task_id"]},
            "list_tasks": {},
            "queue_plan": {},
            "update_item": {"item": "0100", "status": "in_progress"},
            "run_queue": {"items": ["0200"], "max_parallel": 1},
        }
        for tool, arguments in calls.items():
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, (tool, result.content)
            [block] = result.content
            assert block.type == "text" and block.text.startswith(f"{tool}:"), tool
            assert len(block.text) <= SUMMARY_CHARS + 100, (tool, len(block.text))
            assert block.text.endswith("(the complete answer is the structured content)")
            structured = result.structured_content
            # the structured content is the whole answer: it is the model's complete dump
            assert structured == models[tool].model_validate(structured).model_dump(mode="json"), tool
        assert len(task["output"]) > 16_000  # the text stayed short although the answer is long
        plan = await call(client, "queue_plan")
        assert plan == plan_page(workspace, None, None, QueueReader()).model_dump(mode="json")
        await call(client, "cancel_task", task_id=(await call(client, "list_tasks", limit=1))["tasks"][0]["task_id"])


async def test_the_text_names_the_page_and_what_matters_in_a_plan(workspace: Path) -> None:
    write_queue(workspace, 700)
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        result = await client.call_tool("queue_plan", {"offset": 600})
    text = result.content[0].text
    answer = result.structured_content
    assert "  items: 100 entries (100 pending)\n" in text and "  total_items: 700\n" in text
    assert f"  run_now: {', '.join(answer['run_now'])}\n" in text
    assert "  errors: none\n" in text and f"  predicted_makespan: {answer['predicted_makespan']}\n" in text
    assert "next_offset" not in text  # None: the last page


@pytest.mark.fault("a cloned queue's items carry titles of 900,000 characters (a front-matter title, a body heading): each "
                   "is cut to 300 with a long_title warning naming the item, so no plan row, report or AGENT_ITEM_TITLE "
                   "carries them (a plan answer was 2.8 MB)")
async def test_a_title_of_900000_characters_is_cut_with_a_warning(workspace: Path) -> None:
    queue = workspace / ".agent/queue"
    queue.mkdir(parents=True)
    (queue / "001-pending-front.md").write_text(f"---\ntitle: {'T' * 900_000}\nfiles: [a.py]\n---\nBody.\n")
    (queue / "002-pending-heading.md").write_text(f"---\nfiles: [b.py]\n---\n# {'H' * 900_000}\n")
    (queue / "003-pending-short.md").write_text(f"---\ntitle: {'S' * MAX_TITLE_CHARS}\nfiles: [c.py]\n---\n")
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        answer = await call(client, "queue_plan")
    assert len(json.dumps(answer)) < 20_000
    titles = {row["id"]: row["title"] for row in answer["items"]}
    assert titles["001"] == "T" * MAX_TITLE_CHARS + "... [cut: 899,700 more characters]"
    assert titles["002"] == "H" * MAX_TITLE_CHARS + "... [cut: 899,700 more characters]"
    assert titles["003"] == "S" * MAX_TITLE_CHARS  # at the limit: whole, no warning
    long = [(w["item"], w["message"]) for w in answer["warnings"] if w["kind"] == "long_title"]
    assert long == [(item, "the title is 900,000 characters; it is cut to 300 wherever it is shown (the plan, the "
                           "run's report, AGENT_ITEM_TITLE): give a short title and put the rest in the body")
                    for item in ("001", "002")]
    assert answer["run_now"] == ["001", "002", "003"] and not answer["errors"]  # a warning: they still run
    assert sorted(p.name for p in queue.iterdir()) == ["001-pending-front.md", "002-pending-heading.md",
                                                       "003-pending-short.md"]  # planning changed no file


@pytest.mark.fault("a queue whose rows are long (items listing many long paths): a page of 100 rows was 251,000 "
                   "characters; the page holds fewer rows so the answer fits what Claude Code shows whole, and "
                   "next_offset goes on: every item on exactly one page, in order")
async def test_rows_too_long_for_one_answer_come_in_smaller_pages(workspace: Path) -> None:
    queue = workspace / ".agent/queue"
    queue.mkdir(parents=True)
    for number in range(1, 151):
        files = ", ".join(f"src/{'deep/' * 40}item{number}/file{k}.py" for k in range(10))
        (queue / f"{number:03d}-pending-item-{number}.md").write_text(f"---\nfiles: [{files}]\n---\n")
    seen: list[str] = []
    sizes: list[int] = []
    async with Client(build_server(workspace, ServerSettings(min_free_memory=0))) as client:
        offset: int | None = 0
        while offset is not None:
            page = await call(client, "queue_plan", offset=offset)
            assert page["items"] and page["total_items"] == 150
            seen += [row["id"] for row in page["items"]]
            sizes.append(len(json.dumps(page, separators=(",", ":"), ensure_ascii=False)))
            offset = page["next_offset"]
            if offset is not None:
                assert offset == len(seen)
    assert seen == [f"{n:03d}" for n in range(1, 151)]
    assert max(sizes) <= INLINE_ANSWER_CHARS and len(sizes) > 150 // PAGE_ITEMS + 1
