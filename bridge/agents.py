"""The agents: each one's handler, Celery queue and limits, from AGENTS and AGENTS_FILE.

`AGENTS=chat=tasks.handlers.openai_chat:handler,research=myapp.research:run` names
the agents besides `default` (whose handler is AGENT_HANDLER). `AGENTS_FILE` names an
optional TOML file with one table per agent:

    [research]
    time_limit = 1200     # seconds (AGENT_TIME_LIMIT for this agent)
    max_retries = 8       # AGENT_MAX_RETRIES for this agent
    max_attempts = 2      # given to the agent's new rows (the table's default is 3)

    [chat.openai]         # the built-in OpenAI handler, for this agent only
    model = "gpt-4o-mini"
    system_prompt = "Answer in one short paragraph."
    temperature = 0.2
    max_tokens = 800      # also what one run may spend (reserved from the tenant's budget)
    rpm = 60              # this agent's share of the key's requests / tokens per minute
    tpm = 40000

Only names and strings live here: the bridge routes by name and never imports a
handler (the worker does, in tasks/).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError

DEFAULT = "default"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # the same check as agent_bridge_agents
HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

# What a table of AGENTS_FILE may set, and for `openai` what the built-in handler takes.
LIMITS = ("time_limit", "max_retries", "max_attempts")
OPENAI_KEYS = {"model": str, "system_prompt": str, "temperature": float,
               "max_tokens": int, "rpm": int, "tpm": int, "tenant_rpm": int}


@dataclass(frozen=True)
class Agent:
    name: str
    handler: str  # `package.module:callable`, imported by the worker only
    queue: str
    time_limit: float
    max_retries: int
    max_attempts: int | None = None  # None: new rows keep the table's default
    openai: Mapping[str, Any] = field(default_factory=dict)  # overrides of OPENAI_*


@dataclass(frozen=True)
class Agents:
    """Every configured agent, `default` first."""

    by_name: Mapping[str, Agent]

    def __iter__(self) -> Iterator[Agent]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> Agent | None:
        return self.by_name.get(name)

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def for_queue(self, queue: str) -> Agent | None:
        return next((a for a in self if a.queue == queue), None)

    def registration(self) -> dict[str, dict[str, Any]]:
        """What the bridge registers in agent_bridge_agents (all but `default`)."""
        return {a.name: {"queue": a.queue, "max_attempts": a.max_attempts}
                for a in self if a.name != DEFAULT}


def queue_name(base: str, agent: str) -> str:
    """The Celery queue of `agent`: `base` for `default`, else `base.agent`."""
    return base if agent == DEFAULT else f"{base}.{agent}"


@cache
def configure(agent_handler: str, agents: str, agents_file: str, *, celery_queue: str,
              time_limit: float, max_retries: int) -> Agents:
    """The agents of AGENT_HANDLER, AGENTS and AGENTS_FILE, with the other settings as
    their defaults (Settings.configured_agents passes them: this module does not import
    bridge.config, which imports it); ConfigError says what is wrong and where. Whether
    each agent's time limit fits the visibility timeout is Settings.validate's check."""
    handlers = {DEFAULT: agent_handler, **parse_agents(agents)}
    tables = read_file(agents_file) if agents_file else {}
    for name in tables:
        if name not in handlers:
            raise ConfigError(
                f"AGENTS_FILE={agents_file} configures agent {name!r}, which AGENTS "
                f"does not name (agents: {', '.join(sorted(handlers))})")
    found: dict[str, Agent] = {}
    for name, handler in handlers.items():
        table = tables.get(name, {})
        where = f"AGENTS_FILE [{name}]"
        found[name] = Agent(
            name=name, handler=handler, queue=queue_name(celery_queue, name),
            time_limit=_number(table, "time_limit", time_limit, where, low=0, strict=True),
            max_retries=int(_number(table, "max_retries", max_retries, where, low=0,
                                    integer=True)),
            max_attempts=(None if "max_attempts" not in table else int(
                _number(table, "max_attempts", 0, where, low=1, integer=True))),
            openai=_openai(table.get("openai", {}), where))
    return Agents(found)


def parse_agents(raw: str) -> dict[str, str]:
    """AGENTS: `name=package.module:callable`, comma-separated -> {name: handler}."""
    handlers: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, handler = (s.strip() for s in item.partition("="))
        if not sep or not name or not handler:
            raise ConfigError(f"AGENTS: {item!r} must look like name=package.module:callable")
        if name == DEFAULT:
            raise ConfigError("AGENTS: the `default` agent's handler is AGENT_HANDLER; "
                              "give this agent another name")
        if not NAME.match(name):
            raise ConfigError(f"AGENTS: agent name {name!r} must be lower-case letters, "
                              "digits, '-' or '_' (at most 63), starting with a letter or digit")
        if not HANDLER.match(handler):
            raise ConfigError(f"AGENTS: {name}={handler!r} must look like "
                              "package.module:callable")
        if name in handlers:
            raise ConfigError(f"AGENTS names {name!r} twice")
        handlers[name] = handler
    return handlers


def read_file(path: str) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"AGENTS_FILE={path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"AGENTS_FILE={path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"AGENTS_FILE={path} is not valid TOML: {exc}") from None
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"AGENTS_FILE={path}: {name!r} must be a table ([{name}])")
        unknown = sorted(set(table) - {*LIMITS, "openai"})
        if unknown:
            raise ConfigError(f"AGENTS_FILE [{name}]: unknown setting(s) {', '.join(unknown)} "
                              f"(known: {', '.join([*LIMITS, 'openai'])})")
    return data


def _number(table: Mapping[str, Any], key: str, default: float, where: str, *, low: float,
            strict: bool = False, integer: bool = False) -> float:
    value = table.get(key, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value < low or (strict and value == low):
        bound = f"more than {low:g}" if strict else f"at least {low:g}"
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{where}: {key} = {value!r} must be {kind} {bound}")
    return float(value)


def _openai(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: openai must be a table ([<agent>.openai])")
    options: dict[str, Any] = {}
    for key, value in table.items():
        kind = OPENAI_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where}.openai: unknown setting {key!r} "
                              f"(known: {', '.join(OPENAI_KEYS)})")
        if kind is float or kind is int:
            options[key] = _number(table, key, 0.0, f"{where}.openai", low=0,
                                   integer=kind is int)
        elif not isinstance(value, str):
            raise ConfigError(f"{where}.openai: {key} must be a string")
        else:
            options[key] = value
    return options
