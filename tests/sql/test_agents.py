"""Several agents, one table: AGENTS and AGENTS_FILE, the refusal of unknown agents at
insert, and real bridge and worker processes routing each agent's rows to its own queue,
workers, handler and limits."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from postgrest.exceptions import APIError
from psycopg import errors
from psycopg.types.json import Jsonb

from bridge.errors import StoreRejected
from bridge.migrate import migrate
from bridge.store import TaskStore
from tests.db import insert_task, sql
from tests.fakes.postgrest import SERVICE_KEY
from tests.schema import GUIDE_TABLE
from tests.users import ALICE, client, submit


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
    rows = {str(r[0]): r[1:] for r in sql(
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

    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("select public.agent_bridge_register_agents(%s)",
                     [Jsonb({"chat": {"queue": "agent_tasks.chat"}})])
    try:
        task_id, _ = submit(clean_db, ALICE, "request_payload, agent",
                            "'{\"prompt\": \"hi\"}', 'chat'")
        assert sql(clean_db, "select agent from public.agent_task_requests where id = %s",
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
        sql(clean_db, "select public.agent_bridge_register_agents('{}')")


def test_upgrade_puts_old_rows_on_the_default_agent(fresh_db: str) -> None:
    """The guide's table with rows, migrated: every row is the `default` agent's, and the
    guide's insert (no agent) still goes there."""
    sql(fresh_db, GUIDE_TABLE)
    for status in ("pending", "processing", "completed"):
        sql(fresh_db, "insert into agent_task_requests (status, request_payload) "
                      "values (%s, '{\"prompt\": \"old\"}')", [status])
    migrate(fresh_db)
    assert sql(fresh_db, "select distinct agent from public.agent_task_requests") == [
        ("default",)]
    [(new,)] = sql(fresh_db, "insert into agent_task_requests (status, request_payload) "
                             "values ('pending', '{\"prompt\": \"x\"}') returning agent")
    assert new == "default"
    claimed = sql(fresh_db, "select agent from public.agent_tasks_claim(10, 30, 0, "
                            "array['default'])")
    assert claimed == [("default",), ("default",)]
    migrate(fresh_db)  # and again: nothing changes
    assert len(sql(fresh_db, "select 1 from public.agent_task_requests")) == 4














