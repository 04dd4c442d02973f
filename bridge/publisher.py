"""Puts claimed rows on their agents' Celery queues, and says how full a queue is."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from bridge.agents import queue_name
from bridge.store import Claim

# Errors that mean "the broker is not there right now".
BROKER_ERRORS: tuple[type[BaseException], ...] = (OperationalError, KombuError, OSError,
                                                  ConnectionError, TimeoutError)


class BrokerUnavailable(Exception):
    """The broker could not be reached; `sent` jobs went out before it failed."""

    def __init__(self, message: str, sent: int = 0) -> None:
        super().__init__(message)
        self.sent = sent


class Publisher:
    def __init__(self, app: Celery, queue: str, task_name: str) -> None:
        self._app = app
        self._queue = queue
        self._task_name = task_name
        # The transport's own errors too (redis-py's ConnectionError is no OSError).
        with app.connection_for_write() as conn:
            self._errors = (BROKER_ERRORS + tuple(conn.connection_errors)
                            + tuple(conn.channel_errors))

    def queue_depth(self, queue: str | None = None) -> int:
        """Jobs waiting in a broker queue (default: the `default` agent's), not those
        already reserved by workers."""
        try:
            with self._app.pool.acquire(block=True, timeout=5) as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
                ok = conn.default_channel.queue_declare(
                    queue or self._queue, passive=False, durable=True, auto_delete=False)
                return int(ok.message_count)
        except self._errors as exc:
            raise BrokerUnavailable(f"broker unreachable: {exc}") from exc

    def publish(self, claims: Sequence[Claim]) -> int:
        """One job per claim, in order, through one pooled producer, on the queue of the
        claim's agent; carries only (task id, attempt). The Celery task id `id:attempt`
        never repeats."""
        sent = 0
        try:
            with self._app.producer_or_acquire() as producer:
                for claim in claims:
                    self._app.send_task(
                        self._task_name, args=(claim.id, claim.attempt),
                        task_id=f"{claim.id}:{claim.attempt}",
                        queue=queue_name(self._queue, claim.agent),
                        producer=producer, retry=True,
                        retry_policy={"max_retries": 2, "interval_start": 0.1,
                                      "interval_step": 0.2, "interval_max": 0.5})
                    sent += 1
        except self._errors as exc:
            raise BrokerUnavailable(f"broker unreachable: {exc}", sent) from exc
        except Exception as exc:
            # Refused by a live broker (e.g. Redis out of memory or read-only): the
            # caller must still release what was not sent.
            raise BrokerUnavailable(f"broker refused the job: {exc}", sent) from exc
        return sent
