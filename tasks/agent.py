"""The agent of the task in hand: which handler runs it, with which limits and options.

The runner binds the row's agent while its handler runs, so a shared handler (the
built-in OpenAI one) can read that agent's options from AGENTS_FILE through
`current_agent()`; outside a task it returns None.
"""

from __future__ import annotations

import contextvars

from bridge.agents import DEFAULT, Agent, Agents
from bridge.errors import AgentBridgeError
from tasks.app import settings
from tasks.handlers import Handler, load_handler

_current: contextvars.ContextVar[Agent | None] = contextvars.ContextVar(
    "agent_bridge_agent", default=None)


class UnknownAgent(AgentBridgeError, LookupError):
    """The row names an agent this worker is not configured for."""


def agents() -> Agents:
    return settings.configured_agents()


def agent_for(name: str) -> Agent:
    agent = agents().get(name)
    if agent is None:
        raise UnknownAgent(f"agent {name!r} is not configured on this worker (its agents: "
                           f"{', '.join(agents().names)}); set the same AGENTS for the bridge "
                           f"and the workers")
    return agent


def handler_of(agent: Agent) -> Handler:
    source = "AGENT_HANDLER" if agent.name == DEFAULT else f"AGENTS {agent.name}"
    return load_handler(agent.handler, source)


def current_agent() -> Agent | None:
    """The agent whose task this handler call runs (None outside a task)."""
    return _current.get()


def bind(agent: Agent) -> contextvars.Token[Agent | None]:
    return _current.set(agent)


def unbind(token: contextvars.Token[Agent | None]) -> None:
    _current.reset(token)
