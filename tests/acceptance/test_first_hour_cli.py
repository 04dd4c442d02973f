"""The first hour (issue 22): what a new user types after the demo, run as they run it
(the installed `agent-bridge` and `celery` in a subprocess): bad settings, a database
without our schema, following a streamed answer, short ids, and the small noise."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bridge.migrate import SCHEMA_VERSION, compat_sql, migrate, migration_files
from bridge.store import TaskStore
from bridge.store.postgres import PostgresTransport
from tests.commands import AGENT_BRIDGE, cli, env_with
from tests.db import insert_task, sql
from tests.fakes.postgrest import SERVICE_KEY, PostgrestStub
from tests.stack import BIN, REPO, Stack

NO_SCHEMA = (f"the database has no agent-bridge schema (found version none, need "
             f"{SCHEMA_VERSION})")
MIGRATE = "run `agent-bridge migrate`"
DB_PUSH = "run `supabase db push` (or `agent-bridge migrate` with DATABASE_URL)"
TWINS = ("abcdef01-1111-4000-8000-000000000000", "abcdef01-2222-4000-8000-000000000000")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a command wrote on stderr (and no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.fixture(params=["postgres", "supabase"])
def transport(request: pytest.FixtureRequest, clean_db: str) -> dict[str, str]:
    """The CLI's environment on each transport, on the (empty) test table."""
    if request.param == "postgres":
        return env_with(DATABASE_URL=clean_db)
    return env_with(BRIDGE_TRANSPORT="supabase", SUPABASE_URL=request.getfixturevalue("postgrest"),
                    SUPABASE_SERVICE_KEY=SERVICE_KEY)


# 4. Bad settings never give a traceback ---------------------------------------------
@pytest.mark.parametrize(("variable", "value", "said"), [
    ("LOG_LEVEL", "verbose", "LOG_LEVEL=verbose is not a log level: use DEBUG, INFO, WARNING, "
                             "ERROR or CRITICAL"),
    ("SUPABASE_REALTIME", "yesplease", "SUPABASE_REALTIME='yesplease' must be true or false "
                                       "(or 1/0, yes/no, on/off)"),
    ("BRIDGE_TRANSPORT", "pg", "BRIDGE_TRANSPORT=pg is not a transport: use auto, postgres or "
                               "supabase"),
    ("POLL_INTERVAL", "soon", "POLL_INTERVAL='soon' is not a number (e.g. 2.5)"),
])
@pytest.mark.parametrize("command", [["run"], ["check"], ["submit", "hi"], ["status"],
                                     ["show", "abcdef01"], ["dev"]],
                         ids=["run", "check", "submit", "status", "show", "dev"])
def test_a_bad_setting_is_one_line_before_any_command_starts(
        command: list[str], variable: str, value: str, said: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "dev-data"
    args = [*command, "--data-dir", str(data_dir)] if command == ["dev"] else command
    result = cli(*args, env=env_with(DATABASE_URL="postgresql://u@127.0.0.1:9/x",
                                     **{variable: value}), timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert one_line(result) == f"agent-bridge: {said}"
    assert result.stdout == ""
    assert not data_dir.exists()  # dev started no PostgreSQL, no Redis


def test_log_level_in_any_case_is_accepted(clean_db: str, clean_redis: str) -> None:
    result = cli("run", "--once", env=env_with(DATABASE_URL=clean_db, REDIS_URL=clean_redis,
                                               LOG_LEVEL="warning"))
    assert result.returncode == 0, result.stderr


def test_a_worker_with_a_bad_setting_says_one_line() -> None:
    result = subprocess.run(
        [str(BIN / "celery"), "-A", "tasks", "worker", "--without-mingle", "--without-gossip"],
        env=env_with(LOG_LEVEL="verbose", DATABASE_URL="postgresql://u@127.0.0.1:9/x"),
        cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert one_line(result) == ("agent-bridge: configuration error: LOG_LEVEL=verbose is not a "
                                "log level: use DEBUG, INFO, WARNING, ERROR or CRITICAL")


def test_a_worker_refuses_a_bad_openai_setting_at_start() -> None:
    """The OpenAI handler's settings, read where they are read (the worker), at its start:
    one line, not a failed task (with a traceback in the log) per request."""
    result = subprocess.run(
        [str(BIN / "celery"), "-A", "tasks", "worker", "-P", "threads", "--without-mingle",
         "--without-gossip"],
        env=env_with(AGENT_HANDLER="tasks.handlers.openai_chat:handler", OPENAI_API_KEY="k",
                     OPENAI_TEMPERATURE="hot", DATABASE_URL="postgresql://u@127.0.0.1:9/x"),
        cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    said = "agent-bridge: OPENAI_TEMPERATURE='hot' is not a number (e.g. 2.5)"
    assert (result.stdout + result.stderr).count(said) == 1, result.stderr


# 5. A database without our schema ---------------------------------------------------
@pytest.fixture(params=["postgres", "supabase"])
def unmigrated(request: pytest.FixtureRequest, fresh_db: str
               ) -> Iterator[tuple[dict[str, str], str]]:
    """(the CLI's environment, the fix it should name) on an empty database."""
    if request.param == "postgres":
        yield env_with(DATABASE_URL=fresh_db), MIGRATE
        return
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(compat_sql().encode())  # what every Supabase project has: its roles
    stub = PostgrestStub(fresh_db, service_key=SERVICE_KEY)
    url = stub.start()
    try:
        yield env_with(BRIDGE_TRANSPORT="supabase", SUPABASE_URL=url,
                       SUPABASE_SERVICE_KEY=SERVICE_KEY), DB_PUSH
    finally:
        stub.stop()


@pytest.mark.parametrize("args", [
    ["submit", "hi"], ["submit", "hi", "--follow"], ["show", TWINS[0]], ["show", "abcdef01"],
    ["cancel", TWINS[0]], ["retry", "--all"], ["retry", "abcdef01"], ["run", "--once"]],
    ids=["submit", "submit-follow", "show", "show-short", "cancel", "retry", "retry-short",
         "run-once"])
def test_every_command_names_a_missing_schema_and_the_fix(
        unmigrated: tuple[dict[str, str], str], clean_redis: str, args: list[str]) -> None:
    env, fix = unmigrated
    result = cli(*args, env={**env, "REDIS_URL": clean_redis})
    assert result.returncode == 1, result.stdout + result.stderr
    assert one_line(result) == f"agent-bridge {args[0]}: {NO_SCHEMA}: {fix}"


def test_an_old_schema_says_its_version(fresh_db: str, tmp_path: Path) -> None:
    """Version 3 (the migrations before issue 20's): a call of version 4 names both."""
    old = tmp_path / "v3"
    old.mkdir()
    for path in migration_files():
        if path.name < "20261203":
            shutil.copy(path, old / path.name)
    migrate(fresh_db, old)
    result = cli("prune", "--dry-run", env=env_with(DATABASE_URL=fresh_db))
    assert result.returncode == 1
    assert one_line(result) == (f"agent-bridge prune: the database has agent-bridge schema "
                                f"version 3, need {SCHEMA_VERSION}: {MIGRATE}")
    check = cli("check", env=env_with(DATABASE_URL=fresh_db))
    assert check.returncode == 1
    missing = next(line for line in check.stdout.splitlines()
                   if line.startswith("❌ Functions missing: "))
    assert "agent_tasks_prune" in missing.split(" → ")[0]  # among the later versions' names


def test_run_waits_for_the_migration_saying_so_once(fresh_db: str, clean_redis: str,
                                                    tmp_path: Path) -> None:
    stack = Stack(fresh_db, clean_redis, tmp_path, AGENT_HANDLER="tasks.handlers.simulated:"
                  "process_task")
    try:
        bridge = stack.bridge(wait=False)
        bridge.wait_for_output("no agent-bridge schema", 30)
        time.sleep(2.5)  # five polls at POLL_INTERVAL=0.5
        assert bridge.output.count("no agent-bridge schema") == 1, bridge.output
        assert "unavailable" not in bridge.output
        migrate(fresh_db)
        bridge.wait_for_output("schema is installed", 30)
        stack.worker()
        done = cli("submit", "after the migration", "--wait",
                   env=env_with(DATABASE_URL=fresh_db, REDIS_URL=clean_redis))
        assert done.returncode == 0, done.stderr + stack.logs()
        assert "✅ completed" in done.stdout
        assert bridge.output.count("no agent-bridge schema") == 1
    finally:
        stack.stop_all()


# 6. Watch a streaming answer ------------------------------------------------------
class Follower:
    """A `--follow` command whose output is read as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([str(AGENT_BRIDGE), *args], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, bufsize=0)
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read(1):
            self.out += chunk

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.out:
            assert time.monotonic() < deadline, f"no {text!r} in {self.out!r}"
            assert self.proc.poll() is None or text in self.out, self.out
            time.sleep(0.05)

    def finish(self) -> tuple[int, str, str]:
        code = self.proc.wait(60)
        self._reader.join(10)
        assert self.proc.stderr is not None
        return code, self.out, self.proc.stderr.read()


def answer(tokens: int) -> str:
    return "".join(f"t{i} " for i in range(tokens))


def test_submit_follow_prints_the_answer_as_it_grows(stack: Stack, transport: dict[str, str]
                                                     ) -> None:
    stack.bridge(AGENT_HANDLER="tests.stream_handler:tokens")
    stack.worker(AGENT_HANDLER="tests.stream_handler:tokens")
    follower = Follower(["submit", "stream please", "--follow", "--context",
                         '{"tokens": 12, "delay": 0.05, "settle": 0.4, "hold": "go"}'],
                        {**transport, "REDIS_URL": stack.env["REDIS_URL"]})
    follower.wait_for(answer(12))  # all of it streamed, while the handler still holds it
    task_id = follower.out.splitlines()[0]
    assert stack.row(task_id)["status"] == "processing"
    (stack.state_dir / "go").touch()
    code, out, err = follower.finish()
    assert code == 0, err
    assert out == f"{task_id}\n{answer(12)}\n"
    assert "Traceback" not in err


def test_show_follow_a_short_id_and_a_failure(stack: Stack, transport: dict[str, str]) -> None:
    stack.bridge(AGENT_HANDLER="tests.stream_handler:tokens")
    stack.worker(AGENT_HANDLER="tests.stream_handler:tokens")
    env = {**transport, "REDIS_URL": stack.env["REDIS_URL"]}
    submitted = cli("submit", "stream then break", "--context",
                    '{"tokens": 6, "delay": 0.05, "settle": 0.4, "hold": "go", "raise": "boom"}',
                    env=env)
    task_id = submitted.stdout.strip()
    follower = Follower(["show", task_id[:8], "--follow"], env)
    follower.wait_for(answer(6))
    assert follower.out.startswith(f"Task {task_id}\n")
    (stack.state_dir / "go").touch()
    code, out, err = follower.finish()
    assert code == 1
    assert out.endswith(f"{answer(6)}\n")
    assert err.strip().splitlines()[-1] == "ValueError: boom"


# 7. Short ids ---------------------------------------------------------------------
def test_short_ids_everywhere_an_id_is_taken(clean_db: str, transport: dict[str, str]) -> None:
    for task in TWINS:
        insert_task(clean_db, {"prompt": "twin"}, id=task)

    ambiguous = cli("show", "abcdef01", env=transport)
    assert ambiguous.returncode == 1
    assert one_line(ambiguous) == (f"agent-bridge show: abcdef01 is the start of several task "
                                   f"ids: {TWINS[0]}, {TWINS[1]}; give more of it")
    shown = cli("show", "ABCDEF01-1", env=transport)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"Task {TWINS[0]}"
    missing = cli("show", "deadbeef", env=transport)
    assert missing.returncode == 1
    assert one_line(missing) == ("agent-bridge show: no task deadbeef (or not visible with "
                                 "this key)")

    cancelled = cli("cancel", "abcdef012", env=transport)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"🛑 {TWINS[1]} cancelled"
    both = cli("cancel", "abcdef01", env=transport)
    assert both.returncode == 1 and "is the start of several task ids" in one_line(both)
    retried = cli("retry", "abcdef0122", env=transport)
    assert retried.returncode == 0, retried.stderr
    assert TWINS[1] in retried.stdout
    nothing = cli("retry", "0123456789", env=transport)
    assert nothing.returncode == 1
    assert "0123456789" in one_line(nothing)
    assert sql(clean_db, "select count(*) from public.agent_task_requests "
                         "where status = 'pending'") == [(2,)]  # nothing else was requeued


def test_a_short_id_must_have_eight_hex_digits() -> None:
    result = cli("show", "abc123", env=env_with())
    assert result.returncode == 2
    assert "'abc123' is not a task id: give the whole id or its first 8 characters or more" \
        in result.stderr


# 11. Small noise ------------------------------------------------------------------
def test_check_says_see_env_example_once() -> None:
    result = cli("check", env=env_with())
    assert result.returncode == 1
    assert result.stdout.count(".env.example") == 1, result.stdout


def test_show_after_an_operator_retry_counts_what_the_user_expects(
        clean_db: str, transport: dict[str, str]) -> None:
    task = insert_task(clean_db, {"prompt": "fails once"})
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("update public.agent_task_requests set status = 'failed', attempts = 1, "
                     "error = '{\"type\": \"Boom\", \"message\": \"it broke\"}', "
                     "finished_at = now() where id = %s", [task])
    assert "❌ failed (attempt 1)" in cli("show", task, env=transport).stdout
    assert cli("retry", task[:8], env=transport).returncode == 0
    assert "⏳ pending (after attempt 1, 3 more left)" in cli("show", task, env=transport).stdout
    store = TaskStore(PostgresTransport(clean_db, pool=False))
    try:
        assert [c.attempt for c in store.claim(10, 30)] == [2]
    finally:
        store.close()
    shown = cli("show", task[:8], env=transport).stdout
    assert "⚙️  processing (attempt 2, 2 more left)" in shown
    assert " of 4" not in shown
