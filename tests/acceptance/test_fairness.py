"""Fair turns with real processes: a tenant that floods the table does not hold back
another tenant's few tasks, and TENANT_CONCURRENCY caps one tenant's running rows.
Asserted by the order of events in the database and the handler's own records, never by
wall-clock durations."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.stack import Stack

MAX_QUEUED = 4  # jobs waiting in Redis; B's first job waits behind at most these
CONCURRENCY = 2


def flood(db_url: str, tenant: str, n: int, sleep: float) -> None:
    """n rows of one tenant in one statement, as a service might insert them."""
    payload = Jsonb({"prompt": f"from {tenant}", "context": {"sleep": sleep}})
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into public.agent_task_requests "
                     "(status, request_payload, enterprise_id) "
                     "select 'pending', %s, %s from generate_series(1, %s)",
                     [payload, tenant, n])


def started_count(db_url: str, tenant: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select count(*) from public.agent_task_requests "
                           "where tenant = %s and started_at is not null", [tenant]).fetchone()
    assert row is not None
    return int(row[0])


def reset_turns(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("delete from public.agent_task_tenants")


def test_a_flood_does_not_hold_back_another_tenant(stack: Stack) -> None:
    """A inserts 150 tasks; once A's are running, B inserts 3. B's rows are claimed in
    the next round and start after at most the few jobs of A already in Redis and in
    the workers, not after A's backlog (first-in-first-out would run all 150 first)."""
    db = stack.db_url
    reset_turns(db)
    stack.worker(concurrency=CONCURRENCY)
    stack.bridge(BRIDGE_MAX_QUEUED=str(MAX_QUEUED), BRIDGE_BATCH_SIZE=str(MAX_QUEUED))
    flood(db, "A", 150, sleep=0.05)
    stack.wait_for("A's tasks to be running", lambda: started_count(db, "A") >= 10)
    before = started_count(db, "A")
    flood(db, "B", 3, sleep=0)
    rows = stack.wait_all_done(timeout=120)
    assert all(r["status"] == "completed" for r in rows)

    a_starts = sorted(r["started_at"] for r in rows if r["tenant"] == "A")
    b_starts = sorted(r["started_at"] for r in rows if r["tenant"] == "B")
    assert len(a_starts) == 150 and len(b_starts) == 3
    ahead_of_b = sum(1 for t in a_starts if t < b_starts[-1])
    # B waits for what was already handed out: A's jobs queued in Redis (MAX_QUEUED),
    # running in the workers (CONCURRENCY), and one claim in flight; B's three rows take
    # turns with A's, so A gets at most one more turn between each.
    slack = MAX_QUEUED + CONCURRENCY + MAX_QUEUED + 3
    assert ahead_of_b <= before + slack, (before, ahead_of_b)
    assert ahead_of_b < 75, "B must not wait for most of A's backlog"


def running_at_once(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (an end and a start at the same instant do not
    overlap)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_tenant_concurrency_caps_running_rows(stack: Stack) -> None:
    """With TENANT_CONCURRENCY=2 and eight worker threads, no instant has more than two
    of one tenant's handlers running, although both tenants have work for all eight."""
    db = stack.db_url
    reset_turns(db)
    stack.worker(pool="threads", concurrency=8)
    stack.bridge(TENANT_CONCURRENCY="2")
    flood(db, "A", 12, sleep=0.2)
    flood(db, "B", 12, sleep=0.2)
    rows = stack.wait_all_done(timeout=120)
    assert all(r["status"] == "completed" for r in rows)

    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        path = stack.state_dir / f"{r['id']}.spans.runs"  # (tests/handlers.py)
        for line in path.read_text().splitlines():
            start, end = (float(x) for x in line.split())
            spans[r["tenant"]].append((start, end))
    peaks: dict[str, Any] = {tenant: running_at_once(s) for tenant, s in spans.items()}
    assert peaks == {"A": 2, "B": 2}, peaks
