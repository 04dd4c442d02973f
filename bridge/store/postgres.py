"""Direct transport: psycopg 3 with a connection pool, and LISTEN for wake-ups."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from bridge.errors import StoreRejected, StoreUnavailable, first_line
from bridge.queries import Query

CHANNEL = "agent_task_requests"

# SQLSTATE classes that mean "the server or the link is unwell, try again":
# connection exceptions, insufficient resources, operator intervention (shutdown),
# system errors, serialization failures and deadlocks.
_TRANSIENT_CLASSES = ("08", "53", "57", "58", "40")


def classify(exc: BaseException) -> Exception:
    """Turn a psycopg/pool error into StoreUnavailable or StoreRejected."""
    if isinstance(exc, PoolTimeout | psycopg.OperationalError | psycopg.InterfaceError):
        return StoreUnavailable(f"database unreachable: {first_line(exc)}")
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate[:2] in _TRANSIENT_CLASSES:
        return StoreUnavailable(f"database unavailable ({sqlstate}): {first_line(exc)}")
    return StoreRejected(f"database refused the call ({sqlstate}): {first_line(exc)}")



def adapt(params: Mapping[str, Any]) -> dict[str, Any]:
    """Query parameters for psycopg: dicts are sent as jsonb."""
    return {k: Jsonb(v) if isinstance(v, dict) else v for k, v in params.items()}


class PostgresTransport:
    name = "postgres"

    def __init__(self, conninfo: str, *, listen: bool = False, pool_size: int = 4,
                 connect_timeout: float = 5.0) -> None:
        self._conninfo = conninfo
        self._listen = listen
        self._connect_timeout = connect_timeout
        self._pool = ConnectionPool(
            conninfo, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout,
            kwargs={"autocommit": True,
                    "connect_timeout": int(connect_timeout)},
            # No check on checkout: it would double every round trip. A connection
            # broken by a server restart fails once (StoreUnavailable, retried by the
            # caller) and the pool replaces it.
            reconnect_timeout=0, name="agent-bridge")
        self._pool_opened = False
        self._listener: psycopg.Connection[Any] | None = None
        self._interrupted = threading.Event()
        self._lock = threading.Lock()

    def call(self, query: Query, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            self._ensure_pool()
            with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                cur.execute(query.sql, adapt(params))
                return cur.fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise classify(exc) from exc

    def _ensure_pool(self) -> None:
        with self._lock:
            if not self._pool_opened:
                self._pool.open(wait=False)
                self._pool_opened = True

    # LISTEN/NOTIFY ------------------------------------------------------------
    def wait_for_wakeup(self, timeout: float) -> bool:
        """Wait for a NOTIFY on the table's channel, in short slices so that
        interrupt() is seen quickly. A (re)connected listener returns True at once:
        notifications sent while it was away are lost, so the caller should look."""
        if not self._listen:
            self._interrupted.wait(timeout)
            return False
        try:
            if self._listener is None or self._listener.closed:
                self._listener = psycopg.connect(
                    self._conninfo, autocommit=True, connect_timeout=int(self._connect_timeout))
                self._listener.execute(f"listen {CHANNEL}")
                return True
            remaining = timeout
            while remaining > 0 and not self._interrupted.is_set():
                slice_ = min(remaining, 0.25)
                # (The generator holds the connection's lock: drain after leaving it.)
                if any(True for _ in self._listener.notifies(timeout=slice_, stop_after=1)):
                    self._drain()
                    return True
                remaining -= slice_
            return False
        except psycopg.Error as exc:
            self._close_listener()
            raise classify(exc) from exc

    def _drain(self) -> None:
        """Swallow notifications already queued: one claim round serves them all."""
        assert self._listener is not None
        # Without waiting: notifies(timeout=...) would block at least one poll, and
        # timeout=0 means "forever" to psycopg. libpq's own queue answers at once.
        pgconn = self._listener.pgconn
        pgconn.consume_input()
        while pgconn.notifies() is not None:
            pass

    def interrupt(self) -> None:
        self._interrupted.set()

    def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(psycopg.Error):
                self._listener.close()
            self._listener = None

    def close(self) -> None:
        self._interrupted.set()
        self._close_listener()
        with self._lock:
            if self._pool_opened:
                self._pool.close()
                self._pool_opened = False
