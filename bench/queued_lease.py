"""Does a row's lease run out while its job is still waiting in Redis?

No faults at all: N tasks that each sleep 1 s, more than the workers can start
within LEASE_SECONDS, with the bridge's default backpressure (BRIDGE_MAX_QUEUED).
A claimed row's lease starts at claim time; if its job waits in the broker queue
longer than the lease, the rescue sweep returns the row to pending (an attempt is
spent), the bridge claims it again and enqueues a second job, and the first job
is skipped as stale when a worker reaches it. After max_attempts such rounds the
row fails with LeaseExpired without its agent code ever running.

    .venv/bin/python -m bench.queued_lease          # LEASE_SECONDS=3, 100 tasks, 4 threads
    .venv/bin/python -m bench.queued_lease --lease 30 --tasks 300
    .venv/bin/python -m bench.queued_lease --max-queued 8   # backpressure below the lease
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings

import psycopg

from bench.benchmarks import Inserter, count_status, payload
from bench.handlers import read_runs
from bench.measure import table
from bench.stack import ProcGroup, base_env, servers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queued_lease", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lease", type=float, default=3.0, help="LEASE_SECONDS (default 3)")
    p.add_argument("--tasks", type=int, default=100, help="tasks of 1 s each (default 100)")
    p.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    p.add_argument("--max-queued", type=int, default=200, help="BRIDGE_MAX_QUEUED (default 200)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    with servers() as srv:
        db = srv.new_database("queued_lease")
        workdir = srv.workdir("queued_lease")
        state = workdir / "state"
        state.mkdir()
        env = base_env(db_url=db, redis_url=srv.redis_url, state_dir=state,
                       AGENT_HANDLER="bench.handlers:sleep_1s", LEASE_SECONDS=f"{args.lease:g}",
                       RESCUE_INTERVAL="1", BRIDGE_MAX_QUEUED=str(args.max_queued))
        group = ProcGroup(workdir, env)
        inserter = Inserter(db)
        try:
            group.celery_worker("tasks", pool="threads", concurrency=args.threads)
            group.bridge()
            began = time.monotonic()
            inserter.many(args.tasks, payload("main"))
            deadline = began + 30 + 5 * args.tasks / args.threads
            counts: dict[str, int] = {}
            while time.monotonic() < deadline:
                counts = count_status(db, "main")
                if counts.get("completed", 0) + counts.get("failed", 0) >= args.tasks:
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - began
            with psycopg.connect(db) as conn:
                rows = conn.execute(
                    "select id::text, status, attempts from public.agent_task_requests "
                    "where request_payload->'context'->>'run' = 'main'").fetchall()
            rescued = group.count_in_logs("🛟")
            stale = group.count_in_logs("skipped:")
        finally:
            inserter.close()
            group.stop_all()
        runs = collections.Counter(task for task, _at, _pid, _attempt in read_runs(state))
    failed = [r for r in rows if r[1] == "failed"]
    histogram = collections.Counter(int(r[2]) for r in rows)
    print(table(
        f"{args.tasks} × 1 s tasks, 1 worker with {args.threads} threads, "
        f"LEASE_SECONDS={args.lease:g}, BRIDGE_MAX_QUEUED={args.max_queued}, no faults",
        ["", "value"],
        [["completed", counts.get("completed", 0)], ["failed", counts.get("failed", 0)],
         ["failed without the agent code ever running",
          sum(1 for r in failed if runs[str(r[0])] == 0)],
         ["rows needing more than one attempt", sum(c for a, c in histogram.items() if a > 1)],
         ["rows by attempts", ", ".join(f"{a}: {c}" for a, c in sorted(histogram.items()))],
         ["rescues logged by the bridge", rescued],
         ["stale jobs skipped by workers", stale],
         ["wall time", f"{elapsed:.1f} s"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
