"""The compat SQL's copy of Supabase Realtime's database objects (realtime.messages,
realtime.topic(), realtime.send()) and the Realtime stand-in's partitions of
realtime.messages, on a plain PostgreSQL with nothing else (no migrations). The socket side
of Broadcast is tests/acceptance/test_realtime_broadcast_standin.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from bridge.migrate import compat_sql
from tests.db import sql
from tests.fakes.realtime import ensure_message_partitions

# realtime.messages as supabase/realtime's tenant schema export declares it.
SUPABASE_COLUMNS = [
    ("topic", "text", "NO", None),
    ("extension", "text", "NO", None),
    ("payload", "jsonb", "YES", None),
    ("event", "text", "YES", None),
    ("private", "boolean", "YES", "false"),
    ("updated_at", "timestamp without time zone", "NO", "now()"),
    ("inserted_at", "timestamp without time zone", "NO", "now()"),
    ("id", "uuid", "NO", "gen_random_uuid()"),
    ("binary_payload", "bytea", "YES", None),
]


@pytest.fixture
def compat_db(fresh_db: str) -> Iterator[str]:
    """A plain database with the compat SQL applied twice (it must be idempotent)."""
    for _ in range(2):
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            conn.execute(compat_sql().encode())
    yield fresh_db


def warnings_of(conn: psycopg.Connection[Any]) -> list[str]:
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(f"{d.severity}: {d.message_primary}"))
    return seen


def test_compat_creates_realtime_messages_as_supabase_has_it(compat_db: str) -> None:
    assert sql(compat_db, "select obj_description('realtime'::regnamespace, 'pg_namespace')") \
        == [("agent-bridge compat",)]
    assert sql(compat_db, """
        select column_name, data_type, is_nullable, column_default
          from information_schema.columns
         where table_schema = 'realtime' and table_name = 'messages'
         order by ordinal_position""") == SUPABASE_COLUMNS
    assert sql(compat_db, """
        select c.relkind, pg_get_partkeydef(c.oid), c.relrowsecurity, c.relforcerowsecurity,
               pg_get_userbyid(c.relowner)
          from pg_class c where c.oid = 'realtime.messages'::regclass""") == [
        ("p", "RANGE (inserted_at)", True, False, "supabase_realtime_admin")]
    assert sql(compat_db, """
        select conname, pg_get_constraintdef(oid) from pg_constraint
         where conrelid = 'realtime.messages'::regclass and contype in ('c', 'p')
         order by 1""") == [
        ("messages_payload_exclusive",
         "CHECK (((payload IS NULL) OR (binary_payload IS NULL))) NOT VALID"),
        ("messages_pkey", "PRIMARY KEY (id, inserted_at)")]
    assert sql(compat_db, """
        select grantee, string_agg(privilege_type, ',' order by privilege_type)
          from information_schema.role_table_grants
         where table_schema = 'realtime' and table_name = 'messages'
           and grantee in ('anon', 'authenticated', 'service_role')
         group by 1 order by 1""") == [(role, "INSERT,SELECT,UPDATE") for role in
                                       ("anon", "authenticated", "service_role")]
    assert sql(compat_db, "select count(*) from pg_policies where schemaname = 'realtime'") \
        == [(0,)]  # no policy: nobody but a role that bypasses RLS reads or writes
    assert sql(compat_db, """
        select p.oid::regprocedure::text, p.prosecdef, pg_get_userbyid(p.proowner)
          from pg_proc p where p.pronamespace = 'realtime'::regnamespace order by 1""") == [
        ("realtime.send(jsonb,text,text,boolean)", False, "supabase_realtime_admin"),
        ("realtime.send_binary(bytea,text,text,boolean)", False, "supabase_realtime_admin"),
        ("realtime.topic()", False, "supabase_realtime_admin")]
    for role in ("anon", "authenticated", "service_role"):
        assert sql(compat_db, "select has_schema_privilege(%s, 'realtime', 'usage'), "
                              "has_function_privilege(%s, 'realtime.topic()', 'execute')",
                   [role, role]) == [(True, True)]


def test_compat_leaves_an_existing_realtime_schema_unmarked(fresh_db: str) -> None:
    sql(fresh_db, "create schema realtime")
    sql(fresh_db, compat_sql())
    assert sql(fresh_db, "select obj_description('realtime'::regnamespace, 'pg_namespace')") \
        == [(None,)]
    assert sql(fresh_db, "select to_regclass('realtime.messages') is not null") == [(True,)]


def test_the_stand_in_makes_the_janitors_partitions(compat_db: str) -> None:
    today = datetime.now(UTC).date()
    days = [today + timedelta(days=d) for d in range(-1, 4)]
    assert ensure_message_partitions(compat_db) == [f"messages_{d:%Y_%m_%d}" for d in days]
    assert ensure_message_partitions(compat_db) == []  # each made once
    bounds = sql(compat_db, """
        select c.relname, pg_get_expr(c.relpartbound, c.oid), pg_get_userbyid(c.relowner)
          from pg_inherits i join pg_class c on c.oid = i.inhrelid
         where i.inhparent = 'realtime.messages'::regclass order by 1""")
    assert bounds == [(f"messages_{d:%Y_%m_%d}",
                       f"FOR VALUES FROM ('{d} 00:00:00') TO ('{d + timedelta(days=1)} 00:00:00')",
                       "supabase_realtime_admin") for d in days]


def test_send_inserts_a_broadcast_row_with_the_topic_set_for_the_transaction(
        compat_db: str) -> None:
    ensure_message_partitions(compat_db)
    with psycopg.connect(compat_db) as conn:
        conn.execute("select realtime.send('{\"text\": \"hi\"}', 'chunk', 'room:1')")
        conn.execute("select realtime.send('{\"id\": 7}', 'state', 'room:2', false)")
        # SET LOCAL: the policies evaluated in this transaction see the last topic sent.
        assert conn.execute("select realtime.topic()").fetchone() == ("room:2",)
        conn.commit()
        assert conn.execute("select realtime.topic()").fetchone() == (None,)
    rows = sql(compat_db, "select id::text, topic, event, payload, private, extension, "
                          "binary_payload from realtime.messages order by topic")
    (first_id, *first), (_, *second) = rows
    # The payload gets the row's id unless it has an `id` of its own.
    assert first == ["room:1", "chunk", {"text": "hi", "id": first_id}, True, "broadcast", None]
    assert second == ["room:2", "state", {"id": 7}, False, "broadcast", None]


def test_a_rolled_back_send_leaves_no_row(compat_db: str) -> None:
    ensure_message_partitions(compat_db)
    with psycopg.connect(compat_db) as conn:
        conn.execute("select realtime.send('{}', 'state', 'room:rolled-back')")
        conn.rollback()
    assert sql(compat_db, "select count(*) from realtime.messages") == [(0,)]


def test_send_never_fails_the_callers_transaction(compat_db: str) -> None:
    """Without today's partition, or as a user no policy lets insert, realtime.send warns
    (WarnSendingBroadcastMessage) and the caller's transaction goes on."""
    with psycopg.connect(compat_db) as conn:
        seen = warnings_of(conn)
        conn.execute("select realtime.send('{}', 'state', 'room:1')")
        assert conn.execute("select 1").fetchone() == (1,)
    assert len(seen) == 1 and seen[0].startswith(
        'WARNING: WarnSendingBroadcastMessage: no partition of relation "messages" found')

    ensure_message_partitions(compat_db)
    user = str(uuid.uuid4())
    with psycopg.connect(compat_db) as conn:
        seen = warnings_of(conn)
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     [json.dumps({"role": "authenticated", "sub": user})])
        conn.execute("select realtime.send('{}', 'state', 'room:1')")  # security invoker
        conn.commit()
    assert seen == ["WARNING: WarnSendingBroadcastMessage: new row violates row-level "
                    'security policy for table "messages"']
    assert sql(compat_db, "select count(*) from realtime.messages") == [(0,)]
