"""Backpressure by time (bridge/backpressure.py): a queue holds about BRIDGE_QUEUE_SECONDS of
work for the workers it has, never more than BRIDGE_MAX_QUEUED. Driven by a scripted queue
and a scripted clock, so the rule itself is checked without timing anything."""

from __future__ import annotations

import time

import pytest

from bridge.backpressure import QueueGauge


class ScriptedQueue:
    """A broker queue whose workers take `rate` jobs per second of the scripted clock."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.depth = 0.0
        self.now = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.depth = max(0.0, self.depth - self.rate * seconds)

    def read(self) -> int:
        return int(self.depth)


@pytest.fixture
def queue(monkeypatch: pytest.MonkeyPatch) -> ScriptedQueue:
    q = ScriptedQueue(rate=20)
    monkeypatch.setattr(time, "monotonic", lambda: q.now)
    return q


def fill(gauge: QueueGauge, queue: ScriptedQueue, seconds: float, step: float = 0.05) -> None:
    """The bridge's loop: send whatever room there is, every `step` seconds."""
    for _ in range(int(seconds / step)):
        room = gauge.room()
        if room > 0:
            gauge.sent(room)
            queue.depth += room
        queue.advance(step)


def test_slow_workers_keep_about_target_seconds_queued(queue: ScriptedQueue) -> None:
    """100 slots of 5 s tasks take 20 jobs/s: about 10 stay queued, not 50."""
    gauge = QueueGauge(queue.read, max_queued=50, target_seconds=0.5)
    fill(gauge, queue, seconds=30)
    assert 5 <= gauge.allowance <= 15
    assert queue.depth <= 15


def test_fast_workers_keep_the_cap(queue: ScriptedQueue) -> None:
    queue.rate = 2000
    gauge = QueueGauge(queue.read, max_queued=50, target_seconds=0.5)
    fill(gauge, queue, seconds=10)
    assert gauge.allowance == 50


def test_allowance_grows_back_when_the_queue_runs_dry(queue: ScriptedQueue) -> None:
    gauge = QueueGauge(queue.read, max_queued=50, target_seconds=0.5)
    fill(gauge, queue, seconds=30)
    slow = gauge.allowance
    queue.rate = 2000  # the workers got faster (more of them)
    fill(gauge, queue, seconds=10)
    assert gauge.allowance > slow and gauge.allowance == 50


def test_zero_target_is_a_fixed_cap(queue: ScriptedQueue) -> None:
    gauge = QueueGauge(queue.read, max_queued=7, target_seconds=0)
    fill(gauge, queue, seconds=30)
    assert gauge.allowance == 7


def test_never_below_one(queue: ScriptedQueue) -> None:
    queue.rate = 0.01  # a 10-minute agent on one slot
    gauge = QueueGauge(queue.read, max_queued=50, target_seconds=0.5)
    fill(gauge, queue, seconds=60)
    assert gauge.allowance >= 1 and gauge.room() >= -50


def test_a_new_gauge_starts_at_one_claim_and_doubles_while_the_workers_keep_up(
        queue: ScriptedQueue) -> None:
    """A fresh bridge hands out one claim's worth first; idle workers that empty the queue
    open it up to the ceiling within a few rounds, not one job at a time."""
    queue.rate = 100_000
    gauge = QueueGauge(queue.read, max_queued=1000, target_seconds=0.5, start=50)
    assert gauge.room() == 50
    fill(gauge, queue, seconds=0.5)
    assert gauge.allowance == 1000


def test_a_new_gauge_with_slow_workers_never_hands_out_the_ceiling(queue: ScriptedQueue) -> None:
    """100 slots of 5 s tasks behind a backlog: the ceiling (1,000 jobs, 50 s of their work)
    is never queued, only about BRIDGE_QUEUE_SECONDS of it once measured."""
    gauge = QueueGauge(queue.read, max_queued=1000, target_seconds=0.5, start=50)
    most = 0.0
    for _ in range(600):  # 30 s of the bridge's loop
        room = gauge.room()
        if room > 0:
            gauge.sent(room)
            queue.depth += room
        most = max(most, queue.depth)
        queue.advance(0.05)
    assert most <= 100
    assert 5 <= gauge.allowance <= 15


def test_a_fixed_cap_is_the_cap_from_the_start(queue: ScriptedQueue) -> None:
    gauge = QueueGauge(queue.read, max_queued=7, target_seconds=0, start=50)
    assert gauge.room() == 7
