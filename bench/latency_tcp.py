"""Issue 23: insert → handler started on an external PostgreSQL over TCP, beside Celery's own
hop and procrastinate's pickup, in the same run.

The setup of the issue: a stock PostgreSQL (default: the machine's system PostgreSQL 15 at
127.0.0.1:5432, fsync on) in a throwaway database of its own (`agent_bridge_latency`,
created, migrated with `agent-bridge migrate --database-url`, dropped at the end), this
run's own redis-server, the bridge and one `-P prefork -c 2` worker running the no-op
handler, one insert every `--gap` (30 ms) on a fixed schedule (not waiting for the last
task), `--n` samples after `--warmup`. Per sample, from the rows and JSON log lines (every
clock is this machine's wall clock, PostgreSQL's `now()` too):

- `started_at - created_at`: the row's own figure (the start's transaction against the
  insert's; the insert's commit is inside it);
- insert → handler: the handler's `time.time()` against the bench's just before INSERT;
- the steps between: insert → the bridge's `claimed` line, `claimed` → the worker's
  `start` line (after its bind committed), split at the row's `started_at` (the bind's
  transaction start) into the Celery hop and the bind.

In the same run, on the same Redis: plain Celery's own hop (bench/plain_celery.py, publish
→ task start, prefork -c 2, one message every `--gap`), and procrastinate's pickup on the
same server (one worker, async, concurrency 1, LISTEN/NOTIFY; `started - deferred` from
its events, and defer → handler). `--embedded` runs the same again on the embedded
PostgreSQL 18 over its Unix socket.

    .venv/bin/python -m bench.latency_tcp                   # system PostgreSQL 15, ~45 s
    .venv/bin/python -m bench.latency_tcp --before-fix --embedded  # + as before the fix, + PG 18
    .venv/bin/python -m bench.latency_tcp --n 1000 --json out.json
    .venv/bin/python -m bench.latency_tcp --debug --explain-ms 4   # Celery's `received` lines,
                  # and the plans of this database's statements slower than 4 ms (server log)
    .venv/bin/python -m bench.latency_tcp --db-set jit=off  # a server setting to try
    .venv/bin/python -m bench.latency_tcp --sql "alter function ..."  # a schema change to try

Run it on an idle machine (2 cores: another test run shows in every figure); each part of
the report says which other test or bench runs it saw.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from bench.benchmarks import (
    Context,
    Inserter,
    Plan,
    Procrastinate,
    log_times,
    payload,
    wait_run_done,
)
from bench.cli import bench_parser, write_json
from bench.handlers import read_runs
from bench.measure import summary_ms, table, wait_until
from bench.stack import ProcGroup, Servers, base_env, external, servers
from bridge.publisher import Publisher
from bridge.store import Claim

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "agent_bridge_latency"
DEFAULT_SERVER_LOG = Path("/var/log/postgresql/postgresql-15-main.log")
TIMEOUT = 60.0
# Issue 23's tail on PostgreSQL 12-17 with JIT, and its fix (migration
# 20261206000200_claim_without_jit.sql; `--before-fix` undoes it in a second run, to
# measure both): no JIT under the claim, whose SET enable_seqscan = off
# makes a small table's scan cost 1e10 there (disable_cost; PostgreSQL 18 counts disabled
# nodes apart), far above jit_above_cost: agent_bridge.broadcasting(), run by the state
# trigger of every claimed row, was JIT-compiled on every execution (13-15 ms each).
BEFORE_FIX_SQL = ("alter function agent_bridge.claim_rows(integer, double precision, integer,"
                  " text[], integer) reset jit")

T = TypeVar("T")


# Measuring ------------------------------------------------------------------------------

def paced(action: Callable[[int], T], n: int, gap: float) -> list[T]:
    """`action(i)` for i < n on a fixed schedule, one every `gap` seconds (open loop: a
    late one does not push the later ones back)."""
    out: list[T] = []
    began = time.monotonic()
    for i in range(n):
        delay = began + i * gap - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        out.append(action(i))
    return out


@dataclass(frozen=True)
class Sample:
    """One insert: its id, and time.time() before it was sent and after it returned."""

    task_id: str
    began: float
    returned: float


# (name, from, to): the intervals reported, between the timestamps of one sample.
STEPS: tuple[tuple[str, str, str], ...] = (
    ("started_at - created_at (rows)", "created_at", "started_at"),
    ("insert → handler (client clock)", "began", "handler"),
    ("insert sent → returned (its commit)", "began", "returned"),
    ("insert → claimed line", "began", "claimed"),
    ("claimed line → start line", "claimed", "start"),
    ("  claimed → received (DEBUG)", "claimed", "received"),
    ("  received → started_at", "received", "started_at"),
    ("  claimed → started_at (hop)", "claimed", "started_at"),
    ("  started_at → start line (bind)", "started_at", "start"),
    ("start line → handler", "start", "handler"),
)


def step_table(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, first, last in STEPS:
        values = [t[last] - t[first] for t in times.values() if first in t and last in t]
        if values:
            out[name] = summary_ms(values)
    return out


def worst(times: dict[str, dict[str, float]], key: str, count: int = 8
          ) -> list[dict[str, Any]]:
    """The `count` samples with the longest created_at → `key`, each step in ms."""
    ranked = sorted((t for t in times.values() if key in t and "created_at" in t),
                    key=lambda t: t[key] - t["created_at"], reverse=True)[:count]
    return [{name: round((t[b] - t[a]) * 1000, 2) for name, a, b in STEPS if a in t and b in t}
            | {"at": dt.datetime.fromtimestamp(t["began"], dt.UTC).strftime("%H:%M:%S.%f")}
            for t in ranked]


def server_log_offset(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def slow_statements(path: Path | None, offset: int, dbname: str) -> list[str]:
    """The server log's entries about `dbname` written since `offset` (with `--slow-ms`,
    its statements slower than that; with `--explain-ms`, their plans too), each entry's
    lines joined by " | " and cut short."""
    if path is None:
        return []
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return [f"(server log not readable: {exc})"]
    entries: list[list[str]] = []
    ours = False
    for line in text.splitlines():
        if line.startswith(("\t", " ")):  # a plan's or statement's next line
            if ours:
                entries[-1].append(line.strip())
            continue
        ours = f"@{dbname} " in line
        if ours:
            entries.append([line])
    return [" | ".join(entry)[:600] for entry in entries]


def configure_database(srv: Servers, db: str, settings: Sequence[str], sql: Sequence[str]
                       ) -> None:
    """`alter database ... set` each NAME=VALUE of `settings` (new sessions take them), then
    run each statement of `sql` in the database (after its migration)."""
    dbname = str(psycopg.conninfo.conninfo_to_dict(db)["dbname"])
    with psycopg.connect(srv.admin_url, autocommit=True) as conn:
        for item in settings:
            name, value = item.split("=", 1)
            conn.execute(f'alter database "{dbname}" set {name} = {value}'.encode())
    with psycopg.connect(db, autocommit=True) as conn:
        for statement in sql:
            conn.execute(statement.encode())


def bridge_latency(srv: Servers, *, n: int, warmup: int, gap: float, pool: str,
                   concurrency: int, handler: str, debug: bool, server_log: Path | None,
                   db_settings: Sequence[str], db_sql: Sequence[str],
                   env_extra: dict[str, str]) -> dict[str, Any]:
    """The bridge and one worker on a fresh database of `srv`, one insert every `gap`;
    `db_settings` and `db_sql` as configure_database takes them."""
    db = srv.new_database("latency")
    dbname = str(psycopg.conninfo.conninfo_to_dict(db)["dbname"])
    configure_database(srv, db, db_settings, db_sql)
    logged_settings = any(item.split("=", 1)[0].startswith(("log_", "auto_explain"))
                          for item in db_settings)
    workdir = srv.workdir(f"latency-{pool}{concurrency}")
    state = workdir / "state"
    state.mkdir()
    env = base_env(db_url=db, redis_url=srv.redis_url, state_dir=state, AGENT_HANDLER=handler,
                   LOG_FORMAT="json", LOG_LEVEL="DEBUG" if debug else "INFO", **env_extra)
    group = ProcGroup(workdir, env)
    inserter = Inserter(db)

    def insert(run: str) -> Callable[[int], Sample]:
        def one(_: int) -> Sample:
            task_id, began = inserter.one(payload(run))
            return Sample(task_id, began, time.time())
        return one

    try:
        worker = group.celery_worker("tasks", pool=pool, concurrency=concurrency)
        bridge = group.bridge()
        paced(insert("warmup"), warmup, gap)
        wait_run_done(db, "warmup", warmup, TIMEOUT)
        offset = server_log_offset(server_log)
        samples = paced(insert("latency"), n, gap)
        counts = wait_run_done(db, "latency", n, TIMEOUT)
        time.sleep(0.5)  # the last log lines
        logs = bridge.output + worker.output
        with psycopg.connect(db) as conn:
            rows = conn.execute(
                "select id::text, extract(epoch from created_at)::float8,"
                " extract(epoch from started_at)::float8 as bench_own"
                " from public.agent_task_requests"
                " where request_payload->'context'->>'run' = 'latency'").fetchall()
        slow = slow_statements(server_log, offset, dbname) if logged_settings else []
        with psycopg.connect(db) as conn:
            version = str(conn.execute("show server_version").fetchone()[0])  # type: ignore[index]
    finally:
        inserter.close()
        group.stop_all()
        srv.flush_redis()
    logged = log_times(logs)
    handler_at = {t: at for t, at, _pid, _attempt in reversed(read_runs(state))}
    times: dict[str, dict[str, float]] = {}
    db_times = {str(r[0]): (r[1], r[2]) for r in rows}
    for s in samples:
        t = {"began": s.began, "returned": s.returned, **logged.get(s.task_id, {})}
        created, started = db_times.get(s.task_id, (None, None))
        if created is not None:
            t["created_at"] = float(created)
        if started is not None:
            t["started_at"] = float(started)
        if s.task_id in handler_at:
            t["handler"] = handler_at[s.task_id]
        times[s.task_id] = t
    return {"system": "agent-bridge", "server": version, "database": dbname,
            "pool": f"{pool} -c {concurrency}", "handler": handler, "n": n, "gap_ms": gap * 1000,
            "counts": counts, "steps_ms": step_table(times),
            "db_settings": list(db_settings), "db_sql": list(db_sql),
            "worst": worst(times, "started_at"), "slow_statements": slow[-60:],
            "samples": list(times.values())}


def plain_celery_hop(srv: Servers, *, n: int, warmup: int, gap: float, pool: str,
                     concurrency: int) -> dict[str, Any]:
    """Plain Celery (bench/plain_celery.py): publish → task start, one message every
    `gap`, on the same Redis, the publisher the bridge uses."""
    from bench.plain_celery import QUEUE, RECORD_TASK, make_app

    workdir = srv.workdir(f"plain-celery-hop-{pool}{concurrency}")
    state = workdir / "state"
    state.mkdir()
    app = make_app(srv.redis_url)
    publisher = Publisher(app, QUEUE, RECORD_TASK)
    group = ProcGroup(workdir, base_env(redis_url=srv.redis_url, state_dir=state))

    def publish(run: str) -> Callable[[int], tuple[str, float]]:
        def one(i: int) -> tuple[str, float]:
            began = time.time()
            publisher.publish([Claim(f"{run}-{i}", 1)])
            return f"{run}-{i}", began
        return one

    def recorded(prefix: str, count: int) -> Callable[[], bool]:
        return lambda: sum(t.startswith(prefix) for t, *_ in read_runs(state)) >= count

    try:
        group.celery_worker("bench.plain_celery", pool=pool, concurrency=concurrency)
        paced(publish("warmup"), warmup, gap)
        wait_until(recorded("warmup-", warmup), TIMEOUT, 0.05, "plain Celery warm-up")
        sent = paced(publish("hop"), n, gap)
        wait_until(recorded("hop-", n), TIMEOUT, 0.05, "plain Celery tasks")
    finally:
        group.stop_all()
        srv.flush_redis()
        app.close()
    started = {t: at for t, at, _pid, _attempt in read_runs(state)}
    hops = [started[t] - began for t, began in sent if t in started]
    return {"system": "plain Celery (no database)", "pool": f"{pool} -c {concurrency}",
            "n": n, "gap_ms": gap * 1000, "publish → task start": summary_ms(hops)}


def procrastinate_pickup(srv: Servers, *, n: int, warmup: int, gap: float) -> dict[str, Any]:
    """procrastinate on the same server (bench/procrastinate_app.py, as the `latency`
    benchmark runs it: one worker, async, concurrency 1): one defer every `gap`;
    `started - deferred` from its events, and defer → handler."""
    peer = Procrastinate(Context(srv, Plan()), "latency-procrastinate", done_trigger=False)
    try:
        peer.workers(1, 1, record=True)
        paced(lambda _: peer.defer_one("noop"), warmup, gap)
        peer.wait_all(warmup, TIMEOUT)
        peer.reset()
        sent = paced(lambda _: peer.defer_one("noop"), n, gap)
        peer.wait_all(n, TIMEOUT)
        with psycopg.connect(peer.db) as conn:
            events = conn.execute(
                "select job_id::text, type::text, extract(epoch from at)::float8 as bench_own"
                " from procrastinate_events where type in ('deferred', 'started')").fetchall()
    finally:
        peer.close()
    at: dict[str, dict[str, float]] = {}
    for job, kind, when in events:
        at.setdefault(str(job), {})[str(kind)] = float(when)
    started = {t: when for t, when, _pid, _attempt in read_runs(peer.state)}
    pickups = [e["started"] - e["deferred"] for e in at.values()
               if "started" in e and "deferred" in e]
    handler = [started[j] - began for j, began in sent if j in started]
    return {"system": "procrastinate", "pool": "1 worker, async, concurrency 1", "n": n,
            "gap_ms": gap * 1000, "started - deferred (events)": summary_ms(pickups),
            "defer → handler (client clock)": summary_ms(handler)}


# The run -------------------------------------------------------------------------------

def run_on(srv: Servers, args: Any, label: str) -> dict[str, Any]:
    """Every system on `srv`, in this order; each result says which."""
    kw = {"n": args.n, "warmup": args.warmup, "gap": args.gap / 1000}
    out: dict[str, Any] = {"label": label}
    print(f"[{label}] agent-bridge ...", flush=True)
    env_extra = dict(item.split("=", 1) for item in args.env)
    db_settings = list(args.db_set)
    if args.slow_ms is not None and label == "external":  # its log is --server-log
        db_settings.append(f"log_min_duration_statement={args.slow_ms:g}")
    if args.explain_ms is not None and label == "external":
        db_settings += ["session_preload_libraries='auto_explain'",
                        f"auto_explain.log_min_duration={args.explain_ms:g}",
                        "auto_explain.log_nested_statements=on"]
    variants = [list(args.sql)] + ([[*args.sql, BEFORE_FIX_SQL]] if args.before_fix else [])
    out["bridge"] = []
    for sql in variants:
        b = bridge_latency(srv, pool="prefork", concurrency=args.concurrency,
                           handler=args.handler, debug=args.debug,
                           server_log=args.server_log if label == "external" else None,
                           db_settings=db_settings, db_sql=sql, env_extra=env_extra, **kw)
        out["bridge"].append({**b, "other_jobs_after": other_jobs()})
    if not args.skip_plain:
        print(f"[{label}] plain Celery ...", flush=True)
        out["plain"] = plain_celery_hop(srv, pool="prefork", concurrency=args.concurrency, **kw)
        out["plain"]["other_jobs_after"] = other_jobs()
    if not args.skip_procrastinate:
        print(f"[{label}] procrastinate ...", flush=True)
        out["procrastinate"] = procrastinate_pickup(srv, **kw)
        out["procrastinate"]["other_jobs_after"] = other_jobs()
    return out


def row(name: str, s: dict[str, float]) -> list[Any]:
    return [name, s["n"], s["p50"], s["p90"], s["p99"], s["max"]]


def report(result: dict[str, Any]) -> str:
    return "\n".join(report_one(result, b) for b in result["bridge"])


def report_one(result: dict[str, Any], b: dict[str, Any]) -> str:
    rows = [row(name, s) for name, s in b["steps_ms"].items()]
    if "plain" in result:
        rows.append(row("plain Celery: publish → task start", result["plain"]
                        ["publish → task start"]))
    if "procrastinate" in result:
        p = result["procrastinate"]
        rows.append(row("procrastinate: started - deferred (events)",
                        p["started - deferred (events)"]))
        rows.append(row("procrastinate: defer → handler (client clock)",
                        p["defer → handler (client clock)"]))
    text = table(f"PostgreSQL {b['server']} ({result['label']}), {b['pool']}, one insert every "
                 f"{b['gap_ms']:g} ms, {b['handler']} (ms)",
                 ["interval", "n", "p50", "p90", "p99", "max"], rows)
    busy = [f"{part}: {', '.join(jobs)}" for part, jobs in (
        ("agent-bridge", b.get("other_jobs_after")),
        ("plain Celery", result.get("plain", {}).get("other_jobs_after")),
        ("procrastinate", result.get("procrastinate", {}).get("other_jobs_after"))) if jobs]
    if busy:
        text += "\nWARNING, other test or bench runs seen after " + "; ".join(busy)
    for item in b.get("db_settings", []):
        text += f"\n(database setting: {item})"
    for statement in b.get("db_sql", []):
        text += f"\n(after migrating: {statement})"
    text += "\n" + targets(result, b) + "\nThe slowest `started_at - created_at` samples (ms):\n"
    for w in b["worst"]:
        text += "  " + ", ".join(f"{k.strip()}={v}" for k, v in w.items()) + "\n"
    if b["slow_statements"]:
        text += "\nThe server's log of slow statements (this database):\n" + \
            "\n".join("  " + line for line in b["slow_statements"]) + "\n"
    return text


def targets(result: dict[str, Any], b: dict[str, Any]) -> str:
    """Issue 23's targets, both ways of reading them: the rows' `started_at - created_at`
    against procrastinate's `started - deferred` (each the database's own clock) and the
    handler's start against the bench's clock before the insert (defer), on each side; the
    bound is procrastinate's p50 plus Celery's hop p50; p99 at most 10 ms."""
    if "plain" not in result or "procrastinate" not in result:
        return ""
    steps = b["steps_ms"]
    hop = result["plain"]["publish → task start"]["p50"]
    lines = []
    for ours_name, peer_name in (("started_at - created_at (rows)",
                                  "started - deferred (events)"),
                                 ("insert → handler (client clock)",
                                  "defer → handler (client clock)")):
        ours = steps.get(ours_name)
        if ours is None:
            continue
        peer = result["procrastinate"][peer_name]["p50"]
        bound = hop + peer
        lines.append(
            f"Target, {ours_name} against procrastinate's {peer_name}: p50 {ours['p50']:.1f} "
            f"ms ≤ {bound:.1f} ({peer:.1f} + Celery's hop {hop:.1f}): "
            f"{'met' if ours['p50'] <= bound else 'NOT met'}; p99 {ours['p99']:.1f} ms ≤ 10: "
            f"{'met' if ours['p99'] <= 10 else 'NOT met'}")
    return "\n".join(lines) + "\n"


def other_jobs() -> list[str]:
    """Other test or bench runs on the machine now (a 2-core machine measures them too)."""
    import psutil

    me = psutil.Process()
    own = {me.pid, *(p.pid for p in me.parents()), *(c.pid for c in me.children(recursive=True))}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] not in own and ("pytest" in cmd or "-m bench" in cmd):
            found.append(f"{proc.info['pid']} {cmd[:100]}")
    return found


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench.latency_tcp", __doc__)
    p.add_argument("--database-url", default=DEFAULT_URL,
                   help=f"an admin connection to the server (default {DEFAULT_URL})")
    p.add_argument("--n", type=int, default=300, help="samples per system (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up inserts (default 30)")
    p.add_argument("--gap", type=float, default=30.0, help="ms between inserts (default 30)")
    p.add_argument("--concurrency", type=int, default=2, help="prefork -c (default 2)")
    p.add_argument("--handler", default="bench.handlers:noop",
                   help="AGENT_HANDLER (default bench.handlers:noop: no-op that records its "
                        "start)")
    p.add_argument("--embedded", action="store_true",
                   help="then the same on the embedded PostgreSQL 18 (Unix socket)")
    p.add_argument("--only-embedded", action="store_true", help="the embedded server only")
    p.add_argument("--debug", action="store_true",
                   help="LOG_LEVEL=DEBUG: Celery's `received` lines too")
    p.add_argument("--slow-ms", type=float, default=None,
                   help="log_min_duration_statement on the throwaway database; its slow "
                        "statements are read back from --server-log")
    p.add_argument("--explain-ms", type=float, default=None,
                   help="auto_explain (nested statements too) of statements slower than this, "
                        "read back from --server-log")
    p.add_argument("--db-set", action="append", default=[], metavar="NAME=VALUE",
                   help="`alter database ... set NAME = VALUE` on agent-bridge's throwaway "
                        "database before anything connects (repeatable), e.g. jit=off")
    p.add_argument("--sql", action="append", default=[], metavar="STATEMENT",
                   help="run in that database after its migration (repeatable): a schema "
                        "change to try")
    p.add_argument("--server-log", type=Path, default=DEFAULT_SERVER_LOG,
                   help=f"the external server's log file (default {DEFAULT_SERVER_LOG})")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of the bridge and worker (repeatable)")
    p.add_argument("--before-fix", action="store_true",
                   help="run agent-bridge again as before the claim's JIT fix (BEFORE_FIX_SQL)")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--skip-procrastinate", action="store_true")
    p.add_argument("--workdir", type=Path, help="keep the process logs here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    began = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    results: dict[str, Any] = {"began": began, "command": " ".join(["python -m bench.latency_tcp",
                                                                    *(argv or sys.argv[1:])]),
                               "runs": [], "other_jobs_before": other_jobs(),
                               "loadavg_before": os.getloadavg()}
    if not args.only_embedded:
        with external(args.database_url, DATABASE) as srv:
            results["runs"].append(keep_logs(run_on(srv, args, "external"), srv, args.workdir))
    if args.embedded or args.only_embedded:
        with servers() as srv:
            results["runs"].append(keep_logs(run_on(srv, args, "embedded"), srv, args.workdir))
    results.update(other_jobs_after=other_jobs(), loadavg_after=os.getloadavg(),
                   ended=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
    print(f"\n{began} to {results['ended']}, {os.cpu_count()} CPUs; other test or bench runs "
          f"before: {results['other_jobs_before'] or 'none'}, after: "
          f"{results['other_jobs_after'] or 'none'}")
    for result in results["runs"]:
        print(report(result))
    write_json(args.json, results)
    return 0


def keep_logs(result: dict[str, Any], srv: Servers, workdir: Path | None) -> dict[str, Any]:
    """Copy the run's process logs to `workdir` (before the servers' folder goes)."""
    if workdir is not None:
        shutil.copytree(srv.root / "runs", workdir / result["label"], dirs_exist_ok=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
