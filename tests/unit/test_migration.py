"""The migration: idempotent, and a safe upgrade of the integration guide's table with
live rows in it; plus the table-level behaviour it installs (checks, triggers, index,
NOTIFY, realtime)."""

from __future__ import annotations

from bridge.migrate import (
    split_statements,
)


def test_statements_are_split_as_the_cli_splits_them() -> None:
    """pkg/parser: `;` inside quotes, dollar quotes, comments and parentheses does not end a
    statement; comments stay with the next statement; trailing `;` and spaces trimmed."""
    text = ("-- lead; comment\ncreate table t (a text default ';');\n"
            "create function f() returns text language sql as $body$ select 'x;y' $body$;\n"
            "/* block; /* nested; */ */ select \"we;ird\" from t;;\n"
            "select 'it''s; fine';\n\n")
    assert split_statements(text) == [
        "-- lead; comment\ncreate table t (a text default ';')",
        "create function f() returns text language sql as $body$ select 'x;y' $body$",
        "/* block; /* nested; */ */ select \"we;ird\" from t",
        "select 'it''s; fine'",
    ]




















