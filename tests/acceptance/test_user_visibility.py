"""What a signed-in user can learn that is not theirs (issue 20, items 4 and 6): with real
processes (a bridge, workers, the stand-ins). The SQL side is
tests/sql/test_user_visibility.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from psycopg import errors
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from tests.db import as_role, insert_task, sql
from tests.fakes.gateway import StandIns
from tests.fakes.jwt import user_token

TASKS, CHUNKS = "agent_task_requests", "agent_task_chunks"




def start(db_url: str, task_id: str, worker: str = "w1") -> None:
    """The row as a worker holds it (attempt 1), as tests/sql/test_stream.py sets it up."""
    sql(db_url, "update public.agent_task_requests set status = 'processing', attempts = 1, "
                "worker = %s, lease_expires_at = now() + interval '1 minute' where id = %s",
        [worker, task_id])


# --------------------------------------------------------------------------- Realtime

def subscribe(s: StandIns, user: str, bindings: list[dict[str, Any]]) -> Connection:
    """A signed-in user's channel with these postgres_changes bindings, once it is live."""
    url = s.url.replace("http://", "ws://") + f"/realtime/v1/websocket?apikey={s.anon_key}" \
        "&vsn=2.0.0"
    ws = connect(url, open_timeout=10)
    ws.send(json.dumps(["1", "1", "realtime:mine", "phx_join", {
        "config": {"postgres_changes": bindings}, "access_token": user_token(user)}]))
    reply = next_message(ws, "phx_reply")
    assert reply["status"] == "ok", reply
    system = next_message(ws, "system")
    assert system["status"] == "ok", system
    return ws


def next_message(ws: Connection, event: str) -> Any:
    while True:
        msg = json.loads(ws.recv(timeout=10))
        if msg[3] == event:
            return msg[4]


def events_until(ws: Connection, last: Callable[[dict[str, Any]], bool]
                 ) -> list[dict[str, Any]]:
    """Every change sent to this socket up to and including the first for which `last`
    holds (the stand-in delivers changes in commit order, so a later change is a barrier)."""
    seen: list[dict[str, Any]] = []
    while True:
        data = next_message(ws, "postgres_changes")["data"]
        seen.append(data)
        if last(data):
            return seen


def test_delete_events_tell_other_users_nothing(standins: StandIns, clean_db: str) -> None:
    """Before: Realtime sends every DELETE to every subscriber (no RLS for deletes) with the
    primary key, so a user subscribed to agent_task_chunks without a filter saw every
    user's task ids, attempts and chunk counts each time an attempt ended (and each
    task id retention deleted)."""
    alice, mallory = str(uuid.uuid4()), str(uuid.uuid4())
    own = insert_task(clean_db, user_id=mallory)
    ws = subscribe(standins, mallory, [
        {"event": "*", "schema": "public", "table": CHUNKS},
        {"event": "*", "schema": "public", "table": TASKS}])
    theirs = insert_task(clean_db, user_id=alice)
    start(clean_db, theirs)
    for seq, (offset, text) in enumerate([(0, "Hel"), (3, "lo")]):
        sql(clean_db, "select * from public.agent_task_append(%s, 1, 'w1', %s, %s, %s)",
            [theirs, seq, offset, text])
    sql(clean_db, "select * from public.agent_task_complete(%s, 1, 'w1', %s)",
        [theirs, json.dumps({"answer": "Hello"})])  # the attempt's chunks are deleted
    sql(clean_db, "delete from public.agent_task_requests where id = %s", [theirs])  # retention
    sql(clean_db, "update public.agent_task_requests set priority = 1 where id = %s", [own])
    seen = events_until(ws, lambda d: d["type"] == "UPDATE" and d["record"]["id"] == own)
    ws.close()

    deletes = [d for d in seen if d["type"] == "DELETE"]
    # Realtime does send them (it cannot check a deleted row against RLS)...
    assert sorted(d["table"] for d in deletes) == [CHUNKS, CHUNKS, TASKS]
    # ...but with nothing in them: no id, no attempt, no sequence number, no user.
    assert all(d["old_record"] == {} for d in deletes), deletes
    text = json.dumps(seen)
    assert theirs not in text and alice not in text
    assert not any(d["type"] in ("INSERT", "UPDATE") and d["table"] == CHUNKS for d in seen)




# --------------------------------------------------------------------------- private columns

def rest(s: StandIns, method: str, user: str, params: dict[str, str], *,
         prefer: str = "return=representation", **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{s.url}/rest/v1/{TASKS}", params=params, timeout=10,
                         headers={"apikey": s.anon_key, "Prefer": prefer,
                                  "Authorization": f"Bearer {user_token(user)}"}, **kwargs)


def test_users_never_see_the_worker(standins: StandIns, clean_db: str) -> None:
    """Before: a user read `worker` (host:pid of the machine running their task) with a
    select, in every Realtime UPDATE of their row, and could filter a subscription on it."""
    alice = str(uuid.uuid4())
    task = insert_task(clean_db, user_id=alice)
    ws = subscribe(standins, alice, [
        {"event": "UPDATE", "schema": "public", "table": TASKS, "filter": f"id=eq.{task}"},
        {"event": "INSERT", "schema": "public", "table": CHUNKS, "filter": f"task_id=eq.{task}"}])
    start(clean_db, task, worker="gpu-host-7:4242:cafe")
    sql(clean_db, "select * from public.agent_task_append(%s, 1, 'gpu-host-7:4242:cafe', 0, 0, "
                  "'Hi')", [task])
    seen = events_until(ws, lambda d: d["table"] == CHUNKS)
    ws.close()
    update, chunk = seen[0], seen[-1]
    assert update["record"]["status"] == "processing" and "worker" not in update["record"]
    assert "gpu-host-7" not in json.dumps(seen)
    assert chunk["record"]["text"] == "Hi"  # the owner still follows the stream
    assert not {"worker", "replica_key"} & {c["name"] for d in seen for c in d["columns"]}

    with as_role(clean_db, "authenticated", alice) as conn:
        for column in ("worker", "replica_key"):
            with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
                conn.execute(f"select {column} from public.{TASKS}")
        with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
            conn.execute(f"select * from public.{TASKS}")  # * names every column
        assert conn.execute(f"select id::text, status from public.{TASKS}").fetchall() == [
            (task, "processing")]
    with as_role(clean_db, "authenticated", alice) as conn, \
            pytest.raises(errors.InsufficientPrivilege):
        conn.execute(f"select replica_key from public.{CHUNKS}")

    # PostgREST: select=* is refused (42501) as the real one refuses it; named columns work.
    star = rest(standins, "GET", alice, {"select": "*", "id": f"eq.{task}"})
    assert (star.status_code, star.json()["code"]) == (403, "42501"), star.text
    named = rest(standins, "GET", alice, {"select": "id,status", "id": f"eq.{task}"})
    assert named.json() == [{"id": task, "status": "processing"}]
    body = {"request_payload": {"prompt": "hi"}}
    assert rest(standins, "POST", alice, {"select": "*"}, json=body).status_code == 403
    made = rest(standins, "POST", alice, {"select": "id,status"}, json=body)
    assert made.status_code == 201 and set(made.json()[0]) == {"id", "status"}
    assert rest(standins, "POST", alice, {}, prefer="return=minimal", json=body
                ).status_code == 201

    # A filter on it is refused when the subscription is created, as Realtime refuses it.
    url = standins.url.replace("http://", "ws://") + \
        f"/realtime/v1/websocket?apikey={standins.anon_key}&vsn=2.0.0"
    with connect(url, open_timeout=10) as probe:
        probe.send(json.dumps(["1", "1", "realtime:probe", "phx_join", {"config": {
            "postgres_changes": [{"event": "*", "schema": "public", "table": TASKS,
                                  "filter": "worker=eq.gpu-host-7:4242:cafe"}]},
            "access_token": user_token(alice)}]))
        assert next_message(probe, "phx_reply")["status"] == "ok"
        refused = next_message(probe, "system")
    assert refused["status"] == "error"
    assert "invalid column for filter worker" in refused["message"]











