"""Real agent logic through the real pipeline: the OpenAI-compatible handler in a
Celery worker, against a local OpenAI-compatible server, with the row watched the
way a Realtime subscriber would see it."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.db import PgServer, insert_task
from tests.fakes.openai_server import FakeOpenAI
from tests.stack import Stack

API_KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
def fake_api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def stack(clean_db: str, clean_redis: str, tmp_path: Path, fake_api: FakeOpenAI
          ) -> Iterator[Stack]:
    s = Stack(clean_db, clean_redis, tmp_path,
              AGENT_HANDLER="tasks.handlers.openai_chat:handler",
              OPENAI_BASE_URL=fake_api.url, OPENAI_API_KEY=API_KEY, OPENAI_MODEL="test-model",
              OPENAI_PROGRESS_INTERVAL="0.05")
    try:
        yield s
    finally:
        s.stop_all()


def watch_payloads(db_url: str, task_id: str, stop: threading.Event) -> list[Any]:
    """Every distinct response_payload the row shows, in order (as the frontend would:
    while it runs, the answer its streamed chunks rebuild)."""
    seen: list[Any] = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute(
                "select case when status = 'processing' then agent_bridge.streamed_payload("
                "id, attempts, response_payload) else response_payload end "
                "from public.agent_task_requests where id = %s", [task_id]).fetchone()
            if row and row[0] is not None and (not seen or seen[-1] != row[0]):
                seen.append(row[0])
            time.sleep(0.01)
    return seen


def test_streamed_answer_grows_in_the_row_then_is_replaced(stack: Stack, fake_api: FakeOpenAI
                                                           ) -> None:
    fake_api.respond("one two three four five six seven eight", chunks=8, delay_per_chunk=0.15)
    stack.worker()
    stack.bridge()
    task = insert_task(stack.db_url, {"prompt": "count to eight"})
    stop = threading.Event()
    result: list[Any] = []
    watcher = threading.Thread(target=lambda: result.extend(
        watch_payloads(stack.db_url, task, stop)))
    watcher.start()
    try:
        stack.wait_for("completion", lambda: stack.row(task)["status"] == "completed")
    finally:
        stop.set()
        watcher.join()
    partials = [p["answer"] for p in result if p.get("partial")]
    assert len(partials) >= 2, result
    assert all(b.startswith(a) for a, b in itertools.pairwise(partials))
    final = stack.row(task)["response_payload"]
    assert final["answer"] == "one two three four five six seven eight"
    assert final["model"] == "test-model" and final["finish_reason"] == "stop"
    assert final["usage"]["total_tokens"] > 0 and "partial" not in final


def test_rate_limit_is_retried_then_completes(stack: Stack, fake_api: FakeOpenAI) -> None:
    fake_api.fail(429, headers={"Retry-After": "1"})
    fake_api.respond("fine now")
    stack.worker()
    stack.bridge()
    task = insert_task(stack.db_url, {"prompt": "hi"})
    stack.wait_for("completion", lambda: stack.row(task)["status"] == "completed")
    assert stack.row(task)["response_payload"]["answer"] == "fine now"
    assert stack.row(task)["attempts"] == 1
    assert len(fake_api.requests) == 2


def test_bad_key_fails_at_once_without_leaking_it(stack: Stack, fake_api: FakeOpenAI) -> None:
    fake_api.fail(401, {"error": {"message": f"Incorrect API key provided: {API_KEY}",
                                  "type": "invalid_request_error", "code": "invalid_api_key"}})
    stack.worker()
    stack.bridge()
    task = insert_task(stack.db_url, {"prompt": "hi"})
    stack.wait_for("failure", lambda: stack.row(task)["status"] == "failed")
    row = stack.row(task)
    assert "401" in row["error"]["message"] and "invalid_api_key" in row["error"]["message"]
    assert API_KEY not in str(row) and API_KEY not in stack.logs()
    assert len(fake_api.requests) == 1


def test_an_answer_is_not_paid_for_twice_when_the_write_fails(
        clean_db: str, clean_redis: str, tmp_path: Path, pg_server: PgServer) -> None:
    """The database goes away while the agent works; when it is back, the worker
    retries writing the answer it already has instead of running the agent again."""
    local = pg_server.require_local()
    stack = Stack(clean_db, clean_redis, tmp_path, LEASE_SECONDS="8")
    try:
        stack.worker(concurrency=1)
        stack.bridge()
        task = insert_task(stack.db_url, {"prompt": "p", "context": {"sleep": 1.5}})
        stack.wait_for("the handler to start", lambda: len(stack.runs(task)) == 1)
        local.stop()
        time.sleep(3)
        local.start()
        stack.wait_for("completion", lambda: stack.row(task)["status"] == "completed", 60)
        assert stack.row(task)["attempts"] == 1
        assert len(stack.runs(task)) == 1
    finally:
        stack.stop_all()
