"""Streamed answers as appended chunks (issue 15): the fenced append, the fold into the
row where it used to keep its partial answer, the chunks' visibility (RLS), and a real
worker streaming through each transport: bytes linear in the answer, writes capped per
second, the first partial at once, nothing left behind."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from psycopg import errors

from bridge.store import TaskStore
from tests.db import as_role, chunks, claim_and_start, fetch_task, insert_task, sql, streamed

LEASE = 60.0










# --------------------------------------------------------------------------- the SQL contract


def test_append_is_fenced_and_leaves_the_row_alone(store: TaskStore, clean_db: str) -> None:
    task_id = insert_task(clean_db)
    attempt = claim_and_start(store, task_id)
    updated = fetch_task(clean_db, task_id)["updated_at"]
    assert store.append(task_id, attempt, "w1", 0, 0, "Once").applied
    assert store.append(task_id, attempt, "w1", 1, 4, " upon").applied
    assert store.append(task_id, attempt, "w1", 2, 4, " more").applied  # a rewrite: from offset 4
    refused = store.append(task_id, attempt, "w2", 3, 9, " x")  # not the holder
    assert not refused.applied and refused.worker == "w1" and refused.status == "processing"
    assert not store.append(task_id, attempt + 1, "w1", 3, 9, " x").applied  # not this attempt
    assert not store.append(str(uuid.uuid4()), 1, "w1", 0, 0, "x").applied  # no such row
    row = fetch_task(clean_db, task_id)
    assert row["response_payload"] is None and row["updated_at"] == updated  # not written
    assert chunks(clean_db, task_id) == [(attempt, 0, 0, "Once"), (attempt, 1, 4, " upon"),
                                         (attempt, 2, 4, " more")]
    assert streamed(clean_db, task_id) == {"answer": "Once more", "partial": True}

    assert store.complete(task_id, attempt, "w1", {"answer": "Once more, done"}).applied
    assert chunks(clean_db, task_id) == []  # cleared with the final state
    assert not store.append(task_id, attempt, "w1", 3, 9, " late").applied
    assert chunks(clean_db, task_id) == []
    assert fetch_task(clean_db, task_id)["response_payload"] == {"answer": "Once more, done"}


def test_characters_not_bytes(store: TaskStore, clean_db: str) -> None:
    task_id = insert_task(clean_db)
    attempt = claim_and_start(store, task_id)
    assert store.append(task_id, attempt, "w1", 0, 0, "héllo 🌍").applied
    assert store.append(task_id, attempt, "w1", 1, 7, "!").applied  # 7 characters so far
    assert streamed(clean_db, task_id)["answer"] == "héllo 🌍!"


def test_a_retry_or_a_rescue_keeps_what_was_shown(store: TaskStore, clean_db: str) -> None:
    """Where the row used to keep its partial answer (a retry, back to pending), the
    chunks are folded into it; a failure writes its error as before."""
    retried, rescued, failed = (insert_task(clean_db) for _ in range(3))
    attempts = {c.id: c.attempt for c in store.claim(10, LEASE)}
    for task_id, attempt in attempts.items():
        assert store.start(task_id, attempt, "w1", LEASE)[0] is not None
    for task_id, attempt in attempts.items():
        assert store.append(task_id, attempt, "w1", 0, 0, "partial").applied
        assert store.append(task_id, attempt, "w1", 1, 7, " answer").applied
    assert store.schedule_retry(retried, attempts[retried], "w1", {"type": "E", "message": "m"},
                                0.1, LEASE).applied
    row = fetch_task(clean_db, retried)
    assert row["response_payload"] == {"answer": "partial answer", "partial": True}
    assert chunks(clean_db, retried) == []
    # The retried run (a new worker, the same attempt) starts its answer over.
    started, _ = store.start(retried, attempts[retried], "w2", LEASE)
    assert started is not None
    assert store.append(retried, attempts[retried], "w2", 0, 0, "again").applied
    assert streamed(clean_db, retried) == {"answer": "again", "partial": True}

    sql(clean_db, "update public.agent_task_requests set lease_expires_at = now() - "
                  "interval '1 second' where id = %s", [rescued])
    assert [r.status for r in store.rescue() if r.id == rescued] == ["pending"]
    assert fetch_task(clean_db, rescued)["response_payload"] == {"answer": "partial answer",
                                                                 "partial": True}
    assert store.fail(failed, attempts[failed], "w1", {"type": "E", "message": "boom"}).applied
    assert fetch_task(clean_db, failed)["response_payload"] == {"error": "boom"}
    assert chunks(clean_db, rescued) == chunks(clean_db, failed) == []


def test_a_cancel_keeps_the_streamed_answer(store: TaskStore, clean_db: str) -> None:
    gone, held = insert_task(clean_db), insert_task(clean_db)
    for claim in store.claim(10, LEASE):
        assert store.start(claim.id, claim.attempt, "w1", LEASE)[0] is not None
        assert store.append(claim.id, claim.attempt, "w1", 0, 0, "Once upon").applied
    # The holder is dead: the row ends now, with what was streamed.
    assert store.request_cancel(gone, 1, holder_gone=True) == "failed"
    # The holder stops without a partial of its own: the row's streamed answer is kept.
    assert store.cancel(held) == "processing"
    assert store.cancelled(held, 1, "w1", None).applied
    for task_id in (gone, held):
        payload: Any = fetch_task(clean_db, task_id)["response_payload"]
        assert payload["answer"] == "Once upon" and payload["partial"] is True
        assert payload["cancelled"] is True
        assert chunks(clean_db, task_id) == []


def test_a_full_progress_write_replaces_the_chunks(store: TaskStore, clean_db: str) -> None:
    task_id = insert_task(clean_db)
    attempt = claim_and_start(store, task_id)
    assert store.append(task_id, attempt, "w1", 0, 0, "draft").applied
    assert store.progress(task_id, attempt, "w1", {"answer": "x", "step": 2}).applied
    assert chunks(clean_db, task_id) == []
    assert streamed(clean_db, task_id) == {"answer": "x", "step": 2}


def test_users_read_their_own_chunks_and_write_none(clean_db: str) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    task_id = insert_task(clean_db, user_id=alice)
    sql(clean_db, "update public.agent_task_requests set status = 'processing', attempts = 1, "
                  "worker = 'w1', lease_expires_at = now() + interval '1 minute' where id = %s",
        [task_id])
    sql(clean_db, "select * from public.agent_task_append(%s, 1, 'w1', 0, 0, 'secret')",
        [task_id])
    read = "select text from public.agent_task_chunks where task_id = %s"
    with as_role(clean_db, "authenticated", alice) as conn:
        assert conn.execute(read, [task_id]).fetchall() == [("secret",)]
    with as_role(clean_db, "authenticated", bob) as conn:
        assert conn.execute(read, [task_id]).fetchall() == []
    with as_role(clean_db, "anon") as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(read, [task_id])
    for statement in (
            "insert into public.agent_task_chunks (task_id, attempt, seq, answer_offset, text) "
            "values (%s, 1, 1, 6, ' forged')",
            "update public.agent_task_chunks set text = 'forged' where task_id = %s",
            "delete from public.agent_task_chunks where task_id = %s",
            "select * from public.agent_task_append(%s, 1, 'w1', 1, 6, ' forged')"):
        with as_role(clean_db, "authenticated", alice) as conn, \
                pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement, [task_id])
    assert chunks(clean_db, task_id) == [(1, 0, 0, "secret")]


def test_deleting_a_running_row_deletes_its_chunks(clean_db: str) -> None:
    task_id = insert_task(clean_db)
    sql(clean_db, "update public.agent_task_requests set status = 'processing', attempts = 1, "
                  "worker = 'w1', lease_expires_at = now() + interval '1 minute' where id = %s",
        [task_id])
    sql(clean_db, "select * from public.agent_task_append(%s, 1, 'w1', 0, 0, 'x')", [task_id])
    sql(clean_db, "delete from public.agent_task_requests where id = %s", [task_id])
    assert chunks(clean_db, task_id) == []










