"""Live progress: a handler writes partial output while it works.

The runner binds a reporter for the task in hand; `report_progress()` writes
`response` into the row's response_payload (fenced, throttled to a few writes per
second), so a Realtime subscriber sees the answer grow. The final result replaces
it. Outside a task, or once the attempt lost its lease, it does nothing. Once the
task has been cancelled it raises `tasks.Cancelled`, so a streaming loop stops.
"""

from __future__ import annotations

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


def bind(reporter: Reporter | None) -> contextvars.Token[Reporter | None]:
    return _reporter.set(reporter)


def unbind(token: contextvars.Token[Reporter | None]) -> None:
    _reporter.reset(token)
