"""The agent the frontend tests run in a real worker: it streams a growing answer.

context keys: `chunks` (partial answers before the final one, default 3), `delay` (seconds
before each chunk, default 0.05), `hold` (a file name in $TEST_STATE_DIR: after the first
chunk, wait until it exists, so a test can act while the task runs), `raise` (fail with
ValueError and this message after streaming).

A prompt that starts with "ask:" asks its user instead (human in the loop): `ask({"text":
"Send the email?", "choices": ["approve", "deny"]})` and answers "You said <answer>";
context `asks` (default 1) asks that many questions in turn, `ask_timeout` (seconds, default
a day) is how long each waits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tasks import ask, report_progress

HOLD_LIMIT = 60.0  # never hold a worker forever if a test dies
QUESTION = {"text": "Send the email?", "choices": ["approve", "deny"]}  # what "ask:" asks


def stream(task: dict[str, Any]) -> dict[str, Any]:
    context = task["request_payload"].get("context") or {}
    if str(task["request_payload"].get("prompt", "")).startswith("ask:"):
        return _ask(context)
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


def _ask(context: dict[str, Any]) -> dict[str, Any]:
    """Ask `asks` questions in turn (the first is QUESTION) and say what the user answered."""
    timeout = float(context.get("ask_timeout", 86400.0))
    answers = [ask(QUESTION if i == 0 else {**QUESTION, "text": f"Question {i + 1}?"},
                   timeout=timeout)
               for i in range(int(context.get("asks", 1)))]
    return {"answer": "You said " + ", ".join(str(a) for a in answers)}


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + HOLD_LIMIT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
