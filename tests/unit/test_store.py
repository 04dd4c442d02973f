"""The task store's behaviour, run on both transports (direct Postgres and supabase-py
through the PostgREST stub): the state machine lives in SQL, so both must agree."""

from __future__ import annotations

import pytest

from bridge.errors import StoreUnavailable
from bridge.localstack import free_port
from bridge.store import TaskStore
from bridge.store.postgres import PostgresTransport


def test_unreachable_postgres_is_unavailable() -> None:
    """No server behind the URL: StoreUnavailable, so the caller retries later."""
    store = TaskStore(PostgresTransport(
        f"host=127.0.0.1 port={free_port()} dbname=none user=none", connect_timeout=1))
    try:
        with pytest.raises(StoreUnavailable):
            store.stats()
    finally:
        store.close()




