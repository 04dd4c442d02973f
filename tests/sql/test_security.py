"""Row-level security and grants, seen from Supabase's API roles: a signed-in user may
submit and read their own requests and nothing else; only the service role (the
bridge and workers) may drive the state machine. The same rules through the gateway
and PostgREST stand-ins, as supabase-js sends them: tests/acceptance/test_security_gateway.py."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest
from postgrest.exceptions import APIError
from psycopg import errors

from tests.db import as_role
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub
from tests.users import ALICE, client, submit

BOB = str(uuid.uuid4())
ANON_KEY = "test-anon-key"


# What a signed-in user may call (its own checks decide on which rows; tests/*/test_cancel.py).
USER_FUNCTIONS = ("cancel_agent_task", "answer_agent_task", "agent_tenant_budget")


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
], ids=["completed", "processing", "another_owner", "an_answer", "attempts"])  # (BOB is random)
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
