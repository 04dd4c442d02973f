"""How many more jobs one agent's broker queue may take: backpressure by time, not count.

A Celery queue is first in, first out. Every job the bridge puts in it is work that a
row claimed later, a fair turn of another tenant included, must wait behind. So the
bridge keeps only about `target_seconds` of work in each queue: it measures how fast
the workers take jobs (what left the queue between two depth readings, while it did
not run dry) and allows `rate * target_seconds` jobs, never more than `max_queued`.
A queue found empty may have starved its workers, so its allowance doubles. Fast
no-op workers keep half a second of theirs (hundreds of jobs); a hundred 5-second LLM
calls keep about ten jobs waiting, so a new tenant's row starts within about half a
second. The queue is topped up once half of the allowance has gone, so claims come in
batches.

A new gauge starts at `start` jobs (the bridge's claim batch), not at `max_queued`, and
grows by doubling each time the workers empty the queue: a fresh bridge facing a backlog
of slow tasks must not hand out a thousand jobs before it has measured anything, while
idle workers reach `max_queued` within a few claims.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEPTH_REFRESH = 1.0  # seconds a measured depth is trusted (plus what was sent since)
SMOOTHING = 0.5  # weight of the newest rate reading
MIN_ALLOWANCE = 1.0


class QueueGauge:
    """One queue's upper bound on waiting jobs, and how many it may hold."""

    def __init__(self, measure: Callable[[], int], *, max_queued: int,
                 target_seconds: float, start: int | None = None) -> None:
        self._measure = measure
        self.max_queued = max_queued
        self.target_seconds = target_seconds
        # A fixed cap (target 0) is the cap from the start; else grow from `start`.
        opening = max_queued if start is None or target_seconds <= 0 else start
        self.allowance = float(max(MIN_ALLOWANCE, min(max_queued, opening)))
        self.bound = 0  # jobs waiting, at most (last reading plus what was sent since)
        self._read_at: float | None = None
        # The window a rate is measured over: depth at its start, jobs sent since.
        self._window: tuple[float, int] | None = None
        self._window_sent = 0

    def room(self) -> int:
        """Jobs that may be sent now. Reads the queue's depth only when the bound could
        be near the allowance, or is older than DEPTH_REFRESH: workers only ever shrink
        a queue, so trusting the bound never sends too much, at worst too little."""
        now = time.monotonic()
        if (self._read_at is None or now - self._read_at > DEPTH_REFRESH
                or 2 * self.bound >= self.allowance):
            self._read(now)
        # Top up in batches: while more than half the allowance still waits (a bound
        # just read, by the rule above), the workers are busy for a while yet, and one
        # claim of many rows costs the database about what a claim of one row does.
        if 2 * self.bound > self.allowance:
            return 0
        return int(self.allowance) - self.bound

    def sent(self, count: int) -> None:
        self.bound += count
        self._window_sent += count

    def _read(self, now: float) -> None:
        depth = self._measure()
        self.bound, self._read_at = depth, now
        if self._window is not None and self.target_seconds > 0:
            began, depth_then = self._window
            if depth == 0:
                # Ran dry: the workers may have waited for work. Allow more.
                self.allowance = min(float(self.max_queued), 2 * self.allowance)
            elif now - began >= DEPTH_REFRESH / 2:
                taken = depth_then + self._window_sent - depth  # what the workers took
                wanted = max(taken, 0) / (now - began) * self.target_seconds
                smoothed = SMOOTHING * wanted + (1 - SMOOTHING) * self.allowance
                self.allowance = min(float(self.max_queued), max(MIN_ALLOWANCE, smoothed))
            else:
                return  # keep measuring over the same window
        self._window, self._window_sent = (now, depth), 0
