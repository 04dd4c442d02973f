"""Retry through a real Flower: `POST /api/task/send-task/tasks.requeue_failed` with basic
auth re-runs a failed row through the bridge and a worker; Flower lists the
`tasks.run_agent` jobs it saw, by their Celery task id `<task id>:<attempt>`, a failed row's
job as FAILURE with the row's error."""

from __future__ import annotations

import time
from typing import Any

import httpx
import redis

from bridge.localstack import free_port
from tests.db import insert_task
from tests.flower import AUTH, poll, start_flower
from tests.stack import Stack


def run_agent_jobs(api: str) -> list[dict[str, Any]]:
    """Every tasks.run_agent job Flower knows about, `args` its [task id, attempt] (read
    from its Celery task id: Flower shows args as `agent=… task=… attempt=…`)."""
    response = httpx.get(f"{api}/tasks", params={"taskname": "tasks.run_agent"}, auth=AUTH,
                         timeout=5)
    response.raise_for_status()
    jobs = []
    for uuid, task in response.json().items():
        task_id, _, attempt = uuid.rpartition(":")
        jobs.append(dict(task, args=[task_id, int(attempt)]))
    return jobs


def run_agent_args(api: str) -> list[list[Any]]:
    """The args of every tasks.run_agent job Flower knows about."""
    return [job["args"] for job in run_agent_jobs(api)]


def job_state(api: str, args: list[Any]) -> tuple[str, str | None] | None:
    """(state, exception) of the job with these args, once Flower has seen it end."""
    for job in run_agent_jobs(api):
        if job["args"] == args and job["state"] in ("SUCCESS", "FAILURE"):
            return str(job["state"]), job.get("exception")
    return None


def test_requeue_a_failed_row_through_flower(stack: Stack) -> None:
    stack.env["CELERY_TASK_EVENTS"] = "true"  # as docker-compose.yml sets it
    port = free_port()
    flower = start_flower(stack, port)
    api = f"http://127.0.0.1:{port}/api"
    poll("Flower to answer", lambda: httpx.get(f"http://127.0.0.1:{port}/healthcheck",
                                               timeout=2).text == "OK", flower)
    stack.worker()
    stack.bridge()

    flag = stack.tmp / "fixed"
    task_id = insert_task(stack.db_url, {"prompt": "p", "context": {
        "fail_unless_file": str(flag)}})
    stack.wait_for("the failure", lambda: stack.row(task_id)["status"] == "failed")
    poll("Flower to list attempt 1", lambda: [task_id, 1] in run_agent_args(api), flower)
    # A failed row is a failed job in Flower, with the row's error (it was SUCCESS with
    # result 'failed'); its message was still acknowledged, once.
    state, exception = poll("attempt 1 to end in Flower", lambda: job_state(api, [task_id, 1]),
                            flower)
    assert state == "FAILURE"
    assert exception == f"TaskFailed('ValueError: {flag} does not exist')"
    broker = redis.Redis.from_url(stack.env["REDIS_URL"])
    stack.wait_for("the job's ack", lambda: broker.hlen("unacked") == 0)
    assert broker.llen("agent_tasks") == 0
    assert stack.row(task_id)["error"]["message"] == f"{flag} does not exist"
    assert stack.count_in_logs("raised unexpected") == 0  # an expected failure: no traceback

    send = f"{api}/task/send-task/tasks.requeue_failed"
    denied = httpx.post(send, json={"args": [task_id]}, timeout=10)
    assert denied.status_code == 401
    assert stack.row(task_id)["status"] == "failed"

    flag.touch()
    sent = httpx.post(send, json={"args": [task_id]}, auth=AUTH, timeout=10)
    assert sent.status_code == 200, sent.text
    assert sent.json()["task-id"]

    stack.wait_for("the re-run", lambda: stack.row(task_id)["status"] == "completed")
    row = stack.row(task_id)
    assert row["attempts"] == 2
    assert row["response_payload"]["answer"] == "Agent processed: p"
    poll("Flower to list attempt 2", lambda: [task_id, 2] in run_agent_args(api), flower)
    assert poll("attempt 2 to end in Flower", lambda: job_state(api, [task_id, 2]),
                flower)[0] == "SUCCESS"
    assert stack.count_in_logs("Requeued 1 failed task(s) on operator request") == 1


def test_flower_turns_the_workers_events_on_by_itself(stack: Stack) -> None:
    """CELERY_TASK_EVENTS is off by default; Flower (its --enable-events default) tells the
    workers to send events within a few seconds of meeting them, and then lists their jobs."""
    assert "CELERY_TASK_EVENTS" not in stack.env
    stack.worker()
    stack.bridge()
    port = free_port()
    flower = start_flower(stack, port)
    api = f"http://127.0.0.1:{port}/api"
    poll("Flower to answer", lambda: httpx.get(f"http://127.0.0.1:{port}/healthcheck",
                                               timeout=2).text == "OK", flower)
    deadline = time.monotonic() + 40
    listed: list[str] = []
    while not listed and time.monotonic() < deadline:
        task_id = insert_task(stack.db_url, {"prompt": "p"})

        def finished(task_id: str = task_id) -> bool:
            return bool(stack.row(task_id)["status"] == "completed")

        stack.wait_for("the task", finished)
        time.sleep(1)
        if job_state(api, [task_id, 1]) == ("SUCCESS", None):
            listed.append(task_id)
    assert listed, f"Flower never listed a job\n{flower.output}"
