"""The errors the task store raises; transport errors are turned into these."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (drivers add context lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StoreError(Exception):
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
