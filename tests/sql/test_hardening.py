"""Every failure ends its row once, with a clear error, and never runs the agent twice
(issue 10): bad input and odd outcomes with a real bridge and real workers, the
fencing edges on both transports, and the schema's own checks."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg import errors

from bridge.errors import StoreRejected
from bridge.migrate import migrate
from bridge.store import Claim, TaskStore
from bridge.store.postgres import PostgresTransport
from tasks.errors import MAX_ERROR_TEXT, RetryableError, clean_text
from tasks.payload import json_size
from tests.db import PgServer, fetch_task, insert_task, sql
from tests.stack import Stack

LEASE = 60.0
ERROR = {"type": "Boom", "message": "it broke", "retryable": True}
RESPONSE_LIMIT = 100_000  # AGENT_MAX_RESPONSE_BYTES of the workers below




def nested(depth: int) -> str:
    """A JSON object nested `depth` levels deep: {"a": {"a": ... 1}}."""
    return '{"a": ' * depth + "1" + "}" * depth




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


# --------------------------------------------------------------------------- bad outcomes


@pytest.fixture(scope="module")
def odd_stack(pg_server: PgServer, redis_url: str, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Stack]:
    """One bridge and one prefork worker running tests.hardening_handlers:odd for the
    tests below, each test inserting its own rows and waiting for them. A database and a
    Redis database of their own, so the other tests' processes never meet them."""
    db_url = pg_server.create_database()
    migrate(db_url)
    own_redis = re.sub(r"/\d*$", "/14", redis_url)
    redis.Redis.from_url(own_redis).flushdb()
    stack = Stack(db_url, own_redis, tmp_path_factory.mktemp("odd"),
                  AGENT_HANDLER="tests.hardening_handlers:odd",
                  AGENT_MAX_RESPONSE_BYTES=str(RESPONSE_LIMIT))
    try:
        stack.worker(concurrency=2)
        stack.bridge()
        yield stack
    finally:
        stack.stop_all()
        pg_server.drop_database(db_url)


def outcome(db_url: str, task_id: str) -> dict[str, Any]:
    """The row's outcome columns (not its payload: some cannot be decoded in Python)."""
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as conn:
        found = conn.execute("select status, attempts, error, response_payload "
                             "from public.agent_task_requests where id = %s",
                             [task_id]).fetchone()
    assert found is not None
    return dict(found)


def ended(stack: Stack, task_id: str, status: str = "failed") -> dict[str, Any]:
    stack.wait_for(f"{task_id} to end {status}", lambda: outcome(
        stack.db_url, task_id)["status"] in ("completed", "failed"))
    found = outcome(stack.db_url, task_id)
    assert found["status"] == status, found
    return found


def test_a_payload_the_worker_cannot_decode_fails_invalid_payload(odd_stack: Stack) -> None:
    """A row stored before the depth check (or with the limit raised) broke the driver
    at start with RecursionError: the row sat until its lease, the job was re-run."""
    with psycopg.connect(odd_stack.db_url, autocommit=True) as conn:
        conn.execute("set agent_bridge.max_request_depth = '5000'")
        found = conn.execute("insert into public.agent_task_requests (request_payload) "
                             "values (%s::jsonb) returning id::text", [nested(1200)]).fetchone()
    assert found is not None
    task_id = found[0]
    failed = ended(odd_stack, task_id)
    assert failed["error"]["type"] == "InvalidPayload"
    assert failed["error"]["message"].startswith("request_payload could not be read "
                                                 "(RecursionError: ")
    assert failed["attempts"] == 1 and odd_stack.runs(task_id) == []
    sql(odd_stack.db_url, "delete from public.agent_task_requests where id = %s", [task_id])
    after = insert_task(odd_stack.db_url, {"prompt": "next"})
    assert ended(odd_stack, after, "completed")["response_payload"]["answer"] == "ok: next"


@pytest.mark.parametrize("kind", ["nul", "surrogate", "long"])
def test_error_text_the_database_refuses_is_cleaned(odd_stack: Stack, kind: str) -> None:
    """ValueError("...\\x00...") or a lone surrogate made fail() itself fail (22P05)."""
    task_id = insert_task(odd_stack.db_url, {"prompt": "p", "context": {"error": kind}})
    failed = ended(odd_stack, task_id)
    message = failed["error"]["message"]
    assert failed["error"]["type"] == "ValueError"
    assert "\x00" not in message and len(message.encode()) <= MAX_ERROR_TEXT
    assert failed["response_payload"] == {"error": message}
    assert message == {"nul": "bad  byte", "surrogate": "lone \ufffd surrogate",
                       "long": clean_text("x" * 100_000)}[kind]
    assert failed["attempts"] == 1 and len(odd_stack.runs(task_id)) == 1


def test_an_absurd_retry_after_is_cut_to_the_longest_delay(odd_stack: Stack) -> None:
    """retry_after=1e20 overflowed the lease arithmetic (22008) and was never retried."""
    assert RetryableError("x", retry_after=1e20).retry_after == 86400
    task_id = insert_task(odd_stack.db_url, {"prompt": "p", "context": {"retry_after": 1e20}})
    done = ended(odd_stack, task_id, "completed")
    assert done["attempts"] == 1 and len(odd_stack.runs(task_id)) == 2
    # AGENT_RETRY_BACKOFF_MAX=1 in tests: the longest delay is 1.5 s.
    assert odd_stack.count_in_logs(f"Task {task_id} will retry in 1.5s") == 1


def test_a_huge_answer_fails_with_its_size_and_the_limit(odd_stack: Stack) -> None:
    """300 MB made the write fail with 54000, retried as if the database were down, and
    the handler ran three times."""
    task_id = insert_task(odd_stack.db_url, {"prompt": "p", "context": {
        "answer_bytes": 2 * RESPONSE_LIMIT}})
    failed = ended(odd_stack, task_id)
    size = json_size({"answer": "a" * 2 * RESPONSE_LIMIT})
    assert failed["error"]["type"] == "ResponseTooLarge"
    assert failed["error"]["message"] == (
        f"the handler's result is {size} bytes of JSON; the limit is {RESPONSE_LIMIT} bytes "
        "(AGENT_MAX_RESPONSE_BYTES)")
    assert (failed["error"]["size"], failed["error"]["limit"]) == (size, RESPONSE_LIMIT)
    assert failed["attempts"] == 1 and len(odd_stack.runs(task_id)) == 1


def test_a_too_large_partial_answer_is_skipped_not_fatal(odd_stack: Stack) -> None:
    task_id = insert_task(odd_stack.db_url, {"prompt": "p", "context": {
        "progress_bytes": 2 * RESPONSE_LIMIT}})
    done = ended(odd_stack, task_id, "completed")
    assert done["response_payload"]["answer"] == "ok: p"
    assert len(odd_stack.runs(task_id)) == 1


def test_an_answer_the_database_refuses_fails_at_once(odd_stack: Stack) -> None:
    """A NUL in the answer (22P05) is permanent: no write retries, no lease, no re-run."""
    task_id = insert_task(odd_stack.db_url, {"prompt": "p", "context": {"answer_nul": True}})
    failed = ended(odd_stack, task_id)
    assert failed["error"]["type"] == "ResponseRejected"
    assert failed["error"]["message"].startswith(
        "the database refused the handler's result: database refused the call (22P05)")
    assert failed["attempts"] == 1 and len(odd_stack.runs(task_id)) == 1
    assert odd_stack.count_in_logs("could not write the outcome") == 0


def test_a_refused_failure_writes_a_minimal_error(odd_stack: Stack) -> None:
    """If the database still refuses the error (here: a trigger of the app's own), a
    minimal one is written instead of leaving the row to its lease."""
    db = odd_stack.db_url
    sql(db, """
        create or replace function public.test_refuse_error() returns trigger
        language plpgsql as $$
        begin
            if new.error ->> 'message' like '%refuse-me%' then
                raise exception 'error text not allowed here' using errcode = '22023';
            end if;
            return new;
        end $$;
        create trigger test_refuse_error before update on public.agent_task_requests
            for each row execute function public.test_refuse_error();
    """)
    try:
        task_id = insert_task(db, {"prompt": "p", "context": {"raise": "please refuse-me"}})
        failed = ended(odd_stack, task_id)
    finally:
        sql(db, "drop trigger test_refuse_error on public.agent_task_requests; "
                "drop function public.test_refuse_error()")
    assert failed["error"]["type"] == "ValueError"
    assert failed["error"]["message"] == (
        "the task failed, but its error could not be stored: database refused the call "
        "(22023): error text not allowed here")
    assert failed["attempts"] == 1 and len(odd_stack.runs(task_id)) == 1
















def test_a_start_whose_answer_cannot_be_read_still_applied(clean_db: str) -> None:
    """What the runner counts on to fail such a row at once: the start committed before
    its answer was decoded, so the same (attempt, worker) may fail it. (Direct transport:
    the PostgREST stand-in decodes rows in Python itself and fails first; the real
    PostgREST builds its JSON in Postgres, and supabase-py decodes it after the commit.)"""
    store = TaskStore(PostgresTransport(clean_db))
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("set agent_bridge.max_request_depth = '5000'")
        found = conn.execute("insert into public.agent_task_requests (request_payload) "
                             "values (%s::jsonb) returning id::text", [nested(1200)]).fetchone()
    assert found is not None
    [claim] = store.claim(1, LEASE)
    with pytest.raises(Exception) as raised:
        store.start(found[0], claim.attempt, "w1", LEASE)
    assert isinstance(raised.value, RecursionError)
    assert store.fail(found[0], claim.attempt, "w1", ERROR).applied
    store.close()
