"""A handler that streams tokens the way a chat model does, for tests/*/test_stream.py.

context keys: `tokens` (how many, default 20), `delay` (seconds before each, default 0.01),
`settle` (seconds to wait after the last token before reporting it once more, so the
throttle lets the last tokens through), `shape` (`stream`: `{"answer", "partial": True}`,
written as appended chunks; `full`: an extra key, so each write rewrites the row),
`hold` (a file name in $TEST_STATE_DIR: once every token is reported, wait until it
exists before returning, so a test can look at the chunks of a running task), `raise`
(fail with ValueError after streaming).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from tasks import report_progress, report_progress_async

HOLD_LIMIT = 60.0


def tokens(task: dict[str, Any]) -> dict[str, Any]:
    context = task["request_payload"].get("context") or {}
    count = int(context.get("tokens", 20))
    delay = float(context.get("delay", 0.01))
    full = context.get("shape") == "full"
    text = ""
    for i in range(count):
        time.sleep(delay)
        text += f"t{i} "
        if full:
            report_progress({"answer": text, "partial": True, "tokens": i + 1})
        else:
            report_progress({"answer": text, "partial": True})
    if "settle" in context:
        time.sleep(float(context["settle"]))
        report_progress({"answer": text, "partial": True})
    hold = context.get("hold")
    if hold:
        path = Path(os.environ.get("TEST_STATE_DIR", ".")) / str(hold)
        deadline = time.monotonic() + HOLD_LIMIT
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    if "raise" in context:
        raise ValueError(str(context["raise"]))
    return {"answer": text}


async def tokens_async(task: dict[str, Any]) -> dict[str, Any]:
    """`tokens` as an async handler on the worker's shared loop (context: tokens, delay)."""
    context = task["request_payload"].get("context") or {}
    text = ""
    for i in range(int(context.get("tokens", 20))):
        await asyncio.sleep(float(context.get("delay", 0.01)))
        text += f"t{i} "
        await report_progress_async({"answer": text, "partial": True})
    return {"answer": text}
