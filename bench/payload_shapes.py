"""`python -m bench.payload_shapes`: database CPU per insert for the worst payload shapes.

A signed-in user's insert of payloads up to the size limit (1 MiB as stored,
`agent_bridge.payload_bytes`) and a few beyond it: wide objects, deep arrays and objects,
many small containers, long strings, numbers. Each shape "within the limit" is grown to the
largest that fits the limit as stored (for small containers that is about a quarter of
1 MiB of JSON text); "(1 MiB of text)" shapes are the same at 1 MiB of JSON text, which the
limit now refuses, as the issue's 992 KB of 7,812 arrays is. For each, the backend's own
CPU time (from /proc/<pid>/schedstat, read around the statement; this needs the database
on this machine, as the embedded one is) for:

- `parse`: `select $1::jsonb`, what PostgreSQL spends reading the JSON before any trigger;
- `insert, before`: the insert with the payload checks of schema version 3 (the
  level-by-level depth walker, a raised error for a payload too large or too deep),
  re-created in a second database of the same server, same run;
- `insert, after`: the insert as it is now (one jsonpath walk; a failed row);
- `depth check` and `size check` alone, on the stored value: the old walker against the
  jsonpath walk, and `octet_length(payload::text)` (the old size check; the new one reads
  the value's header).

Every statement runs as a signed-in user (`authenticated` with JWT claims, as PostgREST
sets them) inside a transaction that is rolled back, so nothing is kept and no budget runs
out. Median of --repeat runs after one warm-up.

    .venv/bin/python -m bench.payload_shapes              # ~2 min on 2 cores
    .venv/bin/python -m bench.payload_shapes --repeat 3   # quicker
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.cli import bench_parser, write_json
from bench.measure import table
from bench.sql import bench_sql
from bench.stack import servers

TARGET_MS = 50.0  # issue 20: any payload up to the size limit accepted or refused within this

# Schema version 3's payload checks (20261124000000 and 20261130000100), for comparison only.
OLD_CHECK_REQUEST = bench_sql("old_check_request")
OLD_CHECK_SHAPE = bench_sql("old_check_shape")
OLD_WALKER = bench_sql("old_walker")  # the walker alone: public.bench_old_too_deep(doc, depth)
NEW_DEPTH = ("""select jsonb_path_exists(p, 'lax $.**{64}.type() ? (@ == "object" || """
             """@ == "array")') from bench_payload""")


def chain(depth: int) -> str:
    return "[" * depth + "]" * depth


def fill(piece: str, budget: int, head: str = '{"a": [', tail: str = "]}") -> str:
    """head + as many `piece`s as fit in `budget` bytes + tail, written as PostgreSQL
    writes jsonb out (", " between elements), the text the size limit measures."""
    n = max(1, (budget - len(head) - len(tail) + 2) // (len(piece) + 2))
    return head + ", ".join([piece] * n) + tail


Shape = Callable[[int], str]  # the payload's JSON text for a budget of text bytes


def deep_arrays(depth: int) -> Shape:
    return lambda budget: fill(chain(depth), budget)


def shapes(limit: int) -> dict[str, tuple[Shape, bool]]:
    """The payloads: JSON text (in jsonb's own output format) for a budget of text bytes,
    and whether the shape is to be grown to the largest within the size limit."""
    def keys(budget: int) -> int:
        return budget // len('"k000000": 000000, ')

    return {
        "long string": (lambda b: json.dumps({"prompt": "x" * (b - 20)}), True),
        "wide object (one level, many keys)": (
            lambda b: json.dumps({f"k{i:06d}": i for i in range(keys(b))}), True),
        "many empty objects": (lambda b: fill("{}", b), True),
        "many one-key objects": (lambda b: fill('{"k": 1}', b), True),
        "many [[]]": (lambda b: fill("[[]]", b), True),
        "numbers": (lambda b: fill("1.5", b), True),
        "arrays 62 deep (accepted: 64 levels)": (deep_arrays(62), True),
        "arrays 63 deep (too deep)": (deep_arrays(63), True),
        "one object chain 64 deep (accepted)": (
            lambda b: '{"a": ' * 63 + "1" + "}" * 63, False),
        "one array chain 10,000 deep (too deep)": (
            lambda b: '{"a": ' + chain(9_999) + "}", False),
        "many [[]] (1 MiB of text)": (lambda b: fill("[[]]", limit - 64), False),
        "7,812 arrays 63 deep, the issue's (1 MiB of text)": (
            lambda b: '{"a": [' + ", ".join([chain(63)] * 7812) + "]}", False),
        "long string over the limit (too large)": (
            lambda b: json.dumps({"prompt": "x" * (limit + 50_000)}), False),
    }


def grown(shape: Shape, limit: int, conn: psycopg.Connection[Any]) -> str:
    """The shape at the largest text budget whose stored size is within `limit`."""
    def stored(text: str) -> int:
        row = conn.execute("select pg_column_size(%s::jsonb)", [text]).fetchone()
        assert row is not None
        return int(row[0])
    low, high = 64, limit  # stored size is at least the text's length, less a little
    while high - low > 256:
        mid = (low + high) // 2
        low, high = (mid, high) if stored(shape(mid)) <= limit else (low, mid)
    return shape(low)


class Backend:
    """One connection and its server process's CPU clock."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)
        row = self.conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        self.pid = int(row[0])
        self.conn.rollback()
        self.schedstat = Path(f"/proc/{self.pid}/schedstat")
        if not self.schedstat.exists():
            raise SystemExit("the database must run on this machine (/proc/<pid>/schedstat)")

    def cpu_ms(self) -> float:
        return int(self.schedstat.read_text().split()[0]) / 1e6

    def as_user(self) -> None:
        """Begin a transaction as a new signed-in user, the way PostgREST does."""
        self.conn.execute("set local role authenticated")
        self.conn.execute("select set_config('request.jwt.claims', %s, true)",
                          [json.dumps({"role": "authenticated", "sub": str(uuid.uuid4())})])

    def measure(self, run: Callable[[psycopg.Connection[Any]], str], repeat: int
                ) -> tuple[float, str]:
        """Median CPU ms of `run` (inside a rolled-back transaction) and what it returned."""
        times: list[float] = []
        outcome = ""
        for i in range(repeat + 1):
            self.as_user()
            before = self.cpu_ms()
            try:
                outcome = run(self.conn)
            except psycopg.Error as exc:
                outcome = f"error {exc.diag.sqlstate}"
            spent = self.cpu_ms() - before
            self.conn.rollback()
            if i:  # the first is a warm-up (the backend grows its memory once)
                times.append(spent)
        return statistics.median(times), outcome

    def close(self) -> None:
        self.conn.close()


def insert(text: str) -> Callable[[psycopg.Connection[Any]], str]:
    def run(conn: psycopg.Connection[Any]) -> str:
        row = conn.execute("insert into public.agent_task_requests (request_payload) "
                           "values (%s::jsonb) returning status, error ->> 'type'",
                           [text]).fetchone()
        assert row is not None
        return str(row[0]) + (f" ({row[1]})" if row[1] else "")
    return run


def query(statement: str, params: list[Any] | None = None
          ) -> Callable[[psycopg.Connection[Any]], str]:
    def run(conn: psycopg.Connection[Any]) -> str:
        row = conn.execute(statement, params).fetchone()
        return str(row[0]) if row else ""
    return run


def setup(url: str, old: bool) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        # The bench inserts as many users; no quota or budget is in the way.
        conn.execute("update public.agent_tenant_limits set max_active = null, "
                     "max_rows_per_day = null, max_request_bytes_per_day = null "
                     "where tenant = '*'")
        conn.execute(OLD_WALKER)
        conn.execute("grant execute on function public.bench_old_too_deep(jsonb, integer) "
                     "to authenticated")
        conn.execute("create table if not exists public.bench_payload (p jsonb)")
        conn.execute("grant select on public.bench_payload to authenticated")
        if old:
            conn.execute(OLD_CHECK_REQUEST)
            conn.execute(OLD_CHECK_SHAPE)


def run(repeat: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with servers() as srv:
        after_url = srv.new_database("shapes_after")
        before_url = srv.new_database("shapes_before")
        setup(after_url, old=False)
        setup(before_url, old=True)
        after, before = Backend(after_url), Backend(before_url)
        limit = 1048576
        try:
            for name, (shape, grow) in shapes(limit).items():
                with psycopg.connect(after_url, autocommit=True) as conn:
                    text = grown(shape, limit, conn) if grow else shape(limit)
                    row = conn.execute("select pg_column_size(%s::jsonb)", [text]).fetchone()
                    assert row is not None
                    stored = int(row[0])
                print(f"… {name} ({len(text):,} bytes of text, {stored:,} stored)", flush=True)
                with psycopg.connect(after_url, autocommit=True) as conn:
                    conn.execute("truncate public.bench_payload")
                    conn.execute("insert into public.bench_payload values (%s::jsonb)", [text])
                    conn.execute("select count(*) from public.bench_payload")  # detoast warm
                parse, _ = after.measure(query("select %s::jsonb is not null", [text]), repeat)
                ins_before, out_before = before.measure(insert(text), repeat)
                ins_after, out_after = after.measure(insert(text), repeat)
                old_depth, old_says = after.measure(query(
                    "select public.bench_old_too_deep(p, 64) from public.bench_payload"), repeat)
                new_depth, new_says = after.measure(query(NEW_DEPTH), repeat)
                size_check, text_bytes = after.measure(query(
                    "select octet_length(p::text) from public.bench_payload"), repeat)
                assert old_says == new_says, (name, old_says, new_says)
                results.append({
                    "shape": name, "bytes": int(text_bytes), "stored": stored,
                    "parse_ms": parse,
                    "insert_before_ms": ins_before, "before": out_before,
                    "insert_after_ms": ins_after, "after": out_after,
                    "old_depth_ms": old_depth, "new_depth_ms": new_depth,
                    "size_check_ms": size_check, "too_deep": new_says == "True"})
        finally:
            after.close()
            before.close()
    return results


def render(results: list[dict[str, Any]], repeat: int) -> str:
    rows = [[r["shape"], f"{r['bytes'] / 1024:,.0f}", f"{r['stored'] / 1024:,.0f}",
             r["parse_ms"], r["insert_before_ms"],
             r["before"], r["insert_after_ms"], r["after"],
             r["insert_after_ms"] - r["parse_ms"], r["old_depth_ms"], r["new_depth_ms"],
             r["size_check_ms"]] for r in results]
    fits = [r for r in results if r["stored"] <= 1048576]
    worst = max(fits, key=lambda r: r["insert_after_ms"])
    worst_checks = max(fits, key=lambda r: r["new_depth_ms"] + r["size_check_ms"])
    lines = [table(
        f"Database CPU per insert by a signed-in user, median of {repeat} (ms)",
        ["payload", "KiB of text", "KiB stored", "parse only", "insert, before", "before",
         "insert, after", "after", "after − parse", "depth check, old walker",
         "depth check, jsonpath", "size check (::text)"], rows),
        f"Worst insert within the size limit: {worst['insert_after_ms']:.1f} ms "
        f"({worst['shape']}; parsing alone {worst['parse_ms']:.1f} ms). "
        f"Worst checks (depth + size) within the limit: "
        f"{worst_checks['new_depth_ms'] + worst_checks['size_check_ms']:.1f} ms "
        f"({worst_checks['shape']}); target {TARGET_MS:g} ms.\n"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench.payload_shapes", __doc__)
    p.add_argument("--repeat", type=int, default=5, help="measured runs per figure (default 5)")
    args = p.parse_args(argv)
    began = time.monotonic()
    results = run(max(1, args.repeat))
    print()
    print(render(results, max(1, args.repeat)))
    print(f"({os.cpu_count()} CPUs; {time.monotonic() - began:.0f} s)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
