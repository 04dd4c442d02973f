"""`agent-bridge migrate`: create or upgrade the table and its functions (DATABASE_URL).

Apply the migrations the package ships (the repository's supabase/migrations/*.sql) to
DATABASE_URL and record them in supabase_migrations.schema_migrations as the Supabase
CLI does, so `supabase db push` and `supabase migration list` agree. On a plain
PostgreSQL it first creates the roles and auth.uid() Supabase would provide. Versions
already recorded are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import psycopg

from bridge.commands.parsers import Subparsers, add_command
from bridge.config import ConfigError, Settings, check_database_url
from bridge.errors import StoreRejected, StoreUnavailable, first_line
from bridge.migrate import MIGRATIONS_DIR, migrate


def register(sub: Subparsers) -> None:
    p = add_command(sub, "migrate", run, __doc__)
    p.add_argument("--database-url", help="default: $DATABASE_URL")
    p.add_argument("--dir", type=Path, default=MIGRATIONS_DIR,
                   help="migrations directory (default: the package's)")


def run(args: argparse.Namespace) -> int:
    url = args.database_url or Settings.from_env().database_url
    if not url:
        raise ConfigError("DATABASE_URL is not set (Supabase: Settings → Database → "
                          "Connection string, session mode)")
    check_database_url(url)
    try:
        applied = migrate(url, args.dir)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot connect: {first_line(exc)}") from None
    except psycopg.Error as exc:
        raise StoreRejected(f"the database refused a migration ({exc.sqlstate}): "
                            f"{first_line(exc)}; nothing was applied") from None
    for name in applied:
        print(f"✅ applied {name}")
    if not any(name[0].isdigit() for name in applied):
        print("✅ up to date: every migration is recorded in "
              "supabase_migrations.schema_migrations")
    return 0
