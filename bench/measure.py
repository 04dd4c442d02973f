"""Percentiles, tables, a sampler for the RSS and CPU time of processes, and the database
counters (statements, commits, WAL) of a run."""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import psycopg


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


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float:
    """The median of `key` over repeated runs of one case."""
    return float(statistics.median(float(r[key]) for r in runs))


def cpu_ms_per_task(result: dict[str, Any], process: str | None) -> float | None:
    """CPU ms per task of one kind of process in a run's `resources` (None: all of them);
    None when the run measured none."""
    res = result.get("resources") or {}
    if process is None:
        return 1000 * sum(u["cpu_seconds"] for u in res.values()) / result["n"] if res else None
    return 1000 * res[process]["cpu_seconds"] / result["n"] if process in res else None


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p95/p99/max of seconds, in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p95": percentile(ms, 95),
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


# Database cost per task --------------------------------------------------------------

# The bench's own statements on a benchmark database (polls, waits) name a column
# `bench_own` (pg_stat_statements keeps that, not a leading comment), so they are left out
# of a system's counts.
OWN = "bench_own"

# A backend flushes its pg_stat_database counters at most once a second and, once idle,
# after PGSTAT_IDLE_INTERVAL (10 s): wait this long before a snapshot that must see every
# commit made so far by connections that stay open.
STATS_SETTLE_SECONDS = 11.0


@dataclass(frozen=True)
class DbSnapshot:
    """Counters of one database (pg_stat_statements, pg_stat_database) and the server's
    WAL position, at one moment."""

    top_level: int  # pg_stat_statements calls of top-level statements (not the bench's own)
    nested: int  # ... of statements run inside functions and triggers (track = 'all')
    own: int  # the bench's own statements (each in a transaction of its own)
    commits: int  # pg_stat_database.xact_commit
    wal_lsn: str
    calls: dict[str, int] = field(default_factory=dict)  # "top|nested: <query>" -> calls


def db_snapshot(admin_url: str, dbname: str) -> DbSnapshot:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "select coalesce(sum(s.calls) filter (where s.toplevel and s.query not like %s), 0),"
            " coalesce(sum(s.calls) filter (where not s.toplevel and s.query not like %s), 0),"
            " coalesce(sum(s.calls) filter (where s.toplevel and s.query like %s), 0),"
            " (select xact_commit from pg_stat_database where datname = %s),"
            " pg_current_wal_lsn()::text"
            " from pg_stat_statements s join pg_database d on d.oid = s.dbid"
            " where d.datname = %s",
            [f"%{OWN}%"] * 3 + [dbname, dbname]).fetchone()
        calls: dict[str, int] = {}
        for top, query, n in conn.execute(
                "select s.toplevel, regexp_replace(s.query, '\\s+', ' ', 'g'), s.calls"
                " from pg_stat_statements s join pg_database d on d.oid = s.dbid"
                " where d.datname = %s and s.query not like %s", [dbname, f"%{OWN}%"]):
            key = f"{'top' if top else 'nested'}: {str(query)[:100]}"
            calls[key] = calls.get(key, 0) + int(n)
    assert row is not None
    return DbSnapshot(int(row[0]), int(row[1]), int(row[2]), int(row[3] or 0), str(row[4]),
                      calls)


def stats_row(admin_url: str, query: str, params: Sequence[Any]) -> tuple[Any, ...]:
    """The one row of `query` over the statistics views (pg_stat_statements and the like),
    read on a connection of its own once its own pending counts are flushed."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("select pg_stat_force_next_flush()")
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return tuple(row)


def wait_backends_gone(admin_url: str, dbname: str, timeout: float = 30.0) -> None:
    """Wait until no backend is connected to `dbname`: an exiting backend flushes its
    statistics, so a snapshot taken after this sees all of them."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        def gone() -> bool:
            row = conn.execute("select count(*) from pg_stat_activity where datname = %s",
                               [dbname]).fetchone()
            return row is not None and int(row[0]) == 0

        wait_until(gone, timeout, 0.05, f"the backends of {dbname} to exit")
        conn.execute("select pg_stat_force_next_flush()")


def db_cost(admin_url: str, before: DbSnapshot, after: DbSnapshot, *, tasks: int,
            insert_commits: int) -> dict[str, Any]:
    """Per task, between two snapshots: statements (top-level, nested), commits beyond the
    tasks' own inserts (`insert_commits`, counted apart), WAL bytes."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("select pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)",
                           [after.wal_lsn, before.wal_lsn]).fetchone()
        conn.execute("create extension if not exists pg_walinspect")
        wal = conn.execute(
            "select coalesce(sum(count) filter (where \"resource_manager/record_type\" = "
            "'Transaction/COMMIT'), 0), coalesce(sum(count), 0), coalesce(sum(fpi_size), 0) "
            "from pg_get_wal_stats(%s::pg_lsn, %s::pg_lsn, true)",
            [before.wal_lsn, after.wal_lsn]).fetchone()
    assert row is not None and wal is not None
    own = after.own - before.own
    commits = after.commits - before.commits - own
    return {"tasks": tasks,
            "statements_top": (after.top_level - before.top_level) / tasks,
            "statements_nested": (after.nested - before.nested) / tasks,
            # every transaction of the database, read-only ones included (a LISTENing
            # connection reads each NOTIFY in a transaction of its own)
            "commits_total": commits,
            "insert_commits": insert_commits,
            "commits_beyond_insert": (commits - insert_commits) / tasks,
            # the commits that write: WAL commit records (the whole server; nothing else
            # writes during a run), the insert's own among them
            "wal_commits_beyond_insert": (int(wal[0]) - insert_commits) / tasks,
            "wal_records": int(wal[1]) / tasks,
            "wal_fpi_bytes": int(wal[2]) / tasks,
            "wal_bytes": float(row[0]) / tasks,
            "bench_own_statements": own,
            # the most frequent statements per task (top-level and nested), text cut short
            "statements": dict(sorted(
                ((k, (v - before.calls.get(k, 0)) / tasks) for k, v in after.calls.items()
                 if v > before.calls.get(k, 0)), key=lambda kv: -kv[1])[:15])}
