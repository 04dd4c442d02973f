"""How a handler is called: sync or async, bounded by its agent's time limit in every pool.

Async handlers (and sync handlers that return an awaitable) run on one event loop per
worker process, on a daemon thread of its own (`handler_loop`), started on first use
and started afresh in a forked child. Every async task of the process shares it, so a
client made once (an `openai.AsyncOpenAI`, an `httpx.AsyncClient`, with their
connection pools) serves them all. The calling thread waits for the result; the
coroutine runs in a copy of the caller's context (progress reporter, cancel scope,
agent). Blocking calls (`time.sleep`, `requests`, a sync database driver) inside an
`async def` stop every other async task of the process while they run: use their
async forms, or `await asyncio.to_thread(...)`. A loop found blocked past a task's
time limit is abandoned (logged as an error) and the next task gets a new one.

Prefork children run one task at a time on their main thread, so there a sync
handler's limit is a timer signal and nothing is left behind when it fires; the
threads and solo pools give a sync handler a thread of its own (reused from task to
task), abandoned (its result ignored) when time is up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import inspect
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Awaitable
from typing import Any

from celery.signals import worker_init, worker_process_init

from bridge.errors import AgentBridgeError
from tasks import cancellation
from tasks.handlers import Handler

log = logging.getLogger(__name__)

# How long past its time limit a caller waits for an async handler to end (the limit
# is enforced on the loop; this covers a handler that ignores its cancellation or a
# loop blocked by a handler), and how long a loop may take to answer a ping before
# it is declared blocked and replaced.
ASYNC_GRACE = 2.0
LOOP_PING_TIMEOUT = 1.0
# Seconds an idle handler thread (threads and solo pools) is kept for the next task.
THREAD_IDLE_SECONDS = 60.0


class HandlerTimeout(AgentBridgeError):
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

    Async: on the process's handler loop; the limit cancels the coroutine there.
    Prefork, sync: the handler runs in the child's own thread; a SIGALRM timer raises
    HandlerTimeout in it when time is up (Celery's soft and hard limits, a little
    later, back that up: the hard one kills a child stuck in C code). Threads and
    solo, sync: the handler runs in a handler thread that is abandoned (and its
    result ignored) when time is up; it cannot be killed.
    """
    if inspect.iscoroutinefunction(handler):
        return run_async(handler(task), timeout)
    if _inline and threading.current_thread() is threading.main_thread():
        return _call_inline(handler, task, timeout)
    return _threads.call(handler, task, timeout)


def _call_inline(handler: Handler, task: dict[str, Any], timeout: float) -> Any:
    def expire(signum: int, frame: Any) -> None:
        raise HandlerTimeout()

    begun = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = handler(task)
        if inspect.isawaitable(result):
            result = run_async(result, max(timeout - (time.monotonic() - begun), 0.001))
        return result
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- async


class _HandlerLoop:
    """One event loop per process on a daemon thread; a forked child starts its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name="handler-loop", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread, self._pid = loop, thread, os.getpid()

    def on_loop_thread(self) -> bool:
        return self._thread is threading.current_thread() and self._pid == os.getpid()

    def abandon_if_blocked(self, loop: asyncio.AbstractEventLoop) -> bool:
        """If `loop` does not run a callback within LOOP_PING_TIMEOUT, forget it (its
        thread stays blocked; the next task starts a new loop). True if abandoned."""
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # closed
            return False
        if answered.wait(LOOP_PING_TIMEOUT):
            return False
        with self._lock:
            if self._loop is loop:
                self._loop, self._thread = None, None
        return True

    def forget_after_fork(self) -> None:
        # The parent's loop thread does not exist in the child; its lock may have been
        # held by another thread at the fork. The old loop is left unclosed: its
        # descriptors are the parent's too.
        self._lock = threading.Lock()
        self._loop, self._thread, self._pid = None, None, 0


_loop = _HandlerLoop()


def handler_loop() -> asyncio.AbstractEventLoop:
    """This process's handler event loop (started if need be): every async handler of
    the process runs on it."""
    return _loop.get()


def run_async(awaitable: Awaitable[Any], timeout: float) -> Any:
    """Run `awaitable` on the handler loop within `timeout` seconds, in a copy of the
    caller's context, and return its result. Raises HandlerTimeout when time is up
    (the coroutine is cancelled on the loop first); a cancel of the bound cancel scope
    cancels it too (asyncio.CancelledError is raised here)."""
    if _loop.on_loop_thread():
        raise RuntimeError("run_async called from the handler loop itself; await instead")
    loop = _loop.get()
    context = contextvars.copy_context()
    done = threading.Lock()  # released when the task ends (lighter than an Event)
    done.acquire()
    outcome: dict[str, Any] = {}
    handle: list[asyncio.Task[Any]] = []

    def finish(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            outcome["error"] = asyncio.CancelledError()
        elif (error := task.exception()) is not None:
            outcome["error"] = error
        else:
            outcome["result"] = task.result()
        done.release()

    def start() -> None:
        try:
            task = loop.create_task(_bounded(awaitable, timeout), context=context)
        except BaseException as exc:
            outcome["error"] = exc
            done.release()
            return
        handle.append(task)
        task.add_done_callback(finish)

    loop.call_soon_threadsafe(start)
    try:
        finished = done.acquire(timeout=timeout + ASYNC_GRACE)
    finally:
        if not outcome:  # out of time, or interrupted (prefork's SIGALRM)
            _cancel_on(loop, handle)
    if not finished:
        if _loop.abandon_if_blocked(loop):
            log.error("The handler event loop was blocked past a task's time limit: an async "
                      "handler called blocking code (time.sleep, a sync HTTP or database "
                      "call). That loop is abandoned; a new one runs the next tasks.")
        raise HandlerTimeout()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def _cancel_on(loop: asyncio.AbstractEventLoop, handle: list[asyncio.Task[Any]]) -> None:
    def cancel() -> None:
        if handle:
            handle[0].cancel()

    with contextlib.suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(cancel)


async def _bounded(awaitable: Awaitable[Any], timeout: float) -> Any:
    with cancellation.cancels_current_task():  # a cancel request cancels the handler
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                return await awaitable
        except TimeoutError:
            if limit.expired():
                raise HandlerTimeout() from None
            raise


# --------------------------------------------------------------------------- sync threads


class _HandlerThreads:
    """Threads that run sync handlers in the threads and solo pools, reused from task to
    task. A caller waits up to the time limit; a handler still running then is abandoned:
    its thread finishes it (the result is dropped) and only then serves again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: collections.deque[queue.SimpleQueue[_Job]] = collections.deque()

    def call(self, handler: Handler, task: dict[str, Any], timeout: float) -> Any:
        job = _Job(handler, task, timeout, contextvars.copy_context())
        self._inbox().put(job)
        if not job.done.acquire(timeout=timeout):
            raise HandlerTimeout()  # the thread finishes the handler; its result is dropped
        if job.error is not None:
            raise job.error
        return job.result

    def _inbox(self) -> queue.SimpleQueue[_Job]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(inbox,), name="handler",
                         daemon=True).start()
        return inbox

    def _serve(self, inbox: queue.SimpleQueue[_Job]) -> None:
        while True:
            try:
                job = inbox.get(timeout=THREAD_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    try:
                        self._idle.remove(inbox)
                    except ValueError:  # taken meanwhile: a job is on its way
                        pass
                    else:
                        return
                continue
            job.run()
            del job  # its task and result are not kept while the thread is idle
            with self._lock:
                self._idle.append(inbox)

    def forget_after_fork(self) -> None:
        """A forked child has none of the parent's handler threads (os.register_at_fork)."""
        self._lock = threading.Lock()
        self._idle.clear()


class _Job:
    __slots__ = ("context", "done", "error", "handler", "result", "task",
                 "timeout")

    def __init__(self, handler: Handler, task: dict[str, Any], timeout: float,
                 context: contextvars.Context) -> None:
        self.handler = handler
        self.task = task
        self.timeout = timeout
        self.context = context
        self.done = threading.Lock()  # released when the handler returns
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        begun = time.monotonic()
        try:
            result = self.context.run(self.handler, self.task)
            if inspect.isawaitable(result):
                remaining = max(self.timeout - (time.monotonic() - begun), 0.001)
                result = self.context.run(run_async, result, remaining)
            self.result = result
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.release()


_threads = _HandlerThreads()


def _after_fork_in_child() -> None:
    _loop.forget_after_fork()
    _threads.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["HandlerTimeout", "call_handler", "handler_loop", "run_async"]
