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

from bridge.config import ConfigError, env_values, parse_float, setting, variables_of

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"


class SettingsError(ConfigError):
    """An OPENAI_* environment variable is missing or malformed (a ConfigError, so also a
    ValueError)."""


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
        return cls(**values)


def variables() -> list[tuple[str, Any, str]]:
    """The environment variables this handler reads: (name, default, help)."""
    return variables_of(Settings)


def for_agent(current: Settings) -> Settings:
    """`current` with the running agent's `[<agent>.openai]` options of AGENTS_FILE
    (model, system_prompt, temperature), so two agents can share this handler."""
    from tasks.agent import current_agent  # the worker's; not needed to import this module

    agent = current_agent()
    return dataclasses.replace(current, **agent.openai) if agent and agent.openai else current
