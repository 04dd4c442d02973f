"""Row-level security through the gateway and PostgREST stand-ins, as supabase-js sends
requests: the anon key in `apikey` (the gateway requires it) and the user's signed JWT
(`sub`) as the bearer token. The rules themselves, as the API roles in SQL:
tests/sql/test_security.py."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest
from postgrest.exceptions import APIError

from supabase import Client
from tests.fakes.gateway import StandIns
from tests.fakes.jwt import user_token
from tests.users import ALICE, client

BOB = str(uuid.uuid4())


def as_user(standins: StandIns, user: str | None) -> Client:
    """supabase-py as a signed-in user's frontend: the anon key, then the user's token."""
    c = client(standins.url, standins.anon_key)
    if user is not None:
        c.postgrest.auth(user_token(user))
    return c


def test_user_rls_through_postgrest_with_a_signed_jwt(standins: StandIns, clean_db: str) -> None:
    """Alice's token inserts her own pending row (user_id from `sub`) and reads it; Bob's
    token sees none of it; neither may insert a row as processing, completed, answered,
    or owned by someone else."""
    alice, bob = as_user(standins, ALICE), as_user(standins, BOB)
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


def test_the_gateway_requires_the_apikey_header(standins: StandIns) -> None:
    """Without `apikey` the gateway refuses even a valid user token: 401, before PostgREST."""
    token = user_token(ALICE)
    no_key = httpx.get(f"{standins.url}/rest/v1/agent_task_requests",
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert no_key.status_code == 401
    assert no_key.json()["message"] == "No API key found in request"
    with_key = httpx.get(f"{standins.url}/rest/v1/agent_task_requests?select=id",
                         headers={"apikey": standins.anon_key, "Authorization": f"Bearer {token}"},
                         timeout=10)
    assert with_key.status_code == 200 and with_key.json() == []
