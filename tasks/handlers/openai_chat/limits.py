"""The handler's rate limits (tasks/ratelimit): which key, which windows, what a request is
charged before it is sent.

The key is the provider key: a digest of the base URL and the API key (never the key
itself), so every worker with the same OPENAI_BASE_URL and OPENAI_API_KEY shares one
limit, and two keys have two. Its windows:

- the key's own: OPENAI_RPM and OPENAI_TPM;
- the tenant's: OPENAI_TENANT_RPM requests per minute of one tenant on the key;
- an agent's own, when its `[<agent>.openai]` table sets `rpm` / `tpm` / `tenant_rpm`:
  windows of that agent inside the key's (the agent's share; they never loosen the key's).

A request is charged up front: the prompt's estimate (`tasks.ratelimit.estimate_tokens`,
plus a few tokens a message) and OPENAI_MAX_TOKENS; the real usage settles it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

from bridge.agents import Agent
from tasks.handlers.openai_chat.settings import AGENT_LIMITS, Settings, check_tokens
from tasks.ratelimit import Window, estimate_tokens, tenant_of
from tasks.ratelimit.store import scope_part

# Tokens a chat message costs besides its text (role, separators), and the reply's priming.
PER_MESSAGE: Final = 4
PER_REPLY: Final = 3


def provider_key(current: Settings) -> str:
    """The limiter key of this base URL and API key: `openai-<digest>`."""
    digest = hashlib.sha256(f"{current.base_url}\n{current.api_key}".encode()).hexdigest()
    return f"openai-{digest[:20]}"


def agent_limits(agent: Agent | None) -> dict[str, int]:
    """The agent's own `rpm`, `tpm`, `tenant_rpm` (0: none)."""
    table: Mapping[str, Any] = agent.openai if agent is not None else {}
    return {name: int(table.get(name) or 0) for name in AGENT_LIMITS}


def windows(current: Settings, agent: Agent | None, task: Mapping[str, Any]) -> list[Window]:
    """Every window a request of this agent and task is charged to (none: no limit)."""
    tenant = scope_part(tenant_of(task))
    found: list[Window] = []
    if current.rpm or current.tpm:
        found.append(Window("", current.rpm, current.tpm))
    if current.tenant_rpm:
        found.append(Window(f"tenant:{tenant}", current.tenant_rpm))
    own = agent_limits(agent)
    if agent is not None and (own["rpm"] or own["tpm"]):
        found.append(Window(f"agent:{agent.name}", own["rpm"], own["tpm"]))
    if agent is not None and own["tenant_rpm"]:
        found.append(Window(f"agent:{agent.name}:tenant:{tenant}", own["tenant_rpm"]))
    return found


def estimate(messages: Iterable[Mapping[str, Any]], max_tokens: int) -> int:
    """Tokens charged before the request: the prompt's estimate plus its most answer."""
    prompt = sum(estimate_tokens(str(m.get("content") or "")) + PER_MESSAGE for m in messages)
    return prompt + PER_REPLY + max_tokens


def check_agents(current: Settings, agents: Iterable[Agent]) -> None:
    """An agent whose own `tpm` is set needs a most-answer size (its `max_tokens` or
    OPENAI_MAX_TOKENS); SettingsError names the agent."""
    for agent in agents:
        own = agent_limits(agent)
        max_tokens = int(agent.openai.get("max_tokens") or current.max_tokens)
        check_tokens(own["tpm"], max_tokens, f"AGENTS_FILE [{agent.name}.openai] tpm",
                     "max_tokens (or OPENAI_MAX_TOKENS)")
        if current.tpm and agent.openai.get("max_tokens"):
            check_tokens(current.tpm, max_tokens, "OPENAI_TPM",
                         f"AGENTS_FILE [{agent.name}.openai] max_tokens")
