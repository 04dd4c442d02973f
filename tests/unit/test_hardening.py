"""Every failure ends its row once, with a clear error, and never runs the agent twice (issue
10): the parts that need no server. The SQL side is tests/sql/test_hardening.py."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.config import Settings


def test_the_default_response_limit_is_one_mib() -> None:
    assert Settings.from_env({}, dotenv=False).max_response_bytes == 1024 * 1024


def test_docs_list_the_failure_behaviours() -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "explanation" / "failure-behaviour.md"
    section = page.read_text().split("\n## When a task goes wrong", 1)[1].split("\n## ", 1)[0]
    for phrase in ("InvalidPayload", "64 levels", "4 KB", "AGENT_MAX_RESPONSE_BYTES",
                   "Retry-After", "finite", "TaskFailed", "prefork", "threads"):
        assert re.search(re.escape(phrase), section), phrase


