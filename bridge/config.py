"""Settings: one frozen object built from the environment and `.env`.

Every field names its environment variable and says what it does; the README's
configuration table and `.env.example` are checked against this list by a test.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dotenv import find_dotenv, load_dotenv


class ConfigError(ValueError):
    """The configuration is invalid; the message says which variable and why."""


def _var(env: str, default: Any, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True)
class Settings:
    # Where the tasks live ---------------------------------------------------------
    database_url: str = _var(
        "DATABASE_URL", "",
        "Direct Postgres connection (psycopg). Use Supabase's direct or session-pooler "
        "URL (port 5432): the transaction pooler (6543) breaks LISTEN/NOTIFY.")
    supabase_url: str = _var("SUPABASE_URL", "", "Supabase project URL (Supabase mode).")
    supabase_service_key: str = _var(
        "SUPABASE_SERVICE_KEY", "", "Supabase service-role key (Supabase mode). Never logged.")
    transport: str = _var(
        "BRIDGE_TRANSPORT", "auto",
        "`postgres`, `supabase`, or `auto` (postgres when DATABASE_URL is set).")
    supabase_timeout: float = _var(
        "SUPABASE_TIMEOUT", 10.0, "Seconds before a Supabase RPC call gives up.")
    # Broker ---------------------------------------------------------------------
    redis_url: str = _var("REDIS_URL", "redis://localhost:6379/0", "Redis for Celery.")
    celery_broker_url: str = _var(
        "CELERY_BROKER_URL", "", "Broker URL; overrides REDIS_URL when set.")
    celery_queue: str = _var("CELERY_QUEUE", "agent_tasks", "Celery queue the jobs go to.")
    visibility_timeout: float = _var(
        "CELERY_VISIBILITY_TIMEOUT", 3600.0,
        "Seconds before Redis redelivers an unacknowledged job (kombu's visibility_timeout).")
    # Bridge ---------------------------------------------------------------------
    poll_interval: float = _var(
        "POLL_INTERVAL", 2.0,
        "Seconds between polls (Supabase mode); the fallback poll in Postgres mode.")
    batch_size: int = _var("BRIDGE_BATCH_SIZE", 50, "Most rows claimed in one round trip.")
    max_queued: int = _var(
        "BRIDGE_MAX_QUEUED", 50,
        "Backpressure: claim nothing while this many jobs already wait in the broker queue. "
        "Keep it below what the workers start within one lease.")
    lease_seconds: float = _var(
        "LEASE_SECONDS", 30.0,
        "Lease on a claimed row; workers renew it every third of this while a handler runs.")
    rescue_interval: float = _var(
        "RESCUE_INTERVAL", 5.0, "Seconds between sweeps that return expired leases to pending.")
    heartbeat_interval: float = _var(
        "HEARTBEAT_INTERVAL", 30.0, "Seconds between the bridge's heartbeat lines.")
    metrics_port: int = _var(
        "METRICS_PORT", 0, "Serve Prometheus metrics on this port (0 = off).")
    # Workers --------------------------------------------------------------------
    agent_handler: str = _var(
        "AGENT_HANDLER", "tasks.handlers.simulated:process_task",
        "`package.module:callable` that runs one task (sync or async).")
    agent_simulated_seconds: float = _var(
        "AGENT_SIMULATED_SECONDS", 3.0, "How long the default simulated handler works.")
    time_limit: float = _var(
        "AGENT_TIME_LIMIT", 600.0, "Seconds a handler may run before the task fails.")
    max_retries: int = _var(
        "AGENT_MAX_RETRIES", 5, "Celery retries after a RetryableError before the task fails.")
    retry_backoff: float = _var(
        "AGENT_RETRY_BACKOFF", 2.0,
        "First retry delay in seconds; doubles each retry, with jitter.")
    retry_backoff_max: float = _var(
        "AGENT_RETRY_BACKOFF_MAX", 300.0, "Longest retry delay in seconds.")
    # Logs -----------------------------------------------------------------------
    log_level: str = _var("LOG_LEVEL", "INFO", "DEBUG shows prompts; INFO never does.")
    log_format: str = _var(
        "LOG_FORMAT", "text", "`text` (friendly lines with key=value fields) or `json`.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
        """Read settings from `environ` (default: os.environ, after loading `.env`)."""
        if environ is None:
            if dotenv:
                # The .env of the directory the command runs in (or above it).
                load_dotenv(find_dotenv(usecwd=True), override=False)
            environ = os.environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(f.metadata["env"], raw.strip(), type(f.default))
        settings = cls(**values)
        settings.validate()
        return settings

    # Derived values -------------------------------------------------------------
    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def store_kind(self) -> Literal["postgres", "supabase"]:
        if self.transport == "postgres" or (self.transport == "auto" and self.database_url):
            return "postgres"
        return "supabase"

    @property
    def longest_retry_wait(self) -> float:
        """The longest a retried job can sit in a worker before it runs again and ends."""
        return self.retry_backoff_max * 1.5 + self.time_limit

    def validate(self) -> None:
        if self.transport not in ("auto", "postgres", "supabase"):
            raise ConfigError("BRIDGE_TRANSPORT must be auto, postgres or supabase")
        if self.log_format not in ("text", "json"):
            raise ConfigError("LOG_FORMAT must be text or json")
        for name in ("poll_interval", "lease_seconds", "rescue_interval", "time_limit"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env(name)} must be greater than 0")
        if self.supabase_url and not self.supabase_url.startswith(("http://", "https://")):
            raise ConfigError("SUPABASE_URL must start with https:// (Project Settings → API)")
        if self.batch_size < 1 or self.max_queued < 1:
            raise ConfigError("BRIDGE_BATCH_SIZE and BRIDGE_MAX_QUEUED must be at least 1")
        # A retry waits in worker memory (countdown) and a running job is unacked: if
        # either outlasts the visibility timeout, Redis hands the job to a second
        # worker while the first still holds it.
        if self.longest_retry_wait > self.visibility_timeout / 2:
            raise ConfigError(
                f"CELERY_VISIBILITY_TIMEOUT={self.visibility_timeout:g}s is too short: the "
                f"longest retry backoff (AGENT_RETRY_BACKOFF_MAX={self.retry_backoff_max:g}s, "
                f"+50% jitter) plus AGENT_TIME_LIMIT={self.time_limit:g}s must fit in half of "
                f"it, or Redis redelivers jobs that are still waiting or running. Raise "
                f"CELERY_VISIBILITY_TIMEOUT to at least {2 * self.longest_retry_wait:g}s or "
                f"lower the others.")

    def require_store(self) -> None:
        """Fail with a one-line fix when no task store is configured."""
        if self.store_kind == "postgres" and not self.database_url:
            raise ConfigError("DATABASE_URL is not set (BRIDGE_TRANSPORT=postgres)")
        if self.store_kind == "supabase":
            if not self.supabase_url:
                raise ConfigError(
                    "Set DATABASE_URL, or SUPABASE_URL and SUPABASE_SERVICE_KEY (see .env.example)")
            if not self.supabase_service_key:
                raise ConfigError("SUPABASE_SERVICE_KEY is not set (use the service-role key)")


def _env(name: str) -> str:
    return str(next(f.metadata["env"] for f in dataclasses.fields(Settings) if f.name == name))


def _parse(env: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            return raw.lower() in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{env}={raw!r} is not a valid {kind.__name__}") from None


def variables() -> list[tuple[str, Any, str]]:
    """(variable, default, help) for every setting, in declaration order."""
    return [(f.metadata["env"], f.default, f.metadata["help"])
            for f in dataclasses.fields(Settings)]
