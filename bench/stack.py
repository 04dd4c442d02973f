"""Throwaway servers and real processes for the benchmarks.

`Servers` starts an embedded PostgreSQL (with pg_stat_statements preloaded) and a
`redis-server` in a temporary directory; each benchmark gets a fresh, migrated
database on it. `Proc` is one child process in its own process group (so a
`kill -9` takes a prefork worker's children with it), logging to a file: the process
handling is bridge/processes.py, shared with tests/ and `agent-bridge dev`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from bench.sql import bench_sql
from bridge import processes
from bridge.localstack import LocalPostgres, LocalRedis, with_database
from bridge.migrate import MIGRATIONS_DIR, migrate

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVICE_KEY = "bench-service-role-key"  # the PostgREST stand-in's, in Supabase mode

def done_trigger_sql(table: str, statuses: Sequence[str]) -> str:
    """A trigger that fires when a row finishes, so a waiting benchmark wakes at once
    instead of polling (added to benchmark databases only; not part of agent-bridge)."""
    return bench_sql("done_trigger").format(
        table=table, statuses=", ".join(f"'{s}'" for s in statuses))


class Proc(processes.Proc):
    """A benchmark's child process (bridge/processes.py), run from the repository root."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 log_path: Path | None = None, *, cwd: Path | None = REPO) -> None:
        super().__init__(name, args, env, log_path, cwd=cwd)

    def processes(self) -> list[psutil.Process]:
        """The process and all its descendants (a prefork worker's pool children)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []


class Servers:
    """One embedded PostgreSQL and one redis-server for the whole benchmark run."""

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="agent-bridge-bench-")) if root is None \
            else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.pg = LocalPostgres(self.root / "pgdata")
        self.redis = LocalRedis(self.root / "redis")
        self.admin_url = ""
        self._dbs = 0

    def start(self) -> None:
        url = self.pg.start()
        with psycopg.connect(url, autocommit=True) as conn:
            preload = conn.execute("show shared_preload_libraries").fetchone()
            if not preload or "pg_stat_statements" not in str(preload[0]):
                conn.execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
                restart = True
            else:
                restart = False
        if restart:
            self.pg.stop()
            self.pg.start()
        self.admin_url = self.pg.url
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("create extension if not exists pg_stat_statements")
        self.redis.start()

    def stop(self) -> None:
        self.redis.stop()
        self.pg.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def redis_client(self) -> redis.Redis[bytes]:
        return redis.Redis.from_url(self.redis_url)

    def flush_redis(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.redis_client().flushall()

    def new_database(self, prefix: str, *, migrated: bool = True) -> str:
        self._dbs += 1
        name = f"{prefix}_{self._dbs}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
            conn.execute(f'create database "{name}"')
        url = with_database(self.admin_url, name)
        if migrated:
            migrate(url)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(done_trigger_sql("agent_task_requests", ("completed", "failed"))
                             .encode())
        return url

    def database_before(self, prefix: str, change: str) -> str:
        """A fresh database with the migrations named before the file `change`: the schema
        before a change, for a bench's before and after (no bench trigger)."""
        url = self.new_database(prefix, migrated=False)
        older = Path(tempfile.mkdtemp(prefix="migrations-before-"))
        try:
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if path.name < change:
                    shutil.copy(path, older)
            migrate(url, older)
        finally:
            shutil.rmtree(older, ignore_errors=True)
        return url

    def workdir(self, name: str) -> Path:
        path = self.root / "runs" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        path.chmod(0o777)
        return path

    @property
    def postgres_pid(self) -> int | None:
        server: Any = getattr(self.pg, "_server", None)
        if server is None:
            return None
        try:
            return int(server.get_pid())
        except Exception:
            return None


@contextlib.contextmanager
def servers(root: Path | None = None) -> Iterator[Servers]:
    s = Servers(root)
    try:
        s.start()
        yield s
    finally:
        s.stop()


class ExternalServers(Servers):
    """An external PostgreSQL, on which each benchmark database is a throwaway one of ours
    named after `database` (dropped by `stop`), and this run's own redis-server."""

    def __init__(self, admin_url: str, database: str) -> None:
        super().__init__()
        self.admin_url = admin_url
        self.database = database
        self.created: list[str] = []

    def start(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5):
            pass
        self.redis.start()

    def stop(self) -> None:
        self.redis.stop()
        for name in reversed(self.created):
            with contextlib.suppress(psycopg.Error), \
                    psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'drop database if exists "{name}" with (force)'.encode())
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self, prefix: str, *, migrated: bool = True) -> str:
        """`<database>` for the prefix `latency`, else `<database>_<prefix>`, made anew;
        with `migrated`, through `agent-bridge migrate --database-url` as a user would."""
        name = self.database if prefix == "latency" else f"{self.database}_{prefix}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)'.encode())
            conn.execute(f'create database "{name}"'.encode())
        self.created.append(name)
        url = with_database(self.admin_url, name)
        if migrated:
            subprocess.run([str(BIN / "agent-bridge"), "migrate", "--database-url", url],
                           check=True, capture_output=True, timeout=120)
        return url


@contextlib.contextmanager
def external(url: str, database: str) -> Iterator[Servers]:
    """ExternalServers on the PostgreSQL at admin URL `url`, started and stopped."""
    srv = ExternalServers(url, database)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


class ProcGroup(processes.ProcGroup[Proc]):
    """Processes of one benchmark, logging to `<workdir>/<name><n>.log`; `stop_all` in a
    finally block stops every one."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(env, Proc, log_dir=workdir, cwd=REPO)
        self.workdir = workdir

    def celery_worker(self, app: str, *, pool: str, concurrency: int, wait: bool = True,
                      name: str = "worker", **env: str) -> Proc:
        return self.start_worker(app, pool=pool, concurrency=concurrency,
                                 node=f"{name}{self.count(name)}", name=name,
                                 loglevel=self.env.get("LOG_LEVEL", "INFO"),
                                 ready_within=90 if wait else None, **env)

    def bridge(self, *, wait: bool = True, **env: str) -> Proc:
        return self.start_bridge(ready_within=60 if wait else None, **env)


def base_env(*, db_url: str = "", redis_url: str, state_dir: Path | None = None,
             **extra: str) -> dict[str, str]:
    env = {**os.environ,
           "REDIS_URL": redis_url,
           "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1",
           "LOG_LEVEL": "INFO",
           "HEARTBEAT_INTERVAL": "30",
           }
    for drop in ("CELERY_BROKER_URL", "DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_KEY",
                 "BRIDGE_TRANSPORT", "AGENT_HANDLER", "BENCH_STATE_DIR"):
        env.pop(drop, None)
    if db_url:
        env["DATABASE_URL"] = db_url
        env["BRIDGE_TRANSPORT"] = "postgres"
    if state_dir is not None:
        env["BENCH_STATE_DIR"] = str(state_dir)
    env.update(extra)
    return env


def transport_env(db_url: str, transport: str, *, redis_url: str, state_dir: Path,
                  **extra: str) -> tuple[dict[str, str], Any]:
    """The environment of a run on `transport`, and the PostgREST stand-in it talks to:
    `postgres` connects to `db_url` (no stand-in: None); `supabase` goes through a stand-in
    on it, started here for the caller to stop."""
    if transport != "supabase":
        return base_env(db_url=db_url, redis_url=redis_url, state_dir=state_dir, **extra), None
    from tests.fakes.postgrest import PostgrestStub

    stub = PostgrestStub(db_url, service_key=SERVICE_KEY)
    extra.update(SUPABASE_URL=stub.start(), SUPABASE_SERVICE_KEY=SERVICE_KEY,
                 BRIDGE_TRANSPORT="supabase")
    return base_env(redis_url=redis_url, state_dir=state_dir, **extra), stub
