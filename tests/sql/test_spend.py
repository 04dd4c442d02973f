"""Spend control in the database (issue 25), through both transports: budgets refuse
inserts and fail queued rows at the claim once spent, the bind reserves what a handler
declared so concurrent tasks cannot overshoot together, and usage reported with the
outcome is counted once. Runs on the real database as Supabase's roles."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from bridge.store import TaskStore, Write
from tests.db import as_role, claim_and_start, insert_task, sql


@pytest.fixture
def budgets(clean_db: str) -> Iterator[str]:
    """A database whose limits and usage are put back after the test."""
    yield clean_db
    sql(clean_db, "delete from public.agent_tenant_limits where tenant <> '*'")
    sql(clean_db, "update public.agent_tenant_limits set token_budget = null, "
                  "cost_budget = null, budget_period = null where tenant = '*'")
    sql(clean_db, "delete from public.agent_tenant_usage")


def set_budget(db_url: str, tenant: str, tokens: int | None = None, cost: float | None = None,
               period: str = "month") -> None:
    sql(db_url, "insert into public.agent_tenant_limits (tenant, token_budget, cost_budget, "
                "budget_period) values (%s, %s, %s, %s) on conflict (tenant) do update set "
                "token_budget = excluded.token_budget, cost_budget = excluded.cost_budget, "
                "budget_period = excluded.budget_period", [tenant, tokens, cost, period])


def spend(db_url: str, tenant: str) -> dict[str, Any]:
    with psycopg.connect(db_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("select * from agent_bridge.budget_state(%s)", [tenant]).fetchone()
    assert row is not None
    return row


def row(db_url: str, task_id: str) -> dict[str, Any]:
    with psycopg.connect(db_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        found = cur.execute("select status, error, usage, spend_reserved from "
                            "public.agent_task_requests where id = %s", [task_id]).fetchone()
    assert found is not None
    return found


def bind(store: TaskStore, task_id: str, attempt: int, tokens: int, worker: str = "w1"
         ) -> tuple[bool, Any]:
    (result, _), = store.write_batch([Write("bind", task_id, attempt, worker,
                                            doc={"tokens": tokens}, seconds=60)])
    return result.applied, result.budget


def claimed(store: TaskStore, task_id: str) -> int:
    claims = [c for c in store.claim(50, 60) if c.id == task_id]
    assert claims, "not claimed"
    return claims[0].attempt


def test_an_insert_is_refused_once_the_budget_is_spent(budgets: str) -> None:
    user = str(uuid.uuid4())
    set_budget(budgets, user, tokens=100)
    sql(budgets, "insert into public.agent_tenant_usage (tenant, period, period_start, "
                 "output_tokens) values (%s, 'month', date_trunc('month', now() at time zone "
                 "'UTC')::date, 100)", [user])
    with pytest.raises(errors.RaiseException) as refused, as_role(budgets, "authenticated",
                                                                   user) as conn:
        conn.execute("insert into public.agent_task_requests (status, request_payload) "
                     "values ('pending', '{\"prompt\": \"hi\"}')")
    message = str(refused.value)
    assert "token budget spent: 100 of 100 tokens this month" in message
    assert "resets at" in message and "UTC" in message


def test_a_queued_row_ends_budget_exceeded_at_the_claim(store: TaskStore, budgets: str) -> None:
    task = insert_task(budgets, {"prompt": "queued"}, enterprise_id="acme")
    set_budget(budgets, "acme", cost=1.0)
    sql(budgets, "insert into public.agent_tenant_usage (tenant, period, period_start, cost) "
                 "values ('acme', 'month', date_trunc('month', now() at time zone 'UTC')::date,"
                 " 1.5)")
    other = insert_task(budgets, {"prompt": "another tenant"})
    assert [c.id for c in store.claim(10, 60)] == [other]
    failed = row(budgets, task)
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "BudgetExceeded"
    assert failed["error"]["budget"] == "cost"
    assert failed["error"]["message"].startswith("cost budget spent: 1.50 of 1.00 this month")


def test_the_bind_reserves_what_is_left_and_refuses_when_nothing_is(store: TaskStore,
                                                                    budgets: str) -> None:
    set_budget(budgets, "acme", tokens=1000)
    tasks = [insert_task(budgets, {"prompt": str(i)}, enterprise_id="acme") for i in range(3)]
    attempts = {c.id: c.attempt for c in store.claim(10, 60)}
    assert bind(store, tasks[0], attempts[tasks[0]], 600) == (True, {"tokens": 600,
                                                                     "cost": None})
    assert bind(store, tasks[1], attempts[tasks[1]], 600) == (True, {"tokens": 400,
                                                                     "cost": None})
    assert bind(store, tasks[2], attempts[tasks[2]], 600) == (False, None)
    refused = row(budgets, tasks[2])
    assert refused["status"] == "failed" and refused["error"]["type"] == "BudgetExceeded"
    assert "1000 more held by running tasks" in refused["error"]["message"]
    assert spend(budgets, "acme")["reserved_tokens"] == 1000
    # A bind repeated by the same holder keeps its reservation.
    assert bind(store, tasks[0], attempts[tasks[0]], 600) == (True, {"tokens": 600,
                                                                     "cost": None})
    assert spend(budgets, "acme")["reserved_tokens"] == 1000


def test_concurrent_binds_of_one_tenant_never_reserve_more_than_the_budget(
        store: TaskStore, budgets: str) -> None:
    set_budget(budgets, "acme", tokens=1000)
    tasks = [insert_task(budgets, {"prompt": str(i)}, enterprise_id="acme") for i in range(12)]
    attempts = {c.id: c.attempt for c in store.claim(50, 60)}
    grants: list[Any] = []

    def bind_one(task: str) -> None:
        grants.append(bind(store, task, attempts[task], 300, worker=f"w-{task}"))
    threads = [threading.Thread(target=bind_one, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reserved = sum(budget["tokens"] for applied, budget in grants if applied)
    assert reserved == 1000 == spend(budgets, "acme")["reserved_tokens"]
    assert sum(1 for applied, _ in grants if not applied) >= 8


def test_usage_with_the_outcome_is_counted_once(store: TaskStore, budgets: str) -> None:
    set_budget(budgets, "acme", tokens=1000)
    task = insert_task(budgets, {"prompt": "count me"}, enterprise_id="acme")
    attempt = claimed(store, task)
    assert bind(store, task, attempt, 500)[0]
    report = [Write("usage", task, attempt, "w1",
                    doc={"input_tokens": 30, "output_tokens": 70, "cost": 0.25}, seq=1),
              Write("complete", task, attempt, "w1", doc={"answer": "done"})]
    assert [r.applied for r, _ in store.write_batch(report)] == [True, True]
    assert [r.applied for r, _ in store.write_batch(report)] == [False, False]  # a replay
    state = spend(budgets, "acme")
    assert (state["tokens"], float(state["cost"]), state["reserved_tokens"]) == (100, 0.25, 0)
    assert row(budgets, task)["usage"] == {"input_tokens": 30, "output_tokens": 70,
                                           "cost": 0.25}
    # The agent's running totals, which the bridge shows as Prometheus counters.
    totals = {a.agent: a for a in store.usage_totals()}["default"]
    assert (totals.input_tokens, totals.output_tokens, totals.cost) >= (30, 70, 0.25)


def test_each_run_of_an_attempt_counts_and_a_repeated_run_does_not(store: TaskStore,
                                                                   budgets: str) -> None:
    task = insert_task(budgets, {"prompt": "retried"}, enterprise_id="acme")
    attempt = claim_and_start(store, task)
    first = Write("usage", task, attempt, "w1", doc={"output_tokens": 10}, seq=1)
    second = Write("usage", task, attempt, "w1", doc={"output_tokens": 20}, seq=2)
    assert [r.applied for r, _ in store.write_batch([first])] == [True]
    assert [r.applied for r, _ in store.write_batch([first])] == [False]
    assert [r.applied for r, _ in store.write_batch([second])] == [True]
    assert row(budgets, task)["usage"]["output_tokens"] == 30
    assert spend(budgets, "acme")["tokens"] == 30  # counted without a budget too


def test_an_attempt_ending_without_a_report_is_charged_its_reservation(
        store: TaskStore, budgets: str) -> None:
    set_budget(budgets, "acme", tokens=1000)
    task = insert_task(budgets, {"prompt": "crashes"}, enterprise_id="acme")
    attempt = claimed(store, task)
    assert bind(store, task, attempt, 400)[0]
    assert store.cancel(task) == "processing"  # its worker is asked to stop ...
    assert store.request_cancel(task, attempt, holder_gone=True) == "failed"  # ... and is gone
    state = spend(budgets, "acme")
    assert (state["tokens"], state["reserved_tokens"]) == (400, 0)
    assert row(budgets, task)["usage"]["unreported_tokens"] == 400


def test_a_rescued_lease_is_charged_its_reservation(store: TaskStore, budgets: str) -> None:
    set_budget(budgets, "acme", tokens=1000)
    task = insert_task(budgets, {"prompt": "lost"}, enterprise_id="acme")
    attempt = claimed(store, task)
    (result, _), = store.write_batch([Write("bind", task, attempt, "w1", doc={"tokens": 250},
                                            seconds=0.001)])
    assert result.applied
    sql(budgets, "select pg_sleep(0.01)")
    assert [r.id for r in store.rescue()] == [task]
    assert spend(budgets, "acme")["tokens"] == 250
    assert row(budgets, task)["spend_reserved"] is None


def test_users_read_their_own_tenants_spend_only(budgets: str) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    set_budget(budgets, alice, tokens=500)
    for tenant in (alice, bob):
        sql(budgets, "insert into public.agent_tenant_usage (tenant, period, period_start, "
                     "output_tokens) values (%s, 'month', date_trunc('month', now() at time "
                     "zone 'UTC')::date, 123)", [tenant])
    with as_role(budgets, "authenticated", alice) as conn:
        mine = conn.execute("select tenant, token_budget, tokens, tokens_left "
                            "from public.agent_tenant_budget()").fetchall()
        seen = conn.execute("select tenant from public.agent_tenant_usage").fetchall()
    assert mine == [(alice, 500, 123, 377)]
    assert seen == [(alice,)]
    with pytest.raises(errors.InsufficientPrivilege), \
            as_role(budgets, "authenticated", alice) as conn:
        conn.execute("select * from public.agent_tenants_usage()")


def test_the_start_reserves_too(store: TaskStore, budgets: str) -> None:
    set_budget(budgets, "acme", tokens=100)
    task = insert_task(budgets, {"prompt": "big payload"}, enterprise_id="acme")
    attempt = claimed(store, task)
    started, result = store.start(task, attempt, "w1", 60, {"tokens": 250})
    assert result.applied and started is not None
    assert started.budget == {"tokens": 100, "cost": None}
    assert started.as_handler_input()["budget"] == {"tokens": 100, "cost": None}
