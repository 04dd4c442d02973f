"""Supabase transport: supabase-py with the service key, the only module that talks to
supabase-py. State functions are rpc() calls; row operations go through the table API,
the way the frontend reaches the table. Every driver error is classified here.

One long-lived client per process (created lazily, so after a fork), on an
HTTP/1.1 httpx client with timeouts: supabase-py's HTTP/2 default has an open
"Server disconnected" issue under load.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from postgrest.exceptions import APIError

from bridge.errors import (
    AgentBridgeError,
    StoreMisconfigured,
    StoreRejected,
    StoreUnavailable,
    is_transient,
)
from bridge.names import TABLE
from bridge.queries import Query, load
from bridge.store.realtime import RealtimeWakeups
from supabase import Client, ClientOptions, create_client

# PostgREST's own "could not connect / schema cache not ready" codes: try again later.
# (A database SQLSTATE in `code` follows the rule both transports share, is_transient.)
_TRANSIENT_PGRST = ("PGRST000", "PGRST001", "PGRST002", "PGRST003")
# HTTP statuses that Supabase's gateway (Kong, Cloudflare, a load balancer) answers on its
# own, with an HTML page or a JSON body without PostgREST's `code`, while PostgREST or the
# database is restarting, overloaded or rate limited: try again later. 520-527 are
# Cloudflare's origin errors; 408 a request timeout; 429 a rate limit.
_GATEWAY_TRANSIENT = {408, 429, 500, 502, 503, 504, *range(520, 528)}
CHUNKS = "agent_task_chunks"  # a streamed answer's pieces (read by `--follow`)
KEY_FIX = ("set SUPABASE_SERVICE_KEY to the project's secret key (sb_secret_...) or its legacy "
           "service_role key, from Project Settings → API Keys")


class GatewayAnswer(AgentBridgeError):
    """An error answer that did not come from PostgREST (no PostgREST error `code`)."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason
        self.body = body


def _check_answer(response: httpx.Response) -> None:
    """httpx response hook: raise GatewayAnswer for an error not written by PostgREST, so
    its status is not lost (postgrest-py keeps only the body's `code`, None here)."""
    if response.status_code < 400:
        return
    response.read()
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("code"):
        return  # PostgREST's own error: APIError carries its code
    raise GatewayAnswer(response.status_code, response.reason_phrase, response.text)


def _summary(text: str) -> str:
    """A gateway body on one short line: a JSON message, else the HTML page's title/text."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        text = str(body.get("message") or body.get("msg") or body.get("error") or text)
    else:
        title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
        text = title[1] if title else re.sub(r"<[^>]+>", " ", text)
    return " ".join(text.split())[:200]


def classify(exc: BaseException) -> Exception:
    """The one place Supabase errors become StoreUnavailable (retry), StoreMisconfigured
    (fix the key) or StoreRejected (permanent)."""
    if isinstance(exc, httpx.TransportError):  # connect, read, timeouts, protocol
        return StoreUnavailable(f"Supabase unreachable: {type(exc).__name__}: {exc}")
    if isinstance(exc, GatewayAnswer):
        what = _summary(exc.body)
        said = f"{exc.status} {exc.reason}" + (f": {what}" if what else "")
        if exc.status in (401, 403) and (exc.status == 401 or "api key" in what.lower()):
            return StoreMisconfigured(f"Supabase refused the API key ({said}): {KEY_FIX}",
                                      str(exc.status))
        if exc.status in _GATEWAY_TRANSIENT or exc.status >= 500:
            return StoreUnavailable(f"Supabase unavailable ({said})", str(exc.status))
        return StoreRejected(f"Supabase refused the call ({said})", str(exc.status))
    if isinstance(exc, APIError):
        code = exc.code or ""
        message = exc.message or str(exc)
        if code in ("PGRST301", "PGRST302", "PGRST303") or code == "401":
            return StoreMisconfigured(f"Supabase refused the key ({code}): {message}: {KEY_FIX}",
                                      code)
        if code in _TRANSIENT_PGRST or is_transient(code) or (code.isdigit() and
                                                   int(code) in _GATEWAY_TRANSIENT):
            return StoreUnavailable(f"Supabase unavailable ({code}): {message}", code)
        hint = f" ({exc.hint})" if exc.hint else ""
        return StoreRejected(f"Supabase refused the call ({code}): {message}{hint}", code)
    return StoreRejected(f"Supabase call failed: {type(exc).__name__}: {exc}")


def is_api_key(key: str) -> bool:
    """A new-style Supabase API key (sb_secret_..., sb_publishable_...), not a JWT."""
    return key.startswith("sb_")


def auth_headers(key: str) -> dict[str, str]:
    """How a key goes on a request. A new API key is not a JWT: it goes in `apikey` only
    (Supabase's gateway turns it into a short-lived JWT for its role; PostgREST cannot
    verify it as a bearer token). A legacy JWT key goes in both, as supabase-py sends it."""
    if is_api_key(key):
        return {"apikey": key}
    return {"apikey": key, "Authorization": f"Bearer {key}"}


def probe(url: str, key: str, timeout: float) -> int:
    """The HTTP status of Supabase's API root with `key` (200: reachable, key accepted)."""
    try:
        response = httpx.get(url.rstrip("/") + "/rest/v1/", headers=auth_headers(key),
                             timeout=timeout)
    except httpx.HTTPError as exc:
        raise classify(exc) from exc
    return response.status_code


def make_client(url: str, service_key: str, timeout: float) -> Client:
    """supabase-py on HTTP/1.1 with timeouts and no session handling (a service key)."""
    http = httpx.Client(http2=False, timeout=httpx.Timeout(timeout, connect=5.0),
                        event_hooks={"response": [_check_answer]})
    options = ClientOptions(httpx_client=http, postgrest_client_timeout=timeout,
                            auto_refresh_token=False, persist_session=False)
    client = create_client(url, service_key, options=options)
    if is_api_key(service_key):
        # supabase-py sends its key as a bearer token too; a secret key must not be.
        client.options.headers.pop("Authorization", None)
    return client


class SupabaseTransport:
    name = "supabase"

    def __init__(self, url: str, service_key: str, *, timeout: float = 10.0,
                 realtime: bool = False, max_rows: int | None = 1000) -> None:
        # PostgREST's db-max-rows: results are cut to it by a LIMIT around the call.
        self.max_rows = max_rows
        self._url = url
        self._key = service_key
        self._timeout = timeout
        self._client: Client | None = None
        self._pid = 0
        self._interrupted = threading.Event()
        # Set by a Realtime event (or interrupt); the bridge's wait returns at once.
        self._wake = threading.Event()
        self._realtime = (RealtimeWakeups(url, service_key, self._wake, self._broadcasting)
                          if realtime else None)

    def _broadcasting(self) -> bool:
        """Whether the database sends the wake-up as Realtime Broadcast (schema 6)."""
        rows = self.call(load()["broadcasting"], {})
        return bool(rows[0]["agent_bridge_broadcasting"])

    def _get_client(self) -> Client:
        if self._client is None or self._pid != os.getpid():
            self._client = make_client(self._url, self._key, self._timeout)
            self._pid = os.getpid()
        return self._client

    def call(self, query: Query, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        row_operation = None if query.function else _ROW_OPERATIONS.get(query.name)
        if not query.function and row_operation is None:
            raise StoreRejected(f"{query.name!r} needs a direct database connection "
                                "(DATABASE_URL); it is not available over Supabase's API")
        try:
            client = self._get_client()
            if row_operation is not None:
                return row_operation(client, params)
            data = client.rpc(query.function, dict(params)).execute().data
        except (APIError, httpx.HTTPError, GatewayAnswer) as exc:
            raise classify(exc) from exc
        if isinstance(data, list):
            return data
        # A function returning a scalar: name it the way the SQL query aliases it.
        return [{query.function: data}]

    def wait_for_wakeup(self, timeout: float) -> bool:
        """True when Realtime reported a pending row; else the poll interval passed."""
        if self._interrupted.is_set():
            return False
        if self._realtime is not None:
            self._realtime.start()  # started on first use: only the bridge waits
        # An event that arrived while the bridge was claiming is still set, so it is
        # never lost; at worst one extra round.
        woke = self._wake.wait(timeout)
        self._wake.clear()
        return woke and not self._interrupted.is_set()

    def wait_for_notifications(self, timeout: float) -> list[str] | None:
        """No NOTIFY over Supabase's API: callers poll instead."""
        self._interrupted.wait(timeout)
        return []

    def interrupt(self) -> None:
        self._interrupted.set()
        self._wake.set()

    def close(self) -> None:
        self.interrupt()
        if self._realtime is not None:
            self._realtime.close()
        if self._client is not None:
            self._client.postgrest.session.close()
            self._client = None


# Row operations (bridge/sql/rows.sql) through the table API -------------------------



def _rows(data: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _insert_task(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    row = {"status": "pending", "request_payload": params["request_payload"],
           "priority": params["priority"], "agent": params["agent"]}
    rows = _rows(client.table(TABLE).insert(row).execute().data)
    if not rows or "id" not in rows[0]:
        raise StoreRejected("Supabase stored the row but returned no id")
    return [{"id": rows[0]["id"]}]


def _insert_keyed_task(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    row = {"status": "pending", "request_payload": params["request_payload"],
           "priority": params["priority"], "agent": params["agent"],
           "idempotency_key": params["idempotency_key"]}
    rows = _rows(client.table(TABLE).insert(row).execute().data)
    if not rows or "id" not in rows[0]:
        raise StoreRejected("Supabase stored the row but returned no id")
    return [{"id": rows[0]["id"]}]


def _keyed_task(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    query = (client.table(TABLE).select("id,user_id").eq("agent", params["agent"])
             .eq("idempotency_key", params["idempotency_key"]))
    return [{"id": r["id"]} for r in _rows(query.execute().data) if r.get("user_id") is None]


def _get_task(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    columns = "id,status,attempts,response_payload,error"
    return _rows(client.table(TABLE).select(columns).eq("id", params["id"]).execute().data)


def _show_task(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    columns = ("id,status,agent,priority,attempts,max_attempts,created_at,run_at,started_at,"
               "finished_at,updated_at,lease_expires_at,worker,cancel_requested_at,error,"
               "response_payload,waiting_for,answers")
    rows = _rows(client.table(TABLE).select(columns).eq("id", params["id"]).execute().data)
    for row in rows:  # as the SQL block returns it: how many, not what
        answers = row.pop("answers", None)
        row["answered"] = len(answers) if isinstance(answers, list) else None
    return rows


def _latest_failures(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    query = (client.table(TABLE).select("id,agent,attempts,finished_at,error")
             .eq("status", "failed").order("finished_at", desc=True, nullsfirst=False)
             .order("id").limit(int(params["limit"])))
    return _rows(query.execute().data)


def _find_ids(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    query = (client.table(TABLE).select("id").gte("id", params["low"])
             .lte("id", params["high"]).order("id").limit(int(params["limit"])))
    return _rows(query.execute().data)


def _get_chunks(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    query = (client.table(CHUNKS).select("seq,answer_offset,text").eq("task_id", params["id"])
             .eq("attempt", params["attempt"]).gt("seq", params["after"]).order("seq")
             .limit(int(params["limit"])))
    return _rows(query.execute().data)


_ROW_OPERATIONS: dict[str, Callable[[Client, Mapping[str, Any]], list[dict[str, Any]]]] = {
    "insert_task": _insert_task,
    "get_task": _get_task,
    "show_task": _show_task,
    "latest_failures": _latest_failures,
    "find_ids": _find_ids,
    "get_chunks": _get_chunks,
    "insert_keyed_task": _insert_keyed_task,
    "keyed_task": _keyed_task,
}
