"""End to end with real processes: rows inserted with plain SQL, a real bridge, real
Celery workers on a real Redis, outcomes read back from Postgres."""

from __future__ import annotations

from pathlib import Path

from tests.db import insert_task
from tests.stack import Stack


def test_rows_complete_fail_and_retry(stack: Stack) -> None:
    stack.worker()
    stack.bridge()
    ok = insert_task(stack.db_url, {"prompt": "Hello Agent, are you online?"})
    bug = insert_task(stack.db_url, {"prompt": "x", "context": {"raise": "division by zero"}})
    flaky = insert_task(stack.db_url, {"prompt": "y", "context": {"retryable_failures": 2}})

    rows = {str(r["id"]): r for r in stack.wait_all_done()}

    assert rows[ok]["status"] == "completed"
    assert rows[ok]["response_payload"]["answer"] == "Agent processed: Hello Agent, are you online?"
    assert rows[ok]["error"] is None and rows[ok]["finished_at"] is not None

    assert rows[bug]["status"] == "failed"
    assert rows[bug]["error"]["type"] == "ValueError"
    assert rows[bug]["error"]["message"] == "division by zero"
    assert rows[bug]["response_payload"] == {"error": "division by zero"}

    # Two RetryableErrors, retried through Celery, then success on the third run,
    # all within the first claim.
    assert rows[flaky]["status"] == "completed"
    assert rows[flaky]["attempts"] == 1
    assert len(stack.runs(flaky)) == 3
    assert stack.count_in_logs("will retry in") == 2


def test_bad_payloads_fail_clearly_and_the_worker_keeps_serving(stack: Stack) -> None:
    stack.worker(concurrency=1)
    stack.bridge()
    cases = {
        insert_task(stack.db_url, {"question": "no prompt"}): "request_payload.prompt is missing",
        insert_task(stack.db_url, {"prompt": 42}): "request_payload.prompt must be a string, "
                                                   "got number",
        insert_task(stack.db_url, {"prompt": "  "}): "request_payload.prompt is empty",
        insert_task(stack.db_url, {"prompt": "p", "context": [1]}):
            "request_payload.context must be an object, got array",
        insert_task(stack.db_url, {"prompt": "p", "context": {"return_list": True}}):
            "the handler returned array, expected an object",
    }
    rows = {str(r["id"]): r for r in stack.wait_all_done()}
    for task_id, message in cases.items():
        assert rows[task_id]["status"] == "failed"
        assert message in rows[task_id]["error"]["message"]
        assert message in rows[task_id]["response_payload"]["error"]
    # The same single worker process still serves.
    after = insert_task(stack.db_url, {"prompt": "still there?"})
    stack.wait_for("the next task", lambda: stack.row(after)["status"] == "completed")


def test_async_handler(stack: Stack) -> None:
    stack.worker(AGENT_HANDLER="tests.handlers:scripted_async")
    stack.bridge()
    task = insert_task(stack.db_url, {"prompt": "hi", "context": {"sleep": 0.1}})
    stack.wait_for("completion", lambda: stack.row(task)["status"] == "completed")
    assert stack.row(task)["response_payload"]["answer"] == "async: hi"


def test_handler_time_limit_fails_the_task(stack: Stack) -> None:
    stack.worker(pool="threads", concurrency=2, AGENT_TIME_LIMIT="1")
    stack.bridge()
    task = insert_task(stack.db_url, {"prompt": "slow", "context": {"sleep": 5}})
    stack.wait_for("failure", lambda: stack.row(task)["status"] == "failed", 30)
    assert stack.row(task)["error"]["type"] == "TimeLimitExceeded"


def test_a_long_task_on_a_healthy_worker_is_never_rescued(stack: Stack) -> None:
    """Runs for about four leases: the worker's renewals keep it."""
    stack.worker()
    stack.bridge()
    task = insert_task(stack.db_url, {"prompt": "long", "context": {"sleep": 8}})
    stack.wait_for("completion", lambda: stack.row(task)["status"] == "completed", 60)
    assert stack.row(task)["attempts"] == 1
    assert len(stack.runs(task)) == 1
    assert stack.count_in_logs("🛟") == 0


def test_threads_pool_runs_100_io_bound_tasks_at_once(stack: Stack) -> None:
    """Each handler waits at a barrier until all 100 have arrived: they can only all
    complete if the worker runs them at the same time (no clock involved)."""
    stack.worker(pool="threads", concurrency=100, AGENT_HANDLER="tests.hardening_handlers:odd")
    stack.bridge(BRIDGE_BATCH_SIZE="100", BRIDGE_MAX_QUEUED="200")
    barrier = stack.tmp / "barrier"
    barrier.mkdir()
    ids = [insert_task(stack.db_url, {"prompt": f"io {i}", "context": {
        "barrier": str(barrier), "parties": 100}}) for i in range(100)]
    rows = stack.wait_all_done(150)
    assert all(r["status"] == "completed" for r in rows), [r["error"] for r in rows]
    assert all(len(stack.runs(task_id)) == 1 for task_id in ids)


def test_refuses_a_visibility_timeout_that_retries_would_outlast(stack: Stack) -> None:
    worker = stack.worker(wait=False, CELERY_VISIBILITY_TIMEOUT="100", AGENT_TIME_LIMIT="600")
    assert worker.popen.wait(60) != 0
    assert "CELERY_VISIBILITY_TIMEOUT=100s is too short" in worker.output


def test_bridge_stops_cleanly_on_sigterm(stack: Stack) -> None:
    bridge = stack.bridge()
    assert bridge.stop() == 0
    assert "Bridge stopped" in bridge.output


def test_supabase_mode_end_to_end(clean_db: str, clean_redis: str, tmp_path: Path,
                                  postgrest: str) -> None:
    """Bridge and worker both on the Supabase transport (supabase-py rpc() calls to the
    PostgREST-compatible endpoint); the bridge polls instead of LISTENing."""
    from tests.fakes.postgrest import SERVICE_KEY

    stack = Stack(clean_db, clean_redis, tmp_path, BRIDGE_TRANSPORT="supabase",
                  SUPABASE_URL=postgrest, SUPABASE_SERVICE_KEY=SERVICE_KEY, DATABASE_URL="")
    try:
        stack.worker()
        bridge = stack.bridge()
        ok = insert_task(clean_db, {"prompt": "via supabase"})
        bad = insert_task(clean_db, {"prompt": "x", "context": {"raise": "nope"}})
        rows = {str(r["id"]): r for r in stack.wait_all_done()}
        assert rows[ok]["response_payload"]["answer"] == "Agent processed: via supabase"
        assert rows[bad]["error"]["message"] == "nope"
        assert "polling every 0.5s" in bridge.output
    finally:
        stack.stop_all()
