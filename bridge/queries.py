"""Loads the named SQL blocks of `sql/queries.sql` and `sql/rows.sql`.

A block is `-- name --`, a line saying what it does, then the statement. The
blocks of queries.sql each call one SQL function, whose name is what the Supabase
transport passes to `rpc()`; the blocks of rows.sql are plain row operations,
which the Supabase transport runs through the table API. Either way every call
has one name and one definition, shared by both transports.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import NamedTuple

_HEADER = re.compile(r"^-- (\w+) --$", re.MULTILINE)
_FUNCTION = re.compile(r"\bpublic\.(\w+)\(")


class Query(NamedTuple):
    """One named block: what it does, its statement, and the function it calls."""

    name: str
    description: str
    sql: str
    function: str  # the SQL function it calls (the rpc() name); "" for a row operation


def parse(text: str, *, require_function: bool = True) -> dict[str, Query]:
    """The named blocks of `text`. With `require_function=False` a block is a row
    operation: its `function` is "" (it is not run through rpc())."""
    queries: dict[str, Query] = {}
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        description = lines[0].removeprefix("--").strip()
        sql = "\n".join(lines[1:]).strip()
        match = _FUNCTION.search(sql)
        if require_function and match is None:
            raise ValueError(f"query {name!r} calls no public.<function>()")
        queries[name] = Query(name, description, sql,
                              match.group(1) if require_function and match else "")
    return queries


def _read(name: str) -> str:
    return resources.files("bridge").joinpath(f"sql/{name}").read_text(encoding="utf-8")


@cache
def load() -> dict[str, Query]:
    """The state-function calls of queries.sql."""
    return parse(_read("queries.sql"))


@cache
def load_rows() -> dict[str, Query]:
    """The row operations of rows.sql."""
    return parse(_read("rows.sql"), require_function=False)


@cache
def load_all() -> dict[str, Query]:
    """Every named call the store makes."""
    state, rows = load(), load_rows()
    clash = state.keys() & rows.keys()
    if clash:
        raise ValueError(f"queries named twice: {sorted(clash)}")
    return {**state, **rows}
