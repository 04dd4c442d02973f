"""The errors a handler raises to say how its task should end.

- `RetryableError`: transient trouble (rate limit, timeout, 5xx). The task is
  retried through Celery with exponential backoff and jitter, up to
  AGENT_MAX_RETRIES; `retry_after` (seconds, e.g. from a Retry-After header)
  sets the least delay. A `retry_after` that is not a number of seconds from 0
  to MAX_RETRY_AFTER (a day) is cut to that range (NaN or negative: ignored); the
  runner then waits at most 1.5 x AGENT_RETRY_BACKOFF_MAX.
- `InvalidPayload`: the request cannot be run as given; the task fails at once.
- Any other exception: a bug or a permanent refusal; the task fails at once with
  the exception's type and message.

`TaskFailed` is the runner's, not a handler's: raised after the row was failed, so
Celery and Flower show the job as failed with the row's error.
"""

from __future__ import annotations

import math

MAX_RETRY_AFTER = 86400.0  # seconds: the longest Retry-After anything here accepts
MAX_ERROR_TEXT = 4096  # bytes of UTF-8: the longest error message written to a row


class RetryableError(Exception):
    """A transient failure: retry this task later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = clamp_retry_after(retry_after)


class InvalidPayload(ValueError):
    """The request payload is not what the handler accepts; the message says why."""


class TaskFailed(Exception):
    """The task's row was failed; the message is its `error.type: error.message`."""


def clamp_retry_after(seconds: object) -> float | None:
    """`seconds` as a delay from 0 to MAX_RETRY_AFTER; None when it is no delay at all."""
    if seconds is None or isinstance(seconds, bool):
        return None
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if math.isnan(value) or value < 0:
        return None
    return min(value, MAX_RETRY_AFTER)


def clean_text(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """Text the database accepts in a jsonb string: no NUL, no lone surrogates (each
    becomes U+FFFD), at most `limit` bytes of UTF-8 (cut text ends in "… (cut)")."""
    text = text.replace("\x00", "")
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        # A surrogate pair becomes its character; a lone surrogate U+FFFD.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    marker = "… (cut)"
    return data[:limit - len(marker.encode())].decode("utf-8", "ignore") + marker
