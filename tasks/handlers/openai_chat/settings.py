"""The handler's OPENAI_* settings, declared like bridge/config.py's: one frozen dataclass,
each field declared once (variable, default, help, parser) with `bridge.config.setting`,
read by `env_values` and listed by `variables` for the docs test. No SDK import here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from functools import partial
from typing import Any, Final

from bridge.config import ConfigError, env_values, parse_float, parse_int, setting, variables_of

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
# The options of an agent's `[<agent>.openai]` table that are windows of the agent's own,
# inside the key's (OPENAI_RPM / OPENAI_TPM / OPENAI_TENANT_RPM stay the key's): `limits.py`.
AGENT_LIMITS: Final = ("rpm", "tpm", "tenant_rpm")


class SettingsError(ConfigError):
    """An OPENAI_* environment variable is missing or malformed (a ConfigError, so also a
    ValueError)."""


def parse_count(name: str, raw: str, error: type[ConfigError] = ConfigError) -> int:
    """A whole number, 0 or more."""
    value = parse_int(name, raw, error)
    if value < 0:
        raise error(f"{name}={raw!r} must be 0 (none) or more")
    return value


@dataclass(frozen=True)
class Settings:
    api_key: str = setting(
        "OPENAI_API_KEY", MISSING,
        "API key, sent as a Bearer token; local servers accept any non-empty value. "
        "Never logged or stored.")
    base_url: str = setting(
        "OPENAI_BASE_URL", DEFAULT_BASE_URL,
        "API root of any OpenAI-compatible server, e.g. http://localhost:11434/v1 for Ollama")
    model: str = setting("OPENAI_MODEL", "gpt-4o-mini", "model name passed to the API")
    temperature: float = setting(
        "OPENAI_TEMPERATURE", 0.7, "sampling temperature", parse=partial(parse_float, low=0.0))
    # Verbatim: set empty, it sends no system message (blank does not mean "the default").
    system_prompt: str = setting(
        "OPENAI_SYSTEM_PROMPT", "You are a helpful AI assistant.",
        "first system message; set it empty to send none", verbatim=True)
    stream: bool = setting(
        "OPENAI_STREAM", True,
        "stream the answer and write partial text into the row as it arrives")
    timeout: float = setting(
        "OPENAI_TIMEOUT", 120.0,
        "seconds to wait for the API (per request, and between streamed chunks)",
        parse=partial(parse_float, low=0.0, strict=True))
    progress_interval: float = setting(
        "OPENAI_PROGRESS_INTERVAL", 0.25, "least seconds between two partial-answer writes",
        parse=partial(parse_float, low=0.0))
    max_tokens: int = setting(
        "OPENAI_MAX_TOKENS", 0,
        "most tokens one answer may take, sent as `max_tokens`; 0: not sent (the model's "
        "own limit). Needed with `OPENAI_TPM`: each request is charged its prompt's "
        "estimate plus this before it is sent. With tenant token budgets, the prompt's "
        "estimate plus this is reserved from the budget before the task runs, and it is "
        "lowered to what the budget leaves", parse=parse_count)
    rpm: int = setting(
        "OPENAI_RPM", 0,
        "requests per minute on this API key, shared by every worker process and node "
        "through the workers' Redis: a task waits for room instead of failing. 0: no limit. "
        "See [Rate limits](../how-to/openai-handler.md#rate-limits)", parse=parse_count)
    tpm: int = setting(
        "OPENAI_TPM", 0,
        "tokens per minute on this API key (prompt and answer), shared like `OPENAI_RPM`; "
        "needs `OPENAI_MAX_TOKENS`. 0: no limit", parse=parse_count)
    tenant_rpm: int = setting(
        "OPENAI_TENANT_RPM", 0,
        "requests per minute of one tenant (enterprise_id, else user) on this key, so one "
        "tenant cannot take the key's whole rate. 0: no limit", parse=parse_count)

    def __repr__(self) -> str:
        # No key, and no credentials a base URL might carry (https://user:pw@host/v1).
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
        shown["base_url"] = re.sub(r"^([a-z][a-z0-9+.-]*://)[^@/]*@", r"\1***@",
                                   self.base_url, flags=re.I)
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings of `env` (default: os.environ); SettingsError names a bad one."""
        values = env_values(cls, os.environ if env is None else env, SettingsError)
        if "api_key" not in values:  # unset or blank
            raise SettingsError(
                "OPENAI_API_KEY is not set: set it to your provider's API key "
                "(any non-empty value for local servers such as Ollama)")
        settings = cls(**values)
        check_tokens(settings.tpm, settings.max_tokens, "OPENAI_TPM", "OPENAI_MAX_TOKENS")
        return settings


def variables() -> list[tuple[str, Any, str]]:
    """The environment variables this handler reads: (name, default, help)."""
    return variables_of(Settings)


def check_tokens(tpm: int, max_tokens: int, tpm_name: str, max_tokens_name: str) -> None:
    """A tokens limit needs a most-answer size to charge before the request, and one
    answer must fit in it."""
    if tpm and not max_tokens:
        raise SettingsError(
            f"{tpm_name}={tpm} needs {max_tokens_name}: each request is charged its prompt "
            "plus the most tokens its answer may take before it is sent; set "
            f"{max_tokens_name} to that (e.g. 1000)")
    if tpm and max_tokens > tpm:
        raise SettingsError(f"{max_tokens_name}={max_tokens} is more than {tpm_name}={tpm}: "
                            "no request could ever be sent")


def for_agent(current: Settings) -> Settings:
    """`current` with the running agent's `[<agent>.openai]` options of AGENTS_FILE
    (model, system_prompt, temperature, max_tokens), so two agents can share this
    handler. The agent's rate limits are windows of its own (`limits.py`), not these."""
    from tasks.agent import current_agent  # the worker's; not needed to import this module

    agent = current_agent()
    if not agent or not agent.openai:
        return current
    options = {k: v for k, v in agent.openai.items() if k not in AGENT_LIMITS}
    if "max_tokens" in options:  # the agents file reads numbers as floats
        options["max_tokens"] = int(options["max_tokens"])
    return dataclasses.replace(current, **options)
