"""What the store's calls return: small frozen records, the same for both transports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bridge.names import Status


def request_payload(prompt: str, context: Mapping[str, Any] | None) -> dict[str, Any]:
    """The frontend's request_payload: {prompt, context}."""
    return {"prompt": prompt, "context": dict(context or {})}


@dataclass(frozen=True)
class Claim:
    """A row the bridge claimed. Its Celery message is (id, attempt), plus `row` when the
    claim returned the payload (at most AGENT_INLINE_PAYLOAD_BYTES): what the worker's
    handler receives, so the worker reads nothing to start. The agent picks the queue."""

    id: str
    attempt: int
    agent: str = "default"
    row: Mapping[str, Any] | None = None  # StartedTask.from_message reads it


WriteKind = Literal["bind", "start", "heartbeat", "append", "progress", "complete", "fail",
                   "retry", "cancelled", "usage", "wait"]
OUTCOMES: frozenset[WriteKind] = frozenset({"complete", "fail", "retry", "cancelled", "wait"})


@dataclass(frozen=True)
class Write:
    """One fenced write of attempt (`task_id`, `attempt`) held by `worker`, as
    public.agent_tasks_write takes it: `doc` is the response (complete, progress), the
    error (fail, retry), the partial answer kept (cancelled), what the handler may spend
    (bind, start: {tokens, cost}), what it spent (usage; `seq` is the run) or what it asks
    its user (wait: {question}); `seconds` the lease (bind, start, heartbeat, retry) or the
    question's timeout (wait); `delay` the retry's backoff; `seq`, `offset` and
    `text` a streamed piece (append)."""

    kind: WriteKind
    task_id: str
    attempt: int
    worker: str
    doc: Mapping[str, Any] | None = None
    seconds: float | None = None
    delay: float | None = None
    seq: int | None = None
    offset: int | None = None
    text: str | None = None


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a fenced write, and the row as the write found it."""

    applied: bool
    status: Status | None  # None: no such row
    attempts: int | None
    worker: str | None
    # What an applied bind or start reserved from the tenant's budget ({tokens, cost}).
    budget: Mapping[str, Any] | None = None

    def refusal(self, attempt: int) -> str:
        """Why a fenced write changed nothing, in words for a log line."""
        if self.status is None:
            return "the row no longer exists"
        if self.attempts != attempt:
            return f"the row is at attempt {self.attempts} (status {self.status})"
        if self.status != "processing":
            return f"the row is already {self.status}"
        return f"another worker holds this attempt ({self.worker})"


@dataclass(frozen=True)
class StartedTask:
    """A row a worker may now run, with what its handler receives."""

    id: str
    attempt: int
    request_payload: Any
    max_attempts: int
    priority: int
    user_id: str | None
    enterprise_id: str | None
    created_at: str | None
    agent: str = "default"
    # What the bind reserved for the handler ({tokens, cost}); None: nothing declared.
    budget: Mapping[str, Any] | None = None

    @classmethod
    def from_message(cls, task_id: str, attempt: int, row: Mapping[str, Any]) -> StartedTask:
        """The row a Celery message carried (`Claim.message_row`)."""
        return cls(id=task_id, attempt=attempt, request_payload=row.get("request_payload"),
                   max_attempts=int(row["max_attempts"]), priority=int(row.get("priority", 0)),
                   user_id=row.get("user_id"), enterprise_id=row.get("enterprise_id"),
                   created_at=row.get("created_at"), agent=str(row.get("agent") or "default"))

    def as_handler_input(self) -> dict[str, Any]:
        """The `task` dict a handler receives (the integration guide's `process_task(task)`)."""
        return {
            "id": self.id,
            "attempt": self.attempt,
            "request_payload": self.request_payload,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "user_id": self.user_id,
            "enterprise_id": self.enterprise_id,
            "created_at": self.created_at,
            "agent": self.agent,
            **({"budget": dict(self.budget)} if self.budget is not None else {}),
        }


@dataclass(frozen=True)
class Rescued:
    id: str
    attempt: int
    status: Status  # 'pending' again, or 'failed' when attempts ran out


@dataclass(frozen=True)
class AgentStats:
    """One agent's rows, for `status` and the bridge's per-agent metrics."""

    agent: str
    pending: int
    due: int
    processing: int
    completed: int
    failed: int
    oldest_due_seconds: float | None


@dataclass(frozen=True)
class Stats:
    pending: int
    due: int
    processing: int
    completed: int
    failed: int
    expired_leases: int
    oldest_due_seconds: float | None


@dataclass(frozen=True)
class Pruned:
    """What one retention call deleted (a dry run: what it would delete)."""

    tasks: int  # finished rows of agent_task_requests, with their chunks
    day_usage: int  # per-user day counters of days before yesterday


@dataclass(frozen=True)
class TenantSpend:
    """One tenant's budgets and spend in its current period (public.agent_tenants_usage).
    Budgets and what is left are None where the tenant has no such budget; what is left
    counts what running attempts hold as spent."""

    tenant: str
    period: str  # 'day' or 'month' (UTC)
    period_start: str
    resets_at: str
    token_budget: int | None
    cost_budget: float | None
    tokens: int
    cost: float
    reserved_tokens: int
    reserved_cost: float
    tokens_left: int | None
    cost_left: float | None


@dataclass(frozen=True)
class AgentSpend:
    """One agent's spend since the start (public.agent_tasks_usage_totals)."""

    agent: str
    input_tokens: int
    output_tokens: int
    unreported_tokens: int  # reservations charged whole: runs that did not report
    cost: float

