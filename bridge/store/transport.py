"""The seam between the store and a database driver: run one named query."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from bridge.queries import Query


class Transport(Protocol):
    name: str
    # The most rows one call may return (PostgREST's db-max-rows); None: no cap.
    max_rows: int | None

    def call(self, query: Query, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run `query` with `params`; rows as dicts. Raises StoreUnavailable/StoreRejected."""
        ...

    def wait_for_wakeup(self, timeout: float) -> bool:
        """Block until a row may be ready (True) or `timeout` passes (False)."""
        ...

    def wait_for_notifications(self, timeout: float) -> list[str] | None:
        """The payloads of NOTIFYs on the listened channel within `timeout` ([] if none);
        None when the listener (re)connected and notifications may have been missed."""
        ...

    def interrupt(self) -> None:
        """Make a blocked wait_for_wakeup() return now (from another thread)."""
        ...

    def close(self) -> None: ...
