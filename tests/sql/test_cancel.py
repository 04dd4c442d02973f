"""Cancellation (issue 12): `cancel_agent_task`, the worker stopping a running handler,
`agent-bridge cancel`, and a Celery revoke from Flower. The SQL contract is checked on
both transports and as Supabase's roles; the pipeline with real bridge and worker
processes, on both transports where the transport matters."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from postgrest.exceptions import APIError
from psycopg import errors

from bridge.store import TaskStore
from tests.db import as_role, claim_and_start, insert_task, sql
from tests.db import fetch_task as _fetch_task
from tests.flower import AUTH
from tests.users import user_client

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
    attempt = claim_and_start(store, task_id)
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
        attempts[task_id] = claim_and_start(store, task_id)
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
    attempt = claim_and_start(store, finished)
    assert store.complete(finished, attempt, "w1", {"answer": "again"}).applied
    assert fetch_task(clean_db, finished)["status"] == "completed"


def test_between_retries_or_before_start_the_row_ends_at_once(
        store: TaskStore, clean_db: str) -> None:
    waiting = insert_task(clean_db, PROMPT)
    attempt = claim_and_start(store, waiting)
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
    store.complete(done, claim_and_start(store, done), "w1", {"answer": "42"})
    broken = insert_task(clean_db, PROMPT)
    store.fail(broken, claim_and_start(store, broken), "w1", {"type": "Boom", "message": "no"})
    before = {t: fetch_task(clean_db, t) for t in (done, broken)}
    assert store.cancel(done) == "completed"
    assert store.cancel(broken) == "failed"
    assert {t: fetch_task(clean_db, t) for t in (done, broken)} == before


def test_missing_id_answers_null(store: TaskStore) -> None:
    assert store.cancel(str(uuid.uuid4())) is None


def test_revoking_a_job_cancels_only_its_attempt(store: TaskStore, clean_db: str) -> None:
    task_id = insert_task(clean_db, PROMPT)
    attempt = claim_and_start(store, task_id)
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




























def revoke(api: str, job: str, terminate: bool) -> None:
    response = httpx.post(f"{api}/task/revoke/{job}",
                          params={"terminate": "true"} if terminate else {}, auth=AUTH,
                          timeout=10)
    assert response.status_code == 200, response.text








