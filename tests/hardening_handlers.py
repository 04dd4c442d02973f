"""Handlers for tests/*/test_hardening.py and the barrier test of tests/acceptance/test_pipeline.py,
scripted by the request's context (each run is recorded like tests.handlers.scripted).

context keys:
- `error`: raise ValueError with a text the database refuses as is: "nul" (a NUL
  character), "surrogate" (a lone surrogate), "long" (100 KB);
- `retry_after`: raise RetryableError(retry_after=<float of it>) on the first run;
- `answer_bytes`: return an answer of that many bytes; `progress_bytes`: first report
  partial output of that many bytes;
- `answer_nul`: return an answer holding a NUL character; `raise`: raise ValueError(it);
- `hang`: sleep that many seconds (past the time limit);
- `barrier`: a directory and `parties`: each run waits there until `parties` runs
  (this one included) have arrived, so all of them run at the same time, or fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tasks import RetryableError, report_progress
from tests.handlers import _record

ODD_TEXT = {
    "nul": "bad \x00 byte",
    "surrogate": "lone \udc80 surrogate",
    "long": "x" * 100_000,
}


def odd(task: dict[str, Any]) -> Any:
    context = task["request_payload"].get("context") or {}
    run = _record(task["id"], f"start attempt={task['attempt']}")
    if "error" in context:
        raise ValueError(ODD_TEXT[context["error"]])
    if "raise" in context:
        raise ValueError(context["raise"])
    if "retry_after" in context and run == 1:
        raise RetryableError("slow down", retry_after=float(context["retry_after"]))
    if "progress_bytes" in context:
        report_progress({"answer": "p" * int(context["progress_bytes"]), "partial": True},
                        force=True)
    if "hang" in context:
        time.sleep(float(context["hang"]))
    if "answer_bytes" in context:
        return {"answer": "a" * int(context["answer_bytes"])}
    if context.get("answer_nul"):
        return {"answer": "nul \x00 inside"}
    if "barrier" in context:
        wait_at_barrier(Path(context["barrier"]), task["id"], int(context["parties"]))
    return {"answer": f"ok: {task['request_payload']['prompt']}", "run": run}


def wait_at_barrier(directory: Path, name: str, parties: int, timeout: float = 120) -> None:
    """Arrive, then wait until `parties` have arrived. Raises if they never do: the
    task then fails, and the test sees that the runs did not overlap."""
    (directory / name).touch()
    deadline = time.monotonic() + timeout
    while sum(1 for _ in directory.iterdir()) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(1 for _ in directory.iterdir())} of {parties} "
                               "runs arrived at the barrier")
        time.sleep(0.05)
