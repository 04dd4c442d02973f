"""bench/realtime_broadcast.py's pure parts: who ran a statement, the answer a subscriber
rebuilds from the pieces, what it makes of realtime-js frames, and the plan arithmetic."""

from __future__ import annotations

import json

from bench import realtime_broadcast as rb

TASK = "0b4e2f8a-3c1d-4e5f-8a9b-0c1d2e3f4a5b"


def broadcast_frame(event: str, payload: dict[str, object]) -> bytes:
    """A user broadcast as the server sends it to a vsn 2.0.0 socket (kind 4)."""
    topic, meta = f"realtime:agent_task:{TASK}".encode(), b'{"id":"m1"}'
    return (bytes([4, len(topic), len(event), len(meta), 1]) + topic + event.encode() + meta
            + json.dumps(payload).encode())


def change_frame(table: str, record: dict[str, object]) -> str:
    return json.dumps([None, None, f"realtime:agent-task-{TASK}", "postgres_changes",
                       {"ids": [1], "data": {"schema": "public", "table": table,
                                             "type": "INSERT", "record": record}}])


def test_statements_are_told_apart_by_who_runs_them() -> None:
    c = rb.statement_class
    assert c("select * from public.agent_tasks_write(p_kinds => $1::text[])", True) == rb.WRITES
    assert c("insert into realtime.messages (id, payload, event) values ($1)", False) \
        == rb.WRITES  # realtime.send, inside a write
    assert c("select exists(select $4 from \"public\".\"agent_task_chunks\" where x)",
             True) == rb.REALTIME
    assert c("BEGIN", True) == rb.REALTIME and c("COMMIT", True) == rb.REALTIME
    assert c("delete from realtime_stub.changes where id = $1 returning change", True) \
        == rb.STANDIN_LOG
    assert c("SELECT pg_notify($15, log_id::text)", False) == rb.STANDIN_LOG


def test_pieces_rebuild_the_answer_by_seq_and_offset() -> None:
    assert rb.rebuild({1: (3, "lo"), 0: (0, "Hel")}) == "Hello"
    assert rb.rebuild({0: (0, "Hex"), 1: (2, "llo")}) == "Hello"  # a piece that rewrites
    assert rb.rebuild({0: (0, "Hel"), 2: (5, "!")}) is None  # a missing piece
    assert rb.rebuild({}) == ""


def test_a_broadcast_subscriber_collects_pieces_and_ends_on_the_final_state() -> None:
    watch = rb.Watch(TASK, "user")
    watch.on_frame("broadcast", json.dumps(["1", "1", f"realtime:agent_task:{TASK}",
                                            "phx_reply", {"status": "ok", "response": {}}]))
    assert watch.ready.is_set() and watch.error is None
    for seq, (offset, text) in enumerate([(0, "Hel"), (3, "lo")]):
        watch.on_frame("broadcast", broadcast_frame("chunk", {
            "task_id": TASK, "attempt": 1, "seq": seq, "answer_offset": offset, "text": text}))
    assert not watch.done.is_set()
    watch.on_frame("broadcast", broadcast_frame("state", {
        "id": TASK, "status": "completed", "response_payload": {"answer": "Hello"}}))
    assert watch.done.is_set() and watch.final == "Hello"
    assert rb.rebuild(watch.pieces) == "Hello" and watch.messages == 3


def test_a_postgres_changes_subscriber_is_ready_once_subscribed_to_postgresql() -> None:
    watch = rb.Watch(TASK, "user")
    watch.on_frame("postgres_changes", json.dumps(
        ["1", "1", f"realtime:agent-task-{TASK}", "phx_reply",
         {"status": "ok", "response": {"postgres_changes": []}}]))
    assert not watch.ready.is_set()
    watch.on_frame("postgres_changes", json.dumps(
        ["1", None, f"realtime:agent-task-{TASK}", "system",
         {"extension": "postgres_changes", "status": "ok"}]))
    assert watch.ready.is_set() and watch.error is None
    watch.on_frame("postgres_changes", change_frame("agent_task_chunks", {
        "task_id": TASK, "seq": 0, "answer_offset": 0, "text": "Hi"}))
    watch.on_frame("postgres_changes", change_frame("agent_task_chunks", {
        "task_id": TASK, "seq": 0, "answer_offset": 0, "text": "Hi"}))
    assert watch.pieces == {0: (0, "Hi")} and watch.duplicates == 1


def test_a_refused_join_is_an_error() -> None:
    watch = rb.Watch(TASK, "user")
    watch.on_frame("broadcast", json.dumps(["1", "1", f"realtime:agent_task:{TASK}",
                                            "phx_reply", {"status": "error", "response": {
                                                "reason": "Unauthorized"}}]))
    assert watch.ready.is_set() and watch.error is not None and "Unauthorized" in watch.error


def test_a_plan_carries_its_limit_over_the_messages_of_one_stream() -> None:
    assert [rb.streams_carried(limit, 10.0) for _, limit in rb.PLANS] == [10, 50, 250]
    assert rb.streams_carried(100, 7.4) == 13
    assert rb.streams_carried(100, 0) == 0


def test_realtimes_side_is_per_message_it_handled() -> None:
    changes = {"path": "postgres_changes", "produced": 1000, "rls_checks_changes": 250,
               "standin": {}, "classes": {rb.REALTIME: {"calls": 1.0, "exec_ms": 0.01}}}
    assert rb.handled(changes) == 250
    assert rb.per_check(changes) == ("4.00", "0.0400")
    broadcast = {"path": "broadcast", "produced": 1000, "rls_checks_changes": 0,
                 "standin": {"broadcast_rows": 1000}, "classes": {}}
    assert rb.handled(broadcast) == 1000 and rb.per_check(broadcast) == ("-", "-")
