"""A Supabase Realtime look-alike for tests: the Phoenix-channel wire protocol that
realtime-js (2.109, `vsn=2.0.0` arrays) and realtime-py (`vsn=1.0.0` objects) speak, and
`postgres_changes` fed by real changes of the test database.

It is a stand-in, written from the sources of supabase/realtime (RealtimeChannel, the
postgres_cdc_rls MessageDispatcher, walrus' apply_rls) and of realtime-js; the real server
has not been run against this code. What it does as Realtime does:

- The socket needs `apikey` (a JWT signed with the project secret) or the upgrade is
  refused with 403. `phoenix`/`heartbeat` is answered `ok`.
- `phx_join` on `realtime:<name>` with `config.postgres_changes` and `access_token`: the
  token must verify and carry `role` and `exp`; the reply is
  `{status: ok, response: {postgres_changes: [{...params, id}]}}`. The subscription becomes
  active a moment later (Realtime inserts it into realtime.subscription after replying),
  then a `system` message says "Subscribed to PostgreSQL". Changes committed before that
  moment are not delivered to this subscriber: the real server's race, kept on purpose.
- Each change is authorised per subscriber as walrus' `realtime.apply_rls` does: the record
  holds only the columns the subscriber's role may select (`has_column_privilege`); an
  INSERT/UPDATE whose primary key the role may not select is sent as `errors: ["Error 401:
  Unauthorized"]` without the row; with RLS on, an INSERT/UPDATE must be visible to that
  role with the subscriber's JWT claims (`set local role`, `request.jwt.claims`), checked
  on the real database. Payload: `{ids: [binding ids], data: {schema, table,
  commit_timestamp, type, columns, errors, record, old_record}}`, pushed with join_ref null
  (Phoenix's fastlane).
- `old_record` (UPDATE, DELETE) is what wal2json sends as the row's `identity`: the
  replica identity columns (the primary key by default; the index's columns for REPLICA
  IDENTITY USING INDEX; every column for FULL), keeping those the role may select; for a
  DELETE on a table with RLS on, only those that are also primary key columns (apply_rls:
  "if RLS enabled, we can't secure deletes so filter to pkey"); `{}` when none is left.
- A DELETE is NOT checked against RLS: every subscriber of the table whose filters pass
  gets it. Filters (`column=eq.value`, ...) are matched against the new row for
  INSERT/UPDATE and against the identity columns for a DELETE (is_visible_through_filters:
  a filter on a column the event does not carry does not match).
- A filter on a column the role may not select is refused when the subscription is
  created (realtime.subscription_check_filters: "invalid column for filter"): the join is
  answered ok, then a `system` message with status `error`, and nothing is delivered.
- `access_token` on a joined channel re-verifies and replaces the claims; an invalid
  token, or the token's `exp` passing, ends the channel with a `system` error and
  `phx_close`.

Changes come from the database through a trigger this stand-in installs (test fixture
only) on every table of the `supabase_realtime` publication: it logs the row image into
`realtime_stub.changes` and NOTIFYs the log id, so each event carries the row as it was
at that change, in commit order. Real Realtime reads the WAL instead.

Faults for recovery tests (methods, or GET /control/<name> on the same port):
`drop` (abort every socket), `delay_join?seconds=&count=`, `lose_events?count=`,
`fail_join?count=`, `stall?seconds=` (answer nothing, deliver nothing), `reset`, `stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.fakes.jwt import TEST_JWT_SECRET, InvalidToken, verify

NOTIFY_CHANNEL = "realtime_stub"

_INSTALL = """
create schema if not exists realtime_stub;
create table if not exists realtime_stub.changes (id bigserial primary key, change jsonb not null);
create or replace function realtime_stub.capture() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
    log_id bigint;
begin
    insert into realtime_stub.changes (change) values (jsonb_build_object(
        'schema', tg_table_schema, 'table', tg_table_name, 'type', tg_op,
        'commit_timestamp', to_char(clock_timestamp() at time zone 'utc',
                                    'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'record', case when tg_op <> 'DELETE' then to_jsonb(new) end,
        'old', case when tg_op <> 'INSERT' then to_jsonb(old) end))
    returning id into log_id;
    perform pg_notify('realtime_stub', log_id::text);
    return null;
end
$$;
"""
_PUBLISHED = ("select schemaname, tablename from pg_publication_tables "
              "where pubname = 'supabase_realtime'")
# Per column, as walrus sees it: name, pg_type.typname, primary key?, may the role select
# it?, RLS on the table?, in the replica identity? (wal2json's `pk` and `identity`: the
# primary key; the identity index's columns (REPLICA IDENTITY USING INDEX) or the primary
# key's (DEFAULT); every column for FULL; none for NOTHING).
_COLUMNS = """
select a.attname, t.typname, coalesce(a.attnum = any(pk.indkey::int2[]), false),
       has_column_privilege(%s, c.oid, a.attname, 'SELECT'), c.relrowsecurity,
       case c.relreplident
           when 'f' then true
           when 'd' then coalesce(a.attnum = any(pk.indkey::int2[]), false)
           when 'i' then coalesce(a.attnum = any(ri.indkey::int2[]), false)
           else false end
  from pg_attribute a join pg_class c on c.oid = a.attrelid
  join pg_namespace n on n.oid = c.relnamespace join pg_type t on t.oid = a.atttypid
  left join pg_index pk on pk.indrelid = c.oid and pk.indisprimary
  left join pg_index ri on ri.indrelid = c.oid and ri.indisreplident
 where n.nspname = %s and c.relname = %s and a.attnum > 0 and not a.attisdropped
 order by a.attnum
"""


def _binding_id(params: dict[str, Any]) -> int:
    """A stable integer per binding, as Realtime's :erlang.phash2(params)."""
    return zlib.crc32(json.dumps(params, sort_keys=True).encode()) & 0x7FFFFFF


class _Column(NamedTuple):
    name: str
    type: str
    pkey: bool
    selectable: bool  # by the subscriber's role
    rls: bool  # the table's row level security is on
    identity: bool  # in the replica identity (what wal2json sends of a deleted row)


@dataclass
class _Channel:
    topic: str
    join_ref: str | None
    token: str
    claims: dict[str, Any]
    bindings: list[dict[str, Any]]
    active: bool = False
    expiry: asyncio.TimerHandle | None = None

    @property
    def role(self) -> str:
        return str(self.claims.get("role", "anon"))


@dataclass(eq=False)
class _Socket:
    ws: ServerConnection
    vsn: str
    channels: dict[str, _Channel] = field(default_factory=dict)

    def encode(self, join_ref: str | None, ref: str | None, topic: str, event: str,
               payload: Any) -> str:
        if self.vsn.startswith("2"):
            return json.dumps([join_ref, ref, topic, event, payload], default=str)
        return json.dumps({"join_ref": join_ref, "ref": ref, "topic": topic, "event": event,
                           "payload": payload}, default=str)

    def decode(self, text: str | bytes) -> tuple[Any, Any, str, str, Any]:
        msg = json.loads(text)
        if isinstance(msg, list):
            join_ref, ref, topic, event, payload = msg
            return join_ref, ref, topic, event, payload
        return (msg.get("join_ref"), msg.get("ref"), msg["topic"], msg["event"],
                msg.get("payload"))

    async def push(self, join_ref: str | None, ref: str | None, topic: str, event: str,
                   payload: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(self.encode(join_ref, ref, topic, event, payload))


class RealtimeStub:
    def __init__(self, database_url: str, *, jwt_secret: str = TEST_JWT_SECRET,
                 subscribe_delay: float = 0.05) -> None:
        self.database_url = database_url
        self.jwt_secret = jwt_secret
        self.subscribe_delay = subscribe_delay
        self.sockets: set[_Socket] = set()
        self.counts = {"connections": 0, "joins": 0, "events": 0, "lost": 0, "dropped": 0,
                       "access_tokens": 0, "heartbeats": 0}
        self._delay_joins: list[float] = []
        self._fail_joins = 0
        self._lose_events = 0
        self._stalled_until = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self._pool: AsyncConnectionPool | None = None
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._columns: dict[tuple[str, str, str], list[_Column]] = {}
        self.port = 0

    # Life cycle -----------------------------------------------------------------------
    def start(self) -> str:
        """Install the change trigger, serve; returns the http:// base URL of the server."""
        install(self.database_url)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._pool = AsyncConnectionPool(self.database_url, min_size=1, max_size=4, open=False,
                                         kwargs={"autocommit": True})
        await self._pool.open(wait=True)
        listener = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        await listener.execute(f"listen {NOTIFY_CHANNEL}")
        self._listener = listener
        self._tasks.append(asyncio.create_task(self._feed(listener)))
        self._server = await serve(self._serve, "127.0.0.1", 0,
                                   process_request=self._process_request,
                                   ping_interval=None)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    def stop(self) -> None:
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        uninstall(self.database_url)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for s in list(self.sockets):
                s.ws.transport.abort()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        if self._pool is not None:
            await self._pool.close()

    # Faults (callable from any thread) ------------------------------------------------
    def _call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def drop(self) -> int:
        """Abort every socket without a close frame, as a dead network or proxy does."""
        def go() -> int:
            n = len(self.sockets)
            for s in list(self.sockets):
                s.ws.transport.abort()
            self.counts["dropped"] += n
            return n
        return int(self._call(go))

    def delay_joins(self, seconds: float, count: int = 1) -> None:
        self._call(self._delay_joins.extend, [seconds] * count)

    def fail_joins(self, count: int = 1) -> None:
        def go() -> None:
            self._fail_joins += count
        self._call(go)

    def lose_events(self, count: int = 1) -> None:
        def go() -> None:
            self._lose_events += count
        self._call(go)

    def stall(self, seconds: float) -> None:
        def go() -> None:
            self._stalled_until = time.monotonic() + seconds
        self._call(go)

    def reset(self) -> None:
        """Clear every pending fault."""
        self._call(self._reset)

    def _reset(self) -> None:
        self._delay_joins.clear()
        self._fail_joins = self._lose_events = 0
        self._stalled_until = 0.0

    def stats(self) -> dict[str, Any]:
        return dict(self._call(self._stats))

    def _stats(self) -> dict[str, Any]:
        return {**self.counts, "open": len(self.sockets), "stalled": int(self._stalled()),
                "active_topics": sorted(c.topic for s in self.sockets
                                        for c in s.channels.values() if c.active)}

    def _stalled(self) -> bool:
        return time.monotonic() < self._stalled_until

    # HTTP: the upgrade check and the control endpoints ---------------------------------
    async def _process_request(self, conn: ServerConnection, request: Request
                               ) -> Response | None:
        url = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/control/"):
            return self._control(url.path.removeprefix("/control/"), query)
        if url.path.rstrip("/") not in ("/realtime/v1/websocket", "/websocket"):
            return _response(HTTPStatus.NOT_FOUND, {"message": "no Route matched"})
        try:
            verify(query.get("apikey") or request.headers.get("apikey", ""), self.jwt_secret)
        except InvalidToken as exc:
            return _response(HTTPStatus.FORBIDDEN, {"message": f"Invalid API key: {exc}"})
        return None

    def _control(self, name: str, query: dict[str, str]) -> Response:
        if name == "drop":
            n = len(self.sockets)
            for s in list(self.sockets):
                s.ws.transport.abort()
            self.counts["dropped"] += n
            return _response(HTTPStatus.OK, {"dropped": n})
        count = int(query.get("count", "1"))
        if name == "reset":
            self._reset()
        elif name == "delay_join":
            self._delay_joins.extend([float(query.get("seconds", "1"))] * count)
        elif name == "fail_join":
            self._fail_joins += count
        elif name == "lose_events":
            self._lose_events += count
        elif name == "stall":
            self._stalled_until = time.monotonic() + float(query.get("seconds", "1"))
        elif name != "stats":
            return _response(HTTPStatus.NOT_FOUND, {"message": f"unknown control {name}"})
        return _response(HTTPStatus.OK, self._stats())

    # The socket -------------------------------------------------------------------------
    async def _serve(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        sock = _Socket(ws, query.get("vsn", ["1.0.0"])[0])
        self.sockets.add(sock)
        self.counts["connections"] += 1
        try:
            async for raw in ws:
                while self._stalled():
                    await asyncio.sleep(0.05)
                try:
                    join_ref, ref, topic, event, payload = sock.decode(raw)
                except (ValueError, KeyError, TypeError):
                    continue
                await self._on_message(sock, join_ref, ref, topic, event, payload or {})
        except ConnectionClosed:
            pass
        finally:
            self.sockets.discard(sock)
            for channel in sock.channels.values():
                if channel.expiry is not None:
                    channel.expiry.cancel()

    async def _on_message(self, sock: _Socket, join_ref: Any, ref: Any, topic: str,
                          event: str, payload: dict[str, Any]) -> None:
        if topic == "phoenix" and event == "heartbeat":
            self.counts["heartbeats"] += 1
            await sock.push(None, ref, "phoenix", "phx_reply", {"status": "ok", "response": {}})
        elif event == "phx_join":
            # Phoenix handles each channel in its own process: a slow join must not hold
            # the socket's other traffic.
            self._tasks.append(asyncio.create_task(
                self._join(sock, join_ref, ref, topic, payload)))
        elif event == "phx_leave":
            channel = sock.channels.pop(topic, None)
            await sock.push(join_ref, ref, topic, "phx_reply", {"status": "ok", "response": {}})
            if channel is not None:
                await sock.push(join_ref, join_ref, topic, "phx_close", {})
        elif event == "access_token":
            channel = sock.channels.get(topic)
            if channel is not None:
                await self._refresh(sock, channel, payload.get("access_token"))
        # broadcast/presence are not used by agent-bridge; ignored like unknown events.

    async def _join(self, sock: _Socket, join_ref: Any, ref: Any, topic: str,
                    payload: dict[str, Any]) -> None:
        self.counts["joins"] += 1
        if self._delay_joins:
            await asyncio.sleep(self._delay_joins.pop(0))
        old = sock.channels.pop(topic, None)
        if old is not None:  # a second join of a topic replaces the first
            await sock.push(old.join_ref, old.join_ref, topic, "phx_close", {})
        if self._fail_joins:
            self._fail_joins -= 1
            await self._reply_error(sock, join_ref, ref, topic,
                                    "Realtime was unable to connect to the project database")
            return
        token = payload.get("access_token") or payload.get("user_token")
        try:
            claims = verify(str(token), self.jwt_secret) if token else {}
        except InvalidToken as exc:
            await self._reply_error(sock, join_ref, ref, topic, str(exc))
            return
        if "role" not in claims or "exp" not in claims:
            await self._reply_error(sock, join_ref, ref, topic,
                                    "Fields `role` and `exp` are required in JWT")
            return
        config = payload.get("config") or {}
        bindings = []
        for params in config.get("postgres_changes") or []:
            if params is None:
                continue
            if params.get("filter") and _parse_filter(params["filter"]) is None:
                await self._reply_error(sock, join_ref, ref, topic,
                                        f"Unable to parse filter {params['filter']!r}")
                return
            bindings.append({**params, "id": _binding_id(params)})
        channel = _Channel(topic, join_ref, str(token), claims, bindings)
        sock.channels[topic] = channel
        self._schedule_expiry(sock, channel)
        await sock.push(join_ref, ref, topic, "phx_reply",
                        {"status": "ok", "response": {"postgres_changes": bindings}})
        if bindings:
            self._tasks.append(asyncio.create_task(self._activate(sock, channel)))

    async def _activate(self, sock: _Socket, channel: _Channel) -> None:
        await asyncio.sleep(self.subscribe_delay)
        if sock.channels.get(channel.topic) is not channel:
            return
        try:
            refused = await self._refused_filter(channel)
        except psycopg.Error as exc:  # e.g. a token whose role does not exist
            refused = ("Unable to subscribe to changes with given parameters. An exception "
                       f"happened so please check your connect parameters. Exception: {exc}")
        if refused is not None:
            # subscription_check_filters raised: the subscription is not created, and the
            # channel says so (not retried: the parameters are at fault).
            await sock.push(channel.join_ref, None, channel.topic, "system", {
                "extension": "postgres_changes", "status": "error", "message": refused,
                "channel": channel.topic.removeprefix("realtime:")})
            return
        channel.active = True
        await sock.push(channel.join_ref, None, channel.topic, "system", {
            "extension": "postgres_changes", "status": "ok",
            "message": "Subscribed to PostgreSQL",
            "channel": channel.topic.removeprefix("realtime:")})

    async def _refused_filter(self, channel: _Channel) -> str | None:
        """Why Realtime would refuse to create this channel's subscriptions, or None: a
        filter on a column the role may not select (realtime.subscription_check_filters)."""
        for binding in channel.bindings:
            parsed = _parse_filter(binding["filter"]) if binding.get("filter") else None
            if parsed is None:
                continue
            columns = await self._table_columns(channel.role, binding.get("schema", "public"),
                                                str(binding.get("table")))
            if not columns:
                continue  # not a table of this database: no subscription, no error here
            if not any(c.name == parsed[0] and c.selectable for c in columns):
                return ("Unable to subscribe to changes with given parameters. An exception "
                        "happened so please check your connect parameters: [event: "
                        f"{binding.get('event', '*')}, schema: {binding.get('schema')}, table: "
                        f"{binding.get('table')}, filters: {binding['filter']}, select: nil]. "
                        f"Exception: ERROR P0001 (raise_exception) invalid column for filter "
                        f"{parsed[0]}")
        return None

    async def _reply_error(self, sock: _Socket, join_ref: Any, ref: Any, topic: str,
                           reason: str) -> None:
        await sock.push(join_ref, ref, topic, "phx_reply",
                        {"status": "error", "response": {"reason": reason}})

    async def _refresh(self, sock: _Socket, channel: _Channel, token: Any) -> None:
        self.counts["access_tokens"] += 1
        if not token or token == channel.token or str(token).startswith("sb_"):
            return
        try:
            claims = verify(str(token), self.jwt_secret)
        except InvalidToken as exc:
            await self._shutdown(sock, channel, str(exc))
            return
        if "role" not in claims or "exp" not in claims:
            await self._shutdown(sock, channel, "Fields `role` and `exp` are required in JWT")
            return
        channel.token, channel.claims = str(token), claims
        self._schedule_expiry(sock, channel)

    def _schedule_expiry(self, sock: _Socket, channel: _Channel) -> None:
        if channel.expiry is not None:
            channel.expiry.cancel()
        left = float(channel.claims["exp"]) - time.time()

        def expire() -> None:
            if sock.channels.get(channel.topic) is channel:
                self._tasks.append(asyncio.create_task(self._shutdown(
                    sock, channel, f"Token has expired {int(-left)} seconds ago")))
        channel.expiry = self._loop.call_later(max(left, 0), expire)

    async def _shutdown(self, sock: _Socket, channel: _Channel, message: str) -> None:
        """Realtime's shutdown_response: a system error, then the channel stops (phx_close)."""
        if sock.channels.get(channel.topic) is not channel:
            return
        del sock.channels[channel.topic]
        await sock.push(channel.join_ref, None, channel.topic, "system", {
            "extension": "system", "status": "error", "message": message,
            "channel": channel.topic.removeprefix("realtime:")})
        await sock.push(channel.join_ref, channel.join_ref, channel.topic, "phx_close", {})

    # Changes ----------------------------------------------------------------------------
    async def _feed(self, listener: psycopg.AsyncConnection[Any]) -> None:
        """Deliver each logged change, in order, to every subscriber allowed to see it."""
        assert self._pool is not None
        async for notify in listener.notifies():
            async with self._pool.connection() as conn:
                row = await (await conn.execute(
                    "delete from realtime_stub.changes where id = %s returning change",
                    [int(notify.payload)])).fetchone()
            if row is None:
                continue
            while self._stalled():
                await asyncio.sleep(0.05)
            try:
                await self._dispatch(row[0])
            except Exception as exc:  # a stand-in must keep serving; say why
                print(f"realtime_stub: dispatch failed: {type(exc).__name__}: {exc}")

    async def _dispatch(self, change: dict[str, Any]) -> None:
        for sock in list(self.sockets):
            for channel in list(sock.channels.values()):
                if not channel.active or not any(_concerns(b, change) for b in channel.bindings):
                    continue
                columns = await self._table_columns(channel.role, change["schema"],
                                                    change["table"])
                ids = [b["id"] for b in channel.bindings if _matches(b, change, columns)]
                if not ids:
                    continue
                data = await self._authorised(channel, change, columns)
                if data is None:
                    continue
                if self._lose_events:
                    self._lose_events -= 1
                    self.counts["lost"] += 1
                    continue
                self.counts["events"] += 1
                await sock.push(None, None, channel.topic, "postgres_changes",
                                {"ids": ids, "data": data})

    async def _table_columns(self, role: str, schema: str, table: str) -> list[_Column]:
        assert self._pool is not None
        key = (role, schema, table)
        if key not in self._columns:
            async with self._pool.connection() as conn:
                self._columns[key] = [_Column(*r) for r in await (await conn.execute(
                    _COLUMNS, [role, schema, table])).fetchall()]
        return self._columns[key]

    async def _authorised(self, channel: _Channel, change: dict[str, Any],
                          columns: list[_Column]) -> dict[str, Any] | None:
        """The change as this subscriber may see it (walrus' apply_rls), or None."""
        schema, table, kind = change["schema"], change["table"], change["type"]
        data: dict[str, Any] = {"schema": schema, "table": table, "type": kind,
                                "commit_timestamp": change["commit_timestamp"],
                                "columns": [{"name": c.name, "type": c.type} for c in columns
                                            if c.selectable], "errors": None}
        if kind != "DELETE" and not all(c.selectable for c in columns if c.pkey):
            return {**{k: data[k] for k in ("schema", "table", "type")},
                    "errors": ["Error 401: Unauthorized"]}
        rls = bool(columns and columns[0].rls)
        if kind in ("INSERT", "UPDATE"):
            record = change["record"] or {}
            if rls and not await self._visible(channel, schema, table,
                                               {c.name: record.get(c.name) for c in columns
                                                if c.pkey}):
                return None
            data["record"] = {c.name: record[c.name] for c in columns
                              if c.selectable and c.name in record}
        if kind in ("UPDATE", "DELETE"):
            # wal2json's `identity`; for a DELETE with RLS on, apply_rls keeps only the
            # primary key's columns among them ("we can't secure deletes").
            old = change["old"] or {}
            data["old_record"] = {c.name: old.get(c.name) for c in columns
                                  if c.identity and c.selectable
                                  and (kind != "DELETE" or not rls or c.pkey)}
        return data

    async def _visible(self, channel: _Channel, schema: str, table: str,
                       pkey: dict[str, Any]) -> bool:
        assert self._pool is not None
        where = sql.SQL(" and ").join(
            sql.SQL("{}::text = %s").format(sql.Identifier(k)) for k in pkey)
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(sql.SQL("set local role {}").format(
                    sql.Identifier(channel.role)))
                await conn.execute("select set_config('request.jwt.claims', %s, true)",
                                   [json.dumps(channel.claims)])
                row = await (await conn.execute(
                    sql.SQL("select exists(select 1 from {}.{} where {})").format(
                        sql.Identifier(schema), sql.Identifier(table), where),
                    [str(v) for v in pkey.values()])).fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0])


def _parse_filter(text: str) -> tuple[str, str, list[str]] | None:
    """`column=op.value` with eq, neq, in (the filters agent-bridge's clients use)."""
    column, sep, rest = text.partition("=")
    op, dot, value = rest.partition(".")
    if not sep or not dot or op not in ("eq", "neq", "in"):
        return None
    values = value.strip("()").split(",") if op == "in" else [value]
    return column, op, values


def _concerns(binding: dict[str, Any], change: dict[str, Any]) -> bool:
    """The binding's event, schema and table fit the change (filters aside)."""
    event = str(binding.get("event", "*")).upper()
    if event != "*" and event != change["type"]:
        return False
    if binding.get("schema", "public") not in ("*", change["schema"]):
        return False
    return binding.get("table") in (None, "*", change["table"])


def _matches(binding: dict[str, Any], change: dict[str, Any], columns: list[_Column]) -> bool:
    """realtime.is_visible_through_filters: a filter matches the new row's columns
    (INSERT, UPDATE) or, for a DELETE, the identity columns wal2json sends; a filter on a
    column the event does not carry does not match."""
    if not _concerns(binding, change):
        return False
    if not binding.get("filter"):
        return True
    parsed = _parse_filter(binding["filter"])
    if parsed is None:
        return False
    column, op, values = parsed
    if change["type"] == "DELETE":
        if not any(c.name == column and c.identity for c in columns):
            return False
        row = change["old"] or {}
    else:
        row = change["record"] or {}
        if column not in row:
            return False
    value = _text(row.get(column))
    return (value in values) if op in ("eq", "in") else (value not in values)


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _response(status: HTTPStatus, body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)


def install(database_url: str, tables: Iterable[tuple[str, str]] | None = None) -> None:
    """The change trigger on every table of the supabase_realtime publication."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_INSTALL)
        for schema, table in tables or conn.execute(_PUBLISHED).fetchall():
            target = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            conn.execute(sql.SQL("drop trigger if exists zz_realtime_stub on {}").format(target))
            conn.execute(sql.SQL(
                "create trigger zz_realtime_stub after insert or update or delete on {} "
                "for each row execute function realtime_stub.capture()").format(target))


def uninstall(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for schema, table in conn.execute(_PUBLISHED).fetchall():
            conn.execute(sql.SQL("drop trigger if exists zz_realtime_stub on {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table)))
        conn.execute("drop schema if exists realtime_stub cascade")
