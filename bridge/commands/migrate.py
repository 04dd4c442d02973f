"""`agent-bridge migrate`: apply the migrations to DATABASE_URL."""

from __future__ import annotations

import argparse
from pathlib import Path

import psycopg

from bridge.config import ConfigError, Settings
from bridge.errors import StoreUnavailable
from bridge.migrate import MIGRATIONS_DIR, migrate


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate", help="create or upgrade the table and its functions (DATABASE_URL)",
        description="Apply supabase/migrations/*.sql to DATABASE_URL. On a plain PostgreSQL "
                    "it first creates the roles and auth.uid() Supabase would provide. "
                    "Idempotent. On Supabase you can use `supabase db push` instead.")
    p.add_argument("--database-url", help="default: $DATABASE_URL")
    p.add_argument("--dir", type=Path, default=MIGRATIONS_DIR, help="migrations directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    url = args.database_url or Settings.from_env().database_url
    if not url:
        raise ConfigError("DATABASE_URL is not set (Supabase: Settings → Database → "
                          "Connection string, session mode)")
    try:
        applied = migrate(url, args.dir)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot connect: {str(exc).strip().splitlines()[0]}") from None
    for name in applied:
        print(f"✅ applied {name}")
    return 0
