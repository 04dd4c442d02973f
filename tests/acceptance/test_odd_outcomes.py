"""Every failure ends its row once, with a clear error, and never runs the agent twice
(issue 10): odd outcomes of a handler (errors and answers the database refuses, absurd
retry delays, payloads the worker cannot decode) with a real bridge and prefork worker.
The fencing edges and the schema's checks are tests/sql/test_hardening.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from bridge.migrate import migrate
from tasks.errors import MAX_ERROR_TEXT, RetryableError, clean_text
from tasks.payload import json_size
from tests.db import PgServer, insert_task, insert_undecodable, sql
from tests.stack import Stack

RESPONSE_LIMIT = 100_000  # AGENT_MAX_RESPONSE_BYTES of the workers below


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
    task_id = insert_undecodable(odd_stack.db_url)
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
