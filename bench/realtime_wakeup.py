"""`python -m bench.realtime_wakeup`: Supabase mode (SUPABASE_URL + service key only),
insert → handler started, with Realtime wake-ups (SUPABASE_REALTIME=true) over Broadcast
(the insert trigger's message on `agent_bridge:wakeups`) and over postgres_changes, beside
poll-only (POLL_INTERVAL 2 s), same run, against the stand-ins: the PostgREST and Realtime
stand-ins behind one gateway (tests/fakes/gateway.py), not a real Supabase.

    .venv/bin/python -m bench.realtime_wakeup            # 40 tasks each (~2 min)
    .venv/bin/python -m bench.realtime_wakeup --n 10     # smoke run

Inserts arrive one at a time at a random phase of the poll cycle (0-2 s apart), so the
poll-only figure is an honest average wait, not a best case.
"""

from __future__ import annotations

import random
from typing import Any

import psycopg

from bench.benchmarks import DoneListener, Inserter, latency_run, latency_summary, payload
from bench.cli import bench_parser, write_json
from bench.stack import ProcGroup, Servers, base_env, servers
from tests.fakes.gateway import StandIns

MODES = ("broadcast", "postgres_changes", "poll-only")


def measure(s: Servers, *, mode: str, n: int) -> dict[str, Any]:
    db = s.new_database("rtwake")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("update agent_bridge.realtime_broadcast set enabled = %s",
                     [mode == "broadcast"])
    standins = StandIns(db)
    url = standins.start()
    realtime = mode != "poll-only"
    workdir = s.workdir(f"rtwake-{mode}")
    state = workdir / "state"
    state.mkdir()
    state.chmod(0o777)
    env = base_env(redis_url=s.redis_url, state_dir=state, AGENT_HANDLER="bench.handlers:noop",
                   BRIDGE_TRANSPORT="supabase", SUPABASE_URL=url,
                   SUPABASE_SERVICE_KEY=standins.service_key, POLL_INTERVAL="2",
                   SUPABASE_REALTIME="true" if realtime else "false")
    group = ProcGroup(workdir, env)
    inserter = Inserter(db)
    listener = DoneListener(db)
    try:
        group.celery_worker("tasks", pool="prefork", concurrency=2)
        bridge = group.bridge()
        if realtime:
            path = "Broadcast" if mode == "broadcast" else "postgres_changes"
            bridge.wait_for_output(f"Waking on Supabase Realtime {path}", 60)
        latency_run(lambda: inserter.one(payload("warmup")), listener, 2, lambda: 0.2, 30)
        samples = latency_run(lambda: inserter.one(payload("rtwake")), listener, n,
                              lambda: random.uniform(0.0, 2.0), 30)
        result = latency_summary(samples, state)
    finally:
        listener.close()
        inserter.close()
        group.stop_all()
        s.flush_redis()
        standins.stop()
    return {"mode": mode, "n": n, **result}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("bench.realtime_wakeup", __doc__)
    parser.add_argument("--n", type=int, default=40, help="tasks per mode")
    args = parser.parse_args(argv)
    with servers() as s:
        results = [measure(s, mode=mode, n=args.n) for mode in MODES]
    print("| Supabase mode | started p50 | p99 | completed p50 |")
    print("| --- | --- | --- | --- |")
    for r in results:
        started, completed = r["started_ms"], r["completed_ms"]
        print(f"| {r['mode']} | {started['p50']:.0f} ms | {started['p99']:.0f} ms | "
              f"{completed['p50']:.0f} ms |")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
