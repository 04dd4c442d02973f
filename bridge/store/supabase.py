"""Supabase transport: supabase-py with the service key, every call an rpc().

One long-lived client per process (created lazily, so after a fork), on an
HTTP/1.1 httpx client with timeouts: supabase-py's HTTP/2 default has an open
"Server disconnected" issue under load.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
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
            return StoreUnavailable(f"Supabase unavailable ({code}): {message}")
        hint = f" ({exc.hint})" if exc.hint else ""
        return StoreRejected(f"Supabase refused the call ({code}): {message}{hint}")
    return StoreRejected(f"Supabase call failed: {type(exc).__name__}: {exc}")


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
        try:
            data = self._get_client().rpc(query.function, dict(params)).execute().data
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
