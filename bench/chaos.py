"""The chaos run: hundreds of mixed tasks while workers, the bridge, Redis and
Postgres are killed and restarted; then count what was lost or done twice.

    .venv/bin/python -m bench.chaos            # 300 tasks, ~60 s of faults
    .venv/bin/python -m bench.chaos --quick    # 100 tasks, ~25 s of faults

Faults (short leases: LEASE_SECONDS=3, RESCUE_INTERVAL=1):
- every ~2 s one worker is killed with SIGKILL to its process group (prefork pool
  children die with it) and a replacement is started;
- the bridge is killed with SIGKILL and restarted a few times;
- Redis is killed with SIGKILL and restarted empty on the same port (every queued
  and unacknowledged message is gone);
- Postgres is stopped (fast shutdown) and started again once.

Rows arrive in batches throughout. At the end it prints: completed, failed, lost
(not completed or failed by the drain deadline: must be 0), completed twice (more
than one "Task <id> Completed successfully" log line, or a completion whose attempt
is not the row's: must be 0), tasks whose agent code ran more than once, and the
time to drain. Exit status 1 if anything was lost or completed twice.
"""

from __future__ import annotations

import collections
import contextlib
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bench.cli import bench_parser, write_json
from bench.handlers import read_runs
from bench.measure import table
from bench.stack import Proc, ProcGroup, Servers, base_env, servers

CHAOS_ENV = {
    "LEASE_SECONDS": "3",
    "RESCUE_INTERVAL": "1",
    "POLL_INTERVAL": "1",
    "HEARTBEAT_INTERVAL": "5",
    "AGENT_HANDLER": "bench.handlers:scripted",
    "AGENT_TIME_LIMIT": "60",
}
COMPLETED = re.compile(r"Task (\S+) Completed successfully\..*?attempt=(\d+)")
MAX_ATTEMPTS = 10  # rows may be interrupted several times; 3 (the default) would fail some


@dataclass
class ChaosPlan:
    """When what happens, in seconds from the start: `tasks` rows inserted `batch` at a time
    every `batch_every`; for `chaos_seconds` a worker killed every `worker_kill_every`, the
    bridge and Redis killed at their times, PostgreSQL stopped for `postgres_down_seconds`
    at its time; then every row must end within `drain_deadline` of the last fault.
    Each task's handler sleeps up to `max_sleep`."""

    tasks: int = 300
    batch: int = 20
    batch_every: float = 1.5
    chaos_seconds: float = 60.0
    worker_kill_every: float = 2.0
    bridge_kills_at: tuple[float, ...] = (7.0, 23.0, 41.0)
    redis_kills_at: tuple[float, ...] = (13.0, 47.0)
    postgres_restart_at: float = 31.0
    postgres_down_seconds: float = 3.0
    drain_deadline: float = 180.0
    max_sleep: float = 3.0

    @classmethod
    def quick(cls) -> ChaosPlan:
        return cls(tasks=100, batch=10, batch_every=1.5, chaos_seconds=25.0,
                   bridge_kills_at=(5.0, 17.0), redis_kills_at=(9.0,),
                   postgres_restart_at=13.0, drain_deadline=120.0)


@dataclass
class Log:
    began: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, kind: str, text: str) -> None:
        at = time.monotonic() - self.began
        self.events.append((at, text))
        self.counts[kind] += 1
        print(f"  [{at:6.1f}s] {text}", flush=True)


class Chaos:
    def __init__(self, srv: Servers, plan: ChaosPlan, seed: int) -> None:
        self.srv = srv
        self.plan = plan
        self.rng = random.Random(seed)
        self.db = srv.new_database("chaos")
        workdir = srv.workdir("chaos")
        self.state = workdir / "state"
        self.state.mkdir()
        self.state.chmod(0o777)
        env = base_env(db_url=self.db, redis_url=srv.redis_url, state_dir=self.state,
                       **CHAOS_ENV)
        self.group = ProcGroup(workdir, env)
        self.workers: list[Proc] = []
        self.bridge: Proc | None = None
        self.log = Log()
        self.inserted = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._kinds = [("prefork", 2), ("threads", 8)]
        self.killed_pids: set[int] = set()

    # Processes ------------------------------------------------------------------
    def start_worker(self, wait: bool = False) -> Proc:
        pool, concurrency = self._kinds[len(self.group.procs) % len(self._kinds)]
        proc = self.group.celery_worker("tasks", pool=pool, concurrency=concurrency, wait=wait)
        self.workers.append(proc)
        return proc

    def start_bridge(self, wait: bool = False) -> None:
        self.bridge = self.group.bridge(wait=wait)

    # Rows -----------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.db, autocommit=True, connect_timeout=2)
        return self._conn

    def insert_batch(self) -> None:
        n = min(self.plan.batch, self.plan.tasks - self.inserted)
        if n <= 0:
            return
        bodies = [Jsonb({"prompt": "chaos", "context": {
            "sleep": round(self.rng.uniform(0, self.plan.max_sleep), 2)}}) for _ in range(n)]
        try:
            self._connection().execute(
                "insert into public.agent_task_requests (request_payload, max_attempts) "
                "select b, %s from unnest(%s::jsonb[]) b", [MAX_ATTEMPTS, bodies])
        except psycopg.OperationalError:
            self._conn = None  # Postgres is down: this batch goes in on a later round
            return
        self.inserted += n

    def rows(self) -> list[dict[str, Any]]:
        with psycopg.connect(self.db, row_factory=dict_row) as conn:
            return conn.execute(
                "select id::text, status, attempts, max_attempts, error "
                "from public.agent_task_requests").fetchall()

    # The run --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        plan = self.plan
        print(f"chaos: {plan.tasks} tasks (sleep 0-{plan.max_sleep:g} s), faults for "
              f"{plan.chaos_seconds:g} s; " + " ".join(f"{k}={v}" for k, v in CHAOS_ENV.items()),
              flush=True)
        self.start_worker(wait=True)
        self.start_worker(wait=True)
        self.start_worker(wait=True)
        self.start_bridge(wait=True)
        self.log = Log()
        began = time.monotonic()
        next_batch = 0.0
        next_kill = plan.worker_kill_every
        bridge_kills = list(plan.bridge_kills_at)
        redis_kills = list(plan.redis_kills_at)
        pg_restart: float | None = plan.postgres_restart_at
        while True:
            now = time.monotonic() - began
            if now >= plan.chaos_seconds and self.inserted >= plan.tasks:
                break
            if now >= next_batch and self.inserted < plan.tasks:
                self.insert_batch()
                next_batch = now + plan.batch_every
            if now < plan.chaos_seconds:
                if now >= next_kill:
                    self.kill_worker()
                    next_kill = now + self.rng.uniform(0.75, 1.25) * plan.worker_kill_every
                if bridge_kills and now >= bridge_kills[0]:
                    bridge_kills.pop(0)
                    self.kill_bridge()
                if redis_kills and now >= redis_kills[0]:
                    redis_kills.pop(0)
                    self.kill_redis()
                if pg_restart is not None and now >= pg_restart:
                    pg_restart = None
                    self.restart_postgres()
            time.sleep(0.05)
        faults_over = time.monotonic()
        self.log.add("info", f"faults over; {self.inserted} rows inserted; draining")
        # Every fault is over: the stack is complete again (the workers started last
        # may still be booting) and must finish everything.
        deadline = faults_over + plan.drain_deadline
        final: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg.OperationalError):
                final = self.rows()
                if len(final) == plan.tasks and all(
                        r["status"] in ("completed", "failed") for r in final):
                    break
            time.sleep(0.25)
        drained = time.monotonic()
        final = self.rows()
        return self.verdict(final, began, faults_over, drained)

    def kill_worker(self) -> None:
        alive = [w for w in self.workers if w.alive()]
        if not alive:
            self.start_worker()
            return
        victim = self.rng.choice(alive)
        self.killed_pids.update(p.pid for p in victim.processes())
        victim.kill9()
        self.workers.remove(victim)
        self.start_worker()
        self.log.add("worker", f"kill -9 {victim.name} (pid {victim.pid}); replacement started")

    def kill_bridge(self) -> None:
        if self.bridge is not None:
            self.bridge.kill9()
            self.log.add("bridge", f"kill -9 {self.bridge.name}; restarting")
        self.start_bridge()

    def kill_redis(self) -> None:
        self.srv.redis.kill()
        self.log.add("redis", "kill -9 redis-server (every queued message lost)")
        time.sleep(0.5)
        self.srv.redis.start()
        self.log.add("info", "redis-server restarted empty on the same port")

    def restart_postgres(self) -> None:
        self.log.add("postgres", "Postgres stopping (fast shutdown)")
        self.srv.pg.stop()
        time.sleep(self.plan.postgres_down_seconds)
        self.srv.pg.start()
        self.log.add("info", "Postgres started again")

    # Counting -------------------------------------------------------------------
    def verdict(self, rows: list[dict[str, Any]], began: float, faults_over: float,
                drained: float) -> dict[str, Any]:
        by_status = collections.Counter(str(r["status"]) for r in rows)
        completions: collections.Counter[str] = collections.Counter()
        completion_attempt: dict[str, set[int]] = collections.defaultdict(set)
        for proc in self.group.procs:
            if not proc.name.startswith("worker"):
                continue
            for match in COMPLETED.finditer(proc.output):
                completions[match[1]] += 1
                completion_attempt[match[1]].add(int(match[2]))
        attempts = {str(r["id"]): int(r["attempts"]) for r in rows}
        completed_twice = sorted(t for t, c in completions.items() if c > 1)
        wrong_attempt = sorted(
            t for t, seen in completion_attempt.items()
            if t in attempts and (len(seen) != 1 or attempts[t] not in seen))
        all_runs = read_runs(self.state)
        runs = collections.Counter(task for task, _at, _pid, _attempt in all_runs)
        ran_again = {t: c for t, c in runs.items() if c > 1}
        # Why did a run happen again? Its previous run was in a process we killed, or not
        # (its lease ran out while Postgres was down, or its result could not be written).
        previous: dict[str, int] = {}
        after_kill = other = 0
        for task, _at, pid, _attempt in all_runs:
            if task in previous:
                if previous[task] in self.killed_pids:
                    after_kill += 1
                else:
                    other += 1
            previous[task] = pid
        lost = [r for r in rows if r["status"] not in ("completed", "failed")]
        missing = self.plan.tasks - len(rows)
        failed_types = collections.Counter(
            (r["error"] or {}).get("type", "?") for r in rows if r["status"] == "failed")
        completed_rows = {str(r["id"]) for r in rows if r["status"] == "completed"}
        return {
            "tasks": self.plan.tasks,
            "inserted": len(rows),
            "completed": by_status.get("completed", 0),
            "failed": by_status.get("failed", 0),
            "failed_by_type": dict(failed_types),
            "lost": len(lost) + missing,
            "lost_rows": [(str(r["id"]), r["status"], r["attempts"]) for r in lost][:20],
            "completed_twice": len(set(completed_twice) | set(wrong_attempt)),
            "completed_twice_ids": sorted(set(completed_twice) | set(wrong_attempt))[:20],
            "completed_without_log_line": len(completed_rows - set(completions)),
            "agent_code_ran_more_than_once": len(ran_again),
            "extra_agent_runs": sum(c - 1 for c in ran_again.values()),
            "extra_runs_after_worker_kill": after_kill,
            "extra_runs_other": other,
            "never_ran_but_completed": len(completed_rows - set(runs)),
            "attempts_histogram": dict(sorted(collections.Counter(attempts.values()).items())),
            "faults": dict(self.log.counts),
            "fault_seconds": round(faults_over - began, 1),
            "drain_seconds_after_faults": round(drained - faults_over, 1),
            "total_seconds": round(drained - began, 1),
            "events": [(round(at, 1), text) for at, text in self.log.events],
        }

    def stop(self) -> None:
        self.group.stop_all()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()


def render(r: dict[str, Any]) -> str:
    ok_lost = "✅" if r["lost"] == 0 else "❌"
    ok_twice = "✅" if r["completed_twice"] == 0 else "❌"
    faults = ", ".join(f"{k} {v}" for k, v in r["faults"].items() if k != "info")
    rows = [
        ["tasks inserted", f"{r['inserted']} of {r['tasks']}", ""],
        ["faults injected", faults, ""],
        ["completed", r["completed"], ""],
        ["failed", r["failed"], ", ".join(f"{k}: {v}" for k, v in
                                          r["failed_by_type"].items()) or ""],
        ["lost (not completed/failed by the deadline)", r["lost"], ok_lost + " must be 0"],
        ["completed twice", r["completed_twice"], ok_twice + " must be 0"],
        ["completed rows without a completion log line (worker killed after commit)",
         r["completed_without_log_line"], ""],
        ["tasks whose agent code ran more than once", r["agent_code_ran_more_than_once"],
         f"{r['extra_agent_runs']} extra runs: {r['extra_runs_after_worker_kill']} after "
         f"the previous run's worker was killed, {r['extra_runs_other']} other"],
        ["rows by attempts", ", ".join(f"{k}: {v}" for k, v in
                                       r["attempts_histogram"].items()), ""],
        ["fault phase", f"{r['fault_seconds']} s", ""],
        ["time to drain after the last fault", f"{r['drain_seconds_after_faults']} s", ""],
        ["total", f"{r['total_seconds']} s", ""],
    ]
    return table("Chaos run", ["", "value", ""], rows)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench.chaos", __doc__)
    p.add_argument("--quick", action="store_true", help="100 tasks, ~25 s of faults")
    p.add_argument("--tasks", type=int, help="number of tasks (default 300, quick 100)")
    p.add_argument("--max-queued", type=int,
                   help="BRIDGE_MAX_QUEUED for the bridge (default: the bridge's own, 200)")
    p.add_argument("--seed", type=int, default=7, help="random seed for sleeps and victims")
    p.add_argument("--workdir", type=Path, help="keep data and logs here (default: temp dir)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    plan = ChaosPlan.quick() if args.quick else ChaosPlan()
    if args.tasks:
        plan.tasks = args.tasks
    if args.max_queued:
        CHAOS_ENV["BRIDGE_MAX_QUEUED"] = str(args.max_queued)
    with servers(args.workdir) as srv:
        chaos = Chaos(srv, plan, args.seed)
        try:
            result = chaos.run()
        finally:
            chaos.stop()
    print()
    print(render(result))
    if result["lost_rows"]:
        print("lost rows (id, status, attempts):", result["lost_rows"])
    if result["completed_twice_ids"]:
        print("completed twice:", result["completed_twice_ids"])
    write_json(args.json, result)
    return 1 if result["lost"] or result["completed_twice"] else 0


if __name__ == "__main__":
    sys.exit(main())
