"""`python -m bench.fairness`: fair turns across tenants, measured by hand.

1. Claim cost: `agent_tasks_claim` with 100,000 pending rows over 1,000 tenants, p50/p99
   at batch sizes 1, 10 and 50, beside the first-in-first-out claim of schema version 1
   (re-created under another name in the benchmark database), same database, same run;
   plus the plans of the claim's statements (auto_explain), for the README.
2. Tenant B's insert → handler started (p50/p99) while tenant A has 5,000 tasks queued,
   fair claim (with BRIDGE_MAX_QUEUED at its default and small) beside the FIFO claim.

    .venv/bin/python -m bench.fairness            # ~4 min on 2 cores
    .venv/bin/python -m bench.fairness --quick    # smoke run
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.cli import bench_parser, write_json
from bench.handlers import read_runs
from bench.measure import percentile, table
from bench.stack import ProcGroup, Servers, base_env, servers

# Schema version 1's claim: one global order, first in first out (for comparison only).
FIFO_BODY = """
    with due as (
        select t.id from public.agent_task_requests t
         where t.status = 'pending' and t.run_at <= now()
           and (p_agents is null or t.agent = any (p_agents))
         order by t.priority desc, t.run_at, t.created_at
         limit greatest(p_limit, 0)
           for update skip locked)
    update public.agent_task_requests t
       set status = 'processing', attempts = t.attempts + 1,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           worker = null, started_at = null
      from due where t.id = due.id
    returning t.id, t.attempts, t.agent
"""
FIFO_FUNCTION = """
create or replace function public.bench_claim_fifo(
    p_limit integer, p_lease_seconds double precision,
    p_tenant_concurrency integer default 0, p_agents text[] default null)
returns table (id uuid, attempt integer, agent text)
language sql volatile set search_path = '' as $$""" + FIFO_BODY + "$$;"
# The same, installed as agent_tasks_claim itself: a bridge that claims FIFO.
FIFO_AS_CLAIM = FIFO_FUNCTION.replace("public.bench_claim_fifo", "public.agent_tasks_claim")


def seed(url: str, rows: int, tenants: int) -> float:
    """`rows` pending rows over `tenants` enterprises, oldest first; returns seconds."""
    began = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "insert into public.agent_task_requests (request_payload, enterprise_id, created_at,"
            " run_at) select '{\"prompt\": \"x\"}', 'tenant-' || (g %% %s), "
            "now() - make_interval(secs => %s - g), now() - make_interval(secs => %s - g) "
            "from generate_series(1, %s) g", [tenants, rows, rows, rows])
        conn.execute("vacuum analyze public.agent_task_requests")
        conn.execute("analyze public.agent_task_tenants")
    return time.perf_counter() - began


def time_claims(conn: psycopg.Connection[Any], function: str, batch: int, n: int
                ) -> list[float]:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        got = conn.execute(f"select * from public.{function}(%s, 30)", [batch]).fetchall()
        times.append((time.perf_counter() - began) * 1000)
        assert len(got) == batch, (function, batch, len(got))
    return times


def unclaim(conn: psycopg.Connection[Any]) -> None:
    conn.execute("update public.agent_task_requests set status = 'pending', "
                 "lease_expires_at = null where status = 'processing'")


def plans(conn: psycopg.Connection[Any], batch: int, agents: list[str] | None = None
          ) -> list[str]:
    """The plan of every statement one claim runs, with actual rows and buffers
    (auto_explain)."""
    found: list[str] = []
    conn.add_notice_handler(lambda d: found.append(d.message_primary or ""))
    conn.execute("load 'auto_explain'")
    for setting in ("log_min_duration = 0", "log_nested_statements = on",
                    "log_analyze = on", "log_timing = off", "log_buffers = on"):
        conn.execute(f"set auto_explain.{setting}")
    conn.execute("set client_min_messages = log")
    conn.execute("select * from public.agent_tasks_claim(%s, 30, 0, %s)",
                 [batch, agents]).fetchall()
    conn.execute("set client_min_messages = notice")
    conn.execute("set auto_explain.log_min_duration = -1")
    return found


def claim_cost(srv: Servers, rows: int, tenants: int, n: int) -> dict[str, Any]:
    url = srv.new_database("fair_claim")
    seconds = seed(url, rows, tenants)
    out: dict[str, Any] = {"rows": rows, "tenants": tenants, "seed_seconds": seconds,
                           "batches": {}}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FIFO_FUNCTION)
        # Warm-up: the first claims of a session plan every statement.
        began = time.perf_counter()
        time_claims(conn, "agent_tasks_claim", 50, tenants // 50)
        out["first_round_ms"] = (time.perf_counter() - began) * 1000
        unclaim(conn)
        for batch in (1, 10, 50):
            fair = time_claims(conn, "agent_tasks_claim", batch, n)
            unclaim(conn)
            fifo = time_claims(conn, "bench_claim_fifo", batch, n)
            unclaim(conn)
            out["batches"][batch] = {
                "fair_p50": statistics.median(fair), "fair_p99": percentile(fair, 99),
                "fifo_p50": statistics.median(fifo), "fifo_p99": percentile(fifo, 99)}
        out["plans"] = plans(conn, 50)
    return out


def b_latency(srv: Servers, *, fifo: bool, max_queued: int | None, a_rows: int,
              b_rows: int, a_sleep: float, concurrency: int) -> dict[str, Any]:
    """A inserts `a_rows` tasks of `a_sleep` s; once they run, B inserts `b_rows`, one at
    a time after the previous one started. B's insert → handler started, from the
    handler's own record of its start (bench/handlers.py)."""
    url = srv.new_database("fair_latency")
    if fifo:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(FIFO_AS_CLAIM)
    name = f"fair-{'fifo' if fifo else 'fair'}-{max_queued or 'default'}"
    workdir = srv.workdir(name)
    state = workdir / "state"
    state.mkdir()
    extra = {"AGENT_HANDLER": "bench.handlers:scripted"}
    if max_queued is not None:
        extra.update(BRIDGE_MAX_QUEUED=str(max_queued),
                     BRIDGE_BATCH_SIZE=str(min(50, max_queued)))
    group = ProcGroup(workdir, base_env(db_url=url, redis_url=srv.redis_url, state_dir=state,
                                        **extra))
    waits: list[float] = []
    a_ahead: list[int] = []
    try:
        group.celery_worker("tasks", pool="threads", concurrency=concurrency)
        group.bridge()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("insert into public.agent_task_requests (request_payload, "
                         "enterprise_id) select %s, 'A' from generate_series(1, %s)",
                         [Jsonb({"prompt": "a", "context": {"sleep": a_sleep}}), a_rows])
            time.sleep(2.0)  # A's backlog is draining
            # One B row at a time, each after the previous one started, so each is
            # measured against A's backlog; under FIFO that would take the whole backlog
            # per row, so there B's rows go in together and each is timed from its insert.
            pending: list[tuple[str, float]] = []
            for _ in range(b_rows):
                began = time.time()
                row = conn.execute(
                    "insert into public.agent_task_requests (request_payload, enterprise_id) "
                    "values (%s, 'B') returning id::text",
                    [Jsonb({"prompt": "b", "context": {"sleep": 0}})]).fetchone()
                assert row is not None
                pending.append((row[0], began))
                if fifo:
                    continue
                waits.append(wait_started(state, row[0], timeout=600) - began)
                a_ahead.append(not_started(url, "A"))
                time.sleep(0.2)
            if fifo:
                for task_id, began in pending:
                    waits.append(wait_started(state, task_id, timeout=1200) - began)
                    a_ahead.append(not_started(url, "A"))
    finally:
        group.stop_all()
        srv.flush_redis()
    ms = [w * 1000 for w in waits]
    return {"claim": "FIFO" if fifo else "fair", "max_queued": max_queued or 50,
            "samples": len(ms), "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 99),
            "a_not_started_when_b_started": a_ahead}


def not_started(url: str, tenant: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("select count(*) from public.agent_task_requests "
                           "where tenant = %s and started_at is null", [tenant]).fetchone()
    return int(row[0]) if row else -1


def wait_started(state: Path, task_id: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run_id, began, _, _ in read_runs(state):
            if run_id == task_id:
                return began
        time.sleep(0.005)
    raise TimeoutError(f"B's task {task_id} did not start within {timeout}s")


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("bench.fairness", __doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-cost", action="store_true", help="only the latency part")
    args = p.parse_args(argv)
    rows, tenants, n = (10_000, 100, 50) if args.quick else (100_000, 1_000, 300)
    a_rows, b_rows = (1_000, 5) if args.quick else (5_000, 20)
    results: dict[str, Any] = {}
    with servers() as srv:
        cost: dict[str, Any] = {"batches": {}, "plans": [], "first_round_ms": 0.0} \
            if args.skip_cost else claim_cost(srv, rows, tenants, n)
        results["claim_cost"] = cost
        print(table(f"Claim cost, {rows:,} pending rows over {tenants:,} tenants (ms; the "
                    f"first {tenants // 50} claims, warm-up: {cost['first_round_ms']:.0f} ms)",
                    ["batch", "fair p50", "fair p99", "FIFO p50", "FIFO p99"],
                    [[b, f"{v['fair_p50']:.2f}", f"{v['fair_p99']:.2f}", f"{v['fifo_p50']:.2f}",
                      f"{v['fifo_p99']:.2f}"] for b, v in cost["batches"].items()]))
        latency = []
        for fifo, max_queued, samples in ((False, None, b_rows), (False, 8, b_rows),
                                          (True, None, 3)):
            r = b_latency(srv, fifo=fifo, max_queued=max_queued, a_rows=a_rows,
                          b_rows=samples, a_sleep=0.02, concurrency=4)
            latency.append(r)
        results["b_latency"] = latency
        print(table(f"Tenant B's insert → handler started while A has {a_rows:,} queued "
                    "(threads -c 4, A's tasks 20 ms)",
                    ["claim", "BRIDGE_MAX_QUEUED", "samples", "p50 ms", "p99 ms",
                     "A not yet started"],
                    [[r["claim"], r["max_queued"], r["samples"], f"{r['p50_ms']:.0f}",
                      f"{r['p99_ms']:.0f}", min(r["a_not_started_when_b_started"])]
                     for r in latency]))
        print("\nPlans of one claim (batch 50):\n")
        for plan in cost["plans"]:
            print(plan, "\n")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
