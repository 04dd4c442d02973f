"""`agent-bridge check`: check configuration, database, schema, Redis and workers.

Check every dependency in turn and say how to fix what is missing: configuration, the
database or Supabase (and the key), the table and functions at the expected schema
version, Redis, and a worker online. Exit 0 only when all pass.

Is everything in place? One ✅ or ❌ line per dependency, each ❌ with the fix.
"""

from __future__ import annotations

import argparse
import sys

from bridge.commands.parsers import Subparsers, add_command
from bridge.commands.status import probe_broker, probe_workers
from bridge.config import ConfigError, Settings
from bridge.errors import MISSING_CODES, SchemaMissing, StoreError, StoreRejected, first_line
from bridge.migrate import SCHEMA_VERSION
from bridge.queries import load as load_queries
from bridge.store import open_store

INSTALL = "run `agent-bridge migrate` (DATABASE_URL) or `supabase db push`"
KEY_REJECTED = "SUPABASE_SERVICE_KEY rejected: use a secret key (sb_secret_...) or the " \
               "legacy service_role key (Supabase → Project Settings → API Keys), not the " \
               "publishable or anon key"
START_REDIS = ("start one: `redis-server` (install it with `apt install redis-server` or "
               "`brew install redis`), or `docker compose up redis`; on Windows use "
               "docker compose or WSL")


class Report:
    def __init__(self) -> None:
        self.ok = True

    def line(self, ok: bool, text: str, fix: str | None = None) -> None:
        self.ok = self.ok and ok
        print(f"{'✅' if ok else '❌'} {text}" + (f" → {fix}" if fix and not ok else ""),
              flush=True)


def register(sub: Subparsers) -> None:
    add_command(sub, "check", run, __doc__)


def run(args: argparse.Namespace) -> int:
    report = Report()
    try:
        settings = Settings.from_env()
        settings.require_store()
    except ConfigError as exc:
        see = "" if ".env.example" in str(exc) else " (see .env.example)"
        report.line(False, f"Configuration: {exc}", f"set it in .env or the environment{see}")
        return 1
    report.line(True, f"Configuration found: {describe(settings)}")

    if settings.store_kind == "postgres":
        reachable = check_postgres(report, settings)
    else:
        reachable = check_supabase(report, settings)
    if not reachable:
        report.line(False, "Table and functions: not checked (no working connection, see above)")

    broker = probe_broker(settings)
    name = "Redis" if broker.url.startswith(("redis://", "rediss://")) else "Broker"
    if broker.reachable:
        report.line(True, f"{name} reachable at {broker.url} "
                          f"({broker.queue_depth} job(s) waiting in {broker.queue})")
    else:
        report.line(False, f"{name} not reachable at {broker.url}: {broker.error}",
                    START_REDIS if name == "Redis" else
                    f"check {'CELERY_BROKER_URL' if settings.celery_broker_url else 'REDIS_URL'}")

    workers = probe_workers(settings, broker)
    if workers.online:
        report.line(True, f"{len(workers.online)} worker(s) online: {', '.join(workers.online)}")
    elif workers.error:
        report.line(False, f"Workers: {workers.error}")
    else:
        report.line(False, "No worker online", start_worker_hint())
    return 0 if report.ok else 1


def describe(settings: Settings) -> str:
    if settings.store_kind == "supabase":
        return f"Supabase transport (SUPABASE_URL={settings.supabase_url}, service key set)"
    from bridge.store.postgres import describe as describe_url

    return f"Postgres transport (DATABASE_URL → {describe_url(settings.database_url)})"


def start_worker_hint() -> str:
    if sys.platform == "win32":
        return "start one: celery -A tasks worker -P threads --loglevel INFO"
    return "start one: celery -A tasks worker --loglevel INFO (on Windows add `-P threads`)"


def check_postgres(report: Report, settings: Settings) -> bool:
    functions = sorted({q.function for q in load_queries().values()})
    store = open_store(settings, pool=False)
    try:
        has_table, missing = store.installed(functions)
    except StoreError as exc:
        report.line(False, f"Database unreachable: {first_line(exc.__cause__ or exc)}",
                    "check DATABASE_URL (host, port, user, password); on Supabase use the "
                    "direct or session-pooler URL (port 5432)")
        return False
    finally:
        store.close()
    report.line(True, "Database reachable")
    if not has_table:
        report.line(False, "Table public.agent_task_requests is missing", INSTALL)
    elif missing:
        report.line(False, f"Functions missing: {', '.join(missing)}", INSTALL)
    else:
        check_version(report, settings, len(functions))
    return True


def check_supabase(report: Report, settings: Settings) -> bool:
    from bridge.store.supabase import probe  # only in Supabase mode: slow import

    try:
        status = probe(settings.supabase_url, settings.supabase_service_key,
                       settings.supabase_timeout)
    except StoreError as exc:
        report.line(False, f"Supabase unreachable at {settings.supabase_url}: {exc}",
                    "check SUPABASE_URL (https://<project>.supabase.co) and your network")
        return False
    if status in (401, 403):
        report.line(False, KEY_REJECTED)
        return False
    if status >= 500:
        report.line(False, f"Supabase answered HTTP {status}",
                    "is the project paused or restarting? Try again in a minute")
        return False
    report.line(True, "Supabase reachable with the service key")
    check_version(report, settings, None)
    return True


def check_version(report: Report, settings: Settings, functions: int | None) -> None:
    """schema_version() and stats() through the store: the same calls the bridge makes."""
    store = open_store(settings, pool=False)
    try:
        version = store.schema_version()
        store.stats()
    except SchemaMissing as exc:
        report.line(False, exc.problem[0].upper() + exc.problem[1:],
                    INSTALL if exc.found is None or exc.found < exc.need else exc.fix)
        return
    except StoreRejected as exc:
        code = exc.code or ""
        if code == "42501":
            report.line(False, f"Permission denied calling the functions: {exc}",
                        KEY_REJECTED if settings.store_kind == "supabase"
                        else "connect as the database owner (postgres) or grant service_role")
        elif code in MISSING_CODES:
            report.line(False, f"Table or functions not installed: {exc}", INSTALL)
        else:
            report.line(False, f"Schema check failed: {exc}", INSTALL)
        return
    except StoreError as exc:
        report.line(False, f"Schema check failed: {exc}", "try again in a moment")
        return
    finally:
        store.close()
    if version != SCHEMA_VERSION:
        fix = INSTALL if version < SCHEMA_VERSION else "upgrade agent-bridge on this machine"
        report.line(False, f"Schema version {version}, this agent-bridge expects "
                           f"{SCHEMA_VERSION}", fix)
        return
    what = f"Table and {functions} functions" if functions else "Table and functions"
    report.line(True, f"{what} installed (schema version {version})")
