"""`python -m bench.claim_cost`: what one claim costs while many tenants hold only future
rows (issue 20, item 1), before and after 20261203000100_claim_sleeping_tenants.sql.

10,000 tenants with one row each scheduled 1 hour to 7 days ahead and 1,000 tenants with 20
due rows each arrive in one bulk insert. Then claims as the bridge makes them (its agents in
p_agents, one transaction each):

1. right after the arrival, before ANALYZE (the tables were last analyzed while empty, and
   autovacuum is off on both): the first claims, then idle polls once every due row is
   claimed (what a bridge does every POLL_INTERVAL and on every insert's wake-up);
2. after VACUUM ANALYZE, on a new connection: batches of 1, 10 and 50, then idle polls.

Per claim: wall time around the call, WAL bytes (`pg_current_wal_insert_lsn()` before and
after, nothing else writing), and rows of `agent_task_tenants` written. Each phase runs on
the schema before this change (the migrations up to 20261130001100, in a database of its
own) and after it (all migrations), on the same server in the same run.

    .venv/bin/python -m bench.claim_cost            # ~2 min on 2 cores
    .venv/bin/python -m bench.claim_cost --quick    # smoke run
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.cli import bench_parser, write_json
from bench.fairness import plans
from bench.measure import percentile, table
from bench.stack import Servers, servers

CHANGE = "20261203000100_claim_sleeping_tenants.sql"
AGENTS = ["default"]  # what the bridge passes: the agents whose queues have room
TARGET_P50_MS = 3.0
TARGET_WAL_BYTES = 8 * 1024


@dataclass
class Size:
    future_tenants: int
    due_tenants: int
    due_rows_each: int
    n: int  # claims per measured batch size, after the change
    n_before: int  # the same before it (each claim there walks every tenant)
    first: int  # claims right after the arrival
    first_before: int


FULL = Size(10_000, 1_000, 20, 300, 30, 20, 5)
QUICK = Size(2_000, 200, 20, 50, 10, 5, 5)


def database(srv: Servers, schema: str) -> str:
    """A database with the schema before the change, or with every migration."""
    if schema == "after":
        return srv.new_database("claim_after")
    return srv.database_before("claim_before", CHANGE)


def arrive(url: str, size: Size) -> float:
    """The bulk arrival, in one statement, into tables last analyzed while empty (what
    autovacuum leaves behind on a new install); returns its seconds. Tenant names are
    hashes, so tenants with due rows and tenants with future rows interleave in name
    order."""
    with psycopg.connect(url, autocommit=True) as conn:
        for name in ("agent_task_requests", "agent_task_tenants"):
            conn.execute(f"vacuum analyze public.{name}")
            conn.execute(f"alter table public.{name} set (autovacuum_enabled = false)")
        began = time.perf_counter()
        conn.execute(
            "insert into public.agent_task_requests (request_payload, enterprise_id, run_at) "
            "select '{\"prompt\": \"later\"}'::jsonb, md5('future' || g), "
            "       now() + interval '1 hour' + (g %% 1000) * interval '10 minutes' "
            "  from generate_series(1, %(f)s) g "
            "union all "
            "select '{\"prompt\": \"now\"}'::jsonb, md5('due' || (g %% %(d)s)), "
            "       now() - make_interval(secs => g) "
            "  from generate_series(1, %(d)s * %(r)s) g",
            {"f": size.future_tenants, "d": size.due_tenants, "r": size.due_rows_each})
        return time.perf_counter() - began


def tenant_writes(conn: psycopg.Connection[Any]) -> int:
    """Rows of agent_task_tenants inserted or updated so far (this backend's stats flushed)."""
    conn.execute("select pg_stat_force_next_flush()")
    conn.execute("select pg_stat_clear_snapshot()")
    row = conn.execute("select n_tup_ins + n_tup_upd from pg_stat_user_tables "
                       "where relid = 'public.agent_task_tenants'::regclass").fetchone()
    return int(row[0]) if row else -1


def claims(conn: psycopg.Connection[Any], batch: int, n: int) -> dict[str, Any]:
    """n claims of `batch`, each its own transaction: ms, WAL bytes, rows claimed."""
    ms: list[float] = []
    wal: list[float] = []
    got: list[int] = []
    written = tenant_writes(conn)
    for _ in range(n):
        lsn = conn.execute("select pg_current_wal_insert_lsn()").fetchone()
        began = time.perf_counter()
        rows = conn.execute("select * from public.agent_tasks_claim(%s, 30, 0, %s)",
                            [batch, AGENTS]).fetchall()
        ms.append((time.perf_counter() - began) * 1000)
        diff = conn.execute("select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)",
                            [lsn[0] if lsn else None]).fetchone()
        wal.append(float(diff[0]) if diff else float("nan"))
        got.append(len(rows))
    written = tenant_writes(conn) - written
    return {"batch": batch, "n": n, "p50_ms": statistics.median(ms),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms),
            "wal_p50": statistics.median(wal), "wal_p99": percentile(wal, 99),
            "rows_per_claim": sum(got) / n, "tenant_writes_per_claim": written / n}


def unclaim(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("update public.agent_task_requests set status = 'pending', "
                     "lease_expires_at = null where status = 'processing'")


def drain(conn: psycopg.Connection[Any]) -> None:
    """Claim every due row, so what is left is future rows only."""
    while conn.execute("select count(*) from public.agent_tasks_claim(2000, 30, 0, %s)",
                       [AGENTS]).fetchone() != (0,):
        pass


def run_schema(srv: Servers, schema: str, size: Size, show_plans: bool) -> dict[str, Any]:
    url = database(srv, schema)
    n = size.n if schema == "after" else size.n_before
    out: dict[str, Any] = {"schema": schema, "arrival_s": arrive(url, size), "phases": []}
    first_n = size.first if schema == "after" else size.first_before
    with psycopg.connect(url, autocommit=True) as conn:
        if show_plans:  # (the first claim of the session: planned on the stale statistics)
            out["plans"] = plans(conn, 10, AGENTS)
        first = claims(conn, 10, first_n)
        out["phases"].append({"phase": "right after the arrival, before ANALYZE", **first})
        drain(conn)
        idle = claims(conn, 50, first_n)
        out["phases"].append({"phase": "idle poll, before ANALYZE", **idle})
    unclaim(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("vacuum analyze public.agent_task_requests")
        conn.execute("vacuum analyze public.agent_task_tenants")
    with psycopg.connect(url, autocommit=True) as conn:
        claims(conn, 10, 5)  # warm-up: the session plans every statement
        unclaim(url)
        for batch in (1, 10, 50):
            # (never more rows than half the due ones: every claim finds a full batch)
            r = claims(conn, batch, min(n, size.due_tenants * size.due_rows_each // batch // 2))
            out["phases"].append({"phase": "after ANALYZE", **r})
            unclaim(url)
        drain(conn)
        r = claims(conn, 50, n)
        out["phases"].append({"phase": "idle poll, after ANALYZE", **r})
    return out


def per_row(p: dict[str, Any]) -> str:
    return f"{p['wal_p50'] / p['rows_per_claim']:,.0f}" if p["rows_per_claim"] else "-"


def render(results: list[dict[str, Any]], size: Size) -> str:
    rows = []
    for res in results:
        for p in res["phases"]:
            rows.append([res["schema"], p["phase"], p["batch"], p["n"], f"{p['p50_ms']:.2f}",
                         f"{p['p99_ms']:.2f}", f"{p['wal_p50']:,.0f}", f"{p['wal_p99']:,.0f}",
                         per_row(p), f"{p['rows_per_claim']:.1f}",
                         f"{p['tenant_writes_per_claim']:.1f}"])
    title = (f"One claim with {size.future_tenants:,} tenants holding only future rows and "
             f"{size.due_tenants:,} with {size.due_rows_each} due rows each")
    text = table(title, ["schema", "phase", "batch", "claims", "p50 ms", "p99 ms",
                         "WAL p50 B", "WAL p99 B", "WAL p50 B/row claimed", "rows/claim",
                         "tenant rows written/claim"],
                 rows)
    after = next(r for r in results if r["schema"] == "after")
    checks = []
    for p in after["phases"]:
        ok = p["p50_ms"] <= TARGET_P50_MS and p["wal_p50"] <= TARGET_WAL_BYTES
        checks.append([f"{p['phase']}, batch {p['batch']}",
                       f"{p['p50_ms']:.2f} ms, {p['wal_p50']:,.0f} B", "✅" if ok else "❌"])
    text += "\n" + table(f"Target: claim p50 ≤ {TARGET_P50_MS:g} ms and ≤ "
                         f"{TARGET_WAL_BYTES // 1024} KB of WAL (after the change)",
                         ["claims", "p50", "met"], checks)
    return text


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("bench.claim_cost", __doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    p.add_argument("--only", choices=["before", "after"], help="one schema only")
    p.add_argument("--plans", action="store_true",
                   help="print the plans of the first claim after the arrival (before ANALYZE)")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    results = []
    with servers() as srv:
        for schema in ("before", "after"):
            if args.only in (None, schema):
                print(f"… {schema}", flush=True)
                results.append(run_schema(srv, schema, size, args.plans))
    if not any(r["schema"] == "after" for r in results):
        results.append({"schema": "after", "phases": []})
    print(render(results, size))
    for r in results:
        if r.get("plans"):
            print(f"\nPlans of the first claim of 10 right after the arrival ({r['schema']}):\n")
            print("\n\n".join(r["plans"]))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
