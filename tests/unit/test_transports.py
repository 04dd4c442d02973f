"""One seam per driver: each transport runs every named query (state functions and row
operations alike) and classifies its driver's errors in one place, by SQLSTATE or
PostgREST code, not by exception class."""

from __future__ import annotations

import psycopg
import pytest

from bridge.errors import StoreUnavailable, is_transient
from bridge.store.postgres import classify


@pytest.mark.parametrize(("sqlstate", "transient"), [
    ("08006", True), ("53300", True), ("57P01", True), ("57P03", True), ("58030", True),
    ("40001", True), ("40P01", True),
    ("57014", False), ("54000", False), ("54001", False), ("22P05", False), ("22008", False),
    ("23505", False), ("42501", False), ("42883", False), (None, False)])
def test_sqlstate_decides(sqlstate: str | None, transient: bool) -> None:
    assert is_transient(sqlstate) is transient








def test_lost_connection_is_transient() -> None:
    exc = classify(psycopg.OperationalError("connection refused"))
    assert isinstance(exc, StoreUnavailable)




