"""Every failure ends its row once, with a clear error, and never runs the agent twice
(issue 10): the fencing edges on both transports, and the schema's own checks. Odd
outcomes with a real bridge and worker are tests/acceptance/test_odd_outcomes.py."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors

from bridge.errors import StoreRejected
from bridge.store import Claim, TaskStore
from bridge.store.postgres import PostgresTransport
from tests.db import fetch_task, insert_task, insert_undecodable, nested, sql

LEASE = 60.0
ERROR = {"type": "Boom", "message": "it broke", "retryable": True}


# --------------------------------------------------------------------------- the door


def test_deep_payload_is_refused_at_insert_naming_the_limit(clean_db: str) -> None:
    """1,200 levels (2.4 KB) passed the size check and broke the worker's JSON decoder.
    Refused by failing the row at once (so a user's day budget counts it, issue 20):
    InvalidRequest naming the limit, the payload not kept, never claimed."""
    for payload in (nested(1200), '{"p": [' * 33 + "]}" * 33):  # arrays count
        [(status, error, stored)] = sql(
            clean_db, "insert into public.agent_task_requests (request_payload) "
                      "values (%s::jsonb) returning status, error, request_payload", [payload])
        assert (status, error["type"], stored) == ("failed", "InvalidRequest", {})
        assert error["message"] == ("request_payload is nested more than 64 levels deep; "
                                    "the limit is 64 levels")
    [(status,)] = sql(clean_db, "insert into public.agent_task_requests (request_payload) "
                                "values (%s::jsonb) returning status",
                      [nested(63)])  # the root object is level 1
    assert status == "pending"
    assert len(sql(clean_db, "select * from public.agent_tasks_claim(10, 30)")) == 1


@pytest.mark.parametrize("value", ["infinity", "-infinity"])
def test_run_at_must_be_finite(clean_db: str, value: str) -> None:
    with pytest.raises(errors.InvalidParameterValue, match=f"run_at must be a finite time, "
                                                           f"got {value}"):
        sql(clean_db, "insert into public.agent_task_requests (request_payload, run_at) "
                      "values ('{\"prompt\": \"p\"}', %s)", [value])
    task_id = insert_task(clean_db)
    with pytest.raises(errors.InvalidParameterValue):
        sql(clean_db, "update public.agent_task_requests set run_at = %s where id = %s",
            [value, task_id])
    # Even with the trigger out of the way, the constraint holds.
    with pytest.raises(errors.CheckViolation, match="agent_task_requests_run_at_check"), \
            psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")  # no triggers
        conn.execute("update public.agent_task_requests set run_at = %s where id = %s",
                     [value, task_id])


def test_stats_never_fail_on_rows_a_user_can_insert(store: TaskStore, clean_db: str) -> None:
    """`agent-bridge status` read stats; '-infinity' made them fail. The extremes of
    finite time still count."""
    for when in ("4713-01-01 00:00:00+00 BC", "294276-12-31 00:00:00+00", "epoch"):
        insert_task(clean_db, run_at=when, priority=2**31 - 1)
    stats = store.stats()
    assert (stats.pending, stats.due) == (3, 2)
    assert stats.oldest_due_seconds is not None and stats.oldest_due_seconds > 2e11


def test_signed_in_user_cannot_insert_a_processing_row(clean_db: str) -> None:
    """RLS allows users only `pending` rows; 'completed' was tried before, never this."""
    claims = json.dumps({"role": "authenticated", "sub": str(uuid.uuid4())})
    with pytest.raises(errors.InsufficientPrivilege, match="row-level security"), \
            psycopg.connect(clean_db, autocommit=True) as conn, conn.transaction():
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)", [claims])
        conn.execute("insert into public.agent_task_requests (status, request_payload) "
                     "values ('processing', '{\"prompt\": \"p\"}')")
    assert sql(clean_db, "select count(*) from public.agent_task_requests") == [(0,)]


def test_a_processing_row_always_holds_a_lease(clean_db: str) -> None:
    """Without one, rescue would never see the row."""
    task_id = insert_task(clean_db)
    sql(clean_db, "select * from public.agent_tasks_claim(1, 60)")
    with pytest.raises(errors.CheckViolation, match="agent_task_requests_lease_held_check"):
        sql(clean_db, "update public.agent_task_requests set lease_expires_at = null "
                      "where id = %s", [task_id])


# --------------------------------------------------------------------------- fencing


def held(store: TaskStore, clean_db: str, worker: str = "w1") -> str:
    """A row whose attempt 1 was started by `worker`, then lost its lease and was
    claimed and started again, as attempt 2, by the SAME worker id: only the attempt
    number tells the old writes from the new."""
    task_id = insert_task(clean_db)
    [first] = store.claim(1, LEASE)
    assert store.start(task_id, first.attempt, worker, LEASE)[0] is not None
    sql(clean_db, "update public.agent_task_requests set lease_expires_at = now() - "
                  "interval '1 second' where id = %s", [task_id])
    assert [r.status for r in store.rescue()] == ["pending"]
    [second] = store.claim(1, LEASE)
    assert second.attempt == 2
    assert store.start(task_id, 2, worker, LEASE)[0] is not None
    return task_id


@pytest.mark.parametrize("write", ["start", "heartbeat", "progress", "complete", "fail",
                                   "schedule_retry"])
def test_an_old_attempt_is_refused_even_with_the_right_worker(
        store: TaskStore, clean_db: str, write: str) -> None:
    task_id = held(store, clean_db)
    before = fetch_task(clean_db, task_id)
    calls = {
        "start": lambda: store.start(task_id, 1, "w1", LEASE)[1],
        "heartbeat": lambda: store.heartbeat(task_id, 1, "w1", LEASE),
        "progress": lambda: store.progress(task_id, 1, "w1", {"partial": "old"}),
        "complete": lambda: store.complete(task_id, 1, "w1", {"answer": "old"}),
        "fail": lambda: store.fail(task_id, 1, "w1", ERROR),
        "schedule_retry": lambda: store.schedule_retry(task_id, 1, "w1", ERROR, 0, LEASE),
    }
    result = calls[write]()
    assert (result.applied, result.status, result.attempts, result.worker) == (
        False, "processing", 2, "w1")
    assert result.refusal(1) == "the row is at attempt 2 (status processing)"
    assert fetch_task(clean_db, task_id) == before


def test_an_old_job_after_a_newer_claim_that_has_not_started(
        store: TaskStore, clean_db: str) -> None:
    """Attempt 2 is claimed but its job has not reached a worker (worker is null, so
    the worker check lets anyone in): attempt 1's job, arriving late, must not start."""
    task_id = insert_task(clean_db)
    [first] = store.claim(1, LEASE)
    assert store.release(first).applied
    [second] = store.claim(1, LEASE)
    assert second.attempt == 2
    before = fetch_task(clean_db, task_id)
    started, found = store.start(task_id, 1, "w-late", LEASE)
    assert started is None and (found.applied, found.attempts, found.worker) == (
        False, 2, None)
    assert fetch_task(clean_db, task_id) == before
    assert store.start(task_id, 2, "w-new", LEASE)[0] is not None


def test_release_only_gives_back_an_attempt_no_worker_started(
        store: TaskStore, clean_db: str) -> None:
    """After schedule_retry the worker is null again, but the attempt did run."""
    task_id = insert_task(clean_db, max_attempts=1)
    [claim] = store.claim(1, LEASE)
    assert store.start(task_id, claim.attempt, "w1", LEASE)[0] is not None
    assert store.schedule_retry(task_id, claim.attempt, "w1", ERROR, 0, LEASE).applied
    before = fetch_task(clean_db, task_id)
    assert before["worker"] is None and before["started_at"] is not None
    refused = store.release(Claim(task_id, claim.attempt))
    assert (refused.applied, refused.status) == (False, "processing")
    assert fetch_task(clean_db, task_id) == before  # max_attempts not raised, still processing


@pytest.mark.parametrize("lease", [None, 0.0, -5.0, 1e12])
def test_lease_arguments_are_checked(store: TaskStore, clean_db: str,
                                     lease: float | None) -> None:
    """A null lease left a processing row that rescue never sees; others overflowed."""
    task_id = insert_task(clean_db)
    [claim] = store.claim(1, LEASE)
    assert store.start(task_id, claim.attempt, "w1", LEASE)[0] is not None
    before = fetch_task(clean_db, task_id)
    bad: Any = lease
    with pytest.raises(StoreRejected, match="p_lease_seconds must be more than 0"):
        store.heartbeat(task_id, claim.attempt, "w1", bad)
    with pytest.raises(StoreRejected, match="p_lease_seconds must be more than 0"):
        store.schedule_retry(task_id, claim.attempt, "w1", ERROR, 1, bad)
    with pytest.raises(StoreRejected, match="p_delay_seconds must be at least 0"):
        store.schedule_retry(task_id, claim.attempt, "w1", ERROR, 1e20, LEASE)
    assert fetch_task(clean_db, task_id) == before


def test_nan_and_infinite_leases_are_refused(clean_db: str) -> None:
    """(JSON has no NaN, so the direct transport only.)"""
    store = TaskStore(PostgresTransport(clean_db))
    try:
        task_id = insert_task(clean_db)
        [claim] = store.claim(1, LEASE)
        store.start(task_id, claim.attempt, "w1", LEASE)
        for lease in (math.nan, math.inf):
            with pytest.raises(StoreRejected, match="p_lease_seconds"):
                store.heartbeat(task_id, claim.attempt, "w1", lease)
    finally:
        store.close()


def test_a_start_whose_answer_cannot_be_read_still_applied(clean_db: str) -> None:
    """What the runner counts on to fail such a row at once: the start committed before
    its answer was decoded, so the same (attempt, worker) may fail it. (Direct transport:
    the PostgREST stand-in decodes rows in Python itself and fails first; the real
    PostgREST builds its JSON in Postgres, and supabase-py decodes it after the commit.)"""
    store = TaskStore(PostgresTransport(clean_db))
    task_id = insert_undecodable(clean_db)
    [claim] = store.claim(1, LEASE)
    with pytest.raises(Exception) as raised:
        store.start(task_id, claim.attempt, "w1", LEASE)
    assert isinstance(raised.value, RecursionError)
    assert store.fail(task_id, claim.attempt, "w1", ERROR).applied
    store.close()
