"""The task store: every call on agent_task_requests, over either transport.

Each method runs one named query: a SQL function from the migration
(`sql/queries.sql`; the fencing and the state rules live there, not here) or a
row operation (`sql/rows.sql`). The transport is the only code that touches a
driver: `postgres.py` (psycopg) or `supabase.py` (supabase-py).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from bridge.config import Settings
from bridge.errors import MISSING_CODES, SchemaMissing, StoreError, StoreRejected
from bridge.migrate import SCHEMA_VERSION
from bridge.names import CANCEL_CHANNEL, WAKE_CHANNEL
from bridge.queries import load_all
from bridge.store.records import (
    AgentSpend,
    AgentStats,
    Claim,
    Pruned,
    Rescued,
    StartedTask,
    Stats,
    TenantSpend,
    Write,
    WriteResult,
    request_payload,
)
from bridge.store.transport import Transport

__all__ = ["CANCEL_CHANNEL", "WAKE_CHANNEL", "AgentSpend", "AgentStats", "Claim", "Pruned",
           "Rescued", "StartedTask", "Stats", "TaskStore", "TenantSpend", "Write", "WriteResult",
           "open_store", "request_payload"]


class TaskStore:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._queries = load_all()

    def _call(self, name: str, **params: Any) -> list[dict[str, Any]]:
        try:
            return self.transport.call(self._queries[name], params)
        except StoreRejected as exc:
            if exc.code not in MISSING_CODES or isinstance(exc, SchemaMissing):
                raise
            raise self._schema_problem(name, exc) from exc

    def _schema_problem(self, name: str, exc: StoreRejected) -> StoreRejected:
        """A call met a missing table, function or column: SchemaMissing naming the
        installed version and the fix, unless the schema is the expected one (then
        the error as it was)."""
        fix = ("run `agent-bridge migrate`" if self.transport.name == "postgres" else
               "run `supabase db push` (or `agent-bridge migrate` with DATABASE_URL)")
        if name == "schema_version":
            return SchemaMissing(None, SCHEMA_VERSION, fix, exc.code)
        try:
            found: int | None = self.schema_version()
        except SchemaMissing:
            found = None
        except StoreError:
            return exc
        if found == SCHEMA_VERSION:
            return exc
        return SchemaMissing(found, SCHEMA_VERSION, fix, exc.code)

    def _write(self, name: str, **params: Any) -> WriteResult:
        rows = self._call(name, **params)
        if not rows:
            return WriteResult(False, None, None, None)
        return _write_result(rows[0])

    # Bridge -------------------------------------------------------------------
    def claim(self, limit: int, lease_seconds: float, *, tenant_concurrency: int = 0,
              agents: Sequence[str] | None = None, inline_bytes: int = 0) -> list[Claim]:
        """Up to `limit` due rows, taking turns across tenants, in the order they should
        run; at most `tenant_concurrency` rows of one tenant processing (0: no cap;
        agent_tenant_limits may say otherwise per tenant); `agents`: only their rows.
        A row whose payload is at most `inline_bytes` comes with it (Claim.row)."""
        if self.transport.max_rows is not None:
            # Over Supabase's API, rows past db-max-rows would be claimed but not returned.
            limit = min(limit, self.transport.max_rows)
        rows = self._call("claim", p_limit=limit, p_lease_seconds=lease_seconds,
                          p_tenant_concurrency=tenant_concurrency,
                          p_agents=list(agents) if agents is not None else None,
                          p_inline_bytes=inline_bytes)
        return [Claim(str(r["id"]), int(r["attempt"]), str(r.get("agent") or "default"),
                      _message_row(r)) for r in rows]

    def release(self, claim: Claim) -> WriteResult:
        return self._write("release", p_id=claim.id, p_attempt=claim.attempt)

    def rescue(self, limit: int = 1000) -> list[Rescued]:
        """Every expired lease, in pages of at most `limit` (and under the transport's
        max rows), until a page comes back short."""
        page = self._page(limit)
        rescued: list[Rescued] = []
        while True:
            rows = self._call("rescue", p_limit=page)
            rescued += [Rescued(str(r["id"]), int(r["attempt"]), r["status"])
                        for r in rows]
            if len(rows) < page:
                return rescued

    def _page(self, limit: int) -> int:
        cap = self.transport.max_rows
        return max(1, min(limit, cap) if cap is not None else limit)

    # Worker -------------------------------------------------------------------
    def start(self, task_id: str, attempt: int, worker: str, lease_seconds: float,
              spend: Mapping[str, Any] | None = None
              ) -> tuple[StartedTask | None, WriteResult]:
        """Take the attempt; with `spend` (what the handler may spend: {tokens, cost}),
        reserve it from the tenant's budget (refused, and the row failed, when spent)."""
        rows = self._call("start", p_id=task_id, p_attempt=attempt, p_worker=worker,
                          p_lease_seconds=lease_seconds,
                          p_spend=dict(spend) if spend is not None else None)
        if not rows:
            return None, WriteResult(False, None, None, None)
        r = rows[0]
        result = _write_result(r)
        if not result.applied:
            return None, result
        return _started(task_id, attempt, r), result

    def bind(self, task_id: str, attempt: int, worker: str, lease_seconds: float,
             spend: Mapping[str, Any] | None = None) -> WriteResult:
        """Take the attempt when the message carried the payload: `start`'s fence and
        reservation, with nothing read back (a payload of up to AGENT_INLINE_PAYLOAD_BYTES is
        neither sent again nor parsed again)."""
        return self._write("bind", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_lease_seconds=lease_seconds,
                           p_spend=dict(spend) if spend is not None else None)

    def write_batch(self, writes: Sequence[Write]
                    ) -> list[tuple[WriteResult, StartedTask | None]]:
        """`writes` in one call and one transaction (public.agent_tasks_write), each fenced
        by its (attempt, worker): one (result, started task of an applied `start`) per
        write, in order. The commit waits for the disk only when an outcome is among them.
        One write alone goes to its single-row function: the same rules (tests hold the two
        equal), without arrays to send and unpack."""
        if len(writes) == 1:
            return [self._write_one(writes[0])]
        rows = self._call(
            "write_batch", p_kinds=[w.kind for w in writes], p_ids=[w.task_id for w in writes],
            p_attempts=[w.attempt for w in writes], p_workers=[w.worker for w in writes],
            p_docs=[dict(w.doc) if w.doc is not None else None for w in writes],
            p_seconds=[w.seconds for w in writes], p_delays=[w.delay for w in writes],
            p_seqs=[w.seq for w in writes], p_offsets=[w.offset for w in writes],
            p_texts=[w.text for w in writes])
        by_ord = {int(r["ord"]): r for r in rows}
        results: list[tuple[WriteResult, StartedTask | None]] = []
        for ord_, write in enumerate(writes, start=1):
            r = by_ord.get(ord_)
            if r is None:
                results.append((WriteResult(False, None, None, None), None))
                continue
            result = _write_result(r)
            started = (_started(write.task_id, write.attempt, r)
                       if result.applied and write.kind == "start" else None)
            results.append((result, started))
        return results

    def _write_one(self, w: Write) -> tuple[WriteResult, StartedTask | None]:
        """One write through its single-row function (see write_batch)."""
        doc = dict(w.doc) if w.doc is not None else None
        if w.kind == "bind":
            return self.bind(w.task_id, w.attempt, w.worker, _seconds(w.seconds), doc), None
        if w.kind == "start":
            started, result = self.start(w.task_id, w.attempt, w.worker, _seconds(w.seconds),
                                         doc)
            return result, started
        if w.kind == "usage":
            return self._write("report_usage", p_id=w.task_id, p_attempt=w.attempt,
                               p_worker=w.worker, p_usage=doc, p_run=w.seq), None
        if w.kind == "heartbeat":
            return self.heartbeat(w.task_id, w.attempt, w.worker, _seconds(w.seconds)), None
        if w.kind == "append":
            return self._write("append", p_id=w.task_id, p_attempt=w.attempt,
                               p_worker=w.worker, p_seq=w.seq, p_offset=w.offset,
                               p_text=w.text), None
        if w.kind == "retry":
            return self._write("schedule_retry", p_id=w.task_id, p_attempt=w.attempt,
                               p_worker=w.worker, p_error=doc, p_delay_seconds=w.delay,
                               p_lease_seconds=w.seconds), None
        if w.kind == "wait":
            return self._write("wait", p_id=w.task_id, p_attempt=w.attempt, p_worker=w.worker,
                               p_waiting=doc, p_timeout_seconds=w.seconds), None
        if w.kind == "fail":
            return self._write("fail", p_id=w.task_id, p_attempt=w.attempt, p_worker=w.worker,
                               p_error=doc), None
        # progress, complete, cancelled: the document is the response
        return self._write(w.kind, p_id=w.task_id, p_attempt=w.attempt, p_worker=w.worker,
                           p_response=doc), None

    def heartbeat(self, task_id: str, attempt: int, worker: str, lease_seconds: float
                  ) -> WriteResult:
        return self._write("heartbeat", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_lease_seconds=lease_seconds)

    def progress(self, task_id: str, attempt: int, worker: str, response: Mapping[str, Any]
                 ) -> WriteResult:
        return self._write("progress", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_response=dict(response))

    def append(self, task_id: str, attempt: int, worker: str, seq: int, offset: int, text: str
               ) -> WriteResult:
        """A piece of the streamed answer: answer = answer[:offset] + text, the `seq`-th of
        this attempt (agent_task_chunks); fenced like `progress`, the row is not written."""
        return self._write("append", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_seq=seq, p_offset=offset, p_text=text)

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

    # Questions (human in the loop) -----------------------------------------------
    def answers(self, task_id: str, attempt: int, worker: str) -> list[dict[str, Any]] | None:
        """The answers so far ({question, answer, answered_at} each, in the order asked), for
        the attempt's holder; None when (attempt, worker) no longer holds the row."""
        rows = self._call("answers", p_id=task_id, p_attempt=attempt, p_worker=worker)
        found = rows[0]["answers"] if rows else None
        return list(found) if isinstance(found, list) else None

    # Cancellation -------------------------------------------------------------
    def cancel(self, task_id: str) -> str | None:
        """cancel_agent_task(): the row's status afterwards ('failed': ended now;
        'processing': its worker was asked to stop); None if there is no such row."""
        rows = self._call("cancel", task_id=task_id)
        return _str_or_none(rows[0]["cancel_agent_task"]) if rows else None

    def request_cancel(self, task_id: str, attempt: int, *, holder_gone: bool = False
                       ) -> str | None:
        """Cancel attempt `attempt` only (a revoked Celery job); `holder_gone`: its worker
        process is dead, so end the row now. The status afterwards; None if no such row."""
        rows = self._call("request_cancel", p_id=task_id, p_attempt=attempt,
                          p_holder_gone=holder_gone)
        return _str_or_none(rows[0]["agent_task_request_cancel"]) if rows else None

    def cancelled(self, task_id: str, attempt: int, worker: str,
                  partial: Mapping[str, Any] | None) -> WriteResult:
        """End a cancelled attempt, keeping `partial` (else the row's partial answer)."""
        return self._write("cancelled", p_id=task_id, p_attempt=attempt, p_worker=worker,
                           p_response=dict(partial) if partial is not None else None)

    def cancel_requested(self, held: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """The (id, attempt) pairs of `held` that have been asked to stop."""
        if not held:
            return set()
        rows = self._call("cancel_requested", p_ids=[i for i, _ in held],
                          p_attempts=[a for _, a in held])
        return {(str(r["id"]), int(r["attempt"])) for r in rows}

    def wait_for_cancels(self, timeout: float) -> list[tuple[str, int]] | None:
        """(id, attempt) pairs asked to stop, from NOTIFY (a store opened with
        channel=CANCEL_CHANNEL); None when notifications may have been missed."""
        payloads = self.transport.wait_for_notifications(timeout)
        if payloads is None:
            return None
        found = []
        for payload in payloads:
            task_id, _, attempt = payload.rpartition(":")
            if task_id and attempt.isdigit():
                found.append((task_id, int(attempt)))
        return found

    # Operators ----------------------------------------------------------------
    def requeue(self, ids: Sequence[str] | None = None, failed_since: datetime | None = None,
                error_type: str | None = None, more_attempts: int = 3, page: int = 1000
                ) -> list[str]:
        """Failed rows back to pending, in pages (under the transport's max rows) until
        a page comes back short; the ids requeued."""
        size = self._page(page)
        requeued: list[str] = []
        while True:
            rows = self._call(
                "requeue", p_ids=list(ids) if ids is not None else None,
                p_failed_since=failed_since.isoformat() if failed_since else None,
                p_error_type=error_type, p_more_attempts=more_attempts, p_limit=size)
            requeued += [str(r["id"]) for r in rows]
            if len(rows) < size:
                return requeued

    def stats(self) -> Stats:
        r = self._call("stats")[0]
        oldest = r["oldest_due_seconds"]
        return Stats(int(r["pending"]), int(r["due"]), int(r["processing"]), int(r["completed"]),
                     int(r["failed"]), int(r["expired_leases"]),
                     None if oldest is None else float(oldest))

    def agent_stats(self) -> list[AgentStats]:
        """Counts per agent (every agent that has rows)."""
        return [AgentStats(str(r["agent"]), int(r["pending"]), int(r["due"]),
                           int(r["processing"]), int(r["completed"]), int(r["failed"]),
                           None if r["oldest_due_seconds"] is None
                           else float(r["oldest_due_seconds"]))
                for r in self._call("agent_stats")]

    def register_agents(self, agents: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Make `agents` ({name: {"queue", "max_attempts"}}) the agents inserts may name,
        besides `default`; returns the names now registered."""
        rows = self._call("register_agents", p_agents={k: dict(v) for k, v in agents.items()})
        return [str(r["name"]) for r in rows]

    def prune(self, older_than: timedelta, batch: int = 500, *, dry_run: bool = False
              ) -> Pruned:
        """One retention batch (agent_tasks_prune, one short transaction): at most `batch`
        finished rows older than `older_than` deleted with their chunks, and at most
        `batch` old day counters. `dry_run`: how many there are in all; nothing deleted."""
        rows = self._call("prune", p_older_than=f"{older_than.total_seconds():f} seconds",
                          p_batch=batch, p_dry_run=dry_run)
        return Pruned(int(rows[0]["tasks"]), int(rows[0]["day_usage"]))

    def tenants_usage(self) -> list[TenantSpend]:
        """Every tenant with spend on record or a budget of its own, in its current period."""
        def number(value: Any) -> float | None:
            return None if value is None else float(value)
        return [TenantSpend(
            tenant=str(r["tenant"]), period=str(r["period"]),
            period_start=str(r["period_start"]), resets_at=str(r["resets_at"]),
            token_budget=r["token_budget"], cost_budget=number(r["cost_budget"]),
            tokens=int(r["tokens"]), cost=float(r["cost"]),
            reserved_tokens=int(r["reserved_tokens"]), reserved_cost=float(r["reserved_cost"]),
            tokens_left=r["tokens_left"], cost_left=number(r["cost_left"]))
            for r in self._call("tenants_usage")]

    def usage_totals(self) -> list[AgentSpend]:
        """Every agent's spend since the start."""
        return [AgentSpend(str(r["agent"]), int(r["input_tokens"]), int(r["output_tokens"]),
                           int(r["unreported_tokens"]), float(r["cost"]))
                for r in self._call("usage_totals")]

    def schema_version(self) -> int:
        return int(self._call("schema_version")[0]["agent_bridge_schema_version"])

    # Rows (the CLI) -----------------------------------------------------------
    def insert(self, payload: Mapping[str, Any], priority: int = 0, agent: str = "default",
               idempotency_key: str | None = None) -> str:
        """Insert a pending request the way the frontend does; returns its id. With an
        idempotency key in use (this agent, the service's rows) it raises StoreRejected
        with code 23505 and stores nothing: keyed_task finds the row that has it."""
        if idempotency_key is None:
            rows = self._call("insert_task", request_payload=dict(payload),
                              priority=priority, agent=agent)
        else:
            rows = self._call("insert_keyed_task", request_payload=dict(payload),
                              priority=priority, agent=agent, idempotency_key=idempotency_key)
        return str(rows[0]["id"])

    def keyed_task(self, agent: str, idempotency_key: str) -> str | None:
        """The id of the service's own row (no user_id) for `agent` that has this key."""
        rows = self._call("keyed_task", agent=agent, idempotency_key=idempotency_key)
        return str(rows[0]["id"]) if rows else None

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The row's id, status, attempts, response_payload and error; None if absent."""
        rows = self._call("get_task", id=task_id)
        return dict(rows[0], id=str(rows[0]["id"])) if rows else None

    def show(self, task_id: str) -> dict[str, Any] | None:
        """The row in full but its request_payload (state, attempts, error, answer and
        timings), for `agent-bridge show`; None if absent."""
        rows = self._call("show_task", id=task_id)
        return dict(rows[0], id=str(rows[0]["id"])) if rows else None

    def find(self, prefix: str, limit: int = 4) -> list[str]:
        """Up to `limit` ids that start with `prefix` (hex digits, hyphens left out), in
        order: a range on the primary key, from the prefix padded with 0s to the prefix
        padded with fs, so both transports serve it from the index (PostgREST: gte/lte)."""
        low, high = (str(uuid.UUID(prefix.ljust(32, pad))) for pad in "0f")
        return [str(r["id"]) for r in self._call("find_ids", low=low, high=high, limit=limit)]

    def streamed_answer(self, task_id: str, attempt: int) -> str | None:
        """The answer attempt `attempt` has streamed so far, rebuilt from its chunks
        (agent_task_chunks: answer = answer[:offset] + text, in seq order, as
        agent_bridge.streamed_answer does); None when it has streamed none."""
        answer: str | None = None
        after, page = -1, self._page(1000)
        while True:
            rows = self._call("get_chunks", id=task_id, attempt=attempt, after=after,
                              limit=page)
            for r in rows:
                answer = (answer or "")[:int(r["answer_offset"])] + str(r["text"])
                after = int(r["seq"])
            if len(rows) < page:
                return answer

    def latest_failures(self, limit: int = 5) -> list[dict[str, Any]]:
        """The `limit` most recently failed rows: id, agent, attempts, finished_at, error."""
        return [dict(r, id=str(r["id"])) for r in self._call("latest_failures", limit=limit)]

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


def _write_result(row: Mapping[str, Any]) -> WriteResult:
    return WriteResult(bool(row["applied"]), row["status"], row["attempts"], row["worker"],
                       row.get("budget"))


def _started(task_id: str, attempt: int, row: Mapping[str, Any]) -> StartedTask:
    """The task a worker may run, from a start's row (what its handler receives)."""
    return StartedTask(
        id=task_id, attempt=attempt, request_payload=row["request_payload"],
        max_attempts=int(row["max_attempts"]), priority=int(row["priority"]),
        user_id=_str_or_none(row["user_id"]), enterprise_id=row["enterprise_id"],
        created_at=_str_or_none(row["created_at"]), agent=str(row.get("agent") or "default"),
        budget=row.get("budget"))


def _message_row(claimed: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a Celery message carries of a claimed row (JSON: ids and times as text), or
    None when the claim did not return its payload."""
    if claimed.get("request_payload") is None:
        return None
    return {"request_payload": claimed["request_payload"],
            "max_attempts": int(claimed["max_attempts"]), "priority": int(claimed["priority"]),
            "user_id": _str_or_none(claimed["user_id"]),
            "enterprise_id": claimed["enterprise_id"],
            "created_at": _str_or_none(claimed["created_at"]),
            "agent": str(claimed.get("agent") or "default")}


def _seconds(value: float | None) -> float:
    """A lease or delay as the single-row functions take it (None: refused there)."""
    return float("nan") if value is None else value


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def open_store(settings: Settings, *, listen: bool = False, pool: bool = True,
               channel: str = WAKE_CHANNEL) -> TaskStore:
    """A store on the configured transport: the one way the bridge, the workers and
    the CLI open it. `listen`: wake on NOTIFY on `channel` (direct mode; a worker's
    cancel watcher listens on CANCEL_CHANNEL). `pool=False`: one connection that
    fails at once when the server is down, for one-shot commands."""
    settings.require_store()
    if settings.store_kind == "postgres":
        from bridge.store.postgres import PostgresTransport

        return TaskStore(PostgresTransport(settings.database_url, listen=listen, pool=pool,
                                           channel=channel))
    from bridge.store.supabase import SupabaseTransport

    return TaskStore(SupabaseTransport(settings.supabase_url, settings.supabase_service_key,
                                       timeout=settings.supabase_timeout,
                                       realtime=(listen and channel == WAKE_CHANNEL
                                                 and settings.supabase_realtime),
                                       max_rows=settings.supabase_max_rows))
