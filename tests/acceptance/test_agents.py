"""Several agents, one table: with real processes (a bridge, workers, the stand-ins). The SQL
side is tests/sql/test_agents.py."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from psycopg import errors

from bridge.localstack import free_port
from tests.db import insert_task
from tests.flower import AUTH, poll, start_flower
from tests.stack import BIN, REPO, Stack

CHAT = "chat=tests.agent_handlers:chat"
RESEARCH = "research=tests.agent_handlers:research"




def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)
























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
