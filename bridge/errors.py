"""`AgentBridgeError`, the base of every error agent-bridge raises, `ConfigError` (here so
bridge/agents.py and bridge/config.py both use it without importing each other), and the
task store's errors (transport errors are turned into these).

This module imports nothing of the project, so both packages (`bridge` and `tasks`) can
build on it without an import cycle and without the bridge loading worker code.
"""

from __future__ import annotations


class AgentBridgeError(Exception):
    """Base of every exception agent-bridge defines: `except AgentBridgeError` catches
    them all (the CLI does, to end with one line instead of a traceback). Classes that
    are also a built-in kind (ValueError, ImportError, LookupError, RuntimeError) keep
    that base too, so `except ValueError` still works."""


class ConfigError(AgentBridgeError, ValueError):
    """The configuration is invalid; the message says which variable and why."""


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (drivers add context lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# SQLSTATEs that mean "the server or the link is unwell, try again": connection
# exceptions, insufficient resources, system errors, serialization failures and
# deadlocks; and from class 57 only the shutdowns (57P0x), not a cancelled statement.
# Everything else (22 data, 23 constraints, 42 syntax or privileges, 54 limits such as
# a value too large) is permanent: retrying the same call cannot help. Both transports
# use this one rule (PostgREST passes the database's SQLSTATE on as its `code`).
_TRANSIENT_CLASSES = ("08", "53", "58", "40")
_TRANSIENT_STATES = ("57P0",)


def is_transient(sqlstate: str | None) -> bool:
    if not sqlstate or len(sqlstate) != 5:  # a SQLSTATE, not an HTTP status or PGRST code
        return False
    return sqlstate[:2] in _TRANSIENT_CLASSES or sqlstate.startswith(_TRANSIENT_STATES)


class StoreError(AgentBridgeError):
    """The task store failed. `code`: the SQLSTATE or PostgREST code, when there is one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class StoreUnavailable(StoreError):
    """The database or Supabase could not be reached or was overloaded; try again later."""


class StoreMisconfigured(StoreUnavailable):
    """The database or Supabase refused our credentials (a wrong or revoked key): nothing
    will work until the configuration is fixed. Retried like an outage, so a key fixed
    while the bridge and workers run lets them carry on; the CLI prints the fix."""


class StoreRejected(StoreError):
    """The database refused the call (bad input, permissions, missing migration)."""


# Codes that mean "no such table, function or column": the SQLSTATEs (both transports;
# PostgREST passes them on) and PostgREST's own schema-cache misses.
MISSING_CODES = ("42P01", "42883", "42703", "PGRST202", "PGRST204", "PGRST205")


class SchemaMissing(StoreRejected):
    """The database has no agent-bridge schema, or one of another version: every call
    that meets it says so in one line, with the fix. `found`: the installed version
    (None: none), `need`: this agent-bridge's."""

    def __init__(self, found: int | None, need: int, fix: str, code: str | None = None
                 ) -> None:
        if found is None:
            self.problem = (f"the database has no agent-bridge schema (found version none, "
                            f"need {need})")
        elif found < need:
            self.problem = f"the database has agent-bridge schema version {found}, need {need}"
        else:
            self.problem = (f"the database has agent-bridge schema version {found}, newer "
                            f"than this agent-bridge (version {need})")
            fix = "upgrade agent-bridge on this machine"
        super().__init__(f"{self.problem}: {fix}", code)
        self.found = found
        self.need = need
        self.fix = fix


class TaskNotFound(AgentBridgeError, LookupError):
    """No task has this id, or an id that starts with this prefix."""


class AmbiguousTaskId(AgentBridgeError, LookupError):
    """A short id is the start of several task ids: give more of it."""
