"""Group commit (issue 23): a worker process's writes go through one GroupWriter, which
sends what is waiting as one call of public.agent_tasks_write; each write is still fenced
for its own row, and a write the database refuses fails alone. Both transports."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Settings
from bridge.errors import StoreRejected
from bridge.store import Claim, StartedTask, TaskStore, Write
from tasks.lease import Holding
from tasks.progress import StreamFlusher
from tasks.runtime import WorkerRuntime
from tasks.writer import GroupWriter
from tests.db import fetch_task, insert_task, sql

LEASE = 60.0
REPO = Path(__file__).resolve().parents[2]


def claimed(store: TaskStore, db_url: str, count: int, **claim: Any) -> list[Claim]:
    ids = {insert_task(db_url, {"prompt": f"p{i}", "context": {"i": i}}) for i in range(count)}
    claims = store.claim(count, LEASE, **claim)
    assert {c.id for c in claims} == ids
    return claims


def test_writes_that_wait_together_go_in_one_call(store: TaskStore, clean_db: str) -> None:
    claims = claimed(store, clean_db, 40)
    writer = GroupWriter(store)
    gate = threading.Barrier(len(claims))
    answers: dict[str, Any] = {}

    def run(claim: Claim) -> None:
        gate.wait()
        assert writer.bind(claim.id, claim.attempt, f"w-{claim.id}", LEASE).applied
        answers[claim.id] = writer.complete(claim.id, claim.attempt, f"w-{claim.id}",
                                            {"answer": claim.id})

    threads = [threading.Thread(target=run, args=(c,)) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.applied and a.status == "completed" for a in answers.values())
    for claim in claims:
        row = fetch_task(clean_db, claim.id)
        assert (row["status"], row["response_payload"]) == ("completed", {"answer": claim.id})
    assert writer.writes == 80
    assert writer.calls < writer.writes  # grouped: 40 tasks' binds and outcomes


def test_alone_a_write_goes_at_once(store: TaskStore, clean_db: str) -> None:
    [claim] = claimed(store, clean_db, 1)
    writer = GroupWriter(store)
    assert writer.bind(claim.id, claim.attempt, "w", LEASE).applied
    assert writer.heartbeats([(claim.id, claim.attempt, "w")], LEASE)[0].applied
    assert writer.fail(claim.id, claim.attempt, "w", {"type": "Boom", "message": "m"}).applied
    assert (writer.calls, writer.writes) == (3, 3)
    assert fetch_task(clean_db, claim.id)["status"] == "failed"


def test_each_write_is_fenced_for_its_own_row(store: TaskStore, clean_db: str) -> None:
    first, second = claimed(store, clean_db, 2)
    results = store.write_batch([
        Write("bind", first.id, first.attempt, "w1", seconds=LEASE),
        Write("bind", second.id, second.attempt + 1, "w2", seconds=LEASE),  # stale attempt
        Write("complete", first.id, first.attempt, "w1", doc={"answer": "a"}),
    ])
    assert [r.applied for r, _ in results] == [True, False, True]
    assert results[1][0].status == "processing" and results[1][0].attempts == second.attempt
    assert fetch_task(clean_db, first.id)["status"] == "completed"
    assert fetch_task(clean_db, second.id)["worker"] is None


def test_a_write_the_database_refuses_fails_alone(store: TaskStore, clean_db: str) -> None:
    claims = claimed(store, clean_db, 3)
    writer = GroupWriter(store)
    for c in claims:
        assert writer.bind(c.id, c.attempt, "w", LEASE).applied
    # Sent together: the middle one's answer holds a NUL, which jsonb cannot store.
    futures = [writer.submit(Write("complete", c.id, c.attempt, "w",
                                   doc={"answer": "bad\u0000" if i == 1 else "ok"}))
               for i, c in enumerate(claims)]
    assert futures[0].result()[0].applied and futures[2].result()[0].applied
    with pytest.raises(StoreRejected):
        futures[1].result()
    assert [fetch_task(clean_db, c.id)["status"] for c in claims] == [
        "completed", "processing", "completed"]


def test_start_reads_the_row_and_the_claim_can_carry_it(store: TaskStore,
                                                         clean_db: str) -> None:
    """The two ways a worker takes an attempt give its handler the same input: `start`
    reads the row; `bind` reads nothing and uses what the claim returned (Claim.row)."""
    [by_start] = claimed(store, clean_db, 1)
    [by_claim] = claimed(store, clean_db, 1, inline_bytes=65536)
    assert by_start.row is None and by_claim.row is not None
    writer = GroupWriter(store)
    started, result = writer.start(by_start.id, by_start.attempt, "w", LEASE)
    assert result.applied and started is not None
    assert writer.bind(by_claim.id, by_claim.attempt, "w", LEASE).applied
    inline = StartedTask.from_message(by_claim.id, by_claim.attempt, by_claim.row)
    unlike = {"id", "request_payload", "created_at"}
    a, b = started.as_handler_input(), inline.as_handler_input()
    assert {k: v for k, v in a.items() if k not in unlike} == {
        k: v for k, v in b.items() if k not in unlike}
    assert b["request_payload"] == fetch_task(clean_db, by_claim.id)["request_payload"]
    assert a["created_at"] is not None and b["created_at"] is not None


def test_a_payload_over_the_cap_is_not_in_the_claim(store: TaskStore, clean_db: str) -> None:
    insert_task(clean_db, {"prompt": "x" * 5000})
    [claim] = store.claim(1, LEASE, inline_bytes=1000)
    assert claim.row is None  # the worker reads it at start


def test_a_duplicate_delivery_is_refused_while_the_first_holds_the_lease(
        store: TaskStore, clean_db: str) -> None:
    [claim] = claimed(store, clean_db, 1, inline_bytes=65536)
    writer = GroupWriter(store)
    assert writer.bind(claim.id, claim.attempt, "first", LEASE).applied
    again = writer.bind(claim.id, claim.attempt, "second", LEASE)
    assert not again.applied and again.worker == "first"


def test_streams_of_a_process_are_written_together_and_rebuild_the_answer(
        store: TaskStore, clean_db: str) -> None:
    claims = claimed(store, clean_db, 5)
    writer = GroupWriter(store)
    flusher = StreamFlusher(writer, Settings.from_env({"AGENT_STREAM_INTERVAL": "0.05"}))
    opened = []
    for c in claims:
        assert writer.bind(c.id, c.attempt, "w", LEASE).applied
        opened.append(flusher.open(Holding(c.id, c.attempt, "w"), {}, lambda _: None))
    for i in range(1, 41):
        for _, report in opened:
            report({"answer": "t" * i, "partial": True}, False)
    deadline = time.monotonic() + 5  # the last reports go with the next round
    while any(s.pending is not None for s, _ in opened):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for stream, _ in opened:
        flusher.close(stream)
    for c in claims:
        rebuilt = sql(clean_db, "select agent_bridge.streamed_answer(%s, %s)", [c.id, c.attempt])
        assert rebuilt == [("t" * 40,)]
    # 5 streams × 40 reports: a handful of writes each, sent a round at a time.
    assert writer.writes < 5 * 40 and writer.calls < writer.writes


class ThreadRecordingStore(TaskStore):
    """The real store, noting which thread sent each call."""

    def __init__(self, store: TaskStore) -> None:
        super().__init__(store.transport)
        self.senders: list[str] = []

    def write_batch(self, writes: Any) -> Any:
        self.senders.append(threading.current_thread().name)
        return super().write_batch(writes)


def test_an_idle_writer_lets_the_caller_send(store: TaskStore, clean_db: str) -> None:
    """No hand-over to the writer's thread and back when nothing else is in flight: in the
    prefork pool (one task per child) that is every write."""
    [claim] = claimed(store, clean_db, 1)
    recording = ThreadRecordingStore(store)
    writer = GroupWriter(recording)
    assert writer.bind(claim.id, claim.attempt, "w", LEASE).applied
    assert writer.complete(claim.id, claim.attempt, "w", {"answer": "a"}).applied
    assert recording.senders == [threading.current_thread().name] * 2


def test_a_round_of_renewals_is_one_call_even_on_an_idle_writer(store: TaskStore,
                                                                  clean_db: str) -> None:
    claims = claimed(store, clean_db, 3)
    writer = GroupWriter(store)
    for c in claims:
        assert writer.bind(c.id, c.attempt, "w", LEASE).applied
    held = [(c.id, c.attempt, "w") for c in claims] + [(claims[0].id, claims[0].attempt, "x")]
    results = writer.heartbeats(held, LEASE)
    assert [r.applied for r in results] == [True, True, True, False]  # each fenced alone
    assert (writer.calls, writer.writes) == (4, 7)  # three binds, then one call of four


# AGENT_GROUP_COMMIT_WAIT: while other tasks of the process run, a write waits for theirs.
# `wait` is a minute here, so a write that went out only after it would hang the test (the
# joins below give up long before): each case shows what sends it without waiting.

def run_tasks(writer: GroupWriter, claims: list[Claim], body: Any) -> dict[str, Any]:
    """One thread per claim, each a running task of `writer` doing `body(claim, gate)`,
    all started before any of them writes; what each returned, by claim id."""
    gate = threading.Barrier(len(claims))
    done: dict[str, Any] = {}

    def task(claim: Claim) -> None:
        with writer.running():
            gate.wait()
            done[claim.id] = body(claim, gate)

    threads = [threading.Thread(target=task, args=(c,)) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a write waited for a task that never wrote"
    return done


def test_while_other_tasks_run_a_write_waits_for_theirs(store: TaskStore,
                                                         clean_db: str) -> None:
    claims = claimed(store, clean_db, 4)
    writer = GroupWriter(store, wait=60)
    done = run_tasks(writer, claims,
                     lambda c, _: writer.bind(c.id, c.attempt, f"w-{c.id}", LEASE).applied)
    assert all(done.values()) and len(done) == 4
    assert (writer.calls, writer.writes) == (1, 4)  # sent once every running task had one


def test_a_task_that_ends_lets_the_others_writes_go(store: TaskStore, clean_db: str) -> None:
    writing, idle = claimed(store, clean_db, 2)
    writer = GroupWriter(store, wait=60)

    def body(claim: Claim, gate: threading.Barrier) -> bool:
        if claim is idle:
            return True  # ends without a write while the other's waits for it
        return writer.bind(claim.id, claim.attempt, "w", LEASE).applied

    assert run_tasks(writer, [writing, idle], body) == {writing.id: True, idle.id: True}
    assert (writer.calls, writer.writes) == (1, 1)


def test_a_write_waits_no_longer_than_the_wait(store: TaskStore, clean_db: str) -> None:
    writing, busy = claimed(store, clean_db, 2)
    writer = GroupWriter(store, wait=0.05)
    written = threading.Event()

    def body(claim: Claim, gate: threading.Barrier) -> bool:
        if claim is busy:  # runs on (a handler at work) until the other's write is back
            return written.wait(timeout=30)
        applied = writer.bind(claim.id, claim.attempt, "w", LEASE).applied
        written.set()
        return applied

    assert run_tasks(writer, [writing, busy], body) == {writing.id: True, busy.id: True}
    assert fetch_task(clean_db, writing.id)["worker"] == "w"


def test_a_worker_process_writer_waits_as_configured(db_url: str) -> None:
    settings = Settings.from_env({"DATABASE_URL": db_url, "AGENT_GROUP_COMMIT_WAIT": "0.02"},
                                 dotenv=False)
    runtime = WorkerRuntime.open(settings)
    try:
        assert runtime.writer.commit_wait == 0.02
    finally:
        runtime.store.close()


def test_a_task_alone_in_its_process_never_waits(store: TaskStore, clean_db: str) -> None:
    """A prefork child runs one task at a time: its writes go at once, from its own thread,
    whatever the wait."""
    [claim] = claimed(store, clean_db, 1)
    recording = ThreadRecordingStore(store)
    writer = GroupWriter(recording, wait=60)
    with writer.running():
        assert writer.bind(claim.id, claim.attempt, "w", LEASE).applied
        assert writer.complete(claim.id, claim.attempt, "w", {"answer": "a"}).applied
    assert recording.senders == [threading.current_thread().name] * 2


# A worker process killed (kill -9) while its outcome waits for the others' writes: the
# child below is such a process, two running tasks on the real database, the quick one's
# outcome waiting for the holder's next write (a minute here, so the kill surely lands in
# the wait).
KILLED_WRITER = """
import sys, threading, time
from bridge.store import open_store
from bridge.config import Settings
from tasks.writer import GroupWriter

url, quick, holder, attempt = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
writer = GroupWriter(open_store(Settings.from_env({"DATABASE_URL": url}, dotenv=False)),
                     wait=60)
both = threading.Barrier(2)
handed = threading.Event()

def task(task_id, then):
    with writer.running():
        both.wait()
        assert writer.bind(task_id, attempt, "doomed", 1).applied
        then(task_id)

def finish(task_id):
    handed.set()
    writer.complete(task_id, attempt, "doomed", {"answer": "lost"})

threading.Thread(target=task, args=(quick, finish), daemon=True).start()
threading.Thread(target=task, args=(holder, lambda t: time.sleep(600)), daemon=True).start()
handed.wait()
while not writer._waiting:  # the quick task's outcome, handed over and waiting
    time.sleep(0.01)
print("waiting", flush=True)
time.sleep(600)
"""


def test_a_worker_killed_with_an_outcome_waiting_loses_nothing(store: TaskStore,
                                                               clean_db: str) -> None:
    """The outcome was never sent, so the row never showed `completed`: its lease runs out,
    the rescue makes it pending, and the next attempt completes it, once."""
    quick, holder = claimed(store, clean_db, 2)
    assert quick.attempt == holder.attempt == 1
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, clean_db, quick.id, holder.id, "1"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "waiting"
        assert fetch_task(clean_db, quick.id)["worker"] == "doomed"  # the binds went
        child.kill()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    row = fetch_task(clean_db, quick.id)
    assert (row["status"], row["response_payload"]) == ("processing", None)

    deadline = time.monotonic() + 30  # the binds' one-second leases run out
    while {r.id for r in store.rescue()} != {quick.id, holder.id}:
        assert time.monotonic() < deadline, "the leases never ran out"
        time.sleep(0.2)
    again = {c.id: c for c in store.claim(2, LEASE)}
    assert again[quick.id].attempt == 2
    writer = GroupWriter(store)
    assert writer.bind(quick.id, 2, "next", LEASE).applied
    assert writer.complete(quick.id, 2, "next", {"answer": "again"}).applied
    row = fetch_task(clean_db, quick.id)
    assert (row["status"], row["attempts"], row["response_payload"]) == (
        "completed", 2, {"answer": "again"})
