"""The frontend half, end to end: the TypeScript client (clients/js) with the real
supabase-js against the PostgREST and Realtime stand-ins behind one gateway, a real
bridge and a real Celery worker running tests/frontend_handler.py (which streams, or, for a
prompt starting "ask:", asks its user); then the example React page in headless Chromium.

Runs `npm ci` (registry only) when clients/js/node_modules is missing, then the package's
typecheck, lint and node tests. The node tests and the page run twice: with Realtime
Broadcast on in the database (the client follows each task's private topic) and off (its
join is refused and the client falls back to postgres_changes); REALTIME_PATH tells them
which path their watches must have followed. Skipped only when node is not installed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.db import broadcasting
from tests.fakes.gateway import StandIns
from tests.fakes.jwt import TEST_JWT_SECRET
from tests.stack import REPO, Stack

JS = REPO / "clients" / "js"
CHROMIUM = Path("/usr/bin/chromium")
PATHS = ("broadcast", "postgres_changes")


def npm(*args: str, env: dict[str, str] | None = None, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["npm", *args], cwd=JS, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def check(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def node_modules() -> None:
    if not (JS / "node_modules" / ".package-lock.json").exists():
        check(npm("ci", "--no-audit", "--no-fund"))
    check(npm("run", "build"))


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, clean_db: str) -> Iterator[str]:
    """The path the client must follow tasks by: Broadcast on, or off (joins refused)."""
    with broadcasting(clean_db, request.param == "broadcast"):
        yield str(request.param)


@pytest.fixture
def project(clean_db: str, clean_redis: str, tmp_path: Path, node_modules: None, path: str
            ) -> Iterator[tuple[StandIns, Stack]]:
    """A local "Supabase project" (stand-ins + gateway), a bridge and a threads worker."""
    standins = StandIns(clean_db)
    standins.start()
    stack = Stack(clean_db, clean_redis, tmp_path, AGENT_HANDLER="tests.frontend_handler:stream")
    try:
        stack.worker(pool="threads", concurrency=4)
        stack.bridge()
        yield standins, stack
    finally:
        stack.stop_all()
        standins.stop()


def node_env(standins: StandIns, stack: Stack, path: str) -> dict[str, str]:
    with psycopg.connect(stack.db_url) as conn:
        has_cancel = conn.execute("select to_regproc('public.cancel_agent_task') is not null"
                                  ).fetchone()
    return {**os.environ, "HAS_CANCEL": "1" if has_cancel and has_cancel[0] else "0",
            "REALTIME_PATH": path,
            "SUPABASE_URL": standins.url, "SUPABASE_ANON_KEY": standins.anon_key,
            "SUPABASE_SERVICE_KEY": standins.service_key, "TEST_JWT_SECRET": TEST_JWT_SECRET,
            "REALTIME_CONTROL_URL": standins.realtime_url, "TEST_STATE_DIR": str(stack.state_dir)}


def test_typecheck_and_lint(node_modules: None) -> None:
    check(npm("run", "typecheck"))
    check(npm("run", "lint"))


def test_client_against_standins(project: tuple[StandIns, Stack], path: str) -> None:
    standins, stack = project
    result = npm("test", env=node_env(standins, stack, path), timeout=280)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{stack.logs()}"
    assert "# fail 0" in result.stdout, result.stdout


def test_example_page_in_chromium(project: tuple[StandIns, Stack], path: str, tmp_path: Path
                                  ) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    standins, stack = project
    check(npm("run", "build:example"))
    screenshot = tmp_path / "example.png"
    env = {**node_env(standins, stack, path), "SCREENSHOT": str(screenshot),
           "CHROMIUM": str(CHROMIUM), "BROWSER_PROFILE": str(tmp_path / "chromium-profile")}
    result = subprocess.run(["node", "example/browser-test.mjs"], cwd=JS, env=env,
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{stack.logs()}"
    assert screenshot.stat().st_size > 0
