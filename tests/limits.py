"""The operator's limits table as shipped, put back after a test changes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.db import sql


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


@contextmanager
def admission_restored(db_url: str, **more_agents: dict[str, Any]) -> Iterator[None]:
    """The limits, the registered agents (plus `more_agents`: name -> {queue,
    max_attempts}) and no day usage counted; all put back afterwards."""
    agents = sql(db_url, "select coalesce(jsonb_object_agg(name, jsonb_build_object("
                         "'queue', queue, 'max_attempts', max_attempts)), '{}') "
                         "from public.agent_bridge_agents")[0][0]
    if more_agents:
        sql(db_url, "select public.agent_bridge_register_agents(%s)",
            [Jsonb({**agents, **more_agents})])
    sql(db_url, "truncate agent_bridge.user_day_usage")
    try:
        with limits_restored(db_url):
            yield
    finally:
        sql(db_url, "select public.agent_bridge_register_agents(%s)", [Jsonb(agents)])
        sql(db_url, "truncate agent_bridge.user_day_usage")

