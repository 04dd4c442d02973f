"""Cancellation (issue 12): with real processes (a bridge, workers, the stand-ins). The SQL
side is tests/sql/test_cancel.py."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.store import TaskStore
from tests.db import insert_task, sql
from tests.fakes.openai_server import FakeOpenAI
from tests.flower import AUTH, poll, start_flower
from tests.stack import BIN, Stack

LEASE = 60.0
PROMPT = {"prompt": "Tell me a long story"}












def is_cancelled(row: dict[str, Any]) -> bool:
    return row["status"] == "failed" and (row["error"] or {}).get("type") == "Cancelled"






























# --------------------------------------------------------------------------- real processes


def streaming(stack: Stack, task_id: str) -> None:
    stack.wait_for("a partial answer", lambda: bool(sql(
        stack.db_url, "select agent_bridge.streamed_payload(id, attempts, response_payload) "
        "->> 'answer' from public.agent_task_requests where id = %s", [task_id])[0][0]))


def cancel_mid_stream(store: TaskStore, stack: Stack, env: dict[str, Any], handler: str,
                      mode: str) -> tuple[dict[str, Any], list[str], int]:
    """Run one streaming task, cancel it once it has written a partial answer, and wait
    for its row to end; (the row, the handler's records, its chunk count)."""
    stack.worker(pool="threads", concurrency=4, AGENT_HANDLER=f"tests.handlers:{handler}",
                 CANCEL_POLL_INTERVAL="0.2", **env)
    stack.bridge(**env)
    chunks = 40 if mode == "ignore" else 2000
    task_id = insert_task(stack.db_url, {"prompt": "p", "context": {"mode": mode,
                                                                    "chunks": chunks}})
    streaming(stack, task_id)

    assert store.cancel(task_id) == "processing"
    stack.wait_for("the row to end", lambda: stack.row(task_id)["status"] != "processing")
    row = stack.row(task_id)
    assert is_cancelled(row), row
    payload = row["response_payload"]
    assert payload["cancelled"] is True and payload["partial"] is True
    assert payload["answer"].startswith("w0 ") and "[stopped]" not in payload["answer"]
    runs = stack.runs(task_id)
    assert [r for r in runs if r.startswith("start")] == runs[:1], runs  # never run again
    stack.wait_for("the worker's log line",
                   lambda: stack.count_in_logs(f"Task {task_id} cancelled") == 1)
    return row, runs[1:], chunks


def test_cancel_mid_stream_sync(store: TaskStore, stack: Stack, env: dict[str, Any]) -> None:
    """report_progress raises tasks.Cancelled at the next chunk."""
    _, [last], chunks = cancel_mid_stream(store, stack, env, "cancellable", "progress")
    assert last.startswith("cancelled at chunk") and int(last.rsplit(" ", 1)[1]) < chunks


def test_cancel_mid_stream_async(store: TaskStore, stack: Stack, env: dict[str, Any]) -> None:
    """CancelledError at the handler's await; its `async with` closes on the way out."""
    _, after, _ = cancel_mid_stream(store, stack, env, "cancellable_async", "progress")
    assert after == ["stream closed", "cancelled"]


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_sync_handler_that_checks_cancelled(store: TaskStore, stack: Stack,
                                            env: dict[str, Any]) -> None:
    """tasks.cancelled() turns True; what the handler returns then is discarded."""
    _, [last], chunks = cancel_mid_stream(store, stack, env, "cancellable", "poll")
    assert last.startswith("noticed at chunk") and int(last.rsplit(" ", 1)[1]) < chunks


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_sync_handler_that_checks_nothing(store: TaskStore, stack: Stack,
                                          env: dict[str, Any]) -> None:
    """It runs to its end; its result is discarded, the partial answer kept."""
    row, after, _ = cancel_mid_stream(store, stack, env, "cancellable", "ignore")
    assert after == ["finished"]
    assert row["response_payload"]["answer"] == "w0 "


def test_cancelled_pending_row_never_runs(store: TaskStore, stack: Stack,
                                          env: dict[str, Any]) -> None:
    stack.worker(**env)
    soon = insert_task(stack.db_url, PROMPT)
    assert store.cancel(soon) == "failed"
    stack.bridge(**env)
    later = insert_task(stack.db_url, PROMPT)  # served after `soon` would have been
    stack.wait_for("the next task", lambda: stack.row(later)["status"] == "completed")
    assert is_cancelled(stack.row(soon)) and stack.row(soon)["attempts"] == 0
    assert stack.runs(soon) == []


def test_cancel_during_retry_backoff(store: TaskStore, stack: Stack,
                                     env: dict[str, Any]) -> None:
    """The row waits between Celery retries (processing, no worker): it ends at once, and
    the retry message, when it comes, is fenced out."""
    stack.worker(AGENT_RETRY_BACKOFF="2", AGENT_RETRY_BACKOFF_MAX="2", **env)
    stack.bridge(**env)
    task_id = insert_task(stack.db_url, {"prompt": "p", "context": {"retryable_failures": 5}})
    stack.wait_for("the retry to be scheduled", lambda: (
        stack.row(task_id)["error"] or {}).get("retryable") is True
        and stack.row(task_id)["worker"] is None)
    assert store.cancel(task_id) == "failed"
    row = stack.row(task_id)
    assert is_cancelled(row) and row["error"]["message"].endswith("while waiting to retry.")
    stack.wait_for("the retry message to be fenced out",
                   lambda: stack.count_in_logs(f"Task {task_id} attempt 1 skipped") == 1)
    assert len(stack.runs(task_id)) == 1
    assert is_cancelled(stack.row(task_id))


def cli(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "agent-bridge"), "cancel", *args],
                          env={**stack.env, **env}, capture_output=True, text=True, timeout=60)


def test_operator_cli(store: TaskStore, stack: Stack, env: dict[str, Any]) -> None:
    stack.worker(pool="threads", concurrency=2, AGENT_HANDLER="tests.handlers:cancellable",
                 CANCEL_POLL_INTERVAL="0.2", **env)
    stack.bridge(**env)
    running = insert_task(stack.db_url, {"prompt": "p", "context": {"chunks": 2000}})
    waiting = insert_task(stack.db_url, PROMPT, run_at="2999-01-01T00:00:00Z")
    streaming(stack, running)

    done = cli(stack, running, waiting, "--wait", **env)
    assert done.returncode == 0, done.stderr
    assert f"⏳ {running} is running: its worker was asked to stop it" in done.stdout
    assert f"🛑 {waiting} cancelled" in done.stdout
    assert f"🛑 {running} cancelled (partial answer kept:" in done.stdout
    assert is_cancelled(stack.row(running)) and is_cancelled(stack.row(waiting))

    again = cli(stack, waiting, str(uuid.uuid4()), **env)
    assert again.returncode == 1
    assert f"🛑 {waiting} cancelled" in again.stdout and "no such task" in again.stderr
    bad = cli(stack, "not-an-id")
    assert bad.returncode == 2 and "is not a task id" in bad.stderr


def revoke(api: str, job: str, terminate: bool) -> None:
    response = httpx.post(f"{api}/task/revoke/{job}",
                          params={"terminate": "true"} if terminate else {}, auth=AUTH,
                          timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("pool", "terminate"), [
    ("prefork", True), ("prefork", False), ("threads", True)])
def test_flower_revoke_ends_the_row(stack: Stack, clean_db: str, tmp_path: Path, pool: str,
                                    terminate: bool) -> None:
    """Flower's Terminate (prefork: the pool process is killed) or Revoke of a running
    run_agent job ends its row as a cancel does; it is not rescued and run again."""
    from bridge.localstack import free_port

    port = free_port()
    flower = start_flower(stack, port)
    api = f"http://127.0.0.1:{port}/api"
    poll("Flower to answer", lambda: httpx.get(f"http://127.0.0.1:{port}/healthcheck",
                                               timeout=2).text == "OK", flower)
    worker = stack.worker(pool=pool, concurrency=2, AGENT_HANDLER="tests.handlers:cancellable")
    stack.bridge()
    task_id = insert_task(clean_db, {"prompt": "p", "context": {"chunks": 2000}})
    streaming(stack, task_id)

    revoke(api, f"{task_id}:1", terminate)
    stack.wait_for("the row to end", lambda: stack.row(task_id)["status"] != "processing")
    row = stack.row(task_id)
    assert is_cancelled(row), row
    assert row["attempts"] == 1 and row["response_payload"]["answer"].startswith("w0 ")
    assert len([r for r in stack.runs(task_id) if r.startswith("start")]) == 1
    if pool == "prefork" and terminate:
        assert row["error"]["message"] == "Cancelled on request while it was running."
        worker.wait_for_output("its job was terminated")
    else:  # Celery only marked it revoked: the handler was asked to stop, in place
        worker.wait_for_output("its running job was revoked")
        stack.wait_for("the handler to stop", lambda: stack.runs(task_id)[-1].startswith(
            "cancelled at chunk"))
    # Another task still runs normally on the same worker.
    after = insert_task(clean_db, {"prompt": "p", "context": {"chunks": 2}})
    stack.wait_for("the next task", lambda: stack.row(after)["status"] == "completed")


def test_flower_revoke_of_a_job_waiting_in_the_worker(stack: Stack, clean_db: str) -> None:
    """A job revoked before it ran: when its turn comes Celery discards it, and its row
    (claimed, never started) ends Cancelled instead of waiting for the lease rescue."""
    from bridge.localstack import free_port

    port = free_port()
    flower = start_flower(stack, port)
    api = f"http://127.0.0.1:{port}/api"
    poll("Flower to answer", lambda: httpx.get(f"http://127.0.0.1:{port}/healthcheck",
                                               timeout=2).text == "OK", flower)
    worker = stack.worker(pool="prefork", concurrency=1,
                          AGENT_HANDLER="tests.handlers:cancellable")
    stack.bridge()
    busy = insert_task(clean_db, {"prompt": "p", "context": {"chunks": 2000}})
    streaming(stack, busy)
    queued = insert_task(clean_db, {"prompt": "p", "context": {"chunks": 2}})
    stack.wait_for("the second job to be published",
                   lambda: stack.row(queued)["attempts"] == 1)

    revoke(api, f"{queued}:1", terminate=False)
    worker.wait_for_output(f"Tasks flagged as revoked: {queued}:1")  # Celery's own line
    assert sql(clean_db, "select public.cancel_agent_task(%s)", [busy]) == [("processing",)]
    stack.wait_for("both rows to end", lambda: is_cancelled(stack.row(busy))
                   and is_cancelled(stack.row(queued)))
    assert stack.runs(queued) == []
    worker.wait_for_output("its job was revoked")


# --------------------------------------------------------------------------- the OpenAI handler


def test_openai_handler_closes_the_stream_on_cancel(stack: Stack, clean_db: str) -> None:
    """The built-in handler in a real worker, against the local OpenAI-compatible server:
    on cancel it stops reading and closes the HTTP stream before the last chunk."""
    with FakeOpenAI() as fake:
        fake.respond("word " * 400, chunks=400, delay_per_chunk=0.02)
        stack.worker(pool="threads", concurrency=2,
                     AGENT_HANDLER="tasks.handlers.openai_chat:handler",
                     OPENAI_BASE_URL=fake.url, OPENAI_API_KEY="sk-local",
                     OPENAI_PROGRESS_INTERVAL="0")
        stack.bridge()
        task_id = insert_task(clean_db, {"prompt": "Tell me a long story"})
        streaming(stack, task_id)
        assert sql(clean_db, "select public.cancel_agent_task(%s)", [task_id]) == \
            [("processing",)]
        stack.wait_for("the row to end", lambda: is_cancelled(stack.row(task_id)))
        stack.wait_for("the server to see the client hang up", lambda: bool(fake.hangups))
        [chunk] = fake.hangups
        assert 0 < chunk < 400
        answer = stack.row(task_id)["response_payload"]["answer"]
        assert answer.startswith("word ") and len(answer) < len("word " * 400)
