"""The `agent-bridge` commands run as a user runs them: a subprocess of the installed
entry point, configured through the environment, against the real test database,
Redis, PostgREST stub and (where it matters) a real bridge and Celery worker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bridge.localstack import free_port
from bridge.migrate import SCHEMA_VERSION, migration_files
from tests.commands import AGENT_BRIDGE, cli, env_with
from tests.db import fetch_task, insert_task, sql
from tests.fakes.postgrest import SERVICE_KEY
from tests.stack import REPO, Stack

SUBCOMMANDS = ("run", "migrate", "submit", "status", "show", "check", "retry", "cancel", "prune",
               "migrations")






def closed_port_url(scheme: str) -> str:
    return f"{scheme}://127.0.0.1:{free_port()}/0"


def fail_row(db_url: str, task_id: str, error_type: str, ago: str = "0 seconds") -> None:
    """Mark a row failed as a worker would have, finished `ago`."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "update public.agent_task_requests set status = 'failed', attempts = 1, "
            "error = jsonb_build_object('type', %s::text, 'message', 'it broke'), "
            "finished_at = now() - %s::interval where id = %s",
            [error_type, ago, task_id])


# Without any service ----------------------------------------------------------------
def test_help_lists_every_subcommand() -> None:
    result = cli("--help", env=env_with())
    assert result.returncode == 0
    for name in SUBCOMMANDS:  # argparse puts a long name on a line of its own
        assert re.search(rf"\n    {name}\s", result.stdout), name


@pytest.mark.parametrize("args", [("status",), ("submit", "hello"), ("retry", "--all")],
                         ids=["status", "submit", "retry"])
def test_missing_configuration_is_one_line_without_traceback(args: tuple[str, ...]) -> None:
    result = cli(*args, env=env_with())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"agent-bridge {args[0]}: Set DATABASE_URL, or SUPABASE_URL and SUPABASE_SERVICE_KEY "
        f"(see .env.example)"]
    assert "Traceback" not in result.stdout + result.stderr


def test_check_without_configuration_says_what_to_do() -> None:
    result = cli("check", env=env_with())
    assert result.returncode == 1
    assert result.stdout.startswith("❌ Configuration: Set DATABASE_URL")
    assert ".env.example" in result.stdout and "Traceback" not in result.stderr


def test_submit_rejects_context_that_is_not_a_json_object() -> None:
    for context, message in [("{nope", "--context is not valid JSON"),
                             ("[1, 2]", "--context must be a JSON object")]:
        result = cli("submit", "hi", "--context", context, env=env_with())
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1
        assert message in result.stderr and "Traceback" not in result.stderr


def test_retry_needs_a_selector() -> None:
    result = cli("retry", env=env_with())
    assert result.returncode == 2
    assert "--all" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert cli("retry", "not-a-uuid", env=env_with()).returncode == 2
    bad_since = cli("retry", "--since", "yesterday", env=env_with())
    assert bad_since.returncode == 2 and "neither an ISO time" in bad_since.stderr


# Database and Redis, no processes -----------------------------------------------------
def test_migrate_twice_on_a_fresh_database(fresh_db: str) -> None:
    first = cli("migrate", env=env_with(DATABASE_URL=fresh_db))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "✅ applied supabase_compat.sql",
        *(f"✅ applied {path.name}" for path in migration_files())]
    again = cli("migrate", env=env_with(DATABASE_URL=fresh_db))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "✅ applied supabase_compat.sql",
        "✅ up to date: every migration is recorded in supabase_migrations.schema_migrations"]


@pytest.mark.parametrize("args", [("migrate",), ("status",), ("submit", "hi"),
                                  ("run", "--once"), ("retry", "--all"),
                                  ("show", "7521c2a2-ffb5-4741-afe1-9ff068e4bc8a")])
def test_a_database_url_that_is_not_a_url_is_one_line(args: tuple[str, ...]) -> None:
    """`DATABASE_URL=not-a-url agent-bridge migrate` printed a psycopg traceback."""
    result = cli(*args, env=env_with(DATABASE_URL="not-a-url"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"agent-bridge {args[0]}: DATABASE_URL is not a valid connection string (missing "
        '"=" after "not-a-url" in connection info string); expected '
        "postgresql://user:password@host:5432/dbname"]


def test_run_once_exits_saying_what_failed(clean_db: str, clean_redis: str) -> None:
    """`run --once` never returned while the database or Redis was down; now it does one
    round and its exit code says which: 3 the database, 4 Redis, 0 a good round."""
    no_db = cli("run", "--once", env=env_with(DATABASE_URL=closed_port_url("postgresql"),
                                              REDIS_URL=clean_redis))
    assert no_db.returncode == 3, no_db.stderr
    assert no_db.stderr.strip().splitlines()[-1].startswith(
        "agent-bridge run: the round failed, the database (or Supabase) is unreachable: ")
    no_redis = cli("run", "--once", env=env_with(DATABASE_URL=clean_db,
                                                 REDIS_URL=closed_port_url("redis")))
    assert no_redis.returncode == 4, no_redis.stderr
    assert no_redis.stderr.strip().splitlines()[-1].startswith(
        "agent-bridge run: the round failed, the broker (Redis) is unreachable: ")
    task_id = insert_task(clean_db)
    good = cli("run", "--once", env=env_with(DATABASE_URL=clean_db, REDIS_URL=clean_redis))
    assert good.returncode == 0, good.stderr
    assert fetch_task(clean_db, task_id)["status"] == "processing"  # claimed and enqueued
    assert "Traceback" not in no_db.stderr + no_redis.stderr + good.stderr


def test_submit_reads_the_prompt_from_stdin_or_a_file(fresh_db: str, tmp_path: Path) -> None:
    """A 2 MiB prompt cannot go through argv (E2BIG); `-` reads stdin, --file a file."""
    from bridge.migrate import migrate

    migrate(fresh_db)
    name = psycopg.conninfo.conninfo_to_dict(fresh_db)["dbname"]
    with psycopg.connect(fresh_db, autocommit=True) as conn:  # the 1 MiB default, raised
        conn.execute(f"alter database \"{name}\" set agent_bridge.max_request_bytes = '4194304'")
    env = env_with(DATABASE_URL=fresh_db)
    big = "é" * (1024 * 1024) + "\nthe end"  # 2 MiB of UTF-8
    piped = cli("submit", "-", env=env, stdin=big)
    assert piped.returncode == 0, piped.stderr
    path = tmp_path / "prompt.txt"
    path.write_text("from a file ✓", encoding="utf-8")
    filed = cli("submit", "--file", str(path), env=env)
    assert filed.returncode == 0, filed.stderr
    with psycopg.connect(fresh_db) as conn:
        prompts = {str(r[0]): r[1] for r in conn.execute(
            "select id, request_payload ->> 'prompt' from public.agent_task_requests")}
    assert prompts == {piped.stdout.strip(): big, filed.stdout.strip(): "from a file ✓"}
    both = cli("submit", "x", "--file", str(path), env=env)
    assert both.returncode == 1
    assert both.stderr.strip() == ("agent-bridge submit: give the prompt as an argument or "
                                   "with --file, not both")
    empty = cli("submit", "-", env=env, stdin="  \n")
    assert (empty.returncode, empty.stderr.strip()) == (1, "agent-bridge submit: the prompt "
                                                           "is empty")
    missing = cli("submit", "--file", str(tmp_path / "nope.txt"), env=env)
    assert missing.returncode == 1 and "cannot read --file" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("transport", ["postgres", "supabase"])
def test_show_prints_a_task_and_status_lists_the_latest_failures(
        transport: str, clean_db: str, clean_redis: str, request: pytest.FixtureRequest
        ) -> None:
    """`show ID`: status, attempts, error, answer, timings; `status`: the latest failures
    with their errors. Both transports."""
    env = env_with(DATABASE_URL=clean_db, REDIS_URL=clean_redis)
    if transport == "supabase":
        env = env_with(BRIDGE_TRANSPORT="supabase", REDIS_URL=clean_redis,
                       SUPABASE_URL=request.getfixturevalue("postgrest"),
                       SUPABASE_SERVICE_KEY=SERVICE_KEY)
    failed = insert_task(clean_db, {"prompt": "breaks"})
    fail_row(clean_db, failed, "Boom")
    done = insert_task(clean_db, {"prompt": "works"})
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("update public.agent_task_requests set status = 'completed', attempts = 1,"
                     " started_at = created_at + interval '1 second', finished_at = "
                     "created_at + interval '3 seconds', response_payload = "
                     "'{\"answer\": \"forty-two\"}' where id = %s", [done])

    shown = cli("show", failed, env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"Task {failed}"
    assert "❌ failed (attempt 1)" in lines[1]
    assert "  error     Boom: it broke" in lines
    ok = cli("show", done, env=env).stdout.splitlines()
    assert "  answer    forty-two" in ok and "✅ completed (attempt 1)" in ok[1]
    assert any(line.startswith("  finished") and line.endswith("(2.000 s)") for line in ok)
    as_json = json.loads(cli("show", done, "--json", env=env).stdout)
    assert as_json["status"] == "completed" and as_json["response_payload"] == {
        "answer": "forty-two"}
    nobody = cli("show", "7521c2a2-ffb5-4741-afe1-9ff068e4bc8a", env=env)
    assert nobody.returncode == 1
    assert nobody.stderr.strip() == ("agent-bridge show: no task "
                                     "7521c2a2-ffb5-4741-afe1-9ff068e4bc8a (or not visible "
                                     "with this key)")
    assert cli("show", "not-a-uuid", env=env).returncode == 2

    status = cli("status", env=env)
    assert "Latest failures (agent-bridge show ID)" in status.stdout
    assert any(failed in line and line.endswith("Boom: it broke")
               for line in status.stdout.splitlines())
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert [(f["id"], f["error"]) for f in report["latest_failures"]] == [
        (failed, "Boom: it broke")]


@pytest.mark.parametrize(("module", "handler", "says"), [
    ("", "nowhere.at_all:handle", "cannot import nowhere.at_all: No module named 'nowhere'"),
    ("raise RuntimeError('no API key in this environment')\n", "broken_at_import:handle",
     "importing broken_at_import failed: RuntimeError: no API key in this environment"),
    ("def other(task):\n    return {}\n", "no_such_callable:handle",
     "no_such_callable has no callable 'handle'"),
])
def test_a_worker_whose_handler_cannot_be_imported_refuses_to_start(
        tmp_path: Path, module: str, handler: str, says: str) -> None:
    """It must not announce itself ONLINE and then fail every task."""
    if module:
        (tmp_path / f"{handler.partition(':')[0]}.py").write_text(module)
    env = env_with(AGENT_HANDLER=handler, DATABASE_URL=closed_port_url("postgresql"),
                   REDIS_URL=closed_port_url("redis"),
                   PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]))
    worker = subprocess.run(
        [str(AGENT_BRIDGE.parent / "celery"), "-A", "tasks", "worker", "-P", "threads",
         "-c", "1", "--without-mingle", "--without-gossip"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)
    assert worker.returncode != 0
    assert f"agent-bridge: AGENT_HANDLER={handler!r}: {says}" in worker.stderr
    assert "ONLINE" not in worker.stdout + worker.stderr
    assert "Traceback" not in worker.stderr


def test_submit_in_supabase_mode_creates_a_row(postgrest: str, clean_db: str) -> None:
    env = env_with(BRIDGE_TRANSPORT="supabase", SUPABASE_URL=postgrest,
                   SUPABASE_SERVICE_KEY=SERVICE_KEY, POLL_INTERVAL="0.2")
    result = cli("submit", "From the CLI", "--context", '{"lang": "en"}', "--priority", "5",
                 env=env)
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    row = fetch_task(clean_db, task_id)
    assert row["status"] == "pending" and row["priority"] == 5
    assert row["request_payload"] == {"prompt": "From the CLI", "context": {"lang": "en"}}

    # --wait reads the row back through the table API; nothing runs it, so it times out.
    waited = cli("submit", "nobody home", "--wait", "--timeout", "1", env=env)
    assert waited.returncode == 2
    lines = waited.stdout.splitlines()
    assert len(lines) == 2 and lines[1].endswith("⏳ pending")
    assert "gave up waiting after 1s; the task is still pending" in waited.stderr


def test_status_json_counts_in_both_transports(clean_db: str, clean_redis: str,
                                               postgrest: str) -> None:
    for _ in range(2):
        insert_task(clean_db)
    fail_row(clean_db, insert_task(clean_db), "ValueError")
    postgres = env_with(DATABASE_URL=clean_db, REDIS_URL=clean_redis)
    supabase = env_with(BRIDGE_TRANSPORT="supabase", SUPABASE_URL=postgrest,
                        SUPABASE_SERVICE_KEY=SERVICE_KEY, REDIS_URL=clean_redis)
    for transport, env in [("postgres", postgres), ("supabase", supabase)]:
        result = cli("status", "--json", env=env)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["transport"] == transport
        assert report["database"] == {"reachable": True, "error": None}
        assert report["counts"] == {"pending": 2, "processing": 0, "completed": 0, "failed": 1}
        assert report["due"] == 2 and report["expired_leases"] == 0
        assert report["oldest_due_seconds"] >= 0
        assert report["broker"]["reachable"] and report["broker"]["queue_depth"] == 0
        assert report["workers"] == {"online": [], "error": None, "queues": {}}
        assert [(a["agent"], a["pending"], a["failed"], a["queue_depth"], a["workers"])
                for a in report["agents"]] == [("default", 2, 1, 0, [])]

    table = cli("status", env=postgres)
    assert table.returncode == 0
    assert "Pending         2 (2 due now, the oldest for " in table.stdout
    assert "none online" in table.stdout


def test_status_shows_what_is_down() -> None:
    env = env_with(DATABASE_URL=closed_port_url("postgresql"), REDIS_URL=closed_port_url("redis"))
    result = cli("status", "--json", env=env)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert not report["database"]["reachable"]
    assert "database unreachable" in report["database"]["error"]
    assert not report["broker"]["reachable"] and "Connection refused" in report["broker"]["error"]
    assert report["workers"]["error"] == "not asked: the broker is unreachable"
    table = cli("status", env=env)
    assert table.returncode == 1 and "❌" in table.stdout and "Traceback" not in table.stderr


def test_check_reports_a_missing_table(fresh_db: str, clean_redis: str) -> None:
    result = cli("check", env=env_with(DATABASE_URL=fresh_db, REDIS_URL=clean_redis))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("✅ Configuration found: Postgres transport")
    assert lines[1] == "✅ Database reachable"
    assert lines[2] == ("❌ Table public.agent_task_requests is missing → run `agent-bridge "
                        "migrate` (DATABASE_URL) or `supabase db push`")
    assert lines[3].startswith("✅ Redis reachable at redis://")
    assert lines[4].startswith("❌ No worker online → start one: celery -A tasks worker")

    status = cli("status", "--json", env=env_with(DATABASE_URL=fresh_db, REDIS_URL=clean_redis))
    assert status.returncode == 1
    database = json.loads(status.stdout)["database"]
    assert database["reachable"] and "no agent-bridge schema" in database["error"]


def test_check_reports_a_stopped_redis(clean_db: str) -> None:
    redis_url = closed_port_url("redis")
    result = cli("check", env=env_with(DATABASE_URL=clean_db, REDIS_URL=redis_url))
    assert result.returncode == 1
    redis_line = next(line for line in result.stdout.splitlines() if "Redis" in line)
    assert redis_line.startswith(f"❌ Redis not reachable at {redis_url}")
    for fix in ("redis-server", "apt install redis-server", "brew install redis",
                "docker compose up redis", "WSL"):
        assert fix in redis_line
    assert "✅ Table and" in result.stdout  # the database part still passed
    assert "Traceback" not in result.stderr


def test_check_reports_a_rejected_supabase_key(postgrest: str, clean_redis: str) -> None:
    env = env_with(BRIDGE_TRANSPORT="supabase", SUPABASE_URL=postgrest,
                   SUPABASE_SERVICE_KEY="an-anon-key", REDIS_URL=clean_redis)
    result = cli("check", env=env)
    assert result.returncode == 1
    assert "❌ SUPABASE_SERVICE_KEY rejected: use a secret key (sb_secret_...) or the " \
           "legacy service_role key" in result.stdout

    good = cli("check", env={**env, "SUPABASE_SERVICE_KEY": SERVICE_KEY})
    assert "✅ Supabase reachable with the service key" in good.stdout
    assert f"✅ Table and functions installed (schema version {SCHEMA_VERSION})" in good.stdout


def test_retry_selects_by_age_and_error_type(clean_db: str) -> None:
    old = insert_task(clean_db)
    fail_row(clean_db, old, "TimeLimitExceeded", ago="3 hours")
    recent = insert_task(clean_db)
    fail_row(clean_db, recent, "ValueError")
    env = env_with(DATABASE_URL=clean_db)

    result = cli("retry", "--since", "1h", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["🔁 Requeued 1 failed task(s)", f"   {recent}"]
    assert fetch_task(clean_db, recent)["status"] == "pending"
    assert fetch_task(clean_db, old)["status"] == "failed"

    assert cli("retry", "--error-type", "ValueError", env=env).stdout.startswith(
        "🔁 Requeued 0 failed task(s)")
    result = cli("retry", "--error-type", "TimeLimitExceeded", "--attempts", "2", env=env)
    assert result.stdout.startswith("🔁 Requeued 1 failed task(s)")
    row = fetch_task(clean_db, old)
    assert row["status"] == "pending" and row["max_attempts"] == 3  # 1 used + 2 more

    # A named row that is not failed is reported and makes the exit code 1.
    result = cli("retry", old, env=env)
    assert result.returncode == 1 and old in result.stderr


# A live stack -------------------------------------------------------------------------
def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_live_stack_check_submit_and_metrics(stack: Stack) -> None:
    port = free_port()
    stack.worker()
    stack.bridge(METRICS_PORT=str(port))

    check = cli("check", env=stack.env)
    assert check.returncode == 0, check.stdout
    assert "❌" not in check.stdout and check.stdout.count("✅") == 5
    assert "1 worker(s) online: w0-" in check.stdout

    ok = cli("submit", "Hello Agent, are you online?", "--wait", "--timeout", "30",
             env=stack.env)
    assert ok.returncode == 0, ok.stdout + ok.stderr + stack.logs()
    lines = ok.stdout.splitlines()
    task_id = lines[0]
    assert stack.row(task_id)["status"] == "completed"
    assert lines[1].endswith("⏳ pending") or lines[1].endswith("⚙️  processing (attempt 1)")
    assert lines[-2].endswith("✅ completed")
    assert lines[-1] == "Agent processed: Hello Agent, are you online?"

    text = metrics(port)
    assert 'agent_bridge_claimed_total{agent="default"} 1.0' in text
    assert 'agent_bridge_enqueued_total{agent="default"} 1.0' in text

    failed = cli("submit", "x", "--context", '{"raise": "boom"}', "--wait", "--timeout", "30",
                 env=stack.env)
    assert failed.returncode == 1
    assert failed.stdout.splitlines()[-1].endswith("❌ failed")
    assert failed.stderr.strip() == "ValueError: boom"

    status = cli("status", "--json", env=stack.env)
    report: dict[str, Any] = json.loads(status.stdout)
    assert report["counts"]["completed"] == 1 and report["counts"]["failed"] == 1
    assert len(report["workers"]["online"]) == 1


def test_retry_runs_a_failed_task_again_through_celery(stack: Stack) -> None:
    flag = stack.tmp / "the-condition-is-fixed"
    task_id = insert_task(stack.db_url, {"prompt": "p", "context": {
        "fail_unless_file": str(flag)}})
    stack.worker()
    stack.bridge()
    stack.wait_for("the first failure", lambda: stack.row(task_id)["status"] == "failed")
    assert stack.row(task_id)["error"]["message"] == f"{flag} does not exist"

    flag.touch()
    result = cli("retry", task_id, env=stack.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["🔁 Requeued 1 failed task(s)", f"   {task_id}"]

    stack.wait_for("the retried run", lambda: stack.row(task_id)["status"] == "completed")
    row = stack.row(task_id)
    assert row["attempts"] == 2 and row["error"] is None
    assert row["response_payload"]["answer"] == "Agent processed: p"
    assert [line.split()[-1] for line in stack.runs(task_id)] == ["attempt=1", "attempt=2"]


def test_cli_refuses_a_boolean_typo_in_one_line() -> None:
    result = cli("status", env=env_with(SUPABASE_REALTIME="ture"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "agent-bridge: SUPABASE_REALTIME='ture' must be true or false "
        "(or 1/0, yes/no, on/off)"]



def test_submit_reports_a_payload_stored_failed(clean_db: str) -> None:
    size_limit = 1048576  # agent_bridge.max_request_bytes as shipped
    result = cli("submit", "-", env=env_with(DATABASE_URL=clean_db), stdin="z" * 1_100_000)
    assert result.returncode == 1, result.stderr
    task_id = result.stdout.strip()
    assert sql(clean_db, "select status from public.agent_task_requests where id = %s",
               [task_id]) == [("failed",)]
    assert result.stderr.strip().startswith("InvalidRequest: request_payload is ")
    assert result.stderr.strip().endswith(f"bytes; the limit is {size_limit} bytes")
