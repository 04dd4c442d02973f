"""Signed-in users of the PostgREST stand-in: their tokens and a client acting as each."""

from __future__ import annotations

import uuid

import httpx

from supabase import Client, ClientOptions, create_client
from tests.db import as_role
from tests.fakes.jwt import role_key, user_token

ALICE = str(uuid.uuid4())


def submit(db_url: str, user: str, columns: str = "request_payload",
           values: str = "'{\"prompt\": \"hi\"}'") -> tuple[str, str]:
    with as_role(db_url, "authenticated", user) as conn:
        row = conn.execute(f"insert into public.agent_task_requests ({columns}) "
                           f"values ({values}) returning id::text, user_id::text").fetchone()
    assert row is not None
    return row[0], row[1]


def client(url: str, key: str) -> Client:
    """supabase-py set up as the bridge sets it up (HTTP/1.1, no session)."""
    return create_client(url, key, options=ClientOptions(
        httpx_client=httpx.Client(timeout=10), auto_refresh_token=False, persist_session=False))



def user_client(url: str, user: str | None) -> Client:
    """supabase-py as a frontend holds it: the anon key, and a signed-in user's token."""
    client = create_client(url, role_key("anon"), options=ClientOptions(
        httpx_client=httpx.Client(timeout=10), auto_refresh_token=False,
        persist_session=False))
    if user is not None:
        client.postgrest.auth(user_token(user))
    return client
