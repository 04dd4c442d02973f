"""Scheduled agents (issue 26): the Supabase Cron recipe of docs/recipes/scheduled_agents.sql.
pg_cron is not installed here, so each job's command is read out of its cron.schedule call
and run as pg_cron would run it: one statement, as a role that bypasses RLS. What pg_cron
itself does (the schedule, the worker, cron.job_run_details) is not run."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.store import TaskStore
from tests.db import as_role, sql

RECIPE = Path(__file__).resolve().parents[2] / "docs" / "recipes" / "scheduled_agents.sql"
LEASE = 60.0

# pg_cron's cron.schedule(job_name text, schedule text, command text), as the file writes it:
# literal name and schedule, the command dollar-quoted on lines of its own.
SCHEDULE_CALL = re.compile(
    r"^select cron\.schedule\('(?P<name>[a-z0-9-]+)', '(?P<schedule>[^']+)', \$\$\n"
    r"(?P<command>.*?)\n\$\$\);$", re.MULTILINE | re.DOTALL)
# Five cron fields (minute hour day-of-month month day-of-week) of digits, *, ranges, lists
# and steps.
CRON_FIELDS = re.compile(r"^[\d*,/-]+( [\d*,/-]+){4}$")


def recipe_jobs() -> dict[str, tuple[str, str]]:
    """{job name: (schedule, command)} of every cron.schedule call in the recipe file."""
    text = RECIPE.read_text()
    jobs = {m["name"]: (m["schedule"], m["command"]) for m in SCHEDULE_CALL.finditer(text)}
    # Every call in the file is one the pattern read (none left out by a changed layout).
    calls = [line for line in text.splitlines() if "cron.schedule(" in line
             and not line.lstrip().startswith("--")]
    assert len(calls) == len(jobs), calls
    return jobs


def command(name: str) -> str:
    return recipe_jobs()[name][1]


@pytest.fixture
def report_agent(store: TaskStore) -> Iterator[TaskStore]:
    """The store, with the recipe's `report` agent registered (as a bridge whose AGENTS
    name it does at start), and none after the test."""
    store.register_agents({"report": {"queue": "agent_tasks.report", "max_attempts": None}})
    yield store
    store.register_agents({})


def finished_task(db_url: str, ago: str, *, enterprise_id: str | None = None,
                  user_id: str | None = None, status: str = "completed",
                  payload: str = '{"prompt": "p"}') -> None:
    """A row the app's users inserted `ago`, finished since."""
    sql(db_url, """
        insert into public.agent_task_requests (status, request_payload, enterprise_id, user_id,
                                                attempts, created_at, finished_at)
        values (%s, %s::jsonb, %s, %s, 1, now() - %s::interval, now())""",
        [status, payload, enterprise_id, user_id, ago])


def reports(db_url: str) -> dict[str, dict[str, Any]]:
    """The daily-report rows the job inserted (agent `report`), by tenant."""
    rows = sql(db_url, """
        select tenant, status, agent, enterprise_id, user_id::text, request_payload
          from public.agent_task_requests
         where request_payload #>> '{context,job}' = 'daily-report' and agent = 'report'""")
    return {t: {"status": s, "agent": a, "enterprise_id": e, "user_id": u, "payload": p}
            for t, s, a, e, u, p in rows}


def yesterday(db_url: str) -> str:
    (day,), = sql(db_url, "select to_char((now() at time zone 'utc')::date - 1, 'YYYY-MM-DD')")
    return str(day)


def test_recipe_schedules_each_job_with_cron_schedule_name_schedule_command() -> None:
    jobs = recipe_jobs()
    assert jobs == {"acme-morning-briefing": ("0 6 * * 1-5", jobs["acme-morning-briefing"][1]),
                    "daily-report": ("0 7 * * *", jobs["daily-report"][1])}
    for schedule, cmd in jobs.values():
        assert CRON_FIELDS.match(schedule), schedule
        assert "$$" not in cmd and cmd.strip().startswith(("insert", "with"))
    assert "select cron.unschedule('daily-report');" in RECIPE.read_text()


def test_briefing_job_inserts_one_pending_row_the_bridge_claims(
        report_agent: TaskStore, clean_db: str) -> None:
    sql(clean_db, command("acme-morning-briefing"))
    rows = sql(clean_db, "select id::text, status, agent, tenant, request_payload, "
                         "to_char(now() at time zone 'utc', 'YYYY-MM-DD') "
                         "from public.agent_task_requests")
    assert len(rows) == 1
    task_id, status, agent, tenant, payload, today = rows[0]
    assert (status, agent, tenant) == ("pending", "report", "acme")
    assert payload["prompt"]
    assert payload["context"] == {"job": "acme-morning-briefing", "date": today}
    claims = report_agent.claim(10, LEASE, agents=["report"])
    assert [(c.id, c.agent) for c in claims] == [(task_id, "report")]


def test_daily_report_inserts_one_row_per_tenant_active_yesterday(
        report_agent: TaskStore, clean_db: str) -> None:
    user = str(uuid.uuid4())
    finished_task(clean_db, "1 day", enterprise_id="acme")
    finished_task(clean_db, "1 day", enterprise_id="acme", status="failed")
    finished_task(clean_db, "1 day", user_id=user)                   # a user without enterprise
    finished_task(clean_db, "1 day")                                 # 'shared': no report
    finished_task(clean_db, "2 days", enterprise_id="globex")        # not yesterday
    finished_task(clean_db, "0 seconds", enterprise_id="initech")    # today
    finished_task(clean_db, "1 day", enterprise_id="hooli",          # a report itself
                  payload='{"prompt": "r", "context": {"job": "daily-report"}}')
    day = yesterday(clean_db)

    sql(clean_db, command("daily-report"))

    found = reports(clean_db)
    assert set(found) == {"acme", user}
    acme, mine = found["acme"], found[user]
    assert (acme["agent"], acme["enterprise_id"], acme["user_id"]) == ("report", "acme", None)
    assert (mine["agent"], mine["enterprise_id"], mine["user_id"]) == ("report", None, user)
    next_day = sql(clean_db, "select to_char(%s::date + 1, 'YYYY-MM-DD')", [day])[0][0]
    assert acme["payload"]["context"] == {
        "job": "daily-report", "tenant": "acme", "date": day,
        "from": f"{day}T00:00:00Z", "to": f"{next_day}T00:00:00Z",
        "tasks": 2, "completed": 1, "failed": 1}
    assert mine["payload"]["context"]["tasks"] == 1
    assert day in acme["payload"]["prompt"]

    inserted = {r[0] for r in sql(clean_db, "select id::text from public.agent_task_requests "
                                            "where agent = 'report'")}
    claims = report_agent.claim(10, LEASE)
    assert len(claims) == 2
    assert {c.id for c in claims} == inserted
    assert {c.agent for c in claims} == {"report"}


def test_daily_report_run_again_the_same_day_adds_only_missing_reports(
        report_agent: TaskStore, clean_db: str) -> None:
    finished_task(clean_db, "1 day", enterprise_id="acme")
    finished_task(clean_db, "1 day", enterprise_id="globex")
    sql(clean_db, command("daily-report"))
    sql(clean_db, command("daily-report"))
    assert set(reports(clean_db)) == {"acme", "globex"}
    (count,), = sql(clean_db, "select count(*) from public.agent_task_requests "
                              "where agent = 'report'")
    assert count == 2

    # A report already claimed or finished still counts; only a missing one is added.
    report_agent.claim(10, LEASE)
    sql(clean_db, "delete from public.agent_task_requests where enterprise_id = 'globex' "
                  "and agent = 'report'")
    sql(clean_db, command("daily-report"))
    (added,), = sql(clean_db, "select array_agg(tenant) from public.agent_task_requests "
                              "where agent = 'report' and status = 'pending'")
    assert added == ["globex"]


def test_daily_report_runs_as_a_role_that_bypasses_rls_without_being_superuser(
        report_agent: TaskStore, clean_db: str) -> None:
    # Supabase's postgres role (what pg_cron runs a job as there) bypasses RLS and is not a
    # superuser; service_role is the same kind of role here.
    finished_task(clean_db, "1 day", enterprise_id="acme")
    with as_role(clean_db, "service_role") as conn:
        conn.execute(command("daily-report"))
    assert set(reports(clean_db)) == {"acme"}
