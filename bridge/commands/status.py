"""`agent-bridge status`: the table's counts, the broker queue and the workers online.

Each dependency is looked at on its own: one that is down is shown as down and the
rest is still reported. Exit 1 only when the counts cannot be read: the database
(or Supabase) is unreachable, or not migrated.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from bridge.config import Settings
from bridge.errors import StoreError, StoreUnavailable, first_line
from bridge.publisher import BROKER_ERRORS, BrokerUnavailable, Publisher
from bridge.store import open_store

PING_TIMEOUT = 1.0  # seconds workers get to answer a ping


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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status", help="counts by status, backlog, broker queue and workers online",
        description="Show the task table's counts by status, the due backlog and its oldest "
                    "row, rows stuck past their lease, the broker queue depth and the "
                    "Celery workers online. Exit 1 when the database is unreachable.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=run)


# Probes, shared with `agent-bridge check` -----------------------------------------
def probe_broker(settings: Settings) -> Broker:
    """Connect to the broker and read the queue depth."""
    from tasks.app import RUN_AGENT, app

    broker = Broker(maybe_sanitize_url(settings.broker_url), settings.celery_queue)
    try:
        broker.queue_depth = Publisher(app, settings.celery_queue, RUN_AGENT).queue_depth()
        broker.reachable = True
    except BrokerUnavailable as exc:
        broker.error = first_line(exc.__cause__ or exc)
    return broker


def probe_workers(broker: Broker) -> Workers:
    """Ping the workers (only when the broker answered: asking through a dead one hangs)."""
    if not broker.reachable:
        return Workers(error="not asked: the broker is unreachable")
    from tasks.app import app

    try:
        replies = app.control.ping(timeout=PING_TIMEOUT) or []
    except BROKER_ERRORS as exc:
        return Workers(error=f"the broker failed while asking: {first_line(exc)}")
    return Workers(sorted(name for reply in replies for name in reply))


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
    try:
        stats = store.stats()
        report["database"]["reachable"] = True
    except StoreError as exc:  # down, or up without the migration (reachable, no stats)
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
    workers = probe_workers(broker)
    report["broker"] = asdict(broker)
    report["workers"] = asdict(workers)

    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if report["counts"] is not None else 1


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
