"""Realtime wake-ups for the Supabase transport: the bridge hears a row become pending
through Supabase Realtime (supabase-py's realtime client) instead of waiting for its poll.

Where the database broadcasts (schema 6, agent_bridge.realtime_broadcast on), the bridge
joins the private topic `agent_bridge:wakeups`, on which the insert trigger sends one
`pending` message per transaction that makes a row pending: Realtime does no per-change
work for it. Elsewhere (broadcasting off, an older schema, the question failed) it
subscribes to postgres_changes on the table as before. The choice is made again for each
session, so switching the flag takes effect at the next reconnect.

realtime-py's client is asyncio-only, so it runs on a daemon thread with its own loop and
sets a threading.Event on each INSERT of a pending row (and each UPDATE to `pending`:
rescue, release, operator retry). Outages are silent by design: the poll keeps the bridge
correct, so a lost socket, a refused join or a Realtime that is not enabled only mean
wake-ups come from the poll until a session is back (reconnect with capped backoff, logged
at DEBUG). Each new session wakes the bridge once, to catch what arrived while it was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from realtime import RealtimePostgresChangesListenEvent as Event

from bridge.names import TABLE, WAKEUP_EVENT, WAKEUP_TOPIC

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15
MAX_BACKOFF = 30.0


class RealtimeWakeups:
    def __init__(self, supabase_url: str, key: str, wake: threading.Event,
                 broadcasting: Callable[[], bool] = lambda: False) -> None:
        self._url = supabase_url.rstrip("/") + "/realtime/v1"
        self._key = key
        self._wake = wake
        self._broadcasting = broadcasting
        self.path: str | None = None  # "broadcast" or "postgres_changes" once a session is live
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.subscribed = threading.Event()  # a session is live now (for tests and logs)
        self._announced = False

    def start(self) -> None:
        if self._thread is not None:
            return
        # realtime-py logs each failed attempt at ERROR; here an outage is expected and
        # handled (the poll covers it), so only our DEBUG lines speak of it.
        logging.getLogger("realtime").setLevel(logging.CRITICAL)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="realtime-wakeups", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        for task in asyncio.all_tasks(loop) if loop.is_running() else ():
            loop.call_soon_threadsafe(task.cancel)
        thread.join(5)
        self._thread = None

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._supervise())
        self._loop.close()

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            try:
                await self._session()
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any trouble: poll meanwhile, try again later
                log.debug("Realtime wake-ups unavailable (%s: %s); polling meanwhile",
                          type(exc).__name__, exc, extra={"action": "realtime_down"})
            self.subscribed.clear()
            if self._stopping.is_set():
                return
            await asyncio.sleep(backoff * random.uniform(0.75, 1.25))
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _session(self) -> None:
        """One socket and one channel until either fails."""
        client = AsyncRealtimeClient(self._url, self._key, auto_reconnect=False,
                                     hb_interval=HEARTBEAT_SECONDS, max_retries=1)
        states: asyncio.Queue[tuple[RealtimeSubscribeStates, Exception | None]] = \
            asyncio.Queue()
        try:
            broadcast = await asyncio.to_thread(self._asks_broadcast)
            await client.connect()
            if broadcast:
                channel = client.channel(WAKEUP_TOPIC, {"config": {
                    "private": True, "broadcast": {"ack": False, "self": False},
                    "presence": {"key": "", "enabled": False}}})
                channel.on_broadcast(WAKEUP_EVENT, self._on_change)
            else:
                channel = client.channel("agent-bridge-wakeups")
                for event in (Event.Insert, Event.Update):
                    channel.on_postgres_changes(event, self._on_change, table=TABLE,
                                                schema="public", filter="status=eq.pending")
            await channel.subscribe(lambda state, err: states.put_nowait((state, err)))
            while True:
                state, err = await states.get()
                if state == RealtimeSubscribeStates.SUBSCRIBED:
                    self.path = "broadcast" if broadcast else "postgres_changes"
                    self.subscribed.set()
                    self._wake.set()  # catch up on what arrived while we were away
                    if not self._announced:
                        self._announced = True
                        log.info("⚡ Waking on Supabase Realtime %s (polling stays as fallback)",
                                 "Broadcast" if broadcast else "postgres_changes",
                                 extra={"action": "realtime_up", "path": self.path})
                    continue
                raise ConnectionError(f"channel {state.value}" + (f": {err}" if err else ""))
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    def _asks_broadcast(self) -> bool:
        try:
            return self._broadcasting()
        except Exception as exc:  # an older schema or an outage: the table's changes
            log.debug("Broadcast wake-ups unavailable (%s: %s); using postgres_changes",
                      type(exc).__name__, exc, extra={"action": "realtime_path"})
            return False

    def _on_change(self, payload: Any) -> None:
        self._wake.set()
