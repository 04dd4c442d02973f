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

Reply = tuple[int, Any]  # HTTP status, JSON body (None: no body)

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
# trailing ones have defaults, and whether it returns a set.
_SIGNATURES = """
select coalesce(array_agg(a.name order by a.n) filter (where a.n > 0), '{}'),
       coalesce(array_agg(format_type(a.typ, null) order by a.n) filter (where a.n > 0), '{}'),
       min(p.pronargdefaults), bool_or(p.proretset)
  from pg_proc p join pg_namespace s on s.oid = p.pronamespace
  left join unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]), p.proargnames,
                   p.proargmodes::text[]) with ordinality a(typ, name, mode, n)
         on coalesce(a.mode, 'i') in ('i', 'b', 'v')
 where s.nspname = 'public' and p.proname = %s
 group by p.oid
"""
_OPS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}  # col=op.value


class PostgrestStub:
    def __init__(self, database_url: str, *, service_key: str, anon_key: str | None = None
                 ) -> None:
        self.roles = {service_key: "service_role"}
        if anon_key is not None:
            self.roles[anon_key] = "anon"
        self.pool = ConnectionPool(database_url, min_size=1, max_size=12, open=False,
                                   kwargs={"autocommit": True})
        self.paused = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        self.pool.open(wait=True)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.pool.close()

    def pause(self) -> None:
        """Answer every request as PostgREST does while the database is down."""
        self.paused.set()

    def resume(self) -> None:
        self.paused.clear()

    # Requests ----------------------------------------------------------------------
    def handle(self, method: str, path: str, query: list[tuple[str, str]],
               headers: dict[str, str], body: Any) -> Reply:
        if self.paused.is_set():
            return OUTAGE
        role = self._role(headers)
        if role is None:
            return BAD_KEY
        rpc = re.fullmatch(r"/rest/v1/rpc/(\w+)", path)
        table = re.fullmatch(r"/rest/v1/(\w+)", path)
        if rpc and method == "POST":
            return self._run(role, lambda cur: self._rpc(cur, rpc[1], body))
        if table and method == "POST":
            wants_rows = "return=representation" in headers.get("prefer", "")
            return self._run(role, lambda cur: self._insert(cur, table[1], body, wants_rows))
        if table and method == "GET":
            single = "vnd.pgrst.object" in headers.get("accept", "")
            return self._run(role, lambda cur: self._select(cur, table[1], query, single))
        return 404, error("PGRST125", "Invalid path specified in request URL")

    def _role(self, headers: dict[str, str]) -> str | None:
        """The role of the Bearer token (else the apikey); every key given must be known."""
        keys = [headers.get("apikey"), headers.get("authorization", "").removeprefix("Bearer ")]
        given = [k for k in keys if k]
        if not given or any(k not in self.roles for k in given):
            return None
        return self.roles[given[-1]]

    def _run(self, role: str, work: Callable[[psycopg.Cursor[Any]], Reply]) -> Reply:
        """One transaction as `role` with its JWT claims, like a PostgREST request."""
        try:
            with self.pool.connection(timeout=5) as conn, conn.transaction(), \
                    conn.cursor() as cur:
                cur.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
                cur.execute("select set_config('request.jwt.claims', %s, true)",
                            [json.dumps({"role": role})])
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
        fits = [(names, types, returns_set) for names, types, defaults, returns_set
                in cur.execute(_SIGNATURES, [name]).fetchall()
                if set(args) <= set(names) and set(names[:len(names) - defaults]) <= set(args)]
        if not fits:
            return 404, error("PGRST202", f"Could not find the function public.{name}"
                              f"({', '.join(sorted(args))}) in the schema cache")
        names, types, returns_set = fits[0]
        chosen = [(n, t) for n, t in zip(names, types, strict=True) if n in args]
        call = sql.SQL("public.{}({})").format(sql.Identifier(name), sql.SQL(", ").join(
            sql.SQL("{0} => a.{0}").format(sql.Identifier(n)) for n, _ in chosen))
        record = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
                                    for n, t in chosen)
        source = sql.SQL("json_to_record(%s::json) as a({}), ").format(record) if chosen \
            else sql.SQL("")
        shape = sql.SQL("coalesce(json_agg(f), '[]')" if returns_set else "to_json(f)")
        query = sql.SQL("select {} from {}lateral {} as f").format(shape, source, call)
        row = cur.execute(query, [json.dumps(args)] if chosen else []).fetchone()
        return 200, row[0] if row else None

    def _insert(self, cur: psycopg.Cursor[Any], table: str, body: Any, wants_rows: bool
                ) -> Reply:
        rows = body if isinstance(body, list) else [body]
        columns = sorted({key for r in rows if isinstance(r, dict) for key in r})
        if not columns or not all(isinstance(r, dict) for r in rows):
            return 400, error("PGRST102", "Empty or invalid json")
        cols = sql.SQL(", ").join(map(sql.Identifier, columns))
        query = sql.SQL(
            "with r as (insert into public.{t} ({c}) select {c} from json_populate_recordset("
            "null::public.{t}, %s::json) returning *) select coalesce(json_agg(r), '[]') from r"
        ).format(t=sql.Identifier(table), c=cols)
        row = cur.execute(query, [json.dumps(rows)]).fetchone()
        return (201, row[0] if row else []) if wants_rows else (201, None)

    def _select(self, cur: psycopg.Cursor[Any], table: str, query: list[tuple[str, str]],
                single: bool) -> Reply:
        """Rows matching `col=op.value` filters; `select` picks columns."""
        wanted: sql.Composable = sql.SQL("r.*")
        conditions: list[sql.Composable] = [sql.SQL("true")]
        values: list[str] = []
        for key, value in query:
            op, _, operand = value.partition(".")
            if key == "select" and value != "*":
                wanted = sql.SQL(", ").join(sql.Identifier("r", c) for c in value.split(","))
            elif key != "select" and op in _OPS:
                conditions.append(sql.SQL("{} {} %s").format(sql.Identifier("r", key),
                                                             sql.SQL(_OPS[op])))
                values.append(operand)
            elif key != "select":
                return 400, error("PGRST100", f"failed to parse filter ({key}={value})")
        found = cur.execute(sql.SQL(
            "select coalesce(json_agg(x), '[]') from (select {} from public.{} r where {}) x"
        ).format(wanted, sql.Identifier(table), sql.SQL(" and ").join(conditions)),
            values).fetchone()
        rows = found[0] if found else []
        if not single:
            return 200, rows
        if len(rows) != 1:
            return 406, error("PGRST116", "Cannot coerce the result to a single JSON object",
                              f"The result contains {len(rows)} rows")
        return 200, rows[0]


def _handler(stub: PostgrestStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, payload = 400, error("PGRST102", "Empty or invalid json")
            else:
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, payload = stub.handle(self.command, url.path, parse_qsl(url.query),
                                              headers, body)
            data = b"" if payload is None else json.dumps(payload, default=str).encode()
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
