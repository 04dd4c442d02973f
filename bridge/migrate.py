"""Applies the migrations in `supabase/migrations/` to a Postgres database, and records
them in `supabase_migrations.schema_migrations` exactly as the Supabase CLI does.

The package carries the migrations as data, `bridge/migrations/`: in the repository that
is a symlink to `../supabase/migrations` (the one copy git keeps, where the Supabase CLI
looks), and a wheel holds the files themselves, so an installed `agent-bridge migrate`
needs no source tree.

On a database that is not Supabase it first creates what Supabase would have
provided (roles, auth.uid(), the realtime publication). A migration whose version
is already recorded (by this command or by `supabase db push`) is skipped, as the
CLI skips it, so the two tools agree in either order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

from bridge.errors import AgentBridgeError
from bridge.queries import Query, parse

# pip unpacks a wheel, and an editable install maps `bridge` to the source folder, so the
# package's files are on disk either way and a plain Path serves (no zip import support).
MIGRATIONS_DIR = Path(str(resources.files("bridge").joinpath("migrations")))
SCHEMA_VERSION = 9  # what agent_bridge_schema_version() returns after these migrations

_IS_SUPABASE = "select exists (select 1 from pg_roles where rolname = 'supabase_admin')"
_LOCK = "select pg_advisory_xact_lock(hashtext('agent-bridge migrate'))"
# The CLI's file name pattern (pkg/migration/file.go): `<version>_<name>.sql`.
_FILE = re.compile(r"^([0-9]+)_(.*)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def filename(self) -> str:
        return self.path.name


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    files = sorted(p for p in directory.glob("*.sql") if _FILE.match(p.name))
    if not files:
        raise FileNotFoundError(f"no migrations in {directory}")
    return files


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in migration_files(directory):
        match = _FILE.match(path.name)
        assert match is not None
        found.append(Migration(match[1], match[2], path))
    return found


@dataclass(frozen=True)
class Exported:
    filename: str
    copied: bool  # False: the folder already held this very file


class ExportConflict(AgentBridgeError, FileExistsError):
    """The target folder holds a different file under one of our names or versions."""


def export(target: Path, *, force: bool = False, directory: Path = MIGRATIONS_DIR
           ) -> list[Exported]:
    """Copy every migration file into `target` (created if missing), e.g. a Supabase
    project's `supabase/migrations`, where `supabase db push` applies them.

    Nothing is written if a file of the same name differs (unless `force`: then ours
    replaces it), or if another file has one of our versions: the CLI keys its history
    by version, so it would apply only one of the two."""
    if target.exists() and not target.is_dir():
        raise ExportConflict(f"{target} is not a folder")
    sources = migration_files(directory)
    ours = {_version(p.name): p.name for p in sources}
    existing = sorted(p.name for p in target.glob("*.sql")) if target.is_dir() else []
    clashes = [f"{name} has the version of our {ours[version]}; rename yours"
               for name in existing
               if (version := _version(name)) in ours and ours[version] != name]
    plan: list[tuple[Path, bytes, bool]] = []
    for path in sources:
        data, dest = path.read_bytes(), target / path.name
        same = dest.is_file() and dest.read_bytes() == data
        if dest.exists() and not same and not force:
            clashes.append(f"{path.name} exists and differs (--force replaces it)")
        plan.append((dest, data, not same))
    if clashes:
        raise ExportConflict(f"nothing copied into {target}: " + "; ".join(clashes))
    target.mkdir(parents=True, exist_ok=True)
    for dest, data, copy in plan:
        if copy:
            dest.write_bytes(data)
    return [Exported(dest.name, copy) for dest, _, copy in plan]


def _version(filename: str) -> str | None:
    match = _FILE.match(filename)
    return match[1] if match else None


def compat_sql() -> str:
    return resources.files("bridge").joinpath("sql/supabase_compat.sql").read_text("utf-8")


def _history() -> dict[str, Query]:
    text = resources.files("bridge").joinpath("sql/migrations.sql").read_text("utf-8")
    return parse(text, require_function=False)


def split_statements(text: str) -> list[str]:
    """A migration file's statements as the Supabase CLI splits them for its history
    (pkg/parser: split on `;` outside quotes, dollar quotes, comments, parentheses and
    BEGIN ATOMIC bodies; each trimmed of trailing `;` and white space; empty ones dropped;
    comments stay with the statement that follows them)."""
    statements: list[str] = []
    i, start, n = 0, 0, len(text)
    parens = atomic = 0
    while i < n:
        c = text[i]
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        if c in "'\"":
            i += 1
            while i < n:
                if text[i] == c and text.startswith(c * 2, i):
                    i += 2
                elif text[i] == c:
                    i += 1
                    break
                else:
                    i += 1
            continue
        if c == "$":
            tag = re.match(r"\$\w*\$", text[i:])
            if tag:
                end = text.find(tag[0], i + len(tag[0]))
                i = n if end < 0 else end + len(tag[0])
                continue
        if c == "\\":
            i += 2
            continue
        if c == "(":
            parens += 1
        elif c == ")" and parens:
            parens -= 1
        elif c in "cC" and i >= 5 and text[i - 5:i + 1].lower() == "atomic" \
                and text[i - 6:i - 5].isspace():
            atomic += 1
        elif c in "dD" and atomic and text[i - 2:i + 1].lower() == "end":
            atomic -= 1
        elif c == ";" and not parens and not atomic:
            statements.append(text[start:i + 1])
            start = i + 1
        i += 1
    statements.append(text[start:])
    return [s for s in (s.rstrip(";").strip() for s in statements) if s]


def applied_versions(conninfo: str) -> list[str]:
    """The versions recorded in supabase_migrations.schema_migrations ([] if none)."""
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        exists = conn.execute(
            "select to_regclass('supabase_migrations.schema_migrations') is not null").fetchone()
        if not (exists and exists[0]):
            return []
        return [r[0] for r in conn.execute(_history()["applied_versions"].sql).fetchall()]


def migrate(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply, in one transaction, every migration whose version is not recorded yet, and
    record each; return what was applied, in order."""
    history = _history()
    applied: list[str] = []
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        conn.execute(_LOCK)  # two `migrate`s at once take turns
        row = conn.execute(_IS_SUPABASE).fetchone()
        if not (row and row[0]):
            conn.execute(compat_sql().encode())  # a trusted file, run without parameters
            applied.append("supabase_compat.sql")
        conn.execute(history["create_history"].sql)
        done = {r[0] for r in conn.execute(history["applied_versions"].sql).fetchall()}
        for migration in migrations(directory):
            if migration.version in done:
                continue
            text = migration.path.read_text("utf-8")
            conn.execute(text.encode())
            conn.execute(history["record_version"].sql,
                         {"version": migration.version, "name": migration.name,
                          "statements": split_statements(text)})
            done.add(migration.version)
            applied.append(migration.filename)
        if len(applied) > 1 or applied[:1] != ["supabase_compat.sql"]:
            # Every run that applied a migration, not only the one whose file ends so.
            conn.execute(history["reload_schema"].sql)
    return applied
