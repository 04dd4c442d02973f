"""Live progress: a handler writes partial output while it works.

The runner binds a reporter for the task in hand; `report_progress()` writes
`response` (fenced, throttled to one write per AGENT_PROGRESS_INTERVAL, the first at
once), so a Realtime subscriber sees the answer grow. A streamed answer
(`{"answer": text, "partial": True}`) is written as the text added since the last
write (a row of agent_task_chunks); any other shape rewrites the row's
response_payload. The final result replaces it. Outside a task, or once the attempt
lost its lease, it does nothing. Once the task has been cancelled it raises
`tasks.Cancelled`, so a streaming loop stops.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bridge.config import Settings
from bridge.store import TaskStore, WriteResult
from tasks.cancellation import raise_if_cancelled
from tasks.lease import Holding
from tasks.payload import json_size

log = logging.getLogger(__name__)

Reporter = Callable[[Mapping[str, Any], bool], bool]

_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "agent_bridge_progress", default=None)


def report_progress(response: Mapping[str, Any], *, force: bool = False) -> bool:
    """Store partial output; True if written. Throttled unless `force`. Raises
    `tasks.Cancelled` once the task has been cancelled."""
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


def throttled_reporter(store: TaskStore, settings: Settings, holding: Holding,
                       fields: Mapping[str, Any],
                       keep: Callable[[Mapping[str, Any]], None]) -> Reporter:
    """The reporter of the attempt `holding`: writes at most one partial output per
    AGENT_PROGRESS_INTERVAL (the first at once; a report in between is kept and goes with
    the next write, or the final result replaces it). A streamed answer is appended
    (store.append: only what is new, so the bytes written stay linear in its length); any
    other shape rewrites the row (store.progress). `keep` gets every report (the partial
    answer a cancelled task keeps)."""
    task_id, attempt, worker = holding.task_id, holding.attempt, holding.worker
    last = float("-inf")
    lock = threading.Lock()  # one write at a time: the pieces' order is the answer's
    written: str | None = None  # the answer the pieces written so far rebuild
    seq = 0  # the next piece's number in this attempt

    def report(response: Mapping[str, Any], force: bool) -> bool:
        nonlocal last, written, seq
        keep(response)
        result: WriteResult
        with lock:
            now = time.monotonic()
            if holding.lost.is_set() or (
                    not force and now - last < settings.progress_interval):
                return False
            answer = streamed_answer(response)
            if answer is not None and answer == written:
                return False  # nothing new
            last = now
            # Partial output is a courtesy: one that is not JSON, too large, or refused
            # by the database is skipped, and the task goes on.
            try:
                size = json_size(response)
            except (TypeError, ValueError, RecursionError):
                return False
            if size > settings.max_response_bytes:
                log.debug("Task %s: partial output of %d bytes skipped (AGENT_MAX_RESPONSE_"
                          "BYTES=%d)", task_id, size, settings.max_response_bytes,
                          extra={"action": "progress_skipped", **fields})
                return False
            try:
                if answer is None:
                    # The row's payload is the answer again (its pieces are dropped).
                    written = None
                    result = store.progress(task_id, attempt, worker, response)
                else:
                    # A piece at offset 0 starts over: after a failed or unknown write.
                    offset = 0 if written is None else common_prefix(written, answer)
                    seq += 1
                    written = None  # unknown until the write answers
                    result = store.append(task_id, attempt, worker, seq - 1, offset,
                                          answer[offset:])
                    if result.applied:
                        written = answer
            except Exception:  # StoreError, or a value the driver cannot send
                return False
        if not result.applied:
            holding.lost.set()
        return result.applied

    return report


def bind(reporter: Reporter | None) -> contextvars.Token[Reporter | None]:
    return _reporter.set(reporter)


def unbind(token: contextvars.Token[Reporter | None]) -> None:
    _reporter.reset(token)
