"""What a signed-in user can learn that is not theirs (issue 20, items 4 and 6).

As Supabase's roles, through the real database; Realtime events through the Realtime
stand-in (tests/fakes/realtime.py, which sends DELETEs as walrus' apply_rls does: the
replica identity columns the role may select, the primary key's only when RLS is on, to
every subscriber, RLS not applied); the worker's errors and logs through a real worker.

- A DELETE event (a streamed attempt's chunks going, retention deleting a row) carries
  nothing identifying: no task id, attempt or user, to anyone.
- The `worker` column (host:pid) and `agent_tenant_limits.note` are the operator's: users
  cannot select them, through SQL, PostgREST or Realtime (nor filter on them).
- A row's error message is classified (`provider unreachable`, ...) with no address or OS
  error in it; the worker's log keeps the detail.
- A prompt (or an error's text) cannot forge a log line.
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg import errors
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from tests.db import as_role, insert_task, sql
from tests.fakes.gateway import StandIns
from tests.fakes.jwt import user_token
from tests.stack import Stack
from tests.visibility_handlers import INTERNAL

TASKS, CHUNKS = "agent_task_requests", "agent_task_chunks"




def start(db_url: str, task_id: str, worker: str = "w1") -> None:
    """The row as a worker holds it (attempt 1), as tests/test_stream.py sets it up."""
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


def test_every_published_table_deletes_anonymously(clean_db: str) -> None:
    """The rule for every table users can subscribe to (today's and any added later): what
    apply_rls puts in a DELETE's old_record for `anon` and `authenticated` (the replica
    identity's columns the role may select; with RLS on, only primary key columns) is empty."""
    leaks = sql(clean_db, """
        select r.role, c.relname, a.attname
          from pg_publication_tables p
          join pg_class c on c.oid = format('%I.%I', p.schemaname, p.tablename)::regclass
          join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
          left join pg_index pk on pk.indrelid = c.oid and pk.indisprimary
          left join pg_index ri on ri.indrelid = c.oid and ri.indisreplident
          cross join (values ('anon'), ('authenticated')) r(role)
         where p.pubname = 'supabase_realtime'
           and case c.relreplident
                   when 'f' then true
                   when 'd' then coalesce(a.attnum = any (pk.indkey::int2[]), false)
                   when 'i' then coalesce(a.attnum = any (ri.indkey::int2[]), false)
                   else false end
           and has_column_privilege(r.role, c.oid, a.attnum, 'SELECT')
           and (not c.relrowsecurity or coalesce(a.attnum = any (pk.indkey::int2[]), false))
         order by 1, 2, 3""")
    published = {t for (t,) in sql(clean_db, "select tablename from pg_publication_tables "
                                             "where pubname = 'supabase_realtime'")}
    assert {TASKS, CHUNKS} <= published
    assert leaks == []


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


def test_users_never_see_the_operators_note(clean_db: str) -> None:
    """Before: every user read the '*' row's note (the operator's words about limits)."""
    with as_role(clean_db, "authenticated", str(uuid.uuid4())) as conn:
        with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
            conn.execute("select note from public.agent_tenant_limits")
        rows = conn.execute("select tenant, max_active, min_priority, max_priority, "
                            "run_at_horizon, max_processing from public.agent_tenant_limits"
                            ).fetchall()
    assert [r[0] for r in rows] == ["*"]  # the limits themselves stay readable


# --------------------------------------------------------------------------- errors and logs

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def leaky_stack(clean_db: str, clean_redis: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(clean_db, clean_redis, tmp_path, AGENT_HANDLER="tests.visibility_handlers:leaky",
              AGENT_MAX_RETRIES="0", OPENAI_API_KEY="sk-test-0123456789abcdef",
              OPENAI_MODEL="m", LOG_LEVEL="DEBUG")
    try:
        yield s
    finally:
        s.stop_all()


def test_error_messages_are_classified_for_users(leaky_stack: Stack) -> None:
    """Before: error.message was the exception's text: `could not reach the OpenAI-compatible
    API at http://127.0.0.1:PORT: [Errno 111] Connection refused`, a handler's URLs and IPs."""
    port = closed_port()
    leaky_stack.env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    leaky_stack.worker()
    leaky_stack.bridge()
    expected = {  # kind -> (error.type, error.message)
        "socket": ("ConnectionRefusedError", "provider unreachable"),
        "urlopen": ("URLError", "provider unreachable"),
        "timeout": ("TimeoutError", "provider timed out"),
        "wrapped": ("RuntimeError", "upstream <address> said no (reset by peer at <address>)"),
        "openai": ("RetryableError", "provider unreachable (gave up after 0 retries)"),
    }
    ids = {insert_task(leaky_stack.db_url, {"prompt": "hi", "context": {"kind": k, "port": port}}
                       ): k for k in expected}
    rows = {str(r["id"]): r for r in leaky_stack.wait_all_done()}
    for task_id, kind in ids.items():
        row = rows[task_id]
        assert row["status"] == "failed"
        assert (row["error"]["type"], row["error"]["message"]) == expected[kind], kind
        assert row["response_payload"] == {"error": expected[kind][1]}
        assert not re.search(r"127\.0\.0\.1|10\.20\.30\.40|Errno", row["error"]["message"])
    # The operator's log keeps what happened, and where.
    logs = leaky_stack.logs()
    assert f"127.0.0.1:{port}" in logs and "Connection refused" in logs
    assert f"http://{INTERNAL}/v1/chat said no" in logs


def test_a_prompt_cannot_forge_log_lines(clean_db: str, clean_redis: str, tmp_path: Path
                                         ) -> None:
    """Before: the prompt was logged verbatim at DEBUG (and an error's text at WARNING), so a
    newline in it started a line of the user's choosing."""
    forged = "❌ Task 00000000-0000-0000-0000-000000000000 failed: Forged: by a user"
    stack = Stack(clean_db, clean_redis, tmp_path, LOG_LEVEL="DEBUG")
    try:
        stack.worker()
        stack.bridge()
        insert_task(clean_db, {"prompt": f"hi\n{forged}\r\x1b[2K\u2028"})
        insert_task(clean_db, {"prompt": "p", "context": {"raise": f"boom\n{forged}"}})
        stack.wait_all_done()
        logs = stack.logs()
    finally:
        stack.stop_all()
    assert "User asking: hi\\n❌ Task 00000000" in logs  # logged, escaped, on its own line
    assert "failed: ValueError: boom\\n❌ Task 00000000" in logs
    assert not [line for line in logs.splitlines() if line.startswith(forged[:12])]
    assert "\x1b" not in logs and "\u2028" not in logs and "\r" not in logs
