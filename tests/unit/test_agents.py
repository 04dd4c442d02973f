"""Several agents, one table: the parts that need no server. The SQL side is
tests/sql/test_agents.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bridge.config import ConfigError, Settings

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
    agents = settings(AGENTS=" chat=tasks.handlers.openai_chat:handler, "
                                       "research=myapp.research:run ,").configured_agents()
    assert [(a.name, a.handler, a.queue) for a in agents] == [
        ("default", "tasks.handlers.simulated:process_task", "agent_tasks"),
        ("chat", "tasks.handlers.openai_chat:handler", "agent_tasks.chat"),
        ("research", "myapp.research:run", "agent_tasks.research")]
    assert "myapp" not in sys.modules
    assert agents.registration() == {
        "chat": {"queue": "agent_tasks.chat", "max_attempts": None},
        "research": {"queue": "agent_tasks.research", "max_attempts": None}}
    other = settings(AGENTS="chat=a.b:c", CELERY_QUEUE="jobs").configured_agents()
    assert [a.queue for a in other] == ["jobs", "jobs.chat"]
    assert other.for_queue("jobs.chat") is other.get("chat")
    assert settings().configured_agents().names == ["default"]


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
    agents = settings(AGENTS=f"{CHAT},{RESEARCH}", AGENTS_FILE=path,
                                AGENT_MAX_RETRIES="4").configured_agents()
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
    chat = settings(AGENTS=CHAT).configured_agents().by_name["chat"]
    token = agent_context.bind(
        type(chat)(**{**chat.__dict__, "openai": {"model": "small", "temperature": 0.1}}))
    try:
        tuned = for_agent(base)
    finally:
        agent_context.unbind(token)
    assert (tuned.model, tuned.temperature, tuned.system_prompt) == (
        "small", 0.1, base.system_prompt)
























