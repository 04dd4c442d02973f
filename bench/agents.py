"""`python -m bench.agents`: a fast agent's pickup while a slow agent's queue is full.

Three setups in one run, on the same throwaway servers, each on a fresh database:

1. `own queues, alone`: AGENTS=fast,slow; a fast worker (-Q agent_tasks.fast, prefork -c 2)
   and a slow worker (-Q agent_tasks.slow, threads -c 4); only fast rows, one at a time.
2. `own queues, slow full`: the same, after SLOW_ROWS slow rows (SLOW_SECONDS each) have
   filled the slow queue to BRIDGE_MAX_QUEUED with the rest pending behind it; then fast
   rows one at a time, as in 1.
3. `one shared queue`: today's shape, no AGENTS: the same two worker processes both
   consume agent_tasks; the same slow flood; then FAST_SHARED fast rows inserted at once.

Measured: insert -> handler started (the handler's own clock line, bench.handlers) of the
fast rows. Slow rows run `bench.handlers:scripted` with a sleep; fast rows sleep 0.

    .venv/bin/python -m bench.agents                 # ~2 min on 2 cores
    .venv/bin/python -m bench.agents --n 30 --json bench/results/agents.json
"""

from __future__ import annotations

import random
import time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.benchmarks import DoneListener, latency_run, latency_summary, payload
from bench.cli import bench_parser, write_json
from bench.handlers import read_runs
from bench.measure import table, wait_until
from bench.stack import BIN, ProcGroup, Servers, base_env, servers

SLOW_ROWS = 60
SLOW_SECONDS = 5.0
MAX_QUEUED = 20
FAST_SHARED = 5
AGENTS = "fast=bench.handlers:scripted,slow=bench.handlers:scripted"


def insert(conn: psycopg.Connection[Any], body: dict[str, Any], agent: str | None,
           n: int = 1) -> tuple[list[str], float]:
    """`n` rows in one statement (agent None: the column's default); (ids, time before)."""
    began = time.time()
    if agent is None:
        rows = conn.execute("insert into public.agent_task_requests (request_payload) "
                            "select %s from generate_series(1, %s) returning id",
                            [Jsonb(body), n]).fetchall()
    else:
        rows = conn.execute("insert into public.agent_task_requests (request_payload, agent) "
                            "select %s, %s from generate_series(1, %s) returning id",
                            [Jsonb(body), agent, n]).fetchall()
    return [str(r[0]) for r in rows], began


def run_setup(servers: Servers, name: str, *, shared: bool, flood: bool, n: int
              ) -> dict[str, Any]:
    db = servers.new_database(name.replace(" ", "_").replace(",", ""))
    workdir = servers.workdir(name.replace(" ", "-").replace(",", ""))
    state = workdir / "state"
    state.mkdir()
    state.chmod(0o777)
    extra = {"AGENT_HANDLER": "bench.handlers:scripted", "BRIDGE_MAX_QUEUED": str(MAX_QUEUED),
             "LEASE_SECONDS": "300"}
    if not shared:
        extra["AGENTS"] = AGENTS
    env = base_env(db_url=db, redis_url=servers.redis_url, state_dir=state, **extra)
    group = ProcGroup(workdir, env)
    fast_queue, slow_queue = ("agent_tasks", "agent_tasks") if shared else \
        ("agent_tasks.fast", "agent_tasks.slow")
    fast_agent, slow_agent = (None, None) if shared else ("fast", "slow")
    conn = psycopg.connect(db, autocommit=True)
    listener = DoneListener(db)
    redis = servers.redis_client()
    try:
        # The same two worker processes in every setup; only what they consume differs.
        for worker, pool, concurrency, queue in (("fastworker", "prefork", 2, fast_queue),
                                                 ("slowworker", "threads", 4, slow_queue)):
            proc = group.start(worker, [
                str(BIN / "celery"), "-A", "tasks", "worker", "-P", pool, "-c",
                str(concurrency), "-n", f"{worker}@%h", "--without-mingle",
                "--without-gossip", "--loglevel", "INFO", "-Q", queue])
            proc.wait_for_output(" ready.", 90)
        bridge = group.bridge()
        if not shared:
            bridge.wait_for_output("🧭 Agents:")  # registered: inserts may name them

        def fast_one() -> tuple[str, float]:
            ids, began = insert(conn, payload("fast", sleep=0), fast_agent)
            return ids[0], began

        # Warm up the fast path (pool processes open their connections).
        warm = latency_run(fast_one, listener, 5, lambda: 0.01, 60)
        if flood:
            insert(conn, payload("slow", sleep=SLOW_SECONDS), slow_agent, SLOW_ROWS)
            wait_until(lambda: redis.llen(slow_queue) >= MAX_QUEUED, 120,
                       what=f"{slow_queue} to hold {MAX_QUEUED} jobs")
        if shared:
            ids, began = insert(conn, payload("fast", sleep=0), fast_agent, FAST_SHARED)
            query = ("select id::text, extract(epoch from finished_at)::float8 from "
                     "public.agent_task_requests where id = any(%s::uuid[]) and "
                     "finished_at is not null")
            wait_until(lambda: len(conn.execute(query, [ids]).fetchall()) == len(ids), 900,
                       interval=0.5, what="the fast rows behind the shared queue")
            samples = [(i, began, float(f)) for i, f in conn.execute(query, [ids]).fetchall()]
        else:
            samples = latency_run(fast_one, listener, n, lambda: random.uniform(0.01, 0.05),
                                  60)
        result = latency_summary(samples, state)
        fast = {task_id for task_id, _, _ in [*samples, *warm]}
        result["slow_rows_started"] = sum(
            1 for task_id, _, _, _ in read_runs(state) if task_id not in fast) if flood else 0
    finally:
        listener.close()
        conn.close()
        group.stop_all()
        servers.flush_redis()
    result.update(setup=name)
    return result


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench.agents", __doc__)
    p.add_argument("--n", type=int, default=100, help="fast rows measured in setups 1 and 2")
    args = p.parse_args(argv)
    results = []
    began = time.monotonic()
    with servers() as s:
        results.append(run_setup(s, "own queues, alone", shared=False, flood=False, n=args.n))
        results.append(run_setup(s, "own queues, slow full", shared=False, flood=True,
                                 n=args.n))
        results.append(run_setup(s, "one shared queue, slow full", shared=True, flood=True,
                                 n=FAST_SHARED))
    rows = [[r["setup"], r["started_ms"]["n"], r["started_ms"]["p50"], r["started_ms"]["p99"],
             r["started_ms"]["max"]] for r in results]
    print(table(f"Fast agent: insert → handler started (ms); slow flood {SLOW_ROWS} × "
                f"{SLOW_SECONDS:g} s, BRIDGE_MAX_QUEUED={MAX_QUEUED}",
                ["setup", "n", "p50", "p99", "max"], rows))
    print(f"\n({time.monotonic() - began:.0f} s)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
