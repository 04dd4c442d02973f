"""Human in the loop (issue 26) with real processes: a handler asks (tasks.ask), the worker
slot goes to another task while the question waits, the user's answer runs the handler on
to the end; an unanswered question, a cancel while waiting, and a worker killed after the
answer. The SQL side is tests/sql/test_questions.py."""

from __future__ import annotations

import json
import uuid
from typing import Any

from psycopg.types.json import Jsonb

from bridge.store import TaskStore
from tests.db import as_role
from tests.stack import Stack
from tests.users import submit

ALICE = str(uuid.uuid4())
HANDLER = "tests.question_handlers:approval"


def submit_task(stack: Stack, **context: Any) -> str:
    payload = json.dumps({"prompt": "Email my landlord", "context": context})
    task_id, _ = submit(stack.db_url, ALICE, values=f"'{payload}'")
    return task_id


def answer(stack: Stack, task_id: str, value: Any) -> str:
    with as_role(stack.db_url, "authenticated", ALICE) as conn:
        row = conn.execute("select public.answer_agent_task(%s, %s)",
                           [task_id, Jsonb(value)]).fetchone()
    assert row is not None
    return str(row[0])


def waiting(stack: Stack, task_id: str, number: int = 1) -> dict[str, Any]:
    stack.wait_for(f"question {number} of {task_id}", lambda: (
        stack.row(task_id)["waiting_for"] or {}).get("number") == number)
    return stack.row(task_id)


def finished(stack: Stack, task_id: str) -> dict[str, Any]:
    stack.wait_for(f"{task_id} to finish",
                   lambda: stack.row(task_id)["status"] in ("completed", "failed"))
    return stack.row(task_id)


def test_a_question_frees_the_worker_and_the_answer_finishes_the_task(
        store: TaskStore, env: dict[str, Any], stack: Stack) -> None:
    """One worker slot: while task A waits for its user, task B runs on it; A's two answers
    each queue it again, and it completes with both."""
    stack.worker(pool="prefork", concurrency=1, AGENT_HANDLER=HANDLER, **env)
    stack.bridge(**env)
    asking = submit_task(stack, questions=2)
    row = waiting(stack, asking)
    assert row["status"] == "pending" and row["worker"] is None
    assert row["waiting_for"]["question"]["choices"] == ["approve", "deny"]

    other = submit_task(stack, questions=0)  # asks nothing: runs on the freed slot
    assert finished(stack, other)["status"] == "completed"
    assert stack.row(asking)["status"] == "pending"

    assert answer(stack, asking, "approve") == "pending"
    waiting(stack, asking, number=2)
    assert answer(stack, asking, "deny") == "pending"
    row = finished(stack, asking)
    assert row["status"] == "completed", row["error"]
    assert row["response_payload"]["answers"] == ["approve", "deny"]
    assert [a["answer"] for a in row["answers"]] == ["approve", "deny"]
    runs = stack.runs(asking)
    assert [r for r in runs if r.startswith("start")] == [
        "start attempt=1", "start attempt=2", "start attempt=3"]  # one run per answer
    assert runs[-1] == 'answered ["approve", "deny"]'


def test_async_handlers_ask_too(stack: Stack) -> None:
    stack.worker(pool="threads", concurrency=2,
                 AGENT_HANDLER="tests.question_handlers:approval_async")
    stack.bridge()
    task_id = submit_task(stack)
    assert waiting(stack, task_id)["waiting_for"]["question"] == "Question 1?"
    answer(stack, task_id, {"approved": True})
    row = finished(stack, task_id)
    assert row["status"] == "completed" and row["response_payload"]["answers"] == [
        {"approved": True}]


def test_an_unanswered_question_ends_the_task_no_answer(stack: Stack) -> None:
    stack.worker(concurrency=1, AGENT_HANDLER=HANDLER)
    stack.bridge()
    task_id = submit_task(stack, timeout=1)
    waiting(stack, task_id)
    row = finished(stack, task_id)
    assert row["status"] == "failed" and row["error"]["type"] == "NoAnswer"
    assert row["response_payload"] == {"error": row["error"]["message"]}
    assert stack.runs(task_id) == ["start attempt=1"]  # not run again to find that out


def test_cancel_while_waiting(stack: Stack) -> None:
    stack.worker(concurrency=1, AGENT_HANDLER=HANDLER)
    stack.bridge()
    task_id = submit_task(stack)
    waiting(stack, task_id)
    with as_role(stack.db_url, "authenticated", ALICE) as conn:
        found = conn.execute("select public.cancel_agent_task(%s)", [task_id]).fetchone()
    assert found is not None and found[0] == "failed"
    row = stack.row(task_id)
    assert row["error"]["type"] == "Cancelled" and row["waiting_for"] is None
    assert stack.runs(task_id) == ["start attempt=1"]


def test_a_worker_killed_after_the_answer(stack: Stack) -> None:
    """The run after the answer dies (kill -9): the lease runs out, the task runs again with
    the recorded answer (not asking again), and completes once."""
    worker = stack.worker(concurrency=1, AGENT_HANDLER=HANDLER)
    stack.bridge()
    task_id = submit_task(stack, sleep_after=60, sleep_on_attempt=2)
    waiting(stack, task_id)
    answer(stack, task_id, "approve")
    stack.wait_for("the answered run", lambda: any(
        r.startswith("answered") for r in stack.runs(task_id)))
    worker.kill9()
    stack.worker(concurrency=1, AGENT_HANDLER=HANDLER)
    row = finished(stack, task_id)
    assert row["status"] == "completed", row["error"]
    assert row["response_payload"]["answers"] == ["approve"] and len(row["answers"]) == 1
    assert stack.runs(task_id) == ["start attempt=1", "start attempt=2", 'answered ["approve"]',
                                   "start attempt=3", 'answered ["approve"]']
