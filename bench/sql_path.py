"""`python -m bench.sql_path`: the database's CPU per task on the SQL path alone (issue 23).

No Celery and no worker processes: one connection claims as the bridge does (batches of
50, payloads inline) and another writes as a worker's writer does, through the store the
bridge and the workers use (`bridge.store`), on the embedded PostgreSQL with nothing else
running. The figure is those two backends' own CPU time (psutil), so it repeats within a
few percent where the full bench's Postgres CPU moves with everything else on the machine.
The table's statistics are taken while it holds 50 rows, then the tasks arrive in one
insert (a quiet table, then a burst, as in `python -m bench --only cost`).

Paths, each task a no-op (bind, then complete with a small answer):
- `prefork`: each bind and each outcome its own call and transaction, as a prefork child
  sends them (one task at a time);
- `batches of k`: one agent_tasks_write call carries the binds of k tasks and the outcomes
  of the k before them, as a threads-pool worker's writer sends them under load.

Each path runs on the schema before a migration (`--change`, by default `CHANGE`) and
after it, alternated, `--repeat` times; the table shows the median. The insert column is the
backend CPU of the one multi-row INSERT that made the tasks, per row (its triggers).
`--server URL` runs on another PostgreSQL on this machine (its backends' CPU is read from
/proc), in throwaway databases dropped at the end, instead of the embedded one.

    .venv/bin/python -m bench.sql_path            # ~3 min on 2 cores
    .venv/bin/python -m bench.sql_path --quick    # smoke run
    .venv/bin/python -m bench.sql_path --server postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python -m bench.sql_path --change 20261208000100_claim_and_batch_without_scans.sql
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from bench.cli import bench_parser, write_json
from bench.measure import median_of, table
from bench.stack import Servers, external, servers
from bridge.store import Claim, TaskStore, Write
from bridge.store.postgres import PostgresTransport

CHANGE = "20261209000100_hot_helpers_in_plpgsql.sql"
CLAIM_BATCH = 50
INLINE_BYTES = 65536
QUIET_ROWS = 50  # what the table holds when its statistics are taken
WORKER = "sql-path-worker"
ANSWER = {"answer": "ok"}


def database(srv: Servers, schema: str, change: str) -> str:
    if schema == "before":
        url = srv.database_before("sql_path_before", change)
    else:
        url = srv.new_database("sql_path_after")
        with psycopg.connect(url, autocommit=True) as conn:  # the bench's own NOTIFY trigger
            conn.execute("drop trigger if exists bench_notify_done on public.agent_task_requests")
    return url


def server_version(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("show server_version").fetchone()
    return f"PostgreSQL {str(row[0]).split()[0] if row else '?'}"


def arrive(url: str, n: int) -> float:
    """The quiet rows, ANALYZE, then `n` rows in one INSERT: returns that INSERT's
    backend CPU seconds."""
    body = Jsonb({"prompt": "benchmark", "context": {"run": "sql-path"}})
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into public.agent_task_requests (request_payload) "
                     "select %s from generate_series(1, %s)", [body, QUIET_ROWS])
        conn.execute("analyze public.agent_task_requests")
        pid = conn.execute("select pg_backend_pid()").fetchone()
        assert pid is not None
        proc = psutil.Process(int(pid[0]))
        began = cpu_seconds(proc)
        conn.execute("insert into public.agent_task_requests (request_payload) "
                     "select %s from generate_series(1, %s)", [body, n])
        return cpu_seconds(proc) - began


def backend(url: str, name: str) -> psutil.Process:
    """The server process of the connection whose application_name is `name`."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select pid from pg_stat_activity where application_name = %s",
                           [name]).fetchone()
    assert row is not None, f"no connection named {name}"
    return psutil.Process(int(row[0]))


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def prefork(worker: TaskStore, claims: list[Claim], previous: list[Claim]) -> int:
    for c in claims:
        worker.write_batch([Write("bind", c.id, c.attempt, WORKER, seconds=60)])
        worker.write_batch([Write("complete", c.id, c.attempt, WORKER, doc=ANSWER)])
    return 2 * len(claims)


def batches_of(k: int) -> Callable[[TaskStore, list[Claim], list[Claim]], int]:
    def send(worker: TaskStore, claims: list[Claim], previous: list[Claim]) -> int:
        calls = 0
        for i in range(0, len(claims), k):
            group = claims[i:i + k]
            worker.write_batch(
                [Write("bind", c.id, c.attempt, WORKER, seconds=60) for c in group]
                + [Write("complete", c.id, c.attempt, WORKER, doc=ANSWER) for c in previous])
            previous[:] = group
            calls += 1
        return calls
    return send


def run(srv: Servers, schema: str, path: str, n: int, change: str = CHANGE) -> dict[str, Any]:
    url = database(srv, schema, change)
    insert_cpu = arrive(url, n)
    bridge = TaskStore(PostgresTransport(make_conninfo(url, application_name="sql-path-claim"),
                                         pool=False))
    worker = TaskStore(PostgresTransport(make_conninfo(url, application_name="sql-path-write"),
                                         pool=False))
    bridge.schema_version()
    worker.schema_version()
    claimer, writer = backend(url, "sql-path-claim"), backend(url, "sql-path-write")
    send = prefork if path == "prefork" else batches_of(int(path.split()[-1]))
    claim_cpu, write_cpu = cpu_seconds(claimer), cpu_seconds(writer)
    tasks = calls = 0
    previous: list[Claim] = []
    while True:
        claims = bridge.claim(CLAIM_BATCH, 60, inline_bytes=INLINE_BYTES)
        if not claims:
            break
        tasks += len(claims)
        calls += send(worker, claims, previous)
    if previous:
        worker.write_batch([Write("complete", c.id, c.attempt, WORKER, doc=ANSWER)
                            for c in previous])
        calls += 1
    claim_cpu, write_cpu = cpu_seconds(claimer) - claim_cpu, cpu_seconds(writer) - write_cpu
    with psycopg.connect(url) as conn:
        done = conn.execute("select count(*) from public.agent_task_requests "
                            "where status = 'completed'").fetchone()
    bridge.close()
    worker.close()
    assert done is not None and done[0] == tasks, (done, tasks)
    return {"schema": schema, "path": path, "tasks": tasks, "calls": calls,
            "insert_us": 1e6 * insert_cpu / n,
            "claim_us": 1e6 * claim_cpu / tasks, "write_us": 1e6 * write_cpu / tasks,
            "write_call_us": 1e6 * write_cpu / calls}


def render(results: list[dict[str, Any]], repeat: int, change: str = CHANGE,
           server: str = "embedded") -> str:
    rows = []
    for path in dict.fromkeys(r["path"] for r in results):
        for schema in ("before", "after"):
            runs = [r for r in results if r["path"] == path and r["schema"] == schema]
            if not runs:
                continue
            claim, write = median_of(runs, "claim_us"), median_of(runs, "write_us")
            per_task = runs[0]["calls"] / runs[0]["tasks"]
            rows.append([path, schema, runs[0]["tasks"], f"{per_task:.2f}",
                         f"{median_of(runs, 'insert_us'):.0f}",
                         f"{claim:.0f}", f"{write:.0f}", f"{claim + write:.0f}",
                         f"{median_of(runs, 'write_call_us'):.0f}"])
    return table(f"Postgres CPU per no-op task on the SQL path alone (µs; median of {repeat}; "
                 f"schema before / after {change}; {server})",
                 ["worker's writes", "schema", "tasks", "write calls/task", "insert", "claim",
                  "writes", "claim + writes", "per write call"], rows)


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("bench.sql_path", __doc__)
    p.add_argument("--quick", action="store_true", help="fewer tasks, fewer paths: a smoke run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each path and schema")
    p.add_argument("--change", default=CHANGE,
                   help="the migration file whose before and after are compared")
    p.add_argument("--server", metavar="URL",
                   help="an external PostgreSQL on this machine (admin URL) instead of the "
                        "embedded one")
    args = p.parse_args(argv)
    n = 500 if args.quick else 3000
    repeat = 1 if args.quick else args.repeat
    paths = ["prefork", "batches of 1", "batches of 4"] if args.quick else \
        ["prefork", "batches of 1", "batches of 2", "batches of 4", "batches of 16"]
    results = []
    with (external(args.server, "agent_bridge_sql_path") if args.server
          else servers()) as srv:
        server = server_version(srv.admin_url)
        for i in range(repeat):
            for path in paths:
                for schema in ("before", "after"):
                    print(f"… {i + 1}/{repeat} {path}, {schema}", flush=True)
                    results.append(run(srv, schema, path, n, args.change))
    print(render(results, repeat, args.change, server))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
