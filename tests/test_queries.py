"""The named queries in bridge/sql/queries.sql: each one parses, calls a function the
migration installed with exactly that function's argument names (the Supabase transport
sends them as rpc() keys), and is used by the store; no dead or dangling queries."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

import bridge.store
import bridge.store.supabase
from bridge.queries import Query, load, load_rows
from tests.plans import explain_everything

QUERIES = load()
STORE_SOURCE = Path(bridge.store.__file__).read_text(encoding="utf-8")


def input_arguments(db_url: str, function: str) -> list[list[str]]:
    """The input argument names of each public function called `function`."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select array(select a.name from unnest(p.proargnames, p.proargmodes::text[]) "
            "with ordinality a(name, mode, n) where coalesce(a.mode, 'i') in ('i', 'b', 'v') "
            "order by a.n) from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
            "where n.nspname = 'public' and p.proname = %s", [function]).fetchall()
    return [list(r[0]) for r in rows]


def test_every_query_loaded() -> None:
    """The file parses into the blocks the store needs, each with a description."""
    assert set(QUERIES) == {"claim", "start", "heartbeat", "progress", "append", "complete", "fail",
                            "schedule_retry", "release", "rescue", "requeue", "stats",
                            "schema_version", "cancel", "request_cancel", "cancelled",
                            "cancel_requested", "register_agents", "agent_stats", "prune"}
    for q in QUERIES.values():
        assert q.description and not q.description.startswith("select")
        assert q.sql.startswith("select ") and ";" not in q.sql


@pytest.mark.parametrize("query", QUERIES.values(), ids=list(QUERIES))
def test_query_calls_an_existing_function_with_its_argument_names(
        db_url: str, query: Query) -> None:
    """A named argument the function does not have would break only the rpc() path."""
    named = re.findall(r"\b(\w+) => %\((\w+)\)s", query.sql)
    assert all(arg == placeholder for arg, placeholder in named)
    assert [arg for arg, _ in named] == re.findall(r"%\((\w+)\)s", query.sql)
    signatures = input_arguments(db_url, query.function)
    assert signatures, f"{query.function} is not in the migrated database"
    assert [arg for arg, _ in named] in signatures


@pytest.mark.parametrize("name", list(QUERIES))
def test_query_is_used_by_the_store(name: str) -> None:
    """A query the store never runs is dead code that would drift from the SQL."""
    assert f'"{name}"' in STORE_SOURCE


ROWS = load_rows()


def test_row_operations_loaded_and_used() -> None:
    """The row operations of sql/rows.sql: plain SQL, no rpc() name, each run by the store
    and (but for the catalog read) by the Supabase transport's table API too."""
    assert set(ROWS) == {"insert_task", "get_task", "installed", "show_task",
                         "latest_failures"}
    supabase_source = Path(bridge.store.supabase.__file__).read_text(encoding="utf-8")
    for q in ROWS.values():
        assert q.description and q.function == ""
        assert f'"{q.name}"' in STORE_SOURCE
        if q.name != "installed":
            assert f'"{q.name}"' in supabase_source


def test_claim_itself_does_not_scan_the_table(clean_db: str) -> None:
    """The plans of the statements agent_tasks_claim runs (auto_explain, nested
    statements included), with 20,000 finished rows beside 20 due ones: none reads
    agent_task_requests from end to end. (An EXPLAIN of a hand-copied query would not
    notice the function drifting from it.)"""
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("insert into public.agent_task_requests (status, request_payload, "
                     "finished_at) select 'completed', '{}', now() "
                     "from generate_series(1, 20000)")
        conn.execute("insert into public.agent_task_requests (request_payload) "
                     "select '{}' from generate_series(1, 20)")
        conn.execute("analyze public.agent_task_requests")
        plans = explain_everything(conn)
        claimed = conn.execute("select * from public.agent_tasks_claim("
                               "p_limit => 10, p_lease_seconds => 30)").fetchall()
    assert len(claimed) == 10
    nested = [p for p in plans if "agent_task_requests" in p and "agent_tasks_claim" not in p]
    assert nested, plans  # the function's own statements were explained
    scans = [p for p in nested if re.search(r"Seq Scan on agent_task_requests\b", p)]
    assert not scans, "\n\n".join(scans)
