"""Supabase transport: supabase-py with the service key, the only module that talks to
supabase-py. State functions are rpc() calls; row operations go through the table API,
the way the frontend reaches the table. Every driver error is classified here.

One long-lived client per process (created lazily, so after a fork), on an
HTTP/1.1 httpx client with timeouts: supabase-py's HTTP/2 default has an open
"Server disconnected" issue under load.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from postgrest.exceptions import APIError

from bridge.errors import StoreRejected, StoreUnavailable
from bridge.queries import Query
from supabase import Client, ClientOptions, create_client

# PostgREST error codes (SQLSTATE or PGRST...) that mean "try again later":
# connection trouble, resources, shutdown, serialization/deadlock, and PostgREST's
# own "could not connect / schema cache not ready" family (PGRST000-003).
_TRANSIENT_PREFIXES = ("08", "53", "57", "58", "40", "PGRST000", "PGRST001", "PGRST002",
                       "PGRST003")


def classify(exc: BaseException) -> Exception:
    if isinstance(exc, httpx.TransportError):  # connect, read, timeouts, protocol
        return StoreUnavailable(f"Supabase unreachable: {type(exc).__name__}: {exc}")
    if isinstance(exc, APIError):
        code = exc.code or ""
        message = exc.message or str(exc)
        if code.startswith(_TRANSIENT_PREFIXES) or code in ("502", "503", "504"):
            return StoreUnavailable(f"Supabase unavailable ({code}): {message}", code)
        hint = f" ({exc.hint})" if exc.hint else ""
        return StoreRejected(f"Supabase refused the call ({code}): {message}{hint}", code)
    return StoreRejected(f"Supabase call failed: {type(exc).__name__}: {exc}")


def probe(url: str, key: str, timeout: float) -> int:
    """The HTTP status of Supabase's API root with `key` (200: reachable, key accepted)."""
    try:
        response = httpx.get(url.rstrip("/") + "/rest/v1/",
                             headers={"apikey": key, "Authorization": f"Bearer {key}"},
                             timeout=timeout)
    except httpx.HTTPError as exc:
        raise classify(exc) from exc
    return response.status_code


def make_client(url: str, service_key: str, timeout: float) -> Client:
    """supabase-py on HTTP/1.1 with timeouts and no session handling (a service key)."""
    http = httpx.Client(http2=False, timeout=httpx.Timeout(timeout, connect=5.0))
    options = ClientOptions(httpx_client=http, postgrest_client_timeout=timeout,
                            auto_refresh_token=False, persist_session=False)
    return create_client(url, service_key, options=options)


class SupabaseTransport:
    name = "supabase"

    def __init__(self, url: str, service_key: str, *, timeout: float = 10.0) -> None:
        self._url = url
        self._key = service_key
        self._timeout = timeout
        self._client: Client | None = None
        self._pid = 0
        self._interrupted = threading.Event()

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
        except (APIError, httpx.HTTPError) as exc:
            raise classify(exc) from exc
        if isinstance(data, list):
            return data
        # A function returning a scalar: name it the way the SQL query aliases it.
        return [{query.function: data}]

    def wait_for_wakeup(self, timeout: float) -> bool:
        self._interrupted.wait(timeout)
        return False

    def interrupt(self) -> None:
        self._interrupted.set()

    def close(self) -> None:
        self._interrupted.set()
        if self._client is not None:
            self._client.postgrest.session.close()
            self._client = None


# Row operations (bridge/sql/rows.sql) through the table API -------------------------

TABLE = "agent_task_requests"


def _rows(data: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _insert_task(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    row = {"status": "pending", "request_payload": params["request_payload"],
           "priority": params["priority"]}
    rows = _rows(client.table(TABLE).insert(row).execute().data)
    if not rows or "id" not in rows[0]:
        raise StoreRejected("Supabase stored the row but returned no id")
    return [{"id": rows[0]["id"]}]


def _get_task(client: Client, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    columns = "id,status,attempts,response_payload,error"
    return _rows(client.table(TABLE).select(columns).eq("id", params["id"]).execute().data)


_ROW_OPERATIONS: dict[str, Callable[[Client, Mapping[str, Any]], list[dict[str, Any]]]] = {
    "insert_task": _insert_task,
    "get_task": _get_task,
}
