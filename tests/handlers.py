"""Handlers the pipeline tests run in real workers, scripted by the request's context.

context keys: `sleep` (seconds), `retryable_failures` (raise RetryableError on the
first N runs), `raise` (raise ValueError with this message), `fail_unless_file` (raise
ValueError while this file does not exist: a condition a test can remove), `return_list`.
`cancellable` / `cancellable_async` stream partial answers until cancelled.
Every run appends a line to $TEST_STATE_DIR/<task id>.runs, so a test can count
how often the agent code ran, across processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tasks import RetryableError


def _record(task_id: str, line: str) -> int:
    path = Path(os.environ["TEST_STATE_DIR"]) / f"{task_id}.runs"
    with path.open("a") as f:
        f.write(line + "\n")
    return len(path.read_text().splitlines())


def scripted(task: dict[str, Any]) -> Any:
    context = task["request_payload"].get("context") or {}
    began = time.time()
    run = _record(task["id"], f"start {os.getpid()} {began:.3f} attempt={task['attempt']}")
    time.sleep(float(context.get("sleep", 0)))
    if run <= int(context.get("retryable_failures", 0)):
        raise RetryableError(f"simulated rate limit on run {run}")
    if "raise" in context:
        raise ValueError(context["raise"])
    if "fail_unless_file" in context and not Path(context["fail_unless_file"]).exists():
        raise ValueError(f"{context['fail_unless_file']} does not exist")
    if context.get("return_list"):
        return ["not", "an", "object"]
    _record(task["id"] + ".spans", f"{began:.3f} {time.time():.3f}")
    return {"answer": f"Agent processed: {task['request_payload']['prompt']}", "run": run}


async def scripted_async(task: dict[str, Any]) -> Any:
    import asyncio

    context = task["request_payload"].get("context") or {}
    await asyncio.sleep(float(context.get("sleep", 0)))
    return {"answer": f"async: {task['request_payload']['prompt']}"}


def cancellable(task: dict[str, Any]) -> Any:
    """Streams context `chunks` pieces (default 200), one each `every` seconds (0.05).
    context `mode` says how it notices a cancel: `progress` (report_progress raises
    tasks.Cancelled), `poll` (checks tasks.cancelled() and returns early), `ignore`
    (neither: runs to its end). Records `start`, then `cancelled`, `noticed` or `finished`."""
    from tasks import Cancelled, cancelled, report_progress

    context = task["request_payload"].get("context") or {}
    mode = context.get("mode", "progress")
    chunks, every = int(context.get("chunks", 200)), float(context.get("every", 0.05))
    _record(task["id"], f"start {os.getpid()} attempt={task['attempt']}")
    text = ""
    try:
        for i in range(chunks):
            if mode == "poll" and cancelled():
                _record(task["id"], f"noticed at chunk {i}")
                return {"answer": text + " [stopped]"}
            text += f"w{i} "
            if mode != "ignore" or i == 0:  # (ignore: one write, so a test sees it run)
                report_progress({"answer": text, "partial": True}, force=True)
            time.sleep(every)
    except Cancelled:
        _record(task["id"], f"cancelled at chunk {i}")
        raise
    _record(task["id"], "finished")
    return {"answer": text}


async def cancellable_async(task: dict[str, Any]) -> Any:
    """The async twin of `cancellable` (progress mode): a cancel arrives as
    asyncio.CancelledError at an await, and the `finally` of its context manager runs."""
    import asyncio
    import contextlib

    from tasks import report_progress

    context = task["request_payload"].get("context") or {}
    chunks, every = int(context.get("chunks", 200)), float(context.get("every", 0.05))
    _record(task["id"], f"start {os.getpid()} attempt={task['attempt']}")

    @contextlib.asynccontextmanager
    async def stream() -> Any:
        try:
            yield
        finally:
            _record(task["id"], "stream closed")

    text = ""
    try:
        async with stream():
            for i in range(chunks):
                text += f"w{i} "
                report_progress({"answer": text, "partial": True}, force=True)
                await asyncio.sleep(every)
    except asyncio.CancelledError:
        _record(task["id"], "cancelled")
        raise
    _record(task["id"], "finished")
    return {"answer": text}


def echo_input(task: dict[str, Any]) -> Any:
    """Answers with the input it received (the row as the worker handed it over)."""
    return {"answer": "echo", "input": task}
