"""Plain Celery, no database: the ceiling the bridge is compared with.

The same Celery configuration as the real worker (`tasks.app.celery_config`: JSON,
acks_late, reject_on_worker_lost, prefetch 1, task events as CELERY_TASK_EVENTS says,
off by default), the same Redis, the same message shape `(task_id, attempt)` sent by
the same `Publisher` (one pipeline per batch). Two tasks: a no-op (the throughput
ceiling) and one that sleeps 1 s (the I/O-bound ceiling: what Celery alone does with
1,000 waiting tasks on this machine). A third, `RECORD_TASK`, is the no-op that first
appends its start to the runs file (bench/handlers.py), for Celery's own hop, publish →
task start (bench/latency_tcp.py).
Run with `celery -A bench.plain_celery worker ...`.
"""

from __future__ import annotations

import time

from celery import Celery
from kombu import Exchange, Queue

from bench.handlers import record_start
from bridge.config import Settings
from tasks.app import celery_config

QUEUE = "plain_bench"
TASK = "bench.plain_noop"
SLEEP_TASK = "bench.plain_sleep_1s"
RECORD_TASK = "bench.plain_record"


def make_app(broker_url: str | None = None) -> Celery:
    settings = Settings.from_env(dotenv=False)
    config = celery_config(settings)
    if broker_url:
        config["broker_url"] = broker_url
    config["task_default_queue"] = QUEUE
    config["task_queues"] = [Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)]
    plain = Celery("plain_bench")
    plain.conf.update(config)

    @plain.task(name=TASK)
    def plain_noop(task_id: str, attempt: int) -> str:
        return "completed"

    @plain.task(name=SLEEP_TASK)
    def plain_sleep_1s(task_id: str, attempt: int) -> str:
        time.sleep(1.0)
        return "completed"

    @plain.task(name=RECORD_TASK)
    def plain_record(task_id: str, attempt: int) -> str:
        record_start(task_id, attempt)
        return "completed"

    return plain


app = make_app()
