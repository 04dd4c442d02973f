"""Retention (issue 20): with real processes (a bridge, workers, the stand-ins). The SQL side
is tests/sql/test_retention.py."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import ConfigError, Settings
from bridge.store import TaskStore
from tests.commands import cli, env_with
from tests.db import insert_rows, sql
from tests.fakes.postgrest import SERVICE_KEY
from tests.stack import Stack


def ids(db_url: str) -> set[str]:
    return {str(r[0]) for r in sql(db_url, "select id from public.agent_task_requests")}
































def test_the_bridge_prunes_when_enabled(store: TaskStore, env: dict[str, Any], clean_db: str,
                                        stack: Stack) -> None:
    """`agent-bridge run` with the default AGENT_RETENTION_DAYS (30), over each transport:
    old finished rows go, recent and unfinished ones stay (the bridge claims the pending
    one; no worker runs it)."""
    old = insert_rows(clean_db, "completed", "40 days", count=3)
    old += insert_rows(clean_db, "failed", "35 days")
    kept = insert_rows(clean_db, "completed", "2 days")
    kept += insert_rows(clean_db, "pending", "60 days")
    bridge = stack.bridge(LEASE_SECONDS="60", **env)
    stack.wait_for("the old rows to go", lambda: not set(old) & ids(clean_db))
    bridge.wait_for_output("🧹 Pruned 4 finished tasks older than 30 days")
    assert "action=pruned" in bridge.output
    assert ids(clean_db) == set(kept)


def test_prune_command_refuses_bad_ages() -> None:
    for age in ("0", "0d", "-3d", "7 days", "soon"):
        result = cli("prune", "--older-than", age, env=env_with())
        assert result.returncode == 2 and "--older-than" in result.stderr, age
    assert cli("prune", "--batch", "10001", env=env_with()).returncode == 2
    with pytest.raises(ConfigError, match="AGENT_RETENTION_DAYS"):
        Settings.from_env({"AGENT_RETENTION_DAYS": "-1"})



# The command --------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["postgres", "supabase"])
def test_prune_command_dry_run_then_prune(transport: str, clean_db: str,
                                          request: pytest.FixtureRequest) -> None:
    env = env_with(DATABASE_URL=clean_db)
    if transport == "supabase":
        env = env_with(BRIDGE_TRANSPORT="supabase",
                       SUPABASE_URL=request.getfixturevalue("postgrest"),
                       SUPABASE_SERVICE_KEY=SERVICE_KEY)
    old = insert_rows(clean_db, "completed", "8 days") + insert_rows(clean_db, "failed", "20 days")
    kept = insert_rows(clean_db, "completed", "6 days")
    kept += insert_rows(clean_db, "pending", "90 days")

    dry = cli("prune", "--older-than", "7d", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "🧹 Would delete 2 finished tasks older than 7 days"
    assert ids(clean_db) == {*old, *kept}

    done = cli("prune", "--older-than", "168h", "--batch", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "🧹 Pruned 2 finished tasks older than 7 days"
    assert ids(clean_db) == set(kept)

    # The default age is AGENT_RETENTION_DAYS (30 unless set).
    assert cli("prune", "--dry-run", env=env).stdout.strip() == (
        "🧹 Would delete 0 finished tasks older than 30 days")
    assert cli("prune", "--dry-run", env={**env, "AGENT_RETENTION_DAYS": "5"}
               ).stdout.strip() == "🧹 Would delete 1 finished task older than 5 days"


def test_zero_keeps_everything(clean_db: str, tmp_path: Any, clean_redis: str) -> None:
    old = insert_rows(clean_db, "completed", "400 days")
    env = env_with(DATABASE_URL=clean_db, AGENT_RETENTION_DAYS="0")
    result = cli("prune", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("ℹ️  AGENT_RETENTION_DAYS=0 keeps every task: nothing "
                                     "pruned. Pass --older-than AGE to prune anyway.")
    assert ids(clean_db) == set(old)
    assert Settings.from_env({"AGENT_RETENTION_DAYS": "0"}).retention_days == 0

    # A bridge with retention off says so, and starts no retention thread.
    stack = Stack(clean_db, clean_redis, tmp_path)
    try:
        bridge = stack.bridge(AGENT_RETENTION_DAYS="0")
        assert "🧹 Retention off (AGENT_RETENTION_DAYS=0)" in bridge.output
        assert "🧹 Retention: finished tasks older than" not in bridge.output
    finally:
        stack.stop_all()
    assert ids(clean_db) == set(old)

