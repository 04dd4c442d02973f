"""The integration guide's simulated agent: waits AGENT_SIMULATED_SECONDS, echoes the prompt."""

from __future__ import annotations

import os
import time
from typing import Any


def process_task(task: dict[str, Any]) -> dict[str, Any]:
    seconds = float(os.environ.get("AGENT_SIMULATED_SECONDS", "3") or 3)
    prompt = task["request_payload"]["prompt"]
    time.sleep(seconds)
    return {
        "answer": f"Agent processed: {prompt}",
        "simulated": True,
        "processed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
