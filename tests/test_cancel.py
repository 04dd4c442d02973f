"""Cancellation (issue 12): `cancel_agent_task`, the worker stopping a running handler,
`agent-bridge cancel`, and a Celery revoke from Flower. The SQL contract is checked on
both transports and as Supabase's roles; the pipeline with real bridge and worker
processes, on both transports where the transport matters."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from postgrest.exceptions import APIError
from psycopg import errors

from bridge.store import TaskStore
from supabase import Client, ClientOptions, create_client
from tests.db import as_role, insert_task, sql
from tests.db import fetch_task as _fetch_task
from tests.fakes.jwt import role_key, user_token
from tests.fakes.openai_server import FakeOpenAI
from tests.stack import BIN, Stack
from tests.test_flower import AUTH, poll, start_flower

ALICE = str(uuid.uuid4())
BOB = str(uuid.uuid4())
LEASE = 60.0
PROMPT = {"prompt": "Tell me a long story"}


def fetch_task(db_url: str, task_id: str) -> dict[str, Any]:
    return dict(_fetch_task(db_url, task_id))




def submit_as(db_url: str, user: str) -> str:
    with as_role(db_url, "authenticated", user) as conn:
        row = conn.execute("insert into public.agent_task_requests (request_payload) "
                           "values ('{\"prompt\": \"hi\"}') returning id::text").fetchone()
    assert row is not None
    return str(row[0])


def cancel_as(db_url: str, role: str, task_id: str, sub: str | None = None) -> str | None:
    with as_role(db_url, role, sub) as conn:
        row = conn.execute("select public.cancel_agent_task(%s)", [task_id]).fetchone()
    assert row is not None
    return None if row[0] is None else str(row[0])


def start(store: TaskStore, task_id: str, worker: str = "w1") -> int:
    claims = [c for c in store.claim(10, LEASE) if c.id == task_id]
    assert claims, "the row was not claimed"
    started, _ = store.start(task_id, claims[0].attempt, worker, LEASE)
    assert started is not None
    return claims[0].attempt


def is_cancelled(row: dict[str, Any]) -> bool:
    return row["status"] == "failed" and (row["error"] or {}).get("type") == "Cancelled"


# --------------------------------------------------------------------------- the SQL contract


def test_pending_row_even_a_future_one_fails_at_once(store: TaskStore, clean_db: str) -> None:
    later = insert_task(clean_db, PROMPT, run_at="2999-01-01T00:00:00Z")
    due = insert_task(clean_db, PROMPT)
    assert store.cancel(later) == "failed"
    assert store.cancel(due) == "failed"
    for task_id in (later, due):
        row = fetch_task(clean_db, task_id)
        assert is_cancelled(row) and row["error"]["retryable"] is False
        assert row["error"]["message"] == "Cancelled on request before it started."
        # Where the guide's frontend looks for errors, as agent_task_fail writes it.
        assert row["response_payload"] == {"error": row["error"]["message"], "cancelled": True}
        assert row["finished_at"] is not None and row["cancel_requested_at"] is not None
    assert store.claim(10, LEASE) == []
    sql(clean_db, "update public.agent_task_requests set run_at = now()")  # due now: still not
    assert store.claim(10, LEASE) == []


def test_running_row_is_asked_to_stop_and_ends_with_its_partial_answer(
        store: TaskStore, clean_db: str) -> None:
    task_id = insert_task(clean_db, PROMPT)
    attempt = start(store, task_id)
    store.progress(task_id, attempt, "w1", {"answer": "Once upon", "partial": True})
    assert store.cancel_requested([(task_id, attempt)]) == set()

    assert store.cancel(task_id) == "processing"
    row = fetch_task(clean_db, task_id)
    assert row["status"] == "processing" and row["cancel_requested_at"] is not None
    assert store.cancel_requested([(task_id, attempt), (task_id, attempt + 1),
                                   (str(uuid.uuid4()), 1)]) == {(task_id, attempt)}
    assert store.cancel(task_id) == "processing"  # asking twice changes nothing

    assert not store.cancelled(task_id, attempt, "someone-else", None).applied  # fenced
    written = store.cancelled(task_id, attempt, "w1", {"answer": "Once upon a time",
                                                       "partial": True})
    assert written.applied and written.status == "failed"
    row = fetch_task(clean_db, task_id)
    assert is_cancelled(row) and row["worker"] is None and row["lease_expires_at"] is None
    assert row["response_payload"] == {
        "answer": "Once upon a time", "partial": True, "cancelled": True,
        "error": "Cancelled on request while it was running."}
    assert store.cancel(task_id) == "failed"


def test_a_cancel_request_survives_whatever_ends_the_attempt(
        store: TaskStore, clean_db: str) -> None:
    """A handler that ignored the request completes: its result is discarded. A holder
    that died: rescue ends the row instead of running it again. A retry scheduled
    after the request: the row ends, the retry is fenced out."""
    attempts: dict[str, int] = {}
    for _ in range(3):
        task_id = insert_task(clean_db, PROMPT)
        attempts[task_id] = start(store, task_id)
    finished, died, retried = attempts
    store.progress(finished, attempts[finished], "w1", {"answer": "half", "partial": True})
    for task_id in attempts:
        assert store.cancel(task_id) == "processing"

    assert store.complete(finished, attempts[finished], "w1", {"answer": "whole"}).applied
    sql(clean_db, "update public.agent_task_requests set lease_expires_at = now() - "
                  "interval '1 second' where id = %s", [died])
    assert {r.id: r.status for r in store.rescue()} == {died: "failed"}
    store.schedule_retry(retried, attempts[retried], "w1",
                         {"type": "RetryableError", "message": "busy"}, 1.0, LEASE)
    for task_id in attempts:
        assert is_cancelled(fetch_task(clean_db, task_id)), task_id
    assert fetch_task(clean_db, finished)["response_payload"]["answer"] == "half"
    started, _ = store.start(retried, attempts[retried], "w2", LEASE)
    assert started is None
    assert store.claim(10, LEASE) == []

    # An operator retry clears the request: the new attempt runs normally.
    assert store.requeue(ids=[finished]) == [finished]
    assert fetch_task(clean_db, finished)["cancel_requested_at"] is None
    attempt = start(store, finished)
    assert store.complete(finished, attempt, "w1", {"answer": "again"}).applied
    assert fetch_task(clean_db, finished)["status"] == "completed"


def test_between_retries_or_before_start_the_row_ends_at_once(
        store: TaskStore, clean_db: str) -> None:
    waiting = insert_task(clean_db, PROMPT)
    attempt = start(store, waiting)
    queued = insert_task(clean_db, PROMPT)
    store.schedule_retry(waiting, attempt, "w1", {"type": "RetryableError", "message": "429"},
                         30.0, LEASE)
    assert store.claim(10, LEASE)[0].id == queued  # claimed, its job not started yet
    assert store.cancel(waiting) == "failed"
    assert store.cancel(queued) == "failed"
    assert fetch_task(clean_db, waiting)["error"]["message"] == \
        "Cancelled on request while waiting to retry."
    assert fetch_task(clean_db, queued)["error"]["message"] == \
        "Cancelled on request before it started."
    assert store.start(waiting, attempt, "w2", LEASE)[0] is None  # the retry is fenced out
    assert store.start(queued, 1, "w2", LEASE)[0] is None


def test_finished_rows_are_left_as_they_are(store: TaskStore, clean_db: str) -> None:
    done = insert_task(clean_db, PROMPT)
    store.complete(done, start(store, done), "w1", {"answer": "42"})
    broken = insert_task(clean_db, PROMPT)
    store.fail(broken, start(store, broken), "w1", {"type": "Boom", "message": "no"})
    before = {t: fetch_task(clean_db, t) for t in (done, broken)}
    assert store.cancel(done) == "completed"
    assert store.cancel(broken) == "failed"
    assert {t: fetch_task(clean_db, t) for t in (done, broken)} == before


def test_missing_id_answers_null(store: TaskStore) -> None:
    assert store.cancel(str(uuid.uuid4())) is None


def test_revoking_a_job_cancels_only_its_attempt(store: TaskStore, clean_db: str) -> None:
    task_id = insert_task(clean_db, PROMPT)
    attempt = start(store, task_id)
    assert store.request_cancel(task_id, attempt + 1) == "processing"  # another attempt's job
    assert fetch_task(clean_db, task_id)["cancel_requested_at"] is None
    assert store.request_cancel(task_id, attempt) == "processing"  # its holder is asked
    assert store.request_cancel(task_id, attempt, holder_gone=True) == "failed"  # killed
    assert is_cancelled(fetch_task(clean_db, task_id))


def test_users_cancel_their_own_rows_only(clean_db: str) -> None:
    """As PostgREST runs a signed-in user's request: someone else's row answers exactly
    like a row that does not exist (null), and stays as it is."""
    alices = submit_as(clean_db, ALICE)
    assert cancel_as(clean_db, "authenticated", alices, BOB) is None
    assert cancel_as(clean_db, "authenticated", str(uuid.uuid4()), BOB) is None
    assert cancel_as(clean_db, "authenticated", alices) is None  # no user at all
    assert fetch_task(clean_db, alices)["status"] == "pending"
    assert cancel_as(clean_db, "authenticated", alices, ALICE) == "failed"
    assert cancel_as(clean_db, "authenticated", alices, ALICE) == "failed"
    bobs = submit_as(clean_db, BOB)
    assert cancel_as(clean_db, "service_role", bobs) == "failed"  # the service: any row


def test_only_cancel_agent_task_is_open_to_users(clean_db: str) -> None:
    task_id = submit_as(clean_db, ALICE)
    with pytest.raises(errors.InsufficientPrivilege), as_role(clean_db, "anon") as conn:
        conn.execute("select public.cancel_agent_task(%s)", [task_id])
    for call in ("select public.agent_task_request_cancel(%s, 1, true)",
                 "select * from public.agent_task_cancelled(%s, 1, 'w', null)",
                 "select * from public.agent_tasks_cancel_requested(array[%s]::uuid[], "
                 "array[1])"):
        with pytest.raises(errors.InsufficientPrivilege), \
                as_role(clean_db, "authenticated", ALICE) as conn:
            conn.execute(call, [task_id])
    with pytest.raises(errors.InsufficientPrivilege), \
            as_role(clean_db, "authenticated", ALICE) as conn:
        conn.execute("update public.agent_task_requests set cancel_requested_at = now()")


def user_client(url: str, user: str | None) -> Client:
    """supabase-py as a frontend holds it: the anon key, and a signed-in user's token."""
    client = create_client(url, role_key("anon"), options=ClientOptions(
        httpx_client=httpx.Client(timeout=10), auto_refresh_token=False,
        persist_session=False))
    if user is not None:
        client.postgrest.auth(user_token(user))
    return client


def test_users_cancel_through_the_api_with_their_token(clean_db: str, postgrest: str) -> None:
    """supabase.rpc('cancel_agent_task', { task_id }) with a signed user JWT, through the
    PostgREST stand-in: Bob gets null for Alice's row, as for a missing one."""
    alices = submit_as(clean_db, ALICE)
    bob, alice = user_client(postgrest, BOB), user_client(postgrest, ALICE)
    assert bob.rpc("cancel_agent_task", {"task_id": alices}).execute().data is None
    assert bob.rpc("cancel_agent_task", {"task_id": str(uuid.uuid4())}).execute().data is None
    assert fetch_task(clean_db, alices)["status"] == "pending"
    assert alice.rpc("cancel_agent_task", {"task_id": alices}).execute().data == "failed"
    assert is_cancelled(fetch_task(clean_db, alices))
    with pytest.raises(APIError) as refused:  # the anon key alone: no such function for it
        user_client(postgrest, None).rpc("cancel_agent_task", {"task_id": alices}).execute()
    assert refused.value.code == "42501"


# --------------------------------------------------------------------------- the handler API


def test_handler_api_in_process() -> None:
    """tasks.cancelled() and report_progress() follow the bound scope; an async handler's
    task is cancelled from another thread, with its cleanup run."""
    import asyncio
    import threading

    from tasks import Cancelled, cancelled, report_progress
    from tasks.cancellation import CancelScope, bind, cancels_current_task, unbind

    assert cancelled() is False and report_progress({"answer": "x"}) is False  # no task
    scope = CancelScope()
    token = bind(scope)
    try:
        assert cancelled() is False
        assert scope.cancel() is True and scope.cancel() is False
        assert cancelled() is True
        with pytest.raises(Cancelled):
            report_progress({"answer": "x"})
    finally:
        unbind(token)

    scope, cleaned = CancelScope(), []

    async def handler() -> None:
        with cancels_current_task():
            try:
                await asyncio.sleep(60)
            finally:
                cleaned.append(True)

    token = bind(scope)
    try:
        threading.Timer(0.05, scope.cancel).start()
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(handler())
    finally:
        unbind(token)
    assert cleaned == [True]


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
