"""`python -m bench.group_commit`: what AGENT_GROUP_COMMIT_WAIT buys (issue 23).

A threads-pool worker's writes (binds, outcomes) wait up to AGENT_GROUP_COMMIT_WAIT for
those of the process's other running tasks, so that more of them share one call and one
commit. This runs the same two workloads at each wait, alternated, `--repeat` times, on one
stack: 4,000 no-op tasks on one `-P threads -c 16` worker (as `--only cost` runs it), and
1,000 tasks that each wait 1 s on 2 workers x `-P threads -c 500` (the burst), with plain
Celery's burst once per round beside it. Per task: commits beyond the insert, Postgres CPU,
the worker processes' CPU; and tasks/s or the burst's wall time.

    .venv/bin/python -m bench.group_commit                  # ~5 min on 2 cores
    .venv/bin/python -m bench.group_commit --waits 0,0.005 --repeat 1
"""

from __future__ import annotations

import statistics
from typing import Any

from bench import benchmarks as b
from bench.cli import bench_parser, write_json
from bench.measure import cpu_ms_per_task, median_of, table
from bench.stack import servers

NOOP_N = 4000
BURST_N = 1000


def one(ctx: b.Context, workload: str, wait: str) -> dict[str, Any]:
    if workload == "no-op":
        r = b.bridge_throughput(ctx, pool="threads", concurrency=16, n=NOOP_N,
                                AGENT_GROUP_COMMIT_WAIT=wait)
    else:
        r = b.bridge_throughput(ctx, pool="threads", concurrency=500, n=BURST_N, processes=2,
                                handler="bench.handlers:sleep_1s", label="sleep 1 s",
                                AGENT_GROUP_COMMIT_WAIT=wait)
    return {"workload": workload, "wait": wait, "seconds": r["seconds"],
            "tasks_per_s": r["tasks_per_s"], "commits": r["db"]["commits_beyond_insert"],
            "postgres_ms": cpu_ms_per_task(r, "postgres"),
            "worker_ms": cpu_ms_per_task(r, "worker")}


def render(results: list[dict[str, Any]], plain: list[float], repeat: int) -> str:
    rows = []
    for workload in ("no-op", "burst"):
        for wait in dict.fromkeys(r["wait"] for r in results):
            runs = [r for r in results if r["workload"] == workload and r["wait"] == wait]
            seconds = median_of(runs, "seconds")
            speed = (f"{median_of(runs, 'tasks_per_s'):.0f} tasks/s" if workload == "no-op" else
                     f"{seconds:.2f} s ({seconds / statistics.median(plain):.2f}× plain Celery)")
            rows.append([workload, f"{float(wait) * 1000:g} ms", speed,
                         f"{median_of(runs, 'commits'):.2f}",
                         f"{median_of(runs, 'postgres_ms'):.2f}",
                         f"{median_of(runs, 'worker_ms'):.2f}"])
    return table(f"AGENT_GROUP_COMMIT_WAIT (median of {repeat}; plain Celery's 1,000 × 1 s: "
                 f"{statistics.median(plain):.2f} s)",
                 ["workload", "wait", "speed", "commits/task beyond the insert",
                  "Postgres CPU ms/task", "worker CPU ms/task"], rows)


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("bench.group_commit", __doc__)
    p.add_argument("--waits", default="0,0.002,0.005,0.01",
                   help="comma-separated AGENT_GROUP_COMMIT_WAIT values, seconds")
    p.add_argument("--repeat", type=int, default=2, help="rounds of every wait")
    args = p.parse_args(argv)
    waits = [w.strip() for w in args.waits.split(",") if w.strip()]
    results: list[dict[str, Any]] = []
    plain: list[float] = []
    with servers() as srv:
        ctx = b.Context(servers=srv, plan=b.Plan())
        for i in range(args.repeat):
            for workload in ("no-op", "burst"):
                for wait in waits:
                    print(f"… {i + 1}/{args.repeat} {workload}, wait {wait} s", flush=True)
                    results.append(one(ctx, workload, wait))
            print(f"… {i + 1}/{args.repeat} burst, plain Celery", flush=True)
            plain.append(float(b.plain_celery_throughput(
                ctx, pool="threads", concurrency=500, n=BURST_N, sleep=True,
                processes=2)["seconds"]))
    print(render(results, plain, args.repeat))
    write_json(args.json, {"runs": results, "plain_burst_seconds": plain})


if __name__ == "__main__":
    main()
