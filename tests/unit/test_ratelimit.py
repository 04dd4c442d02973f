"""The rate limiter's pure parts: provider headers, token estimates, windows, the wait
decisions, the OpenAI handler's limits and settings, and the fake server's accounting and
OpenAI-like 429s. Nothing here reaches Redis (tests/acceptance/test_ratelimit*.py do)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from bridge.agents import Agent
from tasks import agent as agent_context
from tasks.handlers import openai_chat
from tasks.handlers.openai_chat import Settings, SettingsError, limits
from tasks.handlers.openai_chat.settings import for_agent
from tasks.ratelimit import (
    Permit,
    RateLimited,
    RequestTooLarge,
    Window,
    _Waiter,
    acquire,
    bind_deadline,
    estimate_tokens,
    rate_limit,
    tenant_of,
    unbind_deadline,
    windows_for,
)
from tasks.ratelimit.headers import (
    DEFAULT_429_PAUSE,
    MAX_PAUSE,
    parse_duration,
    pause_seconds,
)
from tasks.ratelimit.store import Attempt, Limiter, scope_part
from tests.fakes.openai_server import FakeOpenAI, go_duration

NOW = datetime(2020, 1, 1, tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(("raw", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("1.5s", 1.5), ("1h2m3s", 3723.0),
    ("250us", 0.00025), ("0s", 0.0), ("20", 20.0), ("0.5", 0.5), (" 2s ", 2.0),
    ("", None), ("soon", None), ("1s junk", None), ("-3", None), ("inf", None), (None, None),
])
def test_reset_values_are_read_as_go_durations_or_seconds(raw: str | None,
                                                          seconds: float | None) -> None:
    found = parse_duration(raw)
    assert found is None if seconds is None else found == pytest.approx(seconds)


@pytest.mark.parametrize(("status", "headers", "pause"), [
    (429, {"retry-after": "7"}, 7.0),
    (429, {"Retry-After": "7"}, 7.0),  # any case
    (429, {"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
    (429, {"retry-after": "Wed, 01 Jan 2020 00:00:30 GMT"}, 30.0),
    (429, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
           "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    (429, {"x-ratelimit-remaining-tokens": "63", "x-ratelimit-reset-tokens": "40s"},
     DEFAULT_429_PAUSE),
    (429, {}, DEFAULT_429_PAUSE),
    (429, {"retry-after": "86400"}, MAX_PAUSE),
    (429, {"retry-after": "0"}, None),
    (200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "850ms"}, 0.85),
    (200, {"x-ratelimit-remaining-requests": "4", "x-ratelimit-reset-requests": "850ms"}, None),
    (200, {"retry-after": "5"}, None),  # Retry-After means something on 429 and 503 only
    (503, {"retry-after": "5"}, 5.0),
    (500, {}, None),
    (200, {}, None),
    (None, None, None),
])
def test_pause_from_provider_headers(status: int | None, headers: dict[str, str] | None,
                                     pause: float | None) -> None:
    assert pause_seconds(status, headers, now=NOW) == pause


def test_the_handler_keeps_its_retry_after_parser() -> None:
    assert openai_chat.parse_retry_after({"retry-after": "2"}) == 2.0


# --------------------------------------------------------------------------- small helpers


def test_token_estimate_counts_ascii_by_four_and_other_characters_one_each() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("日本語") == 3
    assert estimate_tokens("hi 日本") == 3


@pytest.mark.parametrize(("task", "tenant"), [
    ({"enterprise_id": "acme", "user_id": "u1"}, "acme"),
    ({"enterprise_id": "", "user_id": "u1"}, "u1"),
    ({"enterprise_id": None, "user_id": None}, "shared"),
    ({}, "shared"),
])
def test_a_tasks_tenant_is_the_databases(task: dict[str, Any], tenant: str) -> None:
    assert tenant_of(task) == tenant


def test_windows_of_the_usual_shape() -> None:
    assert windows_for() == []
    assert windows_for(rpm=10) == [Window("", 10, 0)]
    assert windows_for(tpm=5, tenant="acme", tenant_rpm=2) == [Window("", 0, 5),
                                                               Window("tenant:acme", 2, 0)]
    assert windows_for(rpm=10, tenant="acme") == [Window("", 10, 0)]  # no tenant_rpm


def test_odd_tenant_names_become_digests_in_redis_keys() -> None:
    assert scope_part("acme-1") == "acme-1"
    odd = scope_part("{slot} with spaces")
    assert odd.startswith("sha256-") and "{" not in odd
    assert scope_part("x" * 65) != scope_part("x" * 66)


def test_keys_are_checked() -> None:
    Limiter("openai-abc.def:1")
    for bad in ("", "a b", "{tag}", "x" * 121):
        with pytest.raises(ValueError, match="rate limit key"):
            Limiter(bad)


def test_no_limit_charges_nothing_and_needs_no_redis() -> None:
    with rate_limit("anything", tokens=10) as permit:
        assert not permit.active
        permit.settle(3)
        assert permit.observe({"retry-after": "5"}, 429) == 5.0  # read, but nowhere to pause


def test_a_request_larger_than_the_tokens_limit_is_refused_before_redis() -> None:
    with pytest.raises(RequestTooLarge, match="can never be sent"):
        acquire("k", [Window("", 0, 100)], tokens=101)


# --------------------------------------------------------------------------- wait decisions


@pytest.fixture
def deadline() -> Iterator[None]:
    token = bind_deadline(100.0)  # 100 s left: waits up to 75 s, keeping 25 for the call
    try:
        yield
    finally:
        unbind_deadline(token)


def waiter(tokens: int = 0, max_wait: float | None = None) -> _Waiter:
    return _Waiter(Limiter("k"), [Window("", 10, 1000)], tokens, max_wait)


def test_a_pause_or_requests_wait_past_the_deadline_is_retried_at_once(deadline: None) -> None:
    with pytest.raises(RateLimited) as caught:
        waiter().sleep_for(Attempt(False, exact_wait=80.0, why="requests"))
    assert caught.value.retry_after == 80.0
    assert "no room" in str(caught.value)


def test_a_wait_within_the_budget_is_slept_in_one_go(deadline: None) -> None:
    assert 30.0 <= waiter().sleep_for(Attempt(False, exact_wait=30.0, why="paused")) <= 30.05


def test_a_tokens_wait_polls_since_a_settle_may_free_room(deadline: None) -> None:
    """Tokens held by requests in flight may be settled lower at any moment: ask again
    within a second rather than sleep the whole estimate, even past the deadline."""
    w = waiter()
    assert w.sleep_for(Attempt(False, tokens_wait=200.0, why="tokens")) <= 1.05
    assert 5.0 <= w.sleep_for(Attempt(False, exact_wait=5.0, tokens_wait=20.0)) <= 5.05


def test_max_wait_bounds_the_wait(deadline: None) -> None:
    with pytest.raises(RateLimited):
        waiter(max_wait=2).sleep_for(Attempt(False, exact_wait=3.0))


def test_without_a_deadline_the_wait_is_bounded_by_one_window() -> None:
    with pytest.raises(RateLimited):
        waiter().sleep_for(Attempt(False, exact_wait=62.0))
    assert waiter().sleep_for(Attempt(False, exact_wait=60.0)) >= 60.0


# --------------------------------------------------------------------------- the OpenAI handler


def settings(**env: str) -> Settings:
    return Settings.from_env({"OPENAI_API_KEY": "sk-test-0123456789", **env})


@pytest.mark.parametrize(("env", "message"), [
    ({"OPENAI_TPM": "1000"}, "OPENAI_TPM=1000 needs OPENAI_MAX_TOKENS"),
    ({"OPENAI_TPM": "1000", "OPENAI_MAX_TOKENS": "2000"}, "no request could ever be sent"),
    ({"OPENAI_RPM": "-1"}, "OPENAI_RPM='-1' must be 0"),
    ({"OPENAI_TENANT_RPM": "ten"}, "not a whole number"),
])
def test_bad_limits_stop_the_worker_with_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings(**env)


def test_no_limit_by_default() -> None:
    current = settings()
    assert (current.rpm, current.tpm, current.tenant_rpm, current.max_tokens) == (0, 0, 0, 0)
    assert limits.windows(current, None, {"user_id": "u"}) == []


def agent(**openai: Any) -> Agent:
    return Agent(name="chat", handler="tasks.handlers.openai_chat:handler",
                 queue="agent_tasks.chat", time_limit=60, max_retries=3, openai=openai)


def test_the_key_the_tenant_and_an_agents_own_windows() -> None:
    current = settings(OPENAI_RPM="120", OPENAI_TPM="20000", OPENAI_MAX_TOKENS="100",
                       OPENAI_TENANT_RPM="10")
    chat = agent(rpm=30.0, tpm=5000.0, tenant_rpm=3.0)  # the agents file reads floats
    assert limits.windows(current, chat, {"enterprise_id": "acme"}) == [
        Window("", 120, 20000), Window("tenant:acme", 10, 0), Window("agent:chat", 30, 5000),
        Window("agent:chat:tenant:acme", 3, 0)]
    assert limits.windows(settings(), agent(model="m"), {}) == []


def test_the_provider_key_is_a_digest_never_the_api_key() -> None:
    one = limits.provider_key(settings())
    assert one.startswith("openai-") and "0123456789" not in one
    assert one == limits.provider_key(settings())
    assert one != limits.provider_key(settings(OPENAI_BASE_URL="http://localhost:11434/v1"))
    Limiter(one)  # a valid limiter key


def test_a_request_is_charged_its_prompt_estimate_and_max_tokens() -> None:
    messages = [{"role": "system", "content": "abcd" * 10}, {"role": "user", "content": "日本"}]
    assert limits.estimate(messages, 0) == (10 + 4) + (2 + 4) + 3
    assert limits.estimate(messages, 500) == 523


def test_an_agents_options_and_its_own_limits() -> None:
    token = agent_context.bind(agent(model="small", max_tokens=64.0, rpm=5.0))
    try:
        current = for_agent(settings(OPENAI_RPM="100"))
    finally:
        agent_context.unbind(token)
    assert (current.model, current.max_tokens, current.rpm) == ("small", 64, 100)


def test_an_agents_tokens_limit_needs_a_most_answer_size() -> None:
    with pytest.raises(SettingsError, match=r"\[chat.openai\] tpm=500 needs"):
        limits.check_agents(settings(), [agent(tpm=500.0)])
    limits.check_agents(settings(OPENAI_MAX_TOKENS="100"), [agent(tpm=500.0)])
    with pytest.raises(SettingsError, match="max_tokens=900 is more than OPENAI_TPM=800"):
        limits.check_agents(settings(OPENAI_TPM="800", OPENAI_MAX_TOKENS="100"),
                            [agent(max_tokens=900.0)])


def test_a_handler_without_limits_reads_a_429_and_touches_no_redis(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI() as fake:
        for name, _, _ in openai_chat.variables():
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
        monkeypatch.setenv("OPENAI_MAX_TOKENS", "3")
        openai_chat.reset_settings()
        try:
            fake.respond("one two three four five")
            result = openai_chat.handler({"id": "t", "attempt": 1,
                                          "request_payload": {"prompt": "count"}})
        finally:
            openai_chat.reset_settings()
    assert fake.requests[0].body["max_tokens"] == 3
    assert result["answer"] == "one two three" and result["finish_reason"] == "length"


def test_a_permit_without_a_limiter_is_inert() -> None:
    permit = Permit(None, (), 10)
    permit.pause(5)
    permit.settle(None)
    assert permit.tokens == 10


# --------------------------------------------------------------------------- the fake server


@pytest.mark.parametrize(("seconds", "text"), [
    (0.012, "12ms"), (0.0001, "1ms"), (1.0, "1s"), (1.5, "1.5s"), (360.0, "6m0s"),
    (61.25, "1m1.25s")])
def test_the_fake_writes_resets_as_openai_does(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(max(seconds, 0.001), abs=0.001)


def post(fake: FakeOpenAI, words: int = 3, **body: Any) -> httpx.Response:
    return httpx.post(f"{fake.url}/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": " ".join(["w"] * words)}],
        **body}, timeout=10)


def test_the_fake_refuses_a_request_over_its_requests_limit_like_openai() -> None:
    with FakeOpenAI() as fake:
        fake.limit(rpm=2, tpm=1000)
        for _ in range(3):
            fake.respond("a b")
        first = post(fake)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-remaining-tokens"] == "995"
        assert parse_duration(first.headers["x-ratelimit-reset-requests"]) is not None
        assert post(fake).headers["x-ratelimit-remaining-requests"] == "0"
        refused = post(fake)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
        assert "on requests per min (RPM): Limit 2, Used 2, Requested 1" in error["message"]
        assert "Please try again in" in error["message"]
        assert 59 <= int(refused.headers["retry-after"]) <= 60
        assert pause_seconds(429, refused.headers) == int(refused.headers["retry-after"])
        assert fake.pending == 1  # the refused request left the queue as it was
        assert [r.kind for r in fake.refused] == ["requests"]
        assert fake.tokens_served == 10
        assert fake.per_minute() == [(2, 10)]
        assert fake.busiest_minute() == (2, 10)


def test_the_fake_refuses_tokens_over_its_limit_and_a_request_too_large() -> None:
    with FakeOpenAI() as fake:
        fake.limit(tpm=10)
        for _ in range(2):
            fake.respond("a b c")
        assert post(fake, words=4).status_code == 200  # 4 + 3 tokens
        refused = post(fake, words=4)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
        assert "on tokens per min (TPM): Limit 10, Used 7, Requested 7" in \
            refused.json()["error"]["message"]
        huge = post(fake, words=20)
        assert huge.status_code == 429 and "retry-after" not in huge.headers
        assert "Request too large" in huge.json()["error"]["message"]


def test_the_fake_cuts_an_answer_to_max_tokens() -> None:
    with FakeOpenAI() as fake:
        fake.respond("one two three four")
        fake.respond("one two three four")
        cut = post(fake, words=1, max_tokens=2).json()
        assert cut["choices"][0]["message"]["content"] == "one two"
        assert cut["choices"][0]["finish_reason"] == "length"
        assert cut["usage"]["completion_tokens"] == 2
        whole = post(fake, words=1, max_completion_tokens=10).json()
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert fake.tokens_served == 3 + 5
        assert "x-ratelimit-limit-requests" not in post(fake).headers  # no limit: no headers
