"""Percentiles, tables, and a sampler for the RSS and CPU time of processes."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of seconds, in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50": percentile(ms, 50), "p95": percentile(ms, 95),
            "p99": percentile(ms, 99), "max": max(ms) if ms else math.nan,
            "mean": sum(ms) / len(ms) if ms else math.nan}


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table with a heading line."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(item.ljust(w) for item, w in zip(items, widths, strict=True)) \
            + " |"

    out = [f"### {title}", "", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out) + "\n"


@dataclass
class ProcessUsage:
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    processes: int = 0
    busiest_cpu_pct: float = 0.0  # the busiest single process: CPU time / wall time


@dataclass
class ResourceSampler:
    """Samples the summed RSS of named process trees every `interval` seconds, and
    their CPU time (user+system) from start() to stop()."""

    trees: dict[str, Callable[[], list[psutil.Process]]]
    interval: float = 0.2
    usage: dict[str, ProcessUsage] = field(default_factory=dict)
    _cpu_start: dict[int, float] = field(default_factory=dict)
    _cpu_last: dict[int, float] = field(default_factory=dict)
    _owner: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _began: float = 0.0

    def start(self) -> None:
        for name in self.trees:
            self.usage[name] = ProcessUsage()
        self._began = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, ProcessUsage]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        wall = max(time.monotonic() - self._began, 1e-9)
        for name, usage in self.usage.items():
            spent = [self._cpu_last[pid] - self._cpu_start.get(pid, 0.0)
                     for pid, owner in self._owner.items() if owner == name]
            usage.cpu_seconds = sum(spent)
            usage.busiest_cpu_pct = 100 * max(spent, default=0.0) / wall
        return self.usage

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for name, tree in self.trees.items():
            rss = 0
            count = 0
            for proc in tree():
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
                    cpu = proc.cpu_times()
                    total = cpu.user + cpu.system
                    if proc.pid not in self._cpu_start:
                        # A process born during the run: count its CPU from zero.
                        self._cpu_start[proc.pid] = total if not self._thread else 0.0
                    self._cpu_last[proc.pid] = total
                    self._owner[proc.pid] = name
                    count += 1
            usage = self.usage[name]
            usage.peak_rss_mb = max(usage.peak_rss_mb, rss / 2**20)
            usage.processes = max(usage.processes, count)


def postgres_backends(postmaster_pid: int | None) -> Callable[[], list[psutil.Process]]:
    """Every child of the postmaster (backends and background processes)."""

    def tree() -> list[psutil.Process]:
        if postmaster_pid is None:
            return []
        try:
            root = psutil.Process(postmaster_pid)
            return [root, *root.children()]
        except psutil.Error:
            return []

    return tree


def own_process() -> list[psutil.Process]:
    return [psutil.Process()]


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05,
               what: str = "condition") -> float:
    """Poll `check` until true; returns the time.time() it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
