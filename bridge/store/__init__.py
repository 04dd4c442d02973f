"""The task store: every call on agent_task_requests, over either transport.

Each method runs one named query: a SQL function from the migration
(`sql/queries.sql`; the fencing and the state rules live there, not here) or a
row operation (`sql/rows.sql`). The transport is the only code that touches a
driver: `postgres.py` (psycopg) or `supabase.py` (supabase-py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from bridge.config import Settings
from bridge.queries import load_all
from bridge.store.records import (
    Claim,
    Rescued,
    StartedTask,
    Stats,
    WriteResult,
    request_payload,
)
from bridge.store.transport import Transport

__all__ = ["Claim", "Rescued", "StartedTask", "Stats", "TaskStore", "WriteResult", "open_store",
           "request_payload"]


class TaskStore:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._queries = load_all()

    def _call(self, name: str, **params: Any) -> list[dict[str, Any]]:
        return self.transport.call(self._queries[name], params)

    def _write(self, name: str, **params: Any) -> WriteResult:
        rows = self._call(name, **params)
        if not rows:
            return WriteResult(False, None, None, None)
        row = rows[0]
        return WriteResult(bool(row["applied"]), row["status"], row["attempts"], row["worker"])

    # Bridge -------------------------------------------------------------------
    def claim(self, limit: int, lease_seconds: float) -> list[Claim]:
        rows = self._call("claim", p_limit=limit, p_lease_seconds=lease_seconds)
        return [Claim(str(r["id"]), int(r["attempt"])) for r in rows]

    def release(self, claim: Claim) -> WriteResult:
        return self._write("release", p_id=claim.id, p_attempt=claim.attempt)

    def rescue(self, limit: int = 1000) -> list[Rescued]:
        rows = self._call("rescue", p_limit=limit)
        return [Rescued(str(r["id"]), int(r["attempt"]), str(r["status"])) for r in rows]

    # Worker -------------------------------------------------------------------
    def start(self, task_id: str, attempt: int, worker: str, lease_seconds: float
              ) -> tuple[StartedTask | None, WriteResult]:
        rows = self._call("start", p_id=task_id, p_attempt=attempt, p_worker=worker,
                          p_lease_seconds=lease_seconds)
        if not rows:
            return None, WriteResult(False, None, None, None)
        r = rows[0]
        result = WriteResult(bool(r["applied"]), r["status"], r["attempts"], r["worker"])
        if not result.applied:
            return None, result
        started = StartedTask(
            id=task_id, attempt=attempt, request_payload=r["request_payload"],
            max_attempts=int(r["max_attempts"]), priority=int(r["priority"]),
            user_id=_str_or_none(r["user_id"]), enterprise_id=r["enterprise_id"],
            created_at=_str_or_none(r["created_at"]))
        return started, result

    def heartbeat(self, task_id: str, attempt: int, worker: str, lease_seconds: float
                  ) -> WriteResult:
        return self._write("heartbeat", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_lease_seconds=lease_seconds)

    def progress(self, task_id: str, attempt: int, worker: str, response: Mapping[str, Any]
                 ) -> WriteResult:
        return self._write("progress", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_response=dict(response))

    def complete(self, task_id: str, attempt: int, worker: str, response: Mapping[str, Any]
                 ) -> WriteResult:
        return self._write("complete", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_response=dict(response))

    def fail(self, task_id: str, attempt: int, worker: str, error: Mapping[str, Any]
             ) -> WriteResult:
        return self._write("fail", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_error=dict(error))

    def schedule_retry(self, task_id: str, attempt: int, worker: str, error: Mapping[str, Any],
                       delay_seconds: float, lease_seconds: float) -> WriteResult:
        return self._write("schedule_retry", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_error=dict(error), p_delay_seconds=delay_seconds,
                           p_lease_seconds=lease_seconds)

    # Operators ----------------------------------------------------------------
    def requeue(self, ids: Sequence[str] | None = None, failed_since: datetime | None = None,
                error_type: str | None = None, more_attempts: int = 3) -> list[str]:
        rows = self._call(
            "requeue", p_ids=list(ids) if ids is not None else None,
            p_failed_since=failed_since.isoformat() if failed_since else None,
            p_error_type=error_type, p_more_attempts=more_attempts)
        return [str(r["id"]) for r in rows]

    def stats(self) -> Stats:
        r = self._call("stats")[0]
        oldest = r["oldest_due_seconds"]
        return Stats(int(r["pending"]), int(r["due"]), int(r["processing"]), int(r["completed"]),
                     int(r["failed"]), int(r["expired_leases"]),
                     None if oldest is None else float(oldest))

    def schema_version(self) -> int:
        return int(self._call("schema_version")[0]["agent_bridge_schema_version"])

    # Rows (the CLI) -----------------------------------------------------------
    def insert(self, payload: Mapping[str, Any], priority: int = 0) -> str:
        """Insert a pending request the way the frontend does; returns its id."""
        rows = self._call("insert_task", request_payload=dict(payload), priority=priority)
        return str(rows[0]["id"])

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The row's id, status, attempts, response_payload and error; None if absent."""
        rows = self._call("get_task", id=task_id)
        return dict(rows[0], id=str(rows[0]["id"])) if rows else None

    def installed(self, functions: Sequence[str]) -> tuple[bool, list[str]]:
        """(the table exists, the functions of `functions` that are missing).
        Direct mode only: it reads the catalog."""
        row = self._call("installed", functions=list(functions))[0]
        return bool(row["has_table"]), list(row["missing_functions"])

    # Wake-ups -----------------------------------------------------------------
    def wait_for_work(self, timeout: float) -> bool:
        return self.transport.wait_for_wakeup(timeout)

    def interrupt(self) -> None:
        self.transport.interrupt()

    def close(self) -> None:
        self.transport.close()


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def open_store(settings: Settings, *, listen: bool = False, pool: bool = True) -> TaskStore:
    """A store on the configured transport: the one way the bridge, the workers and
    the CLI open it. `listen`: wake on NOTIFY (direct mode). `pool=False`: one
    connection that fails at once when the server is down, for one-shot commands."""
    settings.require_store()
    if settings.store_kind == "postgres":
        from bridge.store.postgres import PostgresTransport

        return TaskStore(PostgresTransport(settings.database_url, listen=listen, pool=pool))
    from bridge.store.supabase import SupabaseTransport

    return TaskStore(SupabaseTransport(settings.supabase_url, settings.supabase_service_key,
                                       timeout=settings.supabase_timeout))
