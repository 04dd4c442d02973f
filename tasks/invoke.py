"""How a handler is called: sync or async, bounded by its agent's time limit in every pool.

Prefork children run one task at a time on their main thread, so there the limit is a
timer signal and nothing is left behind when it fires; the threads and solo pools give a
sync handler a thread of its own, abandoned (its result ignored) when time is up.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import signal
import threading
import time
from typing import Any

from celery.signals import worker_init, worker_process_init

from tasks import cancellation
from tasks.handlers import Handler


class HandlerTimeout(Exception):
    """The handler ran longer than AGENT_TIME_LIMIT."""


# Prefork pool children run one task at a time on their main thread: there a handler
# runs inline, and its time limit is a timer signal (as Celery's own soft limit is a
# signal), so nothing is left behind when it fires. Set in those children only; the
# threads and solo pools run tasks in the worker's own process.
_worker_pid = 0
_inline = False


@worker_init.connect
def _note_worker_process(**_: Any) -> None:
    global _worker_pid
    _worker_pid = os.getpid()


@worker_process_init.connect
def _note_pool_child(**_: Any) -> None:
    global _inline
    _inline = (os.getpid() != _worker_pid
               and threading.current_thread() is threading.main_thread())


def call_handler(handler: Handler, task: dict[str, Any], timeout: float) -> Any:
    """Run a sync or async handler, bounded by `timeout` in every pool.

    Prefork: the handler runs in the child's own thread; a SIGALRM timer raises
    HandlerTimeout in it when time is up (Celery's soft and hard limits, a little
    later, back that up: the hard one kills a child stuck in C code). Threads and
    solo: a sync handler runs in a thread of its own that is abandoned (and its
    result ignored) when time is up; it cannot be killed.
    """
    if inspect.iscoroutinefunction(handler):
        return _run_async(handler(task), timeout)
    if _inline and threading.current_thread() is threading.main_thread():
        return _call_inline(handler, task, timeout)
    context = contextvars.copy_context()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            result = context.run(handler, task)
            if inspect.isawaitable(result):
                result = context.run(_run_async, result, timeout)
            box["result"] = result
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"handler-{task['id']}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HandlerTimeout()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _call_inline(handler: Handler, task: dict[str, Any], timeout: float) -> Any:
    def expire(signum: int, frame: Any) -> None:
        raise HandlerTimeout()

    begun = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = handler(task)
        if inspect.isawaitable(result):
            result = _run_async(result, max(timeout - (time.monotonic() - begun), 0.001))
        return result
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run_async(awaitable: Any, timeout: float) -> Any:
    async def bounded() -> Any:
        with cancellation.cancels_current_task():  # a cancel request cancels the handler
            return await asyncio.wait_for(awaitable, timeout)

    begun = time.monotonic()
    try:
        return asyncio.run(bounded())
    except TimeoutError:
        if time.monotonic() - begun >= timeout:
            raise HandlerTimeout() from None
        raise
