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
