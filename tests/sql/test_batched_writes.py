"""One commit where there were four (issue 23, 20261204000100_claim_payload_and_batched_writes.sql):
the claim returns what the worker needs (the row's columns, its payload under a cap), and
public.agent_tasks_write applies a batch of the worker's writes in one call, each exactly
as its single-row function would, fenced per row. On the real database as service_role,
and through the PostgREST stand-in as the Supabase transport calls it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.db import as_role, chunks, insert_task, owner_connection, sql
from tests.fakes.jwt import role_key
from tests.fakes.postgrest import SERVICE_KEY

LEASE = 60.0
KINDS = ["bind", "start", "heartbeat", "append", "progress", "complete", "fail", "retry",
         "cancelled"]
OUTCOMES = {"complete", "fail", "retry", "cancelled"}
COLUMNS = ["ord", "applied", "status", "attempts", "worker", "request_payload",
           "max_attempts", "priority", "user_id", "enterprise_id", "created_at", "agent",
           "budget"]
CALL = ("select * from public.agent_tasks_write(%s::text[], %s::uuid[], %s::integer[], "
        "%s::text[], %s::jsonb[], %s::double precision[], %s::double precision[], "
        "%s::integer[], %s::integer[], %s::text[])")


@dataclass
class W:
    """One write of a batch."""

    kind: str
    id: str | None
    attempt: int | None
    worker: str | None = "w1"
    doc: Any = None
    seconds: float | None = None
    delay: float | None = None
    seq: int | None = None
    offset: int | None = None
    text: str | None = None


def fl(value: float | None) -> float | None:
    return None if value is None else float(value)


def arrays(writes: list[W]) -> list[list[Any] | None]:
    return [[w.kind for w in writes], [w.id for w in writes], [w.attempt for w in writes],
            [w.worker for w in writes],
            [None if w.doc is None else Jsonb(w.doc) for w in writes],
            [fl(w.seconds) for w in writes], [fl(w.delay) for w in writes],
            [w.seq for w in writes],
            [w.offset for w in writes], [w.text for w in writes]]


def batch(conn: psycopg.Connection[Any], writes: list[W]) -> list[dict[str, Any]]:
    """agent_tasks_write on an open connection; its rows as dicts."""
    cur = conn.execute(CALL, arrays(writes))
    return [dict(zip(COLUMNS, row, strict=True)) for row in cur.fetchall()]


def write(db: str, writes: list[W]) -> list[dict[str, Any]]:
    """One batch as service_role, in a transaction of its own."""
    with as_role(db, "service_role") as conn:
        return batch(conn, writes)


@contextmanager
def service(db: str) -> Iterator[psycopg.Connection[Any]]:
    with as_role(db, "service_role") as conn:
        yield conn


def claim_all(db: str, n: int, inline: int = 0) -> list[dict[str, Any]]:
    with as_role(db, "service_role") as conn:
        conn.row_factory = dict_row
        return list(conn.execute("select * from public.agent_tasks_claim(%s, %s, 0, null, %s)",
                                 [n, LEASE, inline]).fetchall())


def started(db: str, n: int, worker: str = "w1", payload: Any = None) -> list[tuple[str, int]]:
    """n rows claimed and started by `worker`: (id, attempt) each."""
    ids = [insert_task(db, payload) for _ in range(n)]
    claimed = {str(c["id"]): c["attempt"] for c in claim_all(db, n)}
    out = []
    for task_id in ids:
        attempt = claimed[task_id]
        [(ok,)] = sql(db, "select applied from public.agent_task_start(%s, %s, %s, %s)",
                      [task_id, attempt, worker, LEASE])
        assert ok
        out.append((task_id, attempt))
    return out


def row(db: str, task_id: str) -> dict[str, Any]:
    """The columns a write decides, comparable between two rows: times as facts (set or
    not) or as the lease's length from the last update; the error without its time."""
    with owner_connection(db) as conn, conn.cursor(row_factory=dict_row) as cur:
        got = cur.execute(
            "select status, response_payload, error - 'at' as error, attempts, max_attempts, "
            "       worker, started_at is not null as started, finished_at is not null as "
            "       finished, round(extract(epoch from lease_expires_at - updated_at)) as lease,"
            "       cancel_requested_at is not null as cancel_requested "
            "  from public.agent_task_requests where id = %s", [task_id]).fetchone()
    assert got is not None
    return dict(got)


def commit_mode(conn: psycopg.Connection[Any]) -> str:
    got = conn.execute("select current_setting('synchronous_commit')").fetchone()
    assert got is not None
    return str(got[0])


# --------------------------------------------------------------------------- the claim


def test_claim_returns_the_row_and_the_payload_under_the_cap(clean_db: str) -> None:
    # (over 126 bytes: a shorter value may be stored with a 1-byte header, and then
    # measures up to 3 bytes less in the claim's RETURNING than in a SELECT)
    short = {"prompt": "s" * 200}
    small = insert_task(clean_db, short, priority=0)
    big = insert_task(clean_db, {"prompt": "x" * 5000})
    [(small_bytes,)] = sql(clean_db, "select agent_bridge.payload_bytes(request_payload) "
                                     "from public.agent_task_requests where id = %s", [small])
    got = {str(c["id"]): c for c in claim_all(clean_db, 10, inline=int(small_bytes))}
    assert got[small]["request_payload"] == short  # at the cap: inline
    assert got[big]["request_payload"] is None  # over it: read at start
    for task_id, c in got.items():
        with psycopg.connect(clean_db, row_factory=dict_row) as conn:
            r = conn.execute("select * from public.agent_task_requests where id = %s",
                             [task_id]).fetchone()
        assert r is not None
        assert (c["attempt"], c["agent"], c["max_attempts"], c["priority"], c["user_id"],
                c["enterprise_id"], c["created_at"]) == (
            r["attempts"], r["agent"], r["max_attempts"], r["priority"], r["user_id"],
            r["enterprise_id"], r["created_at"])
    one_less = insert_task(clean_db, short)
    [c] = claim_all(clean_db, 10, inline=int(small_bytes) - 1)
    assert str(c["id"]) == one_less and c["request_payload"] is None


def test_claim_without_the_cap_inlines_nothing(clean_db: str) -> None:
    """An older caller (four arguments, by position or by name) claims as before."""
    insert_task(clean_db, {"prompt": "p"})
    insert_task(clean_db, {"prompt": "q"})
    with service(clean_db) as conn:
        by_position = conn.execute(
            "select id, attempt, agent, request_payload from public.agent_tasks_claim(1, 30)"
        ).fetchall()
        by_name = conn.execute(
            "select request_payload from public.agent_tasks_claim(p_limit => 1, "
            "p_lease_seconds => 30, p_tenant_concurrency => 0, p_agents => null)").fetchall()
    assert len(by_position) == 1 and by_position[0][3] is None
    assert by_name == [(None,)]


def test_claim_over_postgrest_returns_the_payload(clean_db: str, postgrest: str) -> None:
    task_id = insert_task(clean_db, {"prompt": "over the API"})
    reply = httpx.post(f"{postgrest}/rest/v1/rpc/agent_tasks_claim",
                       json={"p_limit": 5, "p_lease_seconds": 30, "p_inline_bytes": 65536},
                       headers={"apikey": SERVICE_KEY,
                                "Authorization": f"Bearer {SERVICE_KEY}"}, timeout=10)
    assert reply.status_code == 200, reply.text
    [c] = reply.json()
    assert c["id"] == task_id and c["request_payload"] == {"prompt": "over the API"}
    assert c["max_attempts"] == 3 and c["agent"] == "default"


# --------------------------------------------------------------------------- the batch


def test_mixed_batch_applies_each_write_fenced_per_row(clean_db: str) -> None:
    [b, c, d, e] = started(clean_db, 4)
    a_id = insert_task(clean_db)
    [a] = [(str(x["id"]), x["attempt"]) for x in claim_all(clean_db, 1)]
    assert a[0] == a_id
    leases_before = sql(clean_db, "select lease_expires_at from public.agent_task_requests "
                                  "where id = %s", [b[0]])
    got = write(clean_db, [
        W("bind", *a, seconds=LEASE),
        W("heartbeat", *b, seconds=600),
        W("append", *c, seq=0, offset=0, text="Once"),
        W("append", *c, seq=1, offset=4, text=" upon"),
        W("complete", *d, doc={"answer": "done"}),
        W("fail", *e, doc={"type": "Boom", "message": "it broke", "retryable": False}),
    ])
    assert [g["ord"] for g in got] == [1, 2, 3, 4, 5, 6]
    assert all(g["applied"] for g in got)
    assert [(g["status"], g["attempts"], g["worker"]) for g in got] == [
        ("processing", a[1], "w1"), ("processing", b[1], "w1"), ("processing", c[1], "w1"),
        ("processing", c[1], "w1"), ("completed", d[1], "w1"), ("failed", e[1], "w1")]
    # a bind returns the row's columns, not its payload
    assert got[0]["request_payload"] is None and got[0]["agent"] == "default"
    assert got[0]["max_attempts"] == 3
    assert all(g["agent"] is None for g in got[1:])

    assert row(clean_db, a[0])["worker"] == "w1" and row(clean_db, a[0])["started"]
    assert row(clean_db, b[0])["lease"] == 600
    assert sql(clean_db, "select lease_expires_at from public.agent_task_requests "
                         "where id = %s", [b[0]]) > leases_before
    assert chunks(clean_db, c[0]) == [(c[1], 0, 0, "Once"), (c[1], 1, 4, " upon")]
    assert row(clean_db, d[0])["status"] == "completed"
    assert row(clean_db, d[0])["response_payload"] == {"answer": "done"}
    failed = row(clean_db, e[0])
    assert failed["status"] == "failed" and failed["response_payload"] == {"error": "it broke"}
    assert failed["error"] == {"type": "Boom", "message": "it broke", "retryable": False,
                               "attempt": e[1]}


def test_a_stale_attempt_or_another_worker_is_refused_for_that_row_only(clean_db: str) -> None:
    [b, d, e] = started(clean_db, 3)
    before_b, before_d = row(clean_db, b[0]), row(clean_db, d[0])
    missing = str(uuid.uuid4())
    got = write(clean_db, [
        W("heartbeat", b[0], b[1], worker="w2", seconds=600),  # not its holder
        W("complete", d[0], d[1] - 1, doc={"answer": "stale"}),  # an older attempt
        W("complete", e[0], e[1], doc={"answer": "mine"}),
        W("append", missing, 1, seq=0, offset=0, text="x"),  # no such row
        W("heartbeat", None, None, seconds=None),  # no row at all: nothing to check
    ])
    assert [(g["ord"], g["applied"], g["status"], g["attempts"], g["worker"]) for g in got] == [
        (1, False, "processing", b[1], "w1"), (2, False, "processing", d[1], "w1"),
        (3, True, "completed", e[1], "w1"), (4, False, None, None, None),
        (5, False, None, None, None)]
    assert row(clean_db, b[0]) == before_b and row(clean_db, d[0]) == before_d
    assert row(clean_db, e[0])["response_payload"] == {"answer": "mine"}
    assert chunks(clean_db, missing) == []


def test_chunks_then_the_outcome_in_one_batch_leave_the_outcome(clean_db: str) -> None:
    [a, b] = started(clean_db, 2)
    got = write(clean_db, [
        W("append", *a, seq=0, offset=0, text="Once"),
        W("append", *a, seq=1, offset=4, text=" upon"),
        W("complete", *a, doc={"answer": "Once upon a time"}),
        W("append", *b, seq=0, offset=0, text="Half an answer"),
        W("cancelled", *b),  # null: keep the partial answer streamed so far
    ])
    assert all(g["applied"] for g in got)
    assert chunks(clean_db, a[0]) == [] and chunks(clean_db, b[0]) == []
    assert row(clean_db, a[0])["response_payload"] == {"answer": "Once upon a time"}
    cancelled = row(clean_db, b[0])
    assert cancelled["status"] == "failed" and cancelled["error"]["type"] == "Cancelled"
    assert cancelled["response_payload"]["answer"] == "Half an answer"
    assert cancelled["response_payload"]["partial"] is True


def test_the_outcome_wins_whatever_the_order_in_the_arrays(clean_db: str) -> None:
    """Outcomes are applied after every append of the call, wherever they stand."""
    [a] = started(clean_db, 1)
    got = write(clean_db, [W("complete", *a, doc={"answer": "final"}),
                           W("append", *a, seq=0, offset=0, text="late?")])
    assert [(g["ord"], g["applied"], g["status"]) for g in got] == [
        (1, True, "completed"), (2, True, "processing")]
    assert chunks(clean_db, a[0]) == []
    assert row(clean_db, a[0])["response_payload"] == {"answer": "final"}


def test_the_commit_is_relaxed_only_without_outcomes(clean_db: str) -> None:
    [a, b] = started(clean_db, 2)
    with service(clean_db) as conn:
        assert commit_mode(conn) == "on"
        batch(conn, [W("heartbeat", *a, seconds=LEASE),
                     W("append", *a, seq=0, offset=0, text="x")])
        assert commit_mode(conn) == "off"
    for outcome in (W("complete", *a, doc={"answer": 1}),
                    W("fail", *b, doc={"type": "E", "message": "m"})):
        with service(clean_db) as conn:
            batch(conn, [W("heartbeat", *b, seconds=LEASE), outcome])
            assert commit_mode(conn) == "on"
    [c, d] = started(clean_db, 2)
    for outcome in (W("retry", *c, doc={"type": "E", "message": "m"}, delay=1, seconds=LEASE),
                    W("cancelled", *d)):
        with service(clean_db) as conn:
            [g] = batch(conn, [outcome])
            assert g["applied"] and commit_mode(conn) == "on"
    with service(clean_db) as conn:  # an outcome refused still waits for the disk
        [g] = batch(conn, [W("complete", *a, doc={"answer": 2})])
        assert not g["applied"] and commit_mode(conn) == "on"


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_users_cannot_write(clean_db: str, role: str) -> None:
    [a] = started(clean_db, 1)
    with pytest.raises(errors.InsufficientPrivilege), \
            as_role(clean_db, role, str(uuid.uuid4())) as conn:
        batch(conn, [W("complete", *a, doc={"answer": "forged"})])
    for helper in ("write_bind(array['bind'], array[null::uuid], '{1}', '{w}', '{30}')",
                   "write_complete(array['complete'], array[null::uuid], '{1}', '{w}', "
                   "array[null::jsonb])"):
        with pytest.raises(errors.InsufficientPrivilege), \
                as_role(clean_db, role, str(uuid.uuid4())) as conn:
            conn.execute(f"select * from agent_bridge.{helper}")
    assert row(clean_db, a[0])["status"] == "processing"


def test_users_cannot_write_over_postgrest(clean_db: str, postgrest: str) -> None:
    [a] = started(clean_db, 1)
    body = dict(zip(["p_kinds", "p_ids", "p_attempts", "p_workers", "p_docs", "p_seconds",
                     "p_delays", "p_seqs", "p_offsets", "p_texts"],
                    [["complete"], [a[0]], [a[1]], ["w1"], [{"answer": "forged"}], [None],
                     [None], [None], [None], [None]], strict=True))
    anon = role_key("anon")
    reply = httpx.post(f"{postgrest}/rest/v1/rpc/agent_tasks_write", json=body,
                       headers={"apikey": SERVICE_KEY, "Authorization": f"Bearer {anon}"},
                       timeout=10)
    assert reply.status_code == 403 and reply.json()["code"] == "42501", reply.text
    assert row(clean_db, a[0])["status"] == "processing"


def test_a_batch_over_postgrest(clean_db: str, postgrest: str) -> None:
    """The Supabase transport's call: JSON arrays (null where a kind takes nothing), one
    row per write back, in order."""
    [a, b] = started(clean_db, 2)
    task_id = insert_task(clean_db, {"prompt": "bind me"})
    [c] = [(str(x["id"]), x["attempt"]) for x in claim_all(clean_db, 1)]
    assert c[0] == task_id
    writes = [W("start", *c, seconds=LEASE), W("heartbeat", *a, seconds=LEASE),
              W("append", *a, seq=0, offset=0, text="hé ✓"),
              W("complete", *b, doc={"answer": "ok", "n": [1, 2]}),
              W("complete", *b, doc={"answer": "twice"})]
    body = dict(zip(["p_kinds", "p_ids", "p_attempts", "p_workers", "p_docs", "p_seconds",
                     "p_delays", "p_seqs", "p_offsets", "p_texts"],
                    [[w.kind for w in writes], [w.id for w in writes],
                     [w.attempt for w in writes], [w.worker for w in writes],
                     [w.doc for w in writes], [w.seconds for w in writes],
                     [w.delay for w in writes], [w.seq for w in writes],
                     [w.offset for w in writes], [w.text for w in writes]], strict=True))
    reply = httpx.post(f"{postgrest}/rest/v1/rpc/agent_tasks_write", json=body,
                       headers={"apikey": SERVICE_KEY,
                                "Authorization": f"Bearer {SERVICE_KEY}"}, timeout=10)
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert [(g["ord"], g["applied"], g["status"]) for g in got] == [
        (1, True, "processing"), (2, True, "processing"), (3, True, "processing"),
        (4, True, "completed"), (5, False, "completed")]
    assert got[0]["request_payload"] == {"prompt": "bind me"}
    assert chunks(clean_db, a[0]) == [(a[1], 0, 0, "hé ✓")]
    assert row(clean_db, b[0])["response_payload"] == {"answer": "ok", "n": [1, 2]}
    bad = dict(body, p_kinds=["start", "heartbeat", "append", "complete", "explode"])
    reply = httpx.post(f"{postgrest}/rest/v1/rpc/agent_tasks_write", json=bad,
                       headers={"apikey": SERVICE_KEY,
                                "Authorization": f"Bearer {SERVICE_KEY}"}, timeout=10)
    assert reply.status_code == 400 and reply.json()["code"] == "22023", reply.text
    assert "explode" in reply.json()["message"]


def test_a_batch_of_500_in_one_call(clean_db: str) -> None:
    sql(clean_db, "insert into public.agent_task_requests (request_payload) "
                  "select jsonb_build_object('prompt', g) from generate_series(1, 500) g")
    claimed = [(str(c["id"]), c["attempt"]) for c in claim_all(clean_db, 500)]
    assert len(claimed) == 500
    timings = []
    for writes in ([W("bind", *c, seconds=LEASE) for c in claimed],
                   [W("heartbeat", *c, seconds=LEASE) for c in claimed],
                   [W("append", *c, seq=0, offset=0, text=f"chunk {i}")
                    for i, c in enumerate(claimed)],
                   [W("complete", *c, doc={"answer": i}) for i, c in enumerate(claimed)]):
        began = time.perf_counter()
        got = write(clean_db, writes)
        timings.append(time.perf_counter() - began)
        assert [g["ord"] for g in got] == list(range(1, 501))
        assert all(g["applied"] for g in got), writes[0].kind
    assert sql(clean_db, "select count(*) from public.agent_task_requests "
                         "where status = 'completed' and response_payload ? 'answer'") == [(500,)]
    assert sql(clean_db, "select count(*) from public.agent_task_chunks k join "
                         "public.agent_task_requests t on t.id = k.task_id") == [(0,)]
    assert max(timings) < 5, timings  # (each is one call: well under a second here)


# --------------------------------------------------------------------------- arguments


def test_arrays_of_different_lengths_are_refused(clean_db: str) -> None:
    [a] = started(clean_db, 1)
    args = arrays([W("heartbeat", *a, seconds=LEASE)])
    args[5] = [LEASE, LEASE]
    with pytest.raises(errors.InvalidParameterValue, match="one length"), \
            service(clean_db) as conn:
        conn.execute(CALL, args)
    args[5] = None  # counts as empty
    with pytest.raises(errors.InvalidParameterValue, match="got lengths 1, 1, 1, 1, 1, null"), \
            service(clean_db) as conn:
        conn.execute(CALL, args)
    assert write(clean_db, []) == []
    with service(clean_db) as conn:  # nulls only: nothing to do, as for the other functions
        assert conn.execute(CALL, [None] * 10).fetchall() == []


def test_an_unknown_kind_or_bad_seconds_fail_the_whole_call(clean_db: str) -> None:
    [a, b] = started(clean_db, 2)
    before = row(clean_db, a[0])
    with pytest.raises(errors.InvalidParameterValue, match=r'p_kinds\[2\] is "finish"'), \
            service(clean_db) as conn:
        batch(conn, [W("complete", *a, doc={"answer": 1}), W("finish", *b)])
    with pytest.raises(errors.InvalidParameterValue, match=r"p_kinds\[1\] is null"), \
            service(clean_db) as conn:
        conn.execute(CALL, [[None], [a[0]], [a[1]], ["w1"], [None], [None], [None], [None],
                            [None], [None]])
    for bad in (W("heartbeat", *b, seconds=0), W("bind", *b, seconds=float("nan")),
                W("start", *b, seconds=None), W("heartbeat", *b, seconds=1e9),
                W("retry", *b, doc={"type": "E"}, delay=-1, seconds=LEASE),
                W("retry", *b, doc={"type": "E"}, delay=1, seconds=0)):
        with pytest.raises(errors.InvalidParameterValue, match=r"p_(seconds|delays)\[2\]"), \
                service(clean_db) as conn:
            batch(conn, [W("complete", *a, doc={"answer": 1}), bad])
    with pytest.raises(errors.InvalidParameterValue, match="p_seq and p_offset"), \
            service(clean_db) as conn:
        batch(conn, [W("complete", *a, doc={"answer": 1}),
                     W("append", *b, seq=-1, offset=0, text="x")])
    assert row(clean_db, a[0]) == before  # nothing of a failed call stays
    # a refused append's arguments are not checked, as agent_task_append does not
    [g] = write(clean_db, [W("append", b[0], b[1], worker="w2", seq=None, offset=None)])
    assert not g["applied"]
    # one seq twice: the second insert fails, as the second agent_task_append would
    with pytest.raises(errors.UniqueViolation), service(clean_db) as conn:
        batch(conn, [W("append", *b, seq=0, offset=0, text="x"),
                     W("append", *b, seq=0, offset=0, text="y")])


# --------------------------------------------------------------------------- repeats


def test_repeated_writes_of_one_row_apply_as_one_after_another(clean_db: str) -> None:
    [a, b] = started(clean_db, 2)
    # two heartbeats of one attempt: both apply, the last gives the lease
    got = write(clean_db, [W("heartbeat", *a, seconds=100), W("heartbeat", *a, seconds=300)])
    assert [g["applied"] for g in got] == [True, True] and row(clean_db, a[0])["lease"] == 300
    # a stale heartbeat beside the current one: only the current applies
    got = write(clean_db, [W("heartbeat", a[0], a[1] - 1, seconds=100),
                           W("heartbeat", *a, seconds=200)])
    assert [g["applied"] for g in got] == [False, True] and row(clean_db, a[0])["lease"] == 200
    # two completes of one attempt: the first applies, the second is refused
    got = write(clean_db, [W("complete", *a, doc={"answer": "first"}),
                           W("complete", *a, doc={"answer": "second"})])
    assert [(g["applied"], g["status"]) for g in got] == [(True, "completed"),
                                                          (False, "completed")]
    assert row(clean_db, a[0])["response_payload"] == {"answer": "first"}
    # a complete then a failure of one attempt: the complete (the outcomes' order)
    got = write(clean_db, [W("fail", *b, doc={"type": "E", "message": "m"}),
                           W("complete", *b, doc={"answer": "won"})])
    assert [(g["applied"], g["status"]) for g in got] == [(False, "completed"),
                                                          (True, "completed")]
    # two workers binding one attempt: the first takes it, the second is refused
    task_id = insert_task(clean_db)
    [c] = [(str(x["id"]), x["attempt"]) for x in claim_all(clean_db, 1)]
    assert c[0] == task_id
    got = write(clean_db, [W("bind", *c, worker="w9", seconds=LEASE),
                           W("start", *c, worker="w8", seconds=LEASE),
                           W("start", *c, worker="w9", seconds=120)])
    assert [(g["applied"], g["worker"]) for g in got] == [(True, "w9"), (False, "w9"),
                                                          (True, "w9")]
    assert got[1]["request_payload"] is None and got[1]["max_attempts"] == 3  # refused start
    assert got[2]["request_payload"] == {"prompt": "Hello Agent, are you online?"}
    assert row(clean_db, c[0])["lease"] == 120
    # ... the first the row admits: a stale pair first does not shut out the current one
    task_id = insert_task(clean_db)
    [d] = [(str(x["id"]), x["attempt"]) for x in claim_all(clean_db, 1)]
    got = write(clean_db, [W("bind", d[0], d[1] - 1, worker="w7", seconds=LEASE),
                           W("bind", *d, worker="w8", seconds=LEASE),
                           W("bind", *d, worker="w9", seconds=LEASE)])
    assert [(g["applied"], g["worker"]) for g in got] == [(False, "w8"), (True, "w8"),
                                                          (False, "w8")]


# --------------------------------------------------------------------------- equal semantics


def single(db: str, w: W) -> dict[str, Any]:
    """The single-row function of a write's kind, as service_role; its first row."""
    calls: dict[str, tuple[str, list[Any]]] = {
        "bind": ("agent_task_start", [w.id, w.attempt, w.worker, w.seconds]),
        "start": ("agent_task_start", [w.id, w.attempt, w.worker, w.seconds]),
        "heartbeat": ("agent_task_heartbeat", [w.id, w.attempt, w.worker, w.seconds]),
        "append": ("agent_task_append", [w.id, w.attempt, w.worker, w.seq, w.offset, w.text]),
        "progress": ("agent_task_progress", [w.id, w.attempt, w.worker, w.doc]),
        "complete": ("agent_task_complete", [w.id, w.attempt, w.worker, w.doc]),
        "fail": ("agent_task_fail", [w.id, w.attempt, w.worker, w.doc]),
        "retry": ("agent_task_schedule_retry",
                  [w.id, w.attempt, w.worker, w.doc, w.delay, w.seconds]),
        "cancelled": ("agent_task_cancelled", [w.id, w.attempt, w.worker, w.doc]),
    }
    name, args = calls[w.kind]
    args = [Jsonb(a) if isinstance(a, dict) else a for a in args]
    with as_role(db, "service_role") as conn:
        conn.row_factory = dict_row
        got = conn.execute(f"select * from public.{name}({', '.join(['%s'] * len(args))})",
                           args).fetchall()
    assert len(got) == 1
    return dict(got[0])


PROGRESS = {"answer": "so far", "partial": True}
ERROR = {"type": "Transient", "message": "try later", "retryable": True}


def case_writes(kind: str, task_id: str, attempt: int, worker: str) -> W:
    docs = {"progress": PROGRESS, "complete": {"answer": "done"}, "fail": ERROR,
            "retry": ERROR, "cancelled": None}
    return W(kind, task_id, attempt, worker, doc=docs.get(kind),
             seconds=LEASE if kind in ("bind", "start", "heartbeat", "retry") else None,
             delay=2.0 if kind == "retry" else None,
             seq=3 if kind == "append" else None, offset=2 if kind == "append" else None,
             text="tail" if kind == "append" else None)


# (how the two rows are set up, and who writes): started by w1 and streamed a little;
# claimed but not started; started, written by another worker; started, at an older
# attempt; started, with a cancel request; finished already.
CASES = ["holder", "unstarted", "other_worker", "stale_attempt", "cancel_requested",
         "completed"]


def prepared(db: str, case: str) -> tuple[str, int, str]:
    """A row in the case's state; (id, the attempt and the worker the write carries)."""
    task_id = insert_task(db, {"prompt": "twin"})
    [(attempt,)] = sql(db, "select c.attempt from public.agent_tasks_claim(1, 30) c")
    if case == "unstarted":
        return task_id, attempt, "w1"
    sql(db, "select * from public.agent_task_start(%s, %s, 'w1', 30)", [task_id, attempt])
    sql(db, "select * from public.agent_task_append(%s, %s, 'w1', 0, 0, 'Once up')",
        [task_id, attempt])
    sql(db, "select * from public.agent_task_append(%s, %s, 'w1', 1, 7, 'on')",
        [task_id, attempt])
    if case == "cancel_requested":
        assert sql(db, "select public.agent_task_request_cancel(%s)", [task_id]) == [
            ("processing",)]
    if case == "completed":
        sql(db, "select * from public.agent_task_complete(%s, %s, 'w1', '{\"answer\": 0}')",
            [task_id, attempt])
    if case == "other_worker":
        return task_id, attempt, "w2"
    if case == "stale_attempt":
        return task_id, attempt - 1, "w1"
    return task_id, attempt, "w1"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_in_a_batch_equals_its_function(clean_db: str, kind: str, case: str) -> None:
    """Two identical rows: one written by the single-row function, the other by a batch
    (with a write to an unrelated row beside it). Same result, same row, same chunks."""
    one_id, attempt, worker = prepared(clean_db, case)
    two_id, attempt_two, _ = prepared(clean_db, case)
    assert attempt_two == attempt and row(clean_db, one_id) == row(clean_db, two_id)
    [neighbour] = started(clean_db, 1, worker="w5")

    alone = single(clean_db, case_writes(kind, one_id, attempt, worker))
    got = write(clean_db, [W("heartbeat", *neighbour, worker="w5", seconds=LEASE),
                           case_writes(kind, two_id, attempt, worker)])
    assert got[0]["applied"]
    in_batch = got[1]

    common = ["applied", "status", "attempts", "worker"]
    assert {k: in_batch[k] for k in common} == {k: alone[k] for k in common}
    if kind in ("bind", "start"):  # the row's columns (its own created_at, each)
        assert (in_batch["created_at"], alone["created_at"]) == tuple(
            sql(clean_db, "select created_at from public.agent_task_requests where id = %s",
                [i])[0][0] for i in (two_id, one_id))
    if kind == "start":
        for k in ("request_payload", "max_attempts", "priority", "user_id", "enterprise_id",
                  "agent"):
            assert in_batch[k] == alone[k], k
    elif kind == "bind":  # the start's row columns, never the payload
        assert in_batch["request_payload"] is None
        for k in ("max_attempts", "priority", "user_id", "enterprise_id", "agent"):
            assert in_batch[k] == alone[k], k
    else:
        assert all(in_batch[k] is None for k in COLUMNS[5:])
    assert row(clean_db, two_id) == row(clean_db, one_id)
    assert [c[1:] for c in chunks(clean_db, two_id)] == [c[1:] for c in chunks(clean_db, one_id)]
    expected_attempts = {c[0] for c in chunks(clean_db, one_id)}
    assert {c[0] for c in chunks(clean_db, two_id)} == expected_attempts
