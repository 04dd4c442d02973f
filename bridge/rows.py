"""Rows and the task store for the CLI commands: insert a request, read it back.

Postgres mode runs the named blocks of `sql/rows.sql` (parsed like `queries.sql`);
Supabase mode uses supabase-py's table API with the service key, the way the
frontend inserts. Driver errors become StoreUnavailable/StoreRejected.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any, Protocol

import httpx
import psycopg
from psycopg.rows import dict_row

from bridge.config import Settings
from bridge.errors import StoreRejected
from bridge.queries import Query, parse
from bridge.store import TaskStore, open_store
from bridge.store import postgres as pg_store

TABLE = "agent_task_requests"
COLUMNS = ("id", "status", "attempts", "response_payload", "error")  # what get() returns


@cache
def load_rows() -> dict[str, Query]:
    """The named blocks of sql/rows.sql (`insert_task`, `get_task`, `installed`)."""
    text = resources.files("bridge").joinpath("sql/rows.sql").read_text(encoding="utf-8")
    return parse(text, require_function=False)


def request_payload(prompt: str, context: Mapping[str, Any] | None) -> dict[str, Any]:
    """The frontend's request_payload: {prompt, context}."""
    return {"prompt": prompt, "context": dict(context or {})}


class Rows(Protocol):
    def insert(self, payload: Mapping[str, Any], priority: int = 0) -> str:
        """Insert a pending request; returns its id."""
        ...

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The row's COLUMNS, or None when there is no such row."""
        ...

    def close(self) -> None: ...


class PostgresRows:
    """One psycopg connection (autocommit), opened on first use and after a failure.

    Also a store Transport: a one-shot command gets a TaskStore on it (see
    `open_cli_store`) that fails at once when the server is down, without a pool.
    """

    name = "postgres"

    def __init__(self, conninfo: str, *, connect_timeout: int = 5) -> None:
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[dict[str, Any]] | None = None

    def run(self, name: str, **params: Any) -> list[dict[str, Any]]:
        return self.call(load_rows()[name], params)

    def call(self, query: Query, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._conninfo, autocommit=True,
                                             connect_timeout=self._connect_timeout,
                                             row_factory=dict_row)
            return self._conn.execute(query.sql, pg_store.adapt(params)).fetchall()
        except psycopg.Error as exc:
            if self._conn is not None and self._conn.broken:
                self.close()
            raise pg_store.classify(exc) from exc

    def insert(self, payload: Mapping[str, Any], priority: int = 0) -> str:
        rows = self.run("insert_task", request_payload=dict(payload), priority=priority)
        return str(rows[0]["id"])

    def get(self, task_id: str) -> dict[str, Any] | None:
        rows = self.run("get_task", id=task_id)
        return dict(rows[0], id=str(rows[0]["id"])) if rows else None

    def installed(self, functions: Sequence[str]) -> tuple[bool, list[str]]:
        """(the table exists, the functions of `functions` that are missing)."""
        row = self.run("installed", functions=list(functions))[0]
        return bool(row["has_table"]), list(row["missing_functions"])

    def wait_for_wakeup(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False

    def interrupt(self) -> None:
        """Nothing to interrupt: a one-shot command never waits for wake-ups."""

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SupabaseRows:
    """The table API of supabase-py (the frontend's way in), with the service key."""

    def __init__(self, url: str, service_key: str, *, timeout: float = 10.0) -> None:
        from bridge.store.supabase import make_client  # only in Supabase mode: slow import

        self._client = make_client(url, service_key, timeout)

    def insert(self, payload: Mapping[str, Any], priority: int = 0) -> str:
        row = {"status": "pending", "request_payload": dict(payload), "priority": priority}
        try:
            data = self._client.table(TABLE).insert(row).execute().data
        except _supabase_errors() as exc:
            raise _classify_supabase(exc) from exc
        first = data[0] if isinstance(data, list) and data else None
        if not isinstance(first, dict) or "id" not in first:
            raise StoreRejected("Supabase stored the row but returned no id")
        return str(first["id"])

    def get(self, task_id: str) -> dict[str, Any] | None:
        try:
            data = (self._client.table(TABLE).select(",".join(COLUMNS))
                    .eq("id", task_id).execute().data)
        except _supabase_errors() as exc:
            raise _classify_supabase(exc) from exc
        first = data[0] if isinstance(data, list) and data else None
        return dict(first) if isinstance(first, dict) else None

    def close(self) -> None:
        self._client.postgrest.session.close()


def _supabase_errors() -> tuple[type[Exception], ...]:
    """What supabase-py raises (imported only when an error is being handled)."""
    from postgrest.exceptions import APIError

    return APIError, httpx.HTTPError


def _classify_supabase(exc: Exception) -> Exception:
    from bridge.store.supabase import classify

    return classify(exc)


def open_cli_store(settings: Settings) -> TaskStore:
    """The task store for a one-shot command: one direct connection in Postgres mode,
    the usual Supabase transport otherwise."""
    settings.require_store()
    if settings.store_kind == "postgres":
        return TaskStore(PostgresRows(settings.database_url))
    return open_store(settings)


def open_rows(settings: Settings) -> Rows:
    settings.require_store()
    if settings.store_kind == "postgres":
        return PostgresRows(settings.database_url)
    return SupabaseRows(settings.supabase_url, settings.supabase_service_key,
                        timeout=settings.supabase_timeout)
