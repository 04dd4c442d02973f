"""The limiter's scripts on a real Redis, in this process: many threads charging one key at
once never get past its limits, settles free tokens, a pause holds everyone and only ever
grows, a tenant gets its share, a charge leaves the window when it ages out, a cancel ends
a wait, and the OpenAI handler settles real usage and heeds the provider's headers. (The
limits across real worker processes: test_ratelimit.py. These need Redis, not processes:
they would sit in tests/sql by the layers' rules.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tasks import cancellation
from tasks.cancellation import Cancelled, CancelScope
from tasks.ratelimit import (
    RateLimited,
    Window,
    acquire,
    rate_limit,
    rate_limit_async,
    use_redis,
)
from tasks.ratelimit.store import Limiter
from tests.fakes.openai_server import FakeOpenAI


@pytest.fixture(autouse=True)
def limiter_redis(clean_redis: str) -> Iterator[redis.Redis[bytes]]:
    use_redis(clean_redis)
    try:
        yield redis.Redis.from_url(clean_redis)
    finally:
        use_redis(None)


def charge_from_threads(n: int, *, rpm: int = 0, tpm: int = 0, tokens: int = 0
                        ) -> tuple[int, list[RateLimited]]:
    """`n` threads released at once, each trying one request (no waiting)."""
    start = threading.Barrier(n)
    charged: list[int] = []
    refused: list[RateLimited] = []

    def one() -> None:
        start.wait()
        try:
            with rate_limit("shared", rpm=rpm, tpm=tpm, tokens=tokens, max_wait=0):
                charged.append(1)
        except RateLimited as exc:
            refused.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(charged), refused


def test_threads_racing_for_one_key_never_pass_its_requests_limit() -> None:
    charged, refused = charge_from_threads(40, rpm=10)
    assert charged == 10 and len(refused) == 30
    assert all(r.retry_after is not None and 55 < r.retry_after <= 61 for r in refused)


def test_threads_racing_for_tokens_never_pass_the_tokens_limit() -> None:
    charged, _ = charge_from_threads(30, tpm=1000, tokens=120)
    assert charged == 8  # 8 × 120 = 960 ≤ 1000 < 9 × 120


def test_a_settle_frees_the_tokens_an_estimate_held() -> None:
    first = acquire("k", [Window("", 0, 100)], tokens=60, max_wait=0)
    with pytest.raises(RateLimited):
        acquire("k", [Window("", 0, 100)], tokens=60, max_wait=0)
    first.settle(10)  # the real usage was lower than the estimate
    acquire("k", [Window("", 0, 100)], tokens=60, max_wait=0)


def test_a_waiting_request_gets_the_room_a_settle_frees(limiter_redis: redis.Redis[bytes]
                                                        ) -> None:
    first = acquire("k", [Window("", 0, 100)], tokens=90, max_wait=0)
    threading.Timer(0.3, first.settle, args=(5,)).start()
    begun = time.monotonic()
    acquire("k", [Window("", 0, 100)], tokens=90, max_wait=10)  # polls, finds room
    assert time.monotonic() - begun < 10


def test_a_pause_holds_every_request_on_the_key_and_only_grows() -> None:
    permit = acquire("k", [Window("", 100, 0)])
    paused = time.monotonic()
    assert permit.observe({"retry-after": "1"}, 429) == 1.0
    permit.pause(0.2)  # shorter: the longer pause stays
    with pytest.raises(RateLimited, match="paused"):
        acquire("k", [Window("", 100, 0)], max_wait=0.5)
    acquire("k", [Window("", 100, 0)], max_wait=5)
    assert time.monotonic() - paused >= 0.95  # not before the pause ended
    acquire("other", [Window("", 100, 0)], max_wait=0)  # another key is not paused


def test_a_cancelled_task_stops_waiting() -> None:
    acquire("k", [Window("", 100, 0)]).pause(30)
    scope = CancelScope()
    ended: list[BaseException] = []

    def wait() -> None:
        token = cancellation.bind(scope)
        try:
            acquire("k", [Window("", 100, 0)], max_wait=60)
        except BaseException as exc:
            ended.append(exc)
        finally:
            cancellation.unbind(token)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    scope.cancel()
    waiter.join(10)  # not the 30 s pause
    assert not waiter.is_alive() and isinstance(ended[0], Cancelled)


def test_one_tenant_gets_its_share_and_no_more() -> None:
    for _ in range(2):
        acquire("k", [Window("", 100, 0), Window("tenant:a", 2, 0)], max_wait=0)
    with pytest.raises(RateLimited, match="tenant:a requests"):
        acquire("k", [Window("", 100, 0), Window("tenant:a", 2, 0)], max_wait=0)
    acquire("k", [Window("", 100, 0), Window("tenant:b", 2, 0)], max_wait=0)


def test_a_refused_request_charges_no_window() -> None:
    """All windows or none: a tenant refused does not use up the key's requests."""
    key = [Window("", 3, 0)]
    acquire("k", [*key, Window("tenant:a", 1, 0)], max_wait=0)
    for _ in range(5):
        with pytest.raises(RateLimited):
            acquire("k", [*key, Window("tenant:a", 1, 0)], max_wait=0)
    acquire("k", key, max_wait=0)
    acquire("k", key, max_wait=0)


def test_charges_leave_the_window_as_they_age(limiter_redis: redis.Redis[bytes]) -> None:
    limiter = Limiter("short", window=0.5)
    windows = [Window("", 2, 100)]
    assert limiter.acquire(windows, "p1", 50).charged
    assert limiter.acquire(windows, "p2", 50).charged
    held = limiter.acquire(windows, "p3", 50)
    assert not held.charged and 0 < held.exact_wait <= 0.5
    time.sleep(0.6)
    assert limiter.acquire(windows, "p3", 50).charged
    total = limiter_redis.hget(f"{limiter.base}:tokens", "=total")
    assert total == b"50"  # the aged-out charges' tokens were taken off
    limiter.settle(windows, "p1", 7)  # p1 has left the window: nothing changes
    assert limiter_redis.hget(f"{limiter.base}:tokens", "=total") == b"50"


def test_the_async_twin_waits_without_blocking_the_event_loop() -> None:
    async def main() -> list[str]:
        order: list[str] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                order.append("tick")
                await asyncio.sleep(0.05)

        async def limited() -> None:
            async with rate_limit_async("k", rpm=100, max_wait=5) as permit:
                permit.pause(0.5)
            order.append("waiting")
            async with rate_limit_async("k", rpm=100, max_wait=5):
                order.append("charged")
            done.set()

        await asyncio.gather(ticker(), limited())
        return order

    order = asyncio.run(main())
    assert "tick" in order[order.index("waiting"):order.index("charged")]


def test_the_openai_handler_settles_the_real_usage_and_heeds_the_headers(
        monkeypatch: pytest.MonkeyPatch, limiter_redis: redis.Redis[bytes]) -> None:
    """Charged its estimate, settled to the usage the answer reports; an answer saying the
    provider's requests are used up (x-ratelimit-remaining-requests: 0) pauses the key."""
    from tasks.handlers import openai_chat
    from tasks.handlers.openai_chat import limits

    with FakeOpenAI() as fake:
        fake.limit(rpm=2)
        for name, _, _ in openai_chat.variables():
            monkeypatch.delenv(name, raising=False)
        for name, value in {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "sk-test-0123456789",
                            "OPENAI_RPM": "100", "OPENAI_TPM": "10000",
                            "OPENAI_MAX_TOKENS": "50"}.items():
            monkeypatch.setenv(name, value)
        openai_chat.reset_settings()
        try:
            fake.respond("one two three")
            fake.respond("four five")
            task = {"id": "t", "attempt": 1, "request_payload": {"prompt": "count for me"}}
            first = openai_chat.handler(task)
            limiter = Limiter(limits.provider_key(openai_chat.settings()))
            total = limiter_redis.hget(f"{limiter.base}:tokens", "=total")
            assert int(total or 0) == first["usage"]["total_tokens"] < 50
            assert limiter_redis.pttl(limiter.pause_key) < 0  # one request left: no pause
            openai_chat.handler(task)
            assert limiter_redis.pttl(limiter.pause_key) > 50_000  # until the reset (~60 s)
        finally:
            openai_chat.reset_settings()
