"""The Supabase stand-ins themselves: with real processes (a bridge, workers, the stand-ins).
The SQL side is tests/sql/test_standins.py."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from websockets.exceptions import InvalidStatus

from tests.fakes.gateway import StandIns
from tests.fakes.jwt import user_token
from tests.sockets import realtime_socket, receive


def rest(s: StandIns, method: str, path: str, *, apikey: str | None, token: str | None = None,
         **kwargs: Any) -> httpx.Response:
    headers = {"Prefer": "return=representation"}
    if apikey:
        headers["apikey"] = apikey
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, f"{s.url}/rest/v1/{path}", headers=headers, timeout=10,
                         **kwargs)


def test_keys_and_tokens_are_checked(standins: StandIns) -> None:
    missing = rest(standins, "GET", "agent_task_requests", apikey=None)
    assert missing.status_code == 401
    assert missing.json()["message"] == "No API key found in request"
    assert rest(standins, "GET", "agent_task_requests", apikey="nope").status_code == 401
    expired = rest(standins, "GET", "agent_task_requests", apikey=standins.anon_key,
                   token=user_token(str(uuid.uuid4()), ttl=-10))
    assert (expired.status_code, expired.json()["code"]) == (401, "PGRST303")


def test_requests_run_as_the_tokens_user(standins: StandIns) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    made = rest(standins, "POST", "agent_task_requests", apikey=standins.anon_key,
                token=user_token(alice), json={"request_payload": {"prompt": "hi"}},
                params={"select": "id,user_id"})
    assert made.status_code == 201, made.text
    row = made.json()[0]
    assert row["user_id"] == alice  # auth.uid() from the token's claims
    query = {"id": f"eq.{row['id']}", "select": "id"}
    mine = rest(standins, "GET", "agent_task_requests", apikey=standins.anon_key,
                token=user_token(alice), params=query)
    theirs = rest(standins, "GET", "agent_task_requests", apikey=standins.anon_key,
                  token=user_token(bob), params=query)
    anon = rest(standins, "GET", "agent_task_requests", apikey=standins.anon_key, params=query)
    assert mine.json() == [{"id": row["id"]}]
    assert theirs.json() == []  # RLS: the real database's policy
    assert anon.status_code == 403  # anon has no grant at all






def test_realtime_protocol(standins: StandIns, clean_db: str) -> None:
    with pytest.raises(InvalidStatus):
        realtime_socket(standins, "not-a-key")
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    made = rest(standins, "POST", "agent_task_requests", apikey=standins.anon_key,
                token=user_token(alice), json={"request_payload": {"prompt": "hi"}},
                params={"select": "id"}).json()[0]
    binding = {"event": "UPDATE", "schema": "public", "table": "agent_task_requests",
               "filter": f"id=eq.{made['id']}"}
    sockets = {}
    for user in (alice, bob):
        ws = realtime_socket(standins, standins.anon_key)
        ws.send(json.dumps(["1", "1", "realtime:t", "phx_join",
                            {"config": {"postgres_changes": [binding]},
                             "access_token": user_token(user)}]))
        reply = receive(ws, "phx_reply")
        assert reply[4]["status"] == "ok"
        assert reply[4]["response"]["postgres_changes"][0]["id"]  # the subscription id
        assert receive(ws, "system")[4]["message"] == "Subscribed to PostgreSQL"
        ws.send(json.dumps([None, "2", "phoenix", "heartbeat", {}]))
        assert receive(ws, "phx_reply")[4]["status"] == "ok"
        sockets[user] = ws
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("update public.agent_task_requests set priority = 5 where id = %s",
                     [made["id"]])
    change = receive(sockets[alice], "postgres_changes")
    assert change[0] is None and change[1] is None  # pushed, not a reply
    data = change[4]["data"]
    assert data["type"] == "UPDATE" and data["record"]["priority"] == 5
    assert data["old_record"] == {}  # the replica identity: a private key, not the id
    assert {"name": "request_payload", "type": "jsonb"} in data["columns"]
    # Changes are dispatched one after another: once Alice has the next one, whatever Bob
    # was sent for the first is on his socket before his heartbeat's answer.
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("update public.agent_task_requests set priority = 6 where id = %s",
                     [made["id"]])
    assert receive(sockets[alice], "postgres_changes")[4]["data"]["record"]["priority"] == 6
    sockets[bob].send(json.dumps([None, "3", "phoenix", "heartbeat", {}]))
    assert json.loads(sockets[bob].recv(timeout=10))[3] == "phx_reply"
    for ws in sockets.values():
        ws.close()





