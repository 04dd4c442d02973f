"""`python -m bench.cancel`: how fast a cancel stops a running handler, and what it costs.

On a throwaway stack (embedded PostgreSQL with pg_stat_statements, its own Redis, real
bridge and worker processes), for direct mode (LISTEN) and Supabase mode (the
PostgREST stand-in, CANCEL_POLL_INTERVAL polls):

1. **cancel → handler stopped**: `n` tasks run at once on a threads worker; each is
   cancelled (`select cancel_agent_task(id)` as the service) at a random moment, and
   the handler writes the wall-clock time it stopped (same machine clock). Two
   handlers: a sync one streaming a chunk every 50 ms (`report_progress` raises
   `Cancelled`) and an async one waiting on an await (cancelled in place).
2. **load**: 200 tasks running at once (async handlers waiting, no progress writes);
   SQL statements per second over a window, in total and those of cancellation
   (`agent_tasks_cancel_requested`), with nothing being cancelled.

    .venv/bin/python -m bench.cancel            # ~2 min on 2 cores
    .venv/bin/python -m bench.cancel --quick
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.cli import bench_parser, write_json
from bench.handlers import note_time
from bench.measure import stats_row, summary_ms, table, wait_until
from bench.stack import ProcGroup, Servers, servers, transport_env

STOPPED = "stopped.log"
STARTED = "started.log"


# Handlers (AGENT_HANDLER=bench.cancel:<name>) ------------------------------------------

def streaming(task: dict[str, Any]) -> dict[str, Any]:
    """Sync: a chunk every 50 ms until cancelled (report_progress raises Cancelled)."""
    from tasks import Cancelled, report_progress

    note_time(STARTED, task["id"])
    text = ""
    try:
        for i in range(100_000):
            text += f"w{i} "
            report_progress({"answer": text, "partial": True})
            time.sleep(0.05)
    except Cancelled:
        note_time(STOPPED, task["id"])
        raise
    return {"answer": text}


async def waiting(task: dict[str, Any]) -> dict[str, Any]:
    """Async: waits on an await until cancelled (an LLM call in flight)."""
    note_time(STARTED, task["id"])
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        note_time(STOPPED, task["id"])
        raise
    return {"answer": "done"}


# The runs -----------------------------------------------------------------------------

def _times(state: Path, name: str) -> dict[str, float]:
    path = state / name
    if not path.exists():
        return {}
    return {line.split()[0]: float(line.split()[1]) for line in path.read_text().splitlines()}


def _insert(db: str, n: int) -> list[str]:
    with psycopg.connect(db, autocommit=True) as conn:
        return [str(r[0]) for r in conn.execute(
            "insert into public.agent_task_requests (status, request_payload) "
            "select 'pending', %s from generate_series(1, %s) returning id",
            [Jsonb({"prompt": "bench"}), n]).fetchall()]


def _stack(s: Servers, name: str, transport: str, handler: str, concurrency: int
           ) -> tuple[ProcGroup, str, Path, Any]:
    db = s.new_database(name)
    workdir = s.workdir(f"{name}-{transport}")
    state = workdir / "state"
    state.mkdir()
    extra: dict[str, str] = {"AGENT_HANDLER": handler, "BRIDGE_BATCH_SIZE": "200",
                             "BRIDGE_MAX_QUEUED": "400", "POLL_INTERVAL": "0.5"}
    env, stub = transport_env(db, transport, redis_url=s.redis_url, state_dir=state, **extra)
    group = ProcGroup(workdir, env)
    group.celery_worker("tasks", pool="threads", concurrency=concurrency)
    group.bridge()
    return group, db, state, stub


def stop_latency(s: Servers, transport: str, handler: str, n: int) -> dict[str, Any]:
    group, db, state, stub = _stack(s, "cancel", transport, f"bench.cancel:{handler}", n + 10)
    try:
        ids = _insert(db, n)
        wait_until(lambda: len(_times(state, STARTED)) >= n, 60, what="every handler started")
        time.sleep(0.5)
        asked: dict[str, float] = {}
        with psycopg.connect(db, autocommit=True) as conn:
            for task_id in random.sample(ids, len(ids)):
                time.sleep(random.uniform(0.05, 0.3))  # random phase of any poll cycle
                asked[task_id] = time.time()
                conn.execute("select public.cancel_agent_task(%s)", [task_id])
        wait_until(lambda: len(_times(state, STOPPED)) >= n, 60, what="every handler stopped")
        stopped = _times(state, STOPPED)

        def cancelled_rows() -> int:
            with psycopg.connect(db) as conn:
                row = conn.execute(
                    "select count(*) from public.agent_task_requests where status = 'failed' "
                    "and error->>'type' = 'Cancelled'").fetchone()
            return int(row[0]) if row else 0

        wait_until(lambda: cancelled_rows() >= n, 60, what="every row to end Cancelled")
    finally:
        group.stop_all()
        s.flush_redis()
        if stub is not None:
            stub.stop()
    return {**summary_ms([stopped[t] - asked[t] for t in ids]), "mode": transport,
            "handler": handler}


def _statements(admin_url: str, dbname: str) -> tuple[int, int]:
    """(all statement calls, calls of agent_tasks_cancel_requested) in `dbname`."""
    row = stats_row(admin_url,
                    "select coalesce(sum(s.calls), 0)::bigint, coalesce(sum(s.calls) filter "
                    "(where s.query like '%%agent_tasks_cancel_requested%%' and s.query not "
                    "like '%%pg_proc%%'), 0)::bigint from pg_stat_statements s join "
                    "pg_database d on d.oid = s.dbid where d.datname = %s", [dbname])
    return int(row[0]), int(row[1])


def load(s: Servers, transport: str, n: int, window: float) -> dict[str, Any]:
    group, db, state, stub = _stack(s, "cancel_load", transport, "bench.cancel:waiting", n + 10)
    dbname = str(psycopg.conninfo.conninfo_to_dict(db)["dbname"])
    try:
        _insert(db, n)
        wait_until(lambda: len(_times(state, STARTED)) >= n, 120, what="every handler started")
        time.sleep(2.0)  # settle
        total0, cancel0 = _statements(s.admin_url, dbname)
        time.sleep(window)
        total1, cancel1 = _statements(s.admin_url, dbname)
    finally:
        group.stop_all()
        s.flush_redis()
        if stub is not None:
            stub.stop()
    return {"mode": transport, "running": n, "seconds": window,
            "statements_per_s": (total1 - total0) / window,
            "cancel_checks_per_s": (cancel1 - cancel0) / window}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench.cancel", __doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = p.parse_args(argv)
    n, running, window = (10, 50, 5.0) if args.quick else (40, 200, 15.0)
    stops: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    with servers() as s:
        for transport in ("postgres", "supabase"):
            for handler in ("streaming", "waiting"):
                stops.append(stop_latency(s, transport, handler, n))
                print(json.dumps(stops[-1]), flush=True)
        for transport in ("postgres", "supabase"):
            loads.append(load(s, transport, running, window))
            print(json.dumps(loads[-1]), flush=True)
    print(table("cancel → handler stopped (ms); every row then ended failed/Cancelled",
                ["mode", "handler", "n", "p50", "p95", "p99", "max"],
                [[r["mode"], r["handler"], r["n"], r["p50"], r["p95"], r["p99"], r["max"]]
                 for r in stops]))
    print(table(f"SQL statements/s with {running} tasks running, nothing cancelled",
                ["mode", "all statements/s", "cancel checks/s"],
                [[r["mode"], r["statements_per_s"], r["cancel_checks_per_s"]] for r in loads]))
    write_json(args.json, {"stop": stops, "load": loads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
