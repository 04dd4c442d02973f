"""Provider rate limits across real worker processes: the built-in OpenAI handler in Celery
workers against the fake OpenAI server, which keeps a log of what it served per minute and
enforces the same limits the way OpenAI does (a 429 for any request over them).

- 4 worker processes x 25 threads share 120 RPM and 20,000 TPM: no 60 s of the server's
  log holds more than either limit, the server never had to refuse one of our requests,
  and the work that does not fit in a minute waits for the next instead of failing.
- A provider 429 with Retry-After pauses the key for every process.
- One tenant cannot take the whole key: its requests beyond OPENAI_TENANT_RPM wait while
  another tenant's go through.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.stack import Proc, Stack

API_KEY = "sk-test-RATELIMIT-0123456789abcdef"
# A word of the prompts: seven characters with its space, so the handler's estimate
# (a token per four characters) is above the fake's count (a token per word).
WORD = "tokens"


@pytest.fixture
def fake_api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def openai_stack(db: str, redis_url: str, tmp: Path, fake: FakeOpenAI, **env: str) -> Stack:
    return Stack(db, redis_url, tmp, AGENT_HANDLER="tasks.handlers.openai_chat:handler",
                 OPENAI_BASE_URL=fake.url, OPENAI_API_KEY=API_KEY, OPENAI_MODEL="test-model",
                 OPENAI_SYSTEM_PROMPT="", **env)


def insert(db_url: str, prompts: list[tuple[str, str]]) -> list[str]:
    """Rows of (tenant, prompt), in one statement; their ids in order."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "insert into public.agent_task_requests (status, request_payload, enterprise_id) "
            "select 'pending', jsonb_build_object('prompt', p), t "
            "from unnest(%s::text[], %s::text[]) with ordinality as x(t, p, n) order by n "
            "returning id::text", [[t for t, _ in prompts], [p for _, p in prompts]]
        ).fetchall()
    return [r[0] for r in rows]


def workers(stack: Stack, n: int, concurrency: int) -> list[Proc]:
    started = [stack.worker(pool="threads", concurrency=concurrency, wait=False)
               for _ in range(n)]
    for proc in started:
        proc.wait_for_output(" ready.", 90)
    return started


def test_workers_share_the_keys_limits_and_no_minute_goes_over(
        clean_db: str, clean_redis: str, tmp_path: Path, fake_api: FakeOpenAI) -> None:
    """145 requests (100 small, 45 large: 22,000 tokens) from 100 threads in 4 processes
    against 120 RPM and 20,000 TPM: more than a minute holds, so some wait for the next."""
    fake_api.limit(rpm=120, tpm=20_000)
    small = (" ".join([WORD] * 20), " ".join(["answer"] * 20))  # 40 tokens served
    large = (" ".join([WORD] * 300), " ".join(["answer"] * 100))  # 400 tokens served
    jobs = [small] * 100 + [large] * 45
    random.Random(25).shuffle(jobs)
    for _, answer in jobs:
        fake_api.respond(answer, delay=0.5)  # answers in order; each the size of a prompt
    # The queue answers in arrival order, not by prompt: every answer has the mix's sizes,
    # so the totals below are exact whichever request gets which.
    stack = openai_stack(clean_db, clean_redis, tmp_path, fake_api, OPENAI_STREAM="false",
                         OPENAI_RPM="120", OPENAI_TPM="20000", OPENAI_MAX_TOKENS="150",
                         AGENT_TIME_LIMIT="120")
    try:
        workers(stack, 4, 25)
        stack.bridge()
        insert(stack.db_url, [("acme", prompt) for prompt, _ in jobs])
        rows = stack.wait_all_done(timeout=180)
    finally:
        stack.stop_all()
    assert [r["status"] for r in rows] == ["completed"] * len(jobs), stack.logs()
    assert fake_api.refused == [], "the server refused requests the limiter let through"
    most_requests, most_tokens = fake_api.busiest_minute()
    assert most_requests <= 120 and most_tokens <= 20_000, fake_api.per_minute()
    served = sorted(s.at for s in fake_api.served)
    assert len(served) == len(jobs)
    assert served[-1] - served[0] >= 60, "everything fitted in one minute: nothing was limited"
    assert sum(int(r["response_payload"]["usage"]["total_tokens"]) for r in rows) == \
        fake_api.tokens_served == 22_000
    assert all(r["attempts"] == 1 for r in rows)  # waited, not retried
    assert "waiting for room" in stack.logs()


def test_a_provider_429_pauses_the_key_for_every_process(
        clean_db: str, clean_redis: str, tmp_path: Path, fake_api: FakeOpenAI) -> None:
    fake_api.fail(429, {"error": {"message": "Rate limit reached for test-model on requests "
                                  "per min (RPM): Limit 3, Used 3, Requested 1.",
                                  "type": "requests", "param": None,
                                  "code": "rate_limit_exceeded"}}, headers={"retry-after": "8"})
    for _ in range(7):
        fake_api.respond("fine", delay=0.2)
    stack = openai_stack(clean_db, clean_redis, tmp_path, fake_api, OPENAI_RPM="600")
    try:
        procs = workers(stack, 3, 2)
        stack.bridge()
        insert(stack.db_url, [("acme", "first")])
        stack.wait_for("the 429 to pause the key", lambda: "paused for" in stack.logs())
        insert(stack.db_url, [("acme", f"then {i}") for i in range(6)])
        rows = stack.wait_all_done(timeout=60)
    finally:
        stack.stop_all()
    assert [r["status"] for r in rows] == ["completed"] * 7
    first, *rest = fake_api.served
    assert first.status == 429 and len(rest) == 7
    assert min(s.at for s in rest) >= first.at + 8 - 0.01, "a request went out during the pause"
    pauser = [p for p in procs if "paused for" in p.output]
    held = [p for p in procs if "waiting for room (paused" in p.output]
    assert len(pauser) == 1
    assert len(held) >= 2 and set(held) - set(pauser), \
        "only the process that got the 429 held back"


def test_one_tenant_cannot_take_the_whole_key(
        clean_db: str, clean_redis: str, tmp_path: Path, fake_api: FakeOpenAI) -> None:
    """A has 5 tasks, B 2, inserted together; A may send 2 a minute: A's other 3 wait
    (processing) while B's 2 go through."""
    for _ in range(7):
        fake_api.respond("fine")
    stack = openai_stack(clean_db, clean_redis, tmp_path, fake_api, OPENAI_STREAM="false",
                         OPENAI_RPM="600", OPENAI_TENANT_RPM="2", AGENT_TIME_LIMIT="120")
    procs: list[Proc] = []
    try:
        procs = workers(stack, 2, 5)
        stack.bridge()
        ids = insert(stack.db_url, [("A", f"from A {i}") for i in range(5)]
                     + [("B", f"from B {i}") for i in range(2)])

        def done(tenant: str) -> int:
            return sum(1 for r in stack.rows()
                       if r["tenant"] == tenant and r["status"] == "completed")

        stack.wait_for("B's tasks and A's share", lambda: done("B") == 2 and done("A") == 2)
        stack.wait_for("A's other tasks to wait", lambda: stack.logs().count(
            "waiting for room (tenant:A requests") >= 3)
        time.sleep(1)  # were A's waiting tasks let through, they would reach the server now
        rows = {str(r["id"]): r for r in stack.rows()}
        asked = [r.body["messages"][-1]["content"] for r in fake_api.requests]
    finally:
        for proc in procs:
            proc.kill9()  # A's three would wait a minute for their turn
        stack.stop_all()
    assert sorted(p.split()[1] for p in asked) == ["A", "A", "B", "B"]
    assert sorted(rows[i]["status"] for i in ids[:5]) == ["completed"] * 2 + ["processing"] * 3
    assert all(rows[i]["status"] == "completed" for i in ids[5:])
    assert fake_api.refused == []
