"""Retention: finished tasks older than AGENT_RETENTION_DAYS are deleted, off the claim path.

The bridge runs `Retention` on a thread of its own, with a store (a connection) of its
own: every INTERVAL it deletes in batches of BATCH rows, each batch one short
transaction (`agent_tasks_prune`), pausing PAUSE between batches, until a batch comes
back short. The SQL locks only finished rows and skips any that another transaction
holds, so a claim never waits for it, and it never shares a claim's transaction
(supabase/migrations/20261203000400_retention.sql). `agent-bridge prune` runs the same
batches by hand.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from bridge.errors import SchemaMissing, StoreError, first_line
from bridge.store import Pruned, TaskStore

log = logging.getLogger(__name__)

BATCH = 500  # rows per transaction: short enough that nothing waits long for one
INTERVAL = 300.0  # seconds between passes: retention is measured in days
PAUSE = 0.1  # seconds between two batches of a pass, so a backlog's deletes (and their
# Realtime DELETE events) come in bursts of BATCH, not in one flood


def prune(store: TaskStore, older_than: timedelta, *, batch: int = BATCH,
          pause: float = PAUSE, stop: threading.Event | None = None) -> Pruned:
    """Delete batch after batch until one comes back short (or `stop` is set); the totals."""
    stop = stop or threading.Event()
    tasks = day_usage = 0
    while True:
        got = store.prune(older_than, batch)
        tasks += got.tasks
        day_usage += got.day_usage
        if (got.tasks < batch and got.day_usage < batch) or stop.wait(pause):
            return Pruned(tasks, day_usage)


def describe_age(age: timedelta) -> str:
    """`30 days`, `1 day`, `12 hours`, `90 minutes`, `45 seconds`."""
    seconds = age.total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count:,} {unit}{'' if count == 1 else 's'}"
    return f"{seconds:g} second{'' if seconds == 1 else 's'}"


def describe(pruned: Pruned, older_than: timedelta, *, dry_run: bool = False) -> str:
    """The one line the bridge logs and `prune` prints."""
    verb = "Would delete" if dry_run else "Pruned"
    counters = (f" and {pruned.day_usage:,} day counter{'' if pruned.day_usage == 1 else 's'}"
                if pruned.day_usage else "")
    return (f"🧹 {verb} {pruned.tasks:,} finished task{'' if pruned.tasks == 1 else 's'} "
            f"older than {describe_age(older_than)}{counters}")


def announce_off() -> None:
    """The bridge's line when AGENT_RETENTION_DAYS=0."""
    log.info("🧹 Retention off (AGENT_RETENTION_DAYS=0): finished tasks are kept",
             extra={"action": "retention", "older_than_seconds": 0})


class Retention:
    """The bridge's retention timer: a pass now, then one every `interval` seconds."""

    def __init__(self, store: TaskStore, older_than: timedelta, *, interval: float = INTERVAL,
                 batch: int = BATCH, pause: float = PAUSE) -> None:
        self.store = store
        self.older_than = older_than
        self.interval = interval
        self.batch = batch
        self.pause = pause
        self._thread: threading.Thread | None = None

    def run_once(self, stop: threading.Event) -> Pruned | None:
        """One pass; None if it failed (logged; the next pass tries again)."""
        try:
            pruned = prune(self.store, self.older_than, batch=self.batch, pause=self.pause,
                           stop=stop)
        except SchemaMissing as exc:  # not migrated yet: the bridge's loop says it, once
            log.debug("Retention pass skipped: %s", exc, extra={"action": "prune_skipped"})
            return None
        except StoreError as exc:
            log.warning("⚠️  Retention pass failed (%s); next try in %s", first_line(exc),
                        describe_age(timedelta(seconds=self.interval)),
                        extra={"action": "prune_failed"})
            return None
        except Exception:
            # A bug must not end retention, nor the bridge with it.
            log.exception("💥 Unexpected error in the retention pass",
                          extra={"action": "prune_failed"})
            return None
        if pruned.tasks or pruned.day_usage:
            log.info(describe(pruned, self.older_than),
                     extra={"action": "pruned", "tasks": pruned.tasks,
                            "day_usage": pruned.day_usage,
                            "older_than_seconds": int(self.older_than.total_seconds())})
        return pruned

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(stop)
            stop.wait(self.interval)

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run on a daemon thread until `stop` is set."""
        log.info("🧹 Retention: finished tasks older than %s are deleted (every %s)",
                 describe_age(self.older_than), describe_age(timedelta(seconds=self.interval)),
                 extra={"action": "retention",
                        "older_than_seconds": int(self.older_than.total_seconds())})
        self._thread = threading.Thread(target=self.run, args=(stop,), name="retention",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
