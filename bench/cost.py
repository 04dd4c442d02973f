"""Issue 23's cost per task: `python -m bench --only cost,burst`.

`cost`: the same no-op tasks (all inserted in one statement) on agent-bridge (prefork -c 2,
prefork -c 4, threads -c 16), procrastinate (1 and 2 workers x async concurrency 16) and
plain Celery with no database (the same pools). `burst`: 1,000 tasks that each wait 1 s,
inserted at once, on the README's pools (one threads -c 500 worker per core); the same
tasks streaming a few pieces of answer each (the commits per piece); plain Celery on the
same workers; procrastinate at its best measured concurrency (1 worker x async 200).

Per task, from a snapshot after the warm-up to one after every process has exited (both
databases count nested statements: `pg_stat_statements.track = 'all'` on them only; the
bench's own polls are left out): SQL statements (top-level, nested), commits beyond the
tasks' own insert (pg_stat_database.xact_commit, minus the one INSERT or batch_defer that
made the tasks, shown apart), WAL bytes (pg_current_wal_lsn, after a CHECKPOINT), Postgres
CPU (every backend's CPU time over the run, as the throughput table), throughput, and wall
time from the insert to the last completion.
"""

from __future__ import annotations

from typing import Any

from bench import benchmarks as b
from bench.measure import cpu_ms_per_task, table

STREAM_GAP_S = 0.3  # between two pieces of a streamed answer (AGENT_PROGRESS_INTERVAL 0.25)

# Issue 23's targets, each against the other systems of the same run.
TARGET_BURST_RATIO = 1.2  # 1,000 x 1 s wall time, against plain Celery on the same workers
TARGET_COMMITS = 1.5  # commits per task beyond the insert, 1,000 concurrent tasks
TARGET_PG_CPU_MS = 0.5  # Postgres CPU per no-op task
TARGET_THREADS_RATIO = 0.75  # no-op throughput against plain Celery, threads pool
TARGET_PREFORK_RATIO = 0.6  # ... prefork pool


def cost_runs(ctx: b.Context, step: Any) -> list[dict[str, Any]]:
    """The no-op runs; `step(name, what, work)` runs and reports each (bench.__main__)."""
    plan = ctx.plan
    n = plan.cost_n
    out: list[dict[str, Any]] = []
    # Each pool's plain Celery run right after ours: on a shared machine the load moves.
    for pool, conc in plan.pools:
        step("cost", f"cost per task, agent-bridge, {pool} -c {conc}, {n} no-op",
             lambda pool=pool, conc=conc: out.append(b.bridge_throughput(
                 ctx, pool=pool, concurrency=conc, n=n, track_all=True)))
        step("cost", f"cost per task, plain Celery, {pool} -c {conc}, {n} no-op",
             lambda pool=pool, conc=conc: out.append(b.plain_celery_throughput(
                 ctx, pool=pool, concurrency=conc, n=n)))

    def peer() -> None:
        p = b.Procrastinate(ctx, "cost-procrastinate", track_all=True, done_trigger=False)
        try:
            for count, conc in plan.procrastinate_workers:
                out.append(b.procrastinate_run(p, count, conc, n, track="all"))
        finally:
            p.close()

    step("cost", f"cost per task, procrastinate, {n} no-op", peer)
    return out


def burst_runs(ctx: b.Context, step: Any) -> list[dict[str, Any]]:
    plan = ctx.plan
    n = plan.burst_n
    pool, conc, procs = plan.burst_workers
    workers = b.workers_label(pool, conc, procs)
    out: list[dict[str, Any]] = []

    def ours(kind: str, repeat: int = 0) -> None:
        if kind == "sleep":
            r = b.bridge_throughput(ctx, pool=pool, concurrency=conc, n=n, processes=procs,
                                    handler="bench.handlers:sleep_1s", label="sleep 1 s",
                                    counters=repeat == 0, track_all=True)
            r["repeat"] = repeat
        else:
            r = b.bridge_throughput(
                ctx, pool=pool, concurrency=conc, n=n, processes=procs,
                handler="bench.handlers:stream_chunks", label="stream",
                track_all=True, context={"chunks": plan.stream_chunks, "gap": STREAM_GAP_S})
            r["workload"] = (f"{plan.stream_chunks} pieces of answer, {STREAM_GAP_S:g} s apart "
                             f"({(plan.stream_chunks - 1) * STREAM_GAP_S:g} s)")
            r["chunks"] = plan.stream_chunks
        r["ideal_seconds"] = b.one_second_rounds(n, conc * procs)
        out.append(r)

    def plain(repeat: int) -> None:
        r = b.plain_celery_throughput(ctx, pool=pool, concurrency=conc, n=n, sleep=True,
                                      processes=procs)
        r["repeat"] = repeat
        out.append(r)

    # The wall time of one burst moves by a second between runs on a shared machine:
    # ours, then plain Celery's, `burst_repeats` times (counters on the first of ours).
    for repeat in range(plan.burst_repeats):
        step("burst", f"{n} x 1 s, agent-bridge, {workers} ({repeat + 1})",
             lambda repeat=repeat: ours("sleep", repeat))
        step("burst", f"{n} x 1 s, plain Celery, {workers} ({repeat + 1})",
             lambda repeat=repeat: plain(repeat))
    step("burst", f"{n} x {plan.stream_chunks} streamed pieces, agent-bridge, {workers}",
         lambda: ours("stream"))
    count, pconc = plan.burst_procrastinate

    def peer() -> None:
        p = b.Procrastinate(ctx, "burst-procrastinate", track_all=True, done_trigger=False)
        try:
            out.append(b.procrastinate_run(p, count, pconc, n, task="sleep", track="all"))
        finally:
            p.close()

    step("burst", f"{n} x 1 s, procrastinate, {count} x async {pconc}", peer)
    return out


def _2(value: float | None) -> str | None:
    """Two decimals: per-task counts and milliseconds move in the second."""
    return None if value is None else f"{value:.2f}"


def _plain_of(rows: list[dict[str, Any]], r: dict[str, Any]) -> dict[str, Any] | None:
    """Plain Celery's run on the same pool (of the same repeat, in a burst)."""
    for other in rows:
        if other["system"].startswith("plain") and other["pool"] == r["pool"] \
                and other.get("repeat", 0) == r.get("repeat", 0):
            return other
    return None


def render(report: dict[str, Any]) -> str:
    parts = []
    for key, title in (("cost", "Cost per no-op task (all inserted at once → all finished)"),
                       ("burst", "Cost per task, 1,000 concurrent tasks (all inserted at once; "
                                 "wall time from the insert to the last completion)")):
        rows_in = report.get(key) or []
        if not rows_in:
            continue
        rows = []
        for r in rows_in:
            db = r.get("db") or {}
            plain = _plain_of(rows_in, r)
            vs = ""
            if plain is not None and r is not plain and not r.get("chunks"):
                vs = (f"{r['seconds'] / plain['seconds']:.2f}× its time" if key == "burst"
                      else f"{r['tasks_per_s'] / plain['tasks_per_s']:.2f}×")
            rows.append([r["system"], r["pool"], r.get("workload", ""), r["n"], r["seconds"],
                         r["tasks_per_s"], vs, _2(db.get("statements_top")),
                         _2(db.get("statements_nested")), _2(db.get("commits_beyond_insert")),
                         _2(db.get("wal_commits_beyond_insert")), db.get("insert_commits"),
                         db.get("wal_bytes"), db.get("wal_fpi_bytes"),
                         _2(cpu_ms_per_task(r, "postgres")), _2(cpu_ms_per_task(r, None)),
                         f"{r['completed']}/{r['failed']}"])
        parts.append(table(title, [
            "system", "workers", "workload", "n", "wall s", "tasks/s", "vs plain Celery",
            "statements/task, top-level", "nested", "commits/task beyond the insert",
            "of which write (WAL commit records)", "insert commits (all tasks)",
            "WAL bytes/task", "of which full-page images", "Postgres CPU ms/task",
            "all measured CPU ms/task", "completed/failed"], rows))
    per_chunk = chunk_cost(report.get("burst") or [])
    if per_chunk:
        parts.append(table(
            "Per streamed piece (the streaming run minus the 1 s run, same workers)",
            ["pieces/task", "commits/piece", "WAL commit records/piece",
             "statements/piece (top-level)", "nested", "WAL bytes/piece"],
            [[per_chunk[0], *(_2(v) for v in per_chunk[1:-1]), per_chunk[-1]]]))
    rows_t = targets(report)
    if rows_t:
        parts.append(table("Issue 23 targets", ["target", "measured", "met"], rows_t))
    return "\n".join(parts)


def chunk_cost(burst: list[dict[str, Any]]) -> list[Any]:
    stream = next((r for r in burst if r.get("chunks") and r.get("db")), None)
    plain = next((r for r in burst if r["system"] == "agent-bridge" and not r.get("chunks")
                  and r.get("db")), None)
    if stream is None or plain is None:
        return []
    k = stream["chunks"]
    s, p = stream["db"], plain["db"]
    return [k] + [(s[f] - p[f]) / k for f in ("commits_beyond_insert",
                                              "wal_commits_beyond_insert", "statements_top",
                                              "statements_nested", "wal_bytes")]


def targets(report: dict[str, Any]) -> list[list[str]]:
    def mark(ok: bool) -> str:
        return "✅" if ok else "❌"

    rows: list[list[str]] = []
    burst = report.get("burst") or []
    ours = [r for r in burst if r["system"] == "agent-bridge" and not r.get("chunks")]
    peer = [r for r in burst if r["system"] == "procrastinate"]
    pairs = [(r, p) for r in ours if (p := _plain_of(burst, r)) is not None]
    if pairs:
        ratios = sorted(r["seconds"] / p["seconds"] for r, p in pairs)
        mid = ratios[len(ratios) // 2]
        shown = ", ".join(f"{r['seconds']:.2f} s vs {p['seconds']:.2f} s" for r, p in pairs)
        rows.append([f"{pairs[0][0]['n']:,} × 1 s ≤ {TARGET_BURST_RATIO:g}× plain Celery's "
                     f"time ({pairs[0][0]['pool']}; median of {len(pairs)})",
                     f"{mid:.2f}× ({shown})", mark(mid <= TARGET_BURST_RATIO)])
    for r in ours:
        for key, what in (("commits_beyond_insert", "all commits"),
                          ("wal_commits_beyond_insert", "write commits")):
            if (r.get("db") or {}).get(key) is None:
                continue
            c = r["db"][key]
            rows.append([f"commits/task beyond the insert ≤ {TARGET_COMMITS:g}, {r['n']:,} "
                         f"concurrent ({what})", f"{c:.2f}", mark(c <= TARGET_COMMITS)])
            for p in peer:
                if (p.get("db") or {}).get(key) is not None:
                    pc = p["db"][key]
                    rows.append([f"... and fewer than procrastinate's ({p['pool']}, {what})",
                                 f"{c:.2f} vs {pc:.2f}", mark(c < pc)])
    cost = report.get("cost") or []
    for r in cost:
        if r["system"] != "agent-bridge":
            continue
        cpu = cpu_ms_per_task(r, "postgres")
        if cpu is not None:
            rows.append([f"Postgres CPU per no-op task ≤ {TARGET_PG_CPU_MS:g} ms ({r['pool']})",
                         f"{cpu:.2f} ms", mark(cpu <= TARGET_PG_CPU_MS)])
        plain = _plain_of(cost, r)
        if plain is not None:
            want = TARGET_THREADS_RATIO if r["pool"].startswith("threads") else \
                TARGET_PREFORK_RATIO
            ratio = r["tasks_per_s"] / plain["tasks_per_s"]
            rows.append([f"no-op throughput ≥ {want:g}× plain Celery ({r['pool']})",
                         f"{ratio:.2f}× ({r['tasks_per_s']:.0f}/s vs "
                         f"{plain['tasks_per_s']:.0f}/s)", mark(ratio >= want)])
    return rows
