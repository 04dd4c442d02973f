"""Celery workers for agent-bridge: `celery -A tasks worker`.

Handlers raise `RetryableError` for transient trouble (retried with backoff) and
`InvalidPayload` for requests they cannot run; any other exception fails the
task at once. Every exception agent-bridge defines is an `AgentBridgeError`.
`report_progress()` (in async handlers `await report_progress_async()`)
streams partial output to the task's subscribers; once the
task is cancelled it raises `Cancelled`, and `cancelled()` returns True.
`current_agent()` is the agent (AGENTS) whose task the handler runs.
"""

from __future__ import annotations

from bridge.errors import AgentBridgeError
from tasks.agent import current_agent
from tasks.app import app
from tasks.cancellation import (
    Cancelled,
    cancelled,
    revoke,  # noqa: F401 - registers the Celery revoke hooks
)
from tasks.errors import InvalidPayload, RetryableError
from tasks.operator import requeue_failed
from tasks.progress import report_progress, report_progress_async
from tasks.runner import run_agent

__all__ = [
    "AgentBridgeError", "Cancelled", "InvalidPayload", "RetryableError", "app", "cancelled",
    "current_agent", "report_progress", "report_progress_async", "requeue_failed", "run_agent"]
