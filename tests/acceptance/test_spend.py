"""Spend control with real workers (issue 25): 200 tasks of one tenant at once, against a
token budget, end with what the handler bought within the budget; the rows the budget
could not cover end failed / BudgetExceeded without their handler running. Once with a
handler of the tests' own (a ledger of what it bought), once with the built-in OpenAI
handler against the fake OpenAI server (which counts every token it serves)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.db import sql
from tests.fakes.openai_server import FakeOpenAI
from tests.stack import Stack

BUDGET = 50_000
TASKS = 200


# With the row in the message the bind reserves; without, the start reads the row and a
# second bind reserves.
@pytest.mark.parametrize("inline_bytes", ["65536", "0"], ids=["inline", "read"])
def test_concurrent_tasks_of_one_tenant_stay_within_its_token_budget(
        clean_db: str, clean_redis: str, tmp_path: Path, inline_bytes: str) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    sql(clean_db, "insert into public.agent_tenant_limits (tenant, token_budget) "
                  "values (%s, %s)", [tenant, BUDGET])
    stack = Stack(clean_db, clean_redis, tmp_path, AGENT_HANDLER="tests.spend_handlers:metered",
                  TENANT_CONCURRENCY="0", BRIDGE_MAX_QUEUED="200", BRIDGE_BATCH_SIZE="200",
                  AGENT_INLINE_PAYLOAD_BYTES=inline_bytes)
    try:
        stack.worker(pool="threads", concurrency=50)
        stack.worker(pool="threads", concurrency=50)
        sql(clean_db, "insert into public.agent_task_requests (status, request_payload, "
                      "enterprise_id) select 'pending', jsonb_build_object('prompt', 'p' || i),"
                      " %s from generate_series(1, %s) i", [tenant, TASKS])
        stack.bridge()
        stack.wait_for("every task to end", lambda: sql(
            clean_db, "select count(*) from public.agent_task_requests "
                      "where status in ('completed', 'failed')")[0][0] == TASKS, 120)
        ledger = [line.split() for line in
                  (stack.state_dir / "spend.ledger").read_text().splitlines()]
        bought = sum(int(tokens) for _, tokens in ledger)
        assert 0 < bought <= BUDGET
        (spent, reserved), = sql(clean_db, "select tokens, reserved_tokens "
                                           "from agent_bridge.budget_state(%s)", [tenant])
        assert (spent, reserved) == (bought, 0)
        rows = sql(clean_db, "select id::text, status, error ->> 'type' "
                             "from public.agent_task_requests")
        ran = {task_id for task_id, _ in ledger}
        assert len(ran) == len(ledger)  # no handler ran twice
        for task_id, status, error_type in rows:
            if task_id in ran:
                assert status == "completed"
            else:
                assert (status, error_type) == ("failed", "BudgetExceeded")
        assert len(ran) >= BUDGET // 1000 - 5  # the budget was used, not refused early
    finally:
        stack.stop_all()
        sql(clean_db, "delete from public.agent_tenant_limits where tenant = %s", [tenant])


def test_the_openai_handler_keeps_a_tenant_within_its_budget(
        clean_db: str, clean_redis: str, tmp_path: Path) -> None:
    """The built-in handler declares its prompt plus OPENAI_MAX_TOKENS, lowers max_tokens to
    its grant, and reports the usage the API returns (streamed): the fake OpenAI server,
    which counts every token it serves, served at most the budget."""
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    sql(clean_db, "insert into public.agent_tenant_limits (tenant, token_budget) "
                  "values (%s, %s)", [tenant, BUDGET])
    with FakeOpenAI() as fake:
        for _ in range(TASKS):
            fake.respond(" ".join(["word"] * 1000), chunks=4, delay=0.2)
        stack = Stack(clean_db, clean_redis, tmp_path,
                      AGENT_HANDLER="tasks.handlers.openai_chat:handler",
                      OPENAI_BASE_URL=fake.url, OPENAI_API_KEY="sk-test-budget",
                      OPENAI_MODEL="test-model", OPENAI_SYSTEM_PROMPT="",
                      OPENAI_MAX_TOKENS="700", TENANT_CONCURRENCY="0",
                      BRIDGE_MAX_QUEUED="200", BRIDGE_BATCH_SIZE="200")
        try:
            stack.worker(pool="threads", concurrency=50)
            stack.worker(pool="threads", concurrency=50)
            sql(clean_db, "insert into public.agent_task_requests (status, request_payload, "
                          "enterprise_id) select 'pending', jsonb_build_object('prompt', "
                          "'tell me more ' || i), %s from generate_series(1, %s) i",
                [tenant, TASKS])
            stack.bridge()
            stack.wait_for("every task to end", lambda: sql(
                clean_db, "select count(*) from public.agent_task_requests "
                          "where status in ('completed', 'failed')")[0][0] == TASKS, 120)
            served = fake.tokens_served
            assert 0 < served <= BUDGET
            (spent,), = sql(clean_db, "select tokens from agent_bridge.budget_state(%s)",
                            [tenant])
            assert spent == served  # every run reported what the server counted
            outcomes = dict(sql(clean_db, "select coalesce(error ->> 'type', status), count(*) "
                                          "from public.agent_task_requests group by 1"))
            assert set(outcomes) == {"completed", "BudgetExceeded"}
            assert outcomes["completed"] == len(fake.served)  # a refused task never asked
        finally:
            stack.stop_all()
            sql(clean_db, "delete from public.agent_tenant_limits where tenant = %s",
                [tenant])
