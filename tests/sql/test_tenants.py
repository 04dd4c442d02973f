"""Many users, one table: what a signed-in user may insert (quota, priority band, run_at,
enterprise from the JWT, no chosen id), seen from Supabase's API roles, and the claim's
turns across tenants and per-tenant caps, on the real database."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from postgrest.exceptions import APIError
from psycopg import errors

from bridge.migrate import MIGRATIONS_DIR, migrate
from supabase import Client, ClientOptions, create_client
from tests.db import sql
from tests.fakes.jwt import role_key, user_token
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub
from tests.limits import limits_restored

PAYLOAD = '{"prompt": "hi"}'


def new_user() -> str:
    return str(uuid.uuid4())


@contextmanager
def as_user(db_url: str, user: str | None, enterprise: str | None = None,
            role: str = "authenticated") -> Iterator[psycopg.Connection[Any]]:
    """A transaction set up as PostgREST sets one up for this user's JWT."""
    claims: dict[str, Any] = {"role": role, "app_metadata": {"provider": "email"}}
    if user:
        claims["sub"] = user
    if enterprise is not None:
        claims["app_metadata"]["enterprise_id"] = enterprise
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        conn.execute(f"set local role {role}")
        conn.execute("select set_config('request.jwt.claims', %s, true)", [json.dumps(claims)])
        yield conn


def insert(db_url: str, user: str, enterprise: str | None = None, **columns: Any
           ) -> dict[str, Any]:
    """One insert as the user, the frontend's way; returns the row as stored."""
    columns = {"status": "pending", "request_payload": PAYLOAD, **columns}
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    with as_user(db_url, user, enterprise) as conn:
        # (users may not select every column: `worker` is the operator's)
        cur = conn.execute(f"insert into public.agent_task_requests ({names}) values ({marks}) "
                           f"returning id, status, priority, run_at, created_at, user_id, "
                           f"enterprise_id, tenant", list(columns.values()))
        row = cur.fetchone()
        assert row is not None and cur.description is not None
        return dict(zip([c.name for c in cur.description], row, strict=True))




@pytest.fixture
def limits(clean_db: str) -> Iterator[str]:
    """The test's database with the operator's limits as shipped, restored afterwards."""
    sql(clean_db, "delete from public.agent_task_tenants")  # turns start afresh
    with limits_restored(clean_db):
        yield clean_db


# Quota ---------------------------------------------------------------------------------

def test_quota_refuses_the_21st_active_task(limits: str) -> None:
    """20 pending or processing rows per user by default; the next one is refused with a
    message that names the limit, and a finished row frees a place."""
    user = new_user()
    ids = [insert(limits, user)["id"] for _ in range(20)]
    with pytest.raises(errors.RaiseException, match=r"the limit is 20 pending or processing"):
        insert(limits, user)
    sql(limits, "select * from public.agent_tasks_claim(5, 30)")  # processing still counts
    with pytest.raises(errors.RaiseException):
        insert(limits, user)
    sql(limits, "update public.agent_task_requests set status = 'completed', "
                "finished_at = now() where id = %s", [ids[-1]])
    insert(limits, user)
    assert sql(limits, "select count(*) from public.agent_task_requests where user_id = %s",
               [user]) == [(21,)]
    insert(limits, new_user())  # another user has a quota of their own


def test_quota_counts_rows_of_the_same_statement(limits: str) -> None:
    """The attack from the issue: thousands of rows in one statement. All refused."""
    user = new_user()
    with pytest.raises(errors.RaiseException, match="the limit is 20"), \
            as_user(limits, user) as conn:
        conn.execute("insert into public.agent_task_requests (request_payload) "
                     "select '{\"prompt\": \"x\"}' from generate_series(1, 20000)")
    assert sql(limits, "select count(*) from public.agent_task_requests") == [(0,)]


def test_service_role_is_not_limited(limits: str) -> None:
    with as_user(limits, None, role="service_role") as conn:
        conn.execute("insert into public.agent_task_requests (request_payload, priority, run_at) "
                     "select '{}', 100, now() + interval '30 days' "
                     "from generate_series(1, 50)")
    assert sql(limits, "select count(*) from public.agent_task_requests") == [(50,)]


def test_operator_sets_quota_per_tenant(limits: str) -> None:
    """A tenant row in agent_tenant_limits overrides the default ('*') for that tenant:
    here every user of enterprise E may have 2 active tasks, and the default drops to 3."""
    sql(limits, "insert into public.agent_tenant_limits (tenant, max_active) values ('E', 2)")
    sql(limits, "update public.agent_tenant_limits set max_active = 3 where tenant = '*'")
    alice, bob = new_user(), new_user()
    for _ in range(2):
        insert(limits, alice, "E")
    with pytest.raises(errors.RaiseException, match="the limit is 2 "):
        insert(limits, alice, "E")
    for _ in range(3):
        insert(limits, bob)
    with pytest.raises(errors.RaiseException, match="the limit is 3 "):
        insert(limits, bob)


def test_users_cannot_change_their_limits(limits: str) -> None:
    """The limits live in a table only the operator writes; users may read their own."""
    user = new_user()
    sql(limits, "insert into public.agent_tenant_limits (tenant, max_active) "
                "values ('E', 5), ('F', 7)")
    with as_user(limits, user, "E") as conn:
        seen = conn.execute("select tenant, max_active from public.agent_tenant_limits "
                            "order by 1").fetchall()
    assert seen == [("*", 20), ("E", 5)]
    for statement in ["update public.agent_tenant_limits set max_active = 1000",
                      "insert into public.agent_tenant_limits (tenant, max_active) "
                      "values ('x', 1000)",
                      "select set_config('agent_bridge.max_active', '1000', false)"]:
        try:
            with as_user(limits, user, "E") as conn:
                conn.execute(statement)
        except errors.InsufficientPrivilege:
            pass
    for _ in range(5):
        insert(limits, user, "E")
    with pytest.raises(errors.RaiseException, match="the limit is 5 "):
        insert(limits, user, "E")


# Priority, run_at, enterprise, id ------------------------------------------------------

def test_priority_band(limits: str) -> None:
    """By default users cannot raise or lower priority at all: refused, not clamped."""
    user = new_user()
    assert insert(limits, user)["priority"] == 0
    for priority in (2147483647, 1, -1):
        with pytest.raises(errors.InvalidParameterValue,
                           match=rf"priority {priority} is not allowed: .* 0 to 0"):
            insert(limits, user, priority=priority)
    sql(limits, "update public.agent_tenant_limits set min_priority = -5, max_priority = 5 "
                "where tenant = '*'")
    assert insert(limits, user, priority=5)["priority"] == 5
    with pytest.raises(errors.InvalidParameterValue, match="-5 to 5"):
        insert(limits, user, priority=6)


def test_run_at_is_clamped_and_bounded(limits: str) -> None:
    """A past run_at means now (it never jumps the queue); infinite or beyond the horizon
    (7 days) is refused; a time inside it is kept."""
    user = new_user()
    past = insert(limits, user, run_at=datetime(2000, 1, 1, tzinfo=UTC))
    assert past["run_at"] >= past["created_at"]
    soon = datetime.now(UTC) + timedelta(days=6)
    assert insert(limits, user, run_at=soon)["run_at"] == soon
    for value in ("-infinity", "infinity"):
        with pytest.raises(errors.InvalidParameterValue, match="run_at must be a finite time"):
            insert(limits, user, run_at=value)
    with pytest.raises(errors.InvalidParameterValue, match="at most 7 days ahead"):
        insert(limits, user, run_at=datetime.now(UTC) + timedelta(days=8))


def test_enterprise_comes_from_the_jwt(limits: str) -> None:
    """app_metadata.enterprise_id (which users cannot edit) fills in a missing one; naming
    another enterprise is refused, with or without one in the JWT."""
    user = new_user()
    assert insert(limits, user, "acme")["enterprise_id"] == "acme"
    assert insert(limits, user, "acme", enterprise_id="acme")["tenant"] == "acme"
    assert insert(limits, user)["tenant"] == user  # no enterprise: the user is the tenant
    with pytest.raises(errors.InsufficientPrivilege, match='"globex" is not your enterprise'):
        insert(limits, user, "acme", enterprise_id="globex")
    with pytest.raises(errors.InsufficientPrivilege, match="not your enterprise"):
        insert(limits, user, None, enterprise_id="acme")
    assert sql(limits, "select count(*) from public.agent_task_requests "
                       "where enterprise_id = 'globex'") == [(0,)]


def test_users_cannot_choose_the_id(limits: str) -> None:
    """Otherwise a duplicate-key error would tell a user another user's id exists."""
    theirs = insert(limits, new_user())["id"]
    with pytest.raises(errors.InsufficientPrivilege):
        insert(limits, new_user(), id=theirs)
    with pytest.raises(errors.InsufficientPrivilege):
        insert(limits, new_user(), id=str(uuid.uuid4()))


def test_guide_insert_still_works(limits: str) -> None:
    """The integration guide's frontend insert, unchanged, by a user of an enterprise."""
    user = new_user()
    row = insert(limits, user, "your-enterprise-id", enterprise_id="your-enterprise-id")
    assert (row["status"], row["user_id"], row["priority"]) == ("pending", uuid.UUID(user), 0)


@pytest.mark.parametrize("statement", [
    "select * from public.agent_task_requests",
    "select * from public.agent_tenant_limits",
    "select * from public.agent_task_tenants",
    "insert into public.agent_task_requests (request_payload) values ('{}')",
])
def test_anon_gets_nothing(limits: str, statement: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege), as_user(limits, None, role="anon") as conn:
        conn.execute(statement)


def test_users_cannot_touch_the_turns(limits: str) -> None:
    """The claim's bookkeeping is the service's."""
    insert(limits, new_user())
    for statement in ["select * from public.agent_task_tenants",
                      "update public.agent_task_tenants set served = 0",
                      "select public.agent_task_tenants_activate(array['x'])"]:
        with pytest.raises(errors.InsufficientPrivilege), \
                as_user(limits, new_user()) as conn:
            conn.execute(statement)


# The error's HTTP shape, through the PostgREST stand-in ------------------------------

def user_client(url: str, token: str) -> Client:
    c = create_client(url, role_key("anon"), options=ClientOptions(
        httpx_client=httpx.Client(timeout=10), auto_refresh_token=False,
        persist_session=False))
    c.postgrest.auth(token)
    return c


def test_quota_error_through_postgrest(limits: str) -> None:
    """What supabase-js/-py get: a 400 whose message names the limit; and the other
    refusals as 4xx with the database's message."""
    sql(limits, "update public.agent_tenant_limits set max_active = 2 where tenant = '*'")
    stub = PostgrestStub(limits, service_key=SERVICE_KEY)
    url = stub.start()
    try:
        user = new_user()
        token = user_token(user, enterprise_id="acme")
        client = user_client(url, token)
        table = client.table("agent_task_requests")
        for _ in range(2):
            table.insert({"status": "pending", "request_payload": {"prompt": "hi"}}
                         ).select("id").execute()
        with pytest.raises(APIError) as info:
            table.insert({"status": "pending", "request_payload": {"prompt": "hi"}}
                         ).select("id").execute()
        assert info.value.code == "P0001"
        assert "the limit is 2 pending or processing tasks per user" in str(info.value.message)
        raw = httpx.post(f"{url}/rest/v1/agent_task_requests",
                         json={"status": "pending", "request_payload": {"prompt": "hi"}},
                         headers={"apikey": role_key("anon"), "Authorization": f"Bearer {token}"})
        assert raw.status_code == 400 and "the limit is 2" in raw.json()["message"]

        other = user_token(new_user(), enterprise_id="acme")
        refusals: list[tuple[dict[str, Any], str, int]] = [
            ({"enterprise_id": "globex"}, "42501", 403),
            ({"priority": 99}, "22023", 400),
            ({"run_at": "infinity"}, "22023", 400),
            ({"id": str(uuid.uuid4())}, "42501", 403)]
        for row, code, status in refusals:
            raw = httpx.post(f"{url}/rest/v1/agent_task_requests",
                             json={"request_payload": {"prompt": "hi"}, **row},
                             headers={"apikey": role_key("anon"),
                                      "Authorization": f"Bearer {other}"})
            assert (raw.status_code, raw.json()["code"]) == (status, code), (row, raw.json())
    finally:
        stub.stop()


# The fair claim --------------------------------------------------------------------------

def service_insert(db_url: str, n: int, enterprise: str | None, **columns: Any) -> list[str]:
    names = ["request_payload", "enterprise_id", *columns]
    marks = ", ".join(["%s"] * len(names))
    with psycopg.connect(db_url, autocommit=True) as conn:
        ids = []
        for _ in range(n):
            row = conn.execute(
                f"insert into public.agent_task_requests ({', '.join(names)}) "
                f"values ({marks}) returning id",
                ['{"prompt": "x"}', enterprise, *columns.values()]).fetchone()
            assert row is not None
            ids.append(str(row[0]))
        return ids


def claim(db_url: str, limit: int, concurrency: int = 0, agents: list[str] | None = None
          ) -> list[str]:
    """The tenants of the rows one claim takes, in the order it returns them."""
    return [r[0] for r in sql(
        db_url, "select t.tenant from public.agent_tasks_claim(%s, 30, %s, %s) c "
                "join public.agent_task_requests t on t.id = c.id", [limit, concurrency, agents])]


def test_claim_takes_turns_across_tenants(limits: str) -> None:
    """A floods, then B and C insert a few: they join the line behind A (served before they
    came; issue 20, item 5) and each claim gives each a turn; priority orders a tenant's own
    rows and breaks ties between tenants whose turn it equally is."""
    service_insert(limits, 50, "A")
    assert claim(limits, 3) == ["A", "A", "A"]
    service_insert(limits, 2, "B")
    service_insert(limits, 1, "C", priority=0)
    assert claim(limits, 4) == ["A", "B", "C", "A"]  # one turn each; then by turn again
    [high] = service_insert(limits, 1, "B", priority=9)
    got = sql(limits, "select c.id::text, t.tenant from public.agent_tasks_claim(2, 30) c "
                      "join public.agent_task_requests t on t.id = c.id")
    assert [tenant for _, tenant in got] == ["B", "A"]  # served in the same round: priority
    assert got[0][0] == high  # B's own order is by priority
    service_insert(limits, 1, "D")
    assert claim(limits, 3) == ["A", "B", "D"]  # D joins behind the tenants already waiting


def test_claim_serves_least_recently_served_first(limits: str) -> None:
    """With more tenants than a batch, every tenant is served once before any twice."""
    for tenant in "ABCDEF":
        service_insert(limits, 5, tenant)
    seen = [claim(limits, 4) for _ in range(3)]
    assert sorted(seen[0] + seen[1][:2]) == list("ABCDEF")
    assert not set(seen[0]) & set(seen[1][:2])


def test_tenant_concurrency_caps_processing_rows(limits: str) -> None:
    """At most p_tenant_concurrency rows of a tenant processing at once; the operator's
    max_processing wins for a tenant; finishing a row frees a place."""
    service_insert(limits, 10, "A")
    service_insert(limits, 10, "B")
    assert sorted(claim(limits, 10, concurrency=2)) == ["A", "A", "B", "B"]
    assert claim(limits, 10, concurrency=2) == []
    sql(limits, "insert into public.agent_tenant_limits (tenant, max_processing) "
                "values ('B', 5)")
    assert claim(limits, 10, concurrency=2) == ["B", "B", "B"]
    sql(limits, "update public.agent_task_requests set status = 'completed', "
                "finished_at = now(), lease_expires_at = null "
                "where id = (select id from public.agent_task_requests "
                "where tenant = 'A' and status = 'processing' limit 1)")
    assert claim(limits, 10, concurrency=2) == ["A"]


def test_claim_by_agent(limits: str) -> None:
    """p_agents: only those agents' rows, still in turns (null: any agent)."""
    with psycopg.connect(limits, autocommit=True) as conn:
        conn.execute("insert into public.agent_bridge_agents (name, queue) "
                     "values ('chat', 'agent_tasks.chat') on conflict do nothing")
    try:
        service_insert(limits, 5, "A")
        service_insert(limits, 2, "A", agent="chat")
        service_insert(limits, 1, "B", agent="chat")
        assert claim(limits, 10, agents=["chat"]) == ["A", "B", "A"]
        assert claim(limits, 10, agents=["nobody"]) == []
        assert len(claim(limits, 10)) == 5
    finally:
        sql(limits, "delete from public.agent_bridge_agents where name = 'chat'")


def test_tenant_without_rows_comes_back(limits: str) -> None:
    """A tenant whose rows are all claimed stops being visited, and a new row (insert,
    release, rescue or requeue) brings it back."""
    [task] = service_insert(limits, 1, "A")
    assert claim(limits, 5) == ["A"]
    assert claim(limits, 5) == []
    assert sql(limits, "select active from public.agent_task_tenants "
                       "where tenant = 'A'") == [(False,)]
    sql(limits, "select * from public.agent_task_release(%s, 1)", [task])
    assert claim(limits, 5) == ["A"]
    service_insert(limits, 1, "A")
    assert claim(limits, 5) == ["A"]


def test_future_rows_wait_their_time(limits: str) -> None:
    service_insert(limits, 2, "A", run_at=datetime.now(UTC) + timedelta(hours=1))
    service_insert(limits, 1, "B")
    assert claim(limits, 5) == ["B"]
    assert claim(limits, 5) == []
    sql(limits, "update public.agent_task_requests set run_at = now() where tenant = 'A'")
    assert claim(limits, 5) == ["A", "A"]


def test_service_rows_share_one_tenant(limits: str) -> None:
    service_insert(limits, 1, None)
    [(tenant, user)] = sql(limits, "select tenant, user_id from public.agent_task_requests")
    assert (tenant, user) == ("shared", None)


# The upgrade ----------------------------------------------------------------------------

def test_upgrade_keeps_rows_and_serves_pending_ones(fresh_db: str, tmp_path: Path) -> None:
    """From today's schema (the first migration only) with rows in every state, users'
    and services', the migrations keep every row, give each its tenant, and the fair
    claim serves the pending ones."""
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(MIGRATIONS_DIR / "20261124000000_agent_task_requests.sql", first)
    migrate(fresh_db, first)
    alice = new_user()
    before = sql(fresh_db, """
        insert into public.agent_task_requests (status, request_payload, user_id,
                                                enterprise_id, priority, finished_at)
        values ('pending', '{"prompt": "a"}', %(alice)s, null, 0, null),
               ('pending', '{"prompt": "b"}', null, 'acme', 5, null),
               ('pending', '{"prompt": "c"}', null, null, 0, null),
               ('processing', '{"prompt": "d"}', %(alice)s, null, 0, null),
               ('completed', '{"prompt": "e"}', null, 'acme', 0, now()),
               ('failed', '{"prompt": "f"}', %(alice)s, null, 0, now())
        returning id::text, status""", {"alice": alice})
    migrate(fresh_db)
    after = dict(sql(fresh_db, "select id::text, status from public.agent_task_requests"))
    assert after == dict(before)
    tenants = dict(sql(fresh_db, "select request_payload ->> 'prompt', tenant "
                                 "from public.agent_task_requests"))
    assert tenants == {"a": alice, "b": "acme", "c": "shared", "d": alice, "e": "acme",
                       "f": alice}
    claimed = sql(fresh_db, "select t.request_payload ->> 'prompt' "
                            "from public.agent_tasks_claim(10, 30) c "
                            "join public.agent_task_requests t on t.id = c.id")
    # One turn each; the tenants with work arrive in the order of their best row
    # (priority, then age: a and c were inserted at the same instant).
    assert claimed[0] == ("b",) and sorted(claimed[1:]) == [("a",), ("c",)]


@pytest.mark.parametrize("was_active", [True, False])
def test_an_insert_in_flight_keeps_its_tenant(limits: str, was_active: bool) -> None:
    """The claim stops visiting a tenant with no pending rows; a row being inserted for it
    at that moment (not yet committed, so invisible to the claim) must not be stranded:
    the insert holds its tenant, and the claim leaves a held tenant active."""
    service_insert(limits, 1, "X")
    assert claim(limits, 5) == ["X"]
    if not was_active:
        assert claim(limits, 5) == []  # sees X empty: X inactive
    assert sql(limits, "select active from public.agent_task_tenants where tenant = 'X'") \
        == [(was_active,)]
    with psycopg.connect(limits) as inserting:
        inserting.execute("insert into public.agent_task_requests (request_payload, "
                          "enterprise_id) values ('{}', 'X')")
        assert claim(limits, 5) == []  # the row is not committed yet
        inserting.commit()
    assert claim(limits, 5) == ["X"]
