"""The configuration docs match the code: every setting is in `.env.example` (with its
default), the configuration reference's tables (docs/reference/configuration.md) are generated
from the settings objects, and docker-compose.yml uses only variables `.env.example` explains
and sets only variables something reads."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from bridge.config import variables as bridge_variables
from tasks.handlers.openai_chat import variables as openai_variables

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
CONFIG_DOCS = ROOT / "docs" / "reference" / "configuration.md"
COMPOSE = ROOT / "docker-compose.yml"

# docs/config_reference.py is a script and a MkDocs hook, not a package module.
_spec = importlib.util.spec_from_file_location("config_reference",
                                               ROOT / "docs" / "config_reference.py")
assert _spec is not None and _spec.loader is not None
config_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_reference)

VARIABLES: list[tuple[str, Any, str]] = [*bridge_variables(), *openai_variables()]
NAMES = [name for name, _, _ in VARIABLES]
# Variables of the images compose runs, read by those images and not by us.
IMAGE_VARIABLES = {"POSTGRES_PASSWORD"}


def env_example_values() -> dict[str, list[str]]:
    """Every `NAME=value` line of .env.example, commented out (`# NAME=value`) or not."""
    values: dict[str, list[str]] = {}
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    for match in re.finditer(r"^#?[ \t]*([A-Z][A-Z0-9_]*)=(.*)$", text, re.MULTILINE):
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values.setdefault(match.group(1), []).append(value)
    return values


def shows_default(value: str, default: Any) -> bool:
    if isinstance(default, bool):
        return value.lower() == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(value) == float(default)
        except ValueError:
            return False
    return value == str(default)


def compose_lines() -> list[str]:
    """docker-compose.yml without its comment lines."""
    lines = COMPOSE.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", NAMES)
def test_env_example_has_every_variable(name: str) -> None:
    assert name in env_example_values(), f".env.example has no `{name}=` line"


@pytest.mark.parametrize(("name", "default"), [(n, d) for n, d, _ in VARIABLES])
def test_env_example_shows_the_default(name: str, default: Any) -> None:
    if isinstance(default, str) and default.startswith("("):
        pytest.skip(f"{name} has no default value ({default})")
    values = env_example_values().get(name, [])
    assert any(shows_default(v, default) for v in values), (
        f".env.example shows {name}={values}, but the default is {default!r}")


def test_configuration_reference_is_generated_from_the_settings() -> None:
    """The page's tables are the settings objects' (name, default, help), in declaration
    order, nothing else: `python docs/config_reference.py` rewrites them."""
    page = CONFIG_DOCS.read_text(encoding="utf-8")
    assert page.count("<!-- settings: ") == len(config_reference.SOURCES)
    assert page == config_reference.render(page), (
        "docs/reference/configuration.md differs from the settings: "
        "run python docs/config_reference.py")


def test_every_setting_has_help_and_a_documented_name() -> None:
    for name, _, help in VARIABLES:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and help.strip(), name
    assert len(NAMES) == len(set(NAMES)), "two settings read one variable"


def test_compose_interpolates_only_variables_env_example_explains() -> None:
    # `$$` is compose's escape for a literal `$` (the container's shell expands it).
    text = "\n".join(compose_lines()).replace("$$", "")
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    assert used, "expected ${VAR} interpolation in docker-compose.yml (FLOWER_BASIC_AUTH)"
    missing = sorted(used - env_example_values().keys())
    assert not missing, f"docker-compose.yml uses {missing}, not in .env.example"


def test_compose_sets_only_variables_something_reads() -> None:
    # Compose's own keys are lower case, so upper-case keys are environment variables:
    # a setting renamed in bridge/config.py must not leave a dead one behind here.
    assigned = {m.group(1) for line in compose_lines()
                if (m := re.match(r"\s+([A-Z][A-Z0-9_]*):", line))}
    assert "REDIS_URL" in assigned
    known = set(NAMES) | env_example_values().keys() | IMAGE_VARIABLES
    assert not sorted(assigned - known), f"docker-compose.yml sets unknown {assigned - known}"
