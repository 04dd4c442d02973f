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

A call the database refuses for what one write holds (a value it cannot store) fails as a
whole; the writer then sends each of its writes alone, so only that write is refused. A
call that cannot reach the database fails every write in it; their callers retry as they
did one by one.

In the prefork pool each child process runs one task at a time and has its own writer:
batches there are of one task's writes, as before. The threads pool (one process, many
tasks) is where writes group.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from bridge.errors import StoreUnavailable
from bridge.store import StartedTask, TaskStore, Write, WriteResult
from tasks.process_thread import ProcessThread

Answer = tuple[WriteResult, StartedTask | None]

MAX_BATCH = 500  # writes per call: one call's arrays stay far below any request limit


class GroupWriter:
    """The worker process's one writer of task state (see the module docstring)."""

    def __init__(self, store: TaskStore, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._waiting: list[tuple[Write, Future[Answer]]] = []
        self._cond = threading.Condition()
        self._thread = ProcessThread(self._run, "group-writer")
        self.calls = 0  # calls sent, for the tests and the bench
        self.writes = 0  # writes they carried

    # One write -----------------------------------------------------------------
    def submit(self, write: Write) -> Future[Answer]:
        """Queue `write`; the future holds its answer once the call that carries it
        returned."""
        future: Future[Answer] = Future()
        with self._cond:
            self._waiting.append((write, future))
            self._thread.ensure()
            self._cond.notify()
        return future

    def write(self, write: Write) -> Answer:
        return self.submit(write).result()

    # The store's worker calls, through the writer ------------------------------------
    def start(self, task_id: str, attempt: int, worker: str, lease_seconds: float
              ) -> tuple[StartedTask | None, WriteResult]:
        """Take the attempt and read the row's payload (a message that did not carry it)."""
        result, started = self.write(Write("start", task_id, attempt, worker,
                                           seconds=lease_seconds))
        return started, result

    def bind(self, task_id: str, attempt: int, worker: str, lease_seconds: float
             ) -> WriteResult:
        """Take the attempt, reading nothing (the message carried the payload)."""
        return self.write(Write("bind", task_id, attempt, worker, seconds=lease_seconds))[0]

    def heartbeats(self, held: list[tuple[str, int, str]], lease_seconds: float
                   ) -> list[WriteResult]:
        """Renew every lease in `held` ((task_id, attempt, worker) each), in one call."""
        futures = [self.submit(Write("heartbeat", t, a, w, seconds=lease_seconds))
                   for t, a, w in held]
        return [f.result()[0] for f in futures]

    def append(self, task_id: str, attempt: int, worker: str, seq: int, offset: int, text: str
               ) -> WriteResult:
        return self.write(Write("append", task_id, attempt, worker, seq=seq, offset=offset,
                                text=text))[0]

    def progress(self, task_id: str, attempt: int, worker: str, response: Mapping[str, Any]
                 ) -> WriteResult:
        return self.write(Write("progress", task_id, attempt, worker, doc=response))[0]

    def complete(self, task_id: str, attempt: int, worker: str, response: Mapping[str, Any]
                 ) -> WriteResult:
        return self.write(Write("complete", task_id, attempt, worker, doc=response))[0]

    def fail(self, task_id: str, attempt: int, worker: str, error: Mapping[str, Any]
             ) -> WriteResult:
        return self.write(Write("fail", task_id, attempt, worker, doc=error))[0]

    def schedule_retry(self, task_id: str, attempt: int, worker: str, error: Mapping[str, Any],
                       delay_seconds: float, lease_seconds: float) -> WriteResult:
        return self.write(Write("retry", task_id, attempt, worker, doc=error,
                                delay=delay_seconds, seconds=lease_seconds))[0]

    def cancelled(self, task_id: str, attempt: int, worker: str,
                  partial: Mapping[str, Any] | None) -> WriteResult:
        return self.write(Write("cancelled", task_id, attempt, worker, doc=partial))[0]

    # The writer's thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                batch = self._waiting[:self._max_batch]
                del self._waiting[:self._max_batch]
            try:
                self._send(batch)
            except BaseException as exc:  # no caller may wait forever on a dead writer
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                raise

    def _send(self, batch: list[tuple[Write, Future[Answer]]]) -> None:
        self.calls += 1
        self.writes += len(batch)
        try:
            answers = self._store.write_batch([write for write, _ in batch])
        except StoreUnavailable as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            # Refused for what one of them holds: alone, each is answered for itself.
            for item in batch:
                self._send([item])
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            future.set_result(answer)
