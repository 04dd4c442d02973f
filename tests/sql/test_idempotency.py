"""Idempotency keys (issue 26): `idempotency_key` is unique per user and agent while the row
exists; a second insert with a key in use stores nothing and is refused with 23505 (409
through PostgREST), naming the task that has the key. On the real database, as Supabase's
roles, and through the store's two transports."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from bridge.errors import StoreRejected
from bridge.store import TaskStore
from tests.db import as_role, race_as, sql
from tests.fakes.jwt import role_key, user_token
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub
from tests.limits import admission_restored

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def db(clean_db: str) -> Iterator[str]:
    """The test database with a second agent (`other`) registered and no usage counted; the
    limits and agents are put back afterwards."""
    with admission_restored(clean_db, other={"queue": "agent_tasks.other",
                                             "max_attempts": None}):
        yield clean_db


def insert(db_url: str, user: str | None, key: str | None, agent: str = "default") -> str:
    """One insert with this key, as the signed-in user (None: as the service role)."""
    role = "authenticated" if user is not None else "service_role"
    with as_role(db_url, role, user) as conn:
        row = conn.execute("insert into public.agent_task_requests "
                           "(request_payload, agent, idempotency_key) values (%s, %s, %s) "
                           "returning id::text", [Jsonb({"prompt": "hi"}), agent, key]
                           ).fetchone()
    assert row is not None
    return str(row[0])


def refused(db_url: str, user: str | None, key: str, agent: str = "default"
            ) -> errors.UniqueViolation:
    with pytest.raises(errors.UniqueViolation) as info:
        insert(db_url, user, key, agent)
    return info.value


def rows(db_url: str) -> int:
    return int(sql(db_url, "select count(*) from public.agent_task_requests")[0][0])


def day_rows(db_url: str, user: str) -> int | None:
    found = sql(db_url, "select rows from agent_bridge.user_day_usage where user_id = %s "
                        "and day = (now() at time zone 'UTC')::date", [user])
    return int(found[0][0]) if found else None


def test_a_second_insert_with_the_key_is_refused_naming_the_task(db: str) -> None:
    user = str(uuid.uuid4())
    first = insert(db, user, "order-42")
    exc = refused(db, user, "order-42")
    diag = exc.diag
    assert diag.message_primary == (
        f'idempotency_key "order-42" is already used by task {first} (agent "default")')
    assert diag.message_detail is not None
    assert diag.message_detail.startswith(f"Task {first} has this key: pending, created ")
    assert diag.message_hint is not None and "idempotency_key" in diag.message_hint
    assert rows(db) == 1
    assert day_rows(db, user) == 1  # the refused retry spent no day budget
    with as_role(db, "authenticated", user) as conn:  # users read their key back
        assert conn.execute("select id::text, idempotency_key from public.agent_task_requests"
                            ).fetchall() == [(first, "order-42")]


def test_keys_are_per_user_and_per_agent(db: str) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    ids = {insert(db, alice, "k"), insert(db, bob, "k"), insert(db, alice, "k", "other")}
    assert len(ids) == 3
    refused(db, bob, "k")
    refused(db, alice, "k", "other")
    assert rows(db) == 3


def test_rows_without_a_key_are_not_limited(db: str) -> None:
    user = str(uuid.uuid4())
    insert(db, user, None)
    insert(db, user, None)
    assert rows(db) == 2


def test_the_service_rows_without_user_share_one_key_space_per_agent(db: str) -> None:
    """The service's own rows (no user_id: the CLI) have one key space per agent; a row the
    service inserts for a user (user_id set) shares that user's."""
    service = insert(db, None, "webhook-7")
    assert service in str(refused(db, None, "webhook-7"))
    insert(db, None, "webhook-7", "other")
    user = str(uuid.uuid4())
    mine = insert(db, user, "webhook-7")
    with as_role(db, "service_role") as conn, pytest.raises(errors.UniqueViolation) as info:
        conn.execute("insert into public.agent_task_requests "
                     "(request_payload, user_id, idempotency_key) values (%s, %s, 'webhook-7')",
                     [Jsonb({"prompt": "hi"}), user])
    assert mine in str(info.value)
    assert rows(db) == 3


@pytest.mark.parametrize("key", ["", "k" * 201])
def test_a_key_outside_1_to_200_characters_is_refused(db: str, key: str) -> None:
    with pytest.raises(errors.InvalidParameterValue,
                       match=f"idempotency_key must be 1 to 200 characters long, got {len(key)}"):
        insert(db, str(uuid.uuid4()), key)
    insert(db, str(uuid.uuid4()), "é" * 200)  # characters, not bytes
    with pytest.raises(errors.CheckViolation):  # a service update cannot get around it
        sql(db, "update public.agent_task_requests set idempotency_key = %s", [key])


def test_a_retry_at_the_active_limit_is_told_about_its_task(db: str) -> None:
    """The key is checked before the quota and the day budgets (its trigger fires before
    admit): a retry of the submit that took the last place gets the task, not the limit."""
    sql(db, "update public.agent_tenant_limits set max_active = 1 where tenant = '*'")
    user = str(uuid.uuid4())
    first = insert(db, user, "once")
    assert first in str(refused(db, user, "once"))
    with pytest.raises(errors.RaiseException, match="too many active tasks"):
        insert(db, user, "another")
    assert day_rows(db, user) == 1


def test_a_deleted_row_frees_its_key(db: str) -> None:
    user = str(uuid.uuid4())
    first = insert(db, user, "again")
    sql(db, "delete from public.agent_task_requests where id = %s", [first])
    assert insert(db, user, "again") != first


def test_the_unique_index_holds_where_the_trigger_cannot_see(db: str) -> None:
    """A repeatable read transaction's snapshot predates a concurrent insert that committed
    while it waited: the trigger finds no row, the unique index refuses the second."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("set default_transaction_isolation = 'repeatable read'")
        with conn.transaction():
            conn.execute("set local role service_role")
            conn.execute("select count(*) from public.agent_task_requests")  # the snapshot
            insert(db, None, "rr")
            with pytest.raises(errors.UniqueViolation,
                               match="agent_task_requests_idempotency_key_idx"):
                conn.execute("insert into public.agent_task_requests "
                             "(request_payload, idempotency_key) values (%s, 'rr')",
                             [Jsonb({"prompt": "hi"})])
    assert rows(db) == 1


def test_twenty_concurrent_inserts_with_one_key_store_one_row(db: str) -> None:
    """20 inserts by one user with one key, each in its own connection (as PostgREST runs
    them), released together once every transaction has begun: one row; each of the 19
    others is refused naming that row; the day budget counts one."""
    user, n = str(uuid.uuid4()), 20

    def one(conn: psycopg.Connection[Any]) -> str | None:
        row = conn.execute("insert into public.agent_task_requests (request_payload, "
                           "idempotency_key) values (%s, 'same') returning id::text",
                           [Jsonb({"prompt": "hi"})]).fetchone()
        return row[0] if row else None
    outcomes = race_as(db, user, one, n)
    stored = [o for o in outcomes if isinstance(o, str)]
    failures = [o for o in outcomes if isinstance(o, errors.UniqueViolation)]
    assert len(stored) == 1 and len(failures) == n - 1, outcomes
    named = {UUID.findall(e.diag.message_primary or "")[0] for e in failures}
    assert named == set(stored)
    assert sql(db, "select id::text from public.agent_task_requests") == [(stored[0],)]
    assert day_rows(db, user) == 1


def test_through_postgrest_a_second_insert_is_409_naming_the_task(db: str) -> None:
    stub = PostgrestStub(db, service_key=SERVICE_KEY)
    url = stub.start()
    try:
        user = str(uuid.uuid4())
        headers = {"apikey": role_key("anon"), "Authorization": f"Bearer {user_token(user)}",
                   "Prefer": "return=representation"}

        def post() -> httpx.Response:
            return httpx.post(f"{url}/rest/v1/agent_task_requests?select=id,idempotency_key",
                              json={"request_payload": {"prompt": "hi"},
                                    "idempotency_key": "form-1"},
                              headers=headers, timeout=30)

        first = post()
        assert first.status_code == 201, first.text
        [row] = first.json()
        assert row["idempotency_key"] == "form-1"
        again = post()
        assert again.status_code == 409, again.text
        body = again.json()
        assert body["code"] == "23505"
        assert body["message"] == (f'idempotency_key "form-1" is already used by task '
                                   f'{row["id"]} (agent "default")')
        assert body["details"].startswith(f"Task {row['id']} has this key: pending")
        found = httpx.get(f"{url}/rest/v1/agent_task_requests",
                          params={"select": "id", "agent": "eq.default",
                                  "idempotency_key": "eq.form-1"}, headers=headers, timeout=30)
        assert found.json() == [{"id": row["id"]}]
    finally:
        stub.stop()


def test_the_store_refuses_a_key_in_use_and_finds_its_row(store: TaskStore,
                                                          clean_db: str) -> None:
    """Both transports: the CLI's insert with a key, the 23505, and the lookup among the
    service's rows (a user's row with the same key is not one of them)."""
    first = store.insert({"prompt": "hi"}, idempotency_key="cli-1")
    with pytest.raises(StoreRejected) as info:
        store.insert({"prompt": "hi"}, idempotency_key="cli-1")
    assert info.value.code == "23505"
    assert first in str(info.value)
    assert store.keyed_task("default", "cli-1") == first
    assert store.keyed_task("default", "nope") is None
    insert(clean_db, str(uuid.uuid4()), "users-key")
    assert store.keyed_task("default", "users-key") is None
