"""The claim returns the payload and the Celery job carries it (issue 23), up to
AGENT_INLINE_PAYLOAD_BYTES: the worker then takes its attempt with a write that reads
nothing. A larger payload is read by the worker as before; the handler's input is the
same either way, and Flower and the logs never see the payload."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from tests.db import insert_task
from tests.stack import Stack


def queued_jobs(redis_url: str, queue: str = "agent_tasks") -> list[dict[str, Any]]:
    """The jobs waiting in a Celery queue on Redis: headers and (args, kwargs)."""
    jobs = []
    for raw in redis.Redis.from_url(redis_url).lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        jobs.append({"headers": message["headers"], "args": body[0], "kwargs": body[1]})
    return jobs


def test_the_job_carries_the_row_up_to_the_cap(stack: Stack, clean_redis: str) -> None:
    small_payload = {"prompt": "small", "context": {"secret": "s3cret"}}
    small = insert_task(stack.db_url, small_payload, priority=3)
    large = insert_task(stack.db_url, {"prompt": "large " + "x" * 4000})
    stack.bridge(AGENT_INLINE_PAYLOAD_BYTES="2000", AGENT_HANDLER="tests.handlers:echo_input")
    # Claimed (committed), then published: wait for the jobs, not the rows.
    stack.wait_for("both jobs queued", lambda: len(queued_jobs(clean_redis)) == 2)
    jobs = {job["args"][0]: job for job in queued_jobs(clean_redis)}
    assert set(jobs) == {small, large}
    carried = jobs[small]["kwargs"]["task"]
    assert carried["request_payload"] == small_payload
    assert (carried["priority"], carried["max_attempts"], carried["agent"]) == (3, 3, "default")
    assert jobs[large]["kwargs"] == {}  # over the cap: the worker reads it
    for job in jobs.values():  # what Flower shows: which row, never the payload
        shown = job["headers"]["argsrepr"] + job["headers"]["kwargsrepr"]
        assert "agent=default" in shown and "s3cret" not in shown and "xxx" not in shown

    stack.worker(AGENT_HANDLER="tests.handlers:echo_input")
    rows = {str(r["id"]): r for r in stack.wait_all_done()}
    assert {r["status"] for r in rows.values()} == {"completed"}
    seen = {task_id: rows[task_id]["response_payload"]["input"] for task_id in (small, large)}
    assert seen[small]["request_payload"] == small_payload
    assert seen[large]["request_payload"]["prompt"].startswith("large ")
    fields = {"id", "attempt", "request_payload", "max_attempts", "priority", "user_id",
              "enterprise_id", "created_at", "agent"}
    assert set(seen[small]) == set(seen[large]) == fields
    for task_id in (small, large):
        assert seen[task_id]["created_at"] == rows[task_id]["created_at"].isoformat()
        assert seen[task_id]["attempt"] == 1 and seen[task_id]["id"] == task_id


def test_zero_keeps_every_payload_out_of_the_jobs(stack: Stack, clean_redis: str) -> None:
    insert_task(stack.db_url)
    stack.bridge(AGENT_INLINE_PAYLOAD_BYTES="0")
    stack.wait_for("the job queued", lambda: len(queued_jobs(clean_redis)) == 1)
    assert [job["kwargs"] for job in queued_jobs(clean_redis)] == [{}]
    stack.worker()
    assert stack.wait_all_done()[0]["status"] == "completed"
