"""Provider rate limits shared by every worker process and node, through the workers' Redis.

    with tasks.rate_limit("search-api", rpm=600, tpm=0) as permit:
        response = httpx.get(...)
        permit.observe(response.headers, response.status_code)

`rate_limit(key, rpm=, tpm=, tokens=, tenant=, tenant_rpm=)` waits until the key has room
for one more request (and `tokens` more tokens) in the last minute, charges it, and
yields a `Permit`; `rate_limit_async` is its twin for `async def` handlers. The window is
a true sliding minute (61 s: see store.WINDOW_SECONDS), so no minute ever holds more
than the limits, however many workers share the key; charging is one atomic Redis script
(scripts.py). `tokens` is charged up front (an estimate: prompt and most answer tokens);
`permit.settle(real)` corrects it after the response. `permit.observe(headers, status)`
reads the provider's `Retry-After` / `x-ratelimit-*` and pauses every worker on the key.
With `tenant` and `tenant_rpm`, one tenant gets at most `tenant_rpm` of the key's requests
per minute.

Waiting is bounded by the task's time: by default a handler waits while it would still
keep a quarter of its agent's time limit for the call itself; past that (or past
`max_wait`) it raises `RateLimited`, a `RetryableError` whose `retry_after` is when room
is expected, so the task is retried instead of failed. A request that needs more tokens
than the limit allows raises `RequestTooLarge` at once: it could never be sent.

Limits of 0 are no limit; with every limit 0 nothing touches Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Final

import redis

from bridge.errors import AgentBridgeError
from tasks.cancellation import raise_if_cancelled
from tasks.errors import RetryableError, public
from tasks.ratelimit.headers import pause_seconds
from tasks.ratelimit.store import WINDOW_SECONDS, Attempt, Limiter, Window, scope_part, use_redis

__all__ = ["WINDOW_SECONDS", "Permit", "RateLimited", "RequestTooLarge", "Window", "acquire",
           "acquire_async", "bind_deadline", "estimate_tokens", "rate_limit",
           "rate_limit_async", "tenant_of", "time_left", "unbind_deadline", "use_redis",
           "windows_for"]

log = logging.getLogger(__name__)

# A waiting handler asks Redis again at least this often while tokens hold it (a settle
# elsewhere may free room early); a pause or a requests limit is waited out in one sleep.
POLL_SECONDS: Final = 1.0
# Share of the agent's time limit a waiting handler keeps for the call itself.
RESERVE: Final = 0.25
# A sync handler's wait looks for a cancel of its task this often.
CANCEL_CHECK: Final = 0.5


class RateLimited(RetryableError):
    """No room within the time the task may wait: retry later (`retry_after`: when room is
    expected)."""


class RequestTooLarge(AgentBridgeError):
    """The request needs more tokens than the limit allows in a minute: it can never be sent."""


# --------------------------------------------------------------------------- the task's time

_deadline: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "agent_bridge_deadline", default=None)


def bind_deadline(time_limit: float) -> contextvars.Token[tuple[float, float] | None]:
    """The running task must end within `time_limit` seconds from now (the runner binds it
    as the handler starts; a handler may bind it itself when nothing has)."""
    return _deadline.set((time.monotonic() + time_limit, time_limit))


def unbind_deadline(token: contextvars.Token[tuple[float, float] | None]) -> None:
    _deadline.reset(token)


def time_left() -> float | None:
    """Seconds until the running task's time limit (None: no deadline bound)."""
    bound = _deadline.get()
    return None if bound is None else bound[0] - time.monotonic()


def _wait_budget(max_wait: float | None) -> float:
    """The longest this acquire may wait: `max_wait` within the task's time, or by
    default its time left less RESERVE of its time limit."""
    bound = _deadline.get()
    if bound is not None:
        deadline, limit = bound
        left = deadline - time.monotonic()
        budget = left - RESERVE * limit if max_wait is None else min(max_wait, left)
        return max(0.0, budget)
    if max_wait is not None:
        return max(0.0, max_wait)
    from tasks.agent import current_agent

    agent = current_agent()
    return (1 - RESERVE) * agent.time_limit if agent is not None else WINDOW_SECONDS


# --------------------------------------------------------------------------- helpers


def tenant_of(task: Mapping[str, Any]) -> str:
    """The task's tenant, as the database names it: its enterprise_id, else its user_id,
    else "shared" (rows inserted by a service)."""
    enterprise = task.get("enterprise_id")
    if enterprise:
        return str(enterprise)
    user = task.get("user_id")
    return str(user) if user else "shared"


def estimate_tokens(text: str) -> int:
    """A cautious token count for `text` without a tokenizer: a token per four ASCII
    characters (English averages a little more) and one per other character (CJK text
    is about one a character)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


def windows_for(*, rpm: int = 0, tpm: int = 0, tenant: str | None = None,
                tenant_rpm: int = 0) -> list[Window]:
    """The windows of the usual shape: the key's own (rpm, tpm) and its tenant's (tenant_rpm)."""
    windows = [Window("", rpm, tpm)] if rpm or tpm else []
    if tenant is not None and tenant_rpm:
        windows.append(Window(f"tenant:{scope_part(tenant)}", tenant_rpm))
    return windows


# --------------------------------------------------------------------------- permits


class Permit:
    """One request charged to a key's windows. `settle` and `observe` never raise: the
    answer is already there, and a limiter hiccup must not lose it."""

    def __init__(self, limiter: Limiter | None, windows: Sequence[Window], tokens: int) -> None:
        self.id = uuid.uuid4().hex
        self.key = limiter.key if limiter is not None else ""
        self.tokens = tokens  # charged so far
        self._limiter = limiter
        self._windows = tuple(windows)

    @property
    def active(self) -> bool:
        """False for the permit of a limit of 0 (nothing was charged, nothing is kept)."""
        return self._limiter is not None

    def settle(self, tokens: int | None) -> None:
        """The tokens the request really used (None: unknown, the estimate stays)."""
        if self._limiter is None or tokens is None or tokens == self.tokens:
            return
        try:
            self._limiter.settle(self._windows, self.id, max(0, int(tokens)))
            self.tokens = max(0, int(tokens))
        except redis.RedisError as exc:
            log.warning("Rate limiter: could not settle %s's tokens (%s)", self.key, exc)

    def pause(self, seconds: float, why: str = "provider") -> None:
        """Pause every worker on the key for `seconds` (a longer pause already there stays)."""
        if self._limiter is None or seconds <= 0:
            return
        try:
            paused = self._limiter.pause(seconds, why)
        except redis.RedisError as exc:
            log.warning("Rate limiter: could not pause %s (%s)", self.key, exc)
            return
        log.info("⏸️  Rate limit %s paused for %.1fs for every worker (%s)", self.key, paused,
                 why, extra={"action": "rate_limit_pause", "rate_limit_key": self.key})

    def observe(self, headers: Mapping[str, str] | None, status: int | None = None) -> float | None:
        """Read a provider response's rate-limit headers (`Retry-After`, `retry-after-ms`,
        `x-ratelimit-remaining-*` / `-reset-*`) and pause the key as they say; returns the
        pause in seconds, or None."""
        seconds = pause_seconds(status, headers)
        if seconds is not None:
            self.pause(seconds, f"HTTP {status}" if status else "provider headers")
        return seconds


# --------------------------------------------------------------------------- waiting


class _Waiter:
    """The decisions of one acquire, shared by the sync and async loops: whether it may
    be sent at all, how long to sleep after each refusal, when to give up."""

    def __init__(self, limiter: Limiter, windows: Sequence[Window], tokens: int,
                 max_wait: float | None, fields: Mapping[str, Any] | None = None) -> None:
        for window in windows:
            if window.tpm and tokens > window.tpm:
                scope = f" ({window.scope})" if window.scope else ""
                raise public(RequestTooLarge(
                    f"the request needs about {tokens} tokens, more than the {window.tpm} "
                    f"tokens per minute rate limit {limiter.key}{scope} allows: it can never "
                    f"be sent"), f"the request is too large for the rate limit ({tokens} "
                    f"tokens, {window.tpm} per minute)")
        self.limiter = limiter
        self.windows = windows
        self.permit = Permit(limiter, windows, tokens)
        self.until = time.monotonic() + _wait_budget(max_wait)
        self.began = time.monotonic()
        self.logged = False
        self.fields = {**(fields or {}), "rate_limit_key": limiter.key}

    def attempt(self) -> Attempt:
        raise_if_cancelled()
        try:
            return self.limiter.acquire(self.windows, self.permit.id, self.permit.tokens)
        except redis.RedisError as exc:
            raise public(RetryableError(f"the rate limiter's Redis failed: {exc}"),
                         "rate limiter unavailable") from None

    def sleep_for(self, attempt: Attempt) -> float:
        """Seconds to sleep before asking again, or RateLimited when out of time."""
        left = self.until - time.monotonic()
        if attempt.exact_wait > left or left <= 0:
            raise public(RateLimited(
                f"rate limit {self.limiter.key}: no room within the {self.until - self.began:.0f}s "
                f"the task may wait ({attempt.why}; room expected in {attempt.wait:.1f}s)",
                retry_after=attempt.wait), "rate limited: waiting for room on the provider key")
        if not self.logged:
            self.logged = True
            log.info("⏳ Rate limit %s: waiting for room (%s; about %.1fs)", self.limiter.key,
                     attempt.why, attempt.wait, extra={"action": "rate_limit_wait", **self.fields})
        if attempt.tokens_wait > attempt.exact_wait:
            pause = max(attempt.exact_wait, min(attempt.tokens_wait, POLL_SECONDS))
        else:
            pause = attempt.exact_wait
        # A little spread, so the workers a pause held do not all ask at the same moment.
        return min(pause + random.uniform(0, 0.05), max(left, 0.0))

    def charged(self) -> Permit:
        waited = time.monotonic() - self.began
        if self.logged:
            log.info("Rate limit %s: room after %.1fs", self.limiter.key, waited,
                     extra={"action": "rate_limit_room", **self.fields})
        return self.permit


def acquire(key: str, windows: Sequence[Window], *, tokens: int = 0,
            max_wait: float | None = None, fields: Mapping[str, Any] | None = None) -> Permit:
    """Wait for room in every window of `key` and charge one request and `tokens` to all of
    them at once; returns the Permit. No windows: a Permit that charges nothing. `fields`:
    log fields of the wait's lines (the task's id)."""
    if not windows:
        return Permit(None, (), tokens)
    waiter = _Waiter(Limiter(key), windows, max(0, int(tokens)), max_wait, fields)
    while True:
        attempt = waiter.attempt()
        if attempt.charged:
            return waiter.charged()
        _sleep(waiter.sleep_for(attempt))


def _sleep(seconds: float) -> None:
    """Sleep, noticing a cancel of the task within CANCEL_CHECK seconds (tasks.Cancelled)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        raise_if_cancelled()
        time.sleep(min(left, CANCEL_CHECK))


async def acquire_async(key: str, windows: Sequence[Window], *, tokens: int = 0,
                        max_wait: float | None = None,
                        fields: Mapping[str, Any] | None = None) -> Permit:
    """`acquire` for a coroutine: Redis is called on a thread, the waits are asyncio sleeps."""
    if not windows:
        return Permit(None, (), tokens)
    waiter = _Waiter(Limiter(key), windows, max(0, int(tokens)), max_wait, fields)
    while True:
        attempt = await asyncio.to_thread(waiter.attempt)
        if attempt.charged:
            return waiter.charged()
        await asyncio.sleep(waiter.sleep_for(attempt))


@contextlib.contextmanager
def rate_limit(key: str, *, rpm: int = 0, tpm: int = 0, tokens: int = 0,
               tenant: str | None = None, tenant_rpm: int = 0,
               max_wait: float | None = None) -> Iterator[Permit]:
    """Wait for room for one request (and `tokens`) on `key`, shared by every worker, then
    run the block. `rpm`, `tpm`: the key's requests and tokens per minute; `tenant`,
    `tenant_rpm`: at most that many of them per minute for this tenant (`tenant_of(task)`);
    0 is no limit. `max_wait`: the longest to wait (default: while a quarter of the task's
    time limit is left for the call). Raises RateLimited (retryable) when that runs out,
    RequestTooLarge when `tokens` can never fit."""
    yield acquire(key, windows_for(rpm=rpm, tpm=tpm, tenant=tenant, tenant_rpm=tenant_rpm),
                  tokens=tokens, max_wait=max_wait)


@contextlib.asynccontextmanager
async def rate_limit_async(key: str, *, rpm: int = 0, tpm: int = 0, tokens: int = 0,
                           tenant: str | None = None, tenant_rpm: int = 0,
                           max_wait: float | None = None) -> AsyncIterator[Permit]:
    """`rate_limit` for `async def` handlers: `async with tasks.rate_limit_async(...)`."""
    yield await acquire_async(
        key, windows_for(rpm=rpm, tpm=tpm, tenant=tenant, tenant_rpm=tenant_rpm),
        tokens=tokens, max_wait=max_wait)
