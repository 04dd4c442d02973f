"""The task store's behaviour, run on both transports (direct Postgres and supabase-py
through the PostgREST stub): the state machine lives in SQL, so both must agree."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from postgrest.exceptions import APIError

from bridge.errors import StoreMisconfigured, StoreRejected, StoreUnavailable
from bridge.localstack import free_port
from bridge.migrate import SCHEMA_VERSION
from bridge.store import Claim, TaskStore
from bridge.store.postgres import PostgresTransport
from bridge.store.supabase import SupabaseTransport
from supabase import ClientOptions, create_client
from tests.db import fetch_task as _fetch_task
from tests.db import insert_task, sql
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub

LEASE = 60.0
ERROR = {"type": "Boom", "message": "it broke", "retryable": True}


@pytest.fixture
def make_store(store: TaskStore, clean_db: str, request: pytest.FixtureRequest
               ) -> Iterator[Callable[[], TaskStore]]:
    """More stores on the same transport kind as `store` (one per simulated process)."""
    made: list[TaskStore] = []

    def make() -> TaskStore:
        if store.transport.name == "postgres":
            s = TaskStore(PostgresTransport(clean_db))
        else:
            s = TaskStore(SupabaseTransport(request.getfixturevalue("postgrest"), SERVICE_KEY))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()




def expire(db_url: str, task_id: str) -> None:
    """End a lease now instead of sleeping through it."""
    sql(db_url, "update public.agent_task_requests set lease_expires_at = now() - "
                "interval '1 second' where id = %s", [task_id])


def fetch_task(db_url: str, task_id: str) -> dict[str, Any]:
    """The row as the database has it now."""
    return _fetch_task(db_url, task_id)


def claim_one(store: TaskStore) -> Claim:
    claims = store.claim(1, LEASE)
    assert len(claims) == 1
    return claims[0]


def test_concurrent_claimers_take_every_row_once(
        store: TaskStore, make_store: Callable[[], TaskStore], clean_db: str) -> None:
    """SKIP LOCKED must hand each row to exactly one of many bridges."""
    sql(clean_db, "insert into public.agent_task_requests (request_payload) "
                  "select jsonb_build_object('n', n) from generate_series(1, 2000) n")
    stores = [make_store() for _ in range(8)]
    results: list[list[Claim]] = [[] for _ in stores]
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            while batch := stores[i].claim(25, LEASE):
                results[i].extend(batch)
        except BaseException as exc:  # surfaced below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    ids = [c.id for r in results for c in r]
    assert len(ids) == 2000
    assert len(set(ids)) == 2000
    assert {c.attempt for r in results for c in r} == {1}
    assert sum(1 for r in results if r) > 1  # the work really was shared
    assert sql(clean_db, "select status, min(attempts), max(attempts), count(*) "
                         "from public.agent_task_requests group by status") == [
        ("processing", 1, 1, 2000)]


def test_fencing_refuses_stale_and_foreign_writes(store: TaskStore, clean_db: str) -> None:
    """After a lease expires and the row is claimed again, the old holder can change nothing."""
    task_id = insert_task(clean_db)
    old = claim_one(store)
    started, _ = store.start(task_id, old.attempt, "w1", LEASE)
    assert started is not None
    expire(clean_db, task_id)
    assert [(r.id, r.status) for r in store.rescue()] == [(task_id, "pending")]
    new = claim_one(store)
    assert new == Claim(task_id, 2)
    assert store.start(task_id, 2, "w2", LEASE)[1].applied

    before = fetch_task(clean_db, task_id)
    stale = [
        store.complete(task_id, 1, "w1", {"answer": "late"}),
        store.fail(task_id, 1, "w1", ERROR),
        store.heartbeat(task_id, 1, "w1", LEASE),
        store.schedule_retry(task_id, 1, "w1", ERROR, 1, LEASE),
        store.progress(task_id, 1, "w1", {"partial": "x"}),
        store.complete(task_id, 2, "w1", {"answer": "not mine"}),  # right attempt, wrong worker
    ]
    assert [(r.applied, r.status, r.attempts, r.worker) for r in stale] == [
        (False, "processing", 2, "w2")] * len(stale)
    assert stale[0].refusal(1) == "the row is at attempt 2 (status processing)"
    assert stale[-1].refusal(2) == "another worker holds this attempt (w2)"
    assert fetch_task(clean_db, task_id) == before

    assert store.complete(task_id, 2, "w2", {"answer": 42}).applied
    done = fetch_task(clean_db, task_id)
    again = store.complete(task_id, 2, "w2", {"answer": "twice"})
    assert (again.applied, again.status) == (False, "completed")
    assert again.refusal(2) == "the row is already completed"
    assert fetch_task(clean_db, task_id) == done
    assert done["response_payload"] == {"answer": 42}


def test_a_bind_takes_the_attempt_and_reads_nothing_back(
        store: TaskStore, clean_db: str) -> None:
    """A message that carried its payload binds with start's fence, and the payload does not
    travel back: the bind's answer has no payload column to send or parse."""
    task_id = insert_task(clean_db, {"prompt": "p", "context": {"long": "x" * 5000}})
    c = claim_one(store)
    rows = store._call("bind", p_id=task_id, p_attempt=c.attempt, p_worker="w1",
                       p_lease_seconds=LEASE, p_spend=None)
    assert [r["applied"] for r in rows] == [True]
    if store.transport.name == "postgres":  # (rpc() returns every column of the function)
        assert set(rows[0]) == {"applied", "status", "attempts", "worker", "budget"}
    assert store.bind(task_id, c.attempt, "w1", LEASE).applied  # its own retry
    refused = store.bind(task_id, c.attempt, "w2", LEASE)
    assert (refused.applied, refused.status, refused.worker) == (False, "processing", "w1")
    row = fetch_task(clean_db, task_id)
    assert (row["worker"], row["status"], row["attempts"]) == ("w1", "processing", c.attempt)


def test_start_refuses_duplicate_delivery_while_lease_is_held(
        store: TaskStore, clean_db: str) -> None:
    """A second delivery of the same job waits for the holder to let go or die."""
    task_id = insert_task(clean_db, {"prompt": "p"}, priority=3)
    c = claim_one(store)
    started, result = store.start(task_id, c.attempt, "w1", LEASE)
    assert started is not None and result.applied
    assert started.request_payload == {"prompt": "p"}
    assert started.as_handler_input()["priority"] == 3

    dup, refused = store.start(task_id, c.attempt, "w2", LEASE)
    assert dup is None and (refused.applied, refused.worker) == (False, "w1")
    assert store.start(task_id, c.attempt, "w1", LEASE)[0] is not None  # its own retry

    assert store.schedule_retry(task_id, c.attempt, "w1", ERROR, 0, LEASE).applied
    row = fetch_task(clean_db, task_id)
    assert (row["worker"], row["status"], row["error"]["type"]) == (None, "processing", "Boom")
    assert store.start(task_id, c.attempt, "w2", LEASE)[1].applied  # after a retry: anyone

    expire(clean_db, task_id)
    taken, _ = store.start(task_id, c.attempt, "w3", LEASE)  # holder's lease ran out
    assert taken is not None
    assert fetch_task(clean_db, task_id)["worker"] == "w3"
    assert not store.heartbeat(task_id, c.attempt, "w2", LEASE).applied


def test_rescue_returns_expired_rows_and_gives_up_at_max_attempts(
        store: TaskStore, clean_db: str) -> None:
    """An expired lease goes back to pending, or to failed with a message a user can read."""
    retry_id = insert_task(clean_db, max_attempts=2)
    last_id = insert_task(clean_db, max_attempts=1)
    unstarted_id = insert_task(clean_db, max_attempts=1)
    live_id = insert_task(clean_db)
    assert len(store.claim(4, LEASE)) == 4
    for task_id in (retry_id, last_id):
        assert store.start(task_id, 1, "w1", LEASE)[0] is not None
        expire(clean_db, task_id)
    expire(clean_db, unstarted_id)

    rescued = {r.id: (r.attempt, r.status) for r in store.rescue()}
    assert rescued == {retry_id: (1, "pending"), last_id: (1, "failed"),
                       unstarted_id: (1, "pending")}
    assert fetch_task(clean_db, live_id)["status"] == "processing"
    assert fetch_task(clean_db, retry_id)["lease_expires_at"] is None
    # No worker ever ran it (its job waited in, or was lost from, the broker): the
    # attempt is given back, as a release would.
    assert fetch_task(clean_db, unstarted_id)["max_attempts"] == 2
    assert fetch_task(clean_db, retry_id)["max_attempts"] == 2

    failed = fetch_task(clean_db, last_id)
    assert failed["finished_at"] is not None and failed["worker"] is None
    assert failed["error"]["type"] == "LeaseExpired"
    assert failed["error"]["message"].startswith("Gave up after 1 of 1 attempts")
    assert failed["response_payload"]["error"].startswith("Gave up after 1 of 1 attempts")
    assert store.rescue() == []


def test_release_returns_row_without_spending_an_attempt(store: TaskStore, clean_db: str) -> None:
    """A claim the bridge could not enqueue is given back whole."""
    task_id = insert_task(clean_db, max_attempts=1)
    c = claim_one(store)
    assert not store.release(Claim(task_id, c.attempt + 1)).applied  # stale claim
    result = store.release(c)
    assert (result.applied, result.status) == (True, "pending")
    row = fetch_task(clean_db, task_id)
    assert (row["status"], row["lease_expires_at"]) == ("pending", None)
    assert row["max_attempts"] - row["attempts"] == 1  # still one real attempt left

    c2 = claim_one(store)
    assert c2.attempt == 2
    assert store.start(task_id, c2.attempt, "w1", LEASE)[0] is not None
    refused = store.release(c2)  # a started row is the worker's, not the bridge's
    assert (refused.applied, refused.status, refused.worker) == (False, "processing", "w1")


def test_claim_order_priority_then_age_and_not_before_run_at(
        store: TaskStore, clean_db: str) -> None:
    """Higher priority first, then earlier run_at; rows due later wait."""
    now = datetime.now(UTC)
    low_old = insert_task(clean_db, run_at=now - timedelta(minutes=5))
    high = insert_task(clean_db, priority=10)
    low_older = insert_task(clean_db, run_at=now - timedelta(minutes=10))
    mid = insert_task(clean_db, priority=5)
    later = insert_task(clean_db, priority=100, run_at=now + timedelta(hours=1))
    order = [claim_one(store).id for _ in range(4)]
    assert order == [high, mid, low_older, low_old]
    assert store.claim(10, LEASE) == []
    assert fetch_task(clean_db, later)["status"] == "pending"
    stats = store.stats()
    assert (stats.pending, stats.due) == (1, 0)


def test_requeue_by_ids_time_and_error_type(store: TaskStore, clean_db: str) -> None:
    """Operators put failed rows back, selected three ways, with fresh attempts."""
    ids = [insert_task(clean_db, {"n": n}, max_attempts=1) for n in range(3)]
    done = insert_task(clean_db)
    types = ["Timeout", "BadInput", "Timeout"]
    for c in store.claim(10, LEASE):
        store.start(c.id, c.attempt, "w", LEASE)
        if c.id == done:
            store.complete(c.id, c.attempt, "w", {"ok": True})
        else:
            error = {**ERROR, "type": types[ids.index(c.id)], "retryable": False}
            assert store.fail(c.id, c.attempt, "w", error).applied
    failed = fetch_task(clean_db, ids[0])
    assert failed["response_payload"] == {"error": "it broke"}
    assert failed["error"]["attempt"] == 1
    sql(clean_db, "update public.agent_task_requests set finished_at = now() - interval "
                  "'2 hours' where id = %s", [ids[2]])

    assert store.requeue(ids=[ids[0], done], more_attempts=2) == [ids[0]]
    row = fetch_task(clean_db, ids[0])
    assert (row["status"], row["max_attempts"], row["finished_at"], row["response_payload"]) \
        == ("pending", 3, None, None)
    assert store.requeue(error_type="BadInput") == [ids[1]]
    since = datetime.now(UTC) - timedelta(hours=1)
    assert store.requeue(failed_since=since) == []  # ids[2] failed before that
    assert store.requeue(failed_since=since - timedelta(hours=2)) == [ids[2]]
    assert sorted(c.id for c in store.claim(10, LEASE)) == sorted(ids)
    assert fetch_task(clean_db, ids[0])["attempts"] == 2
    assert fetch_task(clean_db, done)["status"] == "completed"


def test_stats_counts_each_state(store: TaskStore, clean_db: str) -> None:
    """`agent-bridge status` and the heartbeat read these numbers."""
    assert store.stats().oldest_due_seconds is None
    oldest = datetime(2020, 1, 1, tzinfo=UTC)
    insert_task(clean_db, run_at=oldest)
    insert_task(clean_db, run_at=datetime.now(UTC) + timedelta(hours=1))
    stuck = insert_task(clean_db, priority=9)
    finished = insert_task(clean_db, priority=8)
    claimed = store.claim(2, LEASE)
    assert {c.id for c in claimed} == {stuck, finished}
    expire(clean_db, stuck)
    attempt = next(c.attempt for c in claimed if c.id == finished)
    store.start(finished, attempt, "w", LEASE)
    store.complete(finished, attempt, "w", {"ok": True})
    sql(clean_db, "insert into public.agent_task_requests (status, finished_at) "
                  "values ('failed', now())")
    [(before,)] = sql(clean_db, "select extract(epoch from now() - %s)::float8", [oldest])
    s = store.stats()
    [(after,)] = sql(clean_db, "select extract(epoch from now() - %s)::float8", [oldest])
    assert (s.pending, s.due, s.processing, s.completed, s.failed, s.expired_leases) == (
        2, 1, 1, 1, 1, 1)
    # The age of the oldest due row, as the database saw it between the two reads.
    assert s.oldest_due_seconds is not None and before <= s.oldest_due_seconds <= after


def test_schema_version(store: TaskStore) -> None:
    """`agent-bridge check` compares this with what the code expects."""
    assert store.schema_version() == SCHEMA_VERSION == 9


def test_bad_input_is_rejected(store: TaskStore) -> None:
    """A call the database refuses is not worth retrying: StoreRejected."""
    with pytest.raises(StoreRejected):
        store.start("not-a-uuid", 1, "w", LEASE)




def test_supabase_outage_bad_key_and_no_server(clean_db: str) -> None:
    """PostgREST's 503 and a refused connection are transient; a wrong key is a
    configuration error (retried like an outage, so a fixed key lets everything resume)."""
    stub = PostgrestStub(clean_db, service_key=SERVICE_KEY)
    url = stub.start()
    store = TaskStore(SupabaseTransport(url, SERVICE_KEY, timeout=5))
    wrong_key = TaskStore(SupabaseTransport(url, "not-the-key", timeout=5))
    nobody = TaskStore(SupabaseTransport(f"http://127.0.0.1:{free_port()}", SERVICE_KEY))
    try:
        assert store.stats().pending == 0
        stub.pause()
        with pytest.raises(StoreUnavailable, match="PGRST000"):
            store.stats()
        stub.resume()
        assert store.schema_version() == SCHEMA_VERSION
        with pytest.raises(StoreMisconfigured, match="Invalid API key: set SUPABASE_SERVICE_KEY"):
            wrong_key.stats()
        with pytest.raises(StoreUnavailable):
            nobody.stats()
    finally:
        for s in (store, wrong_key, nobody):
            s.close()
        stub.stop()


def test_stub_table_api_as_submit_uses_it(clean_db: str, postgrest: str) -> None:
    """The CLI's `submit` inserts and reads rows through supabase-py's table API."""
    options = ClientOptions(httpx_client=httpx.Client(timeout=10), auto_refresh_token=False,
                            persist_session=False)
    client = create_client(postgrest, SERVICE_KEY, options=options)
    table = client.table("agent_task_requests")
    [row] = table.insert({"request_payload": {"prompt": "hi"}, "priority": 2}).execute().data
    assert isinstance(row, dict) and (row["status"], row["priority"]) == ("pending", 2)
    [again] = table.select("*").eq("id", row["id"]).execute().data
    assert again == row
    assert table.select("id").eq("status", "completed").execute().data == []
    with pytest.raises(APIError) as info:
        table.insert({"request_payload": ["not", "an", "object"]}).execute()
    assert info.value.code == "22023"
    assert info.value.message is not None
    assert info.value.message.startswith("request_payload must be a JSON object")
    with pytest.raises(APIError) as info:
        client.rpc("agent_tasks_nope", {}).execute()
    assert info.value.code == "PGRST202"
