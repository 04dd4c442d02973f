"""Handlers the benchmarks run in real workers (`AGENT_HANDLER=bench.handlers:<name>`).

When `BENCH_STATE_DIR` is set, every run first appends one line to
`$BENCH_STATE_DIR/runs.log`: `<task id> <time.time()> <pid> <attempt>`. The clock is
the machine's wall clock, the same one the benchmark reads when it inserts a row,
so "insert → handler started" needs no clock translation. The line is written with
one `write(2)` on an O_APPEND descriptor, so lines from many processes and threads
never interleave.

- `noop`: returns at once (after recording, if enabled).
- `sleep_1s`: sleeps one second: an agent waiting on an LLM API.
- `scripted`: sleeps `request_payload.context.sleep` seconds (the chaos run's mixed load).
- `async_sleep_1s`: `sleep_1s` as an `async def` (`await asyncio.sleep(1)`).
- `stream_chunks`: streams a few pieces of an answer, a fixed gap apart (chunk commits).
"""

from __future__ import annotations

import os
import time
from typing import Any

RUNS_FILE = "runs.log"


def record_start(task_id: str, attempt: int | str = 0) -> float:
    """Append `<id> <time> <pid> <attempt>` to the runs file (if enabled); return the time."""
    began = time.time()
    state_dir = os.environ.get("BENCH_STATE_DIR")
    if state_dir:
        line = f"{task_id} {began:.6f} {os.getpid()} {attempt}\n".encode()
        fd = os.open(os.path.join(state_dir, RUNS_FILE),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    return began


def note_time(name: str, task_id: str) -> None:
    """One O_APPEND write of `<id> <time.time()>` to $BENCH_STATE_DIR/<name>."""
    line = f"{task_id} {time.time():.6f}\n".encode()
    fd = os.open(os.path.join(os.environ["BENCH_STATE_DIR"], name),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def noop(task: dict[str, Any]) -> dict[str, Any]:
    record_start(task["id"], task.get("attempt", 0))
    return {"answer": "ok"}


def sleep_1s(task: dict[str, Any]) -> dict[str, Any]:
    record_start(task["id"], task.get("attempt", 0))
    time.sleep(1.0)
    return {"answer": "slept 1s"}


def scripted(task: dict[str, Any]) -> dict[str, Any]:
    record_start(task["id"], task.get("attempt", 0))
    payload = task.get("request_payload") or {}
    context = payload.get("context") or {}
    time.sleep(float(context.get("sleep", 0)))
    return {"answer": "done", "slept": context.get("sleep", 0)}


def read_runs(state_dir: str | os.PathLike[str]) -> list[tuple[str, float, int, int]]:
    """Every recorded run: (task id, start time, pid, attempt), in file order."""
    path = os.path.join(state_dir, RUNS_FILE)
    if not os.path.exists(path):
        return []
    runs: list[tuple[str, float, int, int]] = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 4:
                continue  # a line cut short by a kill -9 mid-write
            try:
                runs.append((parts[0], float(parts[1]), int(parts[2]), int(parts[3])))
            except ValueError:
                continue
    return runs


async def async_sleep_1s(task: dict[str, Any]) -> dict[str, Any]:
    """`sleep_1s` as an async handler: it waits on the worker's shared event loop."""
    import asyncio

    record_start(task["id"], task.get("attempt", 0))
    await asyncio.sleep(1.0)
    return {"answer": "slept 1s"}


def stream_chunks(task: dict[str, Any]) -> dict[str, Any]:
    """Streams `request_payload.context.chunks` pieces (default 5), `gap` seconds apart
    (default 0.3: over AGENT_PROGRESS_INTERVAL's default, so none is throttled away), the
    way the OpenAI handler reports: `{"answer": text so far, "partial": True}`."""
    from tasks import report_progress

    record_start(task["id"], task.get("attempt", 0))
    context = (task.get("request_payload") or {}).get("context") or {}
    chunks, gap = int(context.get("chunks", 5)), float(context.get("gap", 0.3))
    text = ""
    for i in range(chunks):
        if i:
            time.sleep(gap)
        text += f"piece {i} of the answer. "
        report_progress({"answer": text, "partial": True})
    return {"answer": text}
