"""The bridge loop: wake, rescue expired leases, claim what the workers can take, enqueue.

It never exits because a dependency blinked: an outage is logged once, retried
with jittered backoff, and its end is logged too.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from bridge.config import Settings
from bridge.errors import StoreError, StoreUnavailable
from bridge.metrics import Metrics
from bridge.publisher import BrokerUnavailable, Publisher
from bridge.store import Claim, TaskStore

log = logging.getLogger("agent_bridge.bridge")

TABLE = "agent_task_requests"
BACKPRESSURE_PAUSE = 0.05  # seconds between queue checks while the broker queue is full
DEPTH_REFRESH = 1.0  # seconds a broker queue depth is trusted (plus what we sent since)


@dataclass
class Counts:
    """Totals since the last heartbeat line."""

    claimed: int = 0
    enqueued: int = 0
    released: int = 0
    rescued: int = 0


class Outage:
    """Logs a dependency's outage once when it starts and once when it ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.error("🔴 %s unavailable: %s (retrying with backoff)", self.what, exc,
                      extra={"action": "outage", "dependency": self.what})
        # Exponential backoff with full jitter, capped at 15 s.
        return random.uniform(0.1, min(15.0, 0.5 * 2 ** min(self.failures, 5)))

    def ok(self) -> None:
        if self.since is not None:
            log.info("🟢 %s reachable again after %.1fs", self.what,
                     time.monotonic() - self.since,
                     extra={"action": "recovered", "dependency": self.what})
        self.since = None
        self.failures = 0


class Bridge:
    def __init__(self, settings: Settings, store: TaskStore, publisher: Publisher,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.metrics = metrics or Metrics()
        self.counts = Counts()
        self.database = Outage("Database" if settings.store_kind == "postgres" else "Supabase")
        self.broker = Outage("Broker")
        self.queue_full = False
        self._depth_bound = 0
        self._depth_measured_at = -DEPTH_REFRESH

    # One round ---------------------------------------------------------------
    def rescue(self) -> int:
        rescued = self.store.rescue()
        for row in rescued:
            self.metrics.rescued.labels(row.status).inc()
            log.warning("🛟 Task %s rescued: lease of attempt %d expired, now %s", row.id,
                        row.attempt, row.status,
                        extra={"action": "rescued", "task_id": row.id, "attempt": row.attempt,
                               "status": row.status})
        self.counts.rescued += len(rescued)
        return len(rescued)

    def step(self) -> tuple[int, bool]:
        """Claim and enqueue once. Returns (claimed, full): `full` means the batch
        was limited by the batch size, so more rows may be waiting right now."""
        depth = self._queue_depth()
        room = self.settings.max_queued - depth
        self.queue_full = room <= 0
        if self.queue_full:  # backpressure: the workers have enough to do
            return 0, False
        limit = min(self.settings.batch_size, room)
        begun = time.perf_counter()
        claims = self.store.claim(limit, self.settings.lease_seconds)
        self.metrics.claim_seconds.observe(time.perf_counter() - begun)
        if not claims:
            return 0, False
        self.metrics.claimed.inc(len(claims))
        self.counts.claimed += len(claims)
        for claim in claims:
            log.info("⚡ Found Task %s!", claim.id,
                     extra={"action": "claimed", "task_id": claim.id, "attempt": claim.attempt})
        try:
            sent = self.publisher.publish(claims)
        except BrokerUnavailable as exc:
            sent = exc.sent
            self.metrics.enqueue_failures.inc()
            self._release(claims[sent:])
            raise
        finally:
            self.metrics.enqueued.inc(sent)
            self.counts.enqueued += sent
            self._depth_bound += sent
        return len(claims), len(claims) == limit

    def _queue_depth(self) -> int:
        """Jobs waiting in the broker, asked only when it matters. Workers only ever
        shrink the queue, so the last measurement plus what we published since is an
        upper bound: trusting it never claims too much, at worst too little. Measure
        again once it reaches half the limit, or after DEPTH_REFRESH."""
        now = time.monotonic()
        if (2 * self._depth_bound >= self.settings.max_queued
                or now - self._depth_measured_at > DEPTH_REFRESH):
            self._depth_bound = self.publisher.queue_depth()
            self._depth_measured_at = now
            self.metrics.queue_depth.set(self._depth_bound)
        return self._depth_bound

    def _release(self, claims: list[Claim]) -> None:
        for claim in claims:
            try:
                self.store.release(claim)
            except StoreError as exc:
                # The lease brings it back instead.
                log.warning("⚠️  Task %s not released (%s); its lease will expire", claim.id, exc,
                            extra={"action": "release_failed", "task_id": claim.id,
                                   "attempt": claim.attempt})
                continue
            self.metrics.released.inc()
            self.counts.released += 1

    # The loop ----------------------------------------------------------------
    def run(self, stop: threading.Event, *, once: bool = False) -> None:
        self._banner()
        now = time.monotonic()
        next_rescue = now
        next_heartbeat = now + self.settings.heartbeat_interval
        while not stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_rescue:
                    self.rescue()
                    next_rescue = now + self.settings.rescue_interval
                _, full = self.step()
                self.database.ok()
                self.broker.ok()
            except BrokerUnavailable as exc:
                stop.wait(self.broker.failed(exc))
                continue
            except StoreUnavailable as exc:
                stop.wait(self.database.failed(exc))
                continue
            except StoreError as exc:  # refused: e.g. the migration is missing
                stop.wait(self.database.failed(exc))
                continue
            except Exception:
                # A bug or an error type nobody foresaw: a daemon must not die of it.
                log.exception("💥 Unexpected error in the bridge loop; retrying",
                              extra={"action": "loop_error"})
                stop.wait(random.uniform(1.0, 5.0))
                continue
            if time.monotonic() >= next_heartbeat:
                self.heartbeat()
                next_heartbeat = time.monotonic() + self.settings.heartbeat_interval
            if once:
                return
            if full:
                continue
            if self.queue_full:
                stop.wait(BACKPRESSURE_PAUSE)
                continue
            timeout = min(self.settings.poll_interval, max(0.0, next_rescue - time.monotonic()),
                          max(0.0, next_heartbeat - time.monotonic()))
            try:
                self.store.wait_for_work(max(timeout, 0.01))
            except StoreUnavailable as exc:
                stop.wait(self.database.failed(exc))
        log.info("👋 Bridge stopped.", extra={"action": "stopped"})

    def heartbeat(self) -> None:
        c = self.counts
        backlog = "?"
        try:
            stats = self.store.stats()
            backlog = str(stats.due)
            self.metrics.backlog.set(stats.due)
            self.metrics.oldest_pending.set(stats.oldest_due_seconds or 0)
        except StoreError:
            pass
        log.info("💓 Bridge heartbeat: %s - Still watching for tasks... claimed=%d enqueued=%d "
                 "rescued=%d backlog=%s", datetime.now().strftime("%H:%M:%S"), c.claimed,
                 c.enqueued, c.rescued, backlog,
                 extra={"action": "heartbeat", "claimed": c.claimed, "enqueued": c.enqueued,
                        "released": c.released, "rescued": c.rescued, "backlog": backlog})
        self.counts = Counts()

    def _banner(self) -> None:
        s = self.settings
        wake = ("LISTEN/NOTIFY" if s.store_kind == "postgres"
                else f"polling every {s.poll_interval:g}s")
        log.info("🟢 Agent Bridge is ONLINE.", extra={"action": "online"})
        log.info("👀 Watching table '%s' for 'pending' tasks (%s, %s)...", TABLE,
                 s.store_kind, wake)
        log.info("🕒 Started at: %s", datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
        log.info("-" * 60)
