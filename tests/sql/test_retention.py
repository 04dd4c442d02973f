"""Retention (issue 20): finished rows older than an age are deleted with what is tied to
them, in bounded batches that never hold up a claim; through both transports, the
`prune` command, the bridge's own timer, and the statement a pg_cron job runs."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import psycopg
import pytest
from psycopg import errors

from bridge.migrate import migrate
from bridge.retention import Retention, prune
from bridge.store import Pruned, TaskStore
from bridge.store.postgres import PostgresTransport
from tests.db import as_role, insert_rows, sql
from tests.plans import explain_everything

# The pg_cron job of docs/how-to/retention.md (cron.schedule('agent-bridge-retention', …)) runs:
CRON_COMMAND = "select * from public.agent_tasks_prune(interval '30 days', 1000)"
DAYS_30 = timedelta(days=30)








def add_chunk(db_url: str, task_id: str) -> None:
    sql(db_url, "insert into public.agent_task_chunks (task_id, attempt, seq, answer_offset, "
                "text) values (%s, 1, 0, 0, 'partial')", [task_id])


def ids(db_url: str) -> set[str]:
    return {str(r[0]) for r in sql(db_url, "select id from public.agent_task_requests")}


def chunk_ids(db_url: str) -> set[str]:
    return {str(r[0]) for r in sql(db_url, "select task_id from public.agent_task_chunks")}


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# The SQL, through both transports ----------------------------------------------------
def test_old_finished_rows_and_their_chunks_go_the_rest_stays(store: TaskStore, clean_db: str
                                                               ) -> None:
    old = insert_rows(clean_db, "completed", "40 days") + insert_rows(clean_db, "failed", "31 days")
    recent = insert_rows(clean_db, "completed", "29 days")
    recent += insert_rows(clean_db, "failed", "1 hour")
    # Unfinished rows stay whatever their age.
    waiting = insert_rows(clean_db, "pending", "400 days")
    waiting += insert_rows(clean_db, "processing", "400 days")
    for task_id in (old[0], waiting[1]):
        add_chunk(clean_db, task_id)

    assert store.prune(DAYS_30, dry_run=True) == Pruned(2, 0)
    assert ids(clean_db) == {*old, *recent, *waiting}  # the dry run deleted nothing
    assert store.prune(DAYS_30) == Pruned(2, 0)
    assert ids(clean_db) == {*recent, *waiting}
    assert chunk_ids(clean_db) == {waiting[1]}  # the pruned row's chunks went with it
    assert store.prune(DAYS_30) == Pruned(0, 0)
    assert store.prune(timedelta(hours=2), dry_run=True) == Pruned(1, 0)


def test_batches_are_bounded(store: TaskStore, clean_db: str) -> None:
    insert_rows(clean_db, "completed", "60 days", count=7)
    assert store.prune(DAYS_30, 3, dry_run=True) == Pruned(7, 0)  # a count is not batched
    assert [store.prune(DAYS_30, 3).tasks for _ in range(4)] == [3, 3, 1, 0]

    insert_rows(clean_db, "failed", "60 days", count=7)
    assert prune(store, DAYS_30, batch=3, pause=0) == Pruned(7, 0)  # until a short batch
    assert ids(clean_db) == set()


def test_bad_arguments_are_refused(store: TaskStore, clean_db: str) -> None:
    from bridge.errors import StoreRejected

    for older_than, batch in [(timedelta(days=-1), 10), (DAYS_30, 0), (DAYS_30, 10001)]:
        with pytest.raises(StoreRejected, match="22023"):
            store.prune(older_than, batch)
    # Null arguments do nothing, as for the other state functions.
    old = insert_rows(clean_db, "completed", "40 days")
    for call in ("select * from public.agent_tasks_prune(null)",
                 "select * from public.agent_tasks_prune(null, null, null)",
                 "select * from public.agent_tasks_prune(interval '1 day', null)"):
        assert sql(clean_db, call) == [(0, 0)], call
    assert ids(clean_db) == set(old)


def test_only_the_service_role_may_prune(clean_db: str) -> None:
    old = insert_rows(clean_db, "completed", "40 days")
    user = "2b8a3c1e-0000-4000-8000-000000000001"
    for role, sub in (("anon", None), ("authenticated", user)):
        for call in ("select * from public.agent_tasks_prune(interval '1 day')",
                     "select agent_bridge.prune_finished(interval '1 day', 10)"):
            with pytest.raises(errors.InsufficientPrivilege), as_role(clean_db, role, sub) as conn:
                conn.execute(call)
    with as_role(clean_db, "service_role") as conn:
        assert conn.execute("select * from public.agent_tasks_prune(interval '1 day')"
                            ).fetchall() == [(1, 0)]
    assert ids(clean_db) == set() and old


# Locks: a prune never holds up a claim ---------------------------------------------------
def test_a_claim_is_not_blocked_by_a_prune_in_flight(clean_db: str) -> None:
    """A prune batch holds its rows until it commits; meanwhile claims, completions,
    requeues, inserts and another prune run under a lock_timeout and succeed: none needs
    a lock the prune holds. (All rows share one tenant, so agent_task_tenants is shared.)"""
    old = insert_rows(clean_db, "completed", "40 days", count=4)
    due = insert_rows(clean_db, "pending", "40 days", count=3)
    running = insert_rows(clean_db, "processing", "40 days")[0]
    sql(clean_db, "update public.agent_task_requests set worker = 'w' where id = %s", [running])
    recent_failure = insert_rows(clean_db, "failed", "1 hour")[0]

    with psycopg.connect(clean_db) as pruning:  # one open transaction, as the batch is in flight
        held = pruning.execute("select agent_bridge.prune_finished(interval '30 days', 2)"
                               ).fetchone()
        assert held == (2,)
        with psycopg.connect(clean_db, autocommit=True) as other:
            # Structural, not timing: the prune's transaction stays open throughout, so
            # any lock this needed from it would end in lock_not_available, not in luck.
            other.execute("set lock_timeout = '500ms'")
            claimed = other.execute("select id from public.agent_tasks_claim(10, 30)"
                                    ).fetchall()
            assert {str(r[0]) for r in claimed} == set(due)
            done = other.execute(
                "select applied from public.agent_task_complete(%s, 1, 'w', '{}')",
                [running]).fetchone()
            assert done == (True,)
            requeued = other.execute("select id from public.agent_tasks_requeue("
                                     "p_ids => array[%s]::uuid[])", [recent_failure]).fetchall()
            assert [str(r[0]) for r in requeued] == [recent_failure]
            other.execute("insert into public.agent_task_requests (request_payload) "
                          "values ('{\"prompt\": \"new\"}')")
            # A second prune skips the rows the first holds and takes the others.
            assert other.execute("select agent_bridge.prune_finished(interval '30 days', 10)"
                                 ).fetchone() == (2,)
        pruning.commit()
    assert not set(old) & ids(clean_db)
    assert len(ids(clean_db)) == 3 + 1 + 1 + 1  # claimed, completed, requeued, inserted


def test_prune_reads_only_old_finished_rows_through_its_index(clean_db: str) -> None:
    """With 20,000 recent finished rows, a prune and a count read the partial index
    agent_task_requests_finished_idx: no statement they run scans the table."""
    insert_rows(clean_db, "completed", "0 seconds", count=20000)
    old = insert_rows(clean_db, "failed", "40 days", count=5)
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("analyze public.agent_task_requests")
        plans = explain_everything(conn)
        counted = conn.execute("select * from public.agent_tasks_prune(interval '30 days', "
                               "500, true)").fetchall()
        pruned = conn.execute("select * from public.agent_tasks_prune(interval '30 days', "
                              "500)").fetchall()
    assert counted == pruned == [(5, 0)]
    assert not set(old) & ids(clean_db)
    nested = [p for p in plans if "agent_task_requests" in p and "agent_tasks_prune" not in p]
    assert any("agent_task_requests_finished_idx" in p for p in nested), plans
    scans = [p for p in nested if re.search(r"Seq Scan on agent_task_requests\b", p)]
    assert not scans, "\n\n".join(scans)


def test_the_pg_cron_statement(clean_db: str) -> None:
    """pg_cron is not installed here: what its job runs, run as the job runs it (the
    database owner, in a transaction of its own)."""
    old = insert_rows(clean_db, "completed", "40 days", count=3)
    recent = insert_rows(clean_db, "completed", "1 day")
    assert sql(clean_db, CRON_COMMAND) == [(3, 0)]
    assert ids(clean_db) == set(recent) and old


# Per-user day counters ------------------------------------------------------------------
def test_day_counters_of_days_before_yesterday_go(fresh_db: str) -> None:
    """agent_bridge.user_day_usage (20261203000200_admission_budgets.sql) loses the days
    before yesterday (UTC), in batches; without the table a prune still works."""
    migrate(fresh_db)
    store = TaskStore(PostgresTransport(fresh_db))
    try:
        if not sql(fresh_db, "select to_regclass('agent_bridge.user_day_usage') is not null"
                   )[0][0]:  # a stand-in, should that migration not be there
            sql(fresh_db, "create table agent_bridge.user_day_usage (user_id uuid, day date, "
                          "rows integer not null default 0, primary key (user_id, day))")
        sql(fresh_db, """
            insert into agent_bridge.user_day_usage (user_id, day)
            select gen_random_uuid(), (now() at time zone 'utc')::date - d
              from generate_series(0, 4) d, generate_series(1, 3)""")
        assert store.prune(DAYS_30, dry_run=True) == Pruned(0, 9)
        assert [store.prune(DAYS_30, 4).day_usage for _ in range(4)] == [4, 4, 1, 0]
        days = sql(fresh_db, "select distinct (now() at time zone 'utc')::date - day "
                             "from agent_bridge.user_day_usage order by 1")
        assert days == [(0,), (1,)]  # today and yesterday stay

        sql(fresh_db, "drop table agent_bridge.user_day_usage cascade")
        insert_rows(fresh_db, "completed", "40 days")
        assert store.prune(DAYS_30, dry_run=True) == Pruned(1, 0)
        assert store.prune(DAYS_30) == Pruned(1, 0)
    finally:
        store.close()










# The bridge's timer -------------------------------------------------------------------
def test_retention_timer_prunes_on_every_pass(store: TaskStore, clean_db: str) -> None:
    """The bridge's Retention, in process with a tiny interval: a pass at start, and
    again at every interval, each in batches until one comes back short."""
    insert_rows(clean_db, "completed", "40 days", count=5)
    kept = insert_rows(clean_db, "completed", "1 day")
    retention = Retention(store, DAYS_30, interval=0.05, batch=2, pause=0)
    stop = threading.Event()
    thread = retention.start(stop)
    try:
        wait_until("the first pass", lambda: ids(clean_db) == set(kept))
        insert_rows(clean_db, "failed", "50 days", count=3)
        wait_until("a later pass", lambda: ids(clean_db) == set(kept))
    finally:
        stop.set()
        retention.join(10)
    assert not thread.is_alive()  # `stop` ends it


