"""Puts claimed rows on their agents' Celery queues, and says how full a queue is."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from bridge.agents import queue_name
from bridge.errors import AgentBridgeError
from bridge.store import Claim

# Errors that mean "the broker is not there right now".
BROKER_ERRORS: tuple[type[BaseException], ...] = (OperationalError, KombuError, OSError,
                                                  ConnectionError, TimeoutError)


class BrokerUnavailable(AgentBridgeError):
    """The broker could not be reached, or refused: no job of the call counts as sent."""


def args_shown(claim: Claim) -> str:
    """What Flower (and Celery's own logs) show as the job's args, instead of the raw
    `(id, attempt)`: which agent, which row, which attempt. Never the payload."""
    return f"agent={claim.agent} task={claim.id[:8]}… attempt={claim.attempt}"


class Publisher:
    def __init__(self, app: Celery, queue: str, task_name: str) -> None:
        self._app = app
        self._queue = queue
        self._task_name = task_name
        self._declared: set[str] = set()  # queues declared by this publisher
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
        """One job per claim, in order, on the queue of the claim's agent, carrying
        (task id, attempt) and, when the claim returned it, the row its handler receives
        (`task=`, at most AGENT_INLINE_PAYLOAD_BYTES of payload); the Celery task id
        `id:attempt` never repeats. Flower and Celery's logs show `args_shown`, never the
        payload.

        The jobs of one call go to Redis in one round trip (kombu's publish batch, a
        pipeline), so either all were sent (returns how many) or the delivery of all of
        them is uncertain: BrokerUnavailable with `sent=0`, and the caller releases them
        all. A job that did reach Redis then carries an attempt the row no longer has,
        and the worker's fenced start drops it. Each queue is declared on its first
        publish only (the jobs go through the default exchange, straight to the queue).
        """
        try:
            with self._app.producer_or_acquire() as producer, \
                    producer.batch(max_size=max(1, len(claims))):
                for claim in claims:
                    queue = queue_name(self._queue, claim.agent)
                    first = queue not in self._declared
                    self._app.send_task(
                        self._task_name, args=(claim.id, claim.attempt),
                        kwargs={"task": claim.row} if claim.row is not None else None,
                        argsrepr=args_shown(claim), kwargsrepr="",
                        task_id=f"{claim.id}:{claim.attempt}", queue=queue,
                        producer=producer, declare=None if first else [])
                    if first:
                        self._declared.add(queue)
        except self._errors as exc:
            raise BrokerUnavailable(f"broker unreachable: {exc}") from exc
        except Exception as exc:
            # Refused by a live broker (e.g. Redis out of memory or read-only), or a
            # batch whose pipeline failed (kombu's BatchPublishError: "delivery is
            # uncertain"): the caller must release the claims.
            raise BrokerUnavailable(f"broker refused the jobs: {exc}") from exc
        return len(claims)
