"""`python -m bench.realtime_broadcast`: many people watching answers grow, over Realtime
Broadcast and over postgres_changes (issue 24), against the Realtime stand-in
(tests/fakes/realtime.py, a Python look-alike of Supabase Realtime, not the real server) on
the embedded PostgreSQL.

    .venv/bin/python -m bench.realtime_broadcast                  # 1,000 streams, ~3 min
    .venv/bin/python -m bench.realtime_broadcast --streams 100    # a smaller run

Per path, on a fresh database: `--streams` task rows, each owned by its own user and
watched by one subscriber on a socket of its own, speaking realtime-js' protocol (vsn 2.0.0)
as `watchAgentTask` (clients/js/src/channel.ts) joins:

- `broadcast` (agent_bridge.realtime_broadcast on): the private channel `agent_task:<id>`,
  events `state` and `chunk`; Realtime checks the user once, at join. Nobody follows
  postgres_changes here, and Realtime reads a project's changes only for its postgres_changes
  subscribers, so the two tables leave the stand-in's publication for this run (the stand-in
  would otherwise log and read back every change of them, for nobody).
- `postgres_changes` (off): UPDATEs of the row (`id=eq.<id>`) and INSERTs of its chunks
  (`task_id=eq.<id>`); Realtime checks each change against RLS for its subscriber (by the
  primary key, as walrus does).

Then, measured: the rows are claimed (one call, as the bridge does) and started, and every
stream writes as the worker does: every AGENT_STREAM_INTERVAL (`--interval`, 0.1 s) one
group-commit call (tasks.writer.GroupWriter, public.agent_tasks_write) appends a piece of
text to every stream (five random words), for `--seconds`; then each task completes with
its whole answer (which deletes its chunks). The subscribers rebuild the answer from the
pieces (by seq and offset) and compare it, and the final state's answer, with what was
written. A topic's messages arrive in commit order, so a subscriber is done at its final
state; the run waits at most `--drain` seconds after the last write for every final state
(less once nothing has arrived for QUIET_S), and reports what had not arrived by then.

Per path: messages the database produced for the subscribers and how many arrived, their
lag (the commit of the write → the subscriber), messages/s; per message, from
pg_stat_statements (`track = 'all'`), pg_stat_database and the WAL (bench.measure, from a
CHECKPOINT before the claim to the drain): statements, RLS checks (the stand-in's
counters), WAL bytes (per relation: pg_walinspect), Postgres CPU (backends told apart by
application_name). The stand-in logs each change into a table of its own and reads it back
(real Realtime decodes the WAL instead): those statements and that WAL are shown apart. The
stand-in runs in a process of its own, so its CPU is measured apart; its delivery rate is
one Python process's, not Realtime's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import string
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg.types.json import Jsonb
from websockets.asyncio.client import ClientConnection, connect

from bench import benchmarks as b
from bench.benchmarks import count_everything, dbname_of, snapshot_after_settling
from bench.cli import bench_parser, write_json
from bench.measure import (
    OWN,
    ResourceSampler,
    db_cost,
    db_snapshot,
    own_process,
    postgres_backends,
    summary_ms,
    table,
    wait_backends_gone,
)
from bench.stack import BIN, Proc, Servers, base_env, servers
from bridge.names import TASK_TOPIC_PREFIX
from bridge.store import TaskStore, Write
from bridge.store.postgres import PostgresTransport
from tasks.writer import GroupWriter
from tests.fakes.jwt import role_key, user_token
from tests.fakes.realtime import RealtimeStub
from tests.sockets import decode

PATHS = ("broadcast", "postgres_changes")
PLANS = (("Free", 100), ("Pro", 500), ("Team", 2500))  # Realtime messages/s per project
STANDIN_APP = "realtime-standin"  # application_name of the stand-in's connections
WRITER_APP = "agent-bridge-writer"  # ... of the worker-like writer's
READY = "REALTIME_STANDIN_READY"
WORKER = "bench-worker"
LEASE_SECONDS = 30.0  # LEASE_SECONDS' default; renewed every third of it, as the worker does
HEARTBEAT_S = 25.0  # realtime-js' heartbeatIntervalMs
CONNECTING = 50  # sockets opening at once
QUIET_S = 20.0  # the drain gives up once no subscriber got anything for this long
WORDS_PER_PIECE = 5  # ~5 tokens per 0.1 s: a chat model's pace
CPU_WRITER = "postgres: the writer's backends"
CPU_STANDIN = "postgres: the stand-in's backends"
CPU_STANDIN_PROCESS = "Realtime stand-in (Python)"

# Who ran a statement, from pg_stat_statements: the worker-like writer sends only calls of
# public.agent_tasks_* (top-level); every other top-level statement is the stand-in's, that
# is Realtime's (RLS checks with their transactions), or the stand-in's own change log
# (it stands for Realtime's reading of the WAL: not in Supabase); nested statements run
# inside the writes (triggers, realtime.send) unless they are that log's.
WRITES = "agent-bridge: the writes, their triggers, realtime.send"
REALTIME = "Realtime: RLS checks and their transactions"
STANDIN_LOG = "stand-in's change log (not in Supabase)"
STANDIN_LOG_MARKS = ("realtime_stub", "log_id::text")
WRITER_CALLS = "public.agent_tasks_"


def statement_class(query: str, toplevel: bool) -> str:
    """WRITES, REALTIME or STANDIN_LOG, for a pg_stat_statements entry."""
    text = query.lower()
    if any(mark in text for mark in STANDIN_LOG_MARKS):
        return STANDIN_LOG
    if toplevel and WRITER_CALLS not in text:
        return REALTIME
    return WRITES


def rebuild(pieces: dict[int, tuple[int, str]]) -> str | None:
    """The answer the pieces (seq -> (answer_offset, text)) make, as the client does:
    answer[:offset] + text in seq order; None if a piece is missing."""
    answer = ""
    for expected, seq in enumerate(sorted(pieces)):
        if seq != expected:
            return None
        offset, text = pieces[seq]
        if offset > len(answer):
            return None
        answer = answer[:offset] + text
    return answer


def streams_carried(limit: float, per_stream: float) -> int:
    """How many streams of `per_stream` messages/s fit under `limit` messages/s."""
    return int(limit // per_stream) if per_stream > 0 else 0


# The stand-in in a process of its own ---------------------------------------------------

def serve_standin(database_url: str) -> None:
    """Child process: the Realtime stand-in on `database_url` until SIGTERM."""
    stub = RealtimeStub(database_url)
    print(f"{READY} {stub.start()}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    stub.stop()


class StandIn:
    """The stand-in's process; `stats()` reads its counters (GET /control/stats)."""

    def __init__(self, s: Servers, db: str, workdir: Path) -> None:
        env = base_env(redis_url=s.redis_url, PGAPPNAME=STANDIN_APP)
        self.proc = Proc("realtime", [str(BIN / "python"), "-m", "bench.realtime_broadcast",
                                      "--serve-standin", db],
                         env, workdir / "realtime.log")
        self.proc.wait_for_output(READY, 60)
        line = next(x for x in self.proc.output.splitlines() if x.startswith(READY))
        _, self.url = line.split(" ", 1)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/control/stats", timeout=30) as answer:
            stats: dict[str, Any] = json.loads(answer.read())
        stats.pop("active_topics", None)
        return stats

    def ws_url(self, key: str) -> str:
        return self.url.replace("http://", "ws://") + f"/realtime/v1/websocket?apikey={key}" \
            "&vsn=2.0.0"


# The subscribers -------------------------------------------------------------------------

@dataclass
class Watch:
    """One subscriber following one task, and what it got."""

    task_id: str
    user_id: str
    pieces: dict[int, tuple[int, str]] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)  # seq -> time.time()
    final: str | None = None  # the completed state's answer
    final_at: float = 0.0
    first_state_at: float = 0.0  # the claim's state (processing), the first message
    messages: int = 0
    duplicates: int = 0
    last_at: float = 0.0
    error: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def join_message(self, path: str) -> list[Any]:
        """phx_join as realtime-js sends it for watchAgentTask's channel."""
        if path == "broadcast":
            topic, changes, private = TASK_TOPIC_PREFIX + self.task_id, [], True
        else:
            topic, private = f"agent-task-{self.task_id}", False
            changes = [{"event": "UPDATE", "schema": "public", "table": "agent_task_requests",
                        "filter": f"id=eq.{self.task_id}"},
                       {"event": "INSERT", "schema": "public", "table": "agent_task_chunks",
                        "filter": f"task_id=eq.{self.task_id}"}]
        return ["1", "1", f"realtime:{topic}", "phx_join", {
            "config": {"broadcast": {"ack": False, "self": False},
                       "presence": {"key": "", "enabled": False},
                       "postgres_changes": changes, "private": private},
            "access_token": user_token(self.user_id)}]

    def on_frame(self, path: str, frame: str | bytes) -> None:
        _, ref, _, event, body = decode(frame)
        now = time.time()
        if event == "phx_reply" and ref == "1":
            if body.get("status") != "ok":
                self.error = f"join refused: {body.get('response')}"
                self.ready.set()
            elif path == "broadcast":
                self.ready.set()
            return
        if event == "system":  # "Subscribed to PostgreSQL", or why not
            if body.get("status") != "ok":
                self.error = f"subscription refused: {body.get('message')}"
            self.ready.set()
            return
        if event == "broadcast":
            kind, payload = body.get("event"), body.get("payload") or {}
        elif event == "postgres_changes":
            data = body.get("data") or {}
            kind = "chunk" if data.get("table") == "agent_task_chunks" else "state"
            payload = data.get("record") or {}
        else:
            return
        self.messages += 1
        self.last_at = now
        if kind == "chunk":
            seq = int(payload["seq"])
            if seq in self.pieces:
                self.duplicates += 1
            self.pieces[seq] = (int(payload["answer_offset"]), str(payload["text"]))
            self.arrived.setdefault(seq, now)
        elif kind == "state":
            self.first_state_at = self.first_state_at or now
            if payload.get("status") == "completed":
                self.final = (payload.get("response_payload") or {}).get("answer")
                self.final_at = now
                # A topic's messages come in commit order: nothing of this stream follows.
                self.done.set()


async def follow(watch: Watch, url: str, path: str, sockets: list[ClientConnection],
                 opening: asyncio.Semaphore) -> None:
    """The subscriber's socket, until cancelled."""
    try:
        async with opening:
            ws = await connect(url, open_timeout=120, ping_interval=None, max_size=None)
        sockets.append(ws)
        async with ws:
            await ws.send(json.dumps(watch.join_message(path)))
            async for frame in ws:
                watch.on_frame(path, frame)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        watch.error = watch.error or f"{type(exc).__name__}: {exc}"
        watch.ready.set()


async def drained(watches: list[Watch], drain: float, quiet: float) -> None:
    """Until every subscriber has its final state; at most `drain` seconds, and not once
    nothing at all has arrived for `quiet` seconds (what is still queued then is minutes
    away)."""
    began = time.monotonic()
    while not all(w.done.is_set() for w in watches):
        last = max((w.last_at for w in watches), default=0.0)
        if time.monotonic() - began > drain or (last and time.time() - last > quiet):
            return
        await asyncio.sleep(0.2)


async def heartbeats(sockets: list[ClientConnection]) -> None:
    """realtime-js' heartbeat on every socket."""
    ref = 0
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        for ws in list(sockets):
            ref += 1
            with contextlib.suppress(Exception):
                await ws.send(json.dumps([None, str(ref), "phoenix", "heartbeat", {}]))


# The writes, as the worker makes them ----------------------------------------------------

@dataclass
class Task:
    id: str
    user_id: str
    attempt: int = 0
    answer: str = ""
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class Writes:
    """When each write committed (its call returned), by (task id, seq); seq -1 is the
    outcome."""

    committed: dict[tuple[str, int], float] = field(default_factory=dict)
    claimed_at: float = 0.0  # the claim's call returned
    calls: int = 0  # group-commit calls sent
    rounds: int = 0
    late_rounds: int = 0  # began more than one interval after they were due
    not_applied: int = 0
    began: float = 0.0
    ended: float = 0.0


def piece(rng: random.Random) -> str:
    """A few words of 1-8 random letters (text that compresses like prose)."""
    return "".join(" " + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8)))
                   for _ in range(WORDS_PER_PIECE))


def submit_all(writer: GroupWriter, writes: list[Write], out: Writes, seq: int | None
               ) -> list[Future[Any]]:
    """Hand `writes` to the writer; with `seq`, note when each committed (the moment its
    call returned) under (task id, seq)."""
    futures = []
    for w in writes:
        future = writer.submit(w)
        if seq is not None:
            def stamp(_: Future[Any], key: tuple[str, int] = (w.task_id, seq)) -> None:
                out.committed[key] = time.time()
            future.add_done_callback(stamp)
        futures.append(future)
    return futures


def settle(futures: list[Future[Any]], out: Writes) -> None:
    for future in futures:
        result, _ = future.result()
        if not result.applied:
            out.not_applied += 1


def write_streams(store: TaskStore, tasks: list[Task], rounds: int, interval: float,
                  out: Writes) -> None:
    """Claim and start every task, stream `rounds` pieces to each, one group-commit call
    per interval, then complete them: what a worker process's StreamFlusher and
    GroupWriter send for these tasks."""
    writer = GroupWriter(store)
    out.began = time.time()
    by_id = {t.id: t for t in tasks}
    for claim in store.claim(len(tasks), LEASE_SECONDS):
        by_id[claim.id].attempt = claim.attempt
    out.claimed_at = time.time()
    settle(submit_all(writer, [Write("bind", t.id, t.attempt, WORKER, seconds=LEASE_SECONDS)
                               for t in tasks], out, None), out)
    start = renewed = time.monotonic()
    for seq in range(rounds):
        due = start + seq * interval
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif -wait > interval:
            out.late_rounds += 1
        writes = []
        for t in tasks:
            text = piece(t.rng)
            writes.append(Write("append", t.id, t.attempt, WORKER, seq=seq,
                                offset=len(t.answer), text=text))
            t.answer += text
        futures = submit_all(writer, writes, out, seq)
        if time.monotonic() - renewed >= LEASE_SECONDS / 3:  # the worker's lease renewals
            renewed = time.monotonic()
            futures += submit_all(writer, [Write("heartbeat", t.id, t.attempt, WORKER,
                                                 seconds=LEASE_SECONDS) for t in tasks],
                                  out, None)
        settle(futures, out)
        out.rounds += 1
    settle(submit_all(writer, [Write("complete", t.id, t.attempt, WORKER,
                                     doc={"answer": t.answer}) for t in tasks], out, -1), out)
    out.ended = time.time()
    out.calls = writer.calls


# Database counters -----------------------------------------------------------------------

def statement_classes(admin_url: str, dbname: str) -> dict[str, tuple[int, float]]:
    """(calls, execution ms) per statement_class, every statement of `dbname` but the
    bench's own."""
    out: dict[str, tuple[int, float]] = {}
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for query, top, calls, ms in conn.execute(
                "select s.query, s.toplevel, s.calls, s.total_exec_time"
                " from pg_stat_statements s join pg_database d on d.oid = s.dbid"
                " where d.datname = %s and s.query not like %s", [dbname, f"%{OWN}%"]):
            name = statement_class(str(query), bool(top))
            c, t = out.get(name, (0, 0.0))
            out[name] = (c + int(calls), t + float(ms))
    return out


def classes_since(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]
                  ) -> dict[str, tuple[int, float]]:
    return {k: (c - before.get(k, (0, 0.0))[0], ms - before.get(k, (0, 0.0))[1])
            for k, (c, ms) in after.items()}


def relation_names(db: str) -> dict[int, str]:
    """filenode -> schema.name of every relation of `db` (the stand-in's log is dropped
    when it stops: read while it runs)."""
    with psycopg.connect(db, autocommit=True) as conn:
        return {int(f): str(n) for f, n in conn.execute(
            "select pg_relation_filenode(c.oid) as bench_own, n.nspname || '.' || c.relname"
            " from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where pg_relation_filenode(c.oid) is not null")}


def wal_by_relation(admin_url: str, dbname: str, names: dict[int, str], start: str, end: str
                    ) -> dict[str, int]:
    """Bytes of WAL between two LSNs per relation of `dbname` (a record counted once, for
    its first block's relation; partitions of realtime.messages together). Records of no
    relation of it (commit records, other databases) are not here."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("create extension if not exists pg_walinspect")
        rows = conn.execute(
            "select b.relfilenode, sum(b.record_length)"
            " from pg_get_wal_block_info(%s::pg_lsn, %s::pg_lsn, false) b"
            " where b.block_id = 0"
            " and b.reldatabase = (select oid from pg_database where datname = %s)"
            " group by 1", [start, end, dbname]).fetchall()
    out: dict[str, int] = {}
    for filenode, size in rows:
        name = names.get(int(filenode), f"filenode {filenode}")
        if name.startswith("realtime.messages_"):
            name = "realtime.messages (partitions)"
        out[name] = out.get(name, 0) + int(size)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def current_lsn(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("select pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


class Backends:
    """Postgres backends told apart by application_name, for ResourceSampler: the
    writer's, the stand-in's, and every other child of the postmaster."""

    def __init__(self, admin_url: str, postmaster: int | None) -> None:
        self._conn = psycopg.connect(admin_url, autocommit=True)
        self._all = postgres_backends(postmaster)
        self._lock = threading.Lock()
        self._at = 0.0
        self._named: dict[str, set[int]] = {}

    def _refresh(self) -> dict[str, set[int]]:
        with self._lock:
            if time.monotonic() - self._at > 0.1:
                named: dict[str, set[int]] = {}
                for pid, app in self._conn.execute(
                        "select pid, application_name from pg_stat_activity"):
                    named.setdefault(str(app), set()).add(int(pid))
                self._named, self._at = named, time.monotonic()
            return self._named

    def tree(self, app: str | None) -> Callable[[], list[psutil.Process]]:
        def pick() -> list[psutil.Process]:
            named = self._refresh()
            if app is not None:
                pids = named.get(app, set())
                return [p for p in self._all() if p.pid in pids]
            taken = named.get(WRITER_APP, set()) | named.get(STANDIN_APP, set())
            return [p for p in self._all() if p.pid not in taken]
        return pick

    def close(self) -> None:
        self._conn.close()


# One path --------------------------------------------------------------------------------

def make_tasks(db: str, n: int) -> list[Task]:
    """`n` pending rows, each its own user's, inserted as the frontend does (one statement
    here)."""
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            "insert into public.agent_task_requests (status, request_payload, user_id)"
            " select 'pending', %s, gen_random_uuid() from generate_series(1, %s)"
            " returning id, user_id", [Jsonb({"prompt": "stream to me"}), n]).fetchall()
    return [Task(str(i), str(u), rng=random.Random(str(i))) for i, u in rows]


def updates_of_rows(db: str) -> int:
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute("select n_tup_upd as bench_own from pg_stat_user_tables"
                           " where relname = 'agent_task_requests'").fetchone()
    return int(row[0]) if row else 0


@dataclass
class PathRun:
    """One path on a fresh database: subscribe, measure the writes, drain, count."""

    s: Servers
    path: str
    streams: int
    rounds: int
    interval: float
    drain: float
    db: str = ""
    standin: StandIn | None = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    sampler: ResourceSampler | None = None
    writes: Writes = field(default_factory=Writes)

    @property
    def name(self) -> str:
        return dbname_of(self.db)

    def run(self) -> dict[str, Any]:
        s = self.s
        ctx = b.Context(s, b.Plan())
        self.db = s.new_database(f"rtbcast_{self.path[:5]}")
        count_everything(ctx, self.db, track_all=True, done_trigger="agent_task_requests")
        with psycopg.connect(self.db, autocommit=True) as conn:
            conn.execute("update agent_bridge.realtime_broadcast set enabled = %s",
                         [self.path == "broadcast"])
            if self.path == "broadcast":
                # Nobody follows postgres_changes here, and Realtime reads a project's
                # changes only for its postgres_changes subscribers; the stand-in would
                # log every change of a published table for nobody.
                conn.execute("alter publication supabase_realtime drop table"
                             " public.agent_task_requests, public.agent_task_chunks")
        tasks = make_tasks(self.db, self.streams)
        self.standin = standin = StandIn(s, self.db, s.workdir(f"rtbcast-{self.path}"))
        store = TaskStore(PostgresTransport(psycopg.conninfo.make_conninfo(
            self.db, application_name=WRITER_APP)))
        backends = Backends(s.admin_url, s.postgres_pid)
        try:
            names = relation_names(self.db)
            joining = statement_classes(s.admin_url, self.name)
            watches, joined_s = asyncio.run(self._watch(tasks, lambda: self._measured(
                ctx, store, tasks, backends)))
        finally:
            standin.proc.stop()
            store.close()
            backends.close()
        wait_backends_gone(s.admin_url, self.name)
        # The window ends at the drain: the stand-in's clean-up (DDL) is left out.
        end = dataclasses.replace(db_snapshot(s.admin_url, self.name),
                                  wal_lsn=self.after["lsn"])
        produced = self._produced()
        start = self.before["snapshot"]
        cost = db_cost(s.admin_url, start, end, tasks=max(produced, 1), insert_commits=0)
        wal = wal_by_relation(s.admin_url, self.name, names, start.wal_lsn, end.wal_lsn)
        classes = classes_since(self.before["classes"], statement_classes(s.admin_url,
                                                                          self.name))
        joins = classes_since(joining, self.before["classes"])
        return self._result(tasks, watches, joined_s, produced, cost, wal, classes, joins)

    def _measured(self, ctx: b.Context, store: TaskStore, tasks: list[Task],
                  backends: Backends) -> None:
        """Once every subscriber is ready: the counters before, then the writes."""
        assert self.standin is not None
        self.before = {"snapshot": snapshot_after_settling(ctx, self.db),
                       "updates": updates_of_rows(self.db),
                       "classes": statement_classes(self.s.admin_url, self.name),
                       "stats": self.standin.stats()}
        self.sampler = ResourceSampler({
            CPU_WRITER: backends.tree(WRITER_APP),
            CPU_STANDIN: backends.tree(STANDIN_APP),
            "postgres: other processes": backends.tree(None),
            CPU_STANDIN_PROCESS: self.standin.proc.processes,
            "bench: subscribers and writer": own_process})
        self.sampler.start()
        write_streams(store, tasks, self.rounds, self.interval, self.writes)

    async def _watch(self, tasks: list[Task], measured: Callable[[], None]
                     ) -> tuple[list[Watch], float]:
        """The subscribers join; `measured` runs (on a thread) once all are ready; then
        they get `drain` seconds after the last write to have everything."""
        assert self.standin is not None
        url = self.standin.ws_url(role_key("anon"))
        watches = [Watch(t.id, t.user_id) for t in tasks]
        sockets: list[ClientConnection] = []
        opening = asyncio.Semaphore(CONNECTING)
        began = time.monotonic()
        followers = [asyncio.create_task(follow(w, url, self.path, sockets, opening))
                     for w in watches]
        beat = asyncio.create_task(heartbeats(sockets))
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watches)), 300)
            joined_s = time.monotonic() - began
            await asyncio.to_thread(measured)
            await drained(watches, self.drain, QUIET_S)
            assert self.sampler is not None
            self.after = {"usage": await asyncio.to_thread(self.sampler.stop),
                          "lsn": await asyncio.to_thread(current_lsn, self.s.admin_url),
                          "stats": await asyncio.to_thread(self.standin.stats)}
        finally:
            beat.cancel()
            for f in followers:
                f.cancel()
            await asyncio.gather(beat, *followers, return_exceptions=True)
        return watches, joined_s

    def _produced(self) -> int:
        """Messages the database produced for the subscribers: Broadcast rows on the
        tasks' topics; for postgres_changes, every chunk inserted and row updated."""
        if self.path != "broadcast":
            return (self.streams * self.rounds + updates_of_rows(self.db)
                    - int(self.before["updates"]))
        with psycopg.connect(self.db, autocommit=True) as conn:
            row = conn.execute("select count(*) as bench_own from realtime.messages"
                               " where topic like %s", [TASK_TOPIC_PREFIX + "%"]).fetchone()
        return int(row[0]) if row else 0

    def _result(self, tasks: list[Task], watches: list[Watch], joined_s: float,
                produced: int, cost: dict[str, Any], wal: dict[str, int],
                classes: dict[str, tuple[int, float]], joins: dict[str, tuple[int, float]]
                ) -> dict[str, Any]:
        assert self.standin is not None
        writes = self.writes
        answers = {t.id: t.answer for t in tasks}
        pieces_whole = {w.task_id for w in watches if rebuild(w.pieces) == answers[w.task_id]}
        final_whole = {w.task_id for w in watches if w.final == answers[w.task_id]}
        lags = [at - writes.committed[(w.task_id, seq)] for w in watches
                for seq, at in w.arrived.items() if (w.task_id, seq) in writes.committed]
        final_lags = [w.final_at - writes.committed[(w.task_id, -1)] for w in watches
                      if w.final is not None and (w.task_id, -1) in writes.committed]
        first_lags = [w.first_state_at - writes.claimed_at for w in watches
                      if w.first_state_at]
        delivered = sum(w.messages for w in watches)
        last = max((w.last_at for w in watches), default=0.0)
        at_join, stats0, stats1 = self.before["stats"], self.before["stats"], self.after["stats"]
        stand = {k: v - stats0.get(k, 0) for k, v in stats1.items() if isinstance(v, int)}
        usage = {k: vars(v) for k, v in self.after["usage"].items()}
        per = max(produced, 1)
        wrote_s = max(writes.ended - writes.began, 1e-9)
        errors = [w.error for w in watches if w.error]
        stub_wal = sum(v for k, v in wal.items() if k.startswith("realtime_stub."))
        return {
            "path": self.path, "streams": self.streams, "pieces_per_stream": self.rounds,
            "interval_s": self.interval, "stream_seconds": wrote_s, "join_seconds": joined_s,
            "join_errors": errors[:5], "join_error_count": len(errors),
            "write_calls": writes.calls, "write_rounds": writes.rounds,
            # one transaction each, and the claim's
            "write_commits_per_message": (writes.calls + 1) / per,
            "late_rounds": writes.late_rounds, "writes_not_applied": writes.not_applied,
            "produced": produced, "delivered": delivered,
            "standin_delivered": stand.get("broadcasts" if self.path == "broadcast"
                                           else "events", 0),
            "final_states": sum(1 for w in watches if w.done.is_set()),
            "pieces_whole": len(pieces_whole), "final_whole": len(final_whole),
            "whole_answers": len(pieces_whole & final_whole),
            "pieces_missing": sum(self.rounds - len(w.pieces) for w in watches),
            "duplicates": sum(w.duplicates for w in watches),
            "offered_per_s": produced / wrote_s,
            "delivered_per_s": delivered / max(last - writes.began, 1e-9) if last else 0.0,
            "per_stream_per_s": produced / self.streams / wrote_s,
            "lag_ms": summary_ms(lags), "final_lag_ms": summary_ms(final_lags),
            "first_lag_ms": summary_ms(first_lags),
            "drain_s": (last - writes.ended) if last else None,
            "gave_up": not all(w.done.is_set() for w in watches),
            # Subscribing, before the window: Realtime's checks, the statements they ran.
            "joins": {"rls_checks": at_join.get("rls_checks_join", 0),
                      "refused": at_join.get("joins_refused", 0),
                      "statements_per_subscriber": sum(c for c, _ in joins.values())
                      / self.streams,
                      "exec_ms_per_subscriber": sum(ms for _, ms in joins.values())
                      / self.streams},
            "rls_checks_changes": stand.get("rls_checks_changes", 0),
            # postgres_changes: a change whose row is gone by the time Realtime checks it
            # (the chunks a completion deletes) is not sent, as walrus' check does.
            "rls_refused": (stand.get("rls_checks_changes", 0) - stand.get("events", 0)
                            if self.path != "broadcast" else 0),
            "standin": stand,
            "standin_errors": self.standin.proc.output.count("dispatch failed"),
            "db": cost, "wal_by_relation": {k: v / per for k, v in wal.items()},
            "wal_standin_log_bytes": stub_wal / per,
            "wal_bytes_without_log": cost["wal_bytes"] - stub_wal / per,
            "classes": {k: {"calls": c / per, "exec_ms": ms / per}
                        for k, (c, ms) in sorted(classes.items())},
            "resources": usage,
            "pg_cpu_ms": {k: 1000 * v["cpu_seconds"] / per for k, v in usage.items()
                          if k.startswith("postgres")},
        }


# Tables ----------------------------------------------------------------------------------

def handled(r: dict[str, Any]) -> int:
    """Messages Realtime (the stand-in) handled in the window: every Broadcast row it read;
    every postgres_changes change it checked (sent, or not sent: its row was gone)."""
    if r["path"] == "broadcast":
        return int(r["standin"].get("broadcast_rows", 0))
    return int(r["rls_checks_changes"])


def per_check(r: dict[str, Any]) -> tuple[str, str]:
    """Realtime's statements and execution ms per RLS check of a change ("-": none)."""
    checks = r["rls_checks_changes"]
    if not checks:
        return "-", "-"
    mine = r["classes"].get(REALTIME, {"calls": 0.0, "exec_ms": 0.0})
    produced = max(r["produced"], 1)
    return (f"{mine['calls'] * produced / checks:.2f}",
            f"{mine['exec_ms'] * produced / checks:.4f}")


def render(results: list[dict[str, Any]]) -> str:
    parts = [table(
        "Delivery (each subscriber on a socket of its own)",
        ["path", "streams", "subscribed in s", "messages produced", "delivered",
         "stand-in sent", "not sent: row gone at the RLS check", "pieces whole",
         "final answer whole"],
        [[r["path"], r["streams"], r["join_seconds"], r["produced"], r["delivered"],
          r["standin_delivered"], r["rls_refused"], f"{r['pieces_whole']}/{r['streams']}",
          f"{r['final_whole']}/{r['streams']}"] for r in results]),
        table(
        "Rate and lag (lag: the write's commit → the subscriber)",
        ["path", "written s", "offered msg/s", "delivered msg/s", "claim's state p50 ms",
         "pieces p50 ms", "p99", "max", "final state p50 ms",
         "last message, s after the last write"],
        [[r["path"], r["stream_seconds"], r["offered_per_s"], r["delivered_per_s"],
          r["first_lag_ms"]["p50"], r["lag_ms"]["p50"], r["lag_ms"]["p99"],
          r["lag_ms"]["max"], r["final_lag_ms"]["p50"],
          ("gave up, " if r["gave_up"] else "") + f"{r['drain_s'] or 0:.1f}"]
         for r in results])]
    parts.append(table(
        "Database work per message produced (from the claim to the drain)",
        ["path", "statements, top-level", "nested", "RLS checks", "WAL bytes",
         "of which the stand-in's log", "WAL bytes without it",
         "commits of the writes", "all write commits (WAL)",
         "Postgres CPU ms", "writer's backends", "stand-in's backends"],
        [[r["path"], f"{r['db']['statements_top']:.2f}", f"{r['db']['statements_nested']:.2f}",
          f"{r['rls_checks_changes'] / max(r['produced'], 1):.3f}",
          r["db"]["wal_bytes"], r["wal_standin_log_bytes"], r["wal_bytes_without_log"],
          f"{r['write_commits_per_message']:.4f}",
          f"{r['db']['wal_commits_beyond_insert']:.3f}",
          f"{sum(r['pg_cpu_ms'].values()):.3f}", f"{r['pg_cpu_ms'].get(CPU_WRITER, 0.0):.3f}",
          f"{r['pg_cpu_ms'].get(CPU_STANDIN, 0.0):.3f}"] for r in results]))
    parts.append(table(
        "Statements per message produced, by who runs them (pg_stat_statements, track = all)",
        ["path", "statements of", "calls", "execution ms"],
        [[r["path"], name, f"{v['calls']:.3f}", f"{v['exec_ms']:.4f}"]
         for r in results for name, v in r["classes"].items()]))
    parts.append(table(
        "Realtime's side, per message it handled (a postgres_changes change is handled once "
        "its RLS check ran; the rest were still queued when the run gave up)",
        ["path", "handled", "RLS checks", "statements per check", "execution ms per check",
         "stand-in CPU ms per message handled"],
        [[r["path"], handled(r), r["rls_checks_changes"],
          *per_check(r), 1000 * r["resources"][CPU_STANDIN_PROCESS]["cpu_seconds"]
          / max(handled(r), 1)] for r in results]))
    parts.append(table(
        "Subscribing (before the measured window)",
        ["path", "subscribers", "RLS checks at join", "refused", "statements per subscriber",
         "execution ms per subscriber"],
        [[r["path"], r["streams"], r["joins"]["rls_checks"], r["joins"]["refused"],
          f"{r['joins']['statements_per_subscriber']:.2f}",
          f"{r['joins']['exec_ms_per_subscriber']:.3f}"] for r in results]))
    parts.append(table(
        "WAL bytes per message produced, by relation (record's first block)",
        ["path", "relation", "bytes"],
        [[r["path"], name, v] for r in results
         for name, v in list(r["wal_by_relation"].items())[:6]]))
    parts.append(table(
        "CPU from the claim to the drain",
        ["path", "process", "CPU s", "busiest process, % of a core"],
        [[r["path"], proc, u["cpu_seconds"], u["busiest_cpu_pct"]]
         for r in results for proc, u in r["resources"].items()]))
    if results:
        per_stream = 1 / results[0]["interval_s"]
        measured = max(r["per_stream_per_s"] for r in results)
        n = results[0]["streams"]
        parts.append(table(
            f"Realtime plan limits: streams each plan carries (one watcher each; "
            f"{per_stream:g} messages/s per stream at the interval, {measured:.1f} measured "
            "with the states)",
            ["plan", "messages/s", "streams at the interval", "at the measured rate",
             f"{n:,} streams need"],
            [[plan, limit, streams_carried(limit, per_stream),
              streams_carried(limit, measured),
              f"{n * measured:,.0f} msg/s ({n * measured / limit:.1f}× the limit)"]
             for plan, limit in PLANS]))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench.realtime_broadcast", __doc__)
    p.add_argument("--streams", type=int, default=1000, help="watched streams (default 1000)")
    p.add_argument("--seconds", type=float, default=5.0, help="streaming time (default 5)")
    p.add_argument("--interval", type=float, default=0.1,
                   help="AGENT_STREAM_INTERVAL: seconds between two writes of a stream")
    p.add_argument("--drain", type=float, default=90.0,
                   help="seconds to wait after the last write for every final state (at "
                        f"most; not once nothing arrived for {QUIET_S:g} s)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated: " + ", ".join(PATHS))
    p.add_argument("--from-json", type=Path, metavar="PATH",
                   help="print the tables of a JSON file written by --json, and exit")
    p.add_argument("--serve-standin", metavar="DATABASE_URL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_standin:
        serve_standin(args.serve_standin)
        return 0
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())))
        return 0
    paths = [x for x in args.paths.split(",") if x]
    for x in paths:
        if x not in PATHS:
            p.error(f"unknown path {x!r}")
    rounds = max(1, round(args.seconds / args.interval))
    began = time.monotonic()
    results = []
    with servers() as s:
        for path in paths:
            print(f"… {path}: {args.streams} streams, {rounds} pieces each", flush=True)
            results.append(PathRun(s, path, args.streams, rounds, args.interval,
                                   args.drain).run())
            r = results[-1]
            print(f"   {r['delivered']}/{r['produced']} messages delivered, "
                  f"{r['whole_answers']}/{r['streams']} answers whole", flush=True)
    print()
    print(f"Command: {Path(sys.executable).name} -m bench.realtime_broadcast "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"Total run time {time.monotonic() - began:.0f} s.\n")
    print(render(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
