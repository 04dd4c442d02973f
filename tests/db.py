"""Plain database access for tests: the test server, SQL as the owner or as Supabase's
roles (the way PostgREST sets up a request), and rows inserted as the guide's frontend
does."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bridge.localstack import LocalPostgres, with_database
from bridge.store import TaskStore

T = TypeVar("T")


class PgServer:
    """The test PostgreSQL server: make databases on it, and stop/start it if it is ours."""

    def __init__(self, admin_url: str, local: LocalPostgres | None) -> None:
        self.admin_url = admin_url
        self.local = local

    def create_database(self, name: str | None = None) -> str:
        name = name or f"ab_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
            conn.execute(f'create database "{name}"')
        return with_database(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        forget_connection(url)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')

    def require_local(self) -> LocalPostgres:
        if self.local is None:
            pytest.skip("stops the database server: not done to a TEST_DATABASE_URL server")
        return self.local


# The main thread's connection to each database, kept between helper calls: a new backend
# costs a fork and cold caches (milliseconds), and the suite makes thousands of calls.
_kept: dict[str, psycopg.Connection[Any]] = {}


@contextmanager
def owner_connection(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection as the database owner, for statements that leave no session
    state behind: the main thread's is kept and checked before reuse (a restarted server or
    a dropped database costs a reconnect, not an error); other threads get one of their own."""
    if threading.current_thread() is not threading.main_thread():
        with psycopg.connect(db_url, autocommit=True) as own:
            yield own
        return
    conn = _kept.get(db_url)
    if conn is None or not _usable(conn):
        # No server-side prepared statements: a kept plan would break on a changed table.
        conn = _kept[db_url] = psycopg.connect(db_url, autocommit=True, prepare_threshold=None)
    yield conn


def _usable(conn: psycopg.Connection[Any]) -> bool:
    if conn.closed or conn.broken:
        return False
    try:
        conn.execute("")
    except psycopg.Error:
        conn.close()
        return False
    return True


def forget_connection(db_url: str | None = None) -> None:
    """Close the kept connection to `db_url` (all of them with None)."""
    for url in [db_url] if db_url is not None else list(_kept):
        conn = _kept.pop(url, None)
        if conn is not None:
            conn.close()


def sql(db_url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Plain SQL as the database owner, for setting up and inspecting rows."""
    with owner_connection(db_url) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@contextmanager
def as_role(db_url: str, role: str, sub: str | None = None) -> Iterator[psycopg.Connection[Any]]:
    """A transaction set up the way PostgREST sets one up for a request with this JWT."""
    claims = {"role": role, **({"sub": sub} if sub else {})}
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        conn.execute(f"set local role {role}")
        conn.execute("select set_config('request.jwt.claims', %s, true)", [json.dumps(claims)])
        yield conn


def insert_task(db_url: str, payload: object = None, **columns: object) -> str:
    """Insert a row the way the guide's frontend does; returns its id."""
    payload = {"prompt": "Hello Agent, are you online?"} if payload is None else payload
    names = ["status", "request_payload", *columns]
    values = ["pending", Jsonb(payload), *columns.values()]
    placeholders = ", ".join(["%s"] * len(values))
    with owner_connection(db_url) as conn:
        row = conn.execute(
            f"insert into public.agent_task_requests ({', '.join(names)}) "
            f"values ({placeholders}) returning id", values).fetchone()
    assert row is not None
    return str(row[0])


def nested(depth: int) -> str:
    """A JSON object nested `depth` levels deep: {"a": {"a": ... 1}}."""
    return '{"a": ' * depth + "1" + "}" * depth


def insert_undecodable(db_url: str) -> str:
    """A row nested 1,200 levels deep, as one stored before the depth check (or with the
    limit raised): Python's JSON decoder fails on it (RecursionError); returns its id."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("set agent_bridge.max_request_depth = '5000'")
        found = conn.execute("insert into public.agent_task_requests (request_payload) "
                             "values (%s::jsonb) returning id::text", [nested(1200)]).fetchone()
    assert found is not None
    return str(found[0])


def fetch_task(db_url: str, task_id: str) -> dict[str, object]:
    """The row as the database owner sees it."""
    with owner_connection(db_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("select * from public.agent_task_requests where id = %s",
                          [task_id]).fetchone()
    assert row is not None
    return dict(row)

def insert_rows(db_url: str, status: str, ago: str = "0 seconds", count: int = 1) -> list[str]:
    """`count` rows in `status`, created (and, if finished, finished) `ago`."""
    finished = "now() - %(ago)s::interval" if status in ("completed", "failed") else "null"
    lease = "now() + interval '1 hour'" if status == "processing" else "null"
    rows = sql(db_url, f"""
        insert into public.agent_task_requests (status, request_payload, attempts, created_at,
                                                run_at, finished_at, lease_expires_at)
        select %(status)s, '{{"prompt": "p"}}', 1, now() - %(ago)s::interval,
               now() - %(ago)s::interval, {finished}, {lease}
          from generate_series(1, %(count)s)
        returning id""", {"status": status, "ago": ago, "count": count})
    return [str(r[0]) for r in rows]


def claim_and_start(store: TaskStore, task_id: str, worker: str = "w1", lease: float = 60.0
                    ) -> int:
    """Claim row `task_id` and start it as `worker` would; returns its attempt."""
    claims = [c for c in store.claim(10, lease) if c.id == task_id]
    assert claims, "the row was not claimed"
    started, _ = store.start(task_id, claims[0].attempt, worker, lease)
    assert started is not None
    return claims[0].attempt

def chunks(db_url: str, task_id: str) -> list[tuple[int, int, int, str]]:
    """(attempt, seq, answer_offset, text) of the task's chunks, in order."""
    return [(a, s, o, t) for a, s, o, t in sql(
        db_url, "select attempt, seq, answer_offset, text from public.agent_task_chunks "
                "where task_id = %s order by attempt, seq", [task_id])]


def streamed(db_url: str, task_id: str) -> Any:
    """The row's response_payload with its streamed answer folded in, as readers see it."""
    return sql(db_url, "select agent_bridge.streamed_payload(id, attempts, response_payload) "
                       "from public.agent_task_requests where id = %s", [task_id])[0][0]


@contextmanager
def broadcasting(db_url: str, on: bool = True) -> Iterator[None]:
    """Realtime Broadcast switched on (or off) in the database for the block, then back
    to what it was: the flag is shared by every test of the session's database."""
    (before,), = sql(db_url, "select enabled from agent_bridge.realtime_broadcast")
    sql(db_url, "update agent_bridge.realtime_broadcast set enabled = %s", [on])
    try:
        yield
    finally:
        sql(db_url, "update agent_bridge.realtime_broadcast set enabled = %s", [before])


def race_as(db_url: str, user: str, call: Callable[[psycopg.Connection[Any]], T], n: int
            ) -> list[T | Exception]:
    """`call` n times at once as signed-in `user`, each in a transaction of its own
    connection (as PostgREST runs requests), released together once every transaction has
    begun; each one's result or exception, in order."""
    barrier = threading.Barrier(n)
    outcomes: list[T | Exception] = [Exception("did not run")] * n

    def one(i: int) -> None:
        try:
            with as_role(db_url, "authenticated", user) as conn:
                barrier.wait(timeout=60)
                outcomes[i] = call(conn)
        except Exception as exc:  # the caller's assertions report it
            outcomes[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes

