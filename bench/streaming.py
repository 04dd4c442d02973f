"""`python -m bench.streaming`: what a streamed answer costs the database and Realtime.

On a throwaway stack (embedded PostgreSQL, its own Redis, a real bridge and one worker
`-P threads -c 200`, direct mode), `n` tasks (inserted over 5 s) stream at once, each
`tokens` tokens at a chat model's pace (`seconds` for the whole answer, ~5 characters of
random words a token), reported the
way the OpenAI handler reports them (the text so far, every 50 ms; the worker keeps at
most one write per AGENT_PROGRESS_INTERVAL=0.25 s of them). Three ways, same handler:

- `none`: the handler streams but reports nothing: the task's own cost (claim, start,
  lease, complete), subtracted from the two others;
- `rewrite` (before issue 15): each write rewrites the row's response_payload with the
  whole answer so far (`{"answer", "partial", "v"}`, a shape the worker does not append);
- `append` (now): each write appends the new text as a row of agent_task_chunks.

Per streamed answer: WAL bytes (pg_current_wal_lsn() before and after, minus `none`),
row UPDATEs of agent_task_requests and INSERTs into agent_task_chunks (pg_stat_user_tables,
read after the processes exit; each is one Realtime message to the task's subscriber), and
the first partial's latency: the handler's first token (wall clock) to the NOTIFY of the
first write's commit, when Realtime could see it (a bench-only trigger). Every mode runs
at two answer lengths, to show linear against quadratic growth.

    .venv/bin/python -m bench.streaming            # ~4 min on 2 cores
    .venv/bin/python -m bench.streaming --quick
"""

from __future__ import annotations

import json
import random
import string
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.cli import bench_parser, write_json
from bench.handlers import note_time
from bench.measure import summary_ms, table, wait_until
from bench.sql import bench_sql
from bench.stack import ProcGroup, Servers, base_env, servers

FIRST = "first_token.log"
REPORT_EVERY = 0.05  # seconds between two reports of the handler (the OpenAI handler: 0.25)
START_OVER = 5.0  # seconds over which the tasks are inserted (streams start at a steady rate)



# The handler (AGENT_HANDLER=bench.streaming:tokens) ------------------------------------

def tokens(task: dict[str, Any]) -> dict[str, Any]:
    """Streams context `tokens` tokens over `seconds`; `mode` none / rewrite / append."""
    from tasks import report_progress

    context = task["request_payload"].get("context") or {}
    count, seconds, mode = int(context["tokens"]), float(context["seconds"]), context["mode"]
    pace = seconds / count
    # Words of 1-8 random letters: text that compresses about as well as prose (TOAST's
    # pglz would shrink a repeated vocabulary to nothing and hide the rewrite's cost).
    rng = random.Random(task["id"])
    parts: list[str] = []
    started = time.monotonic()
    last_report = float("-inf")
    for i in range(count):
        due = started + i * pace
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8)))
        parts.append(("" if i == 0 else " ") + word)
        if i == 0:
            note_time(FIRST, task["id"])
        now = time.monotonic()
        if mode != "none" and (i == count - 1 or now - last_report >= REPORT_EVERY):
            last_report = now
            answer = "".join(parts)
            report_progress({"answer": answer, "partial": True} if mode == "append"
                            else {"answer": answer, "partial": True, "v": 1})
    return {"answer": "".join(parts)}


# One run ------------------------------------------------------------------------------

def _times(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    return {line.split()[0]: float(line.split()[1]) for line in path.read_text().splitlines()}


def _scalar(db: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _counters(db: str) -> dict[str, int]:
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute("select relname, n_tup_ins, n_tup_upd from pg_stat_user_tables "
                            "where relname in ('agent_task_requests', 'agent_task_chunks')"
                            ).fetchall()
    found = {name: (ins, upd) for name, ins, upd in rows}
    return {"row_updates": int(found.get("agent_task_requests", (0, 0))[1]),
            "chunk_inserts": int(found.get("agent_task_chunks", (0, 0))[0])}


def run(s: Servers, mode: str, n: int, count: int, seconds: float) -> dict[str, Any]:
    db = s.new_database(f"stream_{mode}")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(bench_sql("first_write_triggers").encode())  # NOTIFY on first writes
    workdir = s.workdir(f"stream-{mode}-{count}")
    state = workdir / "state"
    state.mkdir()
    env = base_env(db_url=db, redis_url=s.redis_url, state_dir=state,
                   AGENT_HANDLER="bench.streaming:tokens", BRIDGE_BATCH_SIZE=str(n),
                   BRIDGE_MAX_QUEUED=str(2 * n), POLL_INTERVAL="0.5",
                   AGENT_PROGRESS_INTERVAL="0.25", LEASE_SECONDS="300")
    group = ProcGroup(workdir, env)
    seen: dict[str, float] = {}
    stop = threading.Event()

    def listen() -> None:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("listen bench_first")
            while not stop.is_set():
                for note in conn.notifies(timeout=0.2):
                    seen.setdefault(note.payload, time.time())

    listener = threading.Thread(target=listen, daemon=True)
    try:
        group.celery_worker("tasks", pool="threads", concurrency=n)
        group.bridge()
        listener.start()
        time.sleep(1.0)
        before = _counters(db)
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("checkpoint")
        lsn0 = _scalar(db, "select pg_current_wal_lsn()::text")
        payload = Jsonb({"prompt": "bench", "context": {"tokens": count, "seconds": seconds,
                                                        "mode": mode}})
        batches = 20
        with psycopg.connect(db, autocommit=True) as conn:
            for b in range(batches):
                conn.execute("insert into public.agent_task_requests (status, request_payload) "
                             "select 'pending', %s from generate_series(1, %s)",
                             [payload, n // batches + (1 if b < n % batches else 0)])
                time.sleep(START_OVER / batches)
        wait_until(lambda: _scalar(db, "select count(*) from public.agent_task_requests "
                                       "where status in ('completed', 'failed')") >= n,
                   seconds * 6 + 120, interval=0.2, what="every task to finish")
        wal = int(_scalar(db, "select pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)",
                          [lsn0]))
        failed = _scalar(db, "select count(*) from public.agent_task_requests "
                             "where status <> 'completed'")
        left = _scalar(db, "select count(*) from public.agent_task_chunks")
        chars = _scalar(db, "select avg(length(response_payload->>'answer')) "
                            "from public.agent_task_requests")
    finally:
        stop.set()
        group.stop_all()  # the backends exit and flush their table statistics
        s.flush_redis()
    time.sleep(1.0)
    after = _counters(db)
    first = _times(state / FIRST)
    latency = [seen[t] - first[t] for t in first if t in seen]
    return {"mode": mode, "tasks": n, "tokens": count, "seconds": seconds,
            "answer_chars": float(chars or 0), "failed": int(failed), "chunks_left": int(left),
            "wal_bytes": wal / n,
            "row_updates": (after["row_updates"] - before["row_updates"]) / n,
            "chunk_inserts": (after["chunk_inserts"] - before["chunk_inserts"]) / n,
            "first_partial": summary_ms(latency) if latency else None}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench.streaming", __doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--tasks", type=int, default=200, help="streams at once (default 200)")
    args = p.parse_args(argv)
    n = 20 if args.quick else args.tasks
    # (tokens, seconds): the same pace, 133 tokens/s, at two lengths.
    lengths = [(200, 1.5), (800, 6.0)] if args.quick else [(500, 3.75), (2000, 15.0)]
    results: list[dict[str, Any]] = []
    with servers() as s:
        for count, seconds in lengths:
            for mode in ("none", "rewrite", "append"):
                results.append(run(s, mode, n, count, seconds))
                print(json.dumps(results[-1]), flush=True)
    base = {r["tokens"]: r for r in results if r["mode"] == "none"}
    rows = []
    for r in results:
        if r["mode"] == "none":
            continue
        b = base[r["tokens"]]
        fp = r["first_partial"] or {}
        rows.append([r["mode"], r["tokens"], r["answer_chars"],
                     (r["wal_bytes"] - b["wal_bytes"]) / 1024,
                     r["row_updates"] - b["row_updates"], r["chunk_inserts"],
                     r["row_updates"] - b["row_updates"] + r["chunk_inserts"],
                     fp.get("p50"), fp.get("p95"), fp.get("max")])
    print(table(f"per streamed answer, {n} streams at once (minus a task that streams nothing)",
                ["mode", "tokens", "chars", "WAL KiB", "row UPDATEs", "chunk INSERTs",
                 "Realtime msgs", "1st partial p50 ms", "p95", "max"], rows))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
