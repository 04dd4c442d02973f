"""The integration guide's simulated agent: waits AGENT_SIMULATED_SECONDS, echoes the prompt."""

from __future__ import annotations

import time
from typing import Any

from tasks.app import settings


def process_task(task: dict[str, Any]) -> dict[str, Any]:
    prompt = task["request_payload"]["prompt"]
    time.sleep(settings.agent_simulated_seconds)
    return {
        "answer": f"Agent processed: {prompt}",
        "simulated": True,
        "processed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
