"""The ``parallel-execution`` prompt: the seed skill, rewritten for these tools and for a model."""

from __future__ import annotations

PARALLEL_EXECUTION = """\
# Parallel execution with agent-parallel

Use these tools whenever work takes more than a few seconds or can be split into independent parts.

## Independence check (before running anything in parallel)
Two pieces of work may run at the same time only if:
- neither needs the other's result (no data dependency, neither is in the other's `blocked_by`);
- they do not modify the same files or components;
- nothing requires them to happen in order.
If unsure, run them one after the other.

## Background tasks
- `launch_task(command=..., description=...)` answers at once with a `task_id`; keep working.
- `task_output(task_id=..., block=false)` peeks at status and recent output without waiting.
- `task_output(task_id=...)` waits for the end (up to the server's wait cap). A
  `retrieval_status: "timeout"` is not a failure: call it again to keep waiting.
- Read long output in pages with `cursor=0` then `next_cursor`, or narrow it with `tail_lines` / `filter`.
- `cancel_task(task_id=...)` stops a task and everything it started.

## Fork-join
1. Launch every independent part: one `launch_task` each.
2. Wait for all of them: `task_output(task_ids=[...], wait="all")` (or `wait="any"` to act on the first).
3. Aggregate: check each task's `status` and `exit_code`, read failures' output, then continue.

## Fan-out (many similar commands)
`launch_task(commands=["pytest tests/shard1", ...], max_parallel=8)` starts them all in one call as a
group, at most 8 at once, and answers with `group_id` and `task_ids`. Then `task_output(task_id=group_id)`
waits for all (`wait="any"` for the first), `cancel_task(task_id=group_id)` stops every one, and
`list_tasks(group_id=...)` lists them. The group's `status` is `completed` only if every member completed;
`counts` says how many members are in each status.
An answer about several tasks shows the end of each one's output (48 KiB shared by all);
`task_output(task_id=group_id, status=["failed", "timed_out"])` shows only the members that did not make
it (with the room the others had), and `task_output(task_id=<its id>, cursor=0)` a member's whole output.

## Pipeline
Item A produces output, item B consumes it: `launch_task(command=B, after=[A's task_id])`. B starts
only if A completed; otherwise B ends as `skipped`. B finds A's log through `AGENT_UPSTREAM_LOGS`.

## The work queue (`.agent/queue/NNN-STATUS-slug.md`)
1. `queue_plan()` first: fix every entry in `errors` (cycles, missing ids, duplicates); read
   `run_now`, `waves`, `conflicts` and `critical_path`. A large queue's `items` come in pages of
   100: `total_items` counts them, `queue_plan(offset=next_offset)` gives the next page.
2. Either `run_queue(level=...)` and follow it with `task_output(task_id=run_id)`, or carry items out
   yourself: `update_item(item, "in_progress")` to claim (if the claim is refused, someone else has
   it: take another `run_now` item), do the work, then `update_item(item, "completed")`,
   `"failed"`, or `"blocked"` with a `reason` when a dependency problem stops you.
3. `launch_task(item="007")` runs one ready item's command in the background.

Prioritise items on the critical path and items that unblock the most others; leave items with
the most blockers for last. Never run more than `max_parallel` at once.

## Isolation (`runner.isolation: worktree`, or `isolation: worktree` in an item)
Each item then runs in its own git worktree (`.agent/worktrees/<id>-<slug>`, branch `agent/<id>-<slug>`;
`AGENT_WORKTREE`, `AGENT_BRANCH` and `AGENT_PORT` are set), so parallel agents never edit one checkout.
Work and commit there (what is left uncommitted is committed for you). When the item succeeds it is
integrated into the target branch, one item at a time, and only if `integration.verify` passes; items
that wait on it start from the merged result. A conflict fails the item and keeps its branch and
worktree: fix it there, then `update_item(item, "pending")` to run it again in the same worktree. A
run's progress shows each item's `phase` and predicted `conflicts`; so does `task_output` of the item's task
(`launch_task(item=...)` answers before the worktree is made: `phase` is `setup` meanwhile).

## Autonomy levels and failures
- L1/L2: stop at the first failure: start nothing new, let running work finish, report what
  failed and what was not started, and ask the user how to proceed.
- L3: keep going (continue_on_error is the default there); skip only work that depends on a
  failure; report every failure together at the end. Only `continue_on_error: false` makes L3
  stop at the first failure like L1/L2.
"""
