"""Several agents, one table: AGENTS and AGENTS_FILE, the refusal of unknown agents at
insert, and real bridge and worker processes routing each agent's rows to its own queue,
workers, handler and limits."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from postgrest.exceptions import APIError
from psycopg import errors
from psycopg.types.json import Jsonb

from bridge.agents import configure
from bridge.config import ConfigError, Settings
from bridge.errors import StoreRejected
from bridge.localstack import free_port
from bridge.migrate import migrate
from bridge.store import TaskStore
from tests.db import insert_task
from tests.fakes.postgrest import SERVICE_KEY
from tests.stack import BIN, REPO, Stack
from tests.test_flower import AUTH, poll, start_flower
from tests.test_migration import GUIDE_TABLE, run

CHAT = "chat=tests.agent_handlers:chat"
RESEARCH = "research=tests.agent_handlers:research"


def settings(**env: str) -> Settings:
    return Settings.from_env(env, dotenv=False)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# AGENTS and AGENTS_FILE ----------------------------------------------------------------
def test_agents_their_handlers_and_queues() -> None:
    """`default` keeps CELERY_QUEUE and AGENT_HANDLER; agent X gets CELERY_QUEUE.X. Only
    names: a handler the bridge could not import is fine."""
    agents = configure(settings(AGENTS=" chat=tasks.handlers.openai_chat:handler, "
                                       "research=myapp.research:run ,"))
    assert [(a.name, a.handler, a.queue) for a in agents] == [
        ("default", "tasks.handlers.simulated:process_task", "agent_tasks"),
        ("chat", "tasks.handlers.openai_chat:handler", "agent_tasks.chat"),
        ("research", "myapp.research:run", "agent_tasks.research")]
    assert "myapp" not in sys.modules
    assert agents.registration() == {
        "chat": {"queue": "agent_tasks.chat", "max_attempts": None},
        "research": {"queue": "agent_tasks.research", "max_attempts": None}}
    other = configure(settings(AGENTS="chat=a.b:c", CELERY_QUEUE="jobs"))
    assert [a.queue for a in other] == ["jobs", "jobs.chat"]
    assert other.for_queue("jobs.chat") is other.get("chat")
    assert configure(settings()).names == ["default"]


@pytest.mark.parametrize(("raw", "message"), [
    ("chat", "must look like name=package.module:callable"),
    ("default=a.b:c", "the `default` agent's handler is AGENT_HANDLER"),
    ("Chat=a.b:c", "agent name 'Chat' must be lower-case"),
    ("chat=a.b", "chat='a.b' must look like package.module:callable"),
    ("chat=a.b:c,chat=d.e:f", "AGENTS names 'chat' twice"),
])
def test_bad_agents_setting(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(AGENTS=raw)


def test_agents_file(tmp_path: Path) -> None:
    path = write(tmp_path / "agents.toml", """
[default]
time_limit = 120

[research]
time_limit = 1200
max_retries = 8
max_attempts = 2

[chat.openai]
model = "gpt-4o-mini"
system_prompt = "Answer in one short paragraph."
temperature = 0.2
""")
    agents = configure(settings(AGENTS=f"{CHAT},{RESEARCH}", AGENTS_FILE=path,
                                AGENT_MAX_RETRIES="4"))
    default, chat, research = agents
    assert (default.time_limit, default.max_retries, default.max_attempts) == (120, 4, None)
    assert (chat.time_limit, chat.max_retries) == (600, 4)
    assert chat.openai == {"model": "gpt-4o-mini", "temperature": 0.2,
                           "system_prompt": "Answer in one short paragraph."}
    assert (research.time_limit, research.max_retries, research.max_attempts) == (1200, 8, 2)
    assert research.openai == {}
    assert agents.registration()["research"]["max_attempts"] == 2


@pytest.mark.parametrize(("text", "message"), [
    ("[reserch]\ntime_limit = 5", "configures agent 'reserch', which AGENTS does not name "
                                  r"\(agents: chat, default\)"),
    ("[chat]\ntimeout = 5", r"\[chat\]: unknown setting\(s\) timeout"),
    ("[chat]\ntime_limit = 0", r"\[chat\]: time_limit = 0 must be a number more than 0"),
    ("[chat]\nmax_retries = 1.5", "max_retries = 1.5 must be a whole number at least 0"),
    ("[chat]\nmax_attempts = 0", "max_attempts = 0 must be a whole number at least 1"),
    ("[chat.openai]\nmodel = 3", "model must be a string"),
    ("[chat.openai]\nbase_url = 'x'", "unknown setting 'base_url'"),
    ("[chat]\ntime_limit = 5000", "raise it to at least"),
    ("chat = 1", "'chat' must be a table"),
    ("[chat", "is not valid TOML"),
])
def test_bad_agents_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "agents.toml", text)
    with pytest.raises(ConfigError, match=message):
        settings(AGENTS=CHAT, AGENTS_FILE=path)


def test_missing_agents_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        settings(AGENTS_FILE=str(tmp_path / "nope.toml"))


def test_openai_handler_takes_the_running_agents_options() -> None:
    """Two agents share the built-in handler with their own model and system prompt."""
    from tasks import agent as agent_context
    from tasks.handlers.openai_chat import Settings as OpenAISettings
    from tasks.handlers.openai_chat import for_agent

    base = OpenAISettings(api_key="k")
    assert for_agent(base) is base  # outside a task
    chat = configure(settings(AGENTS=CHAT)).by_name["chat"]
    token = agent_context.bind(
        type(chat)(**{**chat.__dict__, "openai": {"model": "small", "temperature": 0.1}}))
    try:
        tuned = for_agent(base)
    finally:
        agent_context.unbind(token)
    assert (tuned.model, tuned.temperature, tuned.system_prompt) == (
        "small", 0.1, base.system_prompt)


# The database: registration, refusal, start ------------------------------------------------
@pytest.fixture
def no_agents(store: TaskStore) -> Iterator[TaskStore]:
    """The store, with no agent registered before or after the test."""
    store.register_agents({})
    yield store
    store.register_agents({})


def test_unknown_agent_refused_at_insert(no_agents: TaskStore, clean_db: str) -> None:
    store = no_agents
    # Before any bridge has registered its AGENTS, only `default` is known.
    with pytest.raises(errors.InvalidParameterValue,
                       match=r'(?m)unknown agent "chat"; known agents: default$'):
        insert_task(clean_db, agent="chat")
    assert store.register_agents({"research": {"queue": "agent_tasks.research",
                                               "max_attempts": 2},
                                  "chat": {"queue": "agent_tasks.chat",
                                           "max_attempts": None}}) == ["chat", "research"]
    chat = insert_task(clean_db, agent="chat")
    research = insert_task(clean_db, agent="research")
    old_style = insert_task(clean_db)
    rows = {str(r[0]): r[1:] for r in run(
        clean_db, "select id, agent, max_attempts from public.agent_task_requests")}
    assert rows == {chat: ("chat", 3), research: ("research", 2), old_style: ("default", 3)}
    with pytest.raises(errors.InvalidParameterValue,
                       match='unknown agent "reserch"; known agents: chat, default, research'):
        insert_task(clean_db, agent="reserch")
    # Through the store (the Supabase transport: PostgREST's table API) the same words.
    with pytest.raises(StoreRejected, match='unknown agent "nope"'):
        store.insert({"prompt": "hi"}, agent="nope")
    assert store.insert({"prompt": "hi"}, agent="chat")

    # Registering again replaces the list; the dropped agent's rows stay as they are.
    assert store.register_agents({"chat": {"queue": "agent_tasks.chat",
                                           "max_attempts": None}}) == ["chat"]
    with pytest.raises(errors.InvalidParameterValue, match=r"(?m)known agents: chat, default$"):
        insert_task(clean_db, agent="research")
    stats = {a.agent: (a.pending, a.due, a.processing, a.failed) for a in store.agent_stats()}
    assert stats == {"chat": (2, 2, 0, 0), "default": (1, 1, 0, 0),
                     "research": (1, 1, 0, 0)}


def test_start_returns_the_rows_agent(no_agents: TaskStore, clean_db: str) -> None:
    store = no_agents
    store.register_agents({"chat": {"queue": "agent_tasks.chat", "max_attempts": None}})
    task_id = insert_task(clean_db, agent="chat")
    claims = store.claim(10, 30, agents=["chat"])
    assert [(c.id, c.attempt, c.agent) for c in claims] == [(task_id, 1, "chat")]
    started, result = store.start(task_id, 1, "w1", 30)
    assert result.applied and started is not None
    assert started.agent == "chat" and started.as_handler_input()["agent"] == "chat"
    # The fencing is unchanged: another worker cannot take the live attempt.
    again, refused = store.start(task_id, 1, "w2", 30)
    assert again is None and not refused.applied and refused.worker == "w1"


def test_users_choose_the_agent_and_get_a_400_for_an_unknown_one(
        clean_db: str, postgrest: str) -> None:
    """Through PostgREST (the stand-in) a signed-in user's insert names the agent; an
    unknown one answers 400 with the known agents, which supabase-js shows."""
    from tests.db import as_role
    from tests.test_security import ALICE, client, submit

    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("select public.agent_bridge_register_agents(%s)",
                     [Jsonb({"chat": {"queue": "agent_tasks.chat"}})])
    try:
        task_id, _ = submit(clean_db, ALICE, "request_payload, agent",
                            "'{\"prompt\": \"hi\"}', 'chat'")
        assert run(clean_db, "select agent from public.agent_task_requests where id = %s",
                   [task_id]) == [("chat",)]
        with pytest.raises(errors.InvalidParameterValue, match="known agents: chat, default"), \
                as_role(clean_db, "authenticated", ALICE) as conn:
            conn.execute("insert into public.agent_task_requests (request_payload, agent) "
                         "values ('{\"prompt\": \"hi\"}', 'nope')")
        with pytest.raises(APIError) as refused:
            client(postgrest, SERVICE_KEY).table("agent_task_requests").insert(
                {"request_payload": {"prompt": "hi"}, "agent": "nope"}).execute()
        assert refused.value.code == "22023"
        assert 'unknown agent "nope"; known agents: chat, default' in str(refused.value.message)
    finally:
        run(clean_db, "select public.agent_bridge_register_agents('{}')")


def test_upgrade_puts_old_rows_on_the_default_agent(fresh_db: str) -> None:
    """The guide's table with rows, migrated: every row is the `default` agent's, and the
    guide's insert (no agent) still goes there."""
    run(fresh_db, GUIDE_TABLE)
    for status in ("pending", "processing", "completed"):
        run(fresh_db, "insert into agent_task_requests (status, request_payload) "
                      "values (%s, '{\"prompt\": \"old\"}')", [status])
    migrate(fresh_db)
    assert run(fresh_db, "select distinct agent from public.agent_task_requests") == [
        ("default",)]
    [(new,)] = run(fresh_db, "insert into agent_task_requests (status, request_payload) "
                             "values ('pending', '{\"prompt\": \"x\"}') returning agent")
    assert new == "default"
    claimed = run(fresh_db, "select agent from public.agent_tasks_claim(10, 30, 0, "
                            "array['default'])")
    assert claimed == [("default",), ("default",)]
    migrate(fresh_db)  # and again: nothing changes
    assert len(run(fresh_db, "select 1 from public.agent_task_requests")) == 4


# Real processes ------------------------------------------------------------------------------
def depth(stack: Stack, queue: str) -> int:
    return int(redis.Redis.from_url(stack.env["REDIS_URL"]).llen(queue))


def count(stack: Stack, agent: str, status: str) -> int:
    return sum(1 for r in stack.rows() if r["agent"] == agent and r["status"] == status)


def status_json(stack: Stack) -> dict[str, Any]:
    out = subprocess.run([str(BIN / "agent-bridge"), "status", "--json"], env=stack.env,
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return dict(json.loads(out.stdout))


def test_each_row_runs_on_a_worker_of_its_agent_with_its_handler(stack: Stack) -> None:
    stack.env.update(AGENTS=f"{CHAT},{RESEARCH}", AGENTS_FILE=write(
        stack.tmp / "agents.toml", '[chat.openai]\nmodel = "small"\n'))
    stack.worker(queues="agent_tasks.chat", TEST_WORKER="chat-worker")
    stack.worker(queues="agent_tasks.research,agent_tasks", TEST_WORKER="research-worker")
    # The bridge routes by name only: an agent whose code it cannot import is fine.
    port = free_port()
    bridge = stack.bridge(AGENTS=f"{CHAT},{RESEARCH},ghost=not_installed.module:run",
                          METRICS_PORT=str(port))
    bridge.wait_for_output("🧭 Agents:")

    ids = {agent: [insert_task(stack.db_url, {"prompt": f"{agent} {i}"}, agent=agent)
                   for i in range(3)] for agent in ("chat", "research", "default")}
    with pytest.raises(errors.InvalidParameterValue,
                       match='unknown agent "nope"; known agents: chat, default, ghost, '
                             'research'):
        insert_task(stack.db_url, {"prompt": "x"}, agent="nope")
    rows = {str(r["id"]): r for r in stack.wait_all_done()}

    for task_id in ids["chat"]:
        answer = rows[task_id]["response_payload"]
        assert (answer["handler"], answer["agent"], answer["worker"], answer["options"]) == (
            "chat", "chat", "chat-worker", {"model": "small"})
    for task_id in ids["research"]:
        answer = rows[task_id]["response_payload"]
        assert (answer["handler"], answer["agent"], answer["worker"], answer["options"]) == (
            "research", "research", "research-worker", {})
    chat_log, research_log = stack.procs[0].output, stack.procs[1].output
    for task_id in ids["default"]:
        assert rows[task_id]["response_payload"]["answer"].startswith("Agent processed: default")
        assert task_id in research_log and task_id not in chat_log

    submitted = subprocess.run(
        [str(BIN / "agent-bridge"), "submit", "from the CLI", "--agent", "chat", "--wait",
         "--timeout", "60"], env=stack.env, cwd=REPO, capture_output=True, text=True,
        timeout=90)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    task_id = submitted.stdout.splitlines()[0]
    assert stack.row(task_id)["response_payload"]["worker"] == "chat-worker"
    ids["chat"].append(task_id)

    report = status_json(stack)
    by_agent = {a["agent"]: a for a in report["agents"]}
    assert by_agent["chat"]["workers"] == [n for n in report["workers"]["online"]
                                           if n.startswith("w0-")]
    assert by_agent["research"]["workers"] == by_agent["default"]["workers"] == [
        n for n in report["workers"]["online"] if n.startswith("w1-")]
    assert by_agent["chat"]["queue"] == "agent_tasks.chat"
    assert (by_agent["research"]["processing"], by_agent["research"]["failed"]) == (0, 0)
    table = subprocess.run([str(BIN / "agent-bridge"), "status"], env=stack.env, cwd=REPO,
                           capture_output=True, text=True, timeout=60).stdout
    lines = {line.split()[0]: line for line in table.splitlines()[-4:]}
    assert lines["chat"].split()[1:] == ["0", "0", "0", "agent_tasks.chat:", "0", "1"]

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    for agent, n in (("chat", 4), ("research", 3), ("default", 3)):
        assert f'agent_bridge_claimed_total{{agent="{agent}"}} {n}.0' in metrics
        assert f'agent_bridge_enqueued_total{{agent="{agent}"}} {n}.0' in metrics
    assert 'agent_bridge_queue_depth{agent="ghost"} 0.0' in metrics


def test_a_full_queue_of_one_agent_never_stops_another(stack: Stack) -> None:
    """Research's worker is busy and its queue full (BRIDGE_MAX_QUEUED); its backlog
    waits in the table, and a chat row inserted now still runs at once."""
    stack.env.update(AGENTS=f"{CHAT},{RESEARCH}", LEASE_SECONDS="30")
    stack.worker(queues="agent_tasks.research", concurrency=1)
    stack.worker(queues="agent_tasks.chat")
    stack.bridge(BRIDGE_MAX_QUEUED="2", BRIDGE_BATCH_SIZE="10").wait_for_output("🧭 Agents:")
    flag = stack.tmp / "let-research-go"
    research = [insert_task(stack.db_url, {"prompt": f"slow {i}",
                                           "context": {"wait_for_file": str(flag)}},
                            agent="research") for i in range(8)]
    # One running, two waiting in Redis, the other five still pending in the table.
    stack.wait_for("research's queue to fill", lambda: (
        depth(stack, "agent_tasks.research") == 2 and count(stack, "research", "pending") == 5))

    chat = insert_task(stack.db_url, {"prompt": "quick"}, agent="chat")
    stack.wait_for("the chat row", lambda: stack.row(chat)["status"] == "completed")
    assert stack.row(chat)["response_payload"]["handler"] == "chat"
    # Research's queue was not overfilled meanwhile.
    assert count(stack, "research", "pending") == 5
    assert depth(stack, "agent_tasks.research") == 2

    # Flower shows each agent's queue and how full it is.
    port = free_port()
    flower = start_flower(stack, port)

    def queue_lengths() -> dict[str, int] | None:
        response = httpx.get(f"http://127.0.0.1:{port}/api/queues/length", auth=AUTH,
                             timeout=5)
        found = {q["name"]: q["messages"] for q in response.json()["active_queues"]}
        return found if len(found) == 2 else None

    assert poll("Flower's queue lengths", queue_lengths, flower) == {
        "agent_tasks.research": 2, "agent_tasks.chat": 0}

    flag.touch()
    rows = {str(r["id"]): r for r in stack.wait_all_done(120)}
    assert all(rows[t]["status"] == "completed" for t in research)


def test_per_agent_time_limit_retries_and_max_attempts(stack: Stack) -> None:
    stack.env.update(AGENTS=f"{CHAT},{RESEARCH}", AGENTS_FILE=write(
        stack.tmp / "agents.toml",
        "[research]\ntime_limit = 1\nmax_retries = 1\nmax_attempts = 2\n"
        "[chat]\nmax_retries = 3\n"))
    stack.worker(pool="threads", concurrency=4)
    stack.bridge().wait_for_output("🧭 Agents:")
    slow_research = insert_task(stack.db_url, {"prompt": "r", "context": {"sleep": 5}},
                                agent="research")
    slow_default = insert_task(stack.db_url, {"prompt": "d", "context": {"sleep": 1.5}})
    flaky_chat = insert_task(stack.db_url, {"prompt": "c", "context": {
        "retryable_failures": 2}}, agent="chat")
    flaky_research = insert_task(stack.db_url, {"prompt": "r", "context": {
        "retryable_failures": 2}}, agent="research")
    rows = {str(r["id"]): r for r in stack.wait_all_done()}

    assert rows[slow_research]["status"] == "failed"
    assert rows[slow_research]["error"]["type"] == "TimeLimitExceeded"
    assert rows[slow_research]["error"]["message"] == (
        "the handler ran longer than agent 'research''s time_limit=1s")
    assert rows[slow_default]["status"] == "completed"  # AGENT_TIME_LIMIT=60 applies

    assert rows[flaky_chat]["status"] == "completed"
    assert len(stack.runs(flaky_chat)) == 3
    assert rows[flaky_research]["status"] == "failed"
    assert "(gave up after 1 retries)" in rows[flaky_research]["error"]["message"]
    assert len(stack.runs(flaky_research)) == 2

    assert rows[slow_research]["max_attempts"] == 2 and rows[flaky_chat]["max_attempts"] == 3


def test_a_worker_serves_only_queues_of_known_agents(stack: Stack) -> None:
    stack.env.update(AGENTS=f"{CHAT},ghost=not_installed.module:run")
    unknown = stack.worker(wait=False, queues="agent_tasks.nope")
    assert unknown.popen.wait(60) != 0
    assert "queue 'agent_tasks.nope' belongs to no agent" in unknown.output
    ghost = stack.worker(wait=False, queues="agent_tasks.ghost")
    assert ghost.popen.wait(60) != 0
    assert "AGENTS ghost='not_installed.module:run': cannot import not_installed" in ghost.output
    # A chat worker does not need the ghost agent's code.
    stack.worker(queues="agent_tasks.chat")
