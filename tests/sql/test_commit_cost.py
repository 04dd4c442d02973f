"""Which writes wait for the disk (20261130001100_commit_cost.sql): the claim, the start and
the lease renewal commit without waiting (a crash loses them as a crash of the bridge or
worker would: fenced, leased, run again); outcomes always wait, so a completed task is
never lost or run again."""

from __future__ import annotations

import psycopg
import pytest

from tests.db import insert_task


def commit_mode(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """synchronous_commit as the open transaction will commit with."""
    row = conn.execute("show synchronous_commit").fetchone()
    assert row is not None
    return str(row[0])


def test_claim_start_and_heartbeat_relax_the_commit_outcomes_do_not(clean_db: str) -> None:
    insert_task(clean_db, {"prompt": "p"})
    with psycopg.connect(clean_db) as conn:  # one transaction per call, committed below
        assert commit_mode(conn) == "on"
        claimed = conn.execute(
            "select id, attempt from public.agent_tasks_claim(5, 30, 0, array['default'])"
        ).fetchall()
        assert len(claimed) == 1 and commit_mode(conn) == "off"
        conn.commit()
        assert commit_mode(conn) == "on"  # only that transaction
        task_id, attempt = claimed[0]
        started = conn.execute("select applied from public.agent_task_start(%s, %s, 'w', 30)",
                               (task_id, attempt)).fetchone()
        assert started == (True,) and commit_mode(conn) == "off"
        conn.commit()
        renewed = conn.execute("select applied from public.agent_task_heartbeat(%s, %s, 'w', 30)",
                               (task_id, attempt)).fetchone()
        assert renewed == (True,) and commit_mode(conn) == "off"
        conn.commit()
        done = conn.execute("select applied from public.agent_task_complete(%s, %s, 'w', %s)",
                            (task_id, attempt, '{"answer": "ok"}')).fetchone()
        assert done == (True,) and commit_mode(conn) == "on"
        conn.commit()


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_users_cannot_call_the_private_claim(clean_db: str, role: str) -> None:
    with psycopg.connect(clean_db) as conn:
        conn.execute(f"set role {role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select * from agent_bridge.claim_rows(1, 30, 0, null)")


def hot_updates(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    conn.execute("select pg_stat_force_next_flush()")
    conn.commit()
    conn.execute("select pg_stat_clear_snapshot()")
    row = conn.execute("select n_tup_hot_upd from pg_stat_user_tables "
                       "where relid = 'public.agent_task_requests'::regclass").fetchone()
    conn.commit()
    assert row is not None
    return int(str(row[0]))


def test_start_and_renewals_write_no_index(clean_db: str) -> None:
    """The start and lease renewals change no indexed column: HOT updates (no index
    written), while the rescue still finds expired leases."""
    for _ in range(3):
        insert_task(clean_db, {"prompt": "p"})
    with psycopg.connect(clean_db) as conn:
        claimed = conn.execute(
            "select id, attempt from public.agent_tasks_claim(3, 30, 0, null)").fetchall()
        conn.commit()
        before = hot_updates(conn)
        for task_id, attempt in claimed:
            conn.execute("select * from public.agent_task_start(%s, %s, 'w', 30)",
                         (task_id, attempt))
            conn.execute("select * from public.agent_task_heartbeat(%s, %s, 'w', 0.001)",
                         (task_id, attempt))
            conn.commit()
        assert hot_updates(conn) - before == 2 * len(claimed)
        conn.execute("select pg_sleep(0.01)")
        # A transaction of its own: now() is the transaction's start, and in the sleep's
        # transaction it would be as early as the last renewal's commit, before its 1 ms.
        conn.commit()
        rescued = conn.execute("select id, status from public.agent_tasks_rescue(10)").fetchall()
        conn.commit()
    assert sorted(str(i) for i, _ in rescued) == sorted(str(i) for i, _ in claimed)
