"""The migration: idempotent, and a safe upgrade of the integration guide's table with
live rows in it; plus the table-level behaviour it installs (checks, triggers, index,
NOTIFY, realtime)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from bridge.migrate import (
    SCHEMA_VERSION,
    applied_versions,
    migrate,
    migration_files,
    split_statements,
)
from tests.db import sql
from tests.plans import explain_everything
from tests.schema import GUIDE_TABLE, schema_dump


def test_second_migration_changes_nothing(fresh_db: str) -> None:
    """`agent-bridge migrate` is safe to run on every deploy."""
    assert migrate(fresh_db) == ["supabase_compat.sql", *(p.name for p in migration_files())]
    first = schema_dump(fresh_db)
    assert first["functions"] and first["policies"] and first["triggers"]
    assert migrate(fresh_db) == ["supabase_compat.sql"]  # every version already recorded
    assert schema_dump(fresh_db) == first


# The Supabase CLI's migration history (supabase/cli pkg/migration/history.go, file.go).
def test_history_is_recorded_as_the_supabase_cli_records_it(fresh_db: str) -> None:
    """After `agent-bridge migrate`, `supabase migration list` sees every migration as
    applied remotely: one row per file, (version, name, statements) as the CLI writes them."""
    migrate(fresh_db)
    columns = sql(fresh_db, """
        select column_name, data_type, is_nullable from information_schema.columns
         where table_schema = 'supabase_migrations' and table_name = 'schema_migrations'
         order by ordinal_position""")
    assert columns == [("version", "text", "NO"), ("statements", "ARRAY", "YES"),
                       ("name", "text", "YES")]
    assert sql(fresh_db, """select a.attname from pg_index i join pg_attribute a
                             on a.attrelid = i.indrelid and a.attnum = any (i.indkey)
                            where i.indrelid = 'supabase_migrations.schema_migrations'::regclass
                              and i.indisprimary""") == [("version",)]
    rows = sql(fresh_db, "select version, name, statements "
                         "from supabase_migrations.schema_migrations order by version")
    expected = [(p.name.split("_", 1)[0], p.name.split("_", 1)[1].removesuffix(".sql"),
                 split_statements(p.read_text("utf-8"))) for p in migration_files()]
    assert rows == expected
    assert applied_versions(fresh_db) == [v for v, _, _ in expected]
    # What the real CLI then sees (db push, migration list): tests/acceptance/test_supabase_cli.py.


def test_migrate_applies_only_the_versions_the_cli_has_not(fresh_db: str, tmp_path: Path
                                                           ) -> None:
    """A history with the first version only (an older deploy): migrate applies the rest."""
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(migration_files()[0], first)
    assert migrate(fresh_db, first) == ["supabase_compat.sql", migration_files()[0].name]
    assert migrate(fresh_db) == ["supabase_compat.sql",
                                 *(p.name for p in migration_files()[1:])]




def test_no_function_is_overloaded(fresh_db: str) -> None:
    """PostgREST answers PGRST203 for an rpc() name with two signatures, so a later
    migration that changes a signature must drop the old one: no public function name
    may have more than one overload after every migration ran."""
    migrate(fresh_db)
    assert sql(fresh_db, """
        select p.proname, array_agg(p.oid::regprocedure::text)
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public' group by p.proname having count(*) > 1""") == []


def test_last_migration_reloads_postgrest_schema_cache(fresh_db: str) -> None:
    """The newest migration ends with `notify pgrst, 'reload schema'`."""
    last = migration_files()[-1].read_text("utf-8")
    assert split_statements(last)[-1].endswith("notify pgrst, 'reload schema'")
    with psycopg.connect(fresh_db, autocommit=True) as listener:
        listener.execute("listen pgrst")
        migrate(fresh_db)
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert payloads == ["reload schema"]


@pytest.fixture
def upgraded(fresh_db: str) -> dict[str, str]:
    """The guide's table with one row in each state the guide's code leaves, then migrated."""
    sql(fresh_db, GUIDE_TABLE)
    ids: dict[str, str] = {}
    for name, status, payload in [("pending", "pending", {"prompt": "waiting"}),
                                  ("processing", "processing", {"prompt": "running"}),
                                  ("completed", "completed", {"prompt": "done"}),
                                  ("array", "pending", ["not", "an", "object"])]:
        [(ids[name],)] = sql(fresh_db, "insert into agent_task_requests (status, request_payload)"
                                       " values (%s, %s) returning id::text",
                             [status, Jsonb(payload)])
    sql(fresh_db, "update agent_task_requests set response_payload = '{\"answer\": 1}', "
                  "updated_at = now() - interval '1 day' where id = %s", [ids["completed"]])
    migrate(fresh_db)
    ids["url"] = fresh_db
    return ids


def test_upgrade_keeps_rows_and_carries_on(upgraded: dict[str, str]) -> None:
    """Existing rows survive with their state, and the new machinery picks them up."""
    url = upgraded["url"]
    rows = {r[0]: r[1:] for r in sql(
        url, "select id::text, status, request_payload, response_payload, finished_at, "
             "lease_expires_at, attempts, updated_at from public.agent_task_requests")}
    assert len(rows) == 4
    assert rows[upgraded["array"]][:2] == ("pending", ["not", "an", "object"])
    status, _, response, finished, _, _, updated = rows[upgraded["completed"]]
    assert (status, response, finished) == ("completed", {"answer": 1}, updated)
    assert rows[upgraded["processing"]][4] is not None  # a lease, so rescue can recover it
    assert rows[upgraded["pending"]][3:6] == (None, None, 0)

    claimed = dict(sql(url, "select id::text, attempt from public.agent_tasks_claim(10, 30)"))
    assert claimed == {upgraded["pending"]: 1, upgraded["array"]: 1}
    [(old_style,)] = sql(url, "insert into agent_task_requests (status, request_payload) "
                              "values ('pending', '{\"prompt\":\"x\"}') returning id::text")
    assert sql(url, "select id::text from public.agent_tasks_claim(10, 30)") == [(old_style,)]
    assert sql(url, "select public.agent_bridge_schema_version()") == [(SCHEMA_VERSION,)]
    migrate(url)  # and again on the upgraded table
    assert len(sql(url, "select 1 from public.agent_task_requests")) == 5


def test_guide_worker_can_still_finish_its_rows(upgraded: dict[str, str]) -> None:
    """During a rolling upgrade the guide's own worker, which writes status directly,
    can finish the row it holds and take new ones without breaking the constraints."""
    url = upgraded["url"]
    [(finished, lease)] = sql(
        url, "update agent_task_requests set status = 'completed', "
             "response_payload = '{\"answer\": 2}' where id = %s "
             "returning finished_at, lease_expires_at", [upgraded["processing"]])
    assert finished is not None and lease is None
    [(lease,)] = sql(url, "update agent_task_requests set status = 'processing' where id = %s "
                          "returning lease_expires_at", [upgraded["pending"]])
    assert lease is not None  # so rescue recovers the row if that worker dies
    [(finished, lease)] = sql(
        url, "update agent_task_requests set status = 'failed', response_payload = "
             "'{\"error\": \"x\"}' where id = %s returning finished_at, lease_expires_at",
        [upgraded["pending"]])
    assert finished is not None and lease is None


def test_request_payload_checks(upgraded: dict[str, str]) -> None:
    """Inserts that the worker could not use are refused with a message saying why."""
    url = upgraded["url"]
    with pytest.raises(errors.InvalidParameterValue,
                       match=r"request_payload must be a JSON object such as .*got array"):
        sql(url, "insert into agent_task_requests (request_payload) values ('[1]')")
    with pytest.raises(errors.InvalidParameterValue, match="got string"):
        sql(url, "insert into agent_task_requests (request_payload) values ('\"hi\"')")
    big = Jsonb({"prompt": "x" * (1024 * 1024)})
    [(status, error)] = sql(url, "insert into agent_task_requests (request_payload) values (%s) "
                                 "returning status, error", [big])
    assert (status, error["type"]) == ("failed", "InvalidRequest")  # stored failed, counted
    assert re.fullmatch(r"request_payload is \d+ bytes; the limit is 1048576 bytes",
                        error["message"])
    with pytest.raises(errors.InvalidParameterValue):
        sql(url, "update agent_task_requests set request_payload = '3' where id = %s",
            [upgraded["pending"]])


def test_updated_at_trigger(upgraded: dict[str, str]) -> None:
    """updated_at follows every change, as the guide's frontend expects."""
    url = upgraded["url"]
    [(before,)] = sql(url, "select updated_at from agent_task_requests where id = %s",
                      [upgraded["completed"]])
    [(after,)] = sql(url, "update agent_task_requests set priority = 1 where id = %s "
                          "returning updated_at", [upgraded["completed"]])
    assert after > before


def test_insert_notifies_listeners(upgraded: dict[str, str]) -> None:
    """A new pending row wakes a LISTENing bridge with its id."""
    url = upgraded["url"]
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("listen agent_task_requests")
        [(task_id,)] = sql(url, "insert into agent_task_requests (request_payload) "
                                "values ('{\"prompt\": \"wake\"}') returning id::text")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert got == [("agent_task_requests", task_id)]


def test_claim_reads_the_partial_index(upgraded: dict[str, str]) -> None:
    """With many finished rows, finding due work must not scan the table: every statement
    agent_tasks_claim runs (seen through auto_explain) reads agent_task_requests by index."""
    url = upgraded["url"]
    sql(url, "insert into agent_task_requests (status, request_payload, finished_at) "
             "select 'completed', '{}', now() from generate_series(1, 20000)")
    sql(url, "insert into agent_task_requests (request_payload, enterprise_id) "
             "select '{}', 'tenant-' || (g % 5) from generate_series(1, 20) g")
    sql(url, "analyze agent_task_requests")
    with psycopg.connect(url, autocommit=True) as conn:
        plans = explain_everything(conn)
        assert len(conn.execute("select * from public.agent_tasks_claim(10, 30)").fetchall()) == 10
    statements = [p for p in plans if "agent_task_requests" in p]
    assert statements and "agent_task_requests_tenant_claim_idx" in "".join(statements)
    assert not [p for p in statements if "Seq Scan on agent_task_requests" in p]


def test_realtime_publication_and_version(fresh_db: str) -> None:
    """The guide's frontend subscribes through supabase_realtime."""
    migrate(fresh_db)
    assert sql(fresh_db, "select schemaname, tablename from pg_publication_tables "
                         "where pubname = 'supabase_realtime' order by tablename") == [
        ("public", "agent_task_chunks"), ("public", "agent_task_requests")]
    assert sql(fresh_db, "select public.agent_bridge_schema_version()") == [(SCHEMA_VERSION,)]
