"""The worker's Celery app (`celery -A tasks worker`), from the environment.

Built by the factory the bridge uses too (bridge/celery_app.py); the settings are read
when the worker imports this, and a bad configuration stops it with one line. The
tasks are registered on `app` by tasks/runner.py and tasks/operator.py, which
`tasks/__init__.py` imports.
"""

from __future__ import annotations

import sys
from typing import Any

from celery.signals import setup_logging

from bridge import logs
from bridge.celery_app import RUN_AGENT, celery_config, create_celery_app
from bridge.config import ConfigError, Settings

__all__ = ["RUN_AGENT", "app", "celery_config", "load_settings", "settings"]


def load_settings() -> Settings:
    """Settings, or a one-line refusal to start: a bad configuration must not run."""
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"agent-bridge: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = load_settings()
app = create_celery_app(settings)


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    logs.configure(settings.log_level, settings.log_format)
