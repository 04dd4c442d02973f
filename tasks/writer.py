"""Group commit: every state write of a worker process goes through one writer.

A task's thread hands its write (its bind or start, a lease renewal, a streamed piece, its
outcome) to the process's writer and waits for its own row of the answer. The writer sends
whatever is waiting as one call, `public.agent_tasks_write` (arrays in, one row out per
write, each fenced by its attempt and worker), which is one transaction. Alone, a write is
sent at once, so a quiet worker adds no latency; under load, the writes that arrive while a
call is in flight form the next one. A caller returns only after the call that carried its
write came back, that is after its commit: a task is acknowledged after its outcome
committed, as before. Outcomes make the commit wait for the disk; a call without one is
relaxed (see agent_bridge.relax_commit).

Writes handed over together (an outcome and the usage of the run that produced it) are a
group: they always travel in one call, so they commit or fail together.

A call the database refuses for what one write holds (a value it cannot store) fails as a
whole; the writer then sends each of its groups alone, so only that group is refused. A
call that cannot reach the database fails every write in it; their callers retry as they
did one by one.

A write handed to an idle writer (nothing in flight, nothing waiting) is sent by the
caller's own thread: no hand-over to the writer's thread and back, which at low load and in
the prefork pool (each child runs one task at a time, so its writer is always idle) was two
thread switches per write on the path to the handler. Writes that arrive while a call is in
flight wait for the writer's thread, which sends them together as soon as it is done. Either
way one call at a time is in flight, in arrival order.

While other tasks of the process run, a write waits for theirs a little
(AGENT_GROUP_COMMIT_WAIT, 5 ms by default; PostgreSQL's own `commit_delay` with
`commit_siblings` is the same idea): it is sent when every running task has a write
waiting, when one of them ends, or when the oldest waiting write has waited that long,
whichever comes first. A call costs the database about as much as the writes in it (the
round trip, the transaction, each statement's set-up), so fewer, fuller calls are what cut
its CPU per task under load. A task alone in its process (a prefork child, a quiet worker)
never waits.

In the prefork pool each child process has its own writer: batches there are of one task's
writes, as before. The threads pool (one process, many tasks) is where writes group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from bridge.errors import StoreUnavailable
from bridge.store import StartedTask, TaskStore, Write, WriteResult
from tasks.process_thread import ProcessThread

Answer = tuple[WriteResult, StartedTask | None]
Item = tuple[Write, "Future[Answer]", int]  # a write, its caller's future, its group

MAX_BATCH = 500  # writes per call: one call's arrays stay far below any request limit


class GroupWriter:
    """The worker process's one writer of task state (see the module docstring)."""

    def __init__(self, store: TaskStore, max_batch: int = MAX_BATCH, wait: float = 0.0
                 ) -> None:
        self._store = store
        self._max_batch = max_batch
        self.commit_wait = wait  # seconds a write may wait for other running tasks' writes
        self._waiting: list[Item] = []
        self._waiting_since = 0.0  # when the oldest write in _waiting arrived
        self._groups = 0
        self._running = 0  # tasks of this process between their start and their outcome
        self._busy = False  # a call is in flight (from a caller's thread or the writer's)
        self._cond = threading.Condition()
        self._thread = ProcessThread(self._run, "group-writer")
        self.calls = 0  # calls sent, for the tests and the bench
        self.writes = 0  # writes they carried

    @contextmanager
    def running(self) -> Iterator[None]:
        """One task of this process runs, from before its start to after its outcome:
        while more than one does, a write may wait for the others' (see the module
        docstring)."""
        with self._cond:
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()  # a write waiting for this task's goes now

    # One write -----------------------------------------------------------------
    def submit(self, write: Write) -> Future[Answer]:
        """Queue `write`; the future holds its answer once the call that carries it
        returned."""
        return self.submit_group([write])[0]

    def submit_group(self, writes: list[Write]) -> list[Future[Answer]]:
        """Queue `writes` to travel in one call (one transaction), in this order."""
        return self._dispatch(writes, together=True)

    def submit_each(self, writes: list[Write]) -> list[Future[Answer]]:
        """Queue `writes` to travel in one call, each answered for itself (a write the
        database refuses fails alone): a round of lease renewals or stream pieces."""
        return self._dispatch(writes, together=False)

    def _dispatch(self, writes: list[Write], *, together: bool) -> list[Future[Answer]]:
        futures: list[Future[Answer]] = [Future() for _ in writes]
        items: list[Item] = []
        with self._cond:
            for write, future in zip(writes, futures, strict=True):
                if not together or not items:
                    self._groups += 1
                items.append((write, future, self._groups))
            inline = (not self._busy and not self._waiting and len(items) <= self._max_batch
                      and (self._running <= 1 or self.commit_wait <= 0))
            if inline:
                self._busy = True
            else:
                if not self._waiting:
                    self._waiting_since = time.monotonic()
                self._waiting += items
                self._thread.ensure()
                self._cond.notify()
        if inline:
            self._send_exclusively(items)
        return futures

    def _send_exclusively(self, batch: list[Item]) -> None:
        """Send `batch` as the one call in flight (the caller set `_busy`), from a caller's
        thread or the writer's; then the writer's thread takes whatever arrived meanwhile.
        No caller may wait forever on a call that died (a time limit raised in the sending
        thread, a dying writer thread): its futures get the exception."""
        try:
            self._send(batch)
        except BaseException as exc:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            with self._cond:
                self._busy = False
                if self._waiting:
                    self._thread.ensure()
                    self._cond.notify()

    def write(self, write: Write) -> Answer:
        return self.submit(write).result()

    def write_with_usage(self, write: Write, usage: Mapping[str, Any] | None, run: int
                         ) -> WriteResult:
        """An outcome, with what the run spent (a `usage` write of run `run`) in the same
        transaction when it reported any: counted once, and only if the outcome can be."""
        if usage is None:
            return self.write(write)[0]
        report = Write("usage", write.task_id, write.attempt, write.worker, doc=usage, seq=run)
        futures = self.submit_group([report, write])
        return futures[1].result()[0]

    # The store's worker calls, through the writer ------------------------------------
    def start(self, task_id: str, attempt: int, worker: str, lease_seconds: float,
              spend: Mapping[str, Any] | None = None
              ) -> tuple[StartedTask | None, WriteResult]:
        """Take the attempt and read the row's payload (a message that did not carry it);
        with `spend`, reserve it from the tenant's budget (tasks/usage.py)."""
        result, started = self.write(Write("start", task_id, attempt, worker, doc=spend,
                                           seconds=lease_seconds))
        return started, result

    def bind(self, task_id: str, attempt: int, worker: str, lease_seconds: float,
             spend: Mapping[str, Any] | None = None) -> WriteResult:
        """Take the attempt, reading nothing (the message carried the payload); with
        `spend`, reserve it from the tenant's budget (the result's `budget`)."""
        return self.write(Write("bind", task_id, attempt, worker, doc=spend,
                                seconds=lease_seconds))[0]

    def heartbeats(self, held: list[tuple[str, int, str]], lease_seconds: float
                   ) -> list[WriteResult]:
        """Renew every lease in `held` ((task_id, attempt, worker) each), in one call."""
        futures = self.submit_each([Write("heartbeat", t, a, w, seconds=lease_seconds)
                                    for t, a, w in held])
        return [f.result()[0] for f in futures]

    def append(self, task_id: str, attempt: int, worker: str, seq: int, offset: int, text: str
               ) -> WriteResult:
        return self.write(Write("append", task_id, attempt, worker, seq=seq, offset=offset,
                                text=text))[0]

    def progress(self, task_id: str, attempt: int, worker: str, response: Mapping[str, Any]
                 ) -> WriteResult:
        return self.write(Write("progress", task_id, attempt, worker, doc=response))[0]

    # The outcomes: each with the run's usage (`usage`, run `run`) when it reported any.
    def complete(self, task_id: str, attempt: int, worker: str, response: Mapping[str, Any],
                 usage: Mapping[str, Any] | None = None, run: int = 1) -> WriteResult:
        return self.write_with_usage(Write("complete", task_id, attempt, worker, doc=response),
                                     usage, run)

    def fail(self, task_id: str, attempt: int, worker: str, error: Mapping[str, Any],
             usage: Mapping[str, Any] | None = None, run: int = 1) -> WriteResult:
        return self.write_with_usage(Write("fail", task_id, attempt, worker, doc=error),
                                     usage, run)

    def schedule_retry(self, task_id: str, attempt: int, worker: str, error: Mapping[str, Any],
                       delay_seconds: float, lease_seconds: float,
                       usage: Mapping[str, Any] | None = None, run: int = 1) -> WriteResult:
        return self.write_with_usage(Write("retry", task_id, attempt, worker, doc=error,
                                           delay=delay_seconds, seconds=lease_seconds),
                                     usage, run)

    def cancelled(self, task_id: str, attempt: int, worker: str,
                  partial: Mapping[str, Any] | None,
                  usage: Mapping[str, Any] | None = None, run: int = 1) -> WriteResult:
        return self.write_with_usage(Write("cancelled", task_id, attempt, worker, doc=partial),
                                     usage, run)

    def wait(self, task_id: str, attempt: int, worker: str, waiting: Mapping[str, Any],
             timeout_seconds: float, usage: Mapping[str, Any] | None = None, run: int = 1
             ) -> WriteResult:
        """The handler asked its user `waiting` ({question}): the attempt ends, the row
        waits (pending) for an answer until `timeout_seconds`."""
        return self.write_with_usage(Write("wait", task_id, attempt, worker, doc=waiting,
                                           seconds=timeout_seconds), usage, run)

    # The writer's thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting or self._busy:
                    self._cond.wait()
                self._wait_for_company()
                cut = min(self._max_batch, len(self._waiting))
                while cut < len(self._waiting) and \
                        self._waiting[cut][2] == self._waiting[cut - 1][2]:
                    cut += 1  # a group is never split
                batch = self._waiting[:cut]
                del self._waiting[:cut]
                self._waiting_since = time.monotonic()  # what is left arrived by now
                self._busy = True
            self._send_exclusively(batch)

    def _wait_for_company(self) -> None:
        """With the lock held and writes waiting: wait until every running task has a
        write waiting (or one ends), at most until the oldest has waited `commit_wait`."""
        if self.commit_wait <= 0:
            return
        deadline = self._waiting_since + self.commit_wait
        while len({group for _, _, group in self._waiting}) < self._running:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _send(self, batch: list[Item]) -> None:
        self.calls += 1
        self.writes += len(batch)
        try:
            answers = self._store.write_batch([write for write, _, _ in batch])
        except StoreUnavailable as exc:
            for _, future, _ in batch:
                future.set_exception(exc)
            return
        except Exception as exc:
            groups = sorted({group for _, _, group in batch})
            if len(groups) == 1:
                for _, future, _ in batch:
                    future.set_exception(exc)
                return
            # Refused for what one of them holds: alone, each group is answered for itself.
            for group in groups:
                self._send([item for item in batch if item[2] == group])
            return
        for (_, future, _), answer in zip(batch, answers, strict=True):
            future.set_result(answer)
