"""The Celery app both sides build: `create_celery_app(settings)`.

The bridge publishes with its own app from this factory, by task name, and never
imports `tasks` (no handler, task or signal receiver loads into the bridge process);
the worker (tasks/app.py) builds its app here too and registers the tasks on it. So
broker, queues, serializer and acknowledgement settings are written once.

Postgres is the record: no result backend. Jobs are JSON `(task_id, attempt)`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from bridge.config import Settings

# The task names, the contract between the bridge (which sends them) and the worker
# (which registers them): `celery -A tasks` lists them, Flower shows them.
RUN_AGENT = "tasks.run_agent"
REQUEUE_FAILED = "tasks.requeue_failed"


def create_celery_app(settings: Settings, main: str = "agent_bridge") -> Celery:
    """A Celery app configured from `settings`, with no task registered."""
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app


def celery_config(settings: Settings) -> dict[str, Any]:
    agents = settings.configured_agents()
    longest = max(a.time_limit for a in agents)
    return {
        "broker_url": settings.broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_default_queue": settings.celery_queue,
        # One queue per agent (`default`: CELERY_QUEUE, agent X: CELERY_QUEUE.X). A worker
        # without -Q serves them all; `-Q agent_tasks.research` serves that agent only.
        "task_queues": [Queue(a.queue, Exchange(a.queue), routing_key=a.queue)
                        for a in agents],
        # A job is acknowledged only when it ends, and a job whose worker process
        # died (SIGKILL, OOM) goes back to the queue instead of being acked and lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A failed row's job raises TaskFailed (so Flower shows it failed); Celery's
        # default task_acks_on_failure_or_timeout (True; in 5.7+ task_acks_on_failure)
        # still acknowledges it: the row is failed, the message must not come back.
        # Each process holds one job beyond the one it runs: others stay in Redis
        # where another worker (or the bridge's backpressure) can see them.
        "worker_prefetch_multiplier": 1,
        # Keep a running agent going when Redis blinks; the row's fencing makes a
        # redelivered copy harmless.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 2},
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 10,
        },
        # Task events cost throughput, so they are off unless CELERY_TASK_EVENTS asks
        # for them. Flower still sees every job a worker runs: it turns the workers'
        # events on remotely (its enable_events control command) when it starts.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        # The handler's own timeout (AGENT_TIME_LIMIT) ends a task first; these are
        # the backstop for a handler that ignores it (enforced in prefork only).
        # One pair for every agent, so the longest time limit of any agent.
        "task_soft_time_limit": longest + 15,
        "task_time_limit": longest + 45,
        "worker_hijack_root_logger": False,
    }
