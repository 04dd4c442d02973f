"""Settings: one frozen object built from the environment and `.env`.

Every field names its environment variable and says what it does; the configuration
reference (docs/reference/configuration.md) and `.env.example` are checked against this
list by a test. `setting`, `env_values` and `variables_of` are the mechanism, shared with
the OpenAI-compatible handler's settings (tasks/handlers/openai_chat/settings.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

from dotenv import find_dotenv, load_dotenv

from bridge.agents import Agent, Agents, configure
from bridge.errors import ConfigError as ConfigError  # defined there; imported from here too

# --------------------------------------------------------------------------- one parser
# Every boolean and number read from the environment goes through these (Settings
# below, and the OpenAI-compatible handler's OPENAI_* settings): a typo is refused with
# the variable, the value and what is allowed, never read as false or as a default.

LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TRANSPORTS: tuple[str, ...] = ("auto", "postgres", "supabase")
TRUE: tuple[str, ...] = ("true", "1", "yes", "on")
FALSE: tuple[str, ...] = ("false", "0", "no", "off")
MAX_GROUP_COMMIT_WAIT = 0.1  # seconds: AGENT_GROUP_COMMIT_WAIT's ceiling


def parse_bool(name: str, raw: str, error: type[ConfigError] = ConfigError) -> bool:
    """`raw` (set in variable `name`) as a boolean: true/false, 1/0, yes/no, on/off, in
    any case; anything else raises `error`."""
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise error(f"{name}={raw!r} must be true or false (or 1/0, yes/no, on/off)")


def parse_int(name: str, raw: str, error: type[ConfigError] = ConfigError) -> int:
    """`raw` (set in variable `name`) as a whole number; anything else raises `error`."""
    try:
        return int(raw.strip())
    except ValueError:
        raise error(f"{name}={raw!r} is not a whole number (e.g. 10)") from None


def parse_float(name: str, raw: str, error: type[ConfigError] = ConfigError, *,
                low: float | None = None, strict: bool = False) -> float:
    """`raw` (set in variable `name`) as a finite number (NaN and infinity are refused),
    at least `low` (more than `low` when `strict`) when `low` is given."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise error(f"{name}={raw!r} is not a number (e.g. 2.5)") from None
    if not math.isfinite(value) or (low is not None and (
            value < low or (strict and value == low))):
        bound = "" if low is None else (f" more than {low:g}" if strict else f" at least {low:g}")
        raise error(f"{name}={raw!r} must be a finite number{bound}")
    return value


def parse_value(name: str, raw: str, kind: type, error: type[ConfigError] = ConfigError) -> Any:
    """`raw` as a `kind` (bool, int, float or str), by the parsers above."""
    if kind is bool:
        return parse_bool(name, raw, error)
    if kind is int:
        return parse_int(name, raw, error)
    if kind is float:
        return parse_float(name, raw, error)
    return raw


def check_database_url(url: str) -> None:
    """Refuse a DATABASE_URL that is not a connection string, with the expected shape."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise ConfigError(f"DATABASE_URL is not a valid connection string ({reason}); "
                          "expected postgresql://user:password@host:5432/dbname") from None


# --------------------------------------------------------------------------- one mechanism
# A settings object is a frozen dataclass whose fields are declared with `setting`: each
# names its variable, default, help and parser once. `env_values` reads them and
# `variables_of` lists them (the docs test checks the docs against that list). Settings
# below and the OpenAI-compatible handler's settings are both built this way.

Parser = Callable[[str, str, type[ConfigError]], Any]
"""(variable, value as set, error class) -> the value; a bad value raises the error class."""


def setting(env: str, default: Any, help: str, *, parse: Parser | None = None,
            verbatim: bool = False) -> Any:
    """A settings field: its environment variable `env`, its `default` (`MISSING`: the
    variable is required), what it does, and its parser (by default `parse_value`, by the
    default's type). `verbatim`: the value exactly as set, even empty (a text where empty
    means none)."""
    return field(default=default, metadata={"env": env, "help": help, "parse": parse,
                                            "verbatim": verbatim})


def env_values(cls: type, environ: Mapping[str, str],
               error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """{field: parsed value} for each `setting` field of dataclass `cls` whose variable is
    set in `environ`. An unset or blank variable is left out, so its default applies
    (a `verbatim` one counts as set whenever it is present)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        env, raw = f.metadata["env"], environ.get(f.metadata["env"])
        if raw is None:
            continue
        if f.metadata["verbatim"]:
            values[f.name] = raw
        elif raw.strip():
            parse = f.metadata["parse"]
            values[f.name] = (parse(env, raw.strip(), error) if parse is not None
                              else parse_value(env, raw.strip(), type(f.default), error))
    return values


def variables_of(cls: type) -> list[tuple[str, Any, str]]:
    """(variable, default, help) for each `setting` field of dataclass `cls`, in declaration
    order; a required one's default reads "(required)"."""
    return [(f.metadata["env"], "(required)" if f.default is MISSING else f.default,
             f.metadata["help"]) for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class Settings:
    # Where the tasks live ---------------------------------------------------------
    database_url: str = setting(
        "DATABASE_URL", "",
        "Direct Postgres connection (psycopg). Use Supabase's direct or session-pooler "
        "URL (port 5432): the transaction pooler (6543) breaks LISTEN/NOTIFY.")
    supabase_url: str = setting("SUPABASE_URL", "", "Supabase project URL (Supabase mode).")
    supabase_service_key: str = setting(
        "SUPABASE_SERVICE_KEY", "",
        "Supabase secret key (`sb_secret_...`) or legacy service_role key (Supabase "
        "mode). Never logged.")
    transport: str = setting(
        "BRIDGE_TRANSPORT", "auto",
        "`postgres`, `supabase`, or `auto` (postgres when DATABASE_URL is set).")
    supabase_timeout: float = setting(
        "SUPABASE_TIMEOUT", 10.0, "Seconds before a Supabase RPC call gives up.")
    supabase_realtime: bool = setting(
        "SUPABASE_REALTIME", True,
        "Supabase mode: the bridge wakes on Realtime when a row becomes pending "
        "(POLL_INTERVAL stays the fallback). Needs the table in `supabase_realtime`.")
    supabase_max_rows: int = setting(
        "SUPABASE_MAX_ROWS", 1000,
        "Supabase mode: the project's Data API *Max rows* (PostgREST's `db-max-rows`, "
        "Supabase's default 1,000). Every call that returns rows stays under it: claims "
        "(`BRIDGE_BATCH_SIZE`), rescue and requeue go in pages.")
    # Broker ---------------------------------------------------------------------
    redis_url: str = setting("REDIS_URL", "redis://localhost:6379/0", "Redis for Celery.")
    celery_broker_url: str = setting(
        "CELERY_BROKER_URL", "", "Broker URL; overrides REDIS_URL when set.")
    celery_queue: str = setting("CELERY_QUEUE", "agent_tasks", "Celery queue the jobs go to.")
    visibility_timeout: float = setting(
        "CELERY_VISIBILITY_TIMEOUT", 3600.0,
        "Seconds before Redis redelivers an unacknowledged job (kombu's visibility_timeout).")
    task_events: bool = setting(
        "CELERY_TASK_EVENTS", False,
        "Send Celery task events (sent, received, started, succeeded...) from the bridge and "
        "workers. Off by default: they cost about a fifth of the throughput. Flower turns "
        "the workers' events on by itself when it starts; set this to see queued (sent) "
        "jobs in Flower too. docker-compose.yml sets it.")
    # Bridge ---------------------------------------------------------------------
    poll_interval: float = setting(
        "POLL_INTERVAL", 2.0,
        "Seconds between polls for due rows in Supabase mode; in Postgres mode, the "
        "fallback behind LISTEN/NOTIFY.")
    batch_size: int = setting(
        "BRIDGE_BATCH_SIZE", 50,
        "Most rows claimed in one round trip; in Supabase mode at most "
        "`SUPABASE_MAX_ROWS` (a larger value is refused at start: PostgREST's `LIMIT` "
        "would leave claimed rows unreturned until their lease ran out).")
    inline_payload_bytes: int = setting(
        "AGENT_INLINE_PAYLOAD_BYTES", 65536,
        "The claim returns a row's request_payload, and the bridge sends it in the Celery "
        "message, when it is at most this many bytes (as stored); the worker then reads "
        "nothing from the database to start. A larger one is read by the worker as it starts. "
        "0: never in the message.")
    max_queued: int = setting(
        "BRIDGE_MAX_QUEUED", 1000,
        "Backpressure: the most jobs waiting in one agent's broker queue. It is a ceiling: "
        "BRIDGE_QUEUE_SECONDS sizes the queue below it, from how fast the workers take "
        "jobs. With BRIDGE_QUEUE_SECONDS=0 (a fixed cap) keep it below what the workers "
        "start within one lease.")
    queue_seconds: float = setting(
        "BRIDGE_QUEUE_SECONDS", 0.5,
        "Backpressure by time: keep about this many seconds of work in each broker queue, "
        "measured from how fast the workers take jobs (BRIDGE_MAX_QUEUED caps it); 0 = a "
        "fixed BRIDGE_MAX_QUEUED.")
    tenant_concurrency: int = setting(
        "TENANT_CONCURRENCY", 0,
        "Most rows of one tenant (enterprise_id, else user) claimed at once, queued or "
        "running, so that no tenant holds every worker; 0 = no cap. A tenant's own "
        "agent_tenant_limits.max_processing wins.")
    lease_seconds: float = setting(
        "LEASE_SECONDS", 30.0,
        "Seconds a claimed row is leased; workers renew it every third of this while a "
        "handler runs, and the rescue takes back a row whose lease ran out.")
    rescue_interval: float = setting(
        "RESCUE_INTERVAL", 5.0,
        "Seconds between sweeps that return expired leases to pending (or end the row "
        "failed, LeaseExpired, once its attempts are used up).")
    heartbeat_interval: float = setting(
        "HEARTBEAT_INTERVAL", 30.0, "Seconds between the bridge's heartbeat lines.")
    metrics_port: int = setting(
        "METRICS_PORT", 0, "Serve Prometheus metrics on this port (0 = off).")
    retention_days: float = setting(
        "AGENT_RETENTION_DAYS", 30.0,
        "Days a finished (completed or failed) task is kept after it finished: the "
        "bridge deletes older ones, with their streamed chunks, every few minutes in "
        "small batches that never hold up a claim. 0 keeps everything. `agent-bridge "
        "prune` does it by hand. See [Retention](../how-to/retention.md).")
    # Workers --------------------------------------------------------------------
    agent_handler: str = setting(
        "AGENT_HANDLER", "tasks.handlers.simulated:process_task",
        "`package.module:callable` that runs one task (sync or async); the `default` "
        "agent's handler.")
    agents: str = setting(
        "AGENTS", "",
        "More agents besides `default`: `name=package.module:callable`, "
        "comma-separated. Agent X's jobs go to queue `<CELERY_QUEUE>.X`. Same value for "
        "the bridge and every worker. See [Several "
        "agents](../how-to/several-agents.md).")
    agents_file: str = setting(
        "AGENTS_FILE", "",
        "TOML file of per-agent settings (time limit, retries, max attempts; the OpenAI "
        "handler's model, system prompt, temperature). See [Several "
        "agents](../how-to/several-agents.md).")
    agent_simulated_seconds: float = setting(
        "AGENT_SIMULATED_SECONDS", 3.0, "How long the default simulated handler works.")
    time_limit: float = setting(
        "AGENT_TIME_LIMIT", 600.0,
        "Seconds a handler may run before the task fails (an agent's `time_limit` in "
        "AGENTS_FILE overrides it).")
    max_retries: int = setting(
        "AGENT_MAX_RETRIES", 5,
        "Celery retries after a RetryableError before the task fails (an agent's "
        "`max_retries` in AGENTS_FILE overrides it).")
    retry_backoff: float = setting(
        "AGENT_RETRY_BACKOFF", 2.0,
        "First retry delay in seconds; each retry doubles it, up to AGENT_RETRY_BACKOFF_MAX, "
        "with jitter (0.5 to 1.5 times).")
    retry_backoff_max: float = setting(
        "AGENT_RETRY_BACKOFF_MAX", 300.0,
        "Longest backoff in seconds; with jitter and any Retry-After, a retry waits at most "
        "1.5 times this.")
    max_response_bytes: int = setting(
        "AGENT_MAX_RESPONSE_BYTES", 1048576,
        "Largest handler result (bytes of JSON) written to a row; a larger one fails the task "
        "with its size, and a larger partial-progress write is skipped.")
    stream_interval: float = setting(
        "AGENT_STREAM_INTERVAL", 0.1,
        "Least seconds between two partial-answer writes of one task (the first is written at "
        "once; what a handler reports in between goes with the next): at most 1/this database "
        "writes and Realtime messages per second per streaming task, and a worker process "
        "writes all its tasks' due pieces in one statement. 0: every report is written.")
    group_commit_wait: float = setting(
        "AGENT_GROUP_COMMIT_WAIT", 0.005,
        "Most seconds a worker process's state write (a bind, an outcome, a streamed piece) "
        "waits for the writes of the process's other running tasks, to go with them in one "
        "call and one commit; only while more than one task runs in the process (never in a "
        "prefork child, which runs one). 0: each write is sent at once unless a call is "
        "already in flight; at most 0.1.")
    progress_interval: float = setting(
        "AGENT_PROGRESS_INTERVAL", 0.1,
        "The earlier name of `AGENT_STREAM_INTERVAL`, read when that is not set.")
    cancel_poll_interval: float = setting(
        "CANCEL_POLL_INTERVAL", 1.0,
        "Supabase mode: seconds between a worker process's checks for cancelled tasks (one "
        "query for all the tasks it runs, only while it runs some). Direct mode LISTENs.")
    # Logs -----------------------------------------------------------------------
    log_level: str = setting("LOG_LEVEL", "INFO", "DEBUG shows prompts; INFO never does.")
    log_format: str = setting(
        "LOG_FORMAT", "text", "`text` (friendly lines with key=value fields) or `json`.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
        """Read settings from `environ` (default: os.environ, after loading `.env`)."""
        if environ is None:
            if dotenv:
                # The .env of the directory the command runs in (or above it).
                load_dotenv(find_dotenv(usecwd=True), override=False)
            environ = os.environ
        values = env_values(cls, environ)
        if "stream_interval" not in values and "progress_interval" in values:
            values["stream_interval"] = values["progress_interval"]  # the earlier name
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
    def longest_retry_delay(self) -> float:
        """The longest a retry waits: backoff with jitter, or a Retry-After, cut to this."""
        return self.retry_backoff_max * 1.5

    @property
    def longest_retry_wait(self) -> float:
        """The longest a retried job can sit in a worker before it runs again and ends."""
        return self.longest_retry_delay + self.time_limit

    def check_visibility_timeout(self, agent: Agent | None = None) -> None:
        """The one visibility-timeout rule, for the defaults and for each agent: a retry
        waits in worker memory (countdown) and a running job is unacked, so if either
        outlasts the visibility timeout Redis hands the job to a second worker while the
        first still holds it. Both must fit in half of it."""
        wait = self.longest_retry_delay + (self.time_limit if agent is None else agent.time_limit)
        if wait <= self.visibility_timeout / 2:
            return
        if agent is None:
            raise ConfigError(
                f"CELERY_VISIBILITY_TIMEOUT={self.visibility_timeout:g}s is too short: the "
                f"longest retry backoff (AGENT_RETRY_BACKOFF_MAX={self.retry_backoff_max:g}s, "
                f"+50% jitter) plus AGENT_TIME_LIMIT={self.time_limit:g}s must fit in half of "
                f"it, or Redis redelivers jobs that are still waiting or running. Raise "
                f"CELERY_VISIBILITY_TIMEOUT to at least {2 * wait:g}s or lower the others.")
        raise ConfigError(
            f"AGENTS_FILE [{agent.name}]: time_limit={agent.time_limit:g}s plus the longest "
            f"retry backoff ({self.longest_retry_delay:g}s) must fit in half of "
            f"CELERY_VISIBILITY_TIMEOUT={self.visibility_timeout:g}s; raise it to at "
            f"least {2 * wait:g}s")

    def validate(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"BRIDGE_TRANSPORT={self.transport} is not a transport: use "
                              "auto, postgres or supabase")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT={self.log_format} is not a log format: use text "
                              "or json")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL={self.log_level} is not a log level: use DEBUG, "
                              "INFO, WARNING, ERROR or CRITICAL")
        for name in ("poll_interval", "lease_seconds", "rescue_interval", "time_limit",
                     "cancel_poll_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env(name)} must be greater than 0")
        if self.supabase_url and not self.supabase_url.startswith(("http://", "https://")):
            raise ConfigError("SUPABASE_URL must start with https:// (Project Settings → API)")
        for name in ("stream_interval", "progress_interval"):
            if not 0 <= getattr(self, name) < float("inf"):  # NaN fails this too
                raise ConfigError(f"{_env(name)} must be a number of seconds, 0 or more")
        if not 0 <= self.group_commit_wait <= MAX_GROUP_COMMIT_WAIT:
            # A task's bind waits too, while its claim's lease runs: keep it short (the
            # ceiling of PostgreSQL's own commit_delay).
            raise ConfigError("AGENT_GROUP_COMMIT_WAIT must be a number of seconds from 0 "
                              f"to {MAX_GROUP_COMMIT_WAIT:g}")
        if not 0 <= self.retention_days < float("inf"):  # NaN fails this too
            raise ConfigError("AGENT_RETENTION_DAYS must be a number of days, 0 (keep "
                              "everything) or more")
        if self.inline_payload_bytes < 0:
            raise ConfigError("AGENT_INLINE_PAYLOAD_BYTES must be 0 (never inline) or more")
        if self.max_response_bytes < 1:
            raise ConfigError("AGENT_MAX_RESPONSE_BYTES must be at least 1")
        for name in ("retry_backoff", "retry_backoff_max"):
            if not 0 <= getattr(self, name) < float("inf"):  # NaN fails this too
                raise ConfigError(f"{_env(name)} must be a number of seconds, 0 or more")
        if self.tenant_concurrency < 0:
            raise ConfigError("TENANT_CONCURRENCY must be 0 (no cap) or more")
        if self.batch_size < 1 or self.max_queued < 1:
            raise ConfigError("BRIDGE_BATCH_SIZE and BRIDGE_MAX_QUEUED must be at least 1")
        if self.supabase_max_rows < 1:
            raise ConfigError("SUPABASE_MAX_ROWS must be at least 1 (Supabase: API settings, "
                              "Max rows)")
        if self.store_kind == "supabase" and self.batch_size > self.supabase_max_rows:
            # PostgREST wraps the claim in a LIMIT: rows past the cap would be claimed
            # (locked, leased) but never returned, stranded until their lease ran out.
            raise ConfigError(f"BRIDGE_BATCH_SIZE ({self.batch_size}) is above SUPABASE_MAX_ROWS "
                              f"({self.supabase_max_rows}): Supabase's Data API returns at most "
                              "that many rows, and claimed rows past it would wait for their "
                              "lease; lower BRIDGE_BATCH_SIZE")
        self.check_visibility_timeout()
        for agent in self.configured_agents():  # AGENTS and AGENTS_FILE, checked here
            self.check_visibility_timeout(agent)

    def configured_agents(self) -> Agents:
        """The agents of AGENT_HANDLER, AGENTS and AGENTS_FILE (read once per settings)."""
        return configure(self.agent_handler, self.agents, self.agents_file,
                         celery_queue=self.celery_queue, time_limit=self.time_limit,
                         max_retries=self.max_retries)

    def require_store(self) -> None:
        """Fail with a one-line fix when no task store is configured."""
        if self.store_kind == "postgres" and not self.database_url:
            raise ConfigError("DATABASE_URL is not set (BRIDGE_TRANSPORT=postgres)")
        if self.store_kind == "postgres":
            check_database_url(self.database_url)
        if self.store_kind == "supabase":
            if not self.supabase_url:
                raise ConfigError(
                    "Set DATABASE_URL, or SUPABASE_URL and SUPABASE_SERVICE_KEY (see .env.example)")
            if not self.supabase_service_key:
                raise ConfigError("SUPABASE_SERVICE_KEY is not set (use the secret key, "
                                  "sb_secret_..., or the legacy service_role key)")
            if self.supabase_service_key.startswith("sb_publishable_"):
                raise ConfigError("SUPABASE_SERVICE_KEY is a publishable key (sb_publishable_...):"
                                  " use a secret key (sb_secret_...) or the legacy service_role "
                                  "key, from Project Settings → API Keys")


def _env(name: str) -> str:
    return str(next(f.metadata["env"] for f in dataclasses.fields(Settings) if f.name == name))


def variables() -> list[tuple[str, Any, str]]:
    """(variable, default, help) for every setting, in declaration order."""
    return variables_of(Settings)
