"""Row-level security and grants, seen from Supabase's API roles: a signed-in user may
submit and read their own requests and nothing else; only the service role (the
bridge and workers) may drive the state machine."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from postgrest.exceptions import APIError
from psycopg import errors

from supabase import Client
from tests.db import as_role
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub
from tests.users import ALICE, client, submit

BOB = str(uuid.uuid4())
ANON_KEY = "test-anon-key"






# What a signed-in user may call (its own checks decide on which rows; tests/*/test_cancel.py).
USER_FUNCTIONS = ("cancel_agent_task",)


def state_functions(db_url: str) -> list[str]:
    """A call of every state function (every public function but USER_FUNCTIONS) with
    null arguments of the right types."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select format('select * from public.%I(%s)', p.proname, coalesce(string_agg("
            "format('null::%s', format_type(t.oid, null)), ', ' order by a.n) filter ("
            "where a.typ is not null), '')) "
            "from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
            "left join unnest(p.proargtypes::oid[]) with ordinality a(typ, n) on true "
            "left join pg_type t on t.oid = a.typ "
            "where n.nspname = 'public' and p.prorettype <> 'trigger'::regtype "
            f"and p.proname not in ({', '.join(map(repr, USER_FUNCTIONS))}) "
            "group by p.oid, p.proname order by 1").fetchall()
    return [r[0] for r in rows]


def test_user_inserts_own_pending_row(clean_db: str) -> None:
    """user_id defaults to the caller, so the guide's frontend insert works unchanged."""
    task_id, owner = submit(clean_db, ALICE)
    assert owner == ALICE
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("select status, user_id::text from public.agent_task_requests "
                            "where id = %s", [task_id]).fetchone() == ("pending", ALICE)


@pytest.mark.parametrize(("columns", "values"), [
    ("status, request_payload", "'completed', '{}'"),
    # 'processing' passes the constraints 'completed' trips first, so only RLS and the
    # grants stop it: a user must not hand a row straight to the workers.
    ("status, request_payload", "'processing', '{\"prompt\": \"hi\"}'"),
    ("request_payload, user_id", f"'{{}}', '{BOB}'"),
    ("request_payload, response_payload", "'{}', '{\"answer\": \"forged\"}'"),
    ("request_payload, attempts", "'{}', 99"),
])
def test_user_cannot_insert_forged_rows(clean_db: str, columns: str, values: str) -> None:
    """Users may only ask: no finished rows, answers, other owners or bookkeeping."""
    with pytest.raises(errors.InsufficientPrivilege):
        submit(clean_db, ALICE, columns, values)


def test_users_see_only_their_own_rows(clean_db: str) -> None:
    """Prompts and answers are private to the user who asked."""
    alice_task, _ = submit(clean_db, ALICE)
    bob_task, _ = submit(clean_db, BOB)
    with as_role(clean_db, "authenticated", BOB) as conn:
        seen = conn.execute("select id::text from public.agent_task_requests").fetchall()
    assert seen == [(bob_task,)]
    with as_role(clean_db, "authenticated", ALICE) as conn:
        assert conn.execute("select count(*) from public.agent_task_requests where id = %s",
                            [bob_task]).fetchone() == (0,)
    assert alice_task != bob_task


@pytest.mark.parametrize("statement", [
    "update public.agent_task_requests set status = 'completed'",
    "update public.agent_task_requests set request_payload = '{\"prompt\": \"changed\"}'",
    "delete from public.agent_task_requests",
])
def test_user_cannot_change_or_delete_even_own_rows(clean_db: str, statement: str) -> None:
    """Only the state functions (service role) move a row on."""
    submit(clean_db, ALICE)
    with pytest.raises(errors.InsufficientPrivilege), \
            as_role(clean_db, "authenticated", ALICE) as conn:
        conn.execute(statement)


@pytest.mark.parametrize("statement", [
    "select * from public.agent_task_requests",
    "insert into public.agent_task_requests (request_payload) values ('{}')",
])
def test_anon_has_no_access(clean_db: str, statement: str) -> None:
    """The anon key ships in every frontend: it must not read or create tasks."""
    submit(clean_db, ALICE)
    with pytest.raises(errors.InsufficientPrivilege), as_role(clean_db, "anon") as conn:
        conn.execute(statement)


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_cannot_run_state_functions(clean_db: str, role: str) -> None:
    """Otherwise any signed-in user could claim, complete or requeue anyone's work."""
    calls = state_functions(clean_db)
    assert len(calls) >= 13
    for call in calls:
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied for function"), \
                as_role(clean_db, role, ALICE) as conn:
            conn.execute(call)


def test_service_role_runs_state_functions(clean_db: str) -> None:
    """The bridge's key can call everything, and sees every user's rows."""
    submit(clean_db, ALICE)
    submit(clean_db, BOB)
    with as_role(clean_db, "service_role") as conn:
        for call in state_functions(clean_db):
            conn.execute(call)
        claimed = conn.execute("select * from public.agent_tasks_claim(10, 30)").fetchall()
    assert len(claimed) == 2


def test_anon_key_through_postgrest_is_refused(clean_db: str) -> None:
    """What a leaked anon key gets from the real client: 42501, and no rows."""
    submit(clean_db, ALICE)
    stub = PostgrestStub(clean_db, service_key=SERVICE_KEY, anon_key=ANON_KEY)
    url = stub.start()
    try:
        anon = client(url, ANON_KEY)
        with pytest.raises(APIError) as info:
            anon.rpc("agent_tasks_claim", {"p_limit": 10, "p_lease_seconds": 30}).execute()
        assert info.value.code == "42501"
        with pytest.raises(APIError) as info:
            anon.table("agent_task_requests").select("*").execute()
        assert info.value.code == "42501"
        raw = httpx.post(f"{url}/rest/v1/rpc/agent_tasks_stats", json={},
                         headers={"apikey": ANON_KEY, "Authorization": f"Bearer {ANON_KEY}"})
        assert (raw.status_code, raw.json()["code"]) == (403, "42501")
        no_key = httpx.post(f"{url}/rest/v1/rpc/agent_tasks_stats", json={})
        assert no_key.status_code == 401
        service = client(url, SERVICE_KEY)
        stats = service.rpc("agent_tasks_stats", {}).execute().data
        assert isinstance(stats, list) and stats[0] == {
            "pending": 1, "due": 1, "processing": 0, "completed": 0, "failed": 0,
            "expired_leases": 0, "oldest_due_seconds": stats[0]["oldest_due_seconds"]}
    finally:
        stub.stop()


# The same rules through the PostgREST stand-in, as supabase-js sends them: the anon key in
# `apikey` (the gateway requires it) and the user's signed JWT (`sub`) as the bearer token.

@pytest.fixture
def gateway(clean_db: str) -> Iterator[Any]:
    from tests.fakes.gateway import StandIns

    standins = StandIns(clean_db)
    standins.start()
    try:
        yield standins
    finally:
        standins.stop()


def as_user(gateway: Any, user: str | None) -> Client:
    """supabase-py as a signed-in user's frontend: the anon key, then the user's token."""
    from tests.fakes.jwt import user_token

    c = client(gateway.url, gateway.anon_key)
    if user is not None:
        c.postgrest.auth(user_token(user))
    return c


def test_user_rls_through_postgrest_with_a_signed_jwt(gateway: Any, clean_db: str) -> None:
    """Alice's token inserts her own pending row (user_id from `sub`) and reads it; Bob's
    token sees none of it; neither may insert a row as processing, completed, answered,
    or owned by someone else."""
    alice, bob = as_user(gateway, ALICE), as_user(gateway, BOB)
    table = "agent_task_requests"
    inserted = alice.table(table).insert({"status": "pending",
                                          "request_payload": {"prompt": "hi"}}
                                         ).select("id,user_id,status").execute().data
    assert isinstance(inserted, list) and len(inserted) == 1
    row: dict[str, Any] = dict(inserted[0])  # type: ignore[arg-type]
    assert row["user_id"] == ALICE and row["status"] == "pending"
    mine = alice.table(table).select("id,user_id").execute().data
    assert mine == [{"id": row["id"], "user_id": ALICE}]
    assert bob.table(table).select("id").eq("id", row["id"]).execute().data == []
    for forged in ({"status": "processing", "request_payload": {"prompt": "x"}},
                   {"status": "completed", "request_payload": {"prompt": "x"}},
                   {"request_payload": {"prompt": "x"}, "response_payload": {"answer": "f"}},
                   {"request_payload": {"prompt": "x"}, "user_id": BOB},
                   {"request_payload": {"prompt": "x"}, "attempts": 99}):
        with pytest.raises(APIError) as refused:
            alice.table(table).insert(forged).execute()
        assert refused.value.code in ("42501", "23514"), (forged, refused.value)
    with psycopg.connect(clean_db) as conn:
        rows = conn.execute("select user_id::text, status from public.agent_task_requests"
                            ).fetchall()
    assert rows == [(ALICE, "pending")]
    with pytest.raises(APIError) as refused:  # and the state machine stays the service's
        alice.rpc("agent_tasks_claim", {"p_limit": 10, "p_lease_seconds": 30}).execute()
    assert refused.value.code == "42501"


def test_the_gateway_requires_the_apikey_header(gateway: Any) -> None:
    """Without `apikey` the gateway refuses even a valid user token: 401, before PostgREST."""
    from tests.fakes.jwt import user_token

    token = user_token(ALICE)
    no_key = httpx.get(f"{gateway.url}/rest/v1/agent_task_requests",
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert no_key.status_code == 401
    assert no_key.json()["message"] == "No API key found in request"
    with_key = httpx.get(f"{gateway.url}/rest/v1/agent_task_requests?select=id",
                         headers={"apikey": gateway.anon_key, "Authorization": f"Bearer {token}"},
                         timeout=10)
    assert with_key.status_code == 200 and with_key.json() == []

