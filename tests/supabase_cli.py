"""The real Supabase CLI, installed from npm into a cache, and how tests run it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg

from bridge.migrate import compat_sql


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



SUPABASE_CLI = "2.117.0"

