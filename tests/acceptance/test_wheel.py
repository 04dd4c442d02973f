"""The package as a user installs it: a wheel built from this tree (`pip wheel`, not `-e`),
installed with its dependencies into a fresh venv, runs from a folder outside the
repository (so nothing is imported from the source tree): `agent-bridge migrate` finds
its SQL inside the package, a Celery worker and `agent-bridge run --once` carry one task
to `completed`, `migrations export` hands out the files, and `dev` runs its demo.

The wheel is built from a copy of the working tree, so the build's `build/` folder never
lands in the repository and two runs cannot race in it. pip reuses the machine's cache;
the first run on a new machine downloads the dependencies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from bridge.migrate import SCHEMA_VERSION, migration_files
from tests.commands import env_with, interrupt, leftovers, wait_for
from tests.stack import REPO, Proc

# What a build does not need, or must not see (a stale build/ would be packaged).
NOT_BUILT = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", "build", "dist", "*.egg-info", ".agent-bridge", ".env", "results")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path
    outside: Path  # a folder outside the repository, the processes' cwd

    def run(self, *args: str, env: dict[str, str], timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], env=env, cwd=self.outside,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)


def _check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_BUILT)
    pip_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _check(subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q",
         "-w", str(base / "dist")], capture_output=True, text=True, timeout=300,
        env=pip_env))
    (wheel,) = (base / "dist").glob("agent_bridge-*.whl")
    venv = base / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                          text=True, timeout=120, env=pip_env))
    # `local`: embedded PostgreSQL and Redis, for `agent-bridge dev`.
    _check(subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[local]"],
        capture_output=True, text=True, timeout=600, env=pip_env))
    outside = base / "elsewhere"
    outside.mkdir()
    return Installed(wheel, venv / "bin", outside)


def wheel_env(**values: str) -> dict[str, str]:
    """The test's environment without the repository on the import path."""
    env = env_with(PYTHONUNBUFFERED="1", **values)
    env.pop("PYTHONPATH", None)
    return env


def test_the_wheel_holds_the_migrations_and_no_source_tree(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        for path in migration_files():
            assert wheel.read(f"bridge/migrations/{path.name}") == path.read_bytes()
    assert "bridge/sql/supabase_compat.sql" in names
    assert not [n for n in names if n.startswith(("supabase/", "tests/", "bench/"))]

    # The venv imports the installed copies, not the repository's.
    where = _check(installed.run(
        "python", "-c", "import bridge, tasks, bridge.migrate as m; "
        "print(bridge.__file__); print(tasks.__file__); print(m.MIGRATIONS_DIR)",
        env=wheel_env()))
    site = installed.bin.parent / "lib"
    for line in where.stdout.splitlines():
        assert Path(line).is_relative_to(site), where.stdout
        assert not Path(line).resolve().is_relative_to(REPO), where.stdout


@pytest.fixture
def worker(installed: Installed, fresh_db: str, clean_redis: str, tmp_path: Path
           ) -> Iterator[Proc]:
    """`celery -A tasks worker` of the venv, on the fresh database and Redis."""
    env = wheel_env(DATABASE_URL=fresh_db, REDIS_URL=clean_redis, BRIDGE_TRANSPORT="postgres",
                    AGENT_SIMULATED_SECONDS="0.1", LOG_LEVEL="INFO")
    proc = Proc("worker", [str(installed.bin / "celery"), "-A", "tasks", "worker", "-P",
                           "prefork", "-c", "1", "-n", f"wheel-{os.getpid()}@%h",
                           "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
                env, tmp_path / "worker.log")
    try:
        yield proc
    finally:
        proc.stop()


def test_the_installed_wheel_migrates_and_runs_a_task(installed: Installed, fresh_db: str,
                                                      clean_redis: str, worker: Proc) -> None:
    env = wheel_env(DATABASE_URL=fresh_db, REDIS_URL=clean_redis, BRIDGE_TRANSPORT="postgres",
                    AGENT_SIMULATED_SECONDS="0.1")
    migrated = _check(installed.run("agent-bridge", "migrate", env=env))
    assert migrated.stdout.splitlines() == [
        f"✅ applied {name}" for name in
        ["supabase_compat.sql", *(p.name for p in migration_files())]]
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("select public.agent_bridge_schema_version()").fetchone() == (
            SCHEMA_VERSION,)

    task_id = _check(installed.run("agent-bridge", "submit", "Hello from a wheel",
                                   env=env)).stdout.strip()
    worker.wait_for_output(" ready.", 60)
    _check(installed.run("agent-bridge", "run", "--once", env=env))  # claim and enqueue
    deadline = time.monotonic() + 60
    row: tuple[str, object] | None = None
    while time.monotonic() < deadline:
        with psycopg.connect(fresh_db) as conn:
            row = conn.execute("select status, response_payload from public.agent_task_requests"
                               " where id = %s", [task_id]).fetchone()
        if row is not None and row[0] in ("completed", "failed"):
            break
        time.sleep(0.2)
    assert row is not None and row[0] == "completed", f"{row}\n{worker.output}"
    assert "Hello from a wheel" in str(row[1])


def test_the_installed_wheel_exports_the_migrations(installed: Installed) -> None:
    target = installed.outside / "project" / "supabase" / "migrations"
    _check(installed.run("agent-bridge", "migrations", "export", str(target), env=wheel_env()))
    exported = sorted(target.iterdir())
    assert [p.name for p in exported] == [p.name for p in migration_files()]
    for path in exported:
        assert path.read_bytes() == (REPO / "supabase" / "migrations" / path.name).read_bytes()


def test_the_installed_wheel_runs_dev(installed: Installed, tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    log = tmp_path / "dev.log"
    env = wheel_env(AGENT_SIMULATED_SECONDS="0.2")
    proc = subprocess.Popen([str(installed.bin / "agent-bridge"), "dev", "--demo",
                             "--data-dir", str(data_dir), "--flower-port", "0"],
                            cwd=installed.outside, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(log, "demo finished", proc)
    finally:
        code = interrupt(proc)
    out = log.read_text()
    assert code == 0, out
    assert out.count("→ completed") == 3, out
    assert leftovers(data_dir) == []
