"""What an SDK exception becomes: a RetryableError or a ProviderError, whose text (for the
operator's log) never holds the API key, and whose public message (for the task's owner)
is classified (`tasks.errors.public`)."""

from __future__ import annotations

import re
from typing import Final

import openai

from bridge.errors import AgentBridgeError
from tasks.errors import (
    PROVIDER_TIMED_OUT,
    PROVIDER_UNREACHABLE,
    RetryableError,
    public,
)
from tasks.handlers.openai_chat.settings import Settings
from tasks.ratelimit.headers import parse_retry_after  # re-exported by the package

__all__ = ["PERMANENT_429_CODES", "ProviderError", "content_filtered", "parse_retry_after",
           "scrub", "translate_error"]


class ProviderError(AgentBridgeError):
    """The API refused the request for good (bad key, bad request, content policy, ...)."""

    def __init__(self, message: str, *, status_code: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


_TOKEN_PATTERNS: Final = (
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1***"),
    (re.compile(r"\b(sk-[A-Za-z0-9]{0,2})[A-Za-z0-9_-]{16,}"), r"\1***"),
)


def scrub(text: str, api_key: str | None) -> str:
    """`text` without the API key, bearer tokens or long sk-... keys."""
    # Shorter "keys" are placeholders (Ollama takes any); hiding them would
    # only mangle ordinary words in messages.
    if api_key and len(api_key) >= 8:
        text = text.replace(api_key, "***")
    for pattern, replacement in _TOKEN_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _provider_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return str(body["message"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    return re.sub(r"^Error code: \d+( - )?", "", exc.message) or type(exc).__name__


def _where(base_url: str) -> str:
    """The server's scheme://host:port only (a base URL may carry credentials)."""
    match = re.match(r"^([a-z][a-z0-9+.-]*://)(?:[^@/]*@)?([^/?#]*)", base_url, re.I)
    return f"{match.group(1)}{match.group(2)}" if match else "the configured server"


_POLICY_CODES: Final = frozenset({"content_policy_violation", "content_filter"})
# Refusals whose provider message is about the request the user sent (too long, malformed,
# ...), so the user reads it; the rest (key, model, quota, permissions) are the operator's.
_REQUEST_STATUSES: Final = frozenset({400, 413, 422})
PERMANENT_429_CODES: Final = frozenset({"insufficient_quota", "billing_hard_limit_reached"})


def translate_error(exc: openai.OpenAIError, current: Settings) -> Exception:
    """The RetryableError or ProviderError to raise for an SDK exception: its text for the
    operator's log, its public message (what the task's owner reads) classified."""
    key = current.api_key
    if isinstance(exc, openai.APITimeoutError):
        return public(RetryableError(
            f"OpenAI-compatible API at {_where(current.base_url)} did not answer within "
            f"{current.timeout:g}s (OPENAI_TIMEOUT)"), PROVIDER_TIMED_OUT)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f": {scrub(str(cause), key)}" if cause is not None and str(cause) else ""
        return public(RetryableError(
            f"could not reach the OpenAI-compatible API at {_where(current.base_url)}{detail}"),
            PROVIDER_UNREACHABLE)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = exc.code
        label = f"{status} {code}" if code else str(status)
        message = scrub(_provider_message(exc), key)
        retryable = (status in (408, 409) or status >= 500
                     or (status == 429 and code not in PERMANENT_429_CODES))
        if retryable and code not in _POLICY_CODES:
            retry_after = parse_retry_after(exc.response.headers)
            verb = "rate limited" if status == 429 else "failed"
            return public(RetryableError(
                f"OpenAI-compatible API {verb} the request ({label}): {message}",
                retry_after=retry_after), f"provider {verb} the request ({label})")
        shown = (f": {message}" if status in _REQUEST_STATUSES or code in _POLICY_CODES
                 else "")
        return public(ProviderError(
            f"OpenAI-compatible API refused the request ({label}): {message}",
            status_code=status, code=code), f"provider refused the request ({label}){shown}")
    if isinstance(exc, openai.APIError):
        # An error event inside a stream: a content refusal is final, anything
        # else (overload, server hiccup) is worth another try.
        message = scrub(_provider_message(exc), key)
        if exc.code in _POLICY_CODES:
            return public(ProviderError(
                f"OpenAI-compatible API refused the request ({exc.code}): {message}",
                code=exc.code), f"provider refused the request ({exc.code}): {message}")
        label = f" ({exc.code})" if exc.code else ""
        return public(RetryableError(
            f"OpenAI-compatible API reported an error mid-stream{label}: {message}"),
            f"provider reported an error mid-stream{label}")
    return public(ProviderError(
        f"OpenAI SDK error ({type(exc).__name__}): {scrub(str(exc), key)}"),
        f"provider error ({type(exc).__name__})")


def content_filtered(answer: str) -> ProviderError:
    """The error for an answer the provider's content filter stopped (finish_reason
    `content_filter`), after `answer` (possibly empty) was received."""
    shown = " after a partial answer" if answer else ""
    return ProviderError(
        "OpenAI-compatible API refused the request (content_filter): the provider's content "
        f"filter stopped the response{shown}", code="content_filter")
