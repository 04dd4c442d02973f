"""`tasks.run_agent(task_id, attempt)`: start the row, run the handler, write the outcome.

Every write is fenced by (attempt, worker) in SQL: a stale or duplicate message
is acknowledged, logged and dropped. Transient handler errors retry through
Celery; everything else ends the row `failed` with a readable `error`.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
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

from bridge.errors import StoreError, StoreUnavailable
from bridge.store import StartedTask, TaskStore, WriteResult, open_store
from tasks import progress
from tasks.app import RUN_AGENT, app, settings
from tasks.errors import InvalidPayload, RetryableError
from tasks.handlers import Handler, load_handler
from tasks.lease import Holding, LeaseKeeper
from tasks.payload import json_type, validate_default

log = logging.getLogger("agent_bridge.worker")

PROGRESS_MIN_INTERVAL = 0.25  # seconds between two progress writes of one task


class HandlerTimeout(Exception):
    """The handler ran longer than AGENT_TIME_LIMIT."""


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
                self._pid = os.getpid()
            return self._store, self._keeper


runtime = _Runtime()


def worker_identity() -> str:
    """Unique per execution: host, process and a random suffix for this run."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def retry_delay(retries: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter (0.5x-1.5x); never sooner than Retry-After."""
    base = min(settings.retry_backoff_max, settings.retry_backoff * 2**retries)
    delay = base * random.uniform(0.5, 1.5)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return float(round(delay, 3))


def error_body(kind: str, message: str, *, retryable: bool = False, **more: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "retryable": retryable, **more}


@app.task(bind=True, name=RUN_AGENT)
def run_agent(self: Task, task_id: str, attempt: int) -> str:
    """Run attempt `attempt` of row `task_id`; returns how it ended (shown in Flower)."""
    return Execution(self, task_id, attempt).run()


class Execution:
    def __init__(self, celery_task: Task, task_id: str, attempt: int) -> None:
        self.celery_task = celery_task
        self.task_id = task_id
        self.attempt = attempt
        self.worker = worker_identity()
        self.store, self.keeper = runtime.get()
        self.fields = {"task_id": task_id, "attempt": attempt}

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
        except StoreError as exc:
            log.error("❌ Task %s not started: %s", self.task_id, exc,
                      extra={"action": "start_rejected", **self.fields})
            return "rejected"
        if started is None:
            log.info("⏭️  Task %s attempt %s skipped: %s", self.task_id, self.attempt,
                     found.refusal(self.attempt), extra={"action": "stale", **self.fields})
            return "stale"

        log.info("🤖 Working on Task %s (attempt %d)", self.task_id, self.attempt,
                 extra={"action": "start", **self.fields})
        if isinstance(started.request_payload, dict):
            log.debug("   User asking: %s", started.request_payload.get("prompt"),
                      extra=self.fields)
        holding = self.keeper.hold(self.task_id, self.attempt, self.worker)
        try:
            return self._run_handler(started, holding)
        finally:
            self.keeper.drop(holding)

    def _run_handler(self, started: StartedTask, holding: Holding) -> str:
        retry: tuple[float, RetryableError] | None = None
        try:
            handler = load_handler(settings.agent_handler)
            validate = getattr(handler, "validate_payload", validate_default)
            validate(started.request_payload)
            token = progress.bind(self._progress_reporter(holding))
            try:
                response = call_handler(handler, started.as_handler_input(), settings.time_limit)
            finally:
                progress.unbind(token)
            if not isinstance(response, Mapping):
                raise TypeError(f"the handler returned {json_type(response)}, expected an object "
                                "such as {\"answer\": \"...\"}")
            return self._complete(holding, response)
        except InvalidPayload as exc:
            return self._fail(holding, error_body("InvalidPayload", str(exc)))
        except RetryableError as exc:
            retries = self.celery_task.request.retries
            if retries >= settings.max_retries:
                return self._fail(holding, error_body(
                    "RetryableError", f"{exc} (gave up after {retries} retries)",
                    retries=retries))
            retry = (retry_delay(retries, exc.retry_after), exc)
        except (HandlerTimeout, SoftTimeLimitExceeded):
            return self._fail(holding, error_body(
                "TimeLimitExceeded",
                f"the handler ran longer than AGENT_TIME_LIMIT={settings.time_limit:g}s"))
        except Exception as exc:
            return self._fail(holding, error_body(type(exc).__name__, str(exc) or repr(exc)))
        # Outside the except blocks: Celery's Retry must not be caught above.
        return self._retry(holding, *retry)

    def _retry(self, holding: Holding, delay: float, exc: RetryableError) -> str:
        retries = self.celery_task.request.retries + 1
        error = error_body("RetryableError", str(exc), retryable=True, retries=retries,
                           next_retry_in=delay)
        result = self._write(holding, lambda: self.store.schedule_retry(
            self.task_id, self.attempt, self.worker, error, delay, settings.lease_seconds))
        if result is None or not result.applied:
            return "stale"
        log.warning("🔁 Task %s will retry in %.1fs (retry %d of %d): %s", self.task_id, delay,
                    retries, settings.max_retries, exc,
                    extra={"action": "retry", "retry": retries, **self.fields})
        # If publishing this retry fails, the message is gone; the lease set above
        # (delay + lease) then runs out and the bridge's rescue takes the row back.
        raise self.celery_task.retry(countdown=delay, exc=exc, max_retries=None)

    def _complete(self, holding: Holding, response: Mapping[str, Any]) -> str:
        result = self._write(holding, lambda: self.store.complete(
            self.task_id, self.attempt, self.worker, response))
        if result is None or not result.applied:
            return "stale"
        log.info("✅ Task %s Completed successfully.", self.task_id,
                 extra={"action": "completed", **self.fields})
        return "completed"

    def _fail(self, holding: Holding, error: dict[str, Any]) -> str:
        result = self._write(holding, lambda: self.store.fail(
            self.task_id, self.attempt, self.worker, error))
        if result is None or not result.applied:
            return "stale"
        log.warning("❌ Task %s failed: %s: %s", self.task_id, error["type"], error["message"],
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
            except StoreUnavailable as exc:
                if time.monotonic() + pause > deadline:
                    log.error("❌ Task %s: could not write the outcome: %s", self.task_id, exc,
                              extra={"action": "write_gave_up", **self.fields})
                    return None
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        if not result.applied:
            log.info("⏭️  Task %s attempt %s: outcome not written: %s", self.task_id,
                     self.attempt, result.refusal(self.attempt),
                     extra={"action": "stale", **self.fields})
        return result

    def _progress_reporter(self, holding: Holding) -> progress.Reporter:
        last = 0.0
        lock = threading.Lock()

        def report(response: Mapping[str, Any], force: bool) -> bool:
            nonlocal last
            with lock:
                now = time.monotonic()
                if holding.lost.is_set() or (not force and now - last < PROGRESS_MIN_INTERVAL):
                    return False
                last = now
            try:
                result = self.store.progress(self.task_id, self.attempt, self.worker, response)
            except StoreError:
                return False
            if not result.applied:
                holding.lost.set()
            return result.applied

        return report


def call_handler(handler: Handler, task: dict[str, Any], timeout: float) -> Any:
    """Run a sync or async handler, bounded by `timeout` in every pool.

    Celery enforces time limits only in prefork; with threads, a sync handler runs in
    a thread of its own that is abandoned (and its result ignored) when time is up.
    """
    if inspect.iscoroutinefunction(handler):
        return _run_async(handler(task), timeout)
    context = contextvars.copy_context()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            result = context.run(handler, task)
            if inspect.isawaitable(result):
                result = context.run(_run_async, result, timeout)
            box["result"] = result
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"handler-{task['id']}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HandlerTimeout()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _run_async(awaitable: Any, timeout: float) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(awaitable, timeout)

    begun = time.monotonic()
    try:
        return asyncio.run(bounded())
    except TimeoutError:
        if time.monotonic() - begun >= timeout:
            raise HandlerTimeout() from None
        raise


@worker_init.connect
def _check_handler(**_: Any) -> None:
    """Refuse to start a worker whose AGENT_HANDLER cannot be imported."""
    load_handler(settings.agent_handler)


@worker_ready.connect
def _online(sender: Any = None, **_: Any) -> None:
    pool = getattr(getattr(sender, "pool_cls", None), "__name__", "?") if sender else "?"
    log.info("🟢 Agent worker is ONLINE. Handler %s, queue '%s', %s",
             settings.agent_handler, settings.celery_queue,
             datetime.now(UTC).strftime("started at %Y-%m-%d %H:%M:%S UTC"),
             extra={"action": "worker_online", "pool": pool})
