"""The operator's limits table as shipped, put back after a test changes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


@contextmanager
def limits_restored(db_url: str) -> Iterator[None]:
    """Whatever the block does to public.agent_tenant_limits is undone afterwards."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        saved = [row[0] for row in conn.execute(
            "select to_jsonb(l) from public.agent_tenant_limits l")]
    try:
        yield
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("delete from public.agent_tenant_limits")
            for row in saved:
                conn.execute("insert into public.agent_tenant_limits select * from "
                             "jsonb_populate_record(null::public.agent_tenant_limits, %s)",
                             [json.dumps(row)])
