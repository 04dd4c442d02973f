"""The agent the frontend tests run in a real worker: it streams a growing answer.

context keys: `chunks` (partial answers before the final one, default 3), `delay` (seconds
before each chunk, default 0.05), `hold` (a file name in $TEST_STATE_DIR: after the first
chunk, wait until it exists, so a test can act while the task runs), `raise` (fail with
ValueError and this message after streaming).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tasks import report_progress

HOLD_LIMIT = 60.0  # never hold a worker forever if a test dies


def stream(task: dict[str, Any]) -> dict[str, Any]:
    context = task["request_payload"].get("context") or {}
    words = str(task["request_payload"].get("prompt", "")).split() or ["…"]
    chunks = int(context.get("chunks", 3))
    delay = float(context.get("delay", 0.05))
    hold = context.get("hold")
    text = ""
    for i in range(chunks):
        if hold and i == 1:
            _wait_for(Path(os.environ.get("TEST_STATE_DIR", ".")) / str(hold))
        time.sleep(delay)
        text += ("" if i == 0 else " ") + words[i % len(words)]
        report_progress({"answer": text, "partial": True}, force=True)
    if "raise" in context:
        raise ValueError(str(context["raise"]))
    return {"answer": f"{text} (done)", "chunks": chunks}


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + HOLD_LIMIT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
