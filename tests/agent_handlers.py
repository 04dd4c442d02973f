"""Handlers of the several-agents tests: each answer says which handler ran it, for which
agent, on which worker (TEST_WORKER in the worker's environment), with which options.

context keys: those of tests.handlers.scripted, plus `wait_for_file` (block until this
file exists: a test holds a worker busy, then lets it go).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.agent import current_agent
from tests.handlers import scripted

Handler = Callable[[dict[str, Any]], Any]


def _tagged(name: str) -> Handler:
    def handler(task: dict[str, Any]) -> Any:
        context = task["request_payload"].get("context") or {}
        if "wait_for_file" in context:
            flag = Path(context["wait_for_file"])
            deadline = time.monotonic() + 120
            while not flag.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        result = scripted(task)
        agent = current_agent()
        if isinstance(result, dict):
            result = {**result, "handler": name, "agent": task["agent"],
                      "worker": os.environ.get("TEST_WORKER", "?"),
                      "options": dict(agent.openai) if agent else None}
        return result

    handler.__name__ = name
    return handler


chat = _tagged("chat")
research = _tagged("research")
