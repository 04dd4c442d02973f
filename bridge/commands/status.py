"""`agent-bridge status`: the table's counts, the broker queue and the workers online,
in total and per agent (backlog, processing, failures, queue, the workers serving it).

Each dependency is looked at on its own: one that is down is shown as down and the
rest is still reported. Exit 1 only when the counts cannot be read: the database
(or Supabase) is unreachable, or not migrated.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from bridge.agents import queue_name
from bridge.celery_app import RUN_AGENT, create_celery_app
from bridge.commands.submit import error_of
from bridge.config import Settings
from bridge.dev_lock import running_dev
from bridge.errors import StoreError, StoreUnavailable, first_line
from bridge.publisher import BROKER_ERRORS, BrokerUnavailable, Publisher
from bridge.store import AgentStats, open_store

PING_TIMEOUT = 1.0  # seconds workers get to answer a ping
LATEST_FAILURES = 5  # failed rows listed, newest first


@dataclass
class Broker:
    url: str
    queue: str
    reachable: bool = False
    queue_depth: int | None = None
    error: str | None = None


@dataclass
class Workers:
    online: list[str] = field(default_factory=list)
    error: str | None = None  # why they could not be asked
    queues: dict[str, list[str]] = field(default_factory=dict)  # worker -> queues it consumes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status", help="counts by status, backlog, broker queue and workers online",
        description="Show the task table's counts by status, the due backlog and its oldest "
                    "row, rows stuck past their lease, the broker queue depth and the "
                    "Celery workers online. Exit 1 when the database is unreachable.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=run)


# Probes, shared with `agent-bridge check` -----------------------------------------
@cache
def celery_app(settings: Settings) -> Celery:
    """One app (one broker connection pool) for the probes of one command."""
    return create_celery_app(settings)


def probe_broker(settings: Settings) -> Broker:
    """Connect to the broker and read the queue depth."""
    app = celery_app(settings)
    broker = Broker(maybe_sanitize_url(settings.broker_url), settings.celery_queue)
    try:
        broker.queue_depth = Publisher(app, settings.celery_queue, RUN_AGENT).queue_depth()
        broker.reachable = True
    except BrokerUnavailable as exc:
        broker.error = first_line(exc.__cause__ or exc)
    return broker


def probe_workers(settings: Settings, broker: Broker) -> Workers:
    """Ask the workers which queues they consume (only when the broker answered: asking
    through a dead one hangs). Answering is being online."""
    if not broker.reachable:
        return Workers(error="not asked: the broker is unreachable")
    try:
        replies = celery_app(settings).control.inspect(timeout=PING_TIMEOUT).active_queues() or {}
    except BROKER_ERRORS as exc:
        return Workers(error=f"the broker failed while asking: {first_line(exc)}")
    queues = {name: sorted(str(q.get("name")) for q in reply or [])
              for name, reply in replies.items()}
    return Workers(sorted(queues), queues=queues)


def agent_rows(settings: Settings, store_agents: list[AgentStats] | None, workers: Workers,
               broker: Broker) -> list[dict[str, Any]]:
    """One entry per agent: the configured ones, and any other that has rows."""
    agents = settings.configured_agents()
    counts = {a.agent: a for a in store_agents or []}
    names = [*agents.names, *sorted(set(counts) - set(agents.names))]
    publisher = (Publisher(celery_app(settings), settings.celery_queue, RUN_AGENT)
                 if broker.reachable else None)
    rows = []
    for name in names:
        queue = queue_name(settings.celery_queue, name)
        c = counts.get(name)
        depth: int | None = None
        if publisher is not None:
            try:
                depth = publisher.queue_depth(queue)
            except BrokerUnavailable:
                depth = None
        rows.append({
            "agent": name, "configured": name in agents.names, "queue": queue,
            "pending": c.pending if c else (None if store_agents is None else 0),
            "due": c.due if c else (None if store_agents is None else 0),
            "oldest_due_seconds": c.oldest_due_seconds if c else None,
            "processing": c.processing if c else (None if store_agents is None else 0),
            "failed": c.failed if c else (None if store_agents is None else 0),
            "queue_depth": depth,
            "workers": sorted(w for w, qs in workers.queues.items() if queue in qs)})
    return rows


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


# The command --------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    report: dict[str, Any] = {"transport": settings.store_kind,
                              "database": {"reachable": False, "error": None}}
    store = open_store(settings, pool=False)
    per_agent: list[AgentStats] | None = None
    report["latest_failures"] = []
    try:
        stats = store.stats()
        report["database"]["reachable"] = True
        if stats.failed:
            report["latest_failures"] = [
                {"id": f["id"], "agent": f.get("agent"), "attempts": f.get("attempts"),
                 "finished_at": _iso(f.get("finished_at")),
                 "error": error_of(f.get("error"), None)}
                for f in store.latest_failures(LATEST_FAILURES)]
        per_agent = store.agent_stats()
    except StoreError as exc:  # down, or up without the migration (reachable, no stats)
        if not report["database"]["reachable"]:  # else: totals, but no per-agent counts
            report["database"].update(reachable=not isinstance(exc, StoreUnavailable),
                                      error=str(exc))
            stats = None
    finally:
        store.close()
    if stats is not None:
        report.update(
            counts={"pending": stats.pending, "processing": stats.processing,
                    "completed": stats.completed, "failed": stats.failed},
            due=stats.due, oldest_due_seconds=stats.oldest_due_seconds,
            expired_leases=stats.expired_leases)
    else:
        report.update(counts=None, due=None, oldest_due_seconds=None, expired_leases=None)
    broker = probe_broker(settings)
    workers = probe_workers(settings, broker)
    report["broker"] = asdict(broker)
    report["workers"] = asdict(workers)
    report["agents"] = agent_rows(settings, per_agent, workers, broker)

    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
        if not report["database"]["reachable"] and dev_stopped_here():
            print("  agent-bridge dev is not running in this folder: start it with "
                  "agent-bridge dev")
    return 0 if report["counts"] is not None else 1


def dev_stopped_here() -> bool:
    """./.agent-bridge/env was written by a `dev` that no longer runs (a stale env)."""
    data_dir = Path(".agent-bridge")
    return (data_dir / "env").exists() and running_dev(data_dir) is None


def print_table(r: dict[str, Any]) -> None:
    lines: list[tuple[str, str]] = []
    where = "Postgres (DATABASE_URL)" if r["transport"] == "postgres" else "Supabase"
    db = r["database"]
    if r["counts"] is None:
        hint = "" if not db["reachable"] else " (see `agent-bridge check`)"
        lines.append(("Database", f"❌ {db['error']}{hint}"))
    else:
        c = r["counts"]
        pending = str(c["pending"])
        if c["pending"]:
            pending += f" ({r['due']} due now, the oldest for {age(r['oldest_due_seconds'])})"
        lines += [
            ("Database", f"✅ {where}"),
            ("Pending", pending),
            ("Processing", str(c["processing"])),
            ("Completed", str(c["completed"])),
            ("Failed", str(c["failed"]) + ("  (requeue: agent-bridge retry --all)"
                                           if c["failed"] else "")),
            ("Expired leases", str(r["expired_leases"]) + (
                "  ⚠️  processing rows past their lease: the bridge returns them to pending"
                if r["expired_leases"] else "")),
        ]
    b = r["broker"]
    lines.append(("Broker queue", f"✅ {b['queue_depth']} job(s) waiting in {b['queue']} "
                                  f"({b['url']})" if b["reachable"]
                  else f"❌ unreachable at {b['url']}: {b['error']}"))
    w = r["workers"]
    if w["error"]:
        lines.append(("Workers", f"❌ {w['error']}"))
    elif w["online"]:
        lines.append(("Workers", f"✅ {len(w['online'])} online: {', '.join(w['online'])}"))
    else:
        lines.append(("Workers", "❌ none online (start one: celery -A tasks worker)"))
    width = max(len(k) for k, _ in lines)
    print(f"📊 agent-bridge status · {where}")
    for key, value in lines:
        print(f"  {key.ljust(width)}  {value}")
    print_agents(r["agents"])
    print_failures(r.get("latest_failures") or [])


def print_failures(failures: list[dict[str, Any]]) -> None:
    """The latest failed rows with their errors (`agent-bridge show ID` for the rest)."""
    if not failures:
        return
    print("  Latest failures (agent-bridge show ID)")
    for f in failures:
        when = (f["finished_at"] or "")[:19].replace("T", " ")
        print(f"    {f['id']}  {when}  {f['error']}"[:200])


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def print_agents(agents: list[dict[str, Any]]) -> None:
    """Per agent: backlog, processing, failures, queue depth, workers serving it."""
    if len(agents) == 1 and agents[0]["agent"] == "default" and not agents[0]["failed"]:
        return  # one agent: the lines above say it all
    header = ("agent", "backlog", "processing", "failed", "queue", "workers")
    table = [header]
    for a in agents:
        backlog = "?" if a["due"] is None else str(a["due"])
        if a["due"]:
            backlog += f" (oldest {age(a['oldest_due_seconds'])})"
        workers = (f"{len(a['workers'])}" if a["workers"]
                   else "⚠️  none" if a["configured"] else "-")
        name = a["agent"] if a["configured"] else f"{a['agent']} (⚠️  not in AGENTS)"
        table.append((name, backlog, _n(a["processing"]), _n(a["failed"]),
                      f"{a['queue']}: {_n(a['queue_depth'])}", workers))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print("  Agents")
    for row in table:
        print("    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
              .rstrip())


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)
