"""Celery workers for agent-bridge: `celery -A tasks worker`.

Handlers raise `RetryableError` for transient trouble (retried with backoff) and
`InvalidPayload` for requests they cannot run; any other exception fails the
task at once. `report_progress()` streams partial output into the row.
"""

from __future__ import annotations

from tasks.app import app
from tasks.errors import InvalidPayload, RetryableError
from tasks.operator import requeue_failed
from tasks.progress import report_progress
from tasks.runner import run_agent

__all__ = [
    "InvalidPayload", "RetryableError", "app", "report_progress", "requeue_failed", "run_agent"]
