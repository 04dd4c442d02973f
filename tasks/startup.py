"""The worker's startup checks and its ONLINE line (Celery signal receivers).

`worker_init` refuses to start a worker that consumes a queue no agent owns, or whose
agents' handlers cannot be imported or refuse their own settings (`check_settings`);
`worker_ready` logs what it serves.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery.signals import worker_init, worker_ready

from bridge.agents import Agent
from bridge.config import ConfigError
from tasks.agent import agents, handler_of
from tasks.app import app
from tasks.handlers import HandlerNotFound

log = logging.getLogger(__name__)


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
            check = getattr(handler_of(agent), "check_settings", None)
            if check is not None:  # a handler's own settings (OPENAI_*), read once, here
                check()
        except (HandlerNotFound, ConfigError) as exc:
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
