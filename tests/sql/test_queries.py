"""The named queries in bridge/sql/queries.sql: each one parses, calls a function the
migration installed with exactly that function's argument names (the Supabase transport
sends them as rpc() keys), and is used by the store; no dead or dangling queries."""

from __future__ import annotations

import re

import psycopg
import pytest

from bridge.queries import Query, load
from tests.plans import explain_everything

QUERIES = load()


def input_arguments(db_url: str, function: str) -> list[list[str]]:
    """The input argument names of each public function called `function`."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select array(select a.name from unnest(p.proargnames, p.proargmodes::text[]) "
            "with ordinality a(name, mode, n) where coalesce(a.mode, 'i') in ('i', 'b', 'v') "
            "order by a.n) from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
            "where n.nspname = 'public' and p.proname = %s", [function]).fetchall()
    return [list(r[0]) for r in rows]




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


def test_claim_reads_only_the_rows_it_takes_after_a_burst(clean_db: str) -> None:
    """Statistics from a quiet table (50 rows), then a burst of 4,000: a claim of 50 reads
    no more of agent_task_requests than a few claims' worth. Its picked rows were once
    joined back to the table, which such statistics planned as a hash of every row, and of
    every pending row, at every claim (issue 23)."""
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("insert into public.agent_task_requests (request_payload) "
                     "select '{}' from generate_series(1, 50)")
        conn.execute("analyze public.agent_task_requests")
        conn.execute("insert into public.agent_task_requests (request_payload) "
                     "select '{}' from generate_series(1, 4000)")
        plans = explain_everything(conn)
        conn.execute("set auto_explain.log_analyze = on")
        claimed = conn.execute("select * from public.agent_tasks_claim("
                               "p_limit => 50, p_lease_seconds => 30)").fetchall()
    assert len(claimed) == 50
    nested = [p for p in plans if "agent_task_requests" in p and "agent_tasks_claim" not in p]
    assert nested, plans
    # every plan node that reads the table, with the rows it returned
    reads = [(line.strip(), int(m.group(1))) for p in nested for line in p.splitlines()
             if " on agent_task_requests" in line
             and (m := re.search(r"actual time=\S+ rows=(\d+)", line))]
    assert reads, nested
    assert max(rows for _, rows in reads) <= 200, "\n".join(
        f"{rows}: {line}" for line, rows in reads if rows > 200)
