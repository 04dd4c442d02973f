"""Handlers: the agent logic that runs one task. `AGENT_HANDLER` picks the `default`
agent's, `AGENTS` the others'.

A handler is `handler(task: dict) -> dict` or `async def handler(task) -> dict`.
It may carry `handler.validate_payload(payload)` that raises InvalidPayload;
otherwise the default check (a non-empty string `prompt`) applies.

Handlers are found from the folder the worker runs in (the current directory), whatever
started it: `celery -A tasks worker` (whose sys.path starts with the script's folder)
as well as `agent-bridge dev` (whose worker runs `python -P`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

from bridge.errors import AgentBridgeError

Handler = Callable[[dict[str, Any]], Any]


class HandlerNotFound(AgentBridgeError, ImportError):
    """AGENT_HANDLER does not name an importable callable."""


@cache
def load_handler(spec: str, source: str = "AGENT_HANDLER") -> Handler:
    """Import `package.module:callable`; `source` names the setting in messages."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerNotFound(f"{source}={spec!r} must look like 'package.module:callable'")
    here = on_path_from_working_directory()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and bool(exc.name) and (
            module_name == exc.name or module_name.startswith(f"{exc.name}."))
        where = (f" (handlers are imported from the folder the worker runs in, {here}, "
                 "or from installed packages)") if missing else ""
        raise HandlerNotFound(
            f"{source}={spec!r}: cannot import {module_name}: {exc}{where}") from exc
    except Exception as exc:  # the module itself fails (a SyntaxError, a missing env var...)
        raise HandlerNotFound(
            f"{source}={spec!r}: importing {module_name} failed: {type(exc).__name__}: "
            f"{exc}") from exc
    handler = getattr(module, attr, None)
    if not callable(handler):
        raise HandlerNotFound(f"{source}={spec!r}: {module_name} has no callable {attr!r}")
    return handler  # type: ignore[no-any-return]


def on_path_from_working_directory() -> str:
    """Put the current directory on sys.path (last: an installed package of the same
    name wins) unless it is there already; return it."""
    here = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == here for entry in sys.path):
        sys.path.append(here)
    return here
