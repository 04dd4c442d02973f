"""Cancellation, in one package: how a running handler learns that its task was
cancelled, and stops (here); how a worker learns a row was asked to stop (`watcher`);
how a Celery revoke becomes a cancel (`revoke`).

Each attempt a worker runs has a `CancelScope`; the worker's cancel watcher
(`tasks.cancellation.watcher`) fires it when the row is asked to stop
(`cancel_agent_task`, `agent-bridge cancel`, a Celery revoke). Then:

- an async handler is cancelled: `asyncio.CancelledError` is raised at its current
  `await`, so its `async with` blocks (HTTP streams, sessions) close;
- a sync handler sees `tasks.cancelled()` return True, and its next
  `tasks.report_progress()` raises `tasks.Cancelled`, so a streaming loop stops at its
  next chunk. A sync handler that checks neither runs to its end; its result is
  discarded (the row is already on its way to `failed` / Cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator

from bridge.errors import AgentBridgeError


class Cancelled(AgentBridgeError):
    """The task was cancelled (Stop button, `agent-bridge cancel`, Flower revoke).
    Let it propagate: the runner ends the row `failed` with the partial answer."""

    def __init__(self, message: str = "the task was cancelled") -> None:
        super().__init__(message)


class CancelScope:
    """Fires once; callbacks registered before or after that run exactly once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> bool:
        """Fire the scope; False if it had fired already."""
        with self._lock:
            if self._event.is_set():
                return False
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()
        return True

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run `callback` when the scope fires (now, if it has); returns a remover."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._remove(callback)
        callback()
        return lambda: None

    def _remove(self, callback: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)


_scope: contextvars.ContextVar[CancelScope | None] = contextvars.ContextVar(
    "agent_bridge_cancel_scope", default=None)


def cancelled() -> bool:
    """True once the running task has been asked to stop (False outside a task)."""
    scope = _scope.get()
    return scope is not None and scope.is_set()


def raise_if_cancelled() -> None:
    if cancelled():
        raise Cancelled()


def bind(scope: CancelScope | None) -> contextvars.Token[CancelScope | None]:
    return _scope.set(scope)


def unbind(token: contextvars.Token[CancelScope | None]) -> None:
    _scope.reset(token)


@contextlib.contextmanager
def cancels_current_task() -> Iterator[None]:
    """Inside a coroutine: when the bound scope fires, cancel the asyncio task running
    it (from whichever thread fired it)."""
    scope = _scope.get()
    if scope is None:
        yield
        return
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def cancel() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(task.cancel)

    remove = scope.on_cancel(cancel)
    try:
        yield
    finally:
        remove()
