"""Live progress: a handler writes partial output while it works.

The runner binds a reporter for the task in hand; `report_progress()` keeps `response`,
and the process's StreamFlusher writes it (fenced; at most one write per
AGENT_STREAM_INTERVAL per task, the first at once; what is reported in between goes with
the next), so a Realtime subscriber sees the answer grow. All of a process's due streams
go in one call of its writer. A streamed answer (`{"answer": text, "partial": True}`) is
written as the text added since the last write (a row of agent_task_chunks); any other
shape rewrites the row's response_payload. The final result replaces it. Outside a task,
or once the attempt lost its lease, it does nothing. Once the task has been cancelled it
raises `tasks.Cancelled`, so a streaming loop stops.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bridge.config import Settings
from bridge.store import Write, WriteResult
from tasks.cancellation import raise_if_cancelled
from tasks.lease import Holding
from tasks.payload import json_size
from tasks.process_thread import ProcessThread
from tasks.writer import GroupWriter

log = logging.getLogger(__name__)

Reporter = Callable[[Mapping[str, Any], bool], bool]

_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "agent_bridge_progress", default=None)


def report_progress(response: Mapping[str, Any], *, force: bool = False) -> bool:
    """Store partial output; True if it will be written (with `force`: it was written,
    at once). Raises `tasks.Cancelled` once the task has been cancelled."""
    raise_if_cancelled()
    reporter = _reporter.get()
    if reporter is None:
        return False
    return reporter(response, force)


async def report_progress_async(response: Mapping[str, Any], *, force: bool = False) -> bool:
    """`report_progress` for async handlers. The write runs on a thread (with this task's
    context), so the process's shared handler loop, and every other async task on it, is
    not held up by the database round trip."""
    return await asyncio.to_thread(report_progress, response, force=force)


def streamed_answer(response: Mapping[str, Any]) -> str | None:
    """The answer of a partial output the worker may write as appended pieces
    (`{"answer": str}`, with at most `"partial": True` besides); None for any other shape,
    which is written whole."""
    answer = response.get("answer")
    if not isinstance(answer, str) or not set(response) <= {"answer", "partial"}:
        return None
    return answer if response.get("partial", True) is True else None


def common_prefix(written: str, answer: str) -> int:
    """How many leading characters `answer` shares with `written`."""
    if answer.startswith(written):
        return len(written)
    low, high = 0, min(len(written), len(answer))
    while low < high:  # the longest equal prefix, by halves
        mid = (low + high + 1) // 2
        if written[:mid] == answer[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


class TaskStream:
    """The partial output of one attempt (`holding`): what its pieces written so far
    rebuild, and the latest report not yet written."""

    def __init__(self, holding: Holding, fields: Mapping[str, Any],
                 keep: Callable[[Mapping[str, Any]], None]) -> None:
        self.holding = holding
        self.fields = fields
        self.keep = keep
        self.pending: dict[str, Any] | None = None  # the latest report, not yet written
        self.last = float("-inf")  # when the last write was taken
        self.written: str | None = None  # the answer the pieces written so far rebuild
        self.seq = 0  # the next piece's number in this attempt
        self.answering: str | None = None  # the answer the piece being written completes
        self.lock = threading.Lock()  # guards pending and last
        self.writing = threading.Lock()  # one write at a time: the pieces' order is the answer's

    def take(self) -> Write | None:
        """The write that brings the row up to the latest report (None: nothing new).
        Called with `writing` held."""
        with self.lock:
            response, self.pending = self.pending, None
            if response is None:
                return None
            self.last = time.monotonic()
        h = self.holding
        answer = streamed_answer(response)
        if answer is None:
            # The row's payload is the answer again (its pieces are dropped).
            self.written = None
            return Write("progress", h.task_id, h.attempt, h.worker, doc=response)
        if answer == self.written:
            return None
        # A piece at offset 0 starts over: after a failed or unknown write.
        offset = 0 if self.written is None else common_prefix(self.written, answer)
        self.seq += 1
        self.written = None  # unknown until the write answers
        self.answering = answer
        return Write("append", h.task_id, h.attempt, h.worker, seq=self.seq - 1, offset=offset,
                     text=answer[offset:])

    def settle(self, write: Write, result: WriteResult | None) -> bool:
        """Record how `write` went (None: it could not be sent); True if applied."""
        if result is None:
            return False
        if not result.applied:
            self.holding.lost.set()
            return False
        if write.kind == "append":
            self.written = self.answering
        return True


class StreamFlusher:
    """The worker process's partial outputs: every report is kept in its TaskStream, and
    one thread writes every stream that is due (its last write at least
    AGENT_STREAM_INTERVAL ago) in one call of the process's writer, so a process's
    streaming tasks cost one statement per interval, not one per piece. A handler never
    waits for the database to report (unless it forces a write)."""

    def __init__(self, writer: GroupWriter, settings: Settings) -> None:
        self._writer = writer
        self._settings = settings
        self._streams: set[TaskStream] = set()
        self._cond = threading.Condition()
        self._thread = ProcessThread(self._run, "stream-flusher")

    def open(self, holding: Holding, fields: Mapping[str, Any],
             keep: Callable[[Mapping[str, Any]], None]) -> tuple[TaskStream, Reporter]:
        stream = TaskStream(holding, fields, keep)
        with self._cond:
            self._streams.add(stream)
        return stream, functools.partial(self._report, stream)

    def close(self, stream: TaskStream) -> None:
        """The attempt ends: what it did not write is dropped (its outcome has it all); a
        write under way finishes first, so the outcome comes after it."""
        with self._cond:
            self._streams.discard(stream)
        with stream.writing:
            stream.pending = None

    def _report(self, stream: TaskStream, response: Mapping[str, Any], force: bool) -> bool:
        stream.keep(response)
        if stream.holding.lost.is_set():
            return False
        # Partial output is a courtesy: one that is not JSON or too large is skipped, and
        # the task goes on.
        try:
            size = json_size(response)
        except (TypeError, ValueError, RecursionError):
            return False
        if size > self._settings.max_response_bytes:
            log.debug("Task %s: partial output of %d bytes skipped (AGENT_MAX_RESPONSE_"
                      "BYTES=%d)", stream.holding.task_id, size,
                      self._settings.max_response_bytes,
                      extra={"action": "progress_skipped", **stream.fields})
            return False
        answer = streamed_answer(response)
        with stream.lock:
            if answer is not None and answer == stream.written and stream.pending is None:
                return False  # nothing new
            stream.pending = dict(response)
        if force or self._settings.stream_interval == 0:
            return self._write_now(stream)
        self._wake()
        return True

    def _write_now(self, stream: TaskStream) -> bool:
        with stream.writing:
            write = stream.take()
            if write is None:
                return False
            try:
                result: WriteResult | None = self._writer.write(write)[0]
            except Exception:  # StoreError, or a value the driver cannot send
                result = None
            return stream.settle(write, result)

    def _wake(self) -> None:
        with self._cond:
            self._thread.ensure()
            self._cond.notify()

    def _due(self) -> tuple[list[TaskStream], float | None]:
        """The streams due now, and how long until the next one is (None: none waits)."""
        now, interval = time.monotonic(), self._settings.stream_interval
        due, wait = [], None
        for stream in self._streams:
            if stream.pending is None:
                continue
            left = stream.last + interval - now
            if left <= 0:
                due.append(stream)
            else:
                wait = left if wait is None else min(wait, left)
        return due, wait

    def _run(self) -> None:
        while True:
            with self._cond:
                due, wait = self._due()
                while not due:
                    self._cond.wait(wait)
                    due, wait = self._due()
            self._flush(due)

    def _flush(self, streams: list[TaskStream]) -> None:
        """Write every stream of `streams` in one call of the writer."""
        taken: list[tuple[TaskStream, Write]] = []
        for stream in streams:
            if not stream.writing.acquire(blocking=False):
                continue  # a forced write of its own is under way; next round
            write = stream.take()
            if write is None:
                stream.writing.release()
                continue
            taken.append((stream, write))
        futures = self._writer.submit_each([write for _, write in taken])
        for (stream, write), future in zip(taken, futures, strict=True):
            try:
                result: WriteResult | None = future.result()[0]
            except Exception:
                result = None
            stream.settle(write, result)
            stream.writing.release()


def bind(reporter: Reporter | None) -> contextvars.Token[Reporter | None]:
    return _reporter.set(reporter)


def unbind(token: contextvars.Token[Reporter | None]) -> None:
    _reporter.reset(token)
