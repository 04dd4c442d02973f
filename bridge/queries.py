"""Loads the named SQL blocks of `sql/queries.sql`.

Each block calls one SQL function; its name is what the Supabase transport
passes to `rpc()`, so both transports share one definition of every call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^-- (\w+) --$", re.MULTILINE)
_FUNCTION = re.compile(r"\bpublic\.(\w+)\(")


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    sql: str
    function: str  # the SQL function it calls, i.e. the rpc() name


def parse(text: str, *, require_function: bool = True) -> dict[str, Query]:
    """The named blocks of `text`. With `require_function=False` a block may be plain
    SQL (its `function` is then "" unless it calls one)."""
    queries: dict[str, Query] = {}
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        description = lines[0].removeprefix("--").strip()
        sql = "\n".join(lines[1:]).strip()
        match = _FUNCTION.search(sql)
        if match is None and require_function:
            raise ValueError(f"query {name!r} calls no public.<function>()")
        queries[name] = Query(name, description, sql, match.group(1) if match else "")
    return queries


@cache
def load() -> dict[str, Query]:
    text = resources.files("bridge").joinpath("sql/queries.sql").read_text(encoding="utf-8")
    return parse(text)
