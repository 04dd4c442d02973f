"""`tasks.run_agent(task_id, attempt)`: start the row, run the handler, write the outcome.

Every write is fenced by (attempt, worker) in SQL: a stale or duplicate message
is acknowledged, logged and dropped. Transient handler errors retry through
Celery; everything else ends the row `failed` with a readable `error`, once: an
outcome the database refuses for its content (too large, a NUL, not JSON) becomes a
failure with a readable error, never a row left to its lease, whose rescue would
run (and pay for) the handler again. A failed row's job then raises TaskFailed, so
Celery and Flower show it as failed.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_init, worker_ready

from bridge.agents import DEFAULT, Agent
from bridge.celery_app import RUN_AGENT
from bridge.errors import (
    AgentBridgeError,
    StoreError,
    StoreRejected,
    StoreUnavailable,
    first_line,
)
from bridge.logs import escape_controls
from bridge.store import StartedTask, TaskStore, WriteResult, open_store
from tasks import agent as agent_context
from tasks import cancellation, progress
from tasks.agent import UnknownAgent, agent_for, agents, handler_of
from tasks.app import app, settings
from tasks.cancellation import Cancelled
from tasks.cancellation.watcher import CancelWatcher
from tasks.errors import (
    InvalidPayload,
    RetryableError,
    TaskFailed,
    clean_text,
    public_message,
    public_text,
)
from tasks.handlers import HandlerNotFound
from tasks.invoke import HandlerTimeout, call_handler
from tasks.lease import Holding, LeaseKeeper
from tasks.payload import json_size, json_type, validate_default

log = logging.getLogger("agent_bridge.worker")


class WriteRefused(AgentBridgeError):
    """The database refused an outcome write for what it holds (not for being down)."""


class _Runtime:
    """Per-process store and lease keeper, created after fork."""

    def __init__(self) -> None:
        self._pid = 0
        self._store: TaskStore | None = None
        self._keeper: LeaseKeeper | None = None
        # In the threads pool the first tasks arrive together; one store for all.
        self._lock = threading.Lock()

    def get(self) -> tuple[TaskStore, LeaseKeeper]:
        with self._lock:
            if self._store is None or self._keeper is None or self._pid != os.getpid():
                self._store = open_store(settings)
                self._keeper = LeaseKeeper(self._store, settings.lease_seconds)
                self._keeper.on_hold = CancelWatcher(settings, self._store, self._keeper).watch
                self._pid = os.getpid()
            return self._store, self._keeper


runtime = _Runtime()


def worker_identity() -> str:
    """Unique per execution: host, process and a random suffix for this run."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def retry_delay(retries: int, retry_after: float | None) -> float:
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


# TaskFailed is "expected" (Task.throws): Celery marks the job failed (Flower shows it
# with the row's error) and logs one INFO line, no traceback. Its message is still
# acknowledged (task_acks_on_failure, Celery's default, set in tasks/app.py).
@app.task(bind=True, name=RUN_AGENT, throws=(TaskFailed,))
def run_agent(self: Task, task_id: str, attempt: int) -> str:
    """Run attempt `attempt` of row `task_id`; returns how it ended (shown in Flower),
    or raises TaskFailed once the row has been failed."""
    execution = Execution(self, task_id, attempt)
    outcome = execution.run()
    if execution.failure is not None:
        raise TaskFailed(f"{execution.failure['type']}: {execution.failure['message']}")
    return outcome


class Execution:
    def __init__(self, celery_task: Task, task_id: str, attempt: int) -> None:
        self.celery_task = celery_task
        self.task_id = task_id
        self.attempt = attempt
        self.worker = worker_identity()
        self.store, self.keeper = runtime.get()
        self.fields: dict[str, Any] = {"task_id": task_id, "attempt": attempt}
        self.agent: Agent | None = None  # the row's, once started
        self.partial: dict[str, Any] | None = None  # the last progress the handler reported
        self.failure: dict[str, Any] | None = None  # the error written, if it failed the row

    def run(self) -> str:
        try:
            started, found = self.store.start(self.task_id, self.attempt, self.worker,
                                              settings.lease_seconds)
        except StoreUnavailable as exc:
            # Back to the queue after a pause, without spending a retry: the database
            # is down for every task alike. If it stays down, the lease runs out and
            # the row is re-claimed; this message is then fenced out.
            log.warning("⚠️  Task %s not started, database unavailable: %s", self.task_id, exc,
                        extra={"action": "start_unavailable", **self.fields})
            time.sleep(random.uniform(1.0, 3.0))
            raise Reject(str(exc), requeue=True) from None
        except Exception as exc:
            return self._start_failed(exc)
        if started is None:
            log.info("⏭️  Task %s attempt %s skipped: %s", self.task_id, self.attempt,
                     found.refusal(self.attempt), extra={"action": "stale", **self.fields})
            return "stale"

        self.fields["agent"] = started.agent
        log.info("🤖 Working on Task %s (attempt %d)", self.task_id, self.attempt,
                 extra={"action": "start", **self.fields})
        if isinstance(started.request_payload, dict):
            # The user's text, escaped: a newline in a prompt must not forge a log line.
            log.debug("   User asking: %s", escape_controls(started.request_payload.get("prompt")),
                      extra=self.fields)
        holding = self.keeper.hold(self.task_id, self.attempt, self.worker)
        try:
            return self._run_handler(started, holding)
        except WriteRefused as refused:  # an outcome write no path above handled
            return self._fail(holding, error_body(
                "OutcomeRejected", f"the task's outcome could not be stored: {refused}"))
        finally:
            self.keeper.drop(holding)

    def _run_handler(self, started: StartedTask, holding: Holding) -> str:
        retry: tuple[float, RetryableError] | None = None
        try:
            # The row's agent picks the handler and its limits; a worker that does not
            # know it (AGENTS differs from the bridge's) fails the row, not the worker.
            self.agent = agent = agent_for(started.agent)
            handler = handler_of(agent)
            validate = getattr(handler, "validate_payload", validate_default)
            validate(started.request_payload)
            token = progress.bind(self._progress_reporter(holding))
            scope = cancellation.bind(holding.cancel)
            bound = agent_context.bind(agent)
            try:
                response = call_handler(handler, started.as_handler_input(), agent.time_limit)
            except BaseException as exc:
                if holding.cancel.is_set():  # however the handler ended: it was stopped
                    raise Cancelled() from exc
                raise
            finally:
                agent_context.unbind(bound)
                cancellation.unbind(scope)
                progress.unbind(token)
            if holding.cancel.is_set():  # a handler that ignored it: result discarded
                raise Cancelled()
            if not isinstance(response, Mapping):
                raise TypeError(f"the handler returned {json_type(response)}, expected an object "
                                "such as {\"answer\": \"...\"}")
            return self._complete(holding, response)
        except Cancelled:
            return self._cancelled(holding)
        except InvalidPayload as exc:
            return self._fail(holding, error_body("InvalidPayload", public_message(exc)),
                              detail=str(exc))
        except UnknownAgent as exc:
            return self._fail(holding, error_body("UnknownAgent", str(exc)))
        except RetryableError as exc:
            retries = self.celery_task.request.retries
            if retries >= self._max_retries:
                gave_up = f" (gave up after {retries} retries)"
                return self._fail(holding, error_body(
                    "RetryableError", public_message(exc) + gave_up, retries=retries),
                    detail=f"{exc}{gave_up}")
            retry = (retry_delay(retries, exc.retry_after), exc)
        except (HandlerTimeout, SoftTimeLimitExceeded):
            return self._fail(holding, error_body("TimeLimitExceeded", self._time_limit_text()))
        except Exception as exc:
            # The user reads the classified message; the log keeps the exception's text.
            return self._fail(holding, error_body(type(exc).__name__, public_message(exc)),
                              detail=str(exc) or repr(exc))
        # Outside the except blocks: Celery's Retry must not be caught above.
        return self._retry(holding, *retry)

    def _start_failed(self, exc: Exception) -> str:
        """`start` raised: the database refused it, or its answer could not be read (a
        payload Python's JSON decoder cannot take, e.g. one nested too deeply raises
        RecursionError). If the start did apply, the attempt is this worker's: end it
        InvalidPayload now. A fenced fail changes nothing if the start did not apply."""
        if isinstance(exc, StoreError):
            message = f"the task could not be started: {first_line(exc)}"
        else:
            message = f"request_payload could not be read ({type(exc).__name__}: {first_line(exc)})"
        outcome = self._fail(Holding(self.task_id, self.attempt, self.worker),
                             error_body("InvalidPayload", message))
        if outcome != "failed":
            log.error("❌ Task %s not started: %s", self.task_id, message,
                      extra={"action": "start_rejected", **self.fields})
            return "rejected"
        return outcome

    @property
    def _max_retries(self) -> int:
        return self.agent.max_retries if self.agent else settings.max_retries

    def _time_limit_text(self) -> str:
        if self.agent is None or self.agent.name == DEFAULT:
            limit = self.agent.time_limit if self.agent else settings.time_limit
            return f"the handler ran longer than AGENT_TIME_LIMIT={limit:g}s"
        return (f"the handler ran longer than agent {self.agent.name!r}'s time_limit="
                f"{self.agent.time_limit:g}s")

    def _retry(self, holding: Holding, delay: float, exc: RetryableError) -> str:
        retries = self.celery_task.request.retries + 1
        error = error_body("RetryableError", public_message(exc), retryable=True,
                           retries=retries, next_retry_in=delay)
        try:
            result = self._write(holding, lambda: self.store.schedule_retry(
                self.task_id, self.attempt, self.worker, error, delay, settings.lease_seconds))
        except WriteRefused as refused:
            return self._fail(holding, error_body(
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
                    retries, self._max_retries, exc,
                    extra={"action": "retry", "retry": retries, **self.fields})
        # If publishing this retry fails, the message is gone; the lease set above
        # (delay + lease) then runs out and the bridge's rescue takes the row back.
        raise self.celery_task.retry(countdown=delay, exc=exc, max_retries=None)

    def _complete(self, holding: Holding, response: Mapping[str, Any]) -> str:
        try:
            size = json_size(response)
        except (TypeError, ValueError, RecursionError) as exc:
            return self._fail(holding, error_body(
                "InvalidResponse", f"the handler's result is not JSON: {type(exc).__name__}: "
                                   f"{first_line(exc)}"))
        limit = settings.max_response_bytes
        if size > limit:
            return self._fail(holding, error_body(
                "ResponseTooLarge", f"the handler's result is {size} bytes of JSON; the limit is "
                                    f"{limit} bytes (AGENT_MAX_RESPONSE_BYTES)",
                size=size, limit=limit))
        try:
            result = self._write(holding, lambda: self.store.complete(
                self.task_id, self.attempt, self.worker, response))
        except WriteRefused as refused:
            return self._fail(holding, error_body(
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

    def _cancelled(self, holding: Holding) -> str:
        """End the attempt as cancelled, keeping the last partial answer it reported."""
        result = self._write(holding, lambda: self.store.cancelled(
            self.task_id, self.attempt, self.worker, self.partial))
        if result is None or not result.applied:
            return "stale"
        log.warning("🛑 Task %s cancelled; its partial answer is kept", self.task_id,
                    extra={"action": "cancelled", **self.fields})
        # The row is failed (Cancelled): Flower shows the job failed with that error too.
        self.failure = error_body("Cancelled", "cancelled on request while it was running")
        return "cancelled"

    def _fail(self, holding: Holding, error: dict[str, Any], detail: str | None = None) -> str:
        """End the row failed with `error` (what its user reads); the log line says
        `detail`, the exception's own text, when it differs."""
        try:
            result = self._write(holding, lambda: self.store.fail(
                self.task_id, self.attempt, self.worker, error))
        except WriteRefused as refused:
            # Still refused for its content: a minimal error, plain ASCII, instead.
            error = error_body(_plain_name(str(error.get("type"))),
                               f"the task failed, but its error could not be stored: {refused}")
            try:
                result = self._write(holding, lambda: self.store.fail(
                    self.task_id, self.attempt, self.worker, error))
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

    def _write(self, holding: Holding, write: Callable[[], WriteResult]) -> WriteResult | None:
        """Write an outcome, retrying while the database is unreachable: the handler's
        work is done and must not be paid for twice. Gives up after two leases; by
        then the row may be rescued, and this write would be fenced out anyway."""
        if holding.lost.is_set():
            log.warning("⏭️  Task %s: lease lost, result discarded", self.task_id,
                        extra={"action": "lease_lost", **self.fields})
            return None
        deadline = time.monotonic() + 2 * settings.lease_seconds
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

    def _progress_reporter(self, holding: Holding) -> progress.Reporter:
        """Writes at most one partial output per AGENT_PROGRESS_INTERVAL (the first at
        once; a report in between is kept and goes with the next write, or the final
        result replaces it). A streamed answer is appended (store.append: only what is
        new, so the bytes written stay linear in its length); any other shape rewrites
        the row (store.progress)."""
        last = float("-inf")
        lock = threading.Lock()  # one write at a time: the pieces' order is the answer's
        written: str | None = None  # the answer the pieces written so far rebuild
        seq = 0  # the next piece's number in this attempt

        def report(response: Mapping[str, Any], force: bool) -> bool:
            nonlocal last, written, seq
            self.partial = dict(response)  # kept if the task is cancelled
            with lock:
                now = time.monotonic()
                if holding.lost.is_set() or (
                        not force and now - last < settings.progress_interval):
                    return False
                answer = progress.streamed_answer(response)
                if answer is not None and answer == written:
                    return False  # nothing new
                last = now
                # Partial output is a courtesy: one that is not JSON, too large, or refused
                # by the database is skipped, and the task goes on.
                try:
                    size = json_size(response)
                except (TypeError, ValueError, RecursionError):
                    return False
                if size > settings.max_response_bytes:
                    log.debug("Task %s: partial output of %d bytes skipped (AGENT_MAX_RESPONSE_"
                              "BYTES=%d)", self.task_id, size, settings.max_response_bytes,
                              extra={"action": "progress_skipped", **self.fields})
                    return False
                try:
                    if answer is None:
                        # The row's payload is the answer again (its pieces are dropped).
                        written = None
                        result = self.store.progress(self.task_id, self.attempt, self.worker,
                                                     response)
                    else:
                        # A piece at offset 0 starts over: after a failed or unknown write.
                        offset = 0 if written is None else progress.common_prefix(written, answer)
                        seq += 1
                        written = None  # unknown until the write answers
                        result = self.store.append(self.task_id, self.attempt, self.worker,
                                                   seq - 1, offset, answer[offset:])
                        if result.applied:
                            written = answer
                except Exception:  # StoreError, or a value the driver cannot send
                    return False
            if not result.applied:
                holding.lost.set()
            return result.applied

        return report


def _plain_name(kind: str) -> str:
    """An error type as a plain identifier, for the minimal error."""
    name = "".join(ch for ch in kind if ch.isascii() and (ch.isalnum() or ch == "_"))[:100]
    return name or "Error"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")[:500]


@worker_init.connect
def _check_handler(sender: Any = None, **_: Any) -> None:
    """Refuse to start a worker that consumes a queue no agent owns, or whose agents'
    handlers cannot be imported (only the agents it serves: a chat worker need not
    install the research agent's code). Workers of another Celery app that imports
    this package (the benchmark's plain-Celery ceiling) are left alone."""
    if sender is not None and sender.app is not app:
        return
    for agent in served_agents(sender):
        try:
            handler_of(agent)
        except HandlerNotFound as exc:
            # SystemExit, not the ImportError: Celery logs and ignores an Exception
            # raised by a signal handler, and the worker would fail every task.
            raise SystemExit(f"agent-bridge: {exc}") from None


def served_agents(worker: Any) -> list[Agent]:
    """The agents of the queues this worker consumes (`-Q`; without it, every agent)."""
    consumed = list(worker.app.amqp.queues.consume_from) if worker is not None else []
    if not consumed:
        return list(agents())
    served: list[Agent] = []
    for queue in consumed:
        agent = agents().for_queue(queue)
        if agent is None:
            raise SystemExit(
                f"agent-bridge: queue {queue!r} belongs to no agent (queues: "
                f"{', '.join(a.queue for a in agents())}); check AGENTS and -Q")
        served.append(agent)
    return served


@worker_ready.connect
def _online(sender: Any = None, **_: Any) -> None:
    if sender is not None and sender.app is not app:
        return
    pool = getattr(getattr(sender, "pool_cls", None), "__name__", "?") if sender else "?"
    served = served_agents(sender)
    log.info("🟢 Agent worker is ONLINE. %s, %s",
             "; ".join(f"agent {a.name}: handler {a.handler}, queue '{a.queue}'" for a in served),
             datetime.now(UTC).strftime("started at %Y-%m-%d %H:%M:%S UTC"),
             extra={"action": "worker_online", "pool": pool,
                    "agent": ",".join(a.name for a in served)})
