"""The real Supabase CLI (npm `supabase`, pinned) and `agent-bridge migrate` agree: `supabase
db push --db-url` applies every migration on a fresh database, `agent-bridge migrate` then
applies nothing more, `supabase migration list` shows every file in order, and the schema is
the one `agent-bridge migrate` builds; and the other way round. `db push --db-url` needs no
Docker. Skipped, saying why, where npm or the package is unavailable (offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from bridge.migrate import MIGRATIONS_DIR, compat_sql, migrate, migration_files
from tests.db import PgServer
from tests.test_migration import schema_dump

SUPABASE_CLI = "2.117.0"


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


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder holding a copy of the migrations (the CLI writes supabase/.temp)."""
    shutil.copytree(MIGRATIONS_DIR, tmp_path / "supabase" / "migrations")
    return tmp_path


def supabase(cli: Path, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(cli), *args, "--workdir", str(project)], cwd=project,
                            capture_output=True, text=True, timeout=180,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def with_compat(url: str) -> str:
    """What a Supabase project has before any migration (roles, auth.uid(), the
    publication), as `agent-bridge migrate` creates it on a plain PostgreSQL."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(compat_sql().encode())
    return url


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
