"""Applies the migrations in `supabase/migrations/` to a Postgres database.

On a database that is not Supabase it first creates what Supabase would have
provided (roles, auth.uid(), the realtime publication). Every file is
idempotent, so running this again changes nothing.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "supabase" / "migrations"
SCHEMA_VERSION = 1  # what agent_bridge_schema_version() returns after these migrations

_IS_SUPABASE = "select exists (select 1 from pg_roles where rolname = 'supabase_admin')"
_LOCK = "select pg_advisory_xact_lock(hashtext('agent-bridge migrate'))"


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise FileNotFoundError(f"no migrations in {directory}")
    return files


def compat_sql() -> str:
    return resources.files("bridge").joinpath("sql/supabase_compat.sql").read_text("utf-8")


def migrate(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply everything in one transaction; return what was applied, in order."""
    applied: list[str] = []
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        conn.execute(_LOCK)  # two `migrate`s at once take turns
        row = conn.execute(_IS_SUPABASE).fetchone()
        if not (row and row[0]):
            conn.execute(compat_sql().encode())  # a trusted file, run without parameters
            applied.append("supabase_compat.sql")
        for path in migration_files(directory):
            conn.execute(path.read_bytes())
            applied.append(path.name)
    return applied
