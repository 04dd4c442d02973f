"""Shared fixtures: a real PostgreSQL and a real Redis, started by the suite.

TEST_DATABASE_URL / TEST_REDIS_URL point the suite at servers you run instead;
tests that must stop or restart a server are skipped against those.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import redis

from bridge.localstack import LocalPostgres, LocalRedis
from bridge.migrate import migrate
from bridge.store import TaskStore
from bridge.store.postgres import PostgresTransport
from bridge.store.supabase import SupabaseTransport
from tests.db import PgServer, forget_connection, sql
from tests.fakes.gateway import StandIns
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub
from tests.stack import Stack
from tests.supabase_cli import SUPABASE_CLI

T = TypeVar("T")


@contextmanager
def running(start: Callable[[], T], stop: Callable[[], object]) -> Iterator[T]:
    """A server's `start` (what it returns) for the block, then its `stop`."""
    started = start()
    try:
        yield started
    finally:
        stop()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield PgServer(external, None)
        return
    local = LocalPostgres(Path(tmp_path_factory.mktemp("postgres")) / "data")
    url = local.start()
    # A throwaway server: no fsync (a crash of PostgreSQL itself, which tests cause, loses
    # nothing without it; only the machine's would). Commits stay synchronous.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("alter system set fsync = off")
        conn.execute("select pg_reload_conf()")
    try:
        yield PgServer(url, local)
    finally:
        forget_connection()
        local.stop()


@pytest.fixture(scope="session")
def db_url(pg_server: PgServer) -> str:
    """A migrated database shared by the session; `clean_db` empties its tasks and chunks."""
    url = pg_server.create_database("agent_bridge_test")
    migrate(url)
    return url


@pytest.fixture
def clean_db(db_url: str) -> str:
    sql(db_url, "truncate public.agent_task_requests, public.agent_task_chunks")
    return db_url


@pytest.fixture
def fresh_db(pg_server: PgServer) -> Iterator[str]:
    """An empty, unmigrated database of its own."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TEST_REDIS_URL")
    if external:
        yield external
        return
    server = LocalRedis(Path(tmp_path_factory.mktemp("redis")))
    with running(server.start, server.stop):
        yield server.url


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """A Redis of this test's own, to kill or misconfigure."""
    server = LocalRedis(tmp_path / "own-redis")
    with running(server.start, server.stop):
        yield server


@pytest.fixture(scope="session")
def postgrest(db_url: str) -> Iterator[str]:
    """A PostgREST-compatible RPC endpoint on the test database; yields SUPABASE_URL."""
    stub = PostgrestStub(db_url, service_key=SERVICE_KEY)
    with running(stub.start, stub.stop) as url:
        yield url


@pytest.fixture(params=["postgres", "supabase"])
def store(request: pytest.FixtureRequest, clean_db: str) -> Iterator[TaskStore]:
    """The task store over each transport, on an empty table."""
    if request.param == "postgres":
        s = TaskStore(PostgresTransport(clean_db))
    else:
        base_url = request.getfixturevalue("postgrest")
        s = TaskStore(SupabaseTransport(base_url, SERVICE_KEY, timeout=10))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def env(store: TaskStore, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The Stack's environment for the transport `store` uses (a test taking `store` and
    `env` runs its real processes once per transport)."""
    if store.transport.name == "postgres":
        return {}
    return {"BRIDGE_TRANSPORT": "supabase", "SUPABASE_URL": request.getfixturevalue("postgrest"),
            "SUPABASE_SERVICE_KEY": SERVICE_KEY, "DATABASE_URL": ""}


@pytest.fixture
def stack(clean_db: str, clean_redis: str, tmp_path: Path) -> Iterator[Stack]:
    """Real bridge and worker processes of this test, on an empty table and Redis."""
    s = Stack(clean_db, clean_redis, tmp_path)
    try:
        yield s
    finally:
        s.stop_all()


@pytest.fixture
def standins(clean_db: str) -> Iterator[StandIns]:
    """The PostgREST and Realtime stand-ins behind one gateway, on an empty table."""
    s = StandIns(clean_db)
    with running(s.start, s.stop):
        yield s


@pytest.fixture(scope="session")
def supabase_cli(request: pytest.FixtureRequest) -> Path:
    """The CLI, installed once into the pytest cache (its npm package pulls the binary
    as an optional dependency, @supabase/cli-<platform>)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the Supabase CLI is installed from npm")
    folder = Path(request.config.cache.mkdir(f"supabase-cli-{SUPABASE_CLI}"))
    binary = folder / "node_modules" / ".bin" / "supabase"
    if not binary.exists():
        try:
            installed = subprocess.run(
                [npm, "install", "--exact", f"supabase@{SUPABASE_CLI}", "--prefix", str(folder),
                 "--no-audit", "--no-fund"], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install supabase@{SUPABASE_CLI} took over 5 minutes (offline?)")
        if installed.returncode != 0 or not binary.exists():
            said = (installed.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"npm could not install supabase@{SUPABASE_CLI}: {said}")
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=60)
    if version.returncode != 0:
        pytest.skip(f"the Supabase CLI does not run here: {version.stderr.strip()[-200:]}")
    assert version.stdout.strip() == SUPABASE_CLI
    return binary


# The layers, one folder each (docs/explanation/testing.md):
#   tests/unit/        no services: settings, parsers, agents, error classification, backpressure,
#                      the OpenAI handler's messages; runs in seconds.
#   tests/sql/         the state functions, policies and limits on the real database (and Redis),
#                      in process, through both transports where a transport is involved.
#   tests/acceptance/  real processes of ours (bridge, worker, `dev`, the CLI, a browser, the
#                      Supabase CLI, an installed wheel) or the stand-in servers.
# `pytest -m "not acceptance"` is the quick loop. A test that needs more than its layer allows
# is refused at collection, so the layers stay true.
SERVICE_FIXTURES = {"pg_server", "redis_url", "own_redis"}
PROCESS_FIXTURES = {"stack", "standins", "own_redis", "supabase_cli"}


def pytest_configure(config: pytest.Config) -> None:
    """`-n N` (pytest-xdist) gives each worker a PostgreSQL and a Redis of its own; servers
    of your own would be shared by the workers, which empty each other's tables."""
    external = [v for v in ("TEST_DATABASE_URL", "TEST_REDIS_URL") if os.environ.get(v)]
    if external and getattr(config.option, "numprocesses", None):
        raise pytest.UsageError(f"{' and '.join(external)} set: run without -n (its workers "
                                "would share the servers)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        layer = item.path.parent.name
        fixtures = set(getattr(item, "fixturenames", ()))
        module = getattr(item, "module", None)
        if layer == "acceptance":
            item.add_marker(pytest.mark.acceptance)
        elif module is not None and any(v is Stack for v in vars(module).values()):
            raise pytest.UsageError(f"{item.nodeid} runs the bridge and workers (tests.stack."
                                    "Stack); move it to tests/acceptance/")
        elif layer == "unit" and fixtures & SERVICE_FIXTURES:
            raise pytest.UsageError(f"{item.nodeid} is a unit test but uses a server: "
                                    f"{sorted(fixtures & SERVICE_FIXTURES)}; move it to tests/sql/")
        elif layer == "sql" and fixtures & PROCESS_FIXTURES:
            raise pytest.UsageError(f"{item.nodeid} runs processes: "
                                    f"{sorted(fixtures & PROCESS_FIXTURES)}; "
                                    "move it to tests/acceptance/")
