"""One seam per driver: each transport runs every named query (state functions and row
operations alike) and classifies its driver's errors in one place, by SQLSTATE or
PostgREST code, not by exception class."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from bridge.config import Settings
from bridge.errors import StoreRejected, StoreUnavailable
from bridge.queries import Query
from bridge.store import TaskStore, open_store, request_payload
from bridge.store.postgres import PostgresTransport
from tests.fakes.postgrest import SERVICE_KEY


def run_sql(db_url: str, statement: str) -> Exception:
    transport = PostgresTransport(db_url, pool=False)
    try:
        transport.call(Query("probe", "", statement, ""), {})
    except (StoreRejected, StoreUnavailable) as exc:
        return exc
    finally:
        transport.close()
    raise AssertionError("the statement did not fail")


def test_program_limit_is_permanent_though_psycopg_calls_it_operational(db_url: str) -> None:
    """54000 arrives as psycopg.OperationalError, yet retrying cannot help."""
    exc = run_sql(db_url, "select repeat('x', 1100000000)")
    assert isinstance(exc, StoreRejected) and exc.code == "54000"
    assert isinstance(exc.__cause__, psycopg.OperationalError)


def test_bad_data_is_permanent(db_url: str) -> None:
    exc = run_sql(db_url, "select '{\"a\": \"\\u0000\"}'::jsonb ->> 'a'")
    assert isinstance(exc, StoreRejected) and exc.code == "22P05"




@pytest.fixture(params=["postgres", "supabase"])
def cli_store(request: pytest.FixtureRequest, clean_db: str) -> Iterator[TaskStore]:
    """The store a one-shot command opens, through the one factory, in each mode."""
    if request.param == "postgres":
        settings = Settings(database_url=clean_db, transport="postgres")
    else:
        settings = Settings(supabase_url=request.getfixturevalue("postgrest"),
                            supabase_service_key=SERVICE_KEY, transport="supabase")
    store = open_store(settings, pool=False)
    try:
        yield store
    finally:
        store.close()


def test_row_operations_through_each_transport(cli_store: TaskStore) -> None:
    task_id = cli_store.insert(request_payload("hi", {"k": 1}), priority=0)
    row = cli_store.get(task_id)
    assert row is not None
    assert (row["id"], row["status"], row["attempts"]) == (task_id, "pending", 0)
    assert cli_store.get("00000000-0000-0000-0000-000000000000") is None
    with pytest.raises(StoreRejected) as info:
        cli_store.insert({"prompt": "x"} | {"nested": "\u0000"}, priority=0)
    assert info.value.code == "22P05"
