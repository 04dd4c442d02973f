"""Cancellation (issue 12): the parts that need no server. The SQL side is
tests/sql/test_cancel.py."""

from __future__ import annotations

import httpx
import pytest

from tests.flower import AUTH

# --------------------------------------------------------------------------- the handler API


def test_handler_api_in_process() -> None:
    """tasks.cancelled() and report_progress() follow the bound scope; an async handler's
    task is cancelled from another thread, with its cleanup run."""
    import asyncio
    import threading

    from tasks import Cancelled, cancelled, report_progress
    from tasks.cancellation import CancelScope, bind, cancels_current_task, unbind

    assert cancelled() is False and report_progress({"answer": "x"}) is False  # no task
    scope = CancelScope()
    token = bind(scope)
    try:
        assert cancelled() is False
        assert scope.cancel() is True and scope.cancel() is False
        assert cancelled() is True
        with pytest.raises(Cancelled):
            report_progress({"answer": "x"})
    finally:
        unbind(token)

    scope, cleaned = CancelScope(), []

    async def handler() -> None:
        with cancels_current_task():
            try:
                await asyncio.sleep(60)
            finally:
                cleaned.append(True)

    token = bind(scope)
    try:
        threading.Timer(0.05, scope.cancel).start()
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(handler())
    finally:
        unbind(token)
    assert cleaned == [True]
























def revoke(api: str, job: str, terminate: bool) -> None:
    response = httpx.post(f"{api}/task/revoke/{job}",
                          params={"terminate": "true"} if terminate else {}, auth=AUTH,
                          timeout=10)
    assert response.status_code == 200, response.text








