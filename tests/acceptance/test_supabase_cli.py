"""The real Supabase CLI (npm `supabase`, pinned) and `agent-bridge migrate` agree: `supabase
db push --db-url` applies every migration on a fresh database, `agent-bridge migrate` then
applies nothing more, `supabase migration list` shows every file in order, and the schema is
the one `agent-bridge migrate` builds; and the other way round. `db push --db-url` needs no
Docker. Skipped, saying why, where npm or the package is unavailable (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bridge.migrate import MIGRATIONS_DIR, migrate, migration_files
from tests.db import PgServer
from tests.schema import schema_dump
from tests.supabase_cli import supabase, with_compat


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder holding a copy of the migrations (the CLI writes supabase/.temp)."""
    shutil.copytree(MIGRATIONS_DIR, tmp_path / "supabase" / "migrations")
    return tmp_path






def listed(cli: Path, project: Path, url: str) -> list[tuple[str, str]]:
    out = supabase(cli, project, "migration", "list", "--db-url", url, "--output-format", "json")
    return [(m["local"], m["remote"]) for m in json.loads(out.stdout)["migrations"]]


VERSIONS = [p.name.partition("_")[0] for p in migration_files()]


def test_db_push_then_migrate_applies_nothing(supabase_cli: Path, project: Path, fresh_db: str,
                                              pg_server: PgServer) -> None:
    pushed = supabase(supabase_cli, project, "db", "push", "--db-url", with_compat(fresh_db),
                      "--yes")
    applying = [line.removeprefix("Applying migration ").removesuffix("...")
                for line in (pushed.stdout + pushed.stderr).splitlines()
                if line.startswith("Applying migration")]
    assert applying == [p.name for p in migration_files()], pushed.stdout + pushed.stderr
    assert migrate(fresh_db) == ["supabase_compat.sql"]  # every version already recorded
    assert listed(supabase_cli, project, fresh_db) == [(v, v) for v in VERSIONS]

    by_migrate = pg_server.create_database()
    try:
        migrate(by_migrate)
        assert schema_dump(fresh_db) == schema_dump(by_migrate)
    finally:
        pg_server.drop_database(by_migrate)


def test_migrate_then_db_push_applies_nothing(supabase_cli: Path, project: Path,
                                              fresh_db: str) -> None:
    migrate(fresh_db)
    again = supabase(supabase_cli, project, "db", "push", "--db-url", fresh_db, "--yes")
    assert again.stdout.strip().splitlines()[-1] == "Remote database is up to date."
    assert listed(supabase_cli, project, fresh_db) == [(v, v) for v in VERSIONS]
