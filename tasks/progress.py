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
from collections.abc import Callable, Mapping
from typing import Any

from tasks.cancellation import raise_if_cancelled

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


def bind(reporter: Reporter | None) -> contextvars.Token[Reporter | None]:
    return _reporter.set(reporter)


def unbind(token: contextvars.Token[Reporter | None]) -> None:
    _reporter.reset(token)
