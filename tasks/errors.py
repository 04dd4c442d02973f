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

What the task's owner reads (`error.message`, `response_payload.error`) is
`public_message(exc)`, never the raw text of a library's exception: a network failure
is classified (`provider unreachable`, `provider timed out`), an exception may carry the
message meant for users (`public(exc, message)`; the OpenAI-compatible handler's do), and
every message written to a row goes through `public_text`, which takes out addresses
(URLs, IPs, host:port) and `[Errno n]`. The worker's log keeps the exception's own text.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
import urllib.error
from typing import TypeVar

from bridge.errors import AgentBridgeError

MAX_RETRY_AFTER = 86400.0  # seconds: the longest Retry-After anything here accepts
MAX_ERROR_TEXT = 4096  # bytes of UTF-8: the longest error message written to a row


class RetryableError(AgentBridgeError):
    """A transient failure: retry this task later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = clamp_retry_after(retry_after)


class InvalidPayload(AgentBridgeError, ValueError):
    """The request payload is not what the handler accepts; the message says why."""


class TaskFailed(AgentBridgeError):
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


# --------------------------------------------------------------------------- what users see

PROVIDER_UNREACHABLE = "provider unreachable"
PROVIDER_TIMED_OUT = "provider timed out"

E = TypeVar("E", bound=BaseException)

# Exceptions of HTTP and database libraries a handler may let through, by class name (so
# none of them need be installed): a failure to reach the other end, or a timeout.
_UNREACHABLE_NAMES = frozenset({
    "ConnectionError", "ConnectError", "NetworkError", "TransportError", "ProtocolError",
    "RemoteProtocolError", "ProxyError", "NewConnectionError", "MaxRetryError",
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
    "APIConnectionError"})
_TIMEOUT = re.compile(r"Timeout(Error|Exception)?$|TimedOut$")

# Addresses in free text: URLs, [IPv6]:port, IPv4[:port], host:port; and "[Errno 111] ".
# Each is linear: no pattern can backtrack over its own repetitions.
_ADDRESSES = (
    re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}:,.;!?]", re.I),
    re.compile(r"\[[0-9a-f]*:[0-9a-f:.%]*\](?::\d{1,5})?", re.I),
    re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?(?![\w.])"),
    re.compile(r"(?<![\w.@/-])(?:[a-z0-9-]+\.)*[a-z][a-z0-9-]*:\d{2,5}(?![\w.:])", re.I),
)
_ERRNO = re.compile(r"\[(?:Errno|WinError) -?\d+\]\s*")
ADDRESS = "<address>"


def public(exc: E, message: str) -> E:
    """Give `exc` the message its task's owner sees instead of its own text (which the
    worker's log keeps): `raise public(RetryableError(detail), "search unavailable")`."""
    exc.public_message = message  # type: ignore[attr-defined]
    return exc


def public_message(exc: BaseException) -> str:
    """What the task's owner reads for `exc`: the message given with `public`; a network
    failure classified (PROVIDER_UNREACHABLE, PROVIDER_TIMED_OUT); another OS error by its
    type alone; else the exception's own text, without addresses (`public_text`)."""
    given = getattr(exc, "public_message", None)
    if isinstance(given, str) and given:
        return public_text(given)
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, TimeoutError) or any(_TIMEOUT.search(n) for n in names):
        return PROVIDER_TIMED_OUT
    if (isinstance(exc, ConnectionError | socket.gaierror | socket.herror | ssl.SSLError)
            or (isinstance(exc, urllib.error.URLError)
                and not isinstance(exc, urllib.error.HTTPError))
            or names & _UNREACHABLE_NAMES):
        return PROVIDER_UNREACHABLE
    if isinstance(exc, OSError) and not isinstance(exc, urllib.error.HTTPError):
        return f"internal error ({type(exc).__name__})"
    return public_text(str(exc) or repr(exc))


def public_text(text: str) -> str:
    """`text` fit for a row that its user reads: addresses (URLs, IPs, host:port) become
    <address>, `[Errno n]` goes, and clean_text's limits hold."""
    text = clean_text(text)  # bounded first: the patterns then run on at most 4 KB
    for pattern in _ADDRESSES:
        text = pattern.sub(ADDRESS, text)
    return clean_text(_ERRNO.sub("", text))
