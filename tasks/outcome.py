"""How an attempt ends: completed, failed, retried, cancelled or waiting for its user's
answer, and the fenced write of each.

Every write is fenced by (attempt, worker) in SQL. An outcome the database refuses for
its content (too large, a NUL, not JSON) becomes a failure with a readable error, never
a row left to its lease, whose rescue would run (and pay for) the handler again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from bridge.agents import DEFAULT, Agent
from bridge.config import Settings
from bridge.errors import (
    AgentBridgeError,
    StoreError,
    StoreRejected,
    StoreUnavailable,
    first_line,
)
from bridge.logs import escape_controls
from bridge.store import WriteResult
from tasks.errors import RetryableError, clean_text, public_message, public_text
from tasks.lease import Holding
from tasks.payload import json_size
from tasks.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class WriteRefused(AgentBridgeError):
    """The database refused an outcome write for what it holds (not for being down)."""


def retry_delay(settings: Settings, retries: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter (0.5x-1.5x); never sooner than Retry-After, and
    never longer than 1.5 x AGENT_RETRY_BACKOFF_MAX (settings.longest_retry_delay),
    whatever Retry-After asks: the visibility-timeout check counts on that bound."""
    base = min(settings.retry_backoff_max, settings.retry_backoff * 2**min(retries, 64))
    delay = base * random.uniform(0.5, 1.5)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return float(round(min(delay, settings.longest_retry_delay), 3))


def error_body(kind: str, message: str, *, retryable: bool = False, **more: Any) -> dict[str, Any]:
    """The row's `error`, which the task's owner reads: its text without addresses
    (public_text) and cleaned so the database takes it (no NUL, no lone surrogate, at
    most 4 KB a string). The detail stays in the worker's log."""
    more = {k: public_text(v) if isinstance(v, str) else v for k, v in more.items()}
    return {"type": clean_text(kind, 200), "message": public_text(message),
            "retryable": retryable, **more}


class Outcome:
    """The outcome of one attempt (`task_id`, `attempt`) run by `worker`: decides how it
    ends and writes that, once."""

    def __init__(self, runtime: WorkerRuntime, celery_task: Task, task_id: str, attempt: int,
                 worker: str, fields: dict[str, Any]) -> None:
        self.runtime = runtime
        self.celery_task = celery_task
        self.task_id = task_id
        self.attempt = attempt
        self.worker = worker
        self.fields = fields  # the log lines' extra fields, shared with the execution
        self.agent: Agent | None = None  # the row's, once started
        self.partial: dict[str, Any] | None = None  # the last progress the handler reported
        self.failure: dict[str, Any] | None = None  # the error written, if it failed the row
        self.usage: dict[str, Any] | None = None  # what the run reported spending (tasks/usage.py)

    def keep_partial(self, response: Mapping[str, Any]) -> None:
        """Remember the handler's last partial output (kept if the task is cancelled)."""
        self.partial = dict(response)

    def start_failed(self, exc: Exception) -> str:
        """`start` raised: the database refused it, or its answer could not be read (a
        payload Python's JSON decoder cannot take, e.g. one nested too deeply raises
        RecursionError). If the start did apply, the attempt is this worker's: end it
        InvalidPayload now. A fenced fail changes nothing if the start did not apply."""
        if isinstance(exc, StoreError):
            message = f"the task could not be started: {first_line(exc)}"
        else:
            message = f"request_payload could not be read ({type(exc).__name__}: {first_line(exc)})"
        outcome = self.fail(Holding(self.task_id, self.attempt, self.worker),
                            error_body("InvalidPayload", message))
        if outcome != "failed":
            log.error("❌ Task %s not started: %s", self.task_id, message,
                      extra={"action": "start_rejected", **self.fields})
            return "rejected"
        return outcome

    @property
    def max_retries(self) -> int:
        return self.agent.max_retries if self.agent else self.runtime.settings.max_retries

    def time_limit_text(self) -> str:
        if self.agent is None or self.agent.name == DEFAULT:
            limit = self.agent.time_limit if self.agent else self.runtime.settings.time_limit
            return f"the handler ran longer than AGENT_TIME_LIMIT={limit:g}s"
        return (f"the handler ran longer than agent {self.agent.name!r}'s time_limit="
                f"{self.agent.time_limit:g}s")

    @property
    def run(self) -> int:
        """Which run of the attempt this is (Celery's retries + 1): a usage report is
        counted once per (attempt, run)."""
        return int(self.celery_task.request.retries or 0) + 1

    def retry(self, holding: Holding, delay: float, exc: RetryableError) -> str:
        retries = self.celery_task.request.retries + 1
        error = error_body("RetryableError", public_message(exc), retryable=True,
                           retries=retries, next_retry_in=delay)
        writer, lease_seconds = self.runtime.writer, self.runtime.settings.lease_seconds
        try:
            result = self.write(holding, lambda: writer.schedule_retry(
                self.task_id, self.attempt, self.worker, error, delay, lease_seconds,
                self.usage, self.run))
        except WriteRefused as refused:
            return self.fail(holding, error_body(
                "RetryableError",
                f"{public_message(exc)} (the retry could not be scheduled: {refused})"),
                detail=f"{exc} (the retry could not be scheduled: {refused})")
        if result is None or not result.applied:
            return "stale"
        if result.status != "processing":  # a cancel request ended the row instead
            log.warning("🛑 Task %s cancelled instead of retried", self.task_id,
                        extra={"action": "cancelled", **self.fields})
            return "cancelled"
        log.warning("🔁 Task %s will retry in %.1fs (retry %d of %d): %s", self.task_id, delay,
                    retries, self.max_retries, exc,
                    extra={"action": "retry", "retry": retries, **self.fields})
        # If publishing this retry fails, the message is gone; the lease set above
        # (delay + lease) then runs out and the bridge's rescue takes the row back.
        raise self.celery_task.retry(countdown=delay, exc=exc, max_retries=None)

    def complete(self, holding: Holding, response: Mapping[str, Any]) -> str:
        try:
            size = json_size(response)
        except (TypeError, ValueError, RecursionError) as exc:
            return self.fail(holding, error_body(
                "InvalidResponse", f"the handler's result is not JSON: {type(exc).__name__}: "
                                   f"{first_line(exc)}"))
        limit = self.runtime.settings.max_response_bytes
        if size > limit:
            return self.fail(holding, error_body(
                "ResponseTooLarge", f"the handler's result is {size} bytes of JSON; the limit is "
                                    f"{limit} bytes (AGENT_MAX_RESPONSE_BYTES)",
                size=size, limit=limit))
        try:
            result = self.write(holding, lambda: self.runtime.writer.complete(
                self.task_id, self.attempt, self.worker, response, self.usage, self.run))
        except WriteRefused as refused:
            return self.fail(holding, error_body(
                "ResponseRejected", f"the database refused the handler's result: {refused}"))
        if result is None or not result.applied:
            return "stale"
        if result.status != "completed":  # cancelled meanwhile: the result was discarded
            log.warning("🛑 Task %s cancelled; its result was discarded", self.task_id,
                        extra={"action": "cancelled", **self.fields})
            return "cancelled"
        log.info("✅ Task %s Completed successfully.", self.task_id,
                 extra={"action": "completed", **self.fields})
        return "completed"

    def wait(self, holding: Holding, question: Any, timeout: float) -> str:
        """The handler asked its user `question` (tasks.ask): the attempt ends and the row
        waits, pending, for the answer (at most `timeout` seconds)."""
        writer = self.runtime.writer
        try:
            result = self.write(holding, lambda: writer.wait(
                self.task_id, self.attempt, self.worker, {"question": question}, timeout,
                self.usage, self.run))
        except WriteRefused as refused:
            return self.fail(holding, error_body(
                "InvalidQuestion", f"the handler's question could not be stored: {refused}"))
        if result is None or not result.applied:
            return "stale"
        if result.status != "pending":  # a cancel request ended the row instead
            log.warning("🛑 Task %s cancelled instead of waiting for an answer", self.task_id,
                        extra={"action": "cancelled", **self.fields})
            self.failure = error_body("Cancelled", "cancelled on request while it was running")
            return "cancelled"
        log.info("❓ Task %s is waiting for its user's answer (at most %gs)", self.task_id,
                 timeout, extra={"action": "waiting", **self.fields})
        return "waiting"

    def cancelled(self, holding: Holding) -> str:
        """End the attempt as cancelled, keeping the last partial answer it reported."""
        result = self.write(holding, lambda: self.runtime.writer.cancelled(
            self.task_id, self.attempt, self.worker, self.partial, self.usage, self.run))
        if result is None or not result.applied:
            return "stale"
        log.warning("🛑 Task %s cancelled; its partial answer is kept", self.task_id,
                    extra={"action": "cancelled", **self.fields})
        # The row is failed (Cancelled): Flower shows the job failed with that error too.
        self.failure = error_body("Cancelled", "cancelled on request while it was running")
        return "cancelled"

    def fail(self, holding: Holding, error: dict[str, Any], detail: str | None = None) -> str:
        """End the row failed with `error` (what its user reads); the log line says
        `detail`, the exception's own text, when it differs."""
        writer = self.runtime.writer
        try:
            result = self.write(holding, lambda: writer.fail(
                self.task_id, self.attempt, self.worker, error, self.usage, self.run))
        except WriteRefused as refused:
            # Still refused for its content: a minimal error, plain ASCII, instead.
            error = error_body(_plain_name(str(error.get("type"))),
                               f"the task failed, but its error could not be stored: {refused}")
            try:
                result = self.write(holding, lambda: writer.fail(
                    self.task_id, self.attempt, self.worker, error, self.usage, self.run))
            except WriteRefused as again:
                log.error("❌ Task %s: the database refused to fail it: %s", self.task_id, again,
                          extra={"action": "fail_refused", **self.fields})
                return "rejected"
        if result is None or not result.applied:
            return "stale"
        self.failure = error
        log.warning("❌ Task %s failed: %s: %s", self.task_id, error["type"],
                    escape_controls(detail if detail is not None else error["message"]),
                    extra={"action": "failed", "error_type": error["type"], **self.fields})
        return "failed"

    def write(self, holding: Holding, write: Callable[[], WriteResult]) -> WriteResult | None:
        """Write an outcome, retrying while the database is unreachable: the handler's
        work is done and must not be paid for twice. Gives up after two leases; by
        then the row may be rescued, and this write would be fenced out anyway."""
        if holding.lost.is_set():
            log.warning("⏭️  Task %s: lease lost, result discarded", self.task_id,
                        extra={"action": "lease_lost", **self.fields})
            return None
        deadline = time.monotonic() + 2 * self.runtime.settings.lease_seconds
        pause = 0.2
        while True:
            try:
                result = write()
                break
            except SoftTimeLimitExceeded:
                continue  # Celery's limit fired just as the handler ended: write anyway
            except StoreRejected as exc:
                raise WriteRefused(_ascii(first_line(exc))) from exc
            except StoreUnavailable as exc:
                if time.monotonic() + pause > deadline:
                    log.error("❌ Task %s: could not write the outcome: %s", self.task_id, exc,
                              extra={"action": "write_gave_up", **self.fields})
                    return None
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
            except Exception as exc:  # the driver could not even send it
                raise WriteRefused(_ascii(f"{type(exc).__name__}: {first_line(exc)}")) from exc
        if not result.applied:
            log.info("⏭️  Task %s attempt %s: outcome not written: %s", self.task_id,
                     self.attempt, result.refusal(self.attempt),
                     extra={"action": "stale", **self.fields})
        return result


def _plain_name(kind: str) -> str:
    """An error type as a plain identifier, for the minimal error."""
    name = "".join(ch for ch in kind if ch.isascii() and (ch.isalnum() or ch == "_"))[:100]
    return name or "Error"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")[:500]
