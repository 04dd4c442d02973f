"""Human in the loop (issue 26), the SQL side: a holder's wait (agent_task_wait, alone and
in a batch), the answers it reads back, answer_agent_task as signed-in users (directly and
through the PostgREST stand-in), the claim ending an expired question NoAnswer, and
cancel while waiting. The pipeline with real processes is
tests/acceptance/test_questions.py."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from postgrest.exceptions import APIError
from psycopg import errors
from psycopg.types.json import Jsonb

from bridge.errors import StoreRejected
from bridge.store import TaskStore, Write
from tests.db import as_role, claim_and_start, fetch_task, sql
from tests.users import submit, user_client

ALICE = str(uuid.uuid4())
BOB = str(uuid.uuid4())
LEASE = 60.0
QUESTION = {"text": "Send the email?", "choices": ["approve", "deny"]}


def wait(store: TaskStore, task_id: str, attempt: int, timeout: float = 3600.0,
         worker: str = "w1", question: Any = QUESTION) -> Any:
    return store.write_batch([Write("wait", task_id, attempt, worker,
                                    doc={"question": question}, seconds=timeout)])[0][0]


def answer_as(db_url: str, user: str, task_id: str, answer: Any) -> str:
    with as_role(db_url, "authenticated", user) as conn:
        row = conn.execute("select public.answer_agent_task(%s, %s)",
                           [task_id, Jsonb(answer)]).fetchone()
    assert row is not None
    return str(row[0])


def waiting_task(store: TaskStore, db_url: str, user: str = ALICE, timeout: float = 3600.0
                 ) -> tuple[str, int]:
    task_id, _ = submit(db_url, user)
    attempt = claim_and_start(store, task_id)
    result = wait(store, task_id, attempt, timeout)
    assert result.applied and result.status == "pending"
    return task_id, attempt


def test_a_question_frees_the_row_and_an_answer_queues_it_again(store: TaskStore,
                                                                clean_db: str) -> None:
    task_id, attempt = waiting_task(store, clean_db)
    row = fetch_task(clean_db, task_id)
    assert row["status"] == "pending" and row["worker"] is None
    assert row["lease_expires_at"] is None and row["max_attempts"] == 4
    waiting: Any = row["waiting_for"]
    assert waiting["question"] == QUESTION and waiting["number"] == 1
    assert {"asked_at", "expires_at"} <= set(waiting)
    [[due_in]] = sql(clean_db, "select extract(epoch from run_at - now()) "
                               "from public.agent_task_requests where id = %s", [task_id])
    assert 3500 < float(due_in) <= 3600
    assert store.claim(10, LEASE) == []  # not due: nothing to run while it waits
    assert store.answers(task_id, attempt, "w1") is None  # no longer the holder

    assert answer_as(clean_db, ALICE, task_id, "approve") == "pending"
    row = fetch_task(clean_db, task_id)
    answers: Any = row["answers"]
    assert row["waiting_for"] is None and len(answers) == 1
    assert answers[0]["question"] == QUESTION and answers[0]["answer"] == "approve"

    again = claim_and_start(store, task_id, worker="w2")
    assert again == attempt + 1
    recorded = store.answers(task_id, again, "w2")
    assert recorded is not None and [a["answer"] for a in recorded] == ["approve"]
    # The second question is number 2; its answer goes after the first.
    assert wait(store, task_id, again, worker="w2", question="And the $40?").applied
    assert fetch_task(clean_db, task_id)["waiting_for"]["number"] == 2  # type: ignore[index]
    assert answer_as(clean_db, ALICE, task_id, {"ok": False}) == "pending"
    third = claim_and_start(store, task_id, worker="w3")
    recorded = store.answers(task_id, third, "w3")
    assert recorded is not None and [a["answer"] for a in recorded] == ["approve", {"ok": False}]


def test_waits_go_in_one_batch_with_the_runs_usage(store: TaskStore, clean_db: str) -> None:
    ids = [submit(clean_db, ALICE)[0] for _ in range(3)]
    claimed = {c.id: c.attempt for c in store.claim(10, LEASE)}
    attempts = [claimed[task_id] for task_id in ids]
    for task_id, attempt in zip(ids, attempts, strict=True):
        assert store.start(task_id, attempt, "w1", LEASE)[0] is not None
    usage = {"input_tokens": 10, "output_tokens": 5, "cost": 0.01}
    writes = [Write("usage", ids[0], attempts[0], "w1", doc=usage, seq=1)]
    writes += [Write("wait", t, a, "w1", doc={"question": f"q{t}"}, seconds=60)
               for t, a in zip(ids[:2], attempts[:2], strict=True)]
    writes.append(Write("complete", ids[2], attempts[2], "w1", doc={"answer": "done"}))
    writes.append(Write("wait", ids[0], attempts[0], "other", doc={"question": "x"},
                        seconds=60))  # a stale holder: fenced out
    results = [r for r, _ in store.write_batch(writes)]
    assert [r.applied for r in results] == [True, True, True, True, False]
    assert [r.status for r in results[1:4]] == ["pending", "pending", "completed"]
    first = fetch_task(clean_db, ids[0])
    assert first["usage"]["input_tokens"] == 10  # type: ignore[index]
    assert first["waiting_for"]["question"] == f"q{ids[0]}"  # type: ignore[index]


def test_a_question_left_unanswered_ends_no_answer_at_the_claim(store: TaskStore,
                                                               clean_db: str) -> None:
    task_id, attempt = waiting_task(store, clean_db, timeout=0.2)
    time.sleep(0.4)
    assert store.claim(10, LEASE) == []  # ended, not sent to a worker
    row = fetch_task(clean_db, task_id)
    error: Any = row["error"]
    assert row["status"] == "failed" and row["waiting_for"] is None
    assert error["type"] == "NoAnswer" and error["question"] == QUESTION
    assert error["retryable"] is False and "expired" in error["message"]
    assert row["attempts"] == attempt  # no new attempt for it
    assert row["response_payload"] == {"error": error["message"]}
    with pytest.raises(errors.RaiseException, match="not waiting for an answer"):
        answer_as(clean_db, ALICE, task_id, "too late")


def test_cancel_while_waiting_ends_the_task_at_once(store: TaskStore, clean_db: str) -> None:
    task_id, _ = waiting_task(store, clean_db)
    assert store.cancel(task_id) == "failed"
    row = fetch_task(clean_db, task_id)
    assert row["waiting_for"] is None
    assert row["error"]["type"] == "Cancelled"  # type: ignore[index]
    assert row["error"]["message"] == ("Cancelled on request while waiting for "  # type: ignore[index]
                                       "an answer.")


def test_a_cancel_requested_before_the_question_ends_the_task(store: TaskStore,
                                                              clean_db: str) -> None:
    task_id, _ = submit(clean_db, ALICE)
    attempt = claim_and_start(store, task_id)
    assert store.cancel(task_id) == "processing"  # its holder is asked to stop
    result = wait(store, task_id, attempt)
    assert result.applied and result.status == "failed"
    row = fetch_task(clean_db, task_id)
    assert row["error"]["type"] == "Cancelled" and row["waiting_for"] is None  # type: ignore[index]


def test_what_a_holder_may_ask(store: TaskStore, clean_db: str) -> None:
    task_id, _ = submit(clean_db, ALICE)
    attempt = claim_and_start(store, task_id)
    with pytest.raises(StoreRejected, match="at most 16384 bytes"):
        wait(store, task_id, attempt, question="x" * 20000)
    with pytest.raises(StoreRejected, match="p_timeout_seconds"):
        wait(store, task_id, attempt, timeout=0)
    assert fetch_task(clean_db, task_id)["status"] == "processing"  # nothing changed


def test_only_the_tasks_user_may_answer_and_only_while_it_waits(store: TaskStore,
                                                               clean_db: str) -> None:
    task_id, _ = waiting_task(store, clean_db)
    for who, which in ((BOB, task_id), (ALICE, str(uuid.uuid4()))):
        with pytest.raises(errors.RaiseException, match=f"no agent task {which} of yours"):
            answer_as(clean_db, who, which, "approve")
    with pytest.raises(errors.RaiseException, match=f"no agent task {task_id} of yours"), \
            as_role(clean_db, "authenticated") as conn:  # signed in as nobody
        conn.execute("select public.answer_agent_task(%s, '1')", [task_id])
    with pytest.raises(errors.InvalidParameterValue, match="at most 65536 bytes"):
        answer_as(clean_db, ALICE, task_id, "x" * 70000)
    with pytest.raises(errors.InvalidParameterValue, match="SQL null"), \
            as_role(clean_db, "authenticated", ALICE) as conn:
        conn.execute("select public.answer_agent_task(%s, null)", [task_id])
    with pytest.raises(errors.InsufficientPrivilege), \
            as_role(clean_db, "anon") as conn:
        conn.execute("select public.answer_agent_task(%s, '1')", [task_id])
    with pytest.raises(errors.InsufficientPrivilege), \
            as_role(clean_db, "authenticated", ALICE) as conn:  # the worker's side is not theirs
        conn.execute("select public.agent_task_answers(%s, 1, 'w1')", [task_id])
    assert fetch_task(clean_db, task_id)["waiting_for"] is not None  # nothing recorded

    assert answer_as(clean_db, ALICE, task_id, "deny") == "pending"
    with pytest.raises(errors.RaiseException,
                       match="has its answer and is queued to go on"):
        answer_as(clean_db, ALICE, task_id, "deny")  # a second click
    with as_role(clean_db, "authenticated", ALICE) as conn:  # users read what they answered
        row = conn.execute("select waiting_for, answers from public.agent_task_requests "
                           "where id = %s", [task_id]).fetchone()
    assert row is not None and row[0] is None and row[1][0]["answer"] == "deny"


def test_users_answer_through_the_api_with_their_token(store: TaskStore, clean_db: str,
                                                       postgrest: str) -> None:
    """supabase.rpc('answer_agent_task', { task_id, answer }) with a signed user JWT,
    through the PostgREST stand-in: Bob is refused (400, the message), Alice answers."""
    task_id, _ = waiting_task(store, clean_db)
    bob, alice = user_client(postgrest, BOB), user_client(postgrest, ALICE)
    with pytest.raises(APIError) as refused:
        bob.rpc("answer_agent_task", {"task_id": task_id, "answer": "approve"}).execute()
    assert refused.value.code == "P0001"
    assert refused.value.message == f"no agent task {task_id} of yours"
    assert alice.rpc("answer_agent_task",
                     {"task_id": task_id, "answer": "approve"}).execute().data == "pending"
    assert fetch_task(clean_db, task_id)["answers"][0]["answer"] == "approve"  # type: ignore[index]


def test_agent_bridge_show_tells_what_a_task_waits_for(store: TaskStore, clean_db: str) -> None:
    from bridge.commands.show import describe

    task_id, _ = waiting_task(store, clean_db)
    row = store.show(task_id)
    assert row is not None
    lines = describe(row)
    assert any(line.startswith("  waiting   for its user's answer to question 1, until ")
               for line in lines), lines
    assert "Send the email?" not in "\n".join(lines)  # what was asked stays in the row
    answer_as(clean_db, ALICE, task_id, "approve")
    row = store.show(task_id)
    assert row is not None and "  answers   1 recorded" in describe(row)
