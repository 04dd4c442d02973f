"""The bridge wakes on Supabase Realtime in Supabase mode (SUPABASE_URL + service key only),
against the PostgREST and Realtime stand-ins behind one gateway; the poll stays the fallback.

POLL_INTERVAL is set far above the waits here, so a task that starts promptly was woken by
Realtime, not found by a poll.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.db import broadcasting, insert_task
from tests.fakes.gateway import StandIns
from tests.stack import Proc, Stack

SLOW_POLL = "120"


def supabase_stack(db: str, redis: str, tmp: Path, standins: StandIns, **env: str) -> Stack:
    return Stack(db, redis, tmp, BRIDGE_TRANSPORT="supabase", SUPABASE_URL=standins.url,
                 SUPABASE_SERVICE_KEY=standins.service_key, DATABASE_URL="", **env)


@contextmanager
def stack_stopped(stack: Stack) -> Iterator[None]:
    try:
        yield
    finally:
        stack.stop_all()


def wait_subscribed(bridge: Proc) -> None:
    bridge.wait_for_output("Waking on Supabase Realtime", 30)


@pytest.mark.parametrize("path", ["Broadcast", "postgres_changes"])
def test_bridge_wakes_on_realtime_and_recovers(clean_db: str, clean_redis: str, tmp_path: Path,
                                               standins: StandIns, path: str) -> None:
    """With the database broadcasting, the bridge joins the service-only wake-up topic;
    without, it follows the table's changes. Either way a drop is recovered quietly."""
    stack = supabase_stack(clean_db, clean_redis, tmp_path, standins, POLL_INTERVAL=SLOW_POLL)
    with broadcasting(clean_db, on=path == "Broadcast"), stack_stopped(stack):
        stack.worker()
        bridge = stack.bridge()
        wait_subscribed(bridge)
        assert f"Waking on Supabase Realtime {path}" in bridge.output
        first = insert_task(clean_db, {"prompt": "woken"})
        stack.wait_for("the first task", lambda: stack.row(first)["status"] == "completed", 30)
        # Realtime drops every socket: the bridge rejoins by itself, and says nothing loud.
        joins = standins.realtime.stats()["joins"]
        assert standins.realtime.drop() >= 1
        stack.wait_for("a new Realtime join",
                       lambda: standins.realtime.stats()["joins"] > joins, 30)
        second = insert_task(clean_db, {"prompt": "woken again"})
        stack.wait_for("the second task", lambda: stack.row(second)["status"] == "completed", 30)
        assert "Traceback" not in bridge.output and "ERROR" not in bridge.output


def test_poll_is_the_fallback_when_realtime_refuses(clean_db: str, clean_redis: str,
                                                    tmp_path: Path, standins: StandIns) -> None:
    standins.realtime.fail_joins(10_000)
    stack = supabase_stack(clean_db, clean_redis, tmp_path, standins, POLL_INTERVAL="0.3")
    try:
        stack.worker()
        bridge = stack.bridge()
        task = insert_task(clean_db, {"prompt": "polled"})
        stack.wait_for("the polled task", lambda: stack.row(task)["status"] == "completed", 30)
        assert "Waking on Supabase Realtime" not in bridge.output
        assert "Traceback" not in bridge.output
    finally:
        standins.realtime.reset()
        stack.stop_all()
