"""The Supabase stand-ins themselves: the gateway's and PostgREST's key and JWT checks, RLS
as the token's user, and the Realtime socket's protocol (join reply with subscription ids,
"Subscribed to PostgreSQL", a change authorised per subscriber, heartbeats, bad keys)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.fakes.gateway import StandIns
from tests.fakes.jwt import user_token
from tests.sockets import realtime_socket, receive

# DELETE events, as walrus' apply_rls sends them -------------------------------------------

@pytest.fixture
def probe(clean_db: str) -> Iterator[str]:
    """A published table of the test's own, made before the stand-ins start (they hook the
    publication's tables when they start): the owner's rows, with a column users may not
    select."""
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("""
            create table public.standin_probe (
                id integer primary key, owner uuid not null, shown text, secret text);
            alter table public.standin_probe enable row level security;
            create policy own on public.standin_probe for select to authenticated
                using (owner = (select auth.uid()));
            grant select (id, owner, shown) on public.standin_probe to authenticated;
            alter publication supabase_realtime add table public.standin_probe;
        """)
    try:
        yield clean_db
    finally:
        with psycopg.connect(clean_db, autocommit=True) as conn:
            conn.execute("drop table public.standin_probe")


@pytest.mark.parametrize(("identity", "rls", "old_record", "by_shown"), [
    # the primary key, as every DELETE carries it by default
    ("default", True, {"id": 1}, False),
    # FULL sends every column, but with RLS on apply_rls keeps only the primary key's
    ("full", True, {"id": 1}, True),
    # with RLS off, every identity column the role may select (not `secret`)
    ("full", False, {"id": 1, "owner": "OWNER", "shown": "x"}, True),
])
def test_realtime_deletes(probe: str, identity: str, rls: bool, old_record: dict[str, Any],
                          by_shown: bool) -> None:
    """A DELETE goes to every subscriber, RLS not applied; old_record is the replica
    identity's selectable columns (the primary key's only with RLS on); a filter matches a
    DELETE only on an identity column. A filter on a column the role may not select is
    refused when the subscription is made."""
    owner, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(probe, autocommit=True) as conn:
        conn.execute(f"alter table public.standin_probe replica identity {identity}")
        if not rls:
            conn.execute("alter table public.standin_probe disable row level security")
    s = StandIns(probe)
    s.start()
    try:
        ws = realtime_socket(s, s.anon_key)
        table = {"schema": "public", "table": "standin_probe"}
        bindings = [{"event": "*", **table}, {"event": "*", **table, "filter": "id=eq.1"},
                    {"event": "*", **table, "filter": "shown=eq.x"}]
        ws.send(json.dumps(["1", "1", "realtime:probe", "phx_join", {
            "config": {"postgres_changes": bindings}, "access_token": user_token(stranger)}]))
        every, by_id, by_shown_id = (
            b["id"] for b in receive(ws, "phx_reply")[4]["response"]["postgres_changes"])
        assert receive(ws, "system")[4]["status"] == "ok"
        with psycopg.connect(probe, autocommit=True) as conn:
            conn.execute("insert into public.standin_probe values (1, %s, 'x', 's')", [owner])
            conn.execute("delete from public.standin_probe where id = 1")
            # The stranger's own row: sent after the others, in commit order.
            conn.execute("insert into public.standin_probe values (2, %s, 'x', 's')", [stranger])
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["data"].get("record", {}).get("id") != 2:
            seen.append(receive(ws, "postgres_changes")[4])
        kinds = [m["data"]["type"] for m in seen]
        assert kinds == (["DELETE", "INSERT"] if rls else ["INSERT", "DELETE", "INSERT"])
        deleted = seen[-2]
        assert deleted["data"]["old_record"] == {
            k: owner if v == "OWNER" else v for k, v in old_record.items()}
        assert sorted(deleted["ids"]) == sorted(
            [every, by_id] + ([by_shown_id] if by_shown else []))
        assert "secret" not in json.dumps(seen)
        ws.close()

        with realtime_socket(s, s.anon_key) as refused:
            refused.send(json.dumps(["1", "1", "realtime:secret", "phx_join", {"config": {
                "postgres_changes": [{"event": "*", **table, "filter": "secret=eq.s"}]},
                "access_token": user_token(stranger)}]))
            assert receive(refused, "phx_reply")[4]["status"] == "ok"
            error = receive(refused, "system")[4]
        assert error["status"] == "error"
        assert error["message"].endswith("invalid column for filter secret")
    finally:
        s.stop()
