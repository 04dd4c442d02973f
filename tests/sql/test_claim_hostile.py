"""The fair claim against hostile users at scale (issue 20, items 1 and 5), on the real
database (20261203000100_claim_sleeping_tenants.sql).

Item 1: tenants whose pending rows are all in the future sleep until their earliest run_at;
a claim reads and writes none of them, however many there are, and still claims their rows
once due (by time passing, by an earlier run_at, after a release or a rescue), with no
wake-up lost to an insert in flight. Item 5: a tenant that arrives (or comes back) joins the
line at the current round, so a stream of new accounts cannot starve an established tenant,
and an established tenant cannot starve them. Asserted by counts, never by durations."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest

from tests.db import sql

PAYLOAD = '{"prompt": "x"}'




@pytest.fixture
def db(clean_db: str) -> Iterator[str]:
    """An empty table, turns starting afresh, the shipped limits."""
    sql(clean_db, "delete from public.agent_task_tenants")
    yield clean_db
    sql(clean_db, "delete from public.agent_tenant_limits where tenant <> '*'")


def add(db_url: str, tenant: str, n: int = 1, run_at: str = "now()") -> list[str]:
    """n rows of `tenant` (the service's insert), run_at an SQL expression."""
    return [str(r[0]) for r in sql(
        db_url, "insert into public.agent_task_requests (request_payload, enterprise_id, run_at) "
                f"select %s, %s, {run_at} from generate_series(1, %s) returning id",
        [PAYLOAD, tenant, n])]


def add_sleepers(db_url: str, prefix: str, n: int) -> None:
    """n tenants with one row each, 1 hour to a week ahead, in one statement."""
    sql(db_url, "insert into public.agent_task_requests (request_payload, enterprise_id, run_at) "
                "select %s, %s || g, now() + interval '1 hour' + g * interval '1 minute' "
                "from generate_series(1, %s) g", [PAYLOAD, prefix, n])


def claim(db_url: str, limit: int) -> list[str]:
    """The tenants of the rows one claim takes, in order (as the bridge calls it)."""
    return [r[0] for r in sql(
        db_url, "select t.tenant from public.agent_tasks_claim(%s, 30, 0, array['default']) c "
                "join public.agent_task_requests t on t.id = c.id", [limit])]


def state(db_url: str, tenant: str) -> tuple[bool, datetime | None]:
    [(active, wake_at)] = sql(db_url, "select active, wake_at from public.agent_task_tenants "
                                      "where tenant = %s", [tenant])
    return bool(active), wake_at


# Item 1: the cost of tenants with nothing due ---------------------------------------------

TENANT_TABLE_USE = """
    select pg_stat_get_xact_tuples_returned(c.oid) + (
               select coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)
                 from pg_index i where i.indrelid = c.oid),
           pg_stat_get_xact_tuples_inserted(c.oid) + pg_stat_get_xact_tuples_updated(c.oid)
           + pg_stat_get_xact_tuples_deleted(c.oid)
      from pg_class c where c.oid = 'public.agent_task_tenants'::regclass"""


def claim_costs(db_url: str, limit: int, claims: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Per claim, each its own transaction: (agent_task_tenants tuples read, written; from
    the transaction's own statistics) and WAL bytes."""
    use: list[tuple[int, int]] = []
    wal: list[int] = []
    with psycopg.connect(db_url) as conn:
        for _ in range(claims):
            lsn = conn.execute("select pg_current_wal_insert_lsn()").fetchone()
            before = conn.execute(TENANT_TABLE_USE).fetchone()
            conn.execute("select * from public.agent_tasks_claim(%s, 30, 0, array['default'])",
                         [limit]).fetchall()
            after = conn.execute(TENANT_TABLE_USE).fetchone()
            diff = conn.execute("select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)",
                                [lsn[0] if lsn else None]).fetchone()
            conn.commit()
            assert before is not None and after is not None and diff is not None
            use.append((int(after[0]) - int(before[0]), int(after[1]) - int(before[1])))
            wal.append(int(diff[0]))
    return use, wal


def arrange(db_url: str, fell_asleep: int, sleepers: int) -> None:
    """From an empty table: `fell_asleep` tenants that had a due row, were served, and now
    hold only a future row; `sleepers` that arrived with only a future row; then A, B and
    C with 20 due rows each, served once (every tenant in its place)."""
    sql(db_url, "truncate public.agent_task_requests")
    sql(db_url, "delete from public.agent_task_tenants")
    sql(db_url, "insert into public.agent_task_requests (request_payload, enterprise_id, run_at) "
                "select %s, 'served-' || g, r from generate_series(1, %s) g, "
                "unnest(array[now(), now() + interval '2 hours']) r", [PAYLOAD, fell_asleep])
    while claim(db_url, 500):
        pass
    add_sleepers(db_url, "arrived-", sleepers)
    for tenant in ("A", "B", "C"):
        add(db_url, tenant, 20)
    assert sorted(claim(db_url, 6)) == ["A", "A", "B", "B", "C", "C"]


def costs_with(db_url: str, fell_asleep: int, sleepers: int
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
    """Claims of 3 with A, B and C due, then idle polls once nothing is due."""
    arrange(db_url, fell_asleep, sleepers)
    busy, _ = claim_costs(db_url, 3, 4)
    while claim(db_url, 500):
        pass
    idle, wal = claim_costs(db_url, 50, 4)
    return busy, idle, wal


def test_claims_do_not_touch_tenants_with_only_future_rows(db: str) -> None:
    """Three tenants have due rows. A claim reads and writes as many agent_task_tenants rows
    with 20 tenants holding only future rows as with 800 (400 that arrived so, 400 whose
    due rows were claimed), and so does an idle poll (nothing due), which writes none.
    (Before: every claim read and re-stamped every such tenant: with 800 of them, 800
    writes and about 300 KB of WAL per idle poll.) The few reads that remain are the
    active tenants' index entries, dead ones included until a scan prunes them."""
    few, few_idle, _ = costs_with(db, 0, 20)
    many, many_idle, wal = costs_with(db, 400, 400)
    assert [w for _, w in many] == [w for _, w in few] == [3, 3, 3, 3]  # the served ones
    assert [w for _, w in many_idle] == [w for _, w in few_idle] == [0, 0, 0, 0]
    slack = 3  # (dead index entries of A, B and C not yet pruned)
    assert max(r for r, _ in many) <= max(r for r, _ in few) + slack, (few, many)
    assert max(r for r, _ in many_idle) <= max(r for r, _ in few_idle) + slack, \
        (few_idle, many_idle)
    assert min(wal) < 1024, wal  # (the claim's nextval logs once every 32 calls)
    asleep = sql(db, "select count(*) from public.agent_task_tenants "
                     "where not active and wake_at > now()")
    assert asleep == [(800,)]


def test_a_future_row_is_claimed_once_due(db: str) -> None:
    """The tenant sleeps until its row's run_at, and the first claim after that takes it."""
    [task] = add(db, "F", 1, "now() + interval '1 second'")
    [(run_at,)] = sql(db, "select run_at from public.agent_task_requests where id = %s", [task])
    assert claim(db, 5) == []
    assert state(db, "F") == (False, run_at)
    time.sleep(max(0.0, (run_at - datetime.now(run_at.tzinfo)).total_seconds()) + 0.05)
    assert claim(db, 5) == ["F"]


def test_an_earlier_run_at_wakes_the_tenant(db: str) -> None:
    """The owner moves a scheduled row to now: the tenant wakes without waiting for the
    time it slept until; a later row of an awake tenant sends it back to sleep."""
    [soon, _] = add(db, "F", 2, "now() + interval '1 hour'")
    assert claim(db, 5) == []
    sql(db, "update public.agent_task_requests set run_at = now() where id = %s", [soon])
    assert state(db, "F") == (True, None)
    assert claim(db, 5) == ["F"]
    assert claim(db, 5) == []
    active, wake_at = state(db, "F")
    assert not active and wake_at is not None and wake_at > datetime.now(wake_at.tzinfo)


@pytest.mark.parametrize("how", ["release", "rescue"])
def test_a_row_back_to_pending_with_a_future_run_at(db: str, how: str) -> None:
    """A claimed row that goes back to pending (release, rescue) with a run_at in the future
    (the operator postponed it while it was out): not claimed before its time, claimed once
    due, and the tenant sleeps in between."""
    [task] = add(db, "R", 1)
    assert claim(db, 5) == ["R"]
    assert claim(db, 5) == []  # R has nothing pending: idle
    sql(db, "update public.agent_task_requests set run_at = now() + interval '1 second' "
            "where id = %s", [task])
    if how == "release":
        sql(db, "select * from public.agent_task_release(%s, 1)", [task])
    else:
        sql(db, "update public.agent_task_requests set lease_expires_at = now() - interval '1 s'"
                " where id = %s", [task])
        assert [r[0] for r in sql(db, "select id::text from public.agent_tasks_rescue()")] == [task]
    [(status, run_at)] = sql(db, "select status, run_at from public.agent_task_requests "
                                 "where id = %s", [task])
    assert status == "pending"
    assert claim(db, 5) == []
    assert state(db, "R") == (False, run_at)
    time.sleep(max(0.0, (run_at - datetime.now(run_at.tzinfo)).total_seconds()) + 0.05)
    assert claim(db, 5) == ["R"]


def wait_until_blocked(db_url: str, pid: int) -> None:
    """Until backend `pid` waits for a lock (no timing is asserted)."""
    for _ in range(2000):
        rows = sql(db_url, "select wait_event_type from pg_stat_activity where pid = %s", [pid])
        if rows == [("Lock",)]:
            return
        time.sleep(0.005)
    raise AssertionError("the insert never waited for the claim's lock")


@pytest.mark.parametrize("new_row", ["due", "future"])
def test_an_insert_waiting_for_a_claim_putting_its_tenant_to_sleep(db: str, new_row: str) -> None:
    """The no-lost-wake-up protocol: a claim puts X (only future rows) to sleep and holds
    X's row until it commits; an insert for X at that moment waits for it, then finds X
    asleep and wakes it (a due row) or lowers its wake_at (an earlier future row)."""
    add(db, "X", 1)
    assert claim(db, 5) == ["X"]
    add(db, "X", 1, "now() + interval '2 hours'")  # X active, nothing due
    assert state(db, "X") == (True, None)
    run_at = "now()" if new_row == "due" else "now() + interval '1 hour'"
    with psycopg.connect(db) as claiming:
        assert claiming.execute(
            "select * from public.agent_tasks_claim(5, 30, 0, array['default'])").fetchall() == []
        inserted: list[str] = []
        pid: list[int] = []

        def insert() -> None:
            with psycopg.connect(db, autocommit=True) as conn:
                row = conn.execute("select pg_backend_pid()").fetchone()
                assert row is not None
                pid.append(int(row[0]))
                inserted.extend(add_on(conn, run_at))

        writer = threading.Thread(target=insert)
        writer.start()
        while not pid:
            time.sleep(0.005)
        wait_until_blocked(db, pid[0])
        claiming.commit()  # X asleep until the 2-hour row, as the claim saw it
    writer.join()
    [(first,)] = sql(db, "select min(run_at) from public.agent_task_requests "
                         "where tenant = 'X' and status = 'pending'")
    if new_row == "due":
        assert state(db, "X") == (True, None)
        assert claim(db, 5) == ["X"]
    else:
        assert state(db, "X") == (False, first)  # the 1-hour row's time, not the 2-hour one


def add_on(conn: psycopg.Connection[Any], run_at: str) -> list[str]:
    return [str(r[0]) for r in conn.execute(
        "insert into public.agent_task_requests (request_payload, enterprise_id, run_at) "
        f"values (%s, 'X', {run_at}) returning id", [PAYLOAD]).fetchall()]


def test_an_uncommitted_due_row_of_a_sleeping_tenant(db: str) -> None:
    """An insert in flight for a sleeping tenant holds it; the claim neither sees nor loses
    the row, and takes it once committed."""
    add(db, "S", 1, "now() + interval '1 hour'")
    assert claim(db, 5) == []
    with psycopg.connect(db) as inserting:
        add_on_tenant(inserting, "S")
        assert claim(db, 5) == []
        inserting.commit()
    assert claim(db, 5) == ["S"]


def add_on_tenant(conn: psycopg.Connection[Any], tenant: str) -> None:
    conn.execute("insert into public.agent_task_requests (request_payload, enterprise_id) "
                 "values (%s, %s)", [PAYLOAD, tenant])


# Item 5: who goes first --------------------------------------------------------------------

def test_new_accounts_do_not_starve_an_established_tenant(db: str) -> None:
    """The issue's case: E has 95 due rows; before each of 10 claims of 10, ten new accounts
    arrive with a row each. E gets its fair share (11 tenants want a row each claim: about
    one in eleven of the 100 rows; before, E got none), and no new account waits more than
    one claim past the one after its arrival."""
    add(db, "E", 95)
    served: Counter[str] = Counter()
    for k in range(10):
        for i in range(10):
            add(db, f"new-{k}-{i}", 1)
        served.update(claim(db, 10))
    assert sum(served.values()) == 100
    assert served["E"] >= 100 // 11, served["E"]
    waiting = {f"new-{k}-{i}" for k in range(10) for i in range(10)} - set(served)
    assert all(name.startswith("new-9-") for name in waiting), sorted(waiting)


def test_a_tenant_back_from_idle_does_not_jump_the_queue(db: str) -> None:
    """X was served long ago and went idle; A, B and C are waiting their turns. X's new row
    goes behind them (before, X kept its old turn and went first), and is served in the
    very next round, before any of them is served twice."""
    add(db, "X", 1)
    assert claim(db, 5) == ["X"]
    assert claim(db, 5) == []  # X idle
    for tenant in ("A", "B", "C"):
        add(db, tenant, 5)
    assert claim(db, 2) == ["A", "B"]
    add(db, "X", 1)
    assert claim(db, 2) == ["C", "A"]
    assert claim(db, 2) == ["B", "X"]


def test_a_woken_tenant_joins_at_the_current_round(db: str) -> None:
    """A tenant whose scheduled row comes due joins the line like a new one: behind the
    tenants waiting, ahead of those served after it woke."""
    [later] = add(db, "W", 1, "now() + interval '1 hour'")
    for tenant in ("A", "B", "C"):
        add(db, tenant, 5)
    assert claim(db, 2) == ["A", "B"]
    sql(db, "update public.agent_task_requests set run_at = now() where id = %s", [later])
    assert claim(db, 2) == ["C", "A"]
    assert claim(db, 2) == ["B", "W"]


def test_bulk_arrival_gets_distinct_turns(db: str) -> None:
    """Tenants arriving in one statement each get a turn of their own, in order: no tie
    the claim would have to read whole, and none ahead of the tenants already waiting."""
    add(db, "A", 5)
    assert claim(db, 1) == ["A"]
    add(db, "B", 5)
    sql(db, "insert into public.agent_task_requests (request_payload, enterprise_id) "
            "select %s, 'bulk-' || g from generate_series(1, 50) g", [PAYLOAD])
    rows = sql(db, "select count(distinct served), count(*) from public.agent_task_tenants "
                   "where tenant like 'bulk-%'")
    assert rows == [(50, 50)]
    got = claim(db, 3)
    assert got[:2] == ["A", "B"] and got[2].startswith("bulk-")


def test_stamps_are_rounds_apart(db: str) -> None:
    """Joiners take stamps between two rounds: after the last round issued, before the next."""
    add(db, "A", 2)
    claim(db, 1)
    [(a_served,)] = sql(db, "select served from public.agent_task_tenants where tenant = 'A'")
    add(db, "B", 1)
    [(b_served,)] = sql(db, "select served from public.agent_task_tenants where tenant = 'B'")
    claim(db, 5)
    [(next_round,)] = sql(db, "select served from public.agent_task_tenants where tenant = 'A'")
    assert a_served < b_served < next_round


def test_sleeping_tenant_state_is_consistent(db: str) -> None:
    """wake_at only on inactive tenants (a constraint): an active tenant never also sleeps."""
    add(db, "A", 1)
    with pytest.raises(psycopg.errors.CheckViolation):
        sql(db, "update public.agent_task_tenants set wake_at = now() + interval '1 hour' "
                "where tenant = 'A'")


def test_no_wake_up_lost_under_concurrent_writers_and_claims(db: str) -> None:
    """Four writers (due rows, future rows, a future and a due row in one transaction,
    releases with an earlier or a later run_at) and two claimers on six tenants for two
    seconds. Afterwards every tenant with a pending row is active or asleep no later than
    that row's run_at, and claims take every due row. (Random interleavings: a lost
    wake-up shows as a broken invariant or a due row left behind, never as a flaky pass.)"""
    tenants = [f"s{i}" for i in range(6)]
    stop = time.monotonic() + 2
    errors: list[str] = []

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        with psycopg.connect(db, autocommit=True) as conn:
            while time.monotonic() < stop:
                tenant, kind = rnd.choice(tenants), rnd.random()
                try:
                    if kind < 0.4:
                        add_on_tenant(conn, tenant)
                    elif kind < 0.7:
                        conn.execute(
                            "insert into public.agent_task_requests (request_payload, "
                            "enterprise_id, run_at) values (%s, %s, now() + "
                            "make_interval(secs => %s))",
                            [PAYLOAD, tenant, rnd.choice([0.2, 3600])])
                    elif kind < 0.85:
                        with conn.transaction():
                            conn.execute(
                                "insert into public.agent_task_requests (request_payload, "
                                "enterprise_id, run_at) values (%s, %s, now() + interval '2 h')",
                                [PAYLOAD, tenant])
                            add_on_tenant(conn, tenant)
                    else:
                        conn.execute(
                            "update public.agent_task_requests set run_at = now() + "
                            "make_interval(secs => %s) where id in (select id from "
                            "public.agent_task_requests where status = 'processing' "
                            "and tenant = %s limit 1)", [rnd.choice([0, 0.2]), tenant])
                        conn.execute(
                            "select public.agent_task_release(id, attempts) "
                            "from public.agent_task_requests where status = 'processing' "
                            "and tenant = %s and started_at is null limit 1", [tenant])
                except psycopg.Error as exc:
                    errors.append(repr(exc))

    def claimer() -> None:
        with psycopg.connect(db, autocommit=True) as conn:
            while time.monotonic() < stop:
                try:
                    conn.execute("select * from public.agent_tasks_claim(3, 30, 0, "
                                 "array['default'])").fetchall()
                except psycopg.Error as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=claimer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stranded = sql(db, """
        select r.tenant from public.agent_task_requests r
          join public.agent_task_tenants s on s.tenant = r.tenant
         where r.status = 'pending' and not s.active
           and (s.wake_at is null or s.wake_at > r.run_at)""")
    assert stranded == []
    assert sql(db, "select count(*) from public.agent_task_requests r where r.status = "
                   "'pending' and not exists (select 1 from public.agent_task_tenants s "
                   "where s.tenant = r.tenant)") == [(0,)]
    time.sleep(0.3)  # the 0.2-second rows are due
    while claim(db, 100):
        pass
    assert sql(db, "select count(*) from public.agent_task_requests "
                   "where status = 'pending' and run_at <= now()") == [(0,)]


def test_the_claim_runs_without_jit(clean_db: str) -> None:
    """Before PostgreSQL 18 the claim's disabled scans cost 1e10, above jit_above_cost: a
    server with JIT compiled each of its statements once per row claimed (the embedded
    server has no JIT, so the setting itself is what is checked)."""
    [[config]] = sql(clean_db, "select proconfig from pg_proc "
                               "where oid = 'agent_bridge.claim_rows'::regproc")
    assert "jit=off" in config and "enable_seqscan=off" in config
