"""Celery workers for agent-bridge: `celery -A tasks worker`.

Handlers raise `RetryableError` for transient trouble (retried with backoff) and
`InvalidPayload` for requests they cannot run; any other exception fails the
task at once. Every exception agent-bridge defines is an `AgentBridgeError`.
`report_progress()` (in async handlers `await report_progress_async()`)
streams partial output to the task's subscribers; once the
task is cancelled it raises `Cancelled`, and `cancelled()` returns True.
`current_agent()` is the agent (AGENTS) whose task the handler runs.
`report_usage()` adds what the run spent (tokens, cost) to its task and tenant, and
`@spends(tokens=..., cost=...)` declares what one run may spend, reserved from the
tenant's budget before it runs (tasks/usage.py).
`ask()` (`await ask_async()`) asks the task's user a question and returns the answer; the
task waits for it without holding a worker (tasks/questions.py).
`rate_limit()` (`async with rate_limit_async()`) waits for room under a provider's
requests and tokens per minute, shared by every worker through Redis, and raises
`RateLimited` (retryable) when the task cannot wait that long (tasks/ratelimit/).
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
from tasks.questions import InvalidQuestion, ask, ask_async
from tasks.ratelimit import RateLimited, rate_limit, rate_limit_async
from tasks.runner import run_agent
from tasks.usage import BudgetExceeded, report_usage, report_usage_async, spends

__all__ = [
    "AgentBridgeError", "BudgetExceeded", "Cancelled", "InvalidPayload", "InvalidQuestion",
    "RateLimited", "RetryableError", "app", "ask", "ask_async", "cancelled", "current_agent",
    "rate_limit", "rate_limit_async",
    "report_progress", "report_progress_async", "report_usage", "report_usage_async",
    "requeue_failed", "run_agent", "spends"]
