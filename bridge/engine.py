"""The bridge loop: wake, rescue expired leases, claim what the workers can take, enqueue.

It never exits because a dependency blinked: an outage is logged once, retried
with jittered backoff, and its end is logged too.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from bridge.backpressure import QueueGauge
from bridge.config import Settings
from bridge.errors import SchemaMissing, StoreError, StoreUnavailable, first_line
from bridge.metrics import Metrics
from bridge.names import TABLE
from bridge.publisher import BrokerUnavailable, Publisher
from bridge.store import Claim, TaskStore

log = logging.getLogger(__name__)

BACKPRESSURE_PAUSE = 0.05  # seconds between queue checks while an agent's queue is full


@dataclass(frozen=True)
class RoundFailure:
    """What made a `run --once` round fail: `database` (unreachable), `broker` (Redis
    unreachable), `schema` (not migrated, or another version), `refused` (the database
    refused a call) or `unexpected`; and the error's first line."""

    what: str
    message: str


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
        self.agents = settings.configured_agents()
        self.registered = False  # AGENTS written to agent_bridge_agents
        self.schema_problem: str | None = None  # said while the schema is missing or old
        # Backpressure is per agent queue: a full queue stops claiming that agent's rows
        # only. `blocked`: the agents whose queue was full at the last look.
        self.blocked: set[str] = set()
        self.queues = {a.name: QueueGauge(self._depth_reader(a.name),
                                          max_queued=settings.max_queued,
                                          target_seconds=settings.queue_seconds,
                                          start=settings.batch_size)
                       for a in self.agents}

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

    def register(self) -> None:
        """Tell the database which agents inserts may name (AGENTS), once per start."""
        if not self.registered:
            names = self.store.register_agents(self.agents.registration())
            self.registered = True
            log.info("🧭 Agents: %s", ", ".join(
                f"{a.name} → {a.queue}" for a in self.agents),
                extra={"action": "agents", "agent": ",".join(["default", *names])})

    def step(self, only: Collection[str] | None = None) -> tuple[int, bool]:
        """Claim and enqueue once, for the agents whose queue has room (`only`: look at
        these agents only). Returns (claimed, more): `more` means a claim was limited
        by its batch size, so more rows may be waiting right now."""
        rooms: dict[str, int] = {}
        for agent in self.agents:
            if only is not None and agent.name not in only:
                continue
            room = self.queues[agent.name].room()
            if room <= 0:  # backpressure: this agent's workers have enough to do
                self.blocked.add(agent.name)
            else:
                self.blocked.discard(agent.name)
                rooms[agent.name] = room
        # One claim for the agents with room for a whole batch (whichever agent the
        # rows are for, none overfills); one claim each for the agents with less room.
        cap = min(self.settings.batch_size, self.settings.max_queued)
        roomy = [name for name, room in rooms.items() if room >= cap]
        groups = [(roomy, cap)] if roomy else []
        groups += [([name], room) for name, room in rooms.items() if room < cap]
        claimed, more = 0, False
        for names, limit in groups:
            got = self._claim(names, limit)
            claimed += got
            more = more or got == limit
        return claimed, more

    def _claim(self, agents: list[str], limit: int) -> int:
        begun = time.perf_counter()
        claims = self.store.claim(limit, self.settings.lease_seconds, agents=agents,
                                  tenant_concurrency=self.settings.tenant_concurrency,
                                  inline_bytes=self.settings.inline_payload_bytes)
        self.metrics.claim_seconds.observe(time.perf_counter() - begun)
        if not claims:
            return 0
        self.counts.claimed += len(claims)
        for claim in claims:
            self.metrics.claimed.labels(claim.agent).inc()
            log.info("⚡ Found Task %s!", claim.id,
                     extra={"action": "claimed", "task_id": claim.id, "attempt": claim.attempt,
                            "agent": claim.agent})
        try:
            self.publisher.publish(claims)
        except BrokerUnavailable:
            self.metrics.enqueue_failures.inc()
            self._release(claims)
            raise
        self.counts.enqueued += len(claims)
        for claim in claims:
            self.metrics.enqueued.labels(claim.agent).inc()
            if claim.agent in self.queues:
                self.queues[claim.agent].sent(1)
        return len(claims)

    def _depth_reader(self, agent: str) -> Callable[[], int]:
        queue = self.agents.by_name[agent].queue

        def read() -> int:
            depth = self.publisher.queue_depth(queue)
            self.metrics.queue_depth.labels(agent).set(depth)
            return depth

        return read

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
            self.metrics.released.labels(claim.agent).inc()
            self.counts.released += 1

    # The loop ----------------------------------------------------------------
    def run(self, stop: threading.Event, *, once: bool = False) -> RoundFailure | None:
        """Run until `stop`; with `once`, one round, returning what failed (None: nothing)."""
        # Register AGENTS before saying ONLINE, so that once it is said inserts may name
        # them; if the database is not there yet, the loop retries (and logs the outage).
        with contextlib.suppress(StoreError):
            self.register()
        self._banner()
        now = time.monotonic()
        next_rescue = now
        next_heartbeat = now + self.settings.heartbeat_interval
        # While an agent's queue is full, only its queue is looked at every
        # BACKPRESSURE_PAUSE; every agent at a wake-up, and at least every POLL_INTERVAL.
        only: set[str] | None = None
        next_full_round = now
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_full_round:
                only = None
            if only is None:
                next_full_round = now + self.settings.poll_interval
            try:
                self.register()
                if now >= next_rescue:
                    self.rescue()
                    next_rescue = now + self.settings.rescue_interval
                _, full = self.step(only)
                if self.schema_problem is not None:
                    log.info("🟢 The agent-bridge schema is installed: starting work",
                             extra={"action": "schema_ready"})
                    self.schema_problem = None
                self.database.ok()
                self.broker.ok()
            except SchemaMissing as exc:  # not migrated (yet): wait for it, say it once
                if once:
                    return RoundFailure("schema", str(exc))
                self._schema_missing(exc)
                stop.wait(self.settings.poll_interval)
                continue
            except (BrokerUnavailable, StoreError) as exc:  # unreachable, or refused
                what, outage = self._outage_of(exc)
                pause = outage.failed(exc)
                if once:
                    return RoundFailure(what, first_line(exc))
                stop.wait(pause)
                continue
            except Exception as exc:
                # A bug or an error type nobody foresaw: a daemon must not die of it.
                log.exception("💥 Unexpected error in the bridge loop; retrying",
                              extra={"action": "loop_error"})
                if once:
                    return RoundFailure("unexpected", f"{type(exc).__name__}: {first_line(exc)}")
                stop.wait(random.uniform(1.0, 5.0))
                continue
            if time.monotonic() >= next_heartbeat:
                self.heartbeat()
                next_heartbeat = time.monotonic() + self.settings.heartbeat_interval
            if once:
                return None
            if full:
                only = None
                continue
            if self.blocked:
                timeout = BACKPRESSURE_PAUSE
            else:
                timeout = min(self.settings.poll_interval,
                              max(0.0, next_rescue - time.monotonic()),
                              max(0.0, next_heartbeat - time.monotonic()))
            try:
                woke = self.store.wait_for_work(max(timeout, 0.01))
            except StoreUnavailable as exc:
                stop.wait(self.database.failed(exc))
                woke = True
            # New rows (a wake-up) may be for any agent; a pause ends with another
            # look at the full queues only.
            only = None if woke or not self.blocked else set(self.blocked)
        log.info("👋 Bridge stopped.", extra={"action": "stopped"})
        return None

    def _outage_of(self, exc: BrokerUnavailable | StoreError) -> tuple[str, Outage]:
        """What a failed round says (RoundFailure.what), and whose outage it is."""
        if isinstance(exc, BrokerUnavailable):
            return "broker", self.broker
        return ("database" if isinstance(exc, StoreUnavailable) else "refused"), self.database

    def _schema_missing(self, exc: SchemaMissing) -> None:
        """Say once (and again only if it changes) that the database lacks our schema;
        the loop looks again every POLL_INTERVAL and starts once a migration lands."""
        if exc.problem != self.schema_problem:
            self.schema_problem = exc.problem
            log.warning("⏳ %s: %s; waiting for it", exc.problem, exc.fix,
                        extra={"action": "schema_missing", "found": exc.found,
                               "need": exc.need})

    def heartbeat(self) -> None:
        c = self.counts
        backlog = "?"
        try:
            per_agent = self.store.agent_stats()
            backlog = str(sum(a.due for a in per_agent))
            for a in per_agent:
                self.metrics.backlog.labels(a.agent).set(a.due)
                self.metrics.oldest_pending.labels(a.agent).set(a.oldest_due_seconds or 0)
                self.metrics.processing.labels(a.agent).set(a.processing)
                self.metrics.failed.labels(a.agent).set(a.failed)
            self.metrics.spend.totals = self.store.usage_totals()
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
                else f"Realtime, polling every {s.poll_interval:g}s" if s.supabase_realtime
                else f"polling every {s.poll_interval:g}s")
        log.info("🟢 Agent Bridge is ONLINE.", extra={"action": "online"})
        log.info("👀 Watching table '%s' for 'pending' tasks (%s, %s)...", TABLE,
                 s.store_kind, wake)
        log.info("🕒 Started at: %s", datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
        log.info("-" * 60)
