"""Direct transport: psycopg 3, the only module that talks to the psycopg driver.

A long-running process (bridge, worker) gets a connection pool and, for the bridge,
LISTEN for wake-ups; a one-shot command gets one connection that fails at once when
the server is down. Every driver error is classified here, by SQLSTATE.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from bridge.errors import StoreRejected, StoreUnavailable, first_line, is_transient
from bridge.names import WAKE_CHANNEL
from bridge.queries import Query


def classify(exc: BaseException) -> Exception:
    """Turn a psycopg/pool error into StoreUnavailable or StoreRejected."""
    if isinstance(exc, PoolTimeout):
        return StoreUnavailable(f"database unreachable: {first_line(exc)}")
    sqlstate = getattr(exc, "sqlstate", None)
    if is_transient(sqlstate):
        return StoreUnavailable(f"database unavailable ({sqlstate}): {first_line(exc)}",
                                sqlstate)
    if sqlstate is None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        # No SQLSTATE: the connection itself failed (refused, reset, closed).
        return StoreUnavailable(f"database unreachable: {first_line(exc)}")
    return StoreRejected(f"database refused the call ({sqlstate or 'client'}): {first_line(exc)}",
                         sqlstate)


def describe(conninfo: str) -> str:
    """`host:port/dbname` of a connection string, without the password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:  # psycopg rejects it later, with its own message
        return "?"
    return (f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
            f"/{params.get('dbname') or ''}")


def adapt(params: Mapping[str, Any]) -> dict[str, Any]:
    """Query parameters for psycopg: dicts, and dicts in lists, are sent as jsonb."""
    return {k: Jsonb(v) if isinstance(v, dict) else
            [Jsonb(x) if isinstance(x, dict) else x for x in v] if isinstance(v, list) else v
            for k, v in params.items()}


class PostgresTransport:
    name = "postgres"
    max_rows: int | None = None

    def __init__(self, conninfo: str, *, listen: bool = False, pool: bool = True,
                 pool_size: int = 4, connect_timeout: float = 5.0, channel: str = WAKE_CHANNEL
                 ) -> None:
        self._conninfo = conninfo
        self._listen = listen
        self._channel = sql.Identifier(channel)
        self._connect_timeout = connect_timeout
        self._pool: ConnectionPool | None = None
        if pool:
            self._pool = ConnectionPool(
                conninfo, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout,
                kwargs={"autocommit": True, "connect_timeout": int(connect_timeout)},
                # No check on checkout: it would double every round trip. A connection
                # broken by a server restart fails once (StoreUnavailable, retried by the
                # caller) and the pool replaces it.
                reconnect_timeout=0, name="agent-bridge")
        self._pool_opened = False
        self._single: psycopg.Connection[Any] | None = None
        self._listener: psycopg.Connection[Any] | None = None
        self._interrupted = threading.Event()
        self._lock = threading.Lock()

    def call(self, query: Query, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                cur.execute(query.sql, adapt(params))
                return cur.fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise classify(exc) from exc

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self._pool is not None:
            with self._lock:
                if not self._pool_opened:
                    self._pool.open(wait=False)
                    self._pool_opened = True
            with self._pool.connection() as conn:
                yield conn
            return
        # One connection, opened on first use and again after it broke.
        with self._lock:
            if self._single is None or self._single.closed:
                self._single = psycopg.connect(self._conninfo, autocommit=True,
                                               connect_timeout=int(self._connect_timeout))
            conn = self._single
            try:
                yield conn
            finally:
                if conn.broken:
                    conn.close()

    # LISTEN/NOTIFY ------------------------------------------------------------
    def wait_for_wakeup(self, timeout: float) -> bool:
        """Wait for a NOTIFY on the table's channel (what is queued behind it is swallowed:
        one claim round serves them all). A (re)connected listener returns True at once:
        notifications sent while it was away are lost, so the caller should look."""
        return self.wait_for_notifications(timeout) != []

    def wait_for_notifications(self, timeout: float) -> list[str] | None:
        """The payloads of NOTIFYs on the channel within `timeout`, in short slices so
        that interrupt() is seen quickly. None after (re)connecting the listener:
        notifications sent while it was away are lost, so the caller should look."""
        if not self._listen:
            self._interrupted.wait(timeout)
            return []
        try:
            if self._listener is None or self._listener.closed:
                self._listener = psycopg.connect(
                    self._conninfo, autocommit=True, connect_timeout=int(self._connect_timeout))
                self._listener.execute(sql.SQL("listen {}").format(self._channel))
                return None
            remaining = timeout
            while remaining > 0 and not self._interrupted.is_set():
                slice_ = min(remaining, 0.25)
                # (The generator holds the connection's lock: read the queue after it.)
                payloads = [n.payload for n in self._listener.notifies(timeout=slice_,
                                                                      stop_after=1)]
                if payloads:
                    return payloads + self._queued()
                remaining -= slice_
            return []
        except psycopg.Error as exc:
            self._close_listener()
            raise classify(exc) from exc

    def _queued(self) -> list[str]:
        """The payloads of notifications already queued, at once: notifies(timeout=...)
        would block at least one poll, and timeout=0 means "forever" to psycopg; libpq's
        own queue answers without waiting."""
        assert self._listener is not None
        pgconn = self._listener.pgconn
        pgconn.consume_input()
        payloads = []
        while (queued := pgconn.notifies()) is not None:
            payloads.append(queued.extra.decode())
        return payloads

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
            if self._pool is not None and self._pool_opened:
                self._pool.close()
                self._pool_opened = False
            if self._single is not None:
                self._single.close()
                self._single = None
