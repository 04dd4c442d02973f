"""One error base, one parser, one copy of each shared name (issue 21, code item 5).

Fast: no database, broker or worker; the CLI test runs `agent-bridge` with a setting it
refuses before it connects to anything.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import bridge
import tasks
from bridge.config import (
    ConfigError,
    Settings,
    parse_bool,
    parse_float,
    parse_int,
    parse_value,
)
from bridge.errors import AgentBridgeError
from bridge.names import CANCEL_CHANNEL, STATUSES, TABLE, WAKE_CHANNEL
from tasks.errors import public_message

REPO = Path(__file__).resolve().parents[2]
MIGRATIONS = REPO / "supabase" / "migrations"

# Every exception class the project defines, by module: the walk below must find at least
# these (so it cannot pass by finding nothing), and each must be an AgentBridgeError.
KNOWN = {
    "bridge.errors": {"AgentBridgeError", "ConfigError", "StoreError", "StoreUnavailable",
                      "StoreMisconfigured", "StoreRejected"},
    "bridge.publisher": {"BrokerUnavailable"},
    "bridge.localstack": {"LocalStackError"},
    "bridge.processes": {"ProcessError"},
    "bridge.migrate": {"ExportConflict"},
    "bridge.store.supabase": {"GatewayAnswer"},
    "tasks.errors": {"RetryableError", "InvalidPayload", "TaskFailed"},
    "tasks.handlers": {"HandlerNotFound"},
    "tasks.handlers.openai_chat.settings": {"SettingsError"},
    "tasks.handlers.openai_chat.errors": {"ProviderError"},
    "tasks.cancellation": {"Cancelled"},
    "tasks.invoke": {"HandlerTimeout"},
    "tasks.outcome": {"WriteRefused"},
    "tasks.agent": {"UnknownAgent"},
    "tasks.questions": {"InvalidQuestion"},
}

# Signals, not errors: BaseExceptions (as asyncio.CancelledError is), so that a handler's
# `except Exception` cannot swallow them.
SIGNALS = {"tasks.questions.AnswerNeeded"}

# The built-in kind each keeps, so `except ValueError` (and the like) still catches it.
SECOND_BASES = {
    "ConfigError": ValueError, "SettingsError": ValueError, "InvalidPayload": ValueError,
    "HandlerNotFound": ImportError, "UnknownAgent": LookupError,
    "LocalStackError": RuntimeError, "ProcessError": RuntimeError,
    "ExportConflict": FileExistsError, "InvalidQuestion": ValueError,
}


def all_modules() -> list[ModuleType]:
    found: list[ModuleType] = []
    for package in (bridge, tasks):
        found.append(package)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            found.append(importlib.import_module(info.name))
    return found


def exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined (not imported) in a module of bridge or tasks."""
    classes: dict[str, type[BaseException]] = {}
    for module in all_modules():
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == module.__name__):
                classes[f"{module.__name__}.{name}"] = value
    return classes


# --------------------------------------------------------------------------- errors


def test_every_exception_class_is_an_agent_bridge_error() -> None:
    classes = exception_classes()
    expected = {f"{module}.{name}" for module, names in KNOWN.items() for name in names}
    assert expected <= set(classes), f"not found: {sorted(expected - set(classes))}"
    outside = sorted(name for name, cls in classes.items()
                     if not issubclass(cls, AgentBridgeError) and name not in SIGNALS)
    assert outside == [], f"not AgentBridgeError subclasses: {outside}"
    assert all(not issubclass(classes[name], Exception) for name in SIGNALS)


def test_every_exception_class_says_what_it_means() -> None:
    undocumented = sorted(name for name, cls in exception_classes().items()
                          if not (cls.__doc__ or "").strip())
    assert undocumented == []


def test_built_in_kinds_are_kept() -> None:
    classes = {cls.__name__: cls for cls in exception_classes().values()}
    for name, base in SECOND_BASES.items():
        assert issubclass(classes[name], base), name
        assert issubclass(classes[name], AgentBridgeError), name


def test_error_type_written_to_rows_is_still_the_class_name() -> None:
    """error.type is `type(exc).__name__` (tasks/runner.py): the names did not change,
    and the base adds nothing that public_message would classify as a network failure
    or a timeout."""
    from tasks.errors import InvalidPayload, RetryableError
    from tasks.invoke import HandlerTimeout

    assert type(InvalidPayload("x")).__name__ == "InvalidPayload"
    assert public_message(AgentBridgeError("plain words")) == "plain words"
    assert public_message(InvalidPayload("prompt is missing")) == "prompt is missing"
    assert public_message(RetryableError("busy")) == "busy"
    assert public_message(HandlerTimeout("ran 600 s")) == "provider timed out"  # as before


def test_handler_not_found_still_takes_import_error_arguments() -> None:
    from tasks.handlers import HandlerNotFound

    exc = HandlerNotFound("no such module", name="nope")
    assert (str(exc), exc.name) == ("no such module", "nope")


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(("raw", "value"), [
    *((word, True) for word in ("true", "TRUE", "True", "1", "yes", "Yes", "on", " ON ")),
    *((word, False) for word in ("false", "FALSE", "0", "no", "NO", "off", "Off")),
])
def test_booleans_accepted(raw: str, value: bool) -> None:
    assert parse_bool("X", raw) is value


@pytest.mark.parametrize("raw", ["ture", "flase", "2", "-1", "y", "n", "t", "enabled", "none"])
def test_booleans_refused_with_the_variable_value_and_choices(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bool("SUPABASE_REALTIME", raw)
    assert str(caught.value) == (f"SUPABASE_REALTIME={raw!r} must be true or false "
                                 "(or 1/0, yes/no, on/off)")


def test_numbers() -> None:
    assert parse_int("N", " 42 ") == 42
    assert parse_float("F", "2.5") == 2.5
    assert parse_float("F", "0", low=0) == 0.0
    for raw in ("ten", "1.5", ""):
        with pytest.raises(ConfigError, match=rf"^N={raw!r} is not a whole number"):
            parse_int("N", raw)
    with pytest.raises(ConfigError, match=r"^F='fast' is not a number"):
        parse_float("F", "fast")
    for raw in ("nan", "inf", "-inf", "NaN"):
        with pytest.raises(ConfigError, match=rf"^F={raw!r} must be a finite number$"):
            parse_float("F", raw)
    with pytest.raises(ConfigError, match=r"must be a finite number at least 0$"):
        parse_float("F", "-1", low=0)
    with pytest.raises(ConfigError, match=r"must be a finite number more than 0$"):
        parse_float("F", "0", low=0, strict=True)


def test_parse_value_by_kind() -> None:
    assert parse_value("A", "off", bool) is False
    assert parse_value("B", "7", int) == 7
    assert parse_value("C", "0.5", float) == 0.5
    assert parse_value("D", "text", str) == "text"


def test_settings_refuse_a_boolean_typo() -> None:
    """SUPABASE_REALTIME=ture used to read as false, quietly."""
    with pytest.raises(ConfigError, match=r"^SUPABASE_REALTIME='ture' must be true or false"):
        Settings.from_env({"SUPABASE_REALTIME": "ture"})
    assert Settings.from_env({"SUPABASE_REALTIME": "Off"}).supabase_realtime is False


@pytest.mark.parametrize(("name", "raw"), [("POLL_INTERVAL", "nan"),
                                           ("CELERY_VISIBILITY_TIMEOUT", "inf"),
                                           ("BRIDGE_BATCH_SIZE", "5.5"),
                                           ("CELERY_TASK_EVENTS", "maybe")])
def test_settings_refuse_what_the_strict_parser_refuses(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}={raw!r} "):
        Settings.from_env({name: raw})


def test_group_commit_wait_is_seconds_zero_or_more() -> None:
    assert Settings.from_env({}).group_commit_wait == 0.005
    assert Settings.from_env({"AGENT_GROUP_COMMIT_WAIT": "0"}).group_commit_wait == 0.0
    for raw in ("-0.001", "0.5"):
        with pytest.raises(ConfigError, match=r"^AGENT_GROUP_COMMIT_WAIT must be a number of "
                                              r"seconds from 0 to 0.1$"):
            Settings.from_env({"AGENT_GROUP_COMMIT_WAIT": raw})


def test_openai_settings_use_the_same_parser() -> None:
    from tasks.handlers.openai_chat import Settings as OpenAISettings
    from tasks.handlers.openai_chat import SettingsError

    assert issubclass(SettingsError, ConfigError)
    with pytest.raises(SettingsError) as caught:
        OpenAISettings.from_env({"OPENAI_API_KEY": "k", "OPENAI_STREAM": "ture"})
    assert str(caught.value) == ("OPENAI_STREAM='ture' must be true or false "
                                 "(or 1/0, yes/no, on/off)")
    assert OpenAISettings.from_env({"OPENAI_API_KEY": "k", "OPENAI_STREAM": "NO"}).stream is False




def test_cli_catches_the_base_class(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An error of ours that the old hand-written list left out ends in one line too."""
    from bridge import cli as cli_module
    from bridge.commands import status
    from bridge.publisher import BrokerUnavailable

    def broken(_args: object) -> int:
        raise BrokerUnavailable("Redis unreachable at <address>")

    monkeypatch.setattr(status, "run", broken)
    assert cli_module.main(["status"]) == 1
    assert capsys.readouterr().err == "agent-bridge status: Redis unreachable at <address>\n"


# --------------------------------------------------------------------------- one rule


def test_one_visibility_timeout_rule_for_settings_and_agents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^CELERY_VISIBILITY_TIMEOUT=100s is too short"):
        Settings.from_env({"CELERY_VISIBILITY_TIMEOUT": "100", "AGENT_TIME_LIMIT": "40",
                           "AGENT_RETRY_BACKOFF_MAX": "10"})  # 2 x (15 + 40) > 100
    too_long, fits = tmp_path / "too-long.toml", tmp_path / "fits.toml"
    too_long.write_text("[slow]\ntime_limit = 100\n")
    fits.write_text("[slow]\ntime_limit = 35\n")
    env = {"CELERY_VISIBILITY_TIMEOUT": "100", "AGENT_TIME_LIMIT": "10",
           "AGENT_RETRY_BACKOFF_MAX": "10",
           "AGENTS": "slow=tasks.handlers.simulated:process_task",
           "AGENTS_FILE": str(too_long)}
    with pytest.raises(ConfigError, match=r"^AGENTS_FILE \[slow\]: time_limit=100s plus the "
                                          r"longest retry backoff \(15s\) must fit in half of "
                                          r"CELERY_VISIBILITY_TIMEOUT=100s; raise it to at "
                                          r"least 230s$"):
        Settings.from_env(env)
    # At the edge: 2 x (15 + 35) = 100 fits.
    Settings.from_env({**env, "AGENTS_FILE": str(fits)})


# --------------------------------------------------------------------------- names


def test_statuses_match_the_table_check_constraint() -> None:
    sql = (MIGRATIONS / "20261124000000_agent_task_requests.sql").read_text()
    found = re.search(r"check \(status in \(([^)]*)\)\)", sql)
    assert found is not None
    assert tuple(s.strip().strip("'") for s in found[1].split(",")) == STATUSES


def test_table_and_channels_are_the_names_the_sql_uses() -> None:
    sql = "\n".join(path.read_text() for path in sorted(MIGRATIONS.glob("*.sql")))
    assert f"create table if not exists public.{TABLE}" in sql.lower()
    assert f"pg_notify('{WAKE_CHANNEL}'" in sql
    assert f"pg_notify('{CANCEL_CHANNEL}'" in sql


def test_no_other_python_copy_of_the_names() -> None:
    """The table and channel names are spelt in bridge/names.py only (docstrings and
    help text aside: a quoted literal is what code would use)."""
    copies = []
    for root in (REPO / "bridge", REPO / "tasks"):
        for path in root.rglob("*.py"):
            if path.name == "names.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"""["'](agent_task_requests|agent_task_cancel)["']""", line):
                    copies.append(f"{path.relative_to(REPO)}:{number}")
    assert copies == []
