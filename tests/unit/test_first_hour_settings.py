"""The first hour (issue 22), without services: every setting refused with one line
naming it, the value and what is allowed; short ids; the schema message; how `show`
counts attempts after an operator's retry."""

from __future__ import annotations

import argparse

import pytest

from bridge.cli import main
from bridge.commands.retry import task_id
from bridge.commands.show import attempts_of
from bridge.config import ConfigError, Settings
from bridge.errors import SchemaMissing, StoreRejected


@pytest.mark.parametrize(("environ", "said"), [
    ({"LOG_LEVEL": "verbose"},
     "LOG_LEVEL=verbose is not a log level: use DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ({"LOG_FORMAT": "pretty"}, "LOG_FORMAT=pretty is not a log format: use text or json"),
    ({"BRIDGE_TRANSPORT": "pg"},
     "BRIDGE_TRANSPORT=pg is not a transport: use auto, postgres or supabase"),
    ({"SUPABASE_REALTIME": "yesplease"},
     "SUPABASE_REALTIME='yesplease' must be true or false (or 1/0, yes/no, on/off)"),
    ({"BRIDGE_BATCH_SIZE": "lots"}, "BRIDGE_BATCH_SIZE='lots' is not a whole number (e.g. 10)"),
])
def test_a_bad_setting_names_the_variable_the_value_and_what_is_allowed(
        environ: dict[str, str], said: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(environ)
    assert str(raised.value) == said


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", " error ", "critical"])
def test_log_levels_in_any_case(level: str) -> None:
    assert Settings.from_env({"LOG_LEVEL": level}).log_level.upper() == level.strip().upper()


def test_main_checks_settings_before_any_command(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`migrations export` needs no database, and still refuses a bad setting first."""
    monkeypatch.setenv("LOG_LEVEL", "loud")
    assert main(["migrations", "export", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert err == ("agent-bridge: LOG_LEVEL=loud is not a log level: use DEBUG, INFO, WARNING, "
                   "ERROR or CRITICAL\n")


def test_dev_ignores_supabase_only_rules_but_not_a_bad_transport(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """dev runs its children on its own PostgreSQL: a batch above SUPABASE_MAX_ROWS is
    no reason to refuse it, a misspelled BRIDGE_TRANSPORT still is."""
    from bridge.cli import validate_settings

    for name in ("DATABASE_URL", "SUPABASE_URL", "BRIDGE_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BRIDGE_BATCH_SIZE", "50")
    monkeypatch.setenv("SUPABASE_MAX_ROWS", "10")
    with pytest.raises(ConfigError):
        validate_settings("status")
    validate_settings("dev")
    monkeypatch.setenv("BRIDGE_TRANSPORT", "pg")
    with pytest.raises(ConfigError, match="BRIDGE_TRANSPORT=pg"):
        validate_settings("dev")


@pytest.mark.parametrize(("given", "parsed"), [
    ("bf762845", "bf762845"),
    ("BF762845-FFB5", "bf762845ffb5"),
    ("7521c2a2-ffb5-4741-afe1-9ff068e4bc8a", "7521c2a2-ffb5-4741-afe1-9ff068e4bc8a"),
    ("7521C2A2FFB54741AFE19FF068E4BC8A", "7521c2a2-ffb5-4741-afe1-9ff068e4bc8a"),
])
def test_short_and_whole_ids(given: str, parsed: str) -> None:
    assert task_id(given) == parsed


@pytest.mark.parametrize("given", ["bf76284", "bf76284z", "not-an-id", "",
                                   "7521c2a2-ffb5-4741-afe1-9ff068e4bc8a0"])
def test_not_an_id(given: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="first 8 characters or more"):
        task_id(given)


def test_the_schema_message_names_the_version_and_the_fix() -> None:
    fix = "run `agent-bridge migrate`"
    assert str(SchemaMissing(None, 4, fix)) == (
        "the database has no agent-bridge schema (found version none, need 4): run "
        "`agent-bridge migrate`")
    assert str(SchemaMissing(3, 4, fix, "42883")) == (
        "the database has agent-bridge schema version 3, need 4: run `agent-bridge migrate`")
    newer = SchemaMissing(5, 4, fix)
    assert str(newer).endswith("newer than this agent-bridge (version 4): upgrade agent-bridge "
                               "on this machine")
    assert isinstance(newer, StoreRejected)  # refused, never "unavailable"


@pytest.mark.parametrize(("status", "attempt", "most", "said"), [
    ("pending", 0, 3, "not started, up to 3 attempts"),
    ("processing", 1, 3, "attempt 1, 2 more left"),
    ("processing", 3, 3, "attempt 3, the last"),
    # failed at attempt 1, then `agent-bridge retry` (3 fresh attempts: max_attempts 4)
    ("pending", 1, 4, "after attempt 1, 3 more left"),
    ("processing", 2, 4, "attempt 2, 2 more left"),
    ("completed", 2, 4, "attempt 2"),
    ("failed", 1, 3, "attempt 1"),
])
def test_show_counts_attempts_as_a_user_does(status: str, attempt: int, most: int,
                                             said: str) -> None:
    assert attempts_of(status, attempt, most) == said
