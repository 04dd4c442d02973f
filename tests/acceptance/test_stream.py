"""Streamed answers as appended chunks (issue 15): with real processes (a bridge, workers, the
stand-ins). The SQL side is tests/sql/test_stream.py."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from typing import Any

from bridge.store import TaskStore
from tests.db import chunks, fetch_task, insert_task, sql, streamed
from tests.stack import Stack

INTERVAL = 0.2  # AGENT_PROGRESS_INTERVAL of the pipeline tests


# --------------------------------------------------------------------------- a real worker


def held_stream(stack: Stack, env: dict[str, Any], **context: Any) -> tuple[str, str]:
    """A bridge and a worker running tests.stream_handler:tokens, and one task of `context`
    whose handler waits at its end until `release`: (the task's id, its hold)."""
    stack.worker(pool="threads", concurrency=2, AGENT_HANDLER="tests.stream_handler:tokens",
                 AGENT_PROGRESS_INTERVAL=str(INTERVAL), **env)
    stack.bridge(**env)
    hold = f"hold-{uuid.uuid4()}"
    return insert_task(stack.db_url, {"prompt": "p", "context": {**context, "hold": hold}}), hold


def release(stack: Stack, task_id: str, hold: str) -> None:
    """Let a held task's handler return, and wait for the row to complete."""
    (stack.state_dir / hold).write_text("go")
    stack.wait_for("completion", lambda: stack.row(task_id)["status"] == "completed")


def test_a_streamed_answer_is_appended_linear_and_capped(
        store: TaskStore, stack: Stack, env: dict[str, Any]) -> None:
    task_id, hold = held_stream(stack, env, tokens=150, delay=0.01, settle=INTERVAL + 0.05)
    seen: list[Any] = []  # the answer as a reader polling the database sees it
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            answer = (streamed(stack.db_url, task_id) or {}).get("answer")
            if answer and (not seen or seen[-1] != answer):
                seen.append(answer)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        expected = "".join(f"t{i} " for i in range(150))
        stack.wait_for("every token streamed", lambda: streamed(
            stack.db_url, task_id) == {"answer": expected, "partial": True}, 30)
    finally:
        stop.set()
        watcher.join()
    written = sql(stack.db_url, "select seq, answer_offset, length(text), created_at "
                                "from public.agent_task_chunks where task_id = %s order by seq",
                  [task_id])
    # Linear: an append-only stream writes each character once.
    assert sum(n for _, _, n, _ in written) == len(expected)
    assert [o for _, o, _, _ in written] == [sum(n for _, _, n, _ in written[:i])
                                             for i in range(len(written))]
    # The first token is written at once (the leading edge), alone.
    assert written[0][1:3] == (0, len("t0 "))
    # Capped: one write per interval at most (the first at once). The flusher spaces the
    # writes it takes; created_at is when each reached the database, after the writer's
    # queue, so one write's delay can bring the next closer: one write of slack.
    span = (written[-1][3] - written[0][3]).total_seconds()
    assert len(written) <= span / INTERVAL + 2, (len(written), span)
    assert len(written) >= 3
    # The row itself was not written while it streamed.
    assert fetch_task(stack.db_url, task_id)["response_payload"] is None
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen))

    release(stack, task_id, hold)
    assert stack.row(task_id)["response_payload"] == {"answer": expected}
    assert chunks(stack.db_url, task_id) == []


def test_other_shapes_rewrite_the_row_as_before(
        store: TaskStore, stack: Stack, env: dict[str, Any]) -> None:
    task_id, hold = held_stream(stack, env, tokens=5, delay=0.3, shape="full")
    stack.wait_for("the last partial in the row", lambda: (
        stack.row(task_id)["response_payload"] or {}).get("tokens") == 5)
    assert chunks(stack.db_url, task_id) == []
    release(stack, task_id, hold)


def test_a_failed_stream_ends_as_before(store: TaskStore, stack: Stack,
                                        env: dict[str, Any]) -> None:
    stack.worker(pool="threads", concurrency=2, AGENT_HANDLER="tests.stream_handler:tokens",
                 **env)
    stack.bridge(**env)
    task_id = insert_task(stack.db_url, {"prompt": "p", "context": {"tokens": 30,
                                                                    "raise": "boom"}})
    stack.wait_for("the failure", lambda: stack.row(task_id)["status"] == "failed")
    row = stack.row(task_id)
    assert row["error"]["type"] == "ValueError"
    assert row["response_payload"] == {"error": "boom"}
    assert chunks(stack.db_url, task_id) == []


def test_async_handlers_stream_from_the_shared_loop(
        store: TaskStore, stack: Stack, env: dict[str, Any]) -> None:
    """`await report_progress_async()` writes from a thread: two async streams on one
    worker's loop both stream, and end with their whole answers."""
    stack.worker(pool="threads", concurrency=4,
                 AGENT_HANDLER="tests.stream_handler:tokens_async",
                 AGENT_PROGRESS_INTERVAL=str(INTERVAL), **env)
    stack.bridge(**env)
    ids = [insert_task(stack.db_url, {"prompt": "p", "context": {"tokens": 60, "delay": 0.02}})
           for _ in range(2)]
    stack.wait_for("a partial answer", lambda: any(
        (streamed(stack.db_url, i) or {}).get("answer") for i in ids), 30)
    stack.wait_for("completion", lambda: all(
        stack.row(i)["status"] == "completed" for i in ids), 30)
    expected = "".join(f"t{i} " for i in range(60))
    for task_id in ids:
        assert stack.row(task_id)["response_payload"] == {"answer": expected}
        assert chunks(stack.db_url, task_id) == []
