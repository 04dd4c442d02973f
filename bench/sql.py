"""The named SQL blocks of bench/bench.sql (`-- name --`, a line saying what it does,
then the SQL), read as bridge/queries.py reads the package's."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from bridge.queries import parse


@cache
def bench_sql(name: str) -> str:
    """Block `name` of bench/bench.sql."""
    text = (Path(__file__).parent / "bench.sql").read_text(encoding="utf-8")
    return parse(text, require_function=False)[name].sql
