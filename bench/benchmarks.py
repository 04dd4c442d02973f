"""The benchmarks: each starts its own processes on a fresh database of the shared
throwaway servers, measures, stops everything it started, and returns a result dict.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg.types.json import Jsonb

from bench.handlers import read_runs
from bench.measure import (
    STATS_SETTLE_SECONDS,
    DbSnapshot,
    ResourceSampler,
    db_cost,
    db_snapshot,
    own_process,
    postgres_backends,
    stats_row,
    summary_ms,
    wait_backends_gone,
    wait_until,
)
from bench.stack import BIN, Proc, ProcGroup, Servers, base_env, done_trigger_sql, transport_env
from bridge.publisher import Publisher
from bridge.store import Claim
from tasks.app import RUN_AGENT


@dataclass(frozen=True)
class Plan:
    """Sizes for one run: full by default, `quick()` for the smoke version."""

    quick: bool = False
    latency_n: int = 200
    supabase_n: int = 20
    throughput_n: int = 5000
    io_n: int = 1000
    io_concurrency: tuple[int, ...] = (100, 200)
    # agent-bridge I/O-bound runs: (pool, concurrency, handler kind: "sync" / "async").
    # (pool, concurrency per worker process, handler kind, worker processes on the node)
    io_runs: tuple[tuple[str, int, str, int], ...] = (
        ("threads", 200, "sync", 1), ("threads", 1000, "sync", 1),
        ("threads", 1000, "async", 1), ("threads", 500, "sync", 2))
    baseline_latency_n: int = 10
    baseline_throughput_n: int = 10
    procrastinate_latency_n: int = 200
    idle_seconds: float = 10.0
    pools: tuple[tuple[str, int], ...] = (("prefork", 2), ("prefork", 4), ("threads", 16))
    procrastinate_workers: tuple[tuple[int, int], ...] = ((1, 16), (2, 16))
    # Issue 23's cost per task (`--only cost`, `--only burst`).
    cost_n: int = 4000  # no-op tasks per system
    burst_n: int = 1000  # tasks that each wait 1 s, all inserted at once
    # (pool, concurrency per process, worker processes): the README's one process per core
    burst_workers: tuple[str, int, int] = ("threads", 500, 2)
    burst_procrastinate: tuple[int, int] = (1, 200)  # (workers, async concurrency)
    burst_repeats: int = 3  # ours then plain Celery's, this many times (the wall time moves)
    stream_chunks: int = 5  # pieces each streaming task writes, STREAM_GAP_S apart

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(quick=True, latency_n=50, supabase_n=4, throughput_n=500, io_n=200,
                   io_concurrency=(100,), io_runs=(("threads", 1000, "async", 1),),
                   baseline_latency_n=3, baseline_throughput_n=3,
                   procrastinate_latency_n=50, idle_seconds=5.0,
                   pools=(("prefork", 2), ("threads", 16)),
                   procrastinate_workers=((1, 16),), cost_n=500, burst_n=200,
                   burst_workers=("threads", 100, 2), burst_procrastinate=(1, 100),
                   burst_repeats=1)


@dataclass
class Context:
    servers: Servers
    plan: Plan
    results: dict[str, Any] = field(default_factory=dict)


# Helpers ------------------------------------------------------------------------

def payload(run: str, **context: Any) -> dict[str, Any]:
    return {"prompt": "benchmark", "context": {"run": run, **context}}


class Inserter:
    """Inserts rows on one autocommit connection; returns (id, time.time() before)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def one(self, body: dict[str, Any]) -> tuple[str, float]:
        began = time.time()
        row = self.conn.execute(
            "insert into public.agent_task_requests (request_payload) values (%s) returning id",
            [Jsonb(body)]).fetchone()
        assert row is not None
        return str(row[0]), began

    def many(self, n: int, body: dict[str, Any]) -> float:
        """One multi-row INSERT of `n` rows; returns the time.time() before it."""
        began = time.time()
        self.conn.execute(
            "insert into public.agent_task_requests (request_payload) "
            "select %s from generate_series(1, %s)", [Jsonb(body), n])
        return began

    def close(self) -> None:
        self.conn.close()


class DoneListener:
    """LISTENs on the benchmark trigger's channel `bench_done`."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("listen bench_done")

    def wait(self, task_id: str, timeout: float) -> float:
        """time.time() when the completion of `task_id` was announced."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"task {task_id} not finished within {timeout:g}s")
            for note in self.conn.notifies(timeout=remaining, stop_after=1):
                if note.payload == task_id:
                    return time.time()

    def close(self) -> None:
        self.conn.close()


def count_status(url: str, run: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select status, count(*) as bench_own from public.agent_task_requests "
            "where request_payload->'context'->>'run' = %s group by status", [run]).fetchall()
    return {str(s): int(c) for s, c in rows}


def last_finish(url: str, run: str) -> float:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select extract(epoch from max(finished_at))::float8 as bench_own "
            "from public.agent_task_requests "
            "where request_payload->'context'->>'run' = %s", [run]).fetchone()
    assert row is not None and row[0] is not None
    return float(row[0])


def wait_run_done(url: str, run: str, n: int, timeout: float) -> dict[str, int]:
    counts: dict[str, int] = {}

    def done() -> bool:
        nonlocal counts
        counts = count_status(url, run)
        return counts.get("completed", 0) + counts.get("failed", 0) >= n

    wait_until(done, timeout, interval=0.1, what=f"{n} rows of run {run!r} to finish")
    return counts


def latency_run(submit: Callable[[], tuple[str, float]], listener: DoneListener, n: int,
                gap: Callable[[], float], timeout: float) -> list[tuple[str, float, float]]:
    """One task at a time: submit, wait for its completion, pause `gap()`, repeat."""
    samples: list[tuple[str, float, float]] = []
    for _ in range(n):
        task_id, began = submit()
        finished = listener.wait(task_id, timeout)
        samples.append((task_id, began, finished))
        time.sleep(gap())
    return samples


def latency_summary(samples: list[tuple[str, float, float]], state_dir: Path) -> dict[str, Any]:
    first_start: dict[str, float] = {}
    for task_id, began, _pid, _attempt in read_runs(state_dir):
        first_start.setdefault(task_id, began)
    started = [first_start[t] - b for t, b, _ in samples if t in first_start]
    completed = [f - b for _, b, f in samples]
    return {"started_ms": summary_ms(started), "completed_ms": summary_ms(completed),
            "missing_start_records": len(samples) - len(started)}


@contextlib.contextmanager
def proc_group(ctx: Context, name: str, env: dict[str, str]) -> Iterator[ProcGroup]:
    group = ProcGroup(ctx.servers.workdir(name), env)
    try:
        yield group
    finally:
        group.stop_all()
        ctx.servers.flush_redis()


def redis_process(servers: Servers) -> Callable[[], list[psutil.Process]]:
    def tree() -> list[psutil.Process]:
        proc = servers.redis.process
        if proc is None:
            return []
        try:
            return [psutil.Process(proc.pid)]
        except psutil.Error:
            return []

    return tree


def state_dir_of(group: ProcGroup) -> Path:
    path = group.workdir / "state"
    path.mkdir(exist_ok=True)
    path.chmod(0o777)
    return path


# Pickup latency ------------------------------------------------------------------

def bridge_latency(ctx: Context, *, transport: str, pool: str, concurrency: int, n: int,
                   stages: bool = False) -> dict[str, Any]:
    """Pickup latency. `stages`: JSON logs, and the median time of each step after
    the insert (claimed, received by the worker, row started, handler, completed)."""
    servers = ctx.servers
    db = servers.new_database("latency")
    name = f"latency-{transport}-{pool}{concurrency}{'-stages' if stages else ''}"
    workdir = servers.workdir(name)
    state = workdir / "state"
    state.mkdir()
    extra: dict[str, str] = {"AGENT_HANDLER": "bench.handlers:noop"}
    if stages:  # Celery's "received" line is logged at DEBUG only
        extra.update(LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    env, stub = transport_env(db, transport, redis_url=servers.redis_url, state_dir=state,
                              **extra)
    group = ProcGroup(workdir, env)
    inserter = Inserter(db)
    listener = DoneListener(db)
    poll_mode = transport == "supabase"
    try:
        worker = group.celery_worker("tasks", pool=pool, concurrency=concurrency)
        bridge = group.bridge()
        timeout = 30.0
        # Warm up: the first tasks open each pool process's database connections.
        warmup = 0 if poll_mode else 10
        latency_run(lambda: inserter.one(payload("warmup")), listener, warmup,
                    lambda: 0.01, timeout)
        # Poll mode: arrivals at a random phase of the 2 s poll cycle.
        gap = (lambda: random.uniform(0.0, 2.0)) if poll_mode else \
            (lambda: random.uniform(0.01, 0.05))
        samples = latency_run(lambda: inserter.one(payload("latency")), listener, n, gap,
                              timeout)
        result = latency_summary(samples, state)
        if stages:
            time.sleep(0.3)  # the last log lines
            result["stages_ms"] = stage_medians(samples, state, bridge.output + worker.output)
    finally:
        listener.close()
        inserter.close()
        group.stop_all()
        servers.flush_redis()
        if stub is not None:
            stub.stop()
    result.update(system="agent-bridge", mode=transport, pool=f"{pool} -c {concurrency}")
    return result


def log_times(logs: str) -> dict[str, dict[str, float]]:
    """Per task id, the first JSON log timestamp of each step: the bridge's `claimed`, the
    worker's `start` and `completed`, Celery's `received` (logged at DEBUG only)."""
    seen: dict[str, dict[str, float]] = {}
    prefix = f"Task {RUN_AGENT}["
    for line in logs.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "ts" not in record:
            continue
        at = datetime.fromisoformat(record["ts"]).timestamp()
        message = str(record.get("message", ""))
        task_id, action = record.get("task_id"), record.get("action")
        if task_id and action in ("claimed", "start", "completed"):
            seen.setdefault(str(task_id), {}).setdefault(str(action), at)
        elif message.startswith(prefix) and message.endswith("received"):
            celery_id = message[len(prefix):].split("]")[0]
            seen.setdefault(celery_id.split(":")[0], {}).setdefault("received", at)
    return seen


def stage_medians(samples: list[tuple[str, float, float]], state_dir: Path, logs: str
                  ) -> dict[str, float]:
    """Median ms from the insert to each logged step of a task (JSON log timestamps)."""
    seen = log_times(logs)
    for task_id, began, _pid, _attempt in read_runs(state_dir):
        seen.setdefault(task_id, {}).setdefault("handler", began)
    out: dict[str, float] = {}
    for step in ("claimed", "received", "start", "handler", "completed"):
        values = [seen[t][step] - b for t, b, _ in samples if step in seen.get(t, {})]
        out[step] = summary_ms(values)["p50"]
    out["notified"] = summary_ms([f - b for _, b, f in samples])["p50"]
    return out


def workers_label(pool: str, concurrency: int, processes: int) -> str:
    return f"{pool} -c {concurrency}" if processes == 1 else \
        f"{processes} workers x {pool} -c {concurrency}"


def one_second_rounds(n: int, slots: int) -> float:
    """The ideal wall time of `n` tasks that each wait 1 s on `slots` at once."""
    return float(-(-n // slots))


# Throughput ----------------------------------------------------------------------

def dbname_of(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])


def count_everything(ctx: Context, db: str, *, track_all: bool, done_trigger: str = "") -> None:
    """Before any process connects: with `track_all`, pg_stat_statements also counts the
    statements run inside functions and triggers (`track = 'all'`, this database only);
    `done_trigger` names the table whose bench-only completion trigger is dropped (its
    NOTIFY is the bench's, not the system's, and each wakes every LISTENing connection of
    the database into a transaction; runs that poll do not need it)."""
    with psycopg.connect(ctx.servers.admin_url, autocommit=True) as conn:
        if track_all:
            conn.execute(f"alter database \"{dbname_of(db)}\" "
                         "set pg_stat_statements.track = 'all'".encode())
    if done_trigger:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(f"drop trigger if exists bench_notify_done on public.{done_trigger}"
                         .encode())


def snapshot_after_settling(ctx: Context, db: str) -> DbSnapshot:
    """The counters before the measured part: after a CHECKPOINT (so every run pays the
    same full-page images: each page's first change after it) and once every backend
    has flushed its commit counts (STATS_SETTLE_SECONDS)."""
    with psycopg.connect(ctx.servers.admin_url, autocommit=True) as conn:
        conn.execute("checkpoint")
    time.sleep(STATS_SETTLE_SECONDS)
    return db_snapshot(ctx.servers.admin_url, dbname_of(db))


def cost_since(ctx: Context, db: str, before: DbSnapshot, *, tasks: int,
               insert_commits: int) -> dict[str, Any]:
    """Per task since `before`; call once every connection to `db` is closed."""
    admin = ctx.servers.admin_url
    wait_backends_gone(admin, dbname_of(db))
    return db_cost(admin, before, db_snapshot(admin, dbname_of(db)), tasks=tasks,
                   insert_commits=insert_commits)


def bridge_throughput(ctx: Context, *, pool: str, concurrency: int, n: int,
                      handler: str = "bench.handlers:noop", label: str = "no-op",
                      processes: int = 1, counters: bool = True, track_all: bool = False,
                      context: dict[str, Any] | None = None,
                      **extra_env: str) -> dict[str, Any]:
    """`n` rows inserted at once (one INSERT) until all are finished. `counters`: the
    database's statements, commits and WAL per task ("db"), from a snapshot after the
    warm-up (STATS_SETTLE_SECONDS more) to one after every process has exited; with
    `track_all` nested statements too, and no bench trigger. `context`: merged into each
    row's request_payload.context (the handler's instructions)."""
    servers = ctx.servers
    db = servers.new_database("throughput")
    if counters:
        count_everything(ctx, db, track_all=track_all, done_trigger="agent_task_requests")
    env = base_env(db_url=db, redis_url=servers.redis_url, AGENT_HANDLER=handler)
    env.update(extra_env)
    inserter = Inserter(db)
    before: DbSnapshot | None = None
    with proc_group(ctx, f"throughput-{label.replace(' ', '')}-{pool}{concurrency}x{processes}",
                    env) as group:
        workers = [group.celery_worker("tasks", pool=pool, concurrency=concurrency)
                   for _ in range(processes)]
        bridge = group.bridge()
        warm = min(50, max(10, concurrency * processes))
        inserter.many(warm, payload("warmup", **(context or {})))
        wait_run_done(db, "warmup", warm, 60)
        if counters:
            before = snapshot_after_settling(ctx, db)
        sampler = ResourceSampler({"bridge": bridge.processes,
                                   "worker": lambda: [p for w in workers for p in w.processes()],
                                   "postgres": postgres_backends(servers.postgres_pid),
                                   "redis": redis_process(servers)})
        sampler.start()
        body = payload("main", sleep=1) if label != "no-op" else payload("main")
        body["context"].update(context or {})
        began = inserter.many(n, body)
        counts = wait_run_done(db, "main", n, timeout=max(120.0, n * 0.1))
        usage = sampler.stop()
        ended = last_finish(db, "main")
    inserter.close()
    elapsed = ended - began
    result: dict[str, Any] = {
        "system": "agent-bridge", "workload": label,
        "pool": workers_label(pool, concurrency, processes),
        "n": n, "seconds": elapsed, "tasks_per_s": n / elapsed,
        "completed": counts.get("completed", 0), "failed": counts.get("failed", 0),
        "env": extra_env, "resources": {k: vars(v) for k, v in usage.items()}}
    if before is not None:
        result["db"] = cost_since(ctx, db, before, tasks=n, insert_commits=1)
        result["db"]["track"] = "all" if track_all else "top"
    return result


# I/O-bound agents -----------------------------------------------------------------

IO_HANDLERS = {"sync": "bench.handlers:sleep_1s", "async": "bench.handlers:async_sleep_1s"}


def bridge_io(ctx: Context, *, pool: str, concurrency: int, kind: str, n: int,
              processes: int = 1) -> dict[str, Any]:
    """N tasks that each wait 1 s (`time.sleep`, or `await asyncio.sleep` on the
    worker's shared loop for kind "async"), on `processes` workers of one node, the
    bridge at its defaults; the workers' peak RSS (summed) is in `resources`."""
    r = bridge_throughput(ctx, pool=pool, concurrency=concurrency, n=n,
                          handler=IO_HANDLERS[kind], label=f"sleep 1 s {kind}",
                          processes=processes, counters=False)
    r["ideal_seconds"] = one_second_rounds(n, concurrency * processes)
    r["handler"] = kind
    return r


def plain_celery_throughput(ctx: Context, *, pool: str, concurrency: int, n: int,
                            sleep: bool = False, processes: int = 1) -> dict[str, Any]:
    """Plain Celery, no database: `n` jobs published at once (in one pipeline, as the
    bridge publishes a claimed batch) until every one is acknowledged. `sleep`: each
    job waits 1 s (the I/O-bound ceiling), on `processes` workers."""
    from bench.plain_celery import QUEUE, SLEEP_TASK, TASK, make_app

    servers = ctx.servers
    env = base_env(redis_url=servers.redis_url)
    app = make_app(servers.redis_url)
    warm_publisher = Publisher(app, QUEUE, TASK)
    publisher = Publisher(app, QUEUE, SLEEP_TASK if sleep else TASK)
    client = servers.redis_client()

    def drained() -> bool:
        # acks_late: a message stays in kombu's `unacked` hash until its task ends.
        return int(client.llen(QUEUE)) == 0 and int(client.hlen("unacked")) == 0

    label = "sleep1s" if sleep else "noop"
    with proc_group(ctx, f"plain-celery-{label}-{pool}{concurrency}x{processes}", env) as group:
        workers = [group.celery_worker("bench.plain_celery", pool=pool, concurrency=concurrency)
                   for _ in range(processes)]
        warm_publisher.publish([Claim(f"warmup-{i}", 1)
                                for i in range(min(50, max(10, concurrency * processes)))])
        time.sleep(0.2)
        wait_until(drained, 60, 0.01, "warm-up messages")
        sampler = ResourceSampler({"publisher (bench process)": own_process,
                                   "worker": lambda: [p for w in workers for p in w.processes()],
                                   "redis": redis_process(servers)})
        sampler.start()
        began = time.time()
        publisher.publish([Claim(f"task-{i}", 1) for i in range(n)])
        ended = wait_until(drained, max(120.0, n * 0.1), 0.005, "plain Celery queue to drain")
        usage = sampler.stop()
    app.close()
    client.close()
    elapsed = ended - began
    result = {"system": "plain Celery (no database)", "workload": "sleep 1 s" if sleep else "no-op",
              "pool": workers_label(pool, concurrency, processes), "n": n, "seconds": elapsed,
              "tasks_per_s": n / elapsed, "completed": n, "failed": 0,  # drained: all acked
              "resources": {k: vars(v) for k, v in usage.items()}}
    if sleep:
        result.update(ideal_seconds=one_second_rounds(n, concurrency * processes),
                      handler="sync")
    return result


# The seed design ------------------------------------------------------------------

def seed_baseline(ctx: Context) -> dict[str, Any]:
    servers = ctx.servers
    plan = ctx.plan
    db = servers.new_database("seed")
    with proc_group(ctx, "seed-baseline", base_env(redis_url=servers.redis_url)) as group:
        state = state_dir_of(group)
        group.env.update(DATABASE_URL=db, BENCH_STATE_DIR=str(state),
                         AGENT_HANDLER="bench.handlers:noop")
        loop = group.start("seed", [str(BIN / "python"), "-m", "bench.seed_baseline"])
        loop.wait_for_output("ONLINE", 30)
        inserter = Inserter(db)
        listener = DoneListener(db)
        try:
            samples = latency_run(lambda: inserter.one(payload("latency")), listener,
                                  plan.baseline_latency_n, lambda: random.uniform(0.0, 2.0), 30)
            latency = latency_summary(samples, state)
            n = plan.baseline_throughput_n
            began = inserter.many(n, payload("main"))
            counts = wait_run_done(db, "main", n, timeout=n * 3 + 30)
        finally:
            listener.close()
            inserter.close()
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "select extract(epoch from max(updated_at))::float8 from public.agent_task_requests "
            "where request_payload->'context'->>'run' = 'main'").fetchone()
    assert row is not None and row[0] is not None
    elapsed = float(row[0]) - began
    latency.update(system="seed design (poll 2 s, one at a time)", mode="postgres (direct)",
                   pool="1 loop, inline")
    return {"latency": latency,
            "throughput": {"system": "seed design (poll 2 s, one at a time)",
                           "workload": "no-op", "pool": "1 loop, inline", "n": n,
                           "seconds": elapsed, "tasks_per_s": n / elapsed,
                           "completed": counts.get("completed", 0),
                           "failed": counts.get("failed", 0)}}


# procrastinate ----------------------------------------------------------------------

class Procrastinate:
    """A procrastinate schema in its own database on the same server, and its workers."""

    def __init__(self, ctx: Context, name: str, *, track_all: bool = False,
                 done_trigger: bool = True) -> None:
        from bench.procrastinate_app import app, make_connector

        self.ctx = ctx
        self.db = ctx.servers.new_database("procrastinate", migrated=False)
        count_everything(ctx, self.db, track_all=track_all)
        self.app = app
        self._replace = app.replace_connector(make_connector(self.db, 4))
        self._replace.__enter__()
        app.open()
        app.schema_manager.apply_schema()
        if done_trigger:
            with psycopg.connect(self.db, autocommit=True) as conn:
                conn.execute(done_trigger_sql("procrastinate_jobs", ("succeeded", "failed"))
                             .encode())
        self.group = ProcGroup(ctx.servers.workdir(name),
                               base_env(redis_url=ctx.servers.redis_url))
        self.state = state_dir_of(self.group)
        self.group.env.update(BENCH_PROCRASTINATE_DSN=self.db)

    def workers(self, count: int, concurrency: int, *, record: bool = False) -> list[Proc]:
        """Start `count` workers. Each gets a pool of concurrency + 1 connections (one per
        running job plus its LISTEN), as many as it can use; its default is 10. Handlers
        write the runs file only with `record` (latency runs), as ours do."""
        state = {"BENCH_STATE_DIR": str(self.state)} if record else {}
        procs = [self.group.start("pworker", [
            str(BIN / "procrastinate"), "--app=bench.procrastinate_app.app", "worker",
            f"--concurrency={concurrency}", "--queues=bench", f"--name=bench-{i}"],
            BENCH_PROCRASTINATE_POOL=str(procrastinate_pool(concurrency)), **state)
            for i in range(count)]
        with psycopg.connect(self.db, autocommit=True) as conn:
            wait_until(lambda: int(conn.execute(
                "select count(*) from procrastinate_workers").fetchone()[0]) >= count,  # type: ignore[index]
                60, 0.1, "procrastinate workers to register")
        time.sleep(0.5)
        return procs

    def defer_one(self, task: str) -> tuple[str, float]:
        from bench.procrastinate_app import noop, sleep_1s

        began = time.time()
        job_id = (noop if task == "noop" else sleep_1s).defer()
        return str(job_id), began

    def defer_many(self, task: str, n: int) -> float:
        from bench.procrastinate_app import noop, sleep_1s

        began = time.time()
        (noop if task == "noop" else sleep_1s).batch_defer(*[{} for _ in range(n)])
        return began

    def wait_all(self, n: int, timeout: float) -> tuple[float, dict[str, int]]:
        """Wait for n finished jobs; (time of the last finish, counts by status)."""
        with psycopg.connect(self.db, autocommit=True) as conn:
            def done() -> bool:
                row = conn.execute("select count(*) as bench_own from procrastinate_jobs "
                                   "where status in ('succeeded', 'failed')").fetchone()
                return row is not None and int(row[0]) >= n

            wait_until(done, timeout, 0.1, f"{n} procrastinate jobs")
            counts = {str(s): int(c) for s, c in conn.execute(
                "select status::text, count(*) as bench_own from procrastinate_jobs group by 1"
            ).fetchall()}
            row = conn.execute(
                "select extract(epoch from max(at))::float8 as bench_own from procrastinate_events "
                "where type in ('succeeded', 'failed')").fetchone()
        assert row is not None and row[0] is not None
        return float(row[0]), counts

    def reset(self) -> None:
        with psycopg.connect(self.db, autocommit=True) as conn:
            conn.execute("truncate procrastinate_events, procrastinate_jobs cascade")

    def stop_workers(self) -> None:
        self.group.stop_all()
        self.group.procs.clear()

    def close(self) -> None:
        self.group.stop_all()
        with contextlib.suppress(Exception):
            self.app.close()
        self._replace.__exit__(None, None, None)


def procrastinate_pool(concurrency: int) -> int:
    """Connections per procrastinate worker: one per concurrent job plus LISTEN, at most
    80 (the server allows 100)."""
    return min(concurrency + 1, 80)


def warm_up(peer: Procrastinate, task: str, n: int) -> None:
    """As ours and plain Celery's runs do: the workers run some jobs (and open their
    connections) before the timed run; then the tables are emptied."""
    peer.defer_many(task, n)
    peer.wait_all(n, 60)
    peer.reset()


def procrastinate_run(peer: Procrastinate, count: int, concurrency: int, n: int, *,
                      task: str = "noop", counters: bool = True,
                      track: str = "top") -> dict[str, Any]:
    """`n` jobs deferred at once (one batch_defer) on `count` workers until all finish;
    with `counters`, the database's cost per task as `bridge_throughput` measures it (the
    bench's own connection pool is closed for the final snapshot, then reopened)."""
    peer.reset()
    if counters:  # its NOTIFY would wake LISTENing connections: a transaction each
        count_everything(peer.ctx, peer.db, track_all=False, done_trigger="procrastinate_jobs")
    procs = peer.workers(count, concurrency)
    warm_up(peer, "noop", 50)
    before = snapshot_after_settling(peer.ctx, peer.db) if counters else None
    sampler = ResourceSampler(
        {"worker": lambda: [p for w in procs for p in w.processes()],
         "postgres": postgres_backends(peer.ctx.servers.postgres_pid)})
    sampler.start()
    began = peer.defer_many(task, n)
    ended, counts = peer.wait_all(n, max(180.0, n * 0.2))
    usage = sampler.stop()
    peer.stop_workers()
    elapsed = ended - began
    result: dict[str, Any] = {
        "system": "procrastinate", "workload": "no-op" if task == "noop" else "sleep 1 s",
        "pool": f"{count} worker{'s' if count > 1 else ''} x async concurrency {concurrency}",
        "n": n, "seconds": elapsed, "tasks_per_s": n / elapsed,
        "completed": counts.get("succeeded", 0), "failed": counts.get("failed", 0),
        "resources": {k: vars(v) for k, v in usage.items()}}
    if before is not None:
        peer.app.close()
        result["db"] = cost_since(peer.ctx, peer.db, before, tasks=n, insert_commits=1)
        result["db"]["track"] = track
        peer.app.open()
    return result


def procrastinate_bench(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    peer = Procrastinate(ctx, "procrastinate")
    out: dict[str, Any] = {"throughput": [], "io": []}
    try:
        # Latency: one worker, concurrency 1 (its default), LISTEN/NOTIFY.
        peer.workers(1, 1, record=True)
        listener = DoneListener(peer.db)
        try:
            latency_run(lambda: peer.defer_one("noop"), listener, 10, lambda: 0.01, 30)
            samples = latency_run(lambda: peer.defer_one("noop"), listener,
                                  plan.procrastinate_latency_n,
                                  lambda: random.uniform(0.01, 0.05), 30)
        finally:
            listener.close()
        latency = latency_summary(samples, peer.state)
        latency.update(system="procrastinate", mode="postgres (LISTEN/NOTIFY)",
                       pool="1 worker, async, concurrency 1")
        out["latency"] = latency
        peer.stop_workers()
        # No-op throughput.
        for count, concurrency in plan.procrastinate_workers:
            out["throughput"].append(procrastinate_run(peer, count, concurrency,
                                                       plan.throughput_n))
        # I/O-bound: 1 s async sleeps.
        for concurrency in plan.io_concurrency:
            peer.reset()
            peer.workers(1, concurrency)
            warm_up(peer, "noop", 50)
            began = peer.defer_many("sleep", plan.io_n)
            ended, counts = peer.wait_all(plan.io_n, plan.io_n * 2 + 60)
            elapsed = ended - began
            out["io"].append({
                "system": "procrastinate", "workload": "sleep 1 s",
                "pool": f"1 worker x async concurrency {concurrency}", "n": plan.io_n,
                "seconds": elapsed, "tasks_per_s": plan.io_n / elapsed,
                "ideal_seconds": plan.io_n / concurrency,
                "completed": counts.get("succeeded", 0), "failed": counts.get("failed", 0)})
            peer.stop_workers()
    finally:
        peer.close()
    return out


# Idle load ---------------------------------------------------------------------------

def _db_counters(admin_url: str, dbname: str) -> tuple[int, int]:
    """(pg_stat_statements calls, pg_stat_database xact_commit) for one database."""
    row = stats_row(admin_url,
                    "select coalesce((select sum(calls) from pg_stat_statements s "
                    "  join pg_database d on d.oid = s.dbid where d.datname = %s), 0)::bigint, "
                    "(select xact_commit from pg_stat_database where datname = %s)",
                    [dbname, dbname])
    return int(row[0]), int(row[1] or 0)


def idle_load(ctx: Context, system: str, start: Callable[[ProcGroup, str], None],
              db: str) -> dict[str, Any]:
    servers = ctx.servers
    dbname = str(psycopg.conninfo.conninfo_to_dict(db)["dbname"])
    redis_client = servers.redis_client()
    window = ctx.plan.idle_seconds
    with proc_group(ctx, f"idle-{system.split()[0]}", base_env(redis_url=servers.redis_url)
                    ) as group:
        start(group, db)
        time.sleep(3.0)  # settle: startup queries are not idle load
        calls0, xacts0 = _db_counters(servers.admin_url, dbname)
        redis0 = int(redis_client.info("stats")["total_commands_processed"])
        time.sleep(window)
        calls1, xacts1 = _db_counters(servers.admin_url, dbname)
        redis1 = int(redis_client.info("stats")["total_commands_processed"])
    redis_client.close()
    return {"system": system, "seconds": window,
            "statements_per_s": (calls1 - calls0) / window,
            "transactions_per_s": (xacts1 - xacts0) / window,
            "redis_commands_per_s": (redis1 - redis0 - 1) / window}


def idle_benchmarks(ctx: Context) -> list[dict[str, Any]]:
    servers = ctx.servers
    results = []

    def bridge_stack(group: ProcGroup, db: str) -> None:
        group.env.update(DATABASE_URL=db, BRIDGE_TRANSPORT="postgres",
                         AGENT_HANDLER="bench.handlers:noop")
        group.celery_worker("tasks", pool="prefork", concurrency=2)
        group.bridge()

    results.append(idle_load(ctx, "agent-bridge (bridge + prefork -c 2 worker)", bridge_stack,
                             servers.new_database("idle")))

    def seed_stack(group: ProcGroup, db: str) -> None:
        group.env.update(DATABASE_URL=db, AGENT_HANDLER="bench.handlers:noop")
        group.start("seed", [str(BIN / "python"), "-m", "bench.seed_baseline"]) \
            .wait_for_output("ONLINE", 30)

    results.append(idle_load(ctx, "seed design (poll 2 s)", seed_stack,
                             servers.new_database("idle")))

    peer = Procrastinate(ctx, "idle-procrastinate-schema")
    try:
        def procrastinate_stack(group: ProcGroup, db: str) -> None:
            group.env.update(BENCH_PROCRASTINATE_DSN=db)
            group.start("pworker", [
                str(BIN / "procrastinate"), "--app=bench.procrastinate_app.app", "worker",
                "--concurrency=16", "--queues=bench"])

        results.append(idle_load(ctx, "procrastinate (1 worker)", procrastinate_stack,
                                 peer.db))
    finally:
        peer.close()
    return results


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
