"""Hostile users at scale, at insert (issue 20): the day budgets (rows and request bytes per
user per UTC day), payloads too large or too deep stored as failed rows that count, the
per-tenant agent allow-list, and the quota and budgets under 40 concurrent inserts. On the
real database, as Supabase's roles (`as_role`)."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bench.payload_shapes import OLD_WALKER
from tests.db import as_role, race_as, sql
from tests.fakes.jwt import role_key, user_token
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub
from tests.limits import admission_restored

PROMPT = {"prompt": "hi"}
SIZE_LIMIT = 1048576  # agent_bridge.max_request_bytes as shipped
TOO_LARGE = {"prompt": "x" * 1_100_000}


def new_user() -> str:
    return str(uuid.uuid4())


def nested(depth: int, leaf: str = "1") -> str:
    """`depth` objects one inside the other: {"a": {"a": ... leaf}}."""
    return '{"a": ' * depth + leaf + "}" * depth




def insert(db_url: str, user: str, payload: Any = None, enterprise: str | None = None,
           **columns: Any) -> dict[str, Any]:
    """One insert as the signed-in user, the frontend's way; returns the row as stored.
    A str payload is sent as JSON text, as PostgREST sends it."""
    payload = PROMPT if payload is None else payload
    values = {"request_payload": payload if isinstance(payload, str) else Jsonb(payload),
              **columns}
    marks = ", ".join(["%s::jsonb"] + ["%s"] * len(columns))
    with as_role(db_url, "authenticated", user) as conn:
        if enterprise is not None:
            conn.execute("select set_config('request.jwt.claims', %s, true)", [json.dumps(
                {"role": "authenticated", "sub": user,
                 "app_metadata": {"enterprise_id": enterprise}})])
        row = conn.cursor(row_factory=dict_row).execute(
            f"insert into public.agent_task_requests ({', '.join(values)}) values ({marks}) "
            f"returning id, status, request_payload, response_payload, error, attempts, "
            f"finished_at, lease_expires_at, priority, user_id, enterprise_id, tenant, agent",
            list(values.values())).fetchone()  # (users may not select `worker`)
    assert row is not None
    return dict(row)


def usage(db_url: str, user: str, day: str = "today") -> tuple[int, int] | None:
    """(rows, request_bytes) the user spent on `day` ('today' or 'yesterday', UTC)."""
    offset = {"today": 0, "yesterday": 1}[day]
    found = sql(db_url, "select rows, request_bytes from agent_bridge.user_day_usage "
                        "where user_id = %s and day = (now() at time zone 'UTC')::date - %s",
                [user, offset])
    return (found[0][0], found[0][1]) if found else None


def stored_size(db_url: str, payload: Any) -> int:
    """What a payload counts against the size limit and max_request_bytes_per_day: its size
    as stored (agent_bridge.payload_bytes), read from a stored tuple (a materialized CTE's):
    a small value's header is packed to one byte there, as in the table."""
    value = payload if isinstance(payload, str) else Jsonb(payload)
    return int(sql(db_url, "with v as materialized (select %s::jsonb as j) "
                           "select pg_column_size(j) from v", [value])[0][0])


def reset_time() -> str:
    return f"{datetime.now(UTC).date() + timedelta(days=1):%Y-%m-%d} 00:00 UTC"


def set_limits(db_url: str, tenant: str = "*", /, **values: Any) -> None:
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    updates = ", ".join(f"{n} = excluded.{n}" for n in values)
    sql(db_url, f"insert into public.agent_tenant_limits (tenant, {names}) values (%s, {marks}) "
                f"on conflict (tenant) do update set {updates}", [tenant, *values.values()])


@pytest.fixture
def db(clean_db: str) -> Iterator[str]:
    """The test database with the limits as shipped and no usage counted; the limits and
    registered agents are restored afterwards."""
    with admission_restored(clean_db):
        yield clean_db


# The defaults ----------------------------------------------------------------------------

def test_defaults_are_on_the_default_row(db: str) -> None:
    """2,000 rows and 50 MiB a day, every agent: more than a normal app ever meets."""
    assert sql(db, "select max_rows_per_day, max_request_bytes_per_day, allowed_agents "
                   "from public.agent_tenant_limits where tenant = '*'") == [
        (2000, 52428800, None)]
    user = new_user()
    insert(db, user)
    assert usage(db, user) == (1, stored_size(db, PROMPT))


@pytest.mark.parametrize("payload", [PROMPT, {"prompt": "x" * 500}], ids=["small", "large"])
def test_a_payload_counts_its_size_in_the_table(db: str, payload: dict[str, Any]) -> None:
    """What is counted is what the row holds, on every server version: a small value's
    one-byte header included (PostgreSQL 18 counted 3 bytes more before the helpers were
    PL/pgSQL, 15 did not)."""
    user = new_user()
    row = insert(db, user, payload)
    counted = usage(db, user)
    assert counted is not None
    assert sql(db, "select pg_column_size(request_payload), agent_bridge.payload_bytes("
                   "request_payload) from public.agent_task_requests where id = %s",
               [row["id"]]) == [(counted[1], counted[1])]


# Day budgets -------------------------------------------------------------------------------

def test_daily_row_limit_names_the_limit_and_the_reset(db: str) -> None:
    set_limits(db, max_rows_per_day=3, max_active=100)
    user = new_user()
    for _ in range(3):
        insert(db, user)
    with pytest.raises(errors.RaiseException) as info:
        insert(db, user)
    assert str(info.value).splitlines()[0] == (
        f"daily row limit reached: 3 tasks per day; resets at {reset_time()}")
    assert info.value.diag.sqlstate == "P0001"
    assert info.value.diag.message_detail == "You have inserted 3 tasks today (UTC)."
    assert "max_rows_per_day" in str(info.value.diag.message_hint)
    assert usage(db, user) == (3, 3 * stored_size(db, PROMPT))  # the refusal counted nothing
    insert(db, new_user())  # another user has a budget of their own


def test_daily_byte_limit_names_the_limit_and_the_reset(db: str) -> None:
    payload = {"prompt": "y" * 10_000}
    size = stored_size(db, payload)
    set_limits(db, max_request_bytes_per_day=2 * size + size // 2, max_active=100)
    user = new_user()
    insert(db, user, payload)
    insert(db, user, payload)
    with pytest.raises(errors.RaiseException) as info:
        insert(db, user, payload)
    assert str(info.value).splitlines()[0] == (
        f"daily request size limit reached: {2 * size + size // 2} bytes of request_payload "
        f"per day; resets at {reset_time()}")
    assert info.value.diag.sqlstate == "P0001"
    assert info.value.diag.message_detail == (
        f"You have sent {2 * size} bytes today (UTC); this request is {size} bytes.")
    assert "max_request_bytes_per_day" in str(info.value.diag.message_hint)
    insert(db, user)  # a small one still fits
    assert usage(db, user) == (3, 2 * size + stored_size(db, PROMPT))


def test_the_budget_resets_each_utc_day(db: str) -> None:
    """Yesterday's use does not count today; today's can be given back by the operator."""
    set_limits(db, max_rows_per_day=2, max_request_bytes_per_day=10_000, max_active=100)
    user = new_user()
    sql(db, "insert into agent_bridge.user_day_usage (user_id, day, rows, request_bytes) "
            "values (%s, (now() at time zone 'UTC')::date - 1, 2, 10000), "
            "(%s, (now() at time zone 'UTC')::date - 30, 2, 10000)", [user, user])
    insert(db, user)
    insert(db, user)
    with pytest.raises(errors.RaiseException, match="daily row limit reached"):
        insert(db, user)
    assert usage(db, user) == (2, 2 * stored_size(db, PROMPT))
    assert usage(db, user, "yesterday") == (2, 10000)  # kept a week, for the operator
    assert sql(db, "select count(*) from agent_bridge.user_day_usage where user_id = %s",
               [user]) == [(2,)]  # the month-old row is gone
    sql(db, "delete from agent_bridge.user_day_usage where user_id = %s "
            "and day = (now() at time zone 'UTC')::date", [user])
    insert(db, user)


def test_limits_per_tenant(db: str) -> None:
    """A tenant row overrides '*'; a null in it means "as '*'"."""
    set_limits(db, "acme", max_rows_per_day=1)
    set_limits(db, max_rows_per_day=2, max_active=100)
    alice, bob = new_user(), new_user()
    insert(db, alice, enterprise="acme")
    with pytest.raises(errors.RaiseException, match="1 tasks per day"):
        insert(db, alice, enterprise="acme")
    for _ in range(2):
        insert(db, bob)
    with pytest.raises(errors.RaiseException, match="2 tasks per day"):
        insert(db, bob)


def test_service_role_and_owner_are_not_limited(db: str) -> None:
    set_limits(db, max_rows_per_day=0, max_request_bytes_per_day=0, allowed_agents=[])
    user = new_user()
    with as_role(db, "service_role") as conn:
        conn.execute("insert into public.agent_task_requests (request_payload, user_id) "
                     "select '{\"prompt\": \"x\"}', %s from generate_series(1, 5)", [user])
    sql(db, "insert into public.agent_task_requests (request_payload, user_id) "
            "values ('{}', %s)", [user])
    assert sql(db, "select count(*) from public.agent_task_requests") == [(6,)]
    assert sql(db, "select count(*) from agent_bridge.user_day_usage") == [(0,)]
    with pytest.raises(errors.InsufficientPrivilege, match="no agents are allowed"):
        insert(db, user)
    set_limits(db, allowed_agents=None)
    with pytest.raises(errors.RaiseException, match="daily row limit reached: 0 tasks"):
        insert(db, user)


def test_users_cannot_read_or_spend_the_counters(db: str) -> None:
    """The counters are written only by the insert trigger, for the inserting user."""
    user = new_user()
    insert(db, user)
    for statement in ["select * from agent_bridge.user_day_usage",
                      "update agent_bridge.user_day_usage set rows = 0",
                      "delete from agent_bridge.user_day_usage",
                      "insert into agent_bridge.user_day_usage (user_id, day) "
                      f"values ('{new_user()}', current_date)",
                      "select * from agent_bridge.count_user_request(0)"]:
        with pytest.raises(errors.InsufficientPrivilege), \
                as_role(db, "authenticated", user) as conn:
            conn.execute(statement)
    with pytest.raises(errors.InsufficientPrivilege), as_role(db, "anon") as conn:
        conn.execute("select * from agent_bridge.count_user_request(0)")
    assert usage(db, user) == (1, stored_size(db, PROMPT))


# Payloads refused for their size or depth: failed rows that count --------------------------

def assert_failed_at_insert(row: dict[str, Any], message: str, hint: str) -> None:
    assert row["status"] == "failed"
    assert row["request_payload"] == {}  # the bytes are not kept
    error = row["error"]
    assert (error["type"], error["message"], error["hint"], error["retryable"]) == (
        "InvalidRequest", message, hint, False)
    assert row["response_payload"] == {"error": message}  # where the guide's frontend looks
    assert row["finished_at"] is not None and row["lease_expires_at"] is None
    assert row["attempts"] == 0


def test_a_payload_too_large_is_stored_failed_and_counted(db: str) -> None:
    user = new_user()
    row = insert(db, user, TOO_LARGE)
    assert_failed_at_insert(
        row, f"request_payload is {stored_size(db, TOO_LARGE)} bytes; "
        f"the limit is {SIZE_LIMIT} bytes",
        "Raise agent_bridge.max_request_bytes or send a reference instead of the data.")
    assert usage(db, user) == (1, stored_size(db, TOO_LARGE))  # the attempted bytes
    assert sql(db, "select * from public.agent_tasks_claim(10, 30)") == []  # never claimed
    assert sql(db, "select pg_column_size(request_payload) < 100 from "
                   "public.agent_task_requests where id = %s", [row["id"]]) == [(True,)]


@pytest.mark.parametrize("payload", [
    nested(65),
    nested(64, "[]"),  # an empty container at level 65
    '{"p": ' + "[" * 64 + "]" * 64 + "}",  # arrays count as levels
    '{"a": [' + ", ".join([nested(10)] * 50 + ["[" * 64 + "]" * 64]) + "]}",  # one deep branch
], ids=["objects", "empty-leaf", "arrays", "one-branch"])
def test_a_payload_too_deep_is_stored_failed_and_counted(db: str, payload: str) -> None:
    user = new_user()
    row = insert(db, user, payload)
    assert_failed_at_insert(
        row, "request_payload is nested more than 64 levels deep; the limit is 64 levels",
        "Flatten the payload, or raise agent_bridge.max_request_depth.")
    assert usage(db, user) == (1, stored_size(db, payload))


@pytest.mark.parametrize("payload", [
    nested(64),  # the root object is level 1
    nested(63, "[]"),
    nested(63, '[1, "s", null, true]'),  # scalars are not levels
    '{"a": [' + ", ".join(["[" * 62 + "]" * 62] * 100) + "]}",  # 1 + 1 + 62
], ids=["objects", "empty-leaf", "scalars", "many-arrays"])
def test_a_payload_64_levels_deep_is_accepted(db: str, payload: str) -> None:
    row = insert(db, new_user(), payload)
    assert row["status"] == "pending" and row["request_payload"] == json.loads(payload)


def test_the_service_gets_failed_rows_too_and_updates_still_raise(db: str) -> None:
    """One rule for every insert; an UPDATE of the payload (the service's) has no new row to
    fail, so it is refused as before."""
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.cursor(row_factory=dict_row).execute(
            "insert into public.agent_task_requests (request_payload) values (%s::jsonb) "
            "returning *", [nested(70)]).fetchone()
        assert row is not None and row["status"] == "failed"
        ok = conn.execute("insert into public.agent_task_requests (request_payload) "
                          "values ('{}') returning id").fetchone()
        assert ok is not None
        with pytest.raises(errors.InvalidParameterValue, match="nested more than 64 levels"):
            conn.execute("update public.agent_task_requests set request_payload = %s::jsonb "
                         "where id = %s", [nested(70), ok[0]])
        with pytest.raises(errors.StringDataRightTruncation,
                           match=rf"request_payload is \d+ bytes; the limit is {SIZE_LIMIT}"):
            conn.execute("update public.agent_task_requests set request_payload = %s "
                         "where id = %s", [Jsonb(TOO_LARGE), ok[0]])


def test_a_payload_that_is_not_an_object_is_still_refused(db: str) -> None:
    user = new_user()
    with pytest.raises(errors.InvalidParameterValue, match="must be a JSON object"):
        insert(db, user, "[1]")
    assert usage(db, user) is None  # refused with an error: rolled back, nothing counted


def test_a_spent_budget_refuses_before_the_payload_is_read(db: str) -> None:
    """Once the day's rows are spent, even a payload that would be stored failed is refused
    by the budget (the cheap check comes first), and nothing more is stored."""
    set_limits(db, max_rows_per_day=1)
    user = new_user()
    insert(db, user, nested(100))
    for payload in (nested(100), TOO_LARGE, PROMPT):
        with pytest.raises(errors.RaiseException, match="daily row limit reached"):
            insert(db, user, payload)
    assert sql(db, "select status, count(*) from public.agent_task_requests group by 1") == [
        ("failed", 1)]


def test_users_cannot_insert_failed_rows_themselves(db: str) -> None:
    """The policy admits a failed row only as the payload checks make it (users cannot write
    `error`); one a user asks for with a bad payload is that row, and counts."""
    user = new_user()
    for status in ("failed", "completed", "processing"):
        with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
            insert(db, user, status=status)
    row = insert(db, user, nested(70), status="failed")
    assert row["error"]["type"] == "InvalidRequest"
    assert usage(db, user) == (1, stored_size(db, nested(70)))


def old_depth_function(conn: psycopg.Connection[Any]) -> None:
    """Before this change: the level-by-level walker of 20261130000100_hardening.sql, as
    `pg_temp.too_deep(doc, max_depth)` (the bench's copy, in this session's own schema)."""
    conn.execute(OLD_WALKER.replace("public.bench_old_too_deep", "pg_temp.too_deep").encode())


def random_json(rng: random.Random, depth: int, max_depth: int) -> Any:
    roll = rng.random()
    if depth >= max_depth or roll < 0.2:
        return rng.choice([1, "s", None, True, [], {}])
    if roll < 0.6:
        return [random_json(rng, depth + 1, max_depth) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": random_json(rng, depth + 1, max_depth) for i in range(rng.randint(0, 3))}


def test_depth_means_what_it_meant(db: str) -> None:
    """The one-walk check refuses exactly the payloads the old walker refused, on random
    shapes around the limit (objects and arrays nested, empty and scalar leaves)."""
    rng = random.Random(20)
    with psycopg.connect(db, autocommit=True) as conn:
        old_depth_function(conn)
        for _ in range(400):
            limit = rng.choice([1, 2, 3, 4, 6])
            payload = {"r": random_json(rng, 1, limit + 2)}
            conn.execute("select set_config('agent_bridge.max_request_depth', %s, false)",
                         [str(limit)])
            row = conn.execute("insert into public.agent_task_requests (request_payload) "
                               "values (%s) returning status", [Jsonb(payload)]).fetchone()
            old = conn.execute("select pg_temp.too_deep(%s, %s)",
                               [Jsonb(payload), limit]).fetchone()
            assert row is not None and old is not None
            assert (row[0] == "failed") == old[0], (limit, payload)


# The agent allow-list ----------------------------------------------------------------------

def test_allowed_agents(db: str) -> None:
    sql(db, "select public.agent_bridge_register_agents(%s)", [Jsonb({
        "cheap": {"queue": "agent_tasks.cheap"},
        "gpt4-expensive": {"queue": "agent_tasks.gpt4-expensive"}})])
    user = new_user()
    assert insert(db, user, agent="gpt4-expensive")["agent"] == "gpt4-expensive"  # null: all
    set_limits(db, allowed_agents=["default", "cheap"])
    insert(db, user)
    insert(db, user, agent="cheap")
    with pytest.raises(errors.InsufficientPrivilege) as info:
        insert(db, user, agent="gpt4-expensive")
    assert str(info.value).splitlines()[0] == (
        'agent "gpt4-expensive" is not allowed for your account: '
        "allowed agents are cheap, default")
    assert "allowed_agents" in str(info.value.diag.message_hint)
    set_limits(db, user, max_active=50)  # a tenant row with a null list: as '*'
    with pytest.raises(errors.InsufficientPrivilege, match="allowed agents are cheap, default"):
        insert(db, user, agent="gpt4-expensive")
    set_limits(db, user, allowed_agents=["gpt4-expensive"])
    insert(db, user, agent="gpt4-expensive")
    with pytest.raises(errors.InsufficientPrivilege, match="allowed agents are gpt4-expensive"):
        insert(db, user)
    set_limits(db, user, allowed_agents=[])
    with pytest.raises(errors.InsufficientPrivilege, match="no agents are allowed"):
        insert(db, user, agent="cheap")
    set_limits(db, allowed_agents=None)
    with pytest.raises(errors.InvalidParameterValue, match='unknown agent "nope"'):
        insert(db, new_user(), agent="nope")  # with no list: unknown, as before
    assert usage(db, user) == (4, 4 * stored_size(db, PROMPT))  # refusals count nothing


# Through PostgREST: the HTTP status and body supabase-js gets ------------------------------

def test_refusals_through_postgrest(db: str) -> None:
    set_limits(db, max_rows_per_day=2, allowed_agents=["default"])
    stub = PostgrestStub(db, service_key=SERVICE_KEY)
    url = stub.start()
    try:
        token = user_token(new_user())
        headers = {"apikey": role_key("anon"), "Authorization": f"Bearer {token}",
                   "Prefer": "return=representation"}

        def post(row: dict[str, Any]) -> httpx.Response:
            return httpx.post(f"{url}/rest/v1/agent_task_requests?select=id,status,error",
                              json=row, headers=headers,
                              timeout=30)

        big = post({"request_payload": TOO_LARGE})
        assert big.status_code == 201, big.text
        [stored] = big.json()
        assert (stored["status"], stored["error"]["type"]) == ("failed", "InvalidRequest")
        agent = post({"request_payload": PROMPT, "agent": "cheap"})
        assert (agent.status_code, agent.json()["code"]) == (403, "42501")
        assert post({"request_payload": PROMPT}).status_code == 201
        spent = post({"request_payload": PROMPT})
        assert (spent.status_code, spent.json()["code"]) == (400, "P0001")
        assert spent.json()["message"].startswith("daily row limit reached: 2 tasks per day")
    finally:
        stub.stop()


# `agent-bridge submit` -----------------------------------------------------------------------



# Under concurrency: the per-user lock ------------------------------------------------------

def race_inserts(db_url: str, user: str, payload: Any, n: int = 40) -> list[Exception | None]:
    """n inserts by one user at once, each in its own connection (as PostgREST runs them),
    released together once every transaction has begun; each one's error or None."""
    def one(conn: psycopg.Connection[Any]) -> None:
        conn.execute("insert into public.agent_task_requests (request_payload) values (%s)",
                     [Jsonb(payload)])
    return [o if isinstance(o, Exception) else None for o in race_as(db_url, user, one, n)]


@pytest.mark.parametrize("limit", ["max_active", "max_rows_per_day",
                                   "max_request_bytes_per_day"])
def test_forty_concurrent_inserts_never_pass_a_limit(db: str, limit: str) -> None:
    """One user, 40 inserts at once, a limit of 5 rows: exactly 5 are stored, the rest are
    refused by that limit. Without the advisory lock in agent_task_requests_admit the
    max_active case stores more than 5 (each insert counts the active rows before the
    others commit); the day budgets also hold without it, as their counter row is locked by
    the upsert that increments it."""
    payload = {"prompt": "p" * 1000}
    size = stored_size(db, payload)
    values: dict[str, Any] = {"max_active": 5 if limit == "max_active" else 100}
    if limit == "max_rows_per_day":
        values["max_rows_per_day"] = 5
    if limit == "max_request_bytes_per_day":
        values["max_request_bytes_per_day"] = 5 * size + size // 2
    set_limits(db, **values)
    user = new_user()
    outcomes = race_inserts(db, user, payload)
    refused = [e for e in outcomes if e is not None]
    expected = {"max_active": "too many active tasks",
                "max_rows_per_day": "daily row limit reached",
                "max_request_bytes_per_day": "daily request size limit reached"}[limit]
    assert all(isinstance(e, errors.RaiseException) and expected in str(e)
               for e in refused), refused
    assert sql(db, "select count(*) from public.agent_task_requests where user_id = %s "
                   "and status = 'pending'", [user]) == [(5,)]
    assert len(refused) == 35
    assert usage(db, user) == (5, 5 * size)
