"""The bridge's own duties: release claims it could not enqueue, and backpressure."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
import redis

from bridge.celery_app import RUN_AGENT, create_celery_app
from bridge.config import Settings
from bridge.engine import Bridge
from bridge.localstack import LocalRedis
from bridge.publisher import BrokerUnavailable, Publisher
from bridge.store import TaskStore
from bridge.store.postgres import PostgresTransport
from tests.db import insert_task
from tests.stack import Stack


def test_claims_are_released_when_the_broker_refuses_the_jobs(
        clean_db: str, own_redis: LocalRedis, tmp_path: Path) -> None:
    """Redis answers reads but refuses writes (no replicas for min-replicas-to-write):
    the queue looks empty, the bridge claims, publishing fails, and the claims go
    straight back to pending without using up an attempt."""
    settings = Settings.from_env({"DATABASE_URL": clean_db, "REDIS_URL": own_redis.url})
    app = create_celery_app(settings, "test-bridge")
    store = TaskStore(PostgresTransport(clean_db))
    bridge = Bridge(settings, store, Publisher(app, settings.celery_queue, RUN_AGENT))
    tasks = [insert_task(clean_db) for _ in range(3)]
    broker = redis.Redis.from_url(own_redis.url)
    broker.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(BrokerUnavailable):
            bridge.step()
        rows = Stack(clean_db, own_redis.url, tmp_path).rows()
        assert {str(r["id"]) for r in rows} == set(tasks)
        assert all(r["status"] == "pending" and r["attempts"] == 1 for r in rows)
        assert all(r["max_attempts"] == 4 for r in rows)  # the release gave the attempt back
        assert bridge.counts.released == 3

        broker.config_set("min-replicas-to-write", 0)
        claimed, _ = bridge.step()
        assert claimed == 3
        assert broker.llen(settings.celery_queue) == 3
    finally:
        store.close()


def test_backpressure_claims_no_more_than_the_queue_can_hold(stack: Stack) -> None:
    stack.env["LEASE_SECONDS"] = "30"  # no lease runs out while no worker is up
    stack.bridge(BRIDGE_MAX_QUEUED="5", BRIDGE_BATCH_SIZE="100")
    with psycopg.connect(stack.db_url, autocommit=True) as conn:  # 20 rows, one commit
        conn.execute("insert into public.agent_task_requests (request_payload) "
                     "select jsonb_build_object('prompt', 'p' || i) "
                     "from generate_series(1, 20) i")
    stack.wait_for("five claims", lambda: sum(
        r["status"] == "processing" for r in stack.rows()) == 5)
    time.sleep(1.5)  # several bridge rounds later, still five
    assert sum(r["status"] == "processing" for r in stack.rows()) == 5

    stack.worker(pool="threads", concurrency=4)
    rows = stack.wait_all_done(60)
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in rows)
