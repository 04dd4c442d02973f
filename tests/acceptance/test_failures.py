"""Failure is a feature: kill workers, bridges, Redis and Postgres mid-run, and check
that nothing is lost and nothing is completed twice."""

from __future__ import annotations

import time

import psutil

from bridge.localstack import LocalRedis
from bridge.store import TaskStore
from bridge.store.postgres import PostgresTransport
from tests.db import PgServer, insert_task
from tests.stack import Stack


def completions(stack: Stack, task_id: str) -> int:
    return stack.count_in_logs(f"Task {task_id} Completed successfully")


def test_worker_killed_mid_task(stack: Stack) -> None:
    """kill -9 of the whole worker: the lease runs out, the row is rescued and
    re-claimed as attempt 2 by the next worker, and completes once."""
    worker = stack.worker(concurrency=1)
    stack.bridge()
    task = insert_task(stack.db_url, {"prompt": "p", "context": {"sleep": 3}})
    stack.wait_for("the handler to start", lambda: len(stack.runs(task)) == 1)
    worker.kill9()
    stack.worker(concurrency=1)

    stack.wait_for("completion", lambda: stack.row(task)["status"] == "completed", 60)
    row = stack.row(task)
    assert row["attempts"] == 2
    assert len(stack.runs(task)) == 2
    assert completions(stack, task) == 1


def test_pool_child_killed_mid_task(stack: Stack) -> None:
    """kill -9 of the prefork child only: Celery re-queues the message at once
    (task_reject_on_worker_lost); the copy is fenced out while the dead child's
    lease lasts, then the rescued row runs as attempt 2."""
    worker = stack.worker(concurrency=1)
    stack.bridge()
    task = insert_task(stack.db_url, {"prompt": "p", "context": {"sleep": 3}})
    stack.wait_for("the handler to start", lambda: len(stack.runs(task)) == 1)
    children = psutil.Process(worker.popen.pid).children()
    assert children, "a prefork worker has a pool child"
    for child in children:
        child.kill()

    stack.wait_for("completion", lambda: stack.row(task)["status"] == "completed", 60)
    assert stack.row(task)["attempts"] == 2
    assert completions(stack, task) == 1


def test_bridge_killed_between_claim_and_enqueue(stack: Stack) -> None:
    """A bridge that claimed rows and died before publishing leaves them processing
    with a lease and no job anywhere. We reproduce that state exactly by claiming
    through the same SQL function the bridge uses, and never publishing."""
    tasks = [insert_task(stack.db_url, {"prompt": f"p{i}"}) for i in range(3)]
    dead_bridge = TaskStore(PostgresTransport(stack.db_url))
    claimed = dead_bridge.claim(10, lease_seconds=1)
    dead_bridge.close()
    assert {c.id for c in claimed} == set(tasks)

    stack.worker()
    stack.bridge()
    rows = stack.wait_all_done(60)
    assert all(r["status"] == "completed" and r["attempts"] == 2 for r in rows)
    assert stack.count_in_logs("🛟") == 3


def test_redis_killed_and_restarted_empty(stack: Stack, own_redis: LocalRedis) -> None:
    """Every queued job is lost with Redis; leases bring every row back."""
    stack.env["REDIS_URL"] = own_redis.url
    bridge = stack.bridge()
    tasks = [insert_task(stack.db_url, {"prompt": f"p{i}"}) for i in range(10)]
    stack.wait_for("all rows enqueued", lambda: bridge.output.count("Found Task") == 10)

    own_redis.kill()
    time.sleep(1)
    own_redis.start()  # same port, nothing in it
    stack.worker()

    rows = stack.wait_all_done(60)
    assert sorted(str(r["id"]) for r in rows) == sorted(tasks)
    assert all(r["status"] == "completed" and r["attempts"] == 2 for r in rows)
    assert all(completions(stack, t) == 1 for t in tasks)
    assert bridge.alive()


def test_postgres_stopped_for_10_seconds(stack: Stack, pg_server: PgServer) -> None:
    local = pg_server.require_local()
    bridge = stack.bridge()
    worker = stack.worker(concurrency=2)
    before = [insert_task(stack.db_url, {"prompt": f"p{i}", "context": {"sleep": 1}})
              for i in range(6)]
    stack.wait_for("work to start", lambda: any(stack.runs(t) for t in before))

    local.stop()
    time.sleep(10)
    local.start()

    after = [insert_task(stack.db_url, {"prompt": f"q{i}"}) for i in range(3)]
    rows = stack.wait_all_done(90)
    assert sorted(str(r["id"]) for r in rows) == sorted(before + after)
    assert all(r["status"] == "completed" for r in rows), [r["error"] for r in rows]
    assert all(completions(stack, t) == 1 for t in before + after)
    assert bridge.alive() and worker.alive()
    assert "unavailable" in bridge.output and "reachable again" in bridge.output


def test_two_bridges_never_enqueue_a_row_twice(stack: Stack) -> None:
    bridges = [stack.bridge(), stack.bridge()]
    stack.worker(pool="threads", concurrency=20)
    tasks = [insert_task(stack.db_url, {"prompt": f"p{i}"}) for i in range(200)]
    rows = stack.wait_all_done(90)
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in rows)
    for task in tasks:
        assert sum(b.output.count(f"Found Task {task}!") for b in bridges) == 1
