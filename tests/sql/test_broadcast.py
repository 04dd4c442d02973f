"""Realtime Broadcast from the database (issue 24), on the real database through both
transports: what the writes send with realtime.send, in their own transaction, and who may
join a task's topic (the receive policy on realtime.messages, evaluated as Realtime does at
join: the subscriber's role and JWT claims, `realtime.topic` set to the topic).

realtime.messages and realtime.send are the compat schema's copies of Supabase's
(bridge/sql/supabase_compat.sql); no Realtime server runs here, so messages stay in the
table where the tests read them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bridge.names import TASK_TOPIC_PREFIX, WAKEUP_EVENT, WAKEUP_TOPIC
from bridge.store import TaskStore
from bridge.store.records import Write
from tests.db import as_role, broadcasting, claim_and_start, insert_task, sql
from tests.fakes.realtime import ensure_message_partitions


@pytest.fixture
def messages(clean_db: str) -> Iterator[str]:
    """Broadcasting on, with an empty realtime.messages that has today's partition."""
    ensure_message_partitions(clean_db)
    sql(clean_db, "delete from realtime.messages")
    with broadcasting(clean_db):
        yield clean_db


def sent(db_url: str, topic: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """(topic, event, payload) of every message sent, in the order they were inserted (one
    transaction shares its inserted_at; within it, each realtime.send is a command of its
    own, so `cmin` counts them)."""
    rows = sql(db_url, "select topic, event, payload, private from realtime.messages "
                       "where %(topic)s::text is null or topic = %(topic)s "
                       "order by inserted_at, cmin::text::integer", {"topic": topic})
    assert all(private for *_, private in rows), "every message goes to a private channel"
    return [(t, e, p) for t, e, p, _ in rows]


def task_topic(task_id: str) -> str:
    return TASK_TOPIC_PREFIX + task_id


def test_off_by_default_where_no_realtime_server_reads_the_database(clean_db: str) -> None:
    # The compat schema is not Supabase's: nothing would deliver or prune the messages.
    assert sql(clean_db, "select enabled from agent_bridge.realtime_broadcast") == [(False,)]
    ensure_message_partitions(clean_db)
    sql(clean_db, "delete from realtime.messages")
    insert_task(clean_db, {"prompt": "quiet"})
    assert sent(clean_db) == []


def test_a_pending_insert_wakes_the_bridge_once_per_transaction(messages: str) -> None:
    with psycopg.connect(messages) as conn:
        for prompt in ("one", "two", "three"):
            conn.execute("insert into public.agent_task_requests (status, request_payload) "
                         "values ('pending', %s::jsonb)", [f'{{"prompt": "{prompt}"}}'])
    # realtime.send gives a payload without an `id` the message's own.
    assert [(t, e, set(p)) for t, e, p in sent(messages)] == [(WAKEUP_TOPIC, WAKEUP_EVENT,
                                                                 {"id"})]
    insert_task(messages, {"prompt": "another transaction"})
    assert len(sent(messages, WAKEUP_TOPIC)) == 2


def test_a_task_broadcasts_its_states_and_pieces_not_its_renewals(store: TaskStore,
                                                                   messages: str) -> None:
    task = insert_task(messages, {"prompt": "watch me"}, user_id=str(uuid.uuid4()))
    attempt = claim_and_start(store, task)
    store.heartbeat(task, attempt, "w1", 60)
    assert store.append(task, attempt, "w1", 0, 0, "Hel").applied
    assert store.append(task, attempt, "w1", 1, 3, "lo").applied
    assert store.complete(task, attempt, "w1", {"answer": "Hello"}).applied
    events = sent(messages, task_topic(task))
    assert [e for _, e, _ in events] == ["state", "chunk", "chunk", "state"]
    processing, first, second, completed = (p for _, _, p in events)
    assert processing["status"] == "processing" and processing["attempts"] == attempt
    assert "request_payload" not in processing  # the user wrote it; it never changes
    assert (first["seq"], first["answer_offset"], first["text"]) == (0, 0, "Hel")
    assert (second["seq"], second["answer_offset"], second["text"]) == (1, 3, "lo")
    assert first["task_id"] == task and first["attempt"] == attempt
    assert completed["status"] == "completed"
    assert completed["response_payload"] == {"answer": "Hello"}
    assert "omitted" not in completed


def test_a_batch_of_pieces_goes_out_in_order_in_one_transaction(store: TaskStore,
                                                                 messages: str) -> None:
    tasks, attempts = [], []
    for i in range(2):  # one claim each: a claim takes every due row
        tasks.append(insert_task(messages, {"prompt": f"batch {i}"}))
        attempts.append(claim_and_start(store, tasks[-1]))
    pieces = [Write("append", task, attempt, "w1", seq=seq, offset=seq, text=str(seq))
              for seq in range(3) for task, attempt in zip(tasks, attempts, strict=True)]
    assert all(result.applied for result, _ in store.write_batch(pieces))
    for task in tasks:
        chunk_events = [p for _, e, p in sent(messages, task_topic(task)) if e == "chunk"]
        assert [(p["seq"], p["text"]) for p in chunk_events] == [(0, "0"), (1, "1"), (2, "2")]


def test_a_fenced_out_write_sends_nothing(store: TaskStore, messages: str) -> None:
    task = insert_task(messages, {"prompt": "fenced"})
    attempt = claim_and_start(store, task)
    before = sent(messages, task_topic(task))
    assert not store.complete(task, attempt, "someone-else", {"answer": "stolen"}).applied
    assert not store.append(task, attempt + 1, "w1", 0, 0, "stale").applied
    assert sent(messages, task_topic(task)) == before


def test_a_rolled_back_write_sends_nothing(messages: str) -> None:
    insert_task(messages, {"prompt": "rolled back"})
    sql(messages, "delete from realtime.messages")
    with psycopg.connect(messages) as conn:
        conn.execute("select * from public.agent_tasks_claim(10, 60)")
        assert sent(messages) == []  # not committed: another session sees nothing
        conn.rollback()
    assert sent(messages) == []


def test_an_answer_too_big_for_one_message_is_left_for_a_read(store: TaskStore,
                                                              messages: str) -> None:
    task = insert_task(messages, {"prompt": "long"})
    attempt = claim_and_start(store, task)
    assert store.complete(task, attempt, "w1", {"answer": "x" * 70_000}).applied
    *_, (_, event, payload) = sent(messages, task_topic(task))
    assert event == "state" and payload["status"] == "completed"
    assert payload["omitted"] == ["response_payload", "error", "answers"]
    assert payload["response_payload"] is None


def may_join(db_url: str, topic: str, sub: str | None, role: str = "authenticated") -> bool:
    """Realtime's read check at join: the subscriber's role and claims, `realtime.topic`
    set, a select on realtime.messages for the topic (a probe row makes the policy speak)."""
    sql(db_url, "insert into realtime.messages (topic, extension, payload, event, private) "
                "values (%s, 'broadcast', '{}', 'probe', true)", [topic])
    with as_role(db_url, role, sub) as conn:
        conn.execute("select set_config('realtime.topic', %s, true)", [topic])
        rows = conn.execute("select 1 from realtime.messages where topic = %s "
                            "and extension = 'broadcast'", [topic]).fetchall()
    return bool(rows)


def test_only_those_who_may_read_the_task_may_join_its_topic(messages: str) -> None:
    owner, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    task = insert_task(messages, {"prompt": "mine"}, user_id=owner)
    assert may_join(messages, task_topic(task), owner)
    assert not may_join(messages, task_topic(task), stranger)
    assert not may_join(messages, task_topic(str(uuid.uuid4())), owner)  # no such task
    assert not may_join(messages, TASK_TOPIC_PREFIX + "not-a-uuid", owner)
    assert not may_join(messages, WAKEUP_TOPIC, owner)  # the bridge's topic is service-only
    assert not may_join(messages, task_topic(task), None, role="anon")


def test_with_broadcasting_off_a_join_is_refused_so_the_client_falls_back(
        messages: str) -> None:
    owner = str(uuid.uuid4())
    task = insert_task(messages, {"prompt": "mine"}, user_id=owner)
    with broadcasting(messages, on=False):
        assert not may_join(messages, task_topic(task), owner)
    assert may_join(messages, task_topic(task), owner)


def test_users_cannot_send_on_a_task_topic(messages: str) -> None:
    owner = str(uuid.uuid4())
    task = insert_task(messages, {"prompt": "mine"}, user_id=owner)
    with pytest.raises(psycopg.errors.InsufficientPrivilege), \
            as_role(messages, "authenticated", owner) as conn:
        conn.execute("select set_config('realtime.topic', %s, true)", [task_topic(task)])
        conn.execute("insert into realtime.messages (topic, extension, payload, event, private)"
                     " values (%s, 'broadcast', '{}', 'state', true)", [task_topic(task)])
