"""tasks.invoke: how handlers are called. Async handlers share one event loop per process;
the time limit and a cancel request end them there; sync handlers keep their own
(reused) threads. The pipeline tests run the same code in real workers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tasks import cancellation, invoke, progress
from tasks.cancellation import CancelScope
from tasks.invoke import HandlerTimeout, call_handler


def task(n: int = 0) -> dict[str, Any]:
    return {"id": f"00000000-0000-0000-0000-{n:012d}", "attempt": 1,
            "request_payload": {"prompt": "hi"}}


@pytest.fixture
def fast_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invoke, "ASYNC_GRACE", 0.3)
    monkeypatch.setattr(invoke, "LOOP_PING_TIMEOUT", 0.3)


@pytest.fixture
def scope() -> Iterator[CancelScope]:
    cancel = CancelScope()
    token = cancellation.bind(cancel)
    try:
        yield cancel
    finally:
        cancellation.unbind(token)


def in_threads(n: int, work: Any) -> list[Any]:
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_async_handlers_of_many_threads_share_one_loop_and_run_together() -> None:
    async def handler(t: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.3)
        return {"loop": id(asyncio.get_running_loop()),
                "thread": threading.current_thread().name, "id": t["id"]}

    began = time.monotonic()
    results = in_threads(100, lambda i: call_handler(handler, task(i), 10))
    elapsed = time.monotonic() - began
    assert [r["id"] for r in results] == [task(i)["id"] for i in range(100)]
    assert {r["loop"] for r in results} == {id(invoke.handler_loop())}
    assert {r["thread"] for r in results} == {"handler-loop"}
    assert elapsed < 2.0  # together, not one after another (100 x 0.3 s)


def test_a_client_made_on_the_loop_serves_later_tasks() -> None:
    """What an AsyncOpenAI client needs: objects bound to the loop outlive one task."""
    shared: dict[str, Any] = {}

    async def handler(t: dict[str, Any]) -> dict[str, Any]:
        if "lock" not in shared:
            shared["lock"] = asyncio.Lock()  # bound to the loop on first use
        async with shared["lock"]:
            await asyncio.sleep(0.01)
        return {"ok": True}

    for i in range(3):
        assert call_handler(handler, task(i), 5) == {"ok": True}
    assert in_threads(10, lambda i: call_handler(handler, task(i), 5)) == [{"ok": True}] * 10


def test_the_coroutine_sees_the_callers_context() -> None:
    reported: list[Mapping[str, Any]] = []

    def reporter(response: Mapping[str, Any], force: bool) -> bool:
        reported.append(dict(response))
        return True

    async def handler(t: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        assert progress.report_progress({"answer": t["id"]}) is True
        return {"answer": "done"}

    def run(i: int) -> Any:
        token = progress.bind(reporter)
        try:
            return call_handler(handler, task(i), 5)
        finally:
            progress.unbind(token)

    assert in_threads(5, run) == [{"answer": "done"}] * 5
    assert sorted(r["answer"] for r in reported) == [task(i)["id"] for i in range(5)]
    assert progress.report_progress({"answer": "outside"}) is False  # nothing leaked back


def test_time_limit_cancels_the_coroutine_on_the_loop() -> None:
    events: list[str] = []

    async def handler(t: dict[str, Any]) -> dict[str, Any]:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        return {}

    began = time.monotonic()
    with pytest.raises(HandlerTimeout):
        call_handler(handler, task(), 0.2)
    assert time.monotonic() - began < 1.5
    assert events == ["cancelled"]  # cancelled (and its cleanup ran) before the call returned
    assert not [t for t in asyncio.all_tasks(invoke.handler_loop()) if not t.done()]


def test_a_timeout_error_of_the_handler_itself_is_not_a_time_limit() -> None:
    async def handler(t: dict[str, Any]) -> dict[str, Any]:
        raise TimeoutError("the upstream API timed out")

    with pytest.raises(TimeoutError, match="upstream"):
        call_handler(handler, task(), 5)


def test_a_cancel_request_cancels_the_coroutine(scope: CancelScope) -> None:
    events: list[str] = []

    async def handler(t: dict[str, Any]) -> dict[str, Any]:
        try:
            await asyncio.sleep(30)
        finally:
            events.append("closed")
        return {}

    threading.Timer(0.1, scope.cancel).start()
    began = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        call_handler(handler, task(), 10)
    assert time.monotonic() - began < 2.0
    assert events == ["closed"]


def test_a_cancel_before_the_coroutine_starts_still_cancels_it(scope: CancelScope) -> None:
    started: list[str] = []

    async def handler(t: dict[str, Any]) -> dict[str, Any]:
        started.append("yes")
        await asyncio.sleep(30)
        return {}

    scope.cancel()
    with pytest.raises(asyncio.CancelledError):
        call_handler(handler, task(), 10)


def test_a_handler_that_blocks_the_loop_times_out_and_the_loop_is_replaced(
        fast_grace: None, caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    async def blocking(t: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)  # a blocking call in async code: the app's bug
        return {}

    async def polite(t: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"ok": True}

    before = invoke.handler_loop()
    try:
        began = time.monotonic()
        with pytest.raises(HandlerTimeout):
            call_handler(blocking, task(), 0.2)
        assert time.monotonic() - began < 3.0
        assert "blocked past a task's time limit" in caplog.text
        began = time.monotonic()
        assert call_handler(polite, task(1), 5) == {"ok": True}  # on a new loop, at once
        assert time.monotonic() - began < 1.0
        assert invoke.handler_loop() is not before
    finally:
        release.set()


def test_a_sync_handler_returning_an_awaitable_runs_on_the_loop() -> None:
    async def answer() -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"loop": id(asyncio.get_running_loop())}

    def handler(t: dict[str, Any]) -> Any:
        return answer()

    assert call_handler(handler, task(), 5) == {"loop": id(invoke.handler_loop())}


def test_sync_handlers_reuse_threads_and_an_overrun_is_abandoned() -> None:
    idents: list[int] = []

    def quick(t: dict[str, Any]) -> dict[str, Any]:
        idents.append(threading.get_ident())
        return {"ok": True}

    for i in range(5):
        assert call_handler(quick, task(i), 5) == {"ok": True}
    assert len(set(idents)) == 1
    assert threading.get_ident() not in idents  # not the caller's thread

    finished = threading.Event()

    def slow(t: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.5)
        finished.set()
        return {"late": True}

    with pytest.raises(HandlerTimeout):
        call_handler(slow, task(), 0.1)
    assert not finished.is_set()  # abandoned, still running
    assert call_handler(quick, task(9), 5) == {"ok": True}  # another thread serves meanwhile
    assert finished.wait(5)


def test_sync_handler_errors_and_context_reach_the_caller(scope: CancelScope) -> None:
    def handler(t: dict[str, Any]) -> dict[str, Any]:
        if cancellation.cancelled():
            raise ValueError("saw the cancel")
        return {}

    assert call_handler(handler, task(), 5) == {}
    scope.cancel()
    with pytest.raises(ValueError, match="saw the cancel"):
        call_handler(handler, task(), 5)


def test_a_forked_child_runs_async_handlers_on_a_loop_of_its_own() -> None:
    async def handler(t: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"pid": os.getpid(), "loop": id(asyncio.get_running_loop())}

    parent = call_handler(handler, task(), 5)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            child = call_handler(handler, task(1), 5)
            status = 0 if child["pid"] == os.getpid() else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert call_handler(handler, task(2), 5) == parent  # the parent's loop goes on
