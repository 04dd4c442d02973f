"""Every failure ends its row once, with a clear error, and never runs the agent twice (issue
10): with real processes (a bridge, workers, the stand-ins). The SQL side is
tests/sql/test_hardening.py."""

from __future__ import annotations

from functools import partial

import psutil
from celery import Celery

from bridge.config import Settings
from bridge.store import TaskStore
from bridge.store.postgres import PostgresTransport
from tests.db import fetch_task, insert_task
from tests.stack import Stack

LEASE = 60.0
























































# --------------------------------------------------------------------------- workers


def has_status(stack: Stack, task_id: str, status: str) -> bool:
    return bool(stack.row(task_id)["status"] == status)


def pool_children(worker: psutil.Process) -> list[psutil.Process]:
    children: list[psutil.Process] = worker.children(recursive=True)
    return children


def test_prefork_hangs_do_not_leak_threads(stack: Stack) -> None:
    """A sync handler past AGENT_TIME_LIMIT left its thread behind in the prefork child
    (6 -> 9 threads after three hangs). Now it runs in the child's own thread and the
    time limit interrupts it there."""
    worker = stack.worker(concurrency=1, AGENT_HANDLER="tests.hardening_handlers:odd",
                          AGENT_TIME_LIMIT="1")
    stack.bridge()
    main = psutil.Process(worker.popen.pid)
    threads = []
    for n in range(3):
        task_id = insert_task(stack.db_url, {"prompt": f"hang {n}", "context": {"hang": 600}})
        stack.wait_for("the time limit", partial(has_status, stack, task_id, "failed"))
        failed = stack.row(task_id)
        assert failed["error"]["type"] == "TimeLimitExceeded", failed["error"]
        assert len(stack.runs(task_id)) == 1
        [child] = pool_children(main)
        threads.append(child.num_threads())
    assert threads[0] == threads[1] == threads[2], threads
    after = insert_task(stack.db_url, {"prompt": "after"})
    stack.wait_for("the next task", lambda: stack.row(after)["status"] == "completed")


def test_an_old_job_reaching_a_worker_is_dropped(stack: Stack) -> None:
    """Attempt 2 is claimed (not started); attempt 1's job arrives late at a worker: it is
    acknowledged and dropped, the handler does not run, the row is untouched."""
    stack.worker(concurrency=1)
    task_id = insert_task(stack.db_url)
    store = TaskStore(PostgresTransport(stack.db_url))
    settings = Settings.from_env({"DATABASE_URL": stack.db_url,
                                  "REDIS_URL": stack.env["REDIS_URL"]}, dotenv=False)
    app = Celery("test-old-job", broker=settings.broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        [first] = store.claim(1, LEASE)
        assert store.release(first).applied
        [second] = store.claim(1, LEASE)
        before = fetch_task(stack.db_url, task_id)
        app.send_task("tasks.run_agent", args=(task_id, first.attempt),
                      queue=settings.celery_queue)
        [worker] = stack.procs
        worker.wait_for_output(f"Task {task_id} attempt 1 skipped: the row is at attempt 2")
        assert fetch_task(stack.db_url, task_id) == before and stack.runs(task_id) == []
        app.send_task("tasks.run_agent", args=(task_id, second.attempt),
                      queue=settings.celery_queue)
        stack.wait_for("attempt 2", lambda: stack.row(task_id)["status"] == "completed")
        assert len(stack.runs(task_id)) == 1
    finally:
        store.close()
        app.close()






