"""What a signed-in user can learn that is not theirs (issue 20, item 6), with a real
worker: a row's error message is classified (`provider unreachable`, ...) with no address
or OS error in it, while the worker's log keeps the detail; and a prompt (or an error's
text) cannot forge a log line. The database side is tests/sql/test_user_visibility.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.localstack import free_port
from tests.db import insert_task
from tests.stack import Stack
from tests.visibility_handlers import INTERNAL


@pytest.fixture
def leaky_stack(clean_db: str, clean_redis: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(clean_db, clean_redis, tmp_path, AGENT_HANDLER="tests.visibility_handlers:leaky",
              AGENT_MAX_RETRIES="0", OPENAI_API_KEY="sk-test-0123456789abcdef",
              OPENAI_MODEL="m", LOG_LEVEL="DEBUG")
    try:
        yield s
    finally:
        s.stop_all()


def test_error_messages_are_classified_for_users(leaky_stack: Stack) -> None:
    """Before: error.message was the exception's text: `could not reach the OpenAI-compatible
    API at http://127.0.0.1:PORT: [Errno 111] Connection refused`, a handler's URLs and IPs."""
    port = free_port()  # nothing listens there
    leaky_stack.env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    leaky_stack.worker()
    leaky_stack.bridge()
    expected = {  # kind -> (error.type, error.message)
        "socket": ("ConnectionRefusedError", "provider unreachable"),
        "urlopen": ("URLError", "provider unreachable"),
        "timeout": ("TimeoutError", "provider timed out"),
        "wrapped": ("RuntimeError", "upstream <address> said no (reset by peer at <address>)"),
        "openai": ("RetryableError", "provider unreachable (gave up after 0 retries)"),
    }
    ids = {insert_task(leaky_stack.db_url, {"prompt": "hi", "context": {"kind": k, "port": port}}
                       ): k for k in expected}
    rows = {str(r["id"]): r for r in leaky_stack.wait_all_done()}
    for task_id, kind in ids.items():
        row = rows[task_id]
        assert row["status"] == "failed"
        assert (row["error"]["type"], row["error"]["message"]) == expected[kind], kind
        assert row["response_payload"] == {"error": expected[kind][1]}
        assert not re.search(r"127\.0\.0\.1|10\.20\.30\.40|Errno", row["error"]["message"])
    # The operator's log keeps what happened, and where.
    logs = leaky_stack.logs()
    assert f"127.0.0.1:{port}" in logs and "Connection refused" in logs
    assert f"http://{INTERNAL}/v1/chat said no" in logs


def test_a_prompt_cannot_forge_log_lines(clean_db: str, clean_redis: str, tmp_path: Path
                                         ) -> None:
    """Before: the prompt was logged verbatim at DEBUG (and an error's text at WARNING), so a
    newline in it started a line of the user's choosing."""
    forged = "❌ Task 00000000-0000-0000-0000-000000000000 failed: Forged: by a user"
    stack = Stack(clean_db, clean_redis, tmp_path, LOG_LEVEL="DEBUG")
    try:
        stack.worker()
        stack.bridge()
        insert_task(clean_db, {"prompt": f"hi\n{forged}\r\x1b[2K\u2028"})
        insert_task(clean_db, {"prompt": "p", "context": {"raise": f"boom\n{forged}"}})
        stack.wait_all_done()
        logs = stack.logs()
    finally:
        stack.stop_all()
    assert "User asking: hi\\n❌ Task 00000000" in logs  # logged, escaped, on its own line
    assert "failed: ValueError: boom\\n❌ Task 00000000" in logs
    assert not [line for line in logs.splitlines() if line.startswith(forged[:12])]
    assert "\x1b" not in logs and "\u2028" not in logs and "\r" not in logs
