"""Keeps the leases of the attempts this worker process is running alive.

One thread per process renews every held lease each third of LEASE_SECONDS, all in one
call of the process's writer (one statement for all its tasks), so a
healthy long-running agent is never rescued from under itself while a vanished
worker's task is back in the queue within about one lease. A renewal that the
database refuses (the attempt was rescued and re-claimed elsewhere) marks the
holding lost; the runner then writes nothing more for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.errors import StoreError
from tasks.cancellation import CancelScope
from tasks.process_thread import ProcessThread
from tasks.writer import GroupWriter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Holding:
    task_id: str
    attempt: int
    worker: str
    lost: threading.Event = field(default_factory=threading.Event)
    cancel: CancelScope = field(default_factory=CancelScope)  # fired on a cancel request


class LeaseKeeper:
    def __init__(self, writer: GroupWriter, lease_seconds: float) -> None:
        self._writer = writer
        self._lease = lease_seconds
        self._held: set[Holding] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = ProcessThread(self._run, "lease-keeper")
        # Told of every new holding (the cancel watcher).
        self.on_hold: Callable[[Holding], None] | None = None

    def hold(self, task_id: str, attempt: int, worker: str) -> Holding:
        holding = Holding(task_id, attempt, worker)
        with self._lock:
            self._held.add(holding)
            self._thread.ensure()
        if self.on_hold is not None:
            self.on_hold(holding)
        return holding

    def held(self) -> list[Holding]:
        """The attempts this process runs now."""
        with self._lock:
            return list(self._held)

    def drop(self, holding: Holding) -> None:
        with self._lock:
            self._held.discard(holding)

    def _run(self) -> None:
        failing = False
        while True:
            self._wake.wait(self._lease / 3)
            with self._lock:
                held = list(self._held)
            if not held:
                continue
            try:
                results = self._writer.heartbeats(
                    [(h.task_id, h.attempt, h.worker) for h in held], self._lease)
            except StoreError as exc:
                if not failing:
                    log.warning("⚠️  Cannot renew leases: %s", exc,
                                extra={"action": "lease_renew_failed"})
                failing = True
                continue
            if failing:
                log.info("💚 Lease renewal works again", extra={"action": "lease_renew_ok"})
                failing = False
            for holding, result in zip(held, results, strict=True):
                if not result.applied:
                    holding.lost.set()
                    self.drop(holding)
                    log.warning("⚠️  Task %s lost its lease: %s", holding.task_id,
                                result.refusal(holding.attempt),
                                extra={"action": "lease_lost", "task_id": holding.task_id,
                                       "attempt": holding.attempt})
