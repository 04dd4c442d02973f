"""The errors a handler raises to say how its task should end.

- `RetryableError`: transient trouble (rate limit, timeout, 5xx). The task is
  retried through Celery with exponential backoff and jitter, up to
  AGENT_MAX_RETRIES; `retry_after` (seconds, e.g. from a Retry-After header)
  sets the least delay.
- `InvalidPayload`: the request cannot be run as given; the task fails at once.
- Any other exception: a bug or a permanent refusal; the task fails at once with
  the exception's type and message.
"""

from __future__ import annotations


class RetryableError(Exception):
    """A transient failure: retry this task later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidPayload(ValueError):
    """The request payload is not what the handler accepts; the message says why."""
