"""A Supabase Realtime look-alike for tests: the Phoenix-channel wire protocol that
realtime-js (2.109, `vsn=2.0.0`: arrays, and binary frames for Broadcast) and realtime-py
(`vsn=1.0.0`: objects) speak, `postgres_changes` fed by real changes of the test database,
and Broadcast: private channels authorised by RLS on `realtime.messages`, and the rows
`realtime.send` inserts delivered once they commit.

It is a stand-in, written from the sources of supabase/realtime (RealtimeChannel, its
BroadcastHandler, MessageDispatcher and V2Serializer, Tenants.Authorization, the
ReplicationConnection that reads realtime.messages, the postgres_cdc_rls MessageDispatcher,
walrus' apply_rls) and of realtime-js; the real server has not been run against this code.
What it does as Realtime does:

- The socket needs `apikey` (a JWT signed with the project secret) or the upgrade is
  refused with 403. `phoenix`/`heartbeat` is answered `ok`.
- `phx_join` on `realtime:<name>`: the token is the payload's `access_token` (or
  `user_token`; the socket's `apikey` when there is none or it is an `sb_` key); it must
  verify and carry `role` and `exp`. A refused join is answered, after Realtime's error
  backoff (`join_error_backoff`, 0.1 s here as in Realtime's own tests; 5 s in production,
  CHANNEL_ERROR_BACKOFF_MS), `{status: error, response: {reason}}` with Realtime's reasons,
  e.g. "InvalidJWTToken: Token has expired 10 seconds ago".
- With `config.postgres_changes` the reply is
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

Broadcast, as Realtime does it:

- A private channel (`config.private: true`) is authorised at join (Tenants.Authorization):
  in one transaction that is rolled back, a probe row per extension (`broadcast`, and
  `presence` when `config.presence.enabled`) is inserted into realtime.messages with the
  channel's topic (the part after `realtime:`), then `role`, `realtime.topic`,
  `request.jwt.claims`, `request.jwt.claim.sub`, `request.jwt.claim.role` and
  `request.headers` are set and the probes are selected: those the SELECT policies let
  through are the channel's read rights. A role that bypasses RLS (service_role) reads
  all. Neither readable: `{status: error, response: {reason: "Unauthorized: You do not
  have permissions to read from this Channel topic: <topic>"}}` (also for a policy that
  errors or a role that does not exist); no partition for today: "MissingPartition: Realtime
  was unable to find the expected messages partition". A new `access_token` checks again:
  refused, the channel ends with "You do not have permissions to read from this Channel
  topic: <topic>".
- Database broadcasts: every committed INSERT into realtime.messages (realtime.send) with
  `event`, `topic`, `private` and a payload (`payload`, or `binary_payload`) goes to the
  channels joined on `realtime:<topic>` whose privacy is the row's (`private` rows to
  private channels with broadcast read, public rows to public channels), in commit order.
  A payload over `max_payload_size_in_kb` (Realtime's check: its size + 6 bytes >
  kb * 1000 + 500; 256 here, the Free plan's; 3,000 on Pro and up) is dropped, as are
  rows without event, topic or private. On the wire, vsn 2.0.0 gets a binary frame
  (V2Serializer's user broadcast): `<<4, len(topic), len(event), len(meta), encoding
  (1 json, 0 binary)>>` + topic + event + meta + payload, with topic `realtime:<topic>`,
  meta `{"id":"<row id>"}` and payload the jsonb's text (realtime.send has put the row id
  in it as `id` unless it had an `id`); vsn 1.0.0 gets
  `{"event":"broadcast","payload":{"event","meta":{"id"},"payload","type":"broadcast"},
  "ref":null,"topic"}` (binary payloads cannot be shown to it and are skipped).
- A client's broadcast (a text push `[join_ref, ref, topic, "broadcast", {type, event,
  payload}]`, or realtime-js' binary user broadcast push, kind 3) goes to the other
  channels on the topic (and the sender's own with `config.broadcast.self`); on a private
  channel the first one is authorised with the INSERT policies (a probe insert as the
  user, rolled back; refused: dropped without a reply, even with `ack`). With
  `config.broadcast.ack` it is answered `{status: ok, response: {}}`.
- `config.broadcast.replay: {since: <ms>, limit}` on a private channel sends, after the
  join reply, the topic's private broadcasts inserted since then, oldest first, at most
  `limit` (default 25, capped at 25), with `meta: {replayed: true, id}`; the live copies of
  those are not sent again. On a public channel the join is refused ("UnableToReplayMessages:
  Replay is not allowed for public channels").

Changes come from the database through triggers this stand-in installs (test fixture
only): on every table of the `supabase_realtime` publication, and on realtime.messages
(inserts), they log the row into `realtime_stub.changes` and NOTIFY the log id, so each
event carries the row as it was at that change, in commit order, and a rolled-back row is
never seen. Real Realtime reads the WAL instead (wal2json for postgres_changes, a pgoutput
slot on the `supabase_realtime_messages_publication` for Broadcast). Like Realtime's
janitor, `start` makes the partitions of realtime.messages from yesterday to three days
ahead (`ensure_message_partitions`); it never drops old ones.

Not done: Presence; the REST broadcast endpoint (`/api/broadcast`, which realtime-js uses
to send on a channel that is not joined); per-project rate limits (messages, joins,
channels per second), which Realtime enforces by dropping or refusing; `private_only`
projects; a client broadcast's size is its payload's JSON bytes, where Realtime measures
the Erlang term.

Faults for recovery tests (methods, or GET /control/<name> on the same port): `drop`
(abort every socket), `delay_join?seconds=&count=`, `lose_events?count=` (a delivery of a
change or a broadcast to one channel), `fail_join?count=`, `stall?seconds=` (answer
nothing, deliver nothing), `join_error_backoff?seconds=`, `reset` (clears the faults and
restores the backoff), `stats` (counts, among them `broadcasts` delivered to a channel,
`broadcast_rows` read from realtime.messages, and `rls_checks` = `rls_checks_join` +
`rls_checks_write` + `rls_checks_changes`, the last one postgres_changes visibility check
per subscriber and change).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
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
-- One logged change, and its NOTIFY (the log id) for the stand-in to read it back.
create or replace function realtime_stub.log(p_change jsonb) returns void
language plpgsql security definer set search_path = '' as $$
declare
    log_id bigint;
begin
    insert into realtime_stub.changes (change) values (p_change) returning id into log_id;
    perform pg_notify('realtime_stub', log_id::text);
end
$$;
create or replace function realtime_stub.capture() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
    perform realtime_stub.log(jsonb_build_object(
        'schema', tg_table_schema, 'table', tg_table_name, 'type', tg_op,
        'commit_timestamp', to_char(clock_timestamp() at time zone 'utc',
                                    'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'record', case when tg_op <> 'DELETE' then to_jsonb(new) end,
        'old', case when tg_op <> 'INSERT' then to_jsonb(old) end));
    return null;
end
$$;
-- A row of realtime.messages as the Broadcast replication reads it: the jsonb payload as
-- its text (what pgoutput sends), a binary payload in base64.
create or replace function realtime_stub.capture_message() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
    perform realtime_stub.log(jsonb_build_object(
        'broadcast', true, 'id', new.id, 'topic', new.topic, 'event', new.event,
        'private', new.private, 'payload', new.payload::text,
        'binary_payload', encode(new.binary_payload, 'base64')));
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
# Tenants.Authorization.set_conn_config: who is asking, about which topic.
_SET_CONFIG = """
select set_config('role', %(role)s, true), set_config('realtime.topic', %(topic)s, true),
       set_config('request.jwt.claims', %(claims)s, true),
       set_config('request.jwt.claim.sub', %(sub)s, true),
       set_config('request.jwt.claim.role', %(role)s, true),
       set_config('request.headers', %(headers)s, true)
"""
_PROBE = ("insert into realtime.messages (id, topic, extension, inserted_at, updated_at) "
          "values (%s, %s, %s, %s, %s)")
# Realtime.Messages.replay: the newest private broadcasts of the topic since `since`.
_REPLAY = """
select id::text, event, payload::text, binary_payload from realtime.messages
 where topic = %s and private is true and extension = 'broadcast'
   and inserted_at >= %s and inserted_at < %s
 order by inserted_at desc limit %s
"""
_REPLAY_HARD_LIMIT = 25
_UNAUTHORIZED = "You do not have permissions to read from this Channel topic: {}"
_MISSING_PARTITION = ("MissingPartition: Realtime was unable to find the expected messages "
                      "partition")
_NO_DATABASE = "Realtime was unable to connect to the project database"
# Tenants.validate_payload_size: the Erlang term's size against the limit plus padding; a
# binary's term is its bytes and 6 more.
_PAYLOAD_PADDING = 500
_BINARY_TERM_OVERHEAD = 6
# V2Serializer's binary frame kinds.
_USER_BROADCAST_PUSH = 3
_USER_BROADCAST = 4


def _binding_id(params: dict[str, Any]) -> int:
    """A stable integer per binding, as Realtime's :erlang.phash2(params)."""
    return zlib.crc32(json.dumps(params, sort_keys=True).encode()) & 0x7FFFFFF


def _utc_now() -> datetime:
    """NaiveDateTime.utc_now(): realtime.messages' timestamps are UTC without a zone."""
    return datetime.now(UTC).replace(tzinfo=None)


class _Column(NamedTuple):
    name: str
    type: str
    pkey: bool
    selectable: bool  # by the subscriber's role
    rls: bool  # the table's row level security is on
    identity: bool  # in the replica identity (what wal2json sends of a deleted row)


@dataclass(frozen=True)
class _UserBroadcast:
    """A broadcast whose payload is passed on as bytes (Realtime's UserBroadcast): from the
    database, or a client's binary push. `meta` is JSON-encoded into the frame."""
    event: str
    json: bool  # the payload's encoding: JSON text, or opaque binary
    body: bytes
    meta: dict[str, Any] | None = None
    id: str | None = None


@dataclass
class _Channel:
    topic: str
    join_ref: str | None
    token: str
    claims: dict[str, Any]
    bindings: list[dict[str, Any]]
    active: bool = False
    expiry: asyncio.TimerHandle | None = None
    private: bool = False
    presence_enabled: bool = False
    ack: bool = False
    self_broadcast: bool = False
    # Read rights from RLS at join (private channels); write decided at the first send.
    broadcast_read: bool | None = None
    presence_read: bool | None = None
    broadcast_write: bool | None = None
    replayed: frozenset[str] = frozenset()

    @property
    def role(self) -> str:
        return str(self.claims.get("role", "anon"))

    @property
    def sub_topic(self) -> str:
        return self.topic.removeprefix("realtime:")


@dataclass(eq=False)
class _Socket:
    ws: ServerConnection
    vsn: str
    apikey: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # the upgrade's x- headers
    channels: dict[str, _Channel] = field(default_factory=dict)

    @property
    def v2(self) -> bool:
        return self.vsn.startswith("2")

    def encode(self, join_ref: str | None, ref: str | None, topic: str, event: str,
               payload: Any) -> str:
        if self.v2:
            return json.dumps([join_ref, ref, topic, event, payload], default=str)
        # Phoenix's V1 JSONSerializer: no join_ref.
        return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref},
                          default=str)

    def decode(self, text: str) -> tuple[Any, Any, str, str, Any]:
        msg = json.loads(text)
        if isinstance(msg, list):
            join_ref, ref, topic, event, payload = msg
            return join_ref, ref, topic, event, payload
        return (msg.get("join_ref"), msg.get("ref"), msg["topic"], msg["event"],
                msg.get("payload"))

    async def push(self, join_ref: str | None, ref: str | None, topic: str, event: str,
                   payload: Any) -> None:
        await self.send(self.encode(join_ref, ref, topic, event, payload))

    async def send(self, frame: str | bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(frame)


def _user_broadcast_frame(topic: str, message: _UserBroadcast) -> bytes:
    """V2Serializer.fastlane!(%UserBroadcast{}): the binary frame realtime-js decodes."""
    parts = [topic.encode(), message.event.encode(),
             json.dumps(message.meta, separators=(",", ":")).encode() if message.meta else b""]
    if any(len(p) > 255 for p in parts):
        raise ValueError("topic, event and meta must be at most 255 bytes each")
    return (bytes([_USER_BROADCAST, *(len(p) for p in parts), 1 if message.json else 0])
            + b"".join(parts) + message.body)


def _v1_user_broadcast(topic: str, message: _UserBroadcast) -> str | None:
    """UserBroadcast.convert_to_json_broadcast for a V1 socket: the JSON payload passed
    on as it is (a Jason.Fragment); None for a binary one, which V1 cannot carry."""
    if not message.json:
        return None
    meta = (',"meta":' + json.dumps(message.meta, separators=(",", ":"))
            if message.meta else "")
    return ('{"event":"broadcast","payload":{"event":' + json.dumps(message.event) + meta
            + ',"payload":' + message.body.decode() + ',"type":"broadcast"},"ref":null,'
            + '"topic":' + json.dumps(topic) + "}")


def _decode_user_broadcast_push(data: bytes) -> tuple[str, str, str, _UserBroadcast] | None:
    """realtime-js' binary broadcast push (kind 3): (join_ref, ref, topic, broadcast)."""
    if len(data) < 7 or data[0] != _USER_BROADCAST_PUSH:
        return None
    sizes, encoding = data[1:6], data[6]
    fields, offset = [], 7
    for size in sizes:
        fields.append(data[offset:offset + size])
        offset += size
    try:
        join_ref, ref, topic, event, _metadata = (f.decode() for f in fields)
    except UnicodeDecodeError:
        return None
    return join_ref, ref, topic, _UserBroadcast(event, encoding != 0, data[offset:])


def _flag(value: Any) -> bool:
    """Realtime's FlexibleBoolean: true, or the string "true"."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


class RealtimeStub:
    def __init__(self, database_url: str, *, jwt_secret: str = TEST_JWT_SECRET,
                 subscribe_delay: float = 0.05, max_payload_size_in_kb: int = 256,
                 join_error_backoff: float = 0.1) -> None:
        self.database_url = database_url
        self.jwt_secret = jwt_secret
        self.subscribe_delay = subscribe_delay
        self.max_payload_size_in_kb = max_payload_size_in_kb
        self.join_error_backoff = self._default_backoff = join_error_backoff
        self.sockets: set[_Socket] = set()
        self.counts = {"connections": 0, "joins": 0, "joins_refused": 0, "events": 0,
                       "lost": 0, "dropped": 0, "access_tokens": 0, "heartbeats": 0,
                       "broadcasts": 0, "broadcast_rows": 0, "broadcasts_lost": 0,
                       "broadcasts_too_large": 0, "broadcasts_invalid": 0,
                       "client_broadcasts": 0, "replayed": 0, "rls_checks": 0,
                       "rls_checks_join": 0, "rls_checks_write": 0, "rls_checks_changes": 0}
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
        """Make today's partitions, install the change triggers, serve; returns the
        http:// base URL of the server."""
        ensure_message_partitions(self.database_url)
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
        self.join_error_backoff = self._default_backoff

    def stats(self) -> dict[str, Any]:
        return dict(self._call(self._stats))

    def _stats(self) -> dict[str, Any]:
        return {**self.counts, "open": len(self.sockets), "stalled": int(self._stalled()),
                "channels": sum(len(s.channels) for s in self.sockets),
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
        elif name == "join_error_backoff":
            self.join_error_backoff = float(query.get("seconds", "5"))
        elif name != "stats":
            return _response(HTTPStatus.NOT_FOUND, {"message": f"unknown control {name}"})
        return _response(HTTPStatus.OK, self._stats())

    # The socket -------------------------------------------------------------------------
    async def _serve(self, ws: ServerConnection) -> None:
        request = ws.request
        query = {k: v[0] for k, v in parse_qs(urlsplit(request.path if request else "").query)
                 .items()}
        headers = request.headers if request else Headers()
        sock = _Socket(ws, query.get("vsn", "1.0.0"),
                       apikey=query.get("apikey") or headers.get("apikey", ""),
                       headers={k.lower(): v for k, v in headers.raw_items()
                                if k.lower().startswith("x-")})
        self.sockets.add(sock)
        self.counts["connections"] += 1
        try:
            async for raw in ws:
                while self._stalled():
                    await asyncio.sleep(0.05)
                if isinstance(raw, bytes):
                    pushed = _decode_user_broadcast_push(raw)
                    if pushed is not None:
                        join_ref, ref, topic, message = pushed
                        await self._client_broadcast(sock, join_ref, ref, topic, message)
                    continue
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
        elif event == "broadcast" and isinstance(payload, dict):
            await self._client_broadcast(sock, join_ref, ref, topic, payload)
        # presence is not used by agent-bridge; ignored like unknown events.

    async def _join(self, sock: _Socket, join_ref: Any, ref: Any, topic: str,
                    payload: dict[str, Any]) -> None:
        self.counts["joins"] += 1
        if self._delay_joins:
            await asyncio.sleep(self._delay_joins.pop(0))
        old = sock.channels.pop(topic, None)
        if old is not None:  # a second join of a topic replaces the first
            await sock.push(old.join_ref, old.join_ref, topic, "phx_close", {})
        channel, replay = await self._admit(sock, join_ref, topic, payload)
        if isinstance(channel, str):
            # RealtimeChannel.join_error: Realtime waits before it answers a refusal.
            self.counts["joins_refused"] += 1
            await asyncio.sleep(self.join_error_backoff)
            await self._reply_error(sock, join_ref, ref, topic, channel)
            return
        sock.channels[topic] = channel
        self._schedule_expiry(sock, channel)
        await sock.push(join_ref, ref, topic, "phx_reply",
                        {"status": "ok", "response": {"postgres_changes": channel.bindings}})
        for message in replay:
            self.counts["replayed"] += 1
            await self._push_replayed(sock, channel, message)
        if channel.bindings:
            self._tasks.append(asyncio.create_task(self._activate(sock, channel)))

    async def _admit(self, sock: _Socket, join_ref: Any, topic: str, payload: dict[str, Any]
                     ) -> tuple[_Channel | str, list[_UserBroadcast]]:
        """The joined channel and the messages it replays, or why the join is refused."""
        if self._fail_joins:
            self._fail_joins -= 1
            return _NO_DATABASE, []
        if topic == "realtime:":
            return "TopicNameRequired: You must provide a topic name", []
        token = payload.get("access_token") or payload.get("user_token")
        if not token or str(token).startswith("sb_"):
            token = sock.apikey  # the socket's key stands for the user
        claims = self._claims(str(token))
        if isinstance(claims, str):
            return claims, []
        config = payload.get("config") or {}
        broadcast = config.get("broadcast") or {}
        bindings = []
        for params in config.get("postgres_changes") or []:
            if params is None:
                continue
            if params.get("filter") and _parse_filter(params["filter"]) is None:
                return f"Unable to parse filter {params['filter']!r}", []
            bindings.append({**params, "id": _binding_id(params)})
        presence = config.get("presence") or {}
        channel = _Channel(topic, join_ref, str(token), claims, bindings,
                           private=_flag(config.get("private")),
                           presence_enabled=_flag(presence.get("enabled")),
                           ack=_flag(broadcast.get("ack")),
                           self_broadcast=_flag(broadcast.get("self")))
        if channel.private:
            refused = await self._authorise_read(sock, channel)
            if refused is not None:
                return refused, []
        replay: list[_UserBroadcast] = []
        if "replay" in broadcast:
            if channel.private and channel.broadcast_read is False:
                return "Unauthorized: " + _UNAUTHORIZED.format(channel.sub_topic), []
            if not channel.private:
                return ("UnableToReplayMessages: Replay is not allowed for public channels",
                        [])
            found = await self._replay(channel, broadcast["replay"])
            if isinstance(found, str):
                return found, []
            replay = found
            channel.replayed = frozenset(m.id for m in replay if m.id)
        return channel, replay

    def _claims(self, token: str) -> dict[str, Any] | str:
        """The token's claims (RealtimeChannel.confirm_token), or Realtime's refusal."""
        try:
            claims = verify(token, self.jwt_secret)
        except InvalidToken as exc:
            if str(exc) == "JWT expired":
                exp = _peek_claims(token).get("exp", 0)
                return f"InvalidJWTToken: Token has expired {int(time.time() - exp)} seconds ago"
            if "JWSInvalidSignature" in str(exc):
                return "JwtSignatureError: Failed to validate JWT signature"
            return "MalformedJWT: The token provided is not a valid JWT"
        if "role" not in claims or "exp" not in claims:
            return "InvalidJWTToken: Fields `role` and `exp` are required in JWT"
        return claims

    async def _set_config(self, conn: psycopg.AsyncConnection[Any], sock: _Socket,
                          channel: _Channel) -> None:
        sub = channel.claims.get("sub")
        await conn.execute(_SET_CONFIG, {
            "role": channel.role, "topic": channel.sub_topic,
            "claims": json.dumps(channel.claims), "sub": None if sub is None else str(sub),
            "headers": json.dumps(sock.headers)})

    async def _authorise_read(self, sock: _Socket, channel: _Channel) -> str | None:
        """Realtime's read check of a private channel (get_read_authorizations): sets the
        channel's read rights and returns None, or returns why the join is refused."""
        assert self._pool is not None
        self.counts["rls_checks"] += 1
        self.counts["rls_checks_join"] += 1
        probes = {"broadcast": str(uuid.uuid4())}
        if channel.presence_enabled:
            probes["presence"] = str(uuid.uuid4())
        now = _utc_now()
        try:
            async with self._pool.connection() as conn, conn.transaction(force_rollback=True):
                for extension, probe in probes.items():
                    await conn.execute(_PROBE, [probe, channel.sub_topic, extension, now, now])
                await self._set_config(conn, sock, channel)
                seen = {r[0] for r in await (await conn.execute(
                    "select id::text from realtime.messages where id = any(%s::uuid[])",
                    [list(probes.values())])).fetchall()}
        except psycopg.errors.CheckViolation as exc:
            if exc.diag.table_name == "messages":
                return _MISSING_PARTITION
            return "Unauthorized: " + _UNAUTHORIZED.format(channel.sub_topic)
        except psycopg.Error:  # RlsPolicyError: a policy that fails, a role that is not
            return "Unauthorized: " + _UNAUTHORIZED.format(channel.sub_topic)
        channel.broadcast_read = probes["broadcast"] in seen
        channel.presence_read = probes["presence"] in seen if "presence" in probes else None
        if not (channel.broadcast_read or channel.presence_read):
            return "Unauthorized: " + _UNAUTHORIZED.format(channel.sub_topic)
        return None

    async def _authorise_write(self, sock: _Socket, channel: _Channel) -> bool | None:
        """Realtime's write check (get_write_authorizations): may this user send on the
        topic, i.e. do the INSERT policies let a probe row in; None if the check failed."""
        assert self._pool is not None
        self.counts["rls_checks"] += 1
        self.counts["rls_checks_write"] += 1
        now = _utc_now()
        try:
            async with self._pool.connection() as conn, conn.transaction(force_rollback=True):
                await self._set_config(conn, sock, channel)
                try:
                    async with conn.transaction():  # a savepoint, as Repo.insert's
                        await conn.execute(_PROBE, [str(uuid.uuid4()), channel.sub_topic,
                                                    "broadcast", now, now])
                except psycopg.errors.InsufficientPrivilege:
                    return False
                return True
        except psycopg.Error:
            return None

    async def _replay(self, channel: _Channel, params: Any) -> list[_UserBroadcast] | str:
        """Realtime.Messages.replay: the topic's private broadcasts since `since` (ms)."""
        assert self._pool is not None
        since = params.get("since") if isinstance(params, dict) else None
        limit = (params.get("limit") if isinstance(params, dict) else None) or \
            _REPLAY_HARD_LIMIT
        if not isinstance(since, int) or not isinstance(limit, int) or \
                isinstance(since, bool) or isinstance(limit, bool):
            return "UnableToReplayMessages: Replay params are not valid"
        try:
            start = datetime.fromtimestamp(since / 1000, UTC).replace(tzinfo=None)
        except (OverflowError, OSError, ValueError):
            return "UnableToReplayMessages: Replay params are not valid"
        try:
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(_REPLAY, [
                    channel.sub_topic, start, _utc_now() + timedelta(minutes=1),
                    max(min(limit, _REPLAY_HARD_LIMIT), 1)])).fetchall()
        except psycopg.Error:
            return "UnableToReplayMessages: Realtime was unable to replay messages"
        found = []
        for message_id, event, payload, binary in reversed(rows):
            is_json = payload is not None or binary is None
            body = (payload or "null").encode() if is_json else bytes(binary)
            found.append(_UserBroadcast(event or "", is_json, body,
                                        {"replayed": True, "id": message_id}, message_id))
        return found

    async def _push_replayed(self, sock: _Socket, channel: _Channel,
                             message: _UserBroadcast) -> None:
        """RealtimeChannel.replay: pushed on the channel (with its join_ref); a binary one
        as a user broadcast frame, which a V1 socket cannot carry."""
        if not message.json:
            if sock.v2:
                await sock.send(_user_broadcast_frame(channel.topic, message))
            return
        await sock.push(channel.join_ref, None, channel.topic, "broadcast", {
            "payload": json.loads(message.body), "event": message.event, "type": "broadcast",
            "meta": message.meta})

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
        if channel.private:
            # The rights are checked again with the new claims (and write forgotten).
            before = (channel.broadcast_read, channel.presence_read)
            channel.broadcast_write = None
            refused = await self._authorise_read(sock, channel)
            if refused == _MISSING_PARTITION:
                await self._shutdown(sock, channel, _NO_DATABASE)
            elif refused is not None:
                await self._shutdown(sock, channel, _UNAUTHORIZED.format(channel.sub_topic))
            elif any(b and not a for b, a in zip(
                    before, (channel.broadcast_read, channel.presence_read), strict=True)):
                await self._shutdown(sock, channel, "You no longer have permission to read "
                                     f"from this Channel topic: {channel.sub_topic}")

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
        """Deliver each logged change or broadcast, in order, to every subscriber allowed to
        see it."""
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
                if row[0].get("broadcast"):
                    await self._broadcast_row(row[0])
                else:
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
        self.counts["rls_checks"] += 1
        self.counts["rls_checks_changes"] += 1
        # As walrus: the key compared with literals that take the column's type, so the
        # primary key's index serves the check (`::text` on the column would scan the table).
        where = sql.SQL(" and ").join(
            sql.SQL("{} = %s").format(sql.Identifier(k)) for k in pkey)
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(sql.SQL("set local role {}").format(
                    sql.Identifier(channel.role)))
                await conn.execute("select set_config('request.jwt.claims', %s, true)",
                                   [json.dumps(channel.claims)])
                row = await (await conn.execute(
                    sql.SQL("select exists(select 1 from {}.{} where {})").format(
                        sql.Identifier(schema), sql.Identifier(table), where),
                    [None if v is None else str(v) for v in pkey.values()])).fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0])



    # Broadcast ----------------------------------------------------------------------------
    async def _broadcast_row(self, row: dict[str, Any]) -> None:
        """ReplicationConnection: a committed row of realtime.messages, to the channels of its
        topic (private rows to private channels, public ones to public channels)."""
        self.counts["broadcast_rows"] += 1
        event, topic, private, message_id = (row.get(k) for k in ("event", "topic", "private",
                                                                     "id"))
        if row.get("binary_payload") is not None:
            body, is_json = base64.b64decode(row["binary_payload"]), False
        elif row.get("payload") is not None:
            body, is_json = str(row["payload"]).encode(), True
        else:
            body = b""
        if None in (event, topic, private, message_id) or not body:
            self.counts["broadcasts_invalid"] += 1  # UnableToBroadcastChanges
            return
        if self._too_large(len(body)):
            self.counts["broadcasts_too_large"] += 1  # :payload_size_exceeded, logged only
            return
        await self._fan_out(f"realtime:{topic}", bool(private),
                            _UserBroadcast(str(event), is_json, body, {"id": message_id},
                                           str(message_id)))

    def _too_large(self, size: int) -> bool:
        return (size + _BINARY_TERM_OVERHEAD
                > self.max_payload_size_in_kb * 1000 + _PAYLOAD_PADDING)

    async def _client_broadcast(self, sock: _Socket, join_ref: Any, ref: Any, topic: str,
                                message: _UserBroadcast | dict[str, Any]) -> None:
        """BroadcastHandler: a client's broadcast to the others on its channel's topic."""
        channel = sock.channels.get(topic)
        if channel is None:
            return
        self.counts["client_broadcasts"] += 1
        if channel.private:
            if channel.broadcast_write is None:
                channel.broadcast_write = await self._authorise_write(sock, channel)
            if not channel.broadcast_write:
                return  # not allowed (or not known): dropped, no reply even with ack
        size = (len(message.body) if isinstance(message, _UserBroadcast)
                else len(json.dumps(message).encode()))
        if self._too_large(size):
            if channel.ack:  # {:reply, {:error, :payload_size_exceeded}, socket}
                await sock.push(join_ref, ref, topic, "phx_reply",
                                {"status": "error", "response": "payload_size_exceeded"})
            return
        await self._fan_out(topic, channel.private, message,
                            sender=None if channel.self_broadcast else channel)
        if channel.ack:
            await sock.push(join_ref, ref, topic, "phx_reply", {"status": "ok", "response": {}})

    async def _fan_out(self, topic: str, private: bool, message: _UserBroadcast | dict[str, Any],
                       sender: _Channel | None = None) -> None:
        """MessageDispatcher: one encoding per serializer, sent to each channel joined on
        `topic` with that privacy (and broadcast read, if private) but the sender's."""
        frames: dict[bool, str | bytes | None] = {}
        for sock in list(self.sockets):
            channel = sock.channels.get(topic)
            if (channel is None or channel is sender or channel.private != private
                    or (private and channel.broadcast_read is not True)):
                continue
            if isinstance(message, _UserBroadcast) and message.id in channel.replayed:
                continue
            if sock.v2 not in frames:
                frames[sock.v2] = _broadcast_frame(sock, topic, message)
            frame = frames[sock.v2]
            if frame is None:
                continue
            if self._lose_events:
                self._lose_events -= 1
                self.counts["lost"] += 1
                self.counts["broadcasts_lost"] += 1
                continue
            self.counts["broadcasts"] += 1
            await sock.send(frame)


def _broadcast_frame(sock: _Socket, topic: str,
                     message: _UserBroadcast | dict[str, Any]) -> str | bytes | None:
    """How a broadcast reaches this socket (V2Serializer / Phoenix's V1 JSONSerializer)."""
    if isinstance(message, _UserBroadcast):
        if sock.v2:
            return _user_broadcast_frame(topic, message)
        return _v1_user_broadcast(topic, message)
    return sock.encode(None, None, topic, "broadcast", message)


def _peek_claims(token: str) -> dict[str, Any]:
    """A token's claims without verifying it (to say how long ago it expired)."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


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
    """The change trigger on every table of the supabase_realtime publication, and the
    broadcast trigger on realtime.messages where it exists."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_INSTALL)
        for schema, table in tables or conn.execute(_PUBLISHED).fetchall():
            target = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            conn.execute(sql.SQL("drop trigger if exists zz_realtime_stub on {}").format(target))
            conn.execute(sql.SQL(
                "create trigger zz_realtime_stub after insert or update or delete on {} "
                "for each row execute function realtime_stub.capture()").format(target))
        if _has_messages(conn):
            conn.execute("drop trigger if exists zz_realtime_stub on realtime.messages")
            conn.execute("create trigger zz_realtime_stub after insert on realtime.messages "
                         "for each row execute function realtime_stub.capture_message()")


def uninstall(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for schema, table in conn.execute(_PUBLISHED).fetchall():
            conn.execute(sql.SQL("drop trigger if exists zz_realtime_stub on {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table)))
        if _has_messages(conn):
            conn.execute("drop trigger if exists zz_realtime_stub on realtime.messages")
        conn.execute("drop schema if exists realtime_stub cascade")


def ensure_message_partitions(database_url: str, today: date | None = None) -> list[str]:
    """What Realtime's janitor keeps (Tenants.create_messages_partitions): a partition of
    realtime.messages per UTC day from yesterday to three days ahead, owned by
    supabase_realtime_admin. Returns the names of those it made; none without the table."""
    day = today or datetime.now(UTC).date()
    made = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        if not _has_messages(conn):
            return []
        admin = conn.execute("select 1 from pg_roles where rolname = "
                             "'supabase_realtime_admin'").fetchone()
        for offset in range(-1, 4):
            start = day + timedelta(days=offset)
            name = f"messages_{start:%Y_%m_%d}"
            if conn.execute("select to_regclass(%s)", [f"realtime.{name}"]).fetchone() != (None,):
                continue
            try:
                with conn.transaction():
                    conn.execute(sql.SQL(
                        "create table if not exists realtime.{} partition of realtime.messages "
                        "for values from ({}) to ({})").format(
                            sql.Identifier(name), sql.Literal(str(start)),
                            sql.Literal(str(start + timedelta(days=1)))))
                    if admin:
                        conn.execute(sql.SQL("alter table realtime.{} owner to "
                                             "supabase_realtime_admin").format(
                                                 sql.Identifier(name)))
            except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation,
                    psycopg.errors.InvalidObjectDefinition):
                continue  # made meanwhile, or covered by another partition: as the janitor
            made.append(name)
    return made


def _has_messages(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("select to_regclass('realtime.messages') is not null").fetchone()
    return bool(row and row[0])
