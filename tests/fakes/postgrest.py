"""A small PostgREST look-alike, so the real supabase-py client runs against the real
test database: RPC, simple table inserts and reads, service/anon keys, PostgREST's
error bodies and statuses, and a switchable outage.

Like PostgREST, it types RPC arguments with json_to_record and runs each request in
its own transaction with `set local role` and `request.jwt.claims`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from tests.fakes.jwt import TEST_JWT_SECRET, InvalidToken, verify

Reply = tuple[int, Any]  # HTTP status, JSON body (None: no body)
# A function that returned SQL null: PostgREST answers with the JSON `null`, not an
# empty body (PostgREST/postgrest#1762, fixed in #1795), and clients then see null.
JSON_NULL = object()

# PostgREST's SQLSTATE -> HTTP status table, most specific first (mapSQLtoHTTP in
# src/PostgREST/Error.hs; https://docs.postgrest.org/en/latest/references/errors.html);
# anything unlisted is 400. 42501 is 401 only for a request without a JWT
# (PostgREST/postgrest#590); Supabase's keys are JWTs, so even the anon key gets 403
# (supabase/postgrest-js#305), and a request without a key never gets this far.
_STATUS = [("23503", 409), ("23505", 409), ("25006", 405), ("53400", 500), ("57P01", 503),
           ("P0001", 400), ("42883", 404), ("42P01", 404), ("42P17", 500), ("42501", 403),
           ("08", 503), ("09", 500), ("0L", 403), ("0P", 403), ("25", 500), ("28", 403),
           ("2D", 500), ("38", 500), ("39", 500), ("3B", 500), ("40", 500), ("53", 503),
           ("54", 500), ("55", 500), ("57", 500), ("58", 500), ("F0", 500), ("HV", 500),
           ("P0", 500), ("XX", 500)]


def http_status(sqlstate: str) -> int:
    """PostgREST's status for a database error."""
    return next((status for prefix, status in _STATUS if sqlstate.startswith(prefix)), 400)


def error(code: str, message: str, details: str | None = None, hint: str | None = None
          ) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details, "hint": hint}


# What PostgREST answers while it cannot reach the database (ConnectionUsageError).
OUTAGE: Reply = (503, error("PGRST000", "Database connection error. Retrying the connection."))
BAD_KEY: Reply = (401, error("PGRST301", "Invalid API key",
                             hint="Double check your Supabase `anon` or `service_role` API key."))

# Each public function of a name: its input argument names and types in order, how many
# trailing ones have defaults, whether it returns a set, its volatility ('v', 's', 'i')
# and its signature (for PGRST203).
_SIGNATURES = """
select coalesce(array_agg(a.name order by a.n) filter (where a.n > 0), '{}'),
       coalesce(array_agg(format_type(a.typ, null) order by a.n) filter (where a.n > 0), '{}'),
       min(p.pronargdefaults), bool_or(p.proretset), max(p.provolatile::text),
       min(p.oid::regprocedure::text)
  from pg_proc p join pg_namespace s on s.oid = p.pronamespace
  left join unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]), p.proargnames,
                   p.proargmodes::text[]) with ordinality a(typ, name, mode, n)
         on coalesce(a.mode, 'i') in ('i', 'b', 'v')
 where s.nspname = 'public' and p.proname = %s
 group by p.oid order by p.oid
"""
_OPS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}  # col=op.value


# The service key the tests give a PostgrestStub of their own (the gateway signs real JWTs).
SERVICE_KEY = "test-service-role-key"

class PostgrestStub:
    def __init__(self, database_url: str, *, service_key: str, anon_key: str | None = None,
                 jwt_secret: str = TEST_JWT_SECRET, max_rows: int | None = None,
                 schema_cache: bool = False) -> None:
        # Opaque keys (like Supabase's sb_secret_/sb_publishable_ keys, which the gateway
        # maps to a role); any JWT signed with jwt_secret is accepted too.
        self.roles = {service_key: "service_role"}
        if anon_key is not None:
            self.roles[anon_key] = "anon"
        self.jwt_secret = jwt_secret
        # Like PostgREST's pool, a connection the server closed (a restart, a test that
        # stopped the database) is replaced rather than failing the next request.
        self.pool = ConnectionPool(database_url, min_size=1, max_size=12, open=False,
                                   kwargs={"autocommit": True},
                                   check=ConnectionPool.check_connection)
        self.paused = threading.Event()
        # PostgREST's db-max-rows (Supabase: 1,000): a cap on every result, functions'
        # included, applied as a LIMIT around the call (the function still runs whole).
        self.max_rows = max_rows
        # What the gateway answers instead of PostgREST (set by gateway_error()).
        self.fault: tuple[int, str, bytes] | None = None
        self.fault_hits = 0  # requests answered with the fault (tests wait on it)
        # PostgREST reads function signatures once and again only on
        # `notify pgrst, 'reload schema'`; opt-in, since tests migrate under a live stub.
        self.schema_cache: dict[str, list[tuple[Any, ...]]] | None = {} if schema_cache else None
        self._database_url = database_url
        self._listener: psycopg.Connection[Any] | None = None
        self.reloads = 0  # schema cache reloads so far (tests wait on it)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        self.pool.open(wait=True)
        if self.schema_cache is not None:
            self._listener = psycopg.connect(self._database_url, autocommit=True)
            self._listener.execute("listen pgrst")
            threading.Thread(target=self._listen, daemon=True).start()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        # A short poll: stopping waits at most this long (the default, 0.5 s, per stop).
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._listener is not None:
            self._listener.close()
        self.pool.close()

    def pause(self) -> None:
        """Answer every request as PostgREST does while the database is down."""
        self.paused.set()

    def resume(self) -> None:
        self.paused.clear()

    def gateway_error(self, status: int, body: str = "", content_type: str = "text/html"
                      ) -> None:
        """Answer every request as Supabase's gateway or a proxy in front of it does
        (502/503/504/520-527 pages, a 408, a 429 with or without a JSON body that has
        no `code`), until clear_fault()."""
        self.fault = (status, content_type, body.encode())

    def clear_fault(self) -> None:
        self.fault = None

    def _listen(self) -> None:
        """PostgREST's schema cache listener: `notify pgrst, 'reload schema'` (or an
        empty payload) reloads it."""
        assert self._listener is not None
        try:
            for note in self._listener.notifies():
                if note.payload in ("", "reload schema") and self.schema_cache is not None:
                    self.schema_cache.clear()
                    self.reloads += 1
        except psycopg.Error:
            return  # closed by stop()

    def _signatures(self, cur: psycopg.Cursor[Any], name: str) -> list[tuple[Any, ...]]:
        if self.schema_cache is None:
            return cur.execute(_SIGNATURES, [name]).fetchall()
        if name not in self.schema_cache:
            self.schema_cache[name] = cur.execute(_SIGNATURES, [name]).fetchall()
        return self.schema_cache[name]

    # Requests ----------------------------------------------------------------------
    def handle(self, method: str, path: str, query: list[tuple[str, str]],
               headers: dict[str, str], body: Any) -> Reply:
        if self.paused.is_set():
            return OUTAGE
        claims = self._claims(headers)
        if not isinstance(claims, dict):
            return claims
        rpc = re.fullmatch(r"/rest/v1/rpc/(\w+)", path)
        table = re.fullmatch(r"/rest/v1/(\w+)", path)
        if rpc and method == "POST":
            return self._run(claims, lambda cur: self._rpc(cur, rpc[1], body))
        if table and method == "POST":
            wants_rows = "return=representation" in headers.get("prefer", "")
            single = "vnd.pgrst.object" in headers.get("accept", "")
            return self._run(claims, lambda cur: self._insert(cur, table[1], body, wants_rows,
                                                              single, query))
        if table and method == "GET":
            single = "vnd.pgrst.object" in headers.get("accept", "")
            # GET runs READ ONLY, as PostgREST's transactions do.
            return self._run(claims, lambda cur: self._select(cur, table[1], query, single),
                             read_only=True)
        return 404, error("PGRST125", "Invalid path specified in request URL")

    def _claims(self, headers: dict[str, str]) -> dict[str, Any] | Reply:
        """The request's JWT claims, as Supabase's gateway and PostgREST find them: an
        `apikey` is required (an opaque key mapped to its role, or a signed JWT); the
        claims come from the Authorization Bearer token when there is one, else from
        the apikey. Refusals are the gateway's and PostgREST's 401s."""
        apikey = headers.get("apikey", "")
        if not apikey:
            return 401, {"message": "No API key found in request",
                         "hint": "No `apikey` request header or url param was found."}
        key_claims = self._verify(apikey)
        if not isinstance(key_claims, dict):
            return BAD_KEY
        bearer = headers.get("authorization", "")
        if not bearer.lower().startswith("bearer "):
            return key_claims
        claims = self._verify(bearer[7:].strip())
        if isinstance(claims, dict):
            return claims
        code = "PGRST303" if claims == "JWT expired" else "PGRST301"
        return 401, error(code, claims or "JWSError")

    def _verify(self, token: str) -> dict[str, Any] | str:
        """Claims of an opaque key or a signed JWT; else why it was refused."""
        if token in self.roles:
            return {"role": self.roles[token]}
        try:
            return verify(token, self.jwt_secret)
        except InvalidToken as exc:
            return str(exc)

    def _run(self, claims: dict[str, Any], work: Callable[[psycopg.Cursor[Any]], Reply],
             *, read_only: bool = False) -> Reply:
        """One transaction as the claims' role with all its claims, like a PostgREST request."""
        role = str(claims.get("role") or "anon")
        try:
            with self.pool.connection(timeout=5) as conn, conn.transaction(), \
                    conn.cursor() as cur:
                if read_only:
                    cur.execute("set transaction read only")
                cur.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
                cur.execute("select set_config('request.jwt.claims', %s, true)",
                            [json.dumps(claims)])
                return work(cur)
        except PoolTimeout:
            return 504, error("PGRST003", "Timed out acquiring connection from connection pool.")
        except psycopg.Error as exc:
            state = exc.diag.sqlstate
            if state is None:  # the link itself failed
                return OUTAGE
            return http_status(state), error(
                state, exc.diag.message_primary or str(exc), exc.diag.message_detail,
                exc.diag.message_hint)

    def _rpc(self, cur: psycopg.Cursor[Any], name: str, body: Any) -> Reply:
        """Call the overload whose argument names fit the body's keys, as PostgREST picks."""
        args: dict[str, Any] = body if isinstance(body, dict) else {}
        fits = [(names, types, returns_set, volatility, signature)
                for names, types, defaults, returns_set, volatility, signature
                in self._signatures(cur, name)
                if set(args) <= set(names) and set(names[:len(names) - defaults]) <= set(args)]
        if not fits:
            return 404, error("PGRST202", f"Could not find the function public.{name}"
                              f"({', '.join(sorted(args))}) in the schema cache")
        if len(fits) > 1:  # PostgREST refuses to guess between overloads
            return 300, error(
                "PGRST203", "Could not choose the best candidate function between: "
                + ", ".join(f"public.{name}(" + ", ".join(
                    f"{n} => {t}" for n, t in zip(f[0], f[1], strict=True)) + ")" for f in fits),
                hint="Try renaming the parameters or the function itself in the database "
                     "so function overloading can be resolved")
        names, types, returns_set, volatility, _ = fits[0]
        if volatility in ("s", "i"):  # STABLE/IMMUTABLE functions run READ ONLY, even on POST
            cur.execute("set transaction read only")
        chosen = [(n, t) for n, t in zip(names, types, strict=True) if n in args]
        call = sql.SQL("public.{}({})").format(sql.Identifier(name), sql.SQL(", ").join(
            sql.SQL("{0} => a.{0}").format(sql.Identifier(n)) for n, _ in chosen))
        record = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
                                    for n, t in chosen)
        source = sql.SQL("json_to_record(%s::json) as a({}), ").format(record) if chosen \
            else sql.SQL("")
        shape = sql.SQL("coalesce(json_agg(f), '[]')" if returns_set else "to_json(f)")
        query = sql.SQL("select {} from {}lateral {} as f").format(shape, source, call)
        if returns_set and self.max_rows is not None:
            # PostgREST's LIMIT around the call: the function runs (and locks, and
            # updates) in full; only the first max_rows rows come back.
            query = sql.SQL("select coalesce(json_agg(f), '[]') from (select f from {}lateral "
                            "{} as f limit {}) as l(f)").format(source, call,
                                                                sql.Literal(self.max_rows))
        row = cur.execute(query, [json.dumps(args)] if chosen else []).fetchone()
        return 200, row[0] if row and row[0] is not None else JSON_NULL

    def _insert(self, cur: psycopg.Cursor[Any], table: str, body: Any, wants_rows: bool,
                single: bool = False, query: list[tuple[str, str]] | None = None) -> Reply:
        """PostgREST's insert: `RETURNING 1` unless the rows are wanted (returningF), else
        RETURNING the `select` columns (`*` when none) and the primary key, and the body
        holds the `select` columns. As with PostgREST, asking for a column (or `*`) the
        role may not select fails with 42501, and a role with column grants only must
        list its columns."""
        rows = body if isinstance(body, list) else [body]
        columns = sorted({key for r in rows if isinstance(r, dict) for key in r})
        if not columns or not all(isinstance(r, dict) for r in rows):
            return 400, error("PGRST102", "Empty or invalid json")
        cols = sql.SQL(", ").join(map(sql.Identifier, columns))
        insert = sql.SQL("insert into public.{t} ({c}) select {c} from json_populate_recordset("
                         "null::public.{t}, %s::json)").format(t=sql.Identifier(table), c=cols)
        if not wants_rows:
            cur.execute(insert + sql.SQL(" returning 1"), [json.dumps(rows)])
            return 201, None
        picked = _picked(query or [])
        if picked is None:
            returning: sql.Composable = sql.SQL("*")
            shown: sql.Composable = sql.SQL("r.*")
        else:
            keys = [r[0] for r in cur.execute(_PRIMARY_KEY, [table]).fetchall()]
            returning = sql.SQL(", ").join(map(sql.Identifier, dict.fromkeys(picked + keys)))
            shown = sql.SQL(", ").join(sql.Identifier("r", c) for c in picked)
        row = cur.execute(sql.SQL(
            "with r as ({} returning {}) select coalesce(json_agg(x), '[]') from "
            "(select {} from r) x").format(insert, returning, shown), [json.dumps(rows)]
        ).fetchone()
        inserted = row[0] if row else []
        if single:
            if len(inserted) != 1:
                return 406, error("PGRST116", "Cannot coerce the result to a single JSON object",
                                  f"The result contains {len(inserted)} rows")
            return 201, inserted[0]
        return 201, inserted

    def _select(self, cur: psycopg.Cursor[Any], table: str, query: list[tuple[str, str]],
                single: bool) -> Reply:
        """Rows matching `col=op.value` filters; `select` picks columns; `order`
        (`col.desc.nullslast,...`) and `limit`, capped at max_rows as PostgREST caps them."""
        wanted: sql.Composable = sql.SQL("r.*")
        conditions: list[sql.Composable] = [sql.SQL("true")]
        values: list[str] = []
        order: list[sql.Composable] = []
        limit = self.max_rows
        for key, value in query:
            op, _, operand = value.partition(".")
            if key == "order":
                for term in value.split(","):
                    column, *mods = term.split(".")
                    order.append(sql.SQL("{} {}{}").format(
                        sql.Identifier("r", column),
                        sql.SQL("desc" if "desc" in mods else "asc"),
                        sql.SQL(" nulls first" if "nullsfirst" in mods else
                                " nulls last" if "nullslast" in mods else "")))
            elif key == "limit" and value.isdigit():
                limit = int(value) if limit is None else min(limit, int(value))
            elif key == "select" and (picked := _picked([(key, value)])) is not None:
                wanted = sql.SQL(", ").join(sql.Identifier("r", c) for c in picked)
            elif key != "select" and op in _OPS:
                conditions.append(sql.SQL("{} {} %s").format(sql.Identifier("r", key),
                                                             sql.SQL(_OPS[op])))
                values.append(operand)
            elif key != "select":
                return 400, error("PGRST100", f"failed to parse filter ({key}={value})")
        found = cur.execute(sql.SQL(
            "select coalesce(json_agg(x), '[]') from (select {} from public.{} r where {}{}{}) x"
        ).format(wanted, sql.Identifier(table), sql.SQL(" and ").join(conditions),
                 sql.SQL(" order by ") + sql.SQL(", ").join(order) if order else sql.SQL(""),
                 sql.SQL(" limit {}").format(sql.Literal(limit)) if limit is not None
                 else sql.SQL("")),
            values).fetchone()
        rows = found[0] if found else []
        if not single:
            return 200, rows
        if len(rows) != 1:
            return 406, error("PGRST116", "Cannot coerce the result to a single JSON object",
                              f"The result contains {len(rows)} rows")
        return 200, rows[0]


_PRIMARY_KEY = """
select a.attname from pg_index i
  join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey::int2[])
 where i.indrelid = format('public.%%I', %s::text)::regclass and i.indisprimary
"""


def _picked(query: list[tuple[str, str]]) -> list[str] | None:
    """The columns of `select=a,b,...`; None for `*` or no `select` (every column)."""
    value = next((v for k, v in query if k == "select"), "*")
    names = [c.strip() for c in value.split(",") if c.strip()]
    return None if not names or "*" in names else names


def _handler(stub: PostgrestStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
        # Headers and body leave in two writes: without this, Nagle's algorithm holds the
        # second until the client's delayed ACK (~40 ms a request on loopback).
        disable_nagle_algorithm = True

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if stub.fault is not None:  # the gateway answers; PostgREST is never reached
                status, content_type, page = stub.fault
                stub.fault_hits += 1
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, payload = 400, error("PGRST102", "Empty or invalid json")
            else:
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, payload = stub.handle(self.command, url.path, parse_qsl(url.query),
                                              headers, body)
            data = (b"" if payload is None else b"null" if payload is JSON_NULL
                    else json.dumps(payload, default=str).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            if isinstance(payload, dict) and status >= 400:
                self.send_header("Proxy-Status", f"PostgREST; error={payload.get('code')}")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the tests assert on responses, not on access logs."""

    return Handler
