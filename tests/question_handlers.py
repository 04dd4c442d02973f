"""Handlers that ask their user (tasks.ask), for tests/acceptance/test_questions.py.

context keys: `questions` (how many to ask, default 1; 0 asks nothing), `timeout` (each
question's, seconds), `sleep_after` (seconds to sleep once every answer is in; with
`sleep_on_attempt`, on that attempt only: a window to kill the worker in). Every run
appends `start attempt=N` to $TEST_STATE_DIR/<id>.runs, and `answered <answers>` once it
has every answer.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tasks import ask, ask_async
from tests.handlers import _record


def _plan(task: dict[str, Any]) -> tuple[int, float, float]:
    context = task["request_payload"].get("context") or {}
    sleeps = context.get("sleep_on_attempt") in (None, task["attempt"])
    return (int(context.get("questions", 1)), float(context.get("timeout", 3600)),
            float(context.get("sleep_after", 0)) if sleeps else 0.0)


def approval(task: dict[str, Any]) -> Any:
    count, timeout, sleep_after = _plan(task)
    _record(task["id"], f"start attempt={task['attempt']}")
    answers = [ask({"text": f"Question {n + 1}: go on?", "choices": ["approve", "deny"]},
                   timeout=timeout) for n in range(count)]
    _record(task["id"], f"answered {json.dumps(answers)}")
    time.sleep(sleep_after)
    return {"answer": f"You said {', '.join(map(str, answers)) or 'nothing'}",
            "answers": answers}


async def approval_async(task: dict[str, Any]) -> Any:
    import asyncio

    count, timeout, sleep_after = _plan(task)
    _record(task["id"], f"start attempt={task['attempt']}")
    answers = [await ask_async(f"Question {n + 1}?", timeout=timeout) for n in range(count)]
    _record(task["id"], f"answered {json.dumps(answers)}")
    await asyncio.sleep(sleep_after)
    return {"answer": f"You said {', '.join(map(str, answers))}", "answers": answers}
