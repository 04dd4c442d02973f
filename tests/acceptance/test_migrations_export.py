"""The migrations ship inside the package (`bridge/migrations`, one copy in git: a symlink
to supabase/migrations), and `agent-bridge migrations export DIR` hands them to a Supabase
project: the real Supabase CLI's `db push` applies the exported folder, after which
`agent-bridge migrate` has nothing left to do. Export never overwrites a different file
unless told to, and refuses a file that reuses one of our versions."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import psycopg

from bridge.migrate import MIGRATIONS_DIR, SCHEMA_VERSION, migrate, migration_files
from tests.stack import REPO
from tests.supabase_cli import supabase, with_compat

AGENT_BRIDGE = Path(sys.executable).parent / "agent-bridge"


def export(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AGENT_BRIDGE), "migrations", "export", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.sql"))


def test_the_package_data_is_the_supabase_folder() -> None:
    """One source of truth: the package's folder is a symlink to supabase/migrations, and
    MIGRATIONS_DIR is found through importlib.resources (so also inside a wheel)."""
    assert (REPO / "bridge" / "migrations").is_symlink()
    assert os.readlink(REPO / "bridge" / "migrations") == "../supabase/migrations"
    assert not (REPO / "supabase" / "migrations").is_symlink()
    assert resources.files("bridge").joinpath("migrations").is_dir()
    assert MIGRATIONS_DIR == REPO / "bridge" / "migrations"  # this editable install
    assert [p.name for p in migration_files()] == names(REPO / "supabase" / "migrations")


def test_export_then_supabase_db_push_applies_them(supabase_cli: Path, fresh_db: str,
                                                  tmp_path: Path) -> None:
    """A Supabase user's project: export into its (not yet existing) supabase/migrations,
    `supabase db push`, and the database is what `agent-bridge migrate` would build."""
    result = export("supabase/migrations", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = [p.name for p in migration_files()]
    assert result.stdout.splitlines()[:-1] == [f"✅ copied {name}" for name in ours]
    assert result.stdout.splitlines()[-1].startswith(f"➡️  {len(ours)} of {len(ours)} files")
    exported = tmp_path / "supabase" / "migrations"
    assert names(exported) == ours
    for name in ours:
        assert (exported / name).read_bytes() == (MIGRATIONS_DIR / name).read_bytes()

    # The compat SQL stands in for what a Supabase project already has (roles, auth.uid()).
    pushed = supabase(supabase_cli, tmp_path, "db", "push", "--db-url", with_compat(fresh_db),
                      "--yes")
    applying = [line.removeprefix("Applying migration ").removesuffix("...")
                for line in (pushed.stdout + pushed.stderr).splitlines()
                if line.startswith("Applying migration")]
    assert applying == ours, pushed.stdout + pushed.stderr
    assert migrate(fresh_db) == ["supabase_compat.sql"]  # every version already recorded
    with psycopg.connect(fresh_db) as conn:
        row = conn.execute("select public.agent_bridge_schema_version()").fetchone()
    assert row == (SCHEMA_VERSION,)


def test_export_keeps_a_different_file_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "migrations"
    first = export(str(target), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ours = names(target)

    again = export(str(target), cwd=tmp_path)  # identical files: nothing to do
    assert again.returncode == 0
    assert again.stdout.splitlines()[0] == f"✅ {len(ours)} already there, unchanged"

    edited = target / ours[1]
    edited.write_text("-- my own edit\n")
    refused = export(str(target), cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"agent-bridge migrations: nothing copied into {target}: {ours[1]} exists and "
        f"differs (--force replaces it)")
    assert "Traceback" not in refused.stderr
    assert edited.read_text() == "-- my own edit\n"

    forced = export(str(target), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.splitlines()[0] == f"✅ copied {ours[1]}"
    assert edited.read_bytes() == (MIGRATIONS_DIR / ours[1]).read_bytes()


def test_export_refuses_a_file_that_reuses_our_version(tmp_path: Path) -> None:
    """The CLI keys its history by version: two files of one version would apply one."""
    first = migration_files()[0].name
    version = first.partition("_")[0]
    (tmp_path / f"{version}_mine.sql").write_text("select 1;\n")
    for args in ([str(tmp_path)], [str(tmp_path), "--force"]):
        result = export(*args, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"agent-bridge migrations: nothing copied into {tmp_path}: {version}_mine.sql "
            f"has the version of our {first}; rename yours")
    assert names(tmp_path) == [f"{version}_mine.sql"]


def test_export_into_a_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "not-a-folder"
    path.write_text("")
    result = export(str(path), cwd=tmp_path)
    assert (result.returncode, result.stderr.strip()) == (
        1, f"agent-bridge migrations: {path} is not a folder")
