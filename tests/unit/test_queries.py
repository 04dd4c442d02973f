"""The named queries in bridge/sql/queries.sql: each one parses, calls a function the
migration installed with exactly that function's argument names (the Supabase transport
sends them as rpc() keys), and is used by the store; no dead or dangling queries."""

from __future__ import annotations

from pathlib import Path

import pytest

import bridge.store
import bridge.store.supabase
from bridge.queries import load, load_rows

QUERIES = load()
# The store package: the transports run a few queries of their own (the Supabase
# transport's Broadcast question).
STORE_SOURCE = "".join(p.read_text(encoding="utf-8")
                       for p in sorted(Path(bridge.store.__file__).parent.glob("*.py")))




def test_every_query_loaded() -> None:
    """The file parses into the blocks the store needs, each with a description."""
    assert set(QUERIES) == {"claim", "start", "bind", "heartbeat", "progress", "append",
                            "complete", "fail", "schedule_retry", "release", "rescue",
                            "requeue", "stats", "schema_version", "cancel", "request_cancel",
                            "cancelled", "cancel_requested", "register_agents", "agent_stats",
                            "prune", "write_batch", "broadcasting", "report_usage",
                            "tenants_usage", "usage_totals", "wait", "answers"}
    for q in QUERIES.values():
        assert q.description and not q.description.startswith("select")
        assert q.sql.startswith("select ") and ";" not in q.sql




@pytest.mark.parametrize("name", list(QUERIES))
def test_query_is_used_by_the_store(name: str) -> None:
    """A query the store never runs is dead code that would drift from the SQL."""
    assert f'"{name}"' in STORE_SOURCE


ROWS = load_rows()


def test_row_operations_loaded_and_used() -> None:
    """The row operations of sql/rows.sql: plain SQL, no rpc() name, each run by the store
    and (but for the catalog read) by the Supabase transport's table API too."""
    assert set(ROWS) == {"insert_task", "get_task", "installed", "show_task",
                         "latest_failures", "find_ids", "get_chunks", "insert_keyed_task",
                         "keyed_task"}
    supabase_source = Path(bridge.store.supabase.__file__).read_text(encoding="utf-8")
    for q in ROWS.values():
        assert q.description and q.function == ""
        assert f'"{q.name}"' in STORE_SOURCE
        if q.name != "installed":
            assert f'"{q.name}"' in supabase_source


