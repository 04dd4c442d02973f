"""The plans of every statement a connection runs, nested ones (inside SQL functions)
included, through auto_explain: so a test sees what a function really does, not an
EXPLAIN of a hand-copied query that could drift from it."""

from __future__ import annotations

from typing import Any

import psycopg


def explain_everything(conn: psycopg.Connection[Any]) -> list[str]:
    """From now on, every statement `conn` runs sends its plan as a notice; returns the
    list they are appended to."""
    plans: list[str] = []
    conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
    conn.execute("load 'auto_explain'")
    for setting, value in (("log_min_duration", "0"), ("log_nested_statements", "on"),
                           ("log_level", "notice")):
        conn.execute(f"set auto_explain.{setting} = '{value}'")
    return plans
