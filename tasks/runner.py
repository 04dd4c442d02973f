"""`tasks.run_agent(task_id, attempt, task=None)`: take the attempt, run the handler, write
the outcome.

This module wires the pieces: the process's runtime (tasks/runtime.py), the outcome
state machine (tasks/outcome.py), streamed progress (tasks/progress.py) and the
worker's startup checks (tasks/startup.py, registered by importing it here).

Every write is fenced by (attempt, worker) in SQL: a stale or duplicate message
is acknowledged, logged and dropped. Transient handler errors retry through
Celery; everything else ends the row `failed` with a readable `error`, once (see
tasks/outcome.py). A failed row's job then raises TaskFailed, so Celery and Flower
show it as failed.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from bridge.celery_app import RUN_AGENT
from bridge.errors import StoreUnavailable
from bridge.logs import escape_controls
from bridge.store import StartedTask, WriteResult
from tasks import agent as agent_context
from tasks import cancellation, progress, questions, ratelimit, usage
from tasks.agent import UnknownAgent, agent_for, handler_of
from tasks.app import app
from tasks.cancellation import Cancelled
from tasks.errors import InvalidPayload, RetryableError, TaskFailed, public_message
from tasks.invoke import HandlerTimeout, call_handler
from tasks.lease import Holding
from tasks.outcome import Outcome, WriteRefused, error_body, retry_delay
from tasks.payload import json_type, validate_default
from tasks.runtime import WorkerRuntime
from tasks.runtime import process_runtime as runtime
from tasks.startup import served_agents

__all__ = ["Execution", "WorkerRuntime", "WriteRefused", "error_body", "retry_delay",
           "run_agent", "runtime", "served_agents", "worker_identity"]

log = logging.getLogger(__name__)


_HOST = socket.gethostname()  # once per process: a system call per task showed in profiles


def worker_identity() -> str:
    """Unique per execution: host, process and a random suffix for this run."""
    return f"{_HOST}:{os.getpid()}:{os.urandom(4).hex()}"


# TaskFailed is "expected" (Task.throws): Celery marks the job failed (Flower shows it
# with the row's error) and logs one INFO line, no traceback. Its message is still
# acknowledged (task_acks_on_failure, Celery's default, set in tasks/app.py).
@app.task(bind=True, name=RUN_AGENT, throws=(TaskFailed,))
def run_agent(self: Task, task_id: str, attempt: int, task: Mapping[str, Any] | None = None
              ) -> str:
    """Run attempt `attempt` of row `task_id`; returns how it ended (shown in Flower),
    or raises TaskFailed once the row has been failed. `task`: the row as the claim
    returned it (its payload and the handler's other fields), when the bridge could send
    it in the message (AGENT_INLINE_PAYLOAD_BYTES); else the worker reads it as it
    takes the attempt."""
    current = runtime.get()
    execution = Execution(current, self, task_id, attempt, task)
    with current.writer.running():
        outcome = execution.run()
    if execution.failure is not None:
        raise TaskFailed(f"{execution.failure['type']}: {execution.failure['message']}")
    return outcome


class Execution:
    """One run of one attempt: start the row, hold its lease, call the handler, hand
    how it ended to its Outcome."""

    def __init__(self, runtime: WorkerRuntime, celery_task: Task, task_id: str,
                 attempt: int, task: Mapping[str, Any] | None = None) -> None:
        self.runtime = runtime
        self.celery_task = celery_task
        self.task_id = task_id
        self.attempt = attempt
        self.task = task
        self.worker = worker_identity()
        self.fields: dict[str, Any] = {"task_id": task_id, "attempt": attempt}
        self.outcome = Outcome(runtime, celery_task, task_id, attempt, self.worker, self.fields)

    @property
    def failure(self) -> dict[str, Any] | None:
        """The error written, if it failed the row."""
        return self.outcome.failure

    def run(self) -> str:
        try:
            started, found = self._take()
        except StoreUnavailable as exc:
            # Back to the queue after a pause, without spending a retry: the database
            # is down for every task alike. If it stays down, the lease runs out and
            # the row is re-claimed; this message is then fenced out.
            log.warning("⚠️  Task %s not started, database unavailable: %s", self.task_id, exc,
                        extra={"action": "start_unavailable", **self.fields})
            time.sleep(random.uniform(1.0, 3.0))
            raise Reject(str(exc), requeue=True) from None
        except Exception as exc:
            return self.outcome.start_failed(exc)
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
        keeper = self.runtime.keeper
        holding = keeper.hold(self.task_id, self.attempt, self.worker)
        try:
            return self._run_handler(started, holding)
        except WriteRefused as refused:  # an outcome write no path above handled
            return self.outcome.fail(holding, error_body(
                "OutcomeRejected", f"the task's outcome could not be stored: {refused}"))
        finally:
            keeper.drop(holding)

    def _take(self) -> tuple[StartedTask | None, WriteResult]:
        """Take the attempt (fenced: a duplicate delivery of this message, while this one
        holds the lease, is refused). With the row in the message, the write reads
        nothing; else it returns the payload."""
        writer, lease = self.runtime.writer, self.runtime.settings.lease_seconds
        if self.task is None:
            started, found = writer.start(self.task_id, self.attempt, self.worker, lease)
            if started is None:
                return started, found
            # The handler is known only now: its reservation is a second write.
            spend = _declared_spend(started.agent, started.as_handler_input())
            if spend is None:
                return started, found
            found = writer.bind(self.task_id, self.attempt, self.worker, lease, spend)
            return (replace(started, budget=found.budget) if found.applied else None), found
        spend = _declared_spend(str(self.task.get("agent") or "default"), self.task)
        found = writer.bind(self.task_id, self.attempt, self.worker, lease, spend)
        if not found.applied:
            return None, found
        started = StartedTask.from_message(self.task_id, self.attempt, self.task)
        return replace(started, budget=found.budget), found

    def _answers(self) -> questions.Answers | None:
        """The task's recorded answers, for its first tasks.ask() of this run."""
        return self.runtime.store.answers(self.task_id, self.attempt, self.worker)

    def _run_handler(self, started: StartedTask, holding: Holding) -> str:
        outcome = self.outcome
        retry: tuple[float, RetryableError] | None = None
        try:
            # The row's agent picks the handler and its limits; a worker that does not
            # know it (AGENTS differs from the bridge's) fails the row, not the worker.
            outcome.agent = agent = agent_for(started.agent)
            handler = handler_of(agent)
            validate = getattr(handler, "validate_payload", validate_default)
            validate(started.request_payload)
            stream, reporter = self.runtime.streams.open(holding, self.fields,
                                                         outcome.keep_partial)
            token = progress.bind(reporter)
            scope = cancellation.bind(holding.cancel)
            bound = agent_context.bind(agent)
            deadline = ratelimit.bind_deadline(agent.time_limit)  # rate-limit waits end here
            meter = usage.UsageMeter()
            metered = usage.bind(meter)
            asked = questions.bind(questions.Questions(self._answers))
            try:
                response = call_handler(handler, started.as_handler_input(), agent.time_limit)
            except BaseException as exc:
                if holding.cancel.is_set():  # however the handler ended: it was stopped
                    raise Cancelled() from exc
                raise
            finally:
                outcome.usage = meter.totals()  # written with the outcome, whatever it is
                questions.unbind(asked)
                usage.unbind(metered)
                ratelimit.unbind_deadline(deadline)
                agent_context.unbind(bound)
                cancellation.unbind(scope)
                progress.unbind(token)
                self.runtime.streams.close(stream)  # before the outcome is written
            if holding.cancel.is_set():  # a handler that ignored it: result discarded
                raise Cancelled()
            if not isinstance(response, Mapping):
                raise TypeError(f"the handler returned {json_type(response)}, expected an object "
                                "such as {\"answer\": \"...\"}")
            return outcome.complete(holding, response)
        except Cancelled:
            return outcome.cancelled(holding)
        except questions.AnswerNeeded as needed:  # the handler asked its user (tasks.ask)
            return outcome.wait(holding, needed.question, needed.timeout)
        except InvalidPayload as exc:
            return outcome.fail(holding, error_body("InvalidPayload", public_message(exc)),
                                detail=str(exc))
        except UnknownAgent as exc:
            return outcome.fail(holding, error_body("UnknownAgent", str(exc)))
        except RetryableError as exc:
            retries = self.celery_task.request.retries
            if retries >= outcome.max_retries:
                gave_up = f" (gave up after {retries} retries)"
                return outcome.fail(holding, error_body(
                    "RetryableError", public_message(exc) + gave_up, retries=retries),
                    detail=f"{exc}{gave_up}")
            retry = (retry_delay(self.runtime.settings, retries, exc.retry_after), exc)
        except (HandlerTimeout, SoftTimeLimitExceeded):
            return outcome.fail(holding, error_body("TimeLimitExceeded",
                                                    outcome.time_limit_text()))
        except Exception as exc:
            # The user reads the classified message; the log keeps the exception's text.
            return outcome.fail(holding, error_body(type(exc).__name__, public_message(exc)),
                                detail=str(exc) or repr(exc))
        # Outside the except blocks: Celery's Retry must not be caught above.
        return outcome.retry(holding, *retry)


def _declared_spend(agent_name: str, task: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the agent's handler declared one run of `task` may spend (tasks/usage.py), with
    the agent bound as while it runs. None also when the handler cannot be had, or its
    declaration fails: the run then fails the row for that (UnknownAgent, a bad payload)
    once it holds the attempt, as without a declaration."""
    try:
        agent = agent_for(agent_name)
        handler = handler_of(agent)
        bound = agent_context.bind(agent)
        try:
            return usage.declared_spend(handler, task)
        finally:
            agent_context.unbind(bound)
    except Exception:
        return None
