"""Learns which of the attempts this worker process runs were asked to stop.

One thread per worker process, started with its first task:
- direct mode: one connection LISTENs on `agent_task_cancel` (`cancel_agent_task`
  NOTIFYs `id:attempt` when it records a request on a held row). No queries while
  the listener is up; one `agent_tasks_cancel_requested` query for the held attempts
  after each (re)connect, since notifications sent meanwhile are lost.
- Supabase mode (no LISTEN over the API): one `agent_tasks_cancel_requested` call
  for all held attempts every CANCEL_POLL_INTERVAL, and none while nothing is held.

A match fires the attempt's CancelScope (see tasks/cancellation/__init__.py).
"""

from __future__ import annotations

import logging
import threading
import time

from bridge.config import Settings
from bridge.errors import StoreError
from bridge.store import CANCEL_CHANNEL, TaskStore, open_store
from tasks.lease import Holding, LeaseKeeper
from tasks.process_thread import ProcessThread

log = logging.getLogger(__name__)

# A NOTIFY can arrive between a worker's start() and its holding being registered;
# notified attempts not held (yet) are remembered this long.
RECENT_SECONDS = 30.0


class CancelWatcher:
    def __init__(self, settings: Settings, store: TaskStore, keeper: LeaseKeeper) -> None:
        self._settings = settings
        self._store = store
        self._keeper = keeper
        self._listen = settings.store_kind == "postgres"
        self._interval = settings.cancel_poll_interval
        self._lock = threading.Lock()
        self._thread = ProcessThread(self._run, "cancel-watcher")
        self._recent: dict[tuple[str, int], float] = {}

    def watch(self, holding: Holding) -> None:
        """A new attempt runs here (LeaseKeeper.on_hold): watch it."""
        with self._lock:
            notified = self._recent.pop((holding.task_id, holding.attempt), None)
            self._thread.ensure()
        if notified is not None:
            self._stop(holding)

    def _run(self) -> None:
        failing = False
        listener: TaskStore | None = None
        while True:
            try:
                if self._listen:
                    if listener is None:
                        listener = open_store(self._settings, listen=True, pool=False,
                                              channel=CANCEL_CHANNEL)
                    found = listener.wait_for_cancels(1.0)
                    if found is None:  # (re)connected: what did we miss?
                        self._check()
                    else:
                        self._notified(found)
                else:
                    time.sleep(self._interval)
                    self._check()
            except StoreError as exc:
                if not failing:
                    log.warning("⚠️  Cannot watch for cancelled tasks: %s", exc,
                                extra={"action": "cancel_watch_failed"})
                failing = True
                time.sleep(1.0)
                continue
            if failing:
                log.info("💚 Watching for cancelled tasks again",
                         extra={"action": "cancel_watch_ok"})
                failing = False

    def _check(self) -> None:
        """One query for every attempt held here (none when nothing is held)."""
        held = {(h.task_id, h.attempt): h for h in self._keeper.held()}
        if not held:
            return
        for key in self._store.cancel_requested(list(held)):
            self._stop(held[key])

    def _notified(self, pairs: list[tuple[str, int]]) -> None:
        held = {(h.task_id, h.attempt): h for h in self._keeper.held()}
        now = time.monotonic()
        for key in pairs:
            if key in held:
                self._stop(held[key])
            else:
                with self._lock:
                    self._recent[key] = now
        with self._lock:
            for key, at in list(self._recent.items()):
                if now - at > RECENT_SECONDS:
                    del self._recent[key]

    def _stop(self, holding: Holding) -> None:
        if holding.cancel.cancel():
            log.info("🛑 Task %s: cancellation requested, stopping its handler",
                     holding.task_id, extra={"action": "cancel_requested",
                                             "task_id": holding.task_id,
                                             "attempt": holding.attempt})
